"""Conv and ConvTranspose: producers and sinks when dense (group == 1); channel-wise when
depthwise. A grouped Conv is a producer and a sink whose channels, in and out, are kept evenly
from each of its groups (the groups' `lanes`); what it reads is reconstructed lane by lane, so
the fold keeps each conv group reading its own lane. Grouped ConvTranspose is frozen with the
reason."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import onnx

from onnx_spectral.errors import RewriteError
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
from onnx_spectral.ops.linear_layer import Shape, kernel_features

#: Activations a com.microsoft FusedConv applies after the convolution: all element-wise.
FUSED_ACTIVATIONS = frozenset({"Relu", "LeakyRelu", "Tanh", "Sigmoid", "Clip", "HardSigmoid"})


def patches(values: np.ndarray, node: onnx.NodeProto, kernel: Sequence[int]) -> np.ndarray:
    """Receptive fields of a 2-D Conv: input [N, C, H, W] -> [N * H' * W', C * kh * kw]."""
    attrs = attributes(node)
    pads = list(attrs.get("pads", [0, 0, 0, 0]))  # type: ignore[call-overload]
    strides = list(attrs.get("strides", [1, 1]))  # type: ignore[call-overload]
    dilations = list(attrs.get("dilations", [1, 1]))  # type: ignore[call-overload]
    padded = np.pad(values, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    span = [dilations[i] * (kernel[i] - 1) + 1 for i in range(2)]
    windows = np.lib.stride_tricks.sliding_window_view(padded, span, axis=(2, 3))
    windows = windows[:, :, ::strides[0], ::strides[1], ::dilations[0], ::dilations[1]]
    n, c, height, width, kh, kw = windows.shape
    return windows.transpose(0, 2, 3, 1, 4, 5).reshape(n * height * width, c * kh * kw)


def _bias_position(node: onnx.NodeProto) -> int | None:
    return 2 if len(node.input) > 2 and node.input[2] else None


def _group(node: onnx.NodeProto) -> int:
    return int(attributes(node).get("group", 1))  # type: ignore[call-overload]


def _lanes(weight: np.ndarray, group: int) -> list[tuple[np.ndarray, slice]]:
    """Per conv group g of a Conv weight [M, C/g, k...]: its rows [M/g, C/g, k...] and the
    input channels it reads (lane g of C)."""
    rows, inputs = weight.shape[0] // group, weight.shape[1]
    return [(weight[lane * rows:(lane + 1) * rows], slice(lane * inputs, (lane + 1) * inputs))
            for lane in range(group)]


def _kind(weight: np.ndarray, group: int) -> str:
    out_channels, in_per_group = weight.shape[0], weight.shape[1]
    if group == 1:
        return "dense"
    if in_per_group == 1 and out_channels == group:
        return "depthwise"
    return "grouped"


class ConvHandler:
    """Conv with a constant weight [M, C/g, k...] and optional bias [M]."""

    op_types: tuple[str, ...] = ("Conv",)

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
        if kind == "grouped":  # what it reads and what it makes go evenly from each group
            if isinstance(state, Plain) and state.axis == 1:
                ctx.set_lanes(state.group, group, local=True)
                ctx.add_sink(state.group, SinkUse(node.name, 0, node.input[0], 1))
            elif state is not None:
                ctx.freeze(state.group, f"grouped Conv '{node.name}' reads the group through a "
                                        "layout change it cannot follow")
            produced = ctx.new_group(node.name, int(weight.shape[0]), output, axis=1, rank=rank)
            ctx.set_lanes(produced, group)
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
        """Sum over output channels and kernel taps of W_tap^T W_tap, [C, C]; block-diagonal
        for a grouped Conv (conv group g reads only input lane g)."""
        weight = graph.input_constant(node, 1)
        assert weight is not None
        lanes = _lanes(weight, _group(node))
        gram = np.zeros((channels, channels))
        for rows, inputs in lanes:
            flat = np.moveaxis(rows.astype(np.float64), 1, -1).reshape(-1, rows.shape[1])
            gram[inputs, inputs] = flat.T @ flat
        return gram

    def fold(self, node: onnx.NodeProto, sink: SinkUse, reconstruction: np.ndarray,
             kept: np.ndarray, editor: Editor) -> None:
        """W' = W A; for a grouped Conv, per conv group g, W_g' = W_g A_g with A_g the block of
        A from input lane g to its kept channels (A must be block-diagonal)."""
        weight = editor.input_value(node, 1)
        assert weight is not None
        group = _group(node)
        if group == 1:
            editor.set_input_value(node, 1, fold_input_channels(weight, reconstruction, axis=1))
            return
        kept_per_lane = reconstruction.shape[1] // group
        folded, covered = [], np.zeros_like(reconstruction, dtype=bool)
        for lane, (rows, inputs) in enumerate(_lanes(weight, group)):
            columns = slice(lane * kept_per_lane, (lane + 1) * kept_per_lane)
            covered[inputs, columns] = True
            folded.append(fold_input_channels(rows, reconstruction[inputs, columns], axis=1))
        outside = np.abs(reconstruction[~covered])
        if outside.size and outside.max() > 1e-9 * np.abs(reconstruction).max():
            raise RewriteError(f"grouped Conv '{node.name}': the reconstruction of its input "
                               "mixes its groups (it must be block-diagonal)")
        editor.set_input_value(node, 1, np.concatenate(folded, axis=0))

    # the linear-layer view: W [M, C/g, k...] as [M, C/g * k], channel-major

    weight_input = 1

    def macs(self, node: onnx.NodeProto, shapes: Mapping[str, Shape]) -> int | None:
        weight, output = shapes.get(node.input[1]), shapes.get(node.output[0])
        if weight is None or output is None:
            return None
        return math.prod(output) * math.prod(weight[1:])

    def weight_mac_share(self, node: onnx.NodeProto, weight: np.ndarray) -> float:
        return 1.0

    def weight_matrix(self, node: onnx.NodeProto, weight: np.ndarray) -> np.ndarray:
        return weight.reshape(weight.shape[0], -1)

    def weight_from_matrix(self, node: onnx.NodeProto, matrix: np.ndarray,
                           weight: np.ndarray) -> np.ndarray:
        return matrix.reshape(weight.shape)

    def input_features(self, node: onnx.NodeProto, sink: SinkUse, channels: int,
                       weight: np.ndarray) -> np.ndarray:
        return kernel_features(channels, weight)

    def bias_input(self, node: onnx.NodeProto) -> int | None:
        return _bias_position(node)

    def refit_problem(self, node: onnx.NodeProto, weight: np.ndarray) -> str | None:
        attrs = attributes(node)
        if int(attrs.get("group", 1)) != 1 or weight.ndim != 4:  # type: ignore[call-overload]
            return "only dense 2-D convolutions are refitted"
        if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            return "auto_pad convolutions are not refitted"
        return None

    def receptive_fields(self, node: onnx.NodeProto, inputs: np.ndarray,
                         weight: np.ndarray) -> np.ndarray:
        return patches(inputs.astype(np.float32), node, weight.shape[2:])

    def output_axis(self, node: onnx.NodeProto) -> int:
        return 1


class FusedConvHandler(ConvHandler):
    """com.microsoft FusedConv (ONNX Runtime's Conv + activation fusion): a Conv whose
    element-wise `activation` keeps channel c in channel c. The optional sum input Z (added
    before the activation) is not followed: its groups and the output's are frozen."""

    op_types: tuple[str, ...] = ("FusedConv",)

    def analyze(self, node: onnx.NodeProto, ctx: AnalysisContext) -> None:
        activation = attributes(node).get("activation", b"")
        name = activation.decode() if isinstance(activation, bytes) else str(activation)
        reason = None
        if len(node.input) > 3 and node.input[3]:
            reason = "FusedConv with a sum input Z (a coupling it does not follow)"
        elif name not in FUSED_ACTIVATIONS:
            reason = f"FusedConv with activation '{name}' (not known to be element-wise)"
        if reason is None:
            super().analyze(node, ctx)
            return
        freeze_inputs(node, ctx, reason)
        weight = ctx.graph.input_constant(node, 1)
        if weight is not None:
            produced = ctx.new_group(node.name, int(weight.shape[0]), node.output[0], axis=1,
                                     rank=weight.ndim)
            ctx.freeze(produced, f"{reason} (node '{node.name}' makes it)")

    def refit_problem(self, node: onnx.NodeProto, weight: np.ndarray) -> str | None:
        return "a FusedConv's output is after its activation, not linear"


class ConvTransposeHandler:
    """ConvTranspose with a constant weight [C, M/g, k...]: a producer of its M output channels
    and a sink of its C input channels when dense; channel-wise when depthwise."""

    op_types: tuple[str, ...] = ("ConvTranspose",)

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

    # the linear-layer view: W [C, M, k...] as [M, C * k], channel-major

    weight_input = 1

    def macs(self, node: onnx.NodeProto, shapes: Mapping[str, Shape]) -> int | None:
        data, weight = shapes.get(node.input[0]), shapes.get(node.input[1])
        if data is None or weight is None:
            return None
        return math.prod(data) * math.prod(weight[1:])

    def weight_mac_share(self, node: onnx.NodeProto, weight: np.ndarray) -> float:
        return 1.0

    def weight_matrix(self, node: onnx.NodeProto, weight: np.ndarray) -> np.ndarray:
        return np.moveaxis(weight, 1, 0).reshape(weight.shape[1], -1)

    def weight_from_matrix(self, node: onnx.NodeProto, matrix: np.ndarray,
                           weight: np.ndarray) -> np.ndarray:
        swapped = (weight.shape[1], weight.shape[0], *weight.shape[2:])
        return np.moveaxis(matrix.reshape(swapped), 0, 1)

    def input_features(self, node: onnx.NodeProto, sink: SinkUse, channels: int,
                       weight: np.ndarray) -> np.ndarray:
        return kernel_features(channels, weight)

    def bias_input(self, node: onnx.NodeProto) -> int | None:
        """With strides > 1 the output positions see different subsets of the taps, so a
        constant input shift is not one bias."""
        strides = attributes(node).get("strides", [1])
        if any(int(s) != 1 for s in strides):  # type: ignore[attr-defined]
            return None
        return _bias_position(node)

    def refit_problem(self, node: onnx.NodeProto, weight: np.ndarray) -> str | None:
        return "ConvTranspose layers are not refitted"

    def receptive_fields(self, node: onnx.NodeProto, inputs: np.ndarray,
                         weight: np.ndarray) -> np.ndarray:
        raise TypeError(f"ConvTranspose node '{node.name}' is not refitted")

    def output_axis(self, node: onnx.NodeProto) -> int:
        return 1
