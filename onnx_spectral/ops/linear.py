"""Gemm and MatMul with a constant weight: producers of their output columns and sinks.

A sink reads the group on its contraction axis, either directly (`Plain`, channels on the last
axis) or through a layout chain (`Mapped`, e.g. Flatten or Transpose + Reshape after a conv),
in which case every spatial block of the weight gets the reconstruction.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import onnx

from onnx_spectral.errors import RewriteError
from onnx_spectral.graph.model import GraphIndex, attributes
from onnx_spectral.ops.base import AnalysisContext, Editor, Member, Plain, SinkUse, freeze_inputs
from onnx_spectral.ops.conv import FUSED_ACTIVATIONS
from onnx_spectral.ops.layout import LayoutError, simulate_chain, sink_feature_map
from onnx_spectral.ops.linear_layer import Shape, plain_features, row_layer_fields


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


class _RowLayer:
    """What Gemm, MatMul and their variants share: a constant weight read as rows [outputs,
    inputs], stored transposed ([inputs, outputs], as MatMul's B) unless `_transposed`."""

    weight_input = 1

    def _transposed(self, node: onnx.NodeProto) -> bool:
        return False

    def output_rows(self, node: onnx.NodeProto, graph: GraphIndex) -> np.ndarray:
        weight = graph.input_constant(node, 1)
        assert weight is not None
        return _as_rows(weight, self._transposed(node))

    def sink_gram(self, node: onnx.NodeProto, sink: SinkUse, channels: int,
                  graph: GraphIndex) -> np.ndarray:
        return _sink_rows_gram(self.output_rows(node, graph), sink, channels)

    def fold(self, node: onnx.NodeProto, sink: SinkUse, reconstruction: np.ndarray,
             kept: np.ndarray, editor: Editor) -> None:
        transposed = self._transposed(node)
        weight = editor.input_value(node, 1)
        assert weight is not None
        rows = _fold_rows(_as_rows(weight, transposed), sink, reconstruction, kept, editor)
        editor.set_input_value(node, 1, np.ascontiguousarray(_as_rows(rows, transposed)))

    def _slice_weight(self, node: onnx.NodeProto, kept: np.ndarray, editor: Editor) -> None:
        weight = editor.input_value(node, 1)
        assert weight is not None
        editor.set_input_value(node, 1, weight[kept] if self._transposed(node)
                               else weight[:, kept])

    # the linear-layer view

    def weight_mac_share(self, node: onnx.NodeProto, weight: np.ndarray) -> float:
        return 1.0

    def weight_matrix(self, node: onnx.NodeProto, weight: np.ndarray) -> np.ndarray:
        return _as_rows(weight, self._transposed(node))

    def weight_from_matrix(self, node: onnx.NodeProto, matrix: np.ndarray,
                           weight: np.ndarray) -> np.ndarray:
        return _as_rows(matrix, self._transposed(node))

    def input_features(self, node: onnx.NodeProto, sink: SinkUse, channels: int,
                       weight: np.ndarray) -> np.ndarray:
        return plain_features(sink, channels)

    def bias_input(self, node: onnx.NodeProto) -> int | None:
        return None

    def refit_problem(self, node: onnx.NodeProto, weight: np.ndarray) -> str | None:
        return None if weight.ndim == 2 else f"a {weight.ndim}-D weight is not refitted"

    def receptive_fields(self, node: onnx.NodeProto, inputs: np.ndarray,
                         weight: np.ndarray) -> np.ndarray:
        return row_layer_fields(inputs)

    def output_axis(self, node: onnx.NodeProto) -> int:
        return -1


def _output_macs(node: onnx.NodeProto, shapes: Mapping[str, Shape]) -> int | None:
    """Output elements (batch * M * N, numpy semantics) times K, the data input's last axis."""
    data = shapes.get(node.input[0])
    output = shapes.get(node.output[0])
    if data is None or output is None or len(data) == 0:
        return None
    return math.prod(output) * data[-1]


def _unit_scales(node: onnx.NodeProto) -> bool:
    attrs = attributes(node)
    return attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0


class GemmHandler(_RowLayer):
    """Gemm Y = alpha A B + beta C with a constant B (mind transB)."""

    op_types: tuple[str, ...] = ("Gemm",)

    def _transposed(self, node: onnx.NodeProto) -> bool:
        return bool(attributes(node).get("transB", 0))

    def analyze(self, node: onnx.NodeProto, ctx: AnalysisContext) -> None:
        weight = ctx.graph.input_constant(node, 1)
        attrs = attributes(node)
        bias_name = node.input[2] if len(node.input) > 2 else ""
        if weight is None or (bias_name and ctx.graph.constant(bias_name) is None):
            freeze_inputs(node, ctx, f"{node.op_type} whose B or C is an activation")
            return
        if int(attrs.get("transA", 0)):  # type: ignore[call-overload]
            freeze_inputs(node, ctx, f"{node.op_type} with transA=1 contracts the sample axis")
            return
        _register_sink(node, ctx)
        outputs = weight.shape[0] if self._transposed(node) else weight.shape[1]
        ctx.new_group(node.name, int(outputs), node.output[0], axis=1, rank=2)

    def slice(self, node: onnx.NodeProto, member: Member, kept: np.ndarray, channels: int,
              editor: Editor) -> None:
        self._slice_weight(node, kept, editor)
        bias = editor.input_value(node, 2)
        if bias is not None and bias.ndim >= 1 and bias.shape[-1] == channels and channels > 1:
            editor.set_input_value(node, 2, bias[..., kept])

    def macs(self, node: onnx.NodeProto, shapes: Mapping[str, Shape]) -> int | None:
        a, b = shapes.get(node.input[0]), shapes.get(node.input[1])
        if a is None or b is None or len(a) != 2 or len(b) != 2:
            return None
        rows, inner = a[::-1] if attributes(node).get("transA", 0) else a
        return rows * inner * (b[0] if self._transposed(node) else b[1])

    def bias_input(self, node: onnx.NodeProto) -> int | None:
        present = len(node.input) > 2 and bool(node.input[2])
        return 2 if present and _unit_scales(node) else None

    def refit_problem(self, node: onnx.NodeProto, weight: np.ndarray) -> str | None:
        if attributes(node).get("transA", 0) or not _unit_scales(node):
            return "only Gemm with transA = 0 and alpha = beta = 1 is refitted"
        return None


class FusedGemmHandler(GemmHandler):
    """com.microsoft FusedGemm (ONNX Runtime's Gemm + activation fusion): a Gemm whose
    element-wise `activation` keeps output column c in column c."""

    op_types: tuple[str, ...] = ("FusedGemm",)

    def analyze(self, node: onnx.NodeProto, ctx: AnalysisContext) -> None:
        activation = attributes(node).get("activation", b"")
        name = activation.decode() if isinstance(activation, bytes) else str(activation)
        if name in FUSED_ACTIVATIONS:
            super().analyze(node, ctx)
            return
        reason = f"FusedGemm with activation '{name}' (not known to be element-wise)"
        freeze_inputs(node, ctx, reason)
        weight = ctx.graph.input_constant(node, 1)
        if weight is not None:
            outputs = weight.shape[0] if self._transposed(node) else weight.shape[1]
            produced = ctx.new_group(node.name, int(outputs), node.output[0], axis=1, rank=2)
            ctx.freeze(produced, f"{reason} (node '{node.name}' makes it)")

    def refit_problem(self, node: onnx.NodeProto, weight: np.ndarray) -> str | None:
        return "a FusedGemm's output is after its activation, not linear"


class MatMulHandler(_RowLayer):
    """MatMul of an activation [..., K] by a constant matrix [K, N]."""

    op_types: tuple[str, ...] = ("MatMul",)

    def _not_a_layer(self, node: onnx.NodeProto, ctx: AnalysisContext) -> str | None:
        """Why `node` is not activation x constant matrix, None when it is."""
        weight = ctx.graph.input_constant(node, 1)
        if weight is None or weight.ndim != 2 or ctx.graph.input_constant(node, 0) is not None:
            return f"{node.op_type} that is not activation x constant matrix"
        return None

    def analyze(self, node: onnx.NodeProto, ctx: AnalysisContext) -> None:
        reason = self._not_a_layer(node, ctx)
        if reason is not None:
            freeze_inputs(node, ctx, reason)
            return
        weight = ctx.graph.input_constant(node, 1)
        assert weight is not None
        rank = ctx.graph.rank(node.output[0])
        _register_sink(node, ctx)
        if rank is None:
            return
        outputs = weight.shape[0] if self._transposed(node) else weight.shape[1]
        ctx.new_group(node.name, int(outputs), node.output[0], axis=rank - 1, rank=rank)

    def slice(self, node: onnx.NodeProto, member: Member, kept: np.ndarray, channels: int,
              editor: Editor) -> None:
        self._slice_weight(node, kept, editor)

    def macs(self, node: onnx.NodeProto, shapes: Mapping[str, Shape]) -> int | None:
        return _output_macs(node, shapes)


class FusedMatMulHandler(MatMulHandler):
    """com.microsoft FusedMatMul Y = alpha * op(A) op(B): a MatMul when A is not transposed
    (transA = transBatchA = transBatchB = 0) and B is a constant matrix (transB: stored
    [N, K]). alpha scales every output and so commutes with slicing and folding."""

    op_types: tuple[str, ...] = ("FusedMatMul",)

    def _transposed(self, node: onnx.NodeProto) -> bool:
        return bool(attributes(node).get("transB", 0))

    def _not_a_layer(self, node: onnx.NodeProto, ctx: AnalysisContext) -> str | None:
        attrs = attributes(node)
        if any(attrs.get(name, 0) for name in ("transA", "transBatchA", "transBatchB")):
            return "FusedMatMul that transposes its activation"
        return super()._not_a_layer(node, ctx)

    def refit_problem(self, node: onnx.NodeProto, weight: np.ndarray) -> str | None:
        if attributes(node).get("alpha", 1.0) != 1.0:
            return "FusedMatMul with alpha != 1 is not refitted"
        return super().refit_problem(node, weight)


def _einsum_form(node: onnx.NodeProto) -> tuple[int, bool] | None:
    """(position of the constant operand, whether it is stored [outputs, inputs]) of an Einsum
    that is a MatMul by a matrix ("bij,jk->bik", "...j,kj->...k", "jk,bij->bik"); None for
    any other equation."""
    equation = attributes(node).get("equation", b"")
    text = (equation.decode() if isinstance(equation, bytes) else str(equation)).replace(" ", "")
    if "->" not in text or len(node.input) != 2:
        return None
    operands, output = text.split("->")
    terms = operands.split(",")
    if len(terms) != 2:
        return None
    for position in (1, 0):
        weight, data = terms[position], terms[1 - position]
        if len(weight) != 2 or not data or data[-1] not in weight:
            continue
        inner = data[-1]
        outer = weight.replace(inner, "", 1)
        prefix = data[:-1]
        if len(outer) == 1 and outer not in data and inner not in prefix \
                and output == prefix + outer and len(set(prefix.replace(".", ""))) == \
                len(prefix.replace(".", "")):
            return position, weight == outer + inner
    return None


class EinsumHandler(MatMulHandler):
    """Einsum that multiplies an activation by a constant matrix, as TensorFlow exporters
    write Dense layers ("bij,jk->bik"): a MatMul; its equation is kept (the contraction letters
    do not depend on the sizes). Only the activation-first operand order is followed."""

    op_types: tuple[str, ...] = ("Einsum",)

    def _transposed(self, node: onnx.NodeProto) -> bool:
        form = _einsum_form(node)
        return form is not None and form[1]

    def _not_a_layer(self, node: onnx.NodeProto, ctx: AnalysisContext) -> str | None:
        form = _einsum_form(node)
        if form is None or form[0] != 1:
            return "Einsum that is not activation x constant matrix"
        return super()._not_a_layer(node, ctx)
