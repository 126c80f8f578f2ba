"""Ops that act on non-channel axes only: pooling, Pad, Resize and reductions.

Each is channel-wise when the analysis can prove that the channel axis is left alone: pads of
zero on it, a scale of one on it, a reduction over other axes. Nothing is sliced.
"""

from __future__ import annotations

import numpy as np
import onnx

from onnx_spectral.graph.model import attributes, opset_version
from onnx_spectral.ops.base import AnalysisContext, Editor, Member, NoWeights, Plain, freeze_inputs


def _pass_through(node: onnx.NodeProto, ctx: AnalysisContext, state: Plain,
                  new_axis: int | None = None) -> None:
    rank = ctx.graph.rank(node.output[0]) or state.rank
    axis = state.axis if new_axis is None else new_axis
    ctx.set_state(node.output[0], Plain(state.group, axis, rank))


def _plain_input(node: onnx.NodeProto, ctx: AnalysisContext) -> Plain | None:
    state = ctx.state(node.input[0])
    if state is None:
        return None
    if not isinstance(state, Plain):
        freeze_inputs(node, ctx, f"{node.op_type} on scattered channels")
        return None
    for name in node.input[1:]:
        if name and ctx.state(name) is not None:
            freeze_inputs(node, ctx, f"{node.op_type} parameter computed from the group")
            return None
    return state


class PoolHandler(NoWeights):
    """Max/average/Lp pooling, local and global, over the spatial axes of NCHW tensors."""

    op_types: tuple[str, ...] = ("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool",
                                 "GlobalMaxPool", "GlobalLpPool")

    def analyze(self, node: onnx.NodeProto, ctx: AnalysisContext) -> None:
        state = _plain_input(node, ctx)
        if state is None:
            return
        if state.axis != 1:
            freeze_inputs(node, ctx, f"{node.op_type} pools over the channel axis")
            return
        if len(node.output) > 1 and node.output[1] and ctx.graph.consumers.get(node.output[1]):
            freeze_inputs(node, ctx, "MaxPool indices encode the channel and are read")
            return
        _pass_through(node, ctx, state)

    def slice(self, node: onnx.NodeProto, member: Member, kept: np.ndarray, channels: int,
              editor: Editor) -> None:
        raise TypeError(f"{node.op_type} node '{node.name}' has no channel parameters")


class PadHandler(PoolHandler):
    """Pad whose pads (attribute or constant input) are zero on the channel axis."""

    op_types: tuple[str, ...] = ("Pad",)

    def analyze(self, node: onnx.NodeProto, ctx: AnalysisContext) -> None:
        state = _plain_input(node, ctx)
        if state is None:
            return
        attrs = attributes(node)
        pads = attrs.get("pads")
        if pads is None:
            pads = ctx.graph.input_constant(node, 1)
        axes = ctx.graph.input_constant(node, 3)
        if pads is None or (len(node.input) > 3 and node.input[3] and axes is None):
            freeze_inputs(node, ctx, "Pad whose pads are not constant (could pad channels)")
            return
        pad_values = np.asarray(pads, dtype=np.int64).reshape(2, -1)
        axis_list = list(range(state.rank)) if axes is None else [
            int(a) % state.rank for a in axes]
        touched = [axis for i, axis in enumerate(axis_list) if np.any(pad_values[:, i] != 0)]
        if state.axis in touched:
            freeze_inputs(node, ctx, "Pad pads the channel axis")
            return
        _pass_through(node, ctx, state)


class ResizeHandler(PoolHandler):
    """Resize / Upsample with a constant scale of 1 on the channel axis."""

    op_types: tuple[str, ...] = ("Resize", "Upsample")

    def analyze(self, node: onnx.NodeProto, ctx: AnalysisContext) -> None:
        state = _plain_input(node, ctx)
        if state is None:
            return
        opset = opset_version(ctx.graph.model)
        scales_position = 1 if node.op_type == "Upsample" or opset == 10 else 2
        scales = ctx.graph.input_constant(node, scales_position)
        if scales is None:
            scales = attributes(node).get("scales")  # type: ignore[assignment]
        sizes_given = len(node.input) > 3 and bool(node.input[3])
        if sizes_given or scales is None or np.asarray(scales).size != state.rank:
            freeze_inputs(node, ctx, f"{node.op_type} by sizes or with unknown scales (the "
                                     "channel count would need rewriting)")
            return
        if float(np.asarray(scales)[state.axis]) != 1.0:
            freeze_inputs(node, ctx, f"{node.op_type} rescales the channel axis")
            return
        _pass_through(node, ctx, state)


class ReduceHandler(PoolHandler):
    """Reductions over axes other than the channel axis."""

    op_types: tuple[str, ...] = ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd",
                "ReduceL1", "ReduceL2", "ReduceSumSquare", "ReduceLogSumExp")

    def analyze(self, node: onnx.NodeProto, ctx: AnalysisContext) -> None:
        state = _plain_input(node, ctx)
        if state is None:
            return
        attrs = attributes(node)
        axes_value = attrs.get("axes")
        if axes_value is None and len(node.input) > 1 and node.input[1]:
            axes_value = ctx.graph.input_constant(node, 1)
            if axes_value is None:
                freeze_inputs(node, ctx, f"{node.op_type} over non-constant axes")
                return
        if axes_value is None:  # no axes: reduce all, unless noop_with_empty_axes
            if int(attrs.get("noop_with_empty_axes", 0)):  # type: ignore[call-overload]
                _pass_through(node, ctx, state)
            else:
                freeze_inputs(node, ctx, f"{node.op_type} over all axes mixes channels")
            return
        axes = sorted(int(a) % state.rank for a in np.asarray(axes_value).ravel())
        if state.axis in axes:
            freeze_inputs(node, ctx, f"{node.op_type} reduces over the channel axis")
            return
        keep_dims = int(attrs.get("keepdims", 1))  # type: ignore[call-overload]
        new_axis = state.axis if keep_dims else state.axis - sum(a < state.axis for a in axes)
        _pass_through(node, ctx, state, new_axis)



class ShapeHandler(NoWeights):
    """Shape of a grouped tensor: safe while the channel count itself is never read.

    Allowed when the Shape's start/end leave the channel axis out, or when every consumer is a
    Gather of constant indices that do not pick the channel axis (e.g. `x.size(0)`).
    """

    op_types: tuple[str, ...] = ("Shape",)

    def analyze(self, node: onnx.NodeProto, ctx: AnalysisContext) -> None:
        state = ctx.state(node.input[0])
        if state is None:
            return
        if not isinstance(state, Plain):
            freeze_inputs(node, ctx, "Shape of scattered channels")
            return
        attrs = attributes(node)
        start = int(attrs.get("start", 0)) % state.rank  # type: ignore[call-overload]
        end_value = attrs.get("end")
        end = state.rank if end_value is None else int(end_value)  # type: ignore[call-overload]
        end = end % state.rank if end < 0 else min(end, state.rank)
        if not start <= state.axis < end:
            return
        for consumer, position in ctx.graph.consumers.get(node.output[0], []):
            indices = ctx.graph.input_constant(consumer, 1)
            axis = int(attributes(consumer).get("axis", 0))  # type: ignore[call-overload]
            picks_channels = (indices is None or
                              np.any(np.asarray(indices) % state.rank == state.axis - start))
            if consumer.op_type != "Gather" or position != 0 or axis != 0 or picks_channels:
                freeze_inputs(node, ctx, f"the channel count is read through Shape by "
                                         f"{consumer.op_type} node '{consumer.name}'")
                return

    def slice(self, node: onnx.NodeProto, member: Member, kept: np.ndarray, channels: int,
              editor: Editor) -> None:
        raise TypeError(f"Shape node '{node.name}' has no channel parameters")
