"""Recurrent layers (LSTM, GRU, RNN): sinks of their input X, never producers.

X is [seq, batch, input] (layout 0) or [batch, seq, input] (layout 1): its channels are the
input-size axis 2 either way. The input weight W [directions, gates * hidden, input] multiplies
X at every step like a Gemm, so it absorbs the reconstruction on its input axis (W' = W A) and
the layers before it can be pruned. The recurrent state width (hidden_size, R, B, initial_h,
initial_c, P) is kept: the layer's outputs Y, Y_h, Y_c form one frozen group, and a group that
reaches any input other than X is frozen.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import onnx

from onnx_spectral.graph.model import GraphIndex, attributes
from onnx_spectral.ops.base import (
    AnalysisContext,
    Editor,
    Member,
    Plain,
    SinkUse,
    fold_input_channels,
    freeze_inputs,
)
from onnx_spectral.ops.linear_layer import Shape, plain_features, row_layer_fields

GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
"""Gate blocks stacked in the rows of W and R."""

KEPT_STATE = "recurrent state width is kept"


def _output_axes(node: onnx.NodeProto) -> tuple[tuple[int, int], ...]:
    """(hidden axis, rank) of the outputs Y, Y_h, Y_c: Y is [seq, dirs, batch, hidden]
    or [batch, seq, dirs, hidden] (layout 1), Y_h and Y_c [dirs, batch, hidden] or
    [batch, dirs, hidden]: the hidden axis is last either way."""
    return ((3, 4), (2, 3), (2, 3))[: len(node.output)]


class RecurrentHandler:
    """LSTM, GRU and RNN with a constant W: a sink of X on its input-size axis."""

    op_types: tuple[str, ...] = ("LSTM", "GRU", "RNN")

    def analyze(self, node: onnx.NodeProto, ctx: AnalysisContext) -> None:
        weight = ctx.graph.input_constant(node, 1)
        where = f"({node.op_type} node '{node.name}')"
        for position, name in enumerate(node.input[1:], start=1):
            state = ctx.state(name) if name else None
            if state is not None:
                ctx.freeze(state.group, f"{KEPT_STATE}: input {position} '{name}' {where}")
        state = ctx.state(node.input[0])
        if weight is None:
            freeze_inputs(node, ctx, f"{node.op_type} weight W is not a constant")
        elif isinstance(state, Plain) and state.axis == 2 and state.rank == 3:
            ctx.add_sink(state.group, SinkUse(node.name, 0, node.input[0], 2))
        elif state is not None:
            ctx.freeze(state.group, f"{node.op_type} '{node.name}' reads the group on an axis "
                                    "other than its input size")
        hidden = int(attributes(node).get("hidden_size", 0))  # type: ignore[call-overload]
        outputs = [(name, axes) for name, axes in zip(node.output, _output_axes(node),
                                                      strict=True) if name]
        if not outputs or hidden < 1:
            return
        (first, (axis, rank)), rest = outputs[0], outputs[1:]
        group = ctx.new_group(node.name, hidden, first, axis=axis, rank=rank)
        for name, (axis, rank) in rest:
            ctx.set_state(name, Plain(group, axis, rank))
        ctx.freeze(group, f"{KEPT_STATE} {where}")

    def slice(self, node: onnx.NodeProto, member: Member, kept: np.ndarray, channels: int,
              editor: Editor) -> None:
        raise TypeError(f"{node.op_type} node '{node.name}': {KEPT_STATE}")

    def output_rows(self, node: onnx.NodeProto, graph: GraphIndex) -> np.ndarray:
        raise TypeError(f"{node.op_type} node '{node.name}': {KEPT_STATE}")

    def sink_gram(self, node: onnx.NodeProto, sink: SinkUse, channels: int,
                  graph: GraphIndex) -> np.ndarray:
        weight = graph.input_constant(node, 1)
        assert weight is not None
        rows = self.weight_matrix(node, weight).astype(np.float64)
        return rows.T @ rows

    def fold(self, node: onnx.NodeProto, sink: SinkUse, reconstruction: np.ndarray,
             kept: np.ndarray, editor: Editor) -> None:
        weight = editor.input_value(node, 1)
        assert weight is not None
        editor.set_input_value(node, 1, fold_input_channels(weight, reconstruction, axis=2))

    # the linear-layer view: W [dirs, gates * hidden, input] as [dirs * gates * hidden, input]

    weight_input = 1

    def macs(self, node: onnx.NodeProto, shapes: Mapping[str, Shape]) -> int | None:
        """Steps x batch x (W and R element counts): every step multiplies X by W and the
        hidden state by R."""
        data, weight, recurrent = (shapes.get(node.input[i]) for i in range(3))
        if data is None or weight is None or recurrent is None or len(data) != 3:
            return None
        return math.prod(data[:2]) * (math.prod(weight) + math.prod(recurrent))

    def weight_mac_share(self, node: onnx.NodeProto, weight: np.ndarray) -> float:
        """W's share of the MACs: input / (input + hidden)."""
        hidden = weight.shape[1] // GATES[node.op_type]
        return weight.shape[2] / (weight.shape[2] + hidden)

    def weight_matrix(self, node: onnx.NodeProto, weight: np.ndarray) -> np.ndarray:
        return weight.reshape(-1, weight.shape[-1])

    def weight_from_matrix(self, node: onnx.NodeProto, matrix: np.ndarray,
                           weight: np.ndarray) -> np.ndarray:
        return matrix.reshape(weight.shape)

    def input_features(self, node: onnx.NodeProto, sink: SinkUse, channels: int,
                       weight: np.ndarray) -> np.ndarray:
        return plain_features(sink, channels)

    def bias_input(self, node: onnx.NodeProto) -> int | None:
        """None: B [dirs, 2 * gates * hidden] holds the input and the recurrent biases, not
        one value per row of W."""
        return None

    def refit_problem(self, node: onnx.NodeProto, weight: np.ndarray) -> str | None:
        return "recurrent layers are not refitted"

    def receptive_fields(self, node: onnx.NodeProto, inputs: np.ndarray,
                         weight: np.ndarray) -> np.ndarray:
        return row_layer_fields(inputs)

    def output_axis(self, node: onnx.NodeProto) -> int:
        return -1
