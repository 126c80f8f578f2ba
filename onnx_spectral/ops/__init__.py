"""Op handlers, one small class per op family, in a plain registry keyed by op type.

An op without a handler is never guessed at: the analysis freezes every group that reaches it.
"""

from __future__ import annotations

from collections.abc import Mapping

from .base import OpHandler
from .concat import ConcatHandler, SliceHandler, SplitHandler
from .conv import ConvHandler, ConvTransposeHandler
from .elementwise import ArithmeticHandler, UnaryHandler
from .layout import LayoutHandler
from .linear import GemmHandler, MatMulHandler
from .normalization import NormalizationHandler
from .spatial import PadHandler, PoolHandler, ReduceHandler, ResizeHandler, ShapeHandler

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
