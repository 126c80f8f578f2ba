"""Conv and ConvTranspose: producers and sinks when dense (group == 1); channel-wise when
depthwise; grouped ones are frozen with the reason."""

from __future__ import annotations

import numpy as np
import onnx

from onnx_spectral.graph.model import GraphIndex, attributes
from onnx_spectral.ops.base import (
    AnalysisContext,
    Editor,
    Member,
    Plain,
    Role,
    SinkUse,
    fold_input_channels,
    freeze_inputs,
)


def _kind(weight: np.ndarray, group: int) -> str:
    out_channels, in_per_group = weight.shape[0], weight.shape[1]
    if group == 1:
        return "dense"
    if in_per_group == 1 and out_channels == group:
        return "depthwise"
    return "grouped"


class ConvHandler:
    """Conv with a constant weight [M, C/g, k...] and optional bias [M]."""

    op_types = ("Conv",)

    def analyze(self, node: onnx.NodeProto, ctx: AnalysisContext) -> None:
        weight = ctx.graph.input_constant(node, 1)
        bias_name = node.input[2] if len(node.input) > 2 else ""
        if weight is None or (bias_name and ctx.graph.constant(bias_name) is None):
            freeze_inputs(node, ctx, "Conv weight or bias is not a constant")
            return
        group = int(attributes(node).get("group", 1))  # type: ignore[call-overload]
        kind = _kind(weight, group)
        state = ctx.state(node.input[0])
        output = node.output[0]
        rank = weight.ndim
        if kind == "depthwise":
            if isinstance(state, Plain) and state.axis == 1:
                ctx.add_member(state.group, Member(node.name, Role.CHANNELWISE, 1))
                ctx.set_state(output, state)
            elif state is not None:
                ctx.freeze(state.group, f"depthwise Conv '{node.name}' reads the group "
                                        "on an axis other than 1")
            return
        if kind == "grouped":
            reason = f"grouped Conv (group={group}) that is not depthwise"
            freeze_inputs(node, ctx, reason)
            produced = ctx.new_group(node.name, int(weight.shape[0]), output, axis=1, rank=rank)
            ctx.freeze(produced, f"{reason} ({node.op_type} node '{node.name}' makes it)")
            return
        if isinstance(state, Plain) and state.axis == 1:
            ctx.add_sink(state.group, SinkUse(node.name, 0, node.input[0], 1))
        elif state is not None:
            ctx.freeze(state.group, f"Conv '{node.name}' reads the group through a layout "
                                    "change it cannot follow")
        ctx.new_group(node.name, int(weight.shape[0]), output, axis=1, rank=rank)

    def slice(self, node: onnx.NodeProto, member: Member, kept: np.ndarray, channels: int,
              editor: Editor) -> None:
        weight = editor.input_value(node, 1)
        assert weight is not None
        editor.set_input_value(node, 1, weight[kept])
        bias = editor.input_value(node, 2)
        if bias is not None:
            editor.set_input_value(node, 2, bias[kept])
        if member.role is Role.CHANNELWISE:
            editor.set_attribute(node, "group", int(kept.size))

    def output_rows(self, node: onnx.NodeProto, graph: GraphIndex) -> np.ndarray:
        weight = graph.input_constant(node, 1)
        assert weight is not None
        return weight

    def sink_gram(self, node: onnx.NodeProto, sink: SinkUse, channels: int,
                  graph: GraphIndex) -> np.ndarray:
        weight = graph.input_constant(node, 1)
        assert weight is not None
        rows = np.moveaxis(weight.astype(np.float64), 1, -1).reshape(-1, weight.shape[1])
        return rows.T @ rows  # sum over output channels and kernel taps of W_tap^T W_tap

    def fold(self, node: onnx.NodeProto, sink: SinkUse, reconstruction: np.ndarray,
             kept: np.ndarray, editor: Editor) -> None:
        weight = editor.input_value(node, 1)
        assert weight is not None
        editor.set_input_value(node, 1, fold_input_channels(weight, reconstruction, axis=1))


class ConvTransposeHandler:
    """ConvTranspose with a constant weight [C, M/g, k...]: a producer of its M output channels
    and a sink of its C input channels when dense; channel-wise when depthwise."""

    op_types = ("ConvTranspose",)

    def analyze(self, node: onnx.NodeProto, ctx: AnalysisContext) -> None:
        weight = ctx.graph.input_constant(node, 1)
        bias_name = node.input[2] if len(node.input) > 2 else ""
        if weight is None or (bias_name and ctx.graph.constant(bias_name) is None):
            freeze_inputs(node, ctx, "ConvTranspose weight or bias is not a constant")
            return
        group = int(attributes(node).get("group", 1))  # type: ignore[call-overload]
        state = ctx.state(node.input[0])
        depthwise = group > 1 and weight.shape[1] == 1 and weight.shape[0] == group
        if group > 1 and not depthwise:
            reason = f"grouped ConvTranspose (group={group}) that is not depthwise"
            freeze_inputs(node, ctx, reason)
            produced = ctx.new_group(node.name, int(weight.shape[1]) * group, node.output[0],
                                     axis=1, rank=weight.ndim)
            ctx.freeze(produced, f"{reason} (node '{node.name}' makes it)")
            return
        if state is not None and not (isinstance(state, Plain) and state.axis == 1):
            ctx.freeze(state.group, f"ConvTranspose '{node.name}' reads the group on an axis "
                                    "other than 1")
            state = None
        if depthwise:
            if state is not None:
                ctx.add_member(state.group, Member(node.name, Role.CHANNELWISE, 1))
                ctx.set_state(node.output[0], state)
            return
        if state is not None:
            ctx.add_sink(state.group, SinkUse(node.name, 0, node.input[0], 1))
        ctx.new_group(node.name, int(weight.shape[1]), node.output[0], axis=1, rank=weight.ndim)

    def slice(self, node: onnx.NodeProto, member: Member, kept: np.ndarray, channels: int,
              editor: Editor) -> None:
        weight = editor.input_value(node, 1)
        assert weight is not None
        depthwise = member.role is Role.CHANNELWISE
        editor.set_input_value(node, 1, weight[kept] if depthwise else weight[:, kept])
        bias = editor.input_value(node, 2)
        if bias is not None:
            editor.set_input_value(node, 2, bias[kept])
        if depthwise:
            editor.set_attribute(node, "group", int(kept.size))

    def output_rows(self, node: onnx.NodeProto, graph: GraphIndex) -> np.ndarray:
        weight = graph.input_constant(node, 1)
        assert weight is not None
        return np.moveaxis(weight, 1, 0)

    def sink_gram(self, node: onnx.NodeProto, sink: SinkUse, channels: int,
                  graph: GraphIndex) -> np.ndarray:
        weight = graph.input_constant(node, 1)
        assert weight is not None
        rows = np.moveaxis(weight.astype(np.float64), 0, -1).reshape(-1, weight.shape[0])
        return rows.T @ rows

    def fold(self, node: onnx.NodeProto, sink: SinkUse, reconstruction: np.ndarray,
             kept: np.ndarray, editor: Editor) -> None:
        weight = editor.input_value(node, 1)
        assert weight is not None
        editor.set_input_value(node, 1, fold_input_channels(weight, reconstruction, axis=0))
