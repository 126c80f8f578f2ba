"""Op handlers, one small class per op family, in a plain registry keyed by domain and op type.

An op without a handler is never guessed at: the analysis freezes every group that reaches it.
Handlers of linear layers also implement `LinearLayer` (their weight as a matrix, their MACs,
their bias), which the cost model, the affine offsets and the layer refit go through.
"""

from __future__ import annotations

from collections.abc import Mapping

import onnx

from onnx_spectral.errors import GraphError
from onnx_spectral.ops.base import OpHandler
from onnx_spectral.ops.concat import ConcatHandler, SliceHandler, SplitHandler
from onnx_spectral.ops.contrib import MICROSOFT, register_schemas
from onnx_spectral.ops.conv import ConvHandler, ConvTransposeHandler, FusedConvHandler
from onnx_spectral.ops.elementwise import ArithmeticHandler, UnaryHandler
from onnx_spectral.ops.fused_attention import (
    BiasGeluHandler,
    FusedAttentionHandler,
    SkipLayerNormalizationHandler,
)
from onnx_spectral.ops.layout import LayoutHandler
from onnx_spectral.ops.linear import (
    EinsumHandler,
    FusedGemmHandler,
    FusedMatMulHandler,
    GemmHandler,
    MatMulHandler,
)
from onnx_spectral.ops.linear_layer import LinearLayer
from onnx_spectral.ops.normalization import (
    GroupNormalizationHandler,
    LayerNormalizationHandler,
    LRNHandler,
    NormalizationHandler,
    SoftmaxHandler,
)
from onnx_spectral.ops.recurrent import RecurrentHandler
from onnx_spectral.ops.spatial import (
    PadHandler,
    PoolHandler,
    ReduceHandler,
    ResizeHandler,
    ShapeHandler,
)

register_schemas()  # shape inference of the com.microsoft fused ops

_HANDLERS: tuple[tuple[str, OpHandler], ...] = (
    ("", ConvHandler()),
    ("", ConvTransposeHandler()),
    ("", GemmHandler()),
    ("", MatMulHandler()),
    ("", EinsumHandler()),
    ("", RecurrentHandler()),
    ("", UnaryHandler()),
    ("", ArithmeticHandler()),
    ("", NormalizationHandler()),
    ("", LayerNormalizationHandler()),
    ("", GroupNormalizationHandler()),
    ("", SoftmaxHandler()),
    ("", LRNHandler()),
    ("", PoolHandler()),
    ("", PadHandler()),
    ("", ResizeHandler()),
    ("", ReduceHandler()),
    ("", ShapeHandler()),
    ("", LayoutHandler()),
    ("", ConcatHandler()),
    ("", SplitHandler()),
    ("", SliceHandler()),
    (MICROSOFT, FusedConvHandler()),
    (MICROSOFT, FusedGemmHandler()),
    (MICROSOFT, FusedMatMulHandler()),
    (MICROSOFT, FusedAttentionHandler()),
    (MICROSOFT, BiasGeluHandler()),
    (MICROSOFT, SkipLayerNormalizationHandler()),
)

REGISTRY: Mapping[tuple[str, str], OpHandler] = {
    (domain, op_type): handler for domain, handler in _HANDLERS for op_type in handler.op_types
}
"""(domain, op type) -> handler; the default domain is ""."""


def handler_for(op_type: str, domain: str = "") -> OpHandler | None:
    """The handler of an op type of `domain` ("" or "ai.onnx": the default), None when the op
    is not supported."""
    return REGISTRY.get(("" if domain == "ai.onnx" else domain, op_type))


def require_handler(node: onnx.NodeProto) -> OpHandler:
    """The handler of a node the analysis already accepted; GraphError when it has none."""
    handler = handler_for(node.op_type, node.domain)
    if handler is None:
        raise GraphError(f"no op handler for {node.op_type} (domain '{node.domain}')",
                         node=node.name)
    return handler


def linear_layer_for(node: onnx.NodeProto) -> LinearLayer | None:
    """The linear-layer view of `node` (Conv, Gemm, MatMul, ...), None for other ops."""
    handler = handler_for(node.op_type, node.domain)
    return handler if isinstance(handler, LinearLayer) else None
