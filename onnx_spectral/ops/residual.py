"""Where a tensor joins a residual stream: an Add with another activation of its shape, or the
input + skip sum inside ONNX Runtime's fused SkipLayerNormalization."""

from __future__ import annotations

from onnx_spectral.graph.model import GraphIndex
from onnx_spectral.ops.contrib import MICROSOFT
from onnx_spectral.ops.fused_attention import SkipLayerNormalizationHandler

_PASS_THROUGH_OPS = frozenset({"Add", "Sub", "Mul", "Div"})
"""Arithmetic that a tensor may pass through, with a constant, before it joins the stream."""


def stream_partner(graph: GraphIndex, tensor: str) -> str | None:
    """The residual stream `tensor` is added to: the other operand of the Add (or of the
    fused SkipLayerNormalization's input + skip sum) that sums it, after arithmetic with
    constants only (a bias Add, a scale Mul), with an activation of the same shape; None when
    `tensor` goes anywhere else first."""
    while tensor not in graph.graph_outputs:
        readers = graph.consumers.get(tensor, [])
        if len(readers) != 1:
            return None
        node, position = readers[0]
        if (node.domain == MICROSOFT and node.op_type in SkipLayerNormalizationHandler.summing
                and position in (0, 1)):
            return _same_shape(graph, tensor, node.input[1 - position])
        if (node.op_type not in _PASS_THROUGH_OPS or node.domain not in ("", "ai.onnx")
                or len(node.input) != 2 or (node.op_type == "Div" and position != 0)):
            return None
        other = node.input[1 - position]
        if graph.constant(other) is None:
            return _same_shape(graph, tensor, other) if node.op_type == "Add" else None
        tensor = node.output[0]
    return None


def _same_shape(graph: GraphIndex, tensor: str, other: str) -> str | None:
    """`other` when shape inference gives it the shape of `tensor`, else None."""
    shape = graph.shapes.get(tensor)
    return other if shape is not None and graph.shapes.get(other) == shape else None
