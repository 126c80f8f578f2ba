"""Gemm and MatMul with a constant weight: producers of their output columns and sinks.

A sink reads the group on its contraction axis, either directly (`Plain`, channels on the last
axis) or through a layout chain (`Mapped`, e.g. Flatten or Transpose + Reshape after a conv),
in which case every spatial block of the weight gets the reconstruction.
"""

from __future__ import annotations

import numpy as np
import onnx

from onnx_spectral.errors import RewriteError
from onnx_spectral.graph.model import GraphIndex, attributes
from onnx_spectral.ops.base import AnalysisContext, Editor, Member, Plain, SinkUse, freeze_inputs
from onnx_spectral.ops.layout import LayoutError, simulate_chain, sink_feature_map


def _as_rows(weight: np.ndarray, transposed: bool) -> np.ndarray:
    """The weight as [outputs, inputs]: Gemm's B with transB=1 already is; B [K, N] is not."""
    return weight if transposed else weight.T


def _register_sink(node: onnx.NodeProto, ctx: AnalysisContext) -> None:
    """Register `node` as a sink of its input 0's group (contraction over the last axis)."""
    state = ctx.state(node.input[0])
    if state is None:
        return
    if isinstance(state, Plain):
        if state.axis == state.rank - 1:
            ctx.add_sink(state.group, SinkUse(node.name, 0, node.input[0], state.axis))
        else:
            ctx.freeze(state.group, f"{node.op_type} '{node.name}' contracts an axis that is "
                                    "not the channel axis")
        return
    try:
        feature_map = sink_feature_map(state, node.name)
    except LayoutError as exc:
        ctx.freeze(state.group, f"{node.op_type} '{node.name}' reads scattered channels: {exc}")
        return
    ctx.add_sink(state.group, SinkUse(node.name, 0, state.source, state.source_axis,
                                      feature_map))


_BLOCK_BYTES = 1 << 28
"""Plain sink weights larger than this go to float64 a block of rows at a time, so that a
weight of a model past 2 GiB (often memory-mapped) is never copied whole in float64."""


def _row_blocks(rows: np.ndarray) -> list[slice]:
    """Slices of at most _BLOCK_BYTES / 2 (float32) of the rows of `rows` [outputs, F]."""
    step = max(1, _BLOCK_BYTES // 2 // max(1, rows[:1].nbytes))
    return [slice(start, start + step) for start in range(0, rows.shape[0], step)]


def _sink_rows_gram(rows: np.ndarray, sink: SinkUse, channels: int) -> np.ndarray:
    """Z^T Z [m, m] of weight rows [outputs, features], summed over spatial blocks."""
    if sink.feature_map is None and rows.nbytes > _BLOCK_BYTES:
        gram = np.zeros((rows.shape[1], rows.shape[1]))
        for block in _row_blocks(rows):
            part = rows[block].astype(np.float64)
            gram += part.T @ part
        return gram
    rows = rows.astype(np.float64)
    if sink.feature_map is None:
        return rows.T @ rows
    blocks = rows[:, sink.feature_map.lookup(channels)]  # [outputs, m, positions]
    flat = np.moveaxis(blocks, 1, -1).reshape(-1, channels)
    return flat.T @ flat


def _fold_rows(rows: np.ndarray, sink: SinkUse, reconstruction: np.ndarray, kept: np.ndarray,
               editor: Editor) -> np.ndarray:
    """Weight rows [outputs, F] -> [outputs, F'] with the reconstruction A ([m, k]) folded in."""
    if sink.feature_map is None and rows.nbytes > _BLOCK_BYTES:
        folded = np.empty((rows.shape[0], reconstruction.shape[1]), dtype=rows.dtype)
        for block in _row_blocks(rows):
            folded[block] = rows[block].astype(np.float64) @ reconstruction
        return folded
    wide = rows.astype(np.float64)
    if sink.feature_map is None:
        return (wide @ reconstruction).astype(rows.dtype)
    feature_map = sink.feature_map
    channels = reconstruction.shape[0]
    try:
        channel, position, _ = simulate_chain(
            editor.graph, sink.tap, sink.tap_axis, feature_map.chain, kept, editor.input_value)
    except LayoutError as exc:
        raise RewriteError(f"the layout chain {feature_map.chain} into sink '{sink.node}' "
                           f"cannot be rewritten for {kept.size} channels: {exc}") from exc
    blocks = np.einsum("ocp,cj->ojp", wide[:, feature_map.lookup(channels)], reconstruction)
    kept_index = np.searchsorted(kept, channel[0])
    return blocks[:, kept_index, position[0]].astype(rows.dtype)


class GemmHandler:
    """Gemm Y = alpha A B + beta C with a constant B (mind transB)."""

    op_types = ("Gemm",)

    def analyze(self, node: onnx.NodeProto, ctx: AnalysisContext) -> None:
        weight = ctx.graph.input_constant(node, 1)
        attrs = attributes(node)
        bias_name = node.input[2] if len(node.input) > 2 else ""
        if weight is None or (bias_name and ctx.graph.constant(bias_name) is None):
            freeze_inputs(node, ctx, "Gemm whose B or C is an activation")
            return
        if int(attrs.get("transA", 0)):  # type: ignore[call-overload]
            freeze_inputs(node, ctx, "Gemm with transA=1 contracts the sample axis")
            return
        _register_sink(node, ctx)
        transposed = bool(attrs.get("transB", 0))
        outputs = weight.shape[0] if transposed else weight.shape[1]
        ctx.new_group(node.name, int(outputs), node.output[0], axis=1, rank=2)

    def slice(self, node: onnx.NodeProto, member: Member, kept: np.ndarray, channels: int,
              editor: Editor) -> None:
        transposed = bool(attributes(node).get("transB", 0))
        weight = editor.input_value(node, 1)
        assert weight is not None
        editor.set_input_value(node, 1, weight[kept] if transposed else weight[:, kept])
        bias = editor.input_value(node, 2)
        if bias is not None and bias.ndim >= 1 and bias.shape[-1] == channels and channels > 1:
            editor.set_input_value(node, 2, bias[..., kept])

    def output_rows(self, node: onnx.NodeProto, graph: GraphIndex) -> np.ndarray:
        weight = graph.input_constant(node, 1)
        assert weight is not None
        return _as_rows(weight, bool(attributes(node).get("transB", 0)))

    def sink_gram(self, node: onnx.NodeProto, sink: SinkUse, channels: int,
                  graph: GraphIndex) -> np.ndarray:
        weight = graph.input_constant(node, 1)
        assert weight is not None
        rows = _as_rows(weight, bool(attributes(node).get("transB", 0)))
        return _sink_rows_gram(rows, sink, channels)

    def fold(self, node: onnx.NodeProto, sink: SinkUse, reconstruction: np.ndarray,
             kept: np.ndarray, editor: Editor) -> None:
        transposed = bool(attributes(node).get("transB", 0))
        weight = editor.input_value(node, 1)
        assert weight is not None
        rows = _fold_rows(_as_rows(weight, transposed), sink, reconstruction, kept, editor)
        editor.set_input_value(node, 1, _as_rows(rows, transposed))


class MatMulHandler:
    """MatMul of an activation [..., K] by a constant matrix [K, N]."""

    op_types = ("MatMul",)

    def analyze(self, node: onnx.NodeProto, ctx: AnalysisContext) -> None:
        weight = ctx.graph.input_constant(node, 1)
        if weight is None or weight.ndim != 2 or ctx.graph.input_constant(node, 0) is not None:
            freeze_inputs(node, ctx, "MatMul that is not activation x constant matrix")
            return
        rank = ctx.graph.rank(node.output[0])
        _register_sink(node, ctx)
        if rank is None:
            return
        ctx.new_group(node.name, int(weight.shape[1]), node.output[0], axis=rank - 1, rank=rank)

    def slice(self, node: onnx.NodeProto, member: Member, kept: np.ndarray, channels: int,
              editor: Editor) -> None:
        weight = editor.input_value(node, 1)
        assert weight is not None
        editor.set_input_value(node, 1, weight[:, kept])

    def output_rows(self, node: onnx.NodeProto, graph: GraphIndex) -> np.ndarray:
        weight = graph.input_constant(node, 1)
        assert weight is not None
        return weight.T

    def sink_gram(self, node: onnx.NodeProto, sink: SinkUse, channels: int,
                  graph: GraphIndex) -> np.ndarray:
        weight = graph.input_constant(node, 1)
        assert weight is not None
        return _sink_rows_gram(weight.T, sink, channels)

    def fold(self, node: onnx.NodeProto, sink: SinkUse, reconstruction: np.ndarray,
             kept: np.ndarray, editor: Editor) -> None:
        weight = editor.input_value(node, 1)
        assert weight is not None
        rows = _fold_rows(weight.T, sink, reconstruction, kept, editor)
        editor.set_input_value(node, 1, np.ascontiguousarray(rows.T))
