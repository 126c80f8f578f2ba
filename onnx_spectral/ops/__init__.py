"""Op handlers, one small class per op family, in a plain registry keyed by op type.

An op without a handler is never guessed at: the analysis freezes every group that reaches it.
"""

from __future__ import annotations

from collections.abc import Mapping

from onnx_spectral.ops.base import OpHandler
from onnx_spectral.ops.concat import ConcatHandler, SliceHandler, SplitHandler
from onnx_spectral.ops.conv import ConvHandler, ConvTransposeHandler
from onnx_spectral.ops.elementwise import ArithmeticHandler, UnaryHandler
from onnx_spectral.ops.layout import LayoutHandler
from onnx_spectral.ops.linear import GemmHandler, MatMulHandler
from onnx_spectral.ops.normalization import NormalizationHandler
from onnx_spectral.ops.spatial import (
    PadHandler,
    PoolHandler,
    ReduceHandler,
    ResizeHandler,
    ShapeHandler,
)

_HANDLERS: tuple[OpHandler, ...] = (
    ConvHandler(),
    ConvTransposeHandler(),
    GemmHandler(),
    MatMulHandler(),
    UnaryHandler(),
    ArithmeticHandler(),
    NormalizationHandler(),
    PoolHandler(),
    PadHandler(),
    ResizeHandler(),
    ReduceHandler(),
    ShapeHandler(),
    LayoutHandler(),
    ConcatHandler(),
    SplitHandler(),
    SliceHandler(),
)

REGISTRY: Mapping[str, OpHandler] = {
    op_type: handler for handler in _HANDLERS for op_type in handler.op_types
}


def handler_for(op_type: str, domain: str = "") -> OpHandler | None:
    """The handler of a default-domain op type, None when the op is not supported."""
    if domain not in ("", "ai.onnx"):
        return None
    return REGISTRY.get(op_type)
