"""Concat, Split and Slice: ops that assemble or cut the channel axis.

Along the channel axis they make derived groups (see `analysis`): a Concat's output channels
are its inputs' channels in order; a Split or a channel Slice refines its input's group into
consecutive base groups, one per piece, and its sizes (or starts and ends) are rewritten to the
kept counts of the pieces. Along any other axis they leave the channels alone (Concat then
couples the groups of its inputs, which must line up channel for channel).
"""

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


def _axis(node: onnx.NodeProto, rank: int, default: int | None = None) -> int:
    value = attributes(node).get("axis", default)
    return int(value) % rank  # type: ignore[call-overload]


def _counts(kept: np.ndarray, bounds: list[tuple[int, int]]) -> list[int]:
    """Kept channels falling in each [start, end) range."""
    return [int(np.count_nonzero((kept >= start) & (kept < end))) for start, end in bounds]


class ConcatHandler(NoWeights):
    """Concat: a derived group along the channel axis, a coupling along any other."""

    op_types: tuple[str, ...] = ("Concat",)

    def analyze(self, node: onnx.NodeProto, ctx: AnalysisContext) -> None:
        states = [ctx.state(name) for name in node.input]
        grouped = [state for state in states if state is not None]
        if not grouped:
            return
        rank = ctx.graph.rank(node.output[0])
        if rank is None or not all(isinstance(state, Plain) and state.rank == rank
                                   for state in grouped):
            freeze_inputs(node, ctx, "Concat of scattered channels or of unknown rank")
            return
        axis = _axis(node, rank)
        plains = [state for state in grouped if isinstance(state, Plain)]
        channel_axes = {state.axis for state in plains}
        if channel_axes == {axis}:
            parts: list[tuple[int | None, int]] = []
            for name, state in zip(node.input, states, strict=True):
                size = ctx.graph.static_shape(name, node.name)[axis]
                if size is None:
                    freeze_inputs(node, ctx, "Concat of inputs with dynamic channel counts")
                    return
                parts.append((None if state is None else state.group, int(size)))
            ctx.new_derived(parts, node.output[0], axis, rank)
            return
        if len(channel_axes) != 1 or len(grouped) != len(states):
            freeze_inputs(node, ctx, "Concat mixes channel axes or untracked tensors")
            return
        sizes = {ctx.graph.static_shape(name, node.name)[plains[0].axis] for name in node.input}
        if len(sizes) != 1 or None in sizes:
            freeze_inputs(node, ctx, "Concat couples tensors whose channel counts differ")
            return
        group = grouped[0].group
        for state in grouped[1:]:
            group = ctx.union(group, state.group, node.output[0])
        ctx.set_state(node.output[0], Plain(group, plains[0].axis, rank))

    def slice(self, node: onnx.NodeProto, member: Member, kept: np.ndarray, channels: int,
              editor: Editor) -> None:
        raise TypeError(f"Concat node '{node.name}' has no channel parameters")


def _split_sizes(node: onnx.NodeProto, ctx_or_graph_value: np.ndarray | None,
                 total: int) -> list[int]:
    """Sizes of a Split's pieces: given explicitly, or equal (the last smaller, opset 18)."""
    explicit = attributes(node).get("split", ctx_or_graph_value)
    if explicit is not None and np.asarray(explicit).size:
        return [int(size) for size in np.asarray(explicit).ravel()]
    pieces = len(node.output)
    chunk = -(-total // pieces)
    return [chunk] * (pieces - 1) + [total - chunk * (pieces - 1)]


class SplitHandler(NoWeights):
    """Split: pieces of the channel axis become base groups; sizes rewritten to kept counts."""

    op_types: tuple[str, ...] = ("Split",)

    def analyze(self, node: onnx.NodeProto, ctx: AnalysisContext) -> None:
        state = ctx.state(node.input[0])
        if state is None:
            return
        if not isinstance(state, Plain):
            freeze_inputs(node, ctx, "Split of scattered channels")
            return
        axis = _axis(node, state.rank, 0)
        if axis != state.axis:
            for name in node.output:
                ctx.set_state(name, state)
            return
        given = len(node.input) > 1 and bool(node.input[1])
        explicit = ctx.graph.input_constant(node, 1)
        total = ctx.graph.static_shape(node.input[0], node.name)[axis]
        if (given and explicit is None) or total is None:
            freeze_inputs(node, ctx, "Split of the channel axis by sizes that are not constant")
            return
        sizes = _split_sizes(node, explicit, int(total))
        pieces = ctx.refine(state.group, sizes)
        if pieces is None or min(sizes) < 1:
            freeze_inputs(node, ctx, "Split of channels already cut at other boundaries")
            return
        ctx.add_member(state.group, Member(node.name, Role.LAYOUT, axis))
        for name, piece in zip(node.output, pieces, strict=True):
            ctx.set_state(name, Plain(piece, axis, state.rank))

    def slice(self, node: onnx.NodeProto, member: Member, kept: np.ndarray, channels: int,
              editor: Editor) -> None:
        sizes = _split_sizes(node, editor.graph.input_constant(node, 1), channels)
        offsets = np.cumsum([0, *sizes])
        counts = _counts(kept, list(zip(offsets[:-1], offsets[1:], strict=True)))
        if opset_version(editor.graph.model) < 13:
            editor.set_attribute(node, "split", counts)
            return
        editor.remove_attribute(node, "num_outputs")
        editor.set_input_value(node, 1, np.asarray(counts, dtype=np.int64))


def _slice_parameters(node: onnx.NodeProto, ctx_graph_constant: list[np.ndarray | None],
                      rank: int) -> tuple[list[int], list[int], list[int], list[int]] | None:
    """(starts, ends, axes, steps) of a Slice, from attributes (opset < 10) or constant inputs;
    None when some is not constant."""
    attrs = attributes(node)
    if "starts" in attrs:
        starts, ends = attrs["starts"], attrs["ends"]
        axes = attrs.get("axes", list(range(len(starts))))  # type: ignore[arg-type]
        steps: object = [1] * len(starts)  # type: ignore[arg-type]
    else:
        values = ctx_graph_constant + [None] * (5 - len(ctx_graph_constant))
        present = [position < len(node.input) and bool(node.input[position])
                   for position in range(5)]
        if any(present[p] and values[p] is None for p in range(1, 5)):
            return None
        starts, ends = values[1], values[2]
        assert starts is not None and ends is not None
        axes = values[3] if present[3] else list(range(len(starts)))
        steps = values[4] if present[4] else [1] * len(starts)
    return ([int(v) for v in starts], [int(v) for v in ends],  # type: ignore[attr-defined]
            [int(v) % rank for v in axes], [int(v) for v in steps])  # type: ignore[attr-defined]


def _channel_range(start: int, end: int, channels: int) -> tuple[int, int]:
    """Clamp a step-1 Slice range on an axis of `channels` entries."""
    start = start + channels if start < 0 else start
    end = end + channels if end < 0 else end
    return min(max(start, 0), channels), min(max(end, 0), channels)


class SliceHandler(NoWeights):
    """Slice: a constant step-1 range of the channel axis becomes its own base group."""

    op_types: tuple[str, ...] = ("Slice",)

    def analyze(self, node: onnx.NodeProto, ctx: AnalysisContext) -> None:
        state = ctx.state(node.input[0])
        if state is None:
            return
        if not isinstance(state, Plain):
            freeze_inputs(node, ctx, "Slice of scattered channels")
            return
        constants = [ctx.graph.input_constant(node, p) for p in range(len(node.input))]
        params = _slice_parameters(node, constants, state.rank)
        if params is None:
            freeze_inputs(node, ctx, "Slice with starts, ends, axes or steps not constant")
            return
        starts, ends, axes, steps = params
        if state.axis not in axes:
            ctx.set_state(node.output[0], state)
            return
        entry = axes.index(state.axis)
        channels = ctx.graph.static_shape(node.input[0], node.name)[state.axis]
        if steps[entry] != 1 or channels is None:
            freeze_inputs(node, ctx, "Slice of the channel axis with a step other than 1")
            return
        start, end = _channel_range(starts[entry], ends[entry], int(channels))
        if start >= end:
            freeze_inputs(node, ctx, "Slice that takes no channel")
            return
        sizes = [size for size in (start, end - start, int(channels) - end) if size]
        pieces = ctx.refine(state.group, sizes)
        if pieces is None:
            freeze_inputs(node, ctx, "Slice of channels already cut at other boundaries")
            return
        ctx.add_member(state.group, Member(node.name, Role.LAYOUT, entry))
        ctx.set_state(node.output[0], Plain(pieces[1 if start else 0], state.axis, state.rank))

    def slice(self, node: onnx.NodeProto, member: Member, kept: np.ndarray, channels: int,
              editor: Editor) -> None:
        constants = [editor.graph.input_constant(node, p) for p in range(len(node.input))]
        rank = len(editor.graph.static_shape(node.input[0], node.name))
        params = _slice_parameters(node, constants, rank)
        assert params is not None
        starts, ends = list(params[0]), list(params[1])
        entry = member.axis
        start, end = _channel_range(starts[entry], ends[entry], channels)
        before, inside = _counts(kept, [(0, start), (start, end)])
        starts[entry], ends[entry] = before, before + inside
        if "starts" in attributes(node):
            editor.set_attribute(node, "starts", starts)
            editor.set_attribute(node, "ends", ends)
            return
        editor.set_input_value(node, 1, np.asarray(starts, dtype=constants[1].dtype))  # type: ignore[union-attr]
        editor.set_input_value(node, 2, np.asarray(ends, dtype=constants[2].dtype))  # type: ignore[union-attr]
