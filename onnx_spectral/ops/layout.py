"""Layout ops (Flatten, Reshape, Transpose, Squeeze, Unsqueeze): where do the channels go?

Nothing is assumed about exporters' layouts. The channel -> element map of a layout chain is
derived by pushing index arrays (each element holds its channel, its source position and its
sample number) through the chain's ops with NumPy. When the channels end up along one axis in
order, the tensor is `Plain` again; otherwise it stays `Mapped` and only a flattened linear sink
(or more layout ops) may read it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import numpy as np
import onnx

from onnx_spectral.graph.model import Dim, GraphIndex, attributes, evaluate_shape_expression
from onnx_spectral.ops.base import (
    AnalysisContext,
    ChannelState,
    Editor,
    FeatureMap,
    Mapped,
    Member,
    NoWeights,
    Plain,
    Role,
)

IndexArrays = tuple[np.ndarray, np.ndarray, np.ndarray]
"""(channel, position, sample) arrays of one shape: see `Mapped`."""

SAMPLES_FOR_INDEX = 2
"""Samples put on a dynamic sample axis while simulating, so that mixing samples shows."""

DYNAMIC_SIZES = (3, 5)
"""Sizes put on dynamic non-sample axes (a symbolic height or width): the layout is simulated
at each, and followed only when both give the channels on the same single axis, so that
nothing downstream depends on the size picked."""


class LayoutError(ValueError):
    """The layout op cannot be followed (message says why)."""


def index_arrays(shape: Sequence[Dim], axis: int, channels: np.ndarray,
                 dynamic_size: int | None = None) -> IndexArrays:
    """Index arrays of a Plain tensor of `shape` whose axis `axis` holds `channels` ([C]);
    dynamic non-sample dimensions take `dynamic_size` (LayoutError when it is None)."""
    samples = shape[0] if shape[0] is not None else SAMPLES_FOR_INDEX
    dims = [samples, *(dynamic_size if d is None else d for d in shape[1:])]
    dims[axis] = channels.size
    if any(d is None for d in dims):
        raise LayoutError(f"its shape {tuple(shape)} has dynamic non-sample dimensions")
    full = tuple(int(d) for d in dims)  # type: ignore[arg-type]
    grid = np.indices(full, dtype=np.int64)
    channel = channels[grid[axis]]
    rest = [i for i in range(1, len(full)) if i != axis]
    position = np.zeros(full, dtype=np.int64)
    for i in rest:
        position = position * full[i] + grid[i]
    return channel, position, grid[0]


def _axes(node: onnx.NodeProto, values: Sequence[np.ndarray | None]) -> list[int] | None:
    attrs = attributes(node)
    if "axes" in attrs:
        return [int(a) for a in attrs["axes"]]  # type: ignore[attr-defined]
    if len(values) > 1 and values[1] is not None:
        return [int(a) for a in values[1]]
    return None


def _reshape_target(node: onnx.NodeProto, shape: np.ndarray, source: tuple[int, ...]) -> list[int]:
    allow_zero = int(attributes(node).get("allowzero", 0))  # type: ignore[call-overload]
    target = [int(d) for d in shape]
    if not allow_zero:
        target = [source[i] if d == 0 else d for i, d in enumerate(target)]
    return target


def apply_layout(node: onnx.NodeProto, arrays: IndexArrays,
                 values: Sequence[np.ndarray | None]) -> IndexArrays:
    """Push index arrays through one layout node; `values` are its inputs' constant values."""
    op = node.op_type
    transform: Callable[[np.ndarray], np.ndarray]
    shape = arrays[0].shape
    if op == "Flatten":
        axis = int(attributes(node).get("axis", 1))  # type: ignore[call-overload]
        axis = axis + len(shape) if axis < 0 else axis
        outer = int(np.prod(shape[:axis]))
        transform = lambda a: a.reshape(outer, -1)  # noqa: E731
    elif op == "Reshape":
        target_value = values[1] if len(values) > 1 else None
        if target_value is None:
            raise LayoutError("its target shape is not a constant")
        target = _reshape_target(node, target_value, shape)
        transform = lambda a: a.reshape(target)  # noqa: E731
    elif op == "Transpose":
        perm_value = attributes(node).get("perm")
        perm = None if perm_value is None else [int(p) for p in perm_value]  # type: ignore[attr-defined]
        transform = lambda a: np.transpose(a, perm)  # noqa: E731
    elif op in ("Squeeze", "Unsqueeze"):
        axes = _axes(node, values)
        if op == "Squeeze":
            squeeze_axes = tuple(axes) if axes is not None else None
            transform = lambda a: np.squeeze(a, axis=squeeze_axes)  # noqa: E731
        else:
            if axes is None:
                raise LayoutError("its axes are not constant")
            transform = lambda a: np.expand_dims(a, tuple(axes))  # noqa: E731
    else:
        raise LayoutError(f"{op} is not a layout op")
    try:
        return transform(arrays[0]), transform(arrays[1]), transform(arrays[2])
    except ValueError as exc:
        raise LayoutError(str(exc)) from exc


def plain_axis(arrays: IndexArrays, channels: np.ndarray) -> int | None:
    """The axis holding the channels in order, or None when they are scattered."""
    channel = arrays[0]
    varying = [axis for axis in range(channel.ndim)
               if channel.shape[axis] > 1 and np.any(np.diff(channel, axis=axis) != 0)]
    if len(varying) != 1:
        return None
    axis = varying[0]
    along = np.moveaxis(channel, axis, -1).reshape(-1, channel.shape[axis])
    if channel.shape[axis] != channels.size or np.any(along != channels):
        return None
    return axis


def scaled_shape_entry(node: onnx.NodeProto, arrays_out: IndexArrays, shape_value: np.ndarray,
                       channels: int) -> int | None:
    """Entry of a Reshape's target shape that holds a multiple of the channel count.

    Returns None when no entry needs rewriting (the channel-carrying axis is given as -1 or 0).
    Raises LayoutError when the channels spread over several axes or the entry is not a
    multiple of the channel count.
    """
    channel, _, sample = arrays_out
    carrying = [axis for axis in range(channel.ndim)
                if channel.shape[axis] > 1 and np.any(np.diff(channel, axis=axis) != 0)]
    if len(carrying) != 1:
        raise LayoutError("it spreads the channels over several axes")
    axis = carrying[0]
    if np.any(np.diff(sample, axis=axis) != 0):
        raise LayoutError("it mixes the sample axis with the channel axis")
    entry = int(shape_value[axis])
    if entry in (-1, 0):
        return None
    if entry % channels:
        raise LayoutError(f"its shape entry {entry} is not a multiple of {channels} channels")
    return axis


def shape_entries(graph: GraphIndex, reshape: onnx.NodeProto) -> list[int | None] | None:
    """The entries of a Reshape's target shape: constants as ints, computed ones as None.

    The target is a constant, or a Concat of 1-D pieces (constants or computed); None when its
    length cannot be told.
    """
    target = graph.constant(reshape.input[1])
    if target is not None:
        return [int(v) for v in target]
    entries: list[int | None] = []
    for _, piece, index in _pieces(graph, reshape):
        value = graph.constant(piece)
        entries.append(None if value is None else int(value.reshape(-1)[index]))
    return entries if entries else None


def _pieces(graph: GraphIndex, reshape: onnx.NodeProto) -> Iterator[tuple[int, str, int]]:
    """(Concat input position, piece tensor, index in the piece) of each target entry of a
    Reshape whose target is a Concat of 1-D pieces; nothing when it is not."""
    concat = graph.producers.get(reshape.input[1])
    if concat is None or concat.op_type != "Concat":
        return
    lengths = []
    for piece in concat.input:
        value = graph.constant(piece)
        shape = graph.shapes.get(piece) if value is None else value.shape
        if shape is None or len(shape) != 1 or shape[0] is None:
            return
        lengths.append(int(shape[0]))
    for position, (piece, length) in enumerate(zip(concat.input, lengths, strict=True)):
        for index in range(length):
            yield position, piece, index


def entry_source(graph: GraphIndex, reshape: onnx.NodeProto, entry: int
                 ) -> tuple[onnx.NodeProto, int, int]:
    """Where the constant of target entry `entry` of a Reshape lives: (node, input position,
    index in that constant): the Reshape's own target, or a constant piece of the Concat that
    computes it. Raises ValueError when the entry is computed."""
    if graph.constant(reshape.input[1]) is not None:
        return reshape, 1, entry
    pieces = list(_pieces(graph, reshape))
    if entry >= len(pieces) or graph.constant(pieces[entry][1]) is None:
        raise ValueError(f"entry {entry} of the target shape of Reshape '{reshape.name}' is "
                         "computed, not a constant")
    position, _, index = pieces[entry]
    return graph.producers[reshape.input[1]], position, index


def scaled_entry(value: np.ndarray, index: int, channels: int, kept: int) -> np.ndarray:
    """`value` with element `index` scaled from `channels` to `kept` channels (a head count or
    a width); ValueError when it does not scale to a whole number."""
    new = np.array(value, copy=True)
    flat = new.reshape(-1)
    scaled, remainder = divmod(int(flat[index]) * kept, channels)
    if remainder:
        raise ValueError(f"shape entry {int(flat[index])} does not scale from {channels} to "
                         f"{kept} channels")
    flat[index] = scaled
    return new


def layout_inputs(graph: GraphIndex, node: onnx.NodeProto,
                  value_of: Callable[[onnx.NodeProto, int], np.ndarray | None],
                  ) -> list[np.ndarray | None]:
    """Constant inputs of a layout node; a computed Reshape target is evaluated."""
    values = [value_of(node, i) for i in range(len(node.input))]
    if node.op_type == "Reshape" and values[1] is None:
        values[1] = evaluate_shape_expression(graph, node.input[1], SAMPLES_FOR_INDEX)
    return values


def _check_computed_target(graph: GraphIndex, node: onnx.NodeProto) -> None:
    """A computed Reshape target may depend on the sample count only, as the sample count."""
    if node.op_type != "Reshape" or graph.constant(node.input[1]) is not None:
        return
    first = evaluate_shape_expression(graph, node.input[1], SAMPLES_FOR_INDEX)
    second = evaluate_shape_expression(graph, node.input[1], SAMPLES_FOR_INDEX + 1)
    if first is None or second is None:
        raise LayoutError("its target shape is computed by ops that cannot be evaluated")
    varying = first != second
    if np.any(first[varying] != SAMPLES_FOR_INDEX) or np.any(
            second[varying] != SAMPLES_FOR_INDEX + 1):
        raise LayoutError("its computed target shape depends on the sample count in a way "
                          "other than passing it through")


def simulate_chain(graph: GraphIndex, source: str, source_axis: int, chain: Sequence[str],
                   channels: np.ndarray,
                   value_of: Callable[[onnx.NodeProto, int], np.ndarray | None],
                   ) -> IndexArrays:
    """Index arrays at the end of `chain` when `source` carries `channels` ([k]) on its axis.

    `value_of(node, position)` gives the (possibly rewritten) constant inputs of the chain.
    """
    arrays = index_arrays(graph.static_shape(source), source_axis, channels)
    for name in chain:
        node = graph.nodes_by_name[name]
        arrays = apply_layout(node, arrays, layout_inputs(graph, node, value_of))
    return arrays


def sink_feature_map(state: Mapped, sink_name: str) -> FeatureMap:
    """The feature map of a 2-D flattened sink input [samples, F]; LayoutError if not clean."""
    channel, position, sample = state.channel, state.position, state.sample
    if channel.ndim != 2:
        raise LayoutError(f"the sink '{sink_name}' reads a rank-{channel.ndim} scattered "
                          "tensor; only a 2-D [samples, features] input is supported")
    if np.any(sample != np.arange(sample.shape[0])[:, None]):
        raise LayoutError("the layout mixes samples into the features")
    if np.any(channel != channel[:1]) or np.any(position != position[:1]):
        raise LayoutError("the feature layout differs between samples")
    feature_channel, feature_position = channel[0], position[0]
    pairs = feature_channel * (int(feature_position.max()) + 1) + feature_position
    channels = np.unique(feature_channel).size
    positions = np.unique(feature_position).size
    if np.unique(pairs).size != pairs.size or pairs.size != channels * positions:
        raise LayoutError("the features are not a clean partition by channel and position")
    return FeatureMap(state.chain, feature_channel, feature_position)


class _Followed(NamedTuple):
    """A layout node's output as simulated at one size of the dynamic axes."""

    arrays: IndexArrays
    source: str
    source_axis: int
    chain: tuple[str, ...]
    channels: int
    entry: int | None
    """Target-shape entry of a Reshape to rewrite with the channel count (None: none)."""
    axis: int | None
    """Axis holding the channels in order at the output, None when they are scattered."""


class LayoutHandler(NoWeights):
    """Flatten, Reshape, Transpose, Squeeze and Unsqueeze."""

    op_types: tuple[str, ...] = ("Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze")

    def analyze(self, node: onnx.NodeProto, ctx: AnalysisContext) -> None:
        state = ctx.state(node.input[0])
        if state is None:
            return
        graph = ctx.graph
        try:
            _check_computed_target(graph, node)
            values = layout_inputs(graph, node, graph.input_constant)
            outcomes = [self._follow(state, node, graph, values, size)
                        for size in self._dynamic_sizes(state, node, graph)]
            followed = outcomes[0]
            if len(outcomes) > 1 and (followed.axis is None or any(
                    (other.axis, other.entry) != (followed.axis, followed.entry)
                    for other in outcomes[1:])):
                shape = graph.static_shape(node.input[0], node.name)
                raise LayoutError(f"its shape {tuple(shape)} has dynamic non-sample dimensions "
                                  "and the channels do not stay on one axis whatever their sizes")
            if followed.entry is not None:
                ctx.add_member(state.group, Member(node.name, Role.LAYOUT, followed.entry))
        except LayoutError as exc:
            ctx.freeze(state.group, f"{node.op_type} '{node.name}' moves the channel axis in a "
                                    f"way that cannot be followed: {exc}")
            return
        new_state: ChannelState
        if followed.axis is not None:
            new_state = Plain(state.group, followed.axis, followed.arrays[0].ndim)
        else:
            new_state = Mapped(state.group, followed.source, followed.source_axis,
                               (*followed.chain, node.name), *followed.arrays)
        ctx.set_state(node.output[0], new_state)

    @staticmethod
    def _dynamic_sizes(state: ChannelState, node: onnx.NodeProto, graph: GraphIndex
                       ) -> tuple[int | None, ...]:
        """Sizes to simulate dynamic non-sample axes at: none when the shape is static."""
        if isinstance(state, Mapped):
            return (None,)
        shape = graph.static_shape(node.input[0], node.name)
        dynamic = any(d is None for i, d in enumerate(shape) if i not in (0, state.axis))
        return DYNAMIC_SIZES if dynamic else (None,)

    def _follow(self, state: ChannelState, node: onnx.NodeProto, graph: GraphIndex,
                values: Sequence[np.ndarray | None], dynamic_size: int | None) -> _Followed:
        arrays, source, source_axis, chain = self._start(state, node, graph, dynamic_size)
        channels = int(arrays[0].max()) + 1
        arrays_out = apply_layout(node, arrays, values)
        entry = None
        if node.op_type == "Reshape":
            assert values[1] is not None
            entry = scaled_shape_entry(node, arrays_out, values[1], channels)
            if entry is not None and graph.constant(node.input[1]) is None:
                raise LayoutError("the channel count is part of a computed target shape")
        return _Followed(arrays_out, source, source_axis, chain, channels, entry,
                         plain_axis(arrays_out, np.arange(channels)))

    @staticmethod
    def _start(state: ChannelState, node: onnx.NodeProto, graph: GraphIndex,
               dynamic_size: int | None) -> tuple[IndexArrays, str, int, tuple[str, ...]]:
        if isinstance(state, Mapped):
            return ((state.channel, state.position, state.sample), state.source,
                    state.source_axis, state.chain)
        tensor = node.input[0]
        shape = graph.static_shape(tensor, node.name)
        channels = shape[state.axis]
        if channels is None:
            raise LayoutError("its channel count is not static")
        return (index_arrays(shape, state.axis, np.arange(channels), dynamic_size), tensor,
                state.axis, ())

    def slice(self, node: onnx.NodeProto, member: Member, kept: np.ndarray, channels: int,
              editor: Editor) -> None:
        source, position, index = entry_source(editor.graph, node, member.axis)
        value = editor.input_value(source, position)
        assert value is not None
        editor.set_input_value(source, position,
                               scaled_entry(value, index, channels, kept.size))
