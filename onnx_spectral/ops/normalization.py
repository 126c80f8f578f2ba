"""Normalizations: BatchNormalization and InstanceNormalization (per channel, axis 1),
LayerNormalization and Softmax/LogSoftmax/Hardmax (channel-wise when they normalize only other
axes than the channels'); over the channel axis, and GroupNormalization and LRN always, they
freeze the group they read, naming the node."""

from __future__ import annotations

import numpy as np
import onnx

from onnx_spectral.graph.model import attributes, opset_version
from onnx_spectral.ops.base import (
    AnalysisContext,
    Editor,
    Member,
    NoWeights,
    Plain,
    Role,
    freeze_inputs,
)


class NormalizationHandler(NoWeights):
    """Their scale, bias (and BN's mean and variance) inputs are sliced to the kept channels."""

    op_types: tuple[str, ...] = ("BatchNormalization", "InstanceNormalization")

    def analyze(self, node: onnx.NodeProto, ctx: AnalysisContext) -> None:
        state = ctx.state(node.input[0])
        if state is None:
            return
        if not isinstance(state, Plain) or state.axis != 1:
            freeze_inputs(node, ctx, f"{node.op_type} normalizes an axis other than channels")
            return
        if any(ctx.graph.constant(name) is None for name in node.input[1:]):
            freeze_inputs(node, ctx, f"{node.op_type} with non-constant parameters")
            return
        if any(ctx.graph.consumers.get(name) for name in node.output[1:] if name):
            freeze_inputs(node, ctx, f"{node.op_type} in training mode (running statistics "
                                     "are read)")
            return
        ctx.add_member(state.group, Member(node.name, Role.CHANNELWISE, 1))
        ctx.set_state(node.output[0], state)

    def slice(self, node: onnx.NodeProto, member: Member, kept: np.ndarray, channels: int,
              editor: Editor) -> None:
        for position in range(1, len(node.input)):
            value = editor.input_value(node, position)
            assert value is not None
            editor.set_input_value(node, position, value[kept])


def _normalized_from(node: onnx.NodeProto, rank: int) -> int:
    """First axis a LayerNormalization normalizes over (it normalizes that axis onwards)."""
    return int(attributes(node).get("axis", -1)) % rank  # type: ignore[call-overload]


class LayerNormalizationHandler(NoWeights):
    """LayerNormalization normalizes the axes from `axis` on: channel-wise when the channel
    axis comes before them (its scale and bias span only the normalized axes, so nothing is
    sliced); over the channel axis it mixes the channels, and freezes the group it reads."""

    op_types: tuple[str, ...] = ("LayerNormalization",)

    def analyze(self, node: onnx.NodeProto, ctx: AnalysisContext) -> None:
        state = ctx.state(node.input[0])
        if state is None:
            if any(name and ctx.state(name) is not None for name in node.input[1:]):
                freeze_inputs(node, ctx, "LayerNormalization scale or bias computed from the "
                                         "group")
            return
        reason = None
        if not isinstance(state, Plain):
            reason = "LayerNormalization of scattered channels"
        elif state.axis >= _normalized_from(node, state.rank):
            reason = "LayerNormalization normalizes over the channel axis"
        elif any(name and ctx.graph.constant(name) is None for name in node.input[1:]):
            reason = "LayerNormalization with non-constant scale or bias"
        elif any(ctx.graph.consumers.get(name) for name in node.output[1:] if name):
            reason = "LayerNormalization whose mean or inverse deviation is read"
        if reason is not None:
            freeze_inputs(node, ctx, reason)
            return
        ctx.set_state(node.output[0], state)

    def slice(self, node: onnx.NodeProto, member: Member, kept: np.ndarray, channels: int,
              editor: Editor) -> None:
        raise TypeError(f"LayerNormalization node '{node.name}' has no channel parameters")


class GroupNormalizationHandler(NoWeights):
    """GroupNormalization normalizes groups of channels together (and ONNX's strict shape
    inference gives no output shape for it at opset 21): the group reading it is frozen."""

    op_types: tuple[str, ...] = ("GroupNormalization",)

    def analyze(self, node: onnx.NodeProto, ctx: AnalysisContext) -> None:
        num_groups = attributes(node).get("num_groups")
        freeze_inputs(node, ctx, f"GroupNormalization normalizes channels in groups "
                                 f"(num_groups={num_groups})")

    def slice(self, node: onnx.NodeProto, member: Member, kept: np.ndarray, channels: int,
              editor: Editor) -> None:
        raise TypeError(f"GroupNormalization node '{node.name}' is never a member")


class SoftmaxHandler(NoWeights):
    """Softmax, LogSoftmax and Hardmax normalize along `axis` (from opset 13; before, over the
    axes from `axis` on, flattened): channel-wise when the channel axis is not among those, else
    they mix the channels and freeze the group they read."""

    op_types: tuple[str, ...] = ("Softmax", "LogSoftmax", "Hardmax")

    def analyze(self, node: onnx.NodeProto, ctx: AnalysisContext) -> None:
        state = ctx.state(node.input[0])
        if state is None:
            return
        if not isinstance(state, Plain):
            freeze_inputs(node, ctx, f"{node.op_type} of scattered channels")
            return
        flattened = opset_version(ctx.graph.model) < 13
        default = 1 if flattened else -1
        axis = int(attributes(node).get("axis", default)) % state.rank  # type: ignore[call-overload]
        if state.axis == axis or (flattened and state.axis > axis):
            freeze_inputs(node, ctx, f"{node.op_type} normalizes over the channel axis")
            return
        ctx.set_state(node.output[0], state)

    def slice(self, node: onnx.NodeProto, member: Member, kept: np.ndarray, channels: int,
              editor: Editor) -> None:
        raise TypeError(f"{node.op_type} node '{node.name}' has no channel parameters")


class LRNHandler(NoWeights):
    """Local response normalization divides each channel by its neighbours' energy: it mixes
    channels, so the group it reads is frozen."""

    op_types: tuple[str, ...] = ("LRN",)

    def analyze(self, node: onnx.NodeProto, ctx: AnalysisContext) -> None:
        size = attributes(node).get("size")
        freeze_inputs(node, ctx, f"LRN normalizes each channel by its {size} neighbouring "
                                 "channels")

    def slice(self, node: onnx.NodeProto, member: Member, kept: np.ndarray, channels: int,
              editor: Editor) -> None:
        raise TypeError(f"LRN node '{node.name}' is never a member")
