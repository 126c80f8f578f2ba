"""Channel groups: which channels can be removed together, and which groups are frozen.

One walk over the normalized graph in topological order. Producers create groups, channel-wise
ops pass them on, couplings merge them (union-find), sinks register the taps whose statistics
calibration gathers, and anything the handlers cannot prove safe freezes the group with a
reason. An op without a handler freezes every group that reaches it.

Concat and Split on the channel axis make *derived* groups: a concatenated tensor's channels are
the ordered parts of other groups (or of untracked tensors kept whole), and a split tensor's
group is refined into one base group per output. Only base groups are selected; a derived
group's kept channels are assembled from its parts', its channel-wise members are sliced with
them, and its sinks get one reconstruction over all its kept channels. Freezing a derived group
freezes its parts; a base group whose only readers are concatenations is prunable when those
have sinks.

Some readers are barriers before any handler is asked: a node whose subgraph (If/Loop/Scan) reads
the tensor, and a layer whose weight is quantized (a `DequantizeLinear` of a constant). Every
group a node touches is frozen when it reads an initializer that a caller may override
(`initializer_inputs="input"`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnx_spectral.errors import OptionsError
from onnx_spectral.graph.model import GraphIndex, InitializerInputs, normalize
from onnx_spectral.graph.shapes import fill_missing_shapes, missing_shapes
from onnx_spectral.graph.subgraphs import outer_scope_names
from onnx_spectral.ops import handler_for
from onnx_spectral.ops.attention import find_attention, merge_heads
from onnx_spectral.ops.base import ChannelState, Member, Plain, Role, SinkUse


@dataclass(frozen=True)
class Tap:
    """A tensor whose channel statistics are gathered, with the sinks that read it.

    `axis` is the channel axis of `tensor`; `channels` its size m.
    """

    tensor: str
    axis: int
    channels: int
    sinks: tuple[SinkUse, ...]


Part = tuple[int | None, int, int]
"""(base group id or None for untracked channels kept whole, offset, size) in a derived group."""


@dataclass(frozen=True)
class ChannelGroup:
    """Channels 0..channels-1 shared by every tensor in `tensors`."""

    id: int
    channels: int
    producers: tuple[str, ...]
    members: tuple[Member, ...]
    taps: tuple[Tap, ...]
    tensors: tuple[str, ...]
    frozen: tuple[str, ...]
    """Why the group must be kept whole; empty when it is prunable."""
    parts: tuple[Part, ...] = ()
    """For a derived group (Concat, Split), its base parts in channel order; empty for a base
    group, which is selected on its own."""
    block: int = 1
    """Channels are kept in whole consecutive blocks of this size (an attention head's D)."""
    scaled: tuple[str, ...] = ()
    """Nodes without weights whose MACs scale with the channels kept (attention MatMuls)."""
    lanes: int = 1
    """The channels are this many consecutive lanes of equal size, each keeping as many channels
    as the others (the groups of a grouped Conv that produces or reads them)."""
    lane_local: bool = False
    """A grouped Conv reads the lanes: each lane is reconstructed from its own kept channels
    only (block-diagonal reconstructions)."""
    whole_above: int | None = None
    """For the outputs of a factorized layer (`reconstruction_layers`): kept widths above this
    cost more than the layer whole, so they keep every channel instead."""

    @property
    def step(self) -> int:
        """Kept widths are multiples of this: the head size, or the number of lanes."""
        return max(self.block, self.lanes)

    @property
    def heads(self) -> int | None:
        """The number of attention heads of a head group, None for a channel group."""
        return self.channels // self.block if self.block > 1 else None

    @property
    def prunable(self) -> bool:
        return not self.frozen


@dataclass(frozen=True)
class Analysis:
    """The groups of a normalized model; every name refers to `graph.model`."""

    graph: GraphIndex
    groups: tuple[ChannelGroup, ...]
    kept_layers: tuple[str, ...] = ()
    """Why linear layers that start no group are kept whole (e.g. a quantized weight)."""

    @property
    def prunable(self) -> tuple[ChannelGroup, ...]:
        return tuple(group for group in self.groups if group.prunable)

    @property
    def base_groups(self) -> tuple[ChannelGroup, ...]:
        """The prunable groups that choose their own channels (not Concat/Split-derived)."""
        return tuple(group for group in self.prunable if not group.parts)

    @property
    def taps(self) -> tuple[Tap, ...]:
        """The taps of every prunable group, each tensor once."""
        return tuple(tap for group in self.prunable for tap in group.taps)


@dataclass
class _GroupRecord:
    channels: int
    producers: list[str] = field(default_factory=list)
    members: list[Member] = field(default_factory=list)
    sinks: list[SinkUse] = field(default_factory=list)
    tensors: list[str] = field(default_factory=list)
    frozen: list[str] = field(default_factory=list)
    parts: list[Part] = field(default_factory=list)
    block: int = 1
    scaled: list[str] = field(default_factory=list)
    lanes: int = 1
    lane_local: bool = False


class _Context:
    """The AnalysisContext handlers talk to: states, union-find over groups, records."""

    def __init__(self, graph: GraphIndex) -> None:
        self.graph = graph
        self._states: dict[str, ChannelState] = {}
        self._parent: list[int] = []
        self._records: dict[int, _GroupRecord] = {}

    def find(self, group: int) -> int:
        root = group
        while self._parent[root] != root:
            root = self._parent[root]
        while self._parent[group] != root:
            self._parent[group], group = root, self._parent[group]
        return root

    def state(self, tensor: str) -> ChannelState | None:
        return self._states.get(tensor)

    def set_state(self, tensor: str, state: ChannelState) -> None:
        self._states[tensor] = state
        self._records[self.find(state.group)].tensors.append(tensor)

    def new_group(self, producer: str, size: int, tensor: str, axis: int, rank: int) -> int:
        group = len(self._parent)
        self._parent.append(group)
        self._records[group] = _GroupRecord(size, producers=[producer],
                                            members=[Member(producer, Role.PRODUCER, axis)])
        self.set_state(tensor, Plain(group, axis, rank))
        return group

    def union(self, first: int, second: int, tensor: str) -> int:
        first, second = self.find(first), self.find(second)
        if first == second:
            return first
        keep, gone = min(first, second), max(first, second)
        self._parent[gone] = keep
        kept, merged = self._records[keep], self._records.pop(gone)
        if kept.parts or merged.parts:
            kept.frozen.append(f"channels of a concatenation or split are coupled with other "
                               f"channels at '{tensor}'")
            kept.parts = kept.parts or merged.parts
        kept.producers += merged.producers
        kept.members += merged.members
        kept.sinks += merged.sinks
        kept.tensors += merged.tensors
        kept.frozen += merged.frozen
        kept.scaled += merged.scaled
        self._merge_block(kept, merged.block, tensor)
        self._merge_lanes(kept, merged.lanes, tensor)
        kept.lane_local = kept.lane_local or merged.lane_local
        return keep

    @staticmethod
    def _merge_block(record: _GroupRecord, block: int, tensor: str) -> None:
        if block == 1 or block == record.block:
            return
        if record.block != 1:
            record.frozen.append(f"attention heads of {record.block} and {block} channels meet "
                                 f"at '{tensor}'")
        if record.lanes != 1:
            record.frozen.append(f"attention heads meet the {record.lanes} groups of a grouped "
                                 f"Conv at '{tensor}'")
        record.block = block

    @staticmethod
    def _merge_lanes(record: _GroupRecord, lanes: int, tensor: str) -> None:
        if lanes == 1 or lanes == record.lanes:
            return
        if record.lanes != 1 or record.block != 1:
            what = (f"{record.lanes} groups" if record.lanes != 1
                    else f"attention heads of {record.block} channels")
            record.frozen.append(f"grouped Conv outputs of {what} and {lanes} groups meet at "
                                 f"'{tensor}'")
        record.lanes = lanes

    def new_derived(self, parts: list[tuple[int | None, int]], tensor: str, axis: int,
                    rank: int) -> int:
        """A group whose channels are the given (group or None, size) parts in order."""
        group = len(self._parent)
        self._parent.append(group)
        offsets = np.cumsum([0] + [size for _, size in parts])
        self._records[group] = _GroupRecord(
            int(offsets[-1]), parts=[(part, int(offset), size)
                                     for (part, size), offset in zip(parts, offsets, strict=False)])
        self.set_state(tensor, Plain(group, axis, rank))
        return group

    def refine(self, group: int, sizes: list[int]) -> list[int] | None:
        """Split a group's channels into consecutive base groups of `sizes`; their ids.

        None when the group is already derived with other boundaries (or is a concatenation).
        """
        record = self._records[self.find(group)]
        offsets = [int(o) for o in np.cumsum([0] + sizes[:-1])]
        if record.lanes != 1:  # parts would have to keep the lanes balanced together
            return None
        if record.parts:
            same = [(offset, size) for _, offset, size in record.parts] == list(
                zip(offsets, sizes, strict=True))
            parts = [part for part, _, _ in record.parts]
            if not same or any(part is None or self._records[self.find(part)].parts
                               for part in parts):
                return None
            return [self.find(part) for part in parts if part is not None]
        ids = []
        for size in sizes:
            ids.append(len(self._parent))
            self._parent.append(ids[-1])
            self._records[ids[-1]] = _GroupRecord(size)
        record.parts = [(part, offset, size)
                        for part, offset, size in zip(ids, offsets, sizes, strict=True)]
        return ids

    def freeze(self, group: int, reason: str) -> None:
        record = self._records[self.find(group)]
        if reason not in record.frozen:
            record.frozen.append(reason)

    def add_member(self, group: int, member: Member) -> None:
        self._records[self.find(group)].members.append(member)

    def add_sink(self, group: int, sink: SinkUse) -> None:
        self._records[self.find(group)].sinks.append(sink)

    def channels(self, group: int) -> int:
        return self._records[self.find(group)].channels

    def set_block(self, group: int, block: int) -> None:
        record = self._records[self.find(group)]
        self._merge_block(record, block, record.tensors[-1] if record.tensors else "")
        if record.channels % block:
            self.freeze(group, f"{record.channels} channels are not whole heads of {block}")

    def set_lanes(self, group: int, lanes: int, local: bool = False) -> None:
        record = self._records[self.find(group)]
        tensor = record.tensors[-1] if record.tensors else ""
        if record.parts:
            self.freeze(group, f"a grouped Conv reads a concatenation or split at '{tensor}'")
            return
        self._merge_lanes(record, lanes, tensor)
        record.lane_local = record.lane_local or local

    def add_scaled(self, group: int, nodes: tuple[str, ...]) -> None:
        self._records[self.find(group)].scaled.extend(nodes)

    def _flat_parts(self, group: int, base: int = 0) -> list[Part]:
        """The base parts of a derived group, nested derived parts expanded."""
        flat: list[Part] = []
        for part, offset, size in self._records[self.find(group)].parts:
            root = None if part is None else self.find(part)
            if root is not None and self._records[root].parts:
                flat += self._flat_parts(root, base + offset)
            else:
                flat.append((root, base + offset, size))
        return flat

    def groups(self) -> tuple[ChannelGroup, ...]:
        parts = {group_id: self._flat_parts(group_id)
                 for group_id, record in self._records.items() if record.parts}
        frozen = {group_id: list(record.frozen) for group_id, record in self._records.items()}
        for group_id, flat in parts.items():
            for part, _, _ in flat:
                if part is not None and frozen[group_id]:
                    reason = f"concatenated or split into a frozen tensor: {frozen[group_id][0]}"
                    if reason not in frozen[part]:
                        frozen[part].append(reason)
        read_via = {part for group_id, flat in parts.items()
                    if self._records[group_id].sinks for part, _, _ in flat}
        for group_id, record in self._records.items():
            if (group_id not in parts and not record.sinks and group_id not in read_via
                    and not frozen[group_id]):
                frozen[group_id].append("no linear layer reads these channels (nothing absorbs "
                                        "a reconstruction)")
        for group_id, flat in parts.items():
            if not frozen[group_id] and all(part is None or frozen[part] for part, _, _ in flat):
                frozen[group_id].append("every part of this concatenation or split is frozen")
        groups = []
        for group_id, record in sorted(self._records.items()):
            groups.append(ChannelGroup(
                id=group_id,
                channels=record.channels,
                producers=tuple(record.producers),
                members=tuple(dict.fromkeys(record.members)),
                taps=_taps(record.sinks, record.channels),
                tensors=tuple(dict.fromkeys(record.tensors)),
                frozen=tuple(frozen[group_id]),
                parts=tuple(parts.get(group_id, ())),
                block=record.block,
                scaled=tuple(dict.fromkeys(record.scaled)),
                lanes=record.lanes,
                lane_local=record.lane_local,
            ))
        return tuple(groups)


def _taps(sinks: Iterable[SinkUse], channels: int) -> tuple[Tap, ...]:
    by_tensor: dict[str, list[SinkUse]] = {}
    for sink in sinks:
        by_tensor.setdefault(sink.tap, []).append(sink)
    return tuple(
        Tap(tensor, uses[0].tap_axis, channels, tuple(uses)) for tensor, uses in by_tensor.items()
    )


ShapeFeeds = Mapping[str, np.ndarray] | Callable[[], Mapping[str, np.ndarray]]
"""A feed dict (input name -> array, samples on axis 0), or a function returning one."""

_QUANTIZATION_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})


def analyze(model: onnx.ModelProto, exclude: Iterable[str] = (), *,
            initializer_inputs: InitializerInputs = "constant",
            shape_feeds: ShapeFeeds | None = None) -> Analysis:
    """Channel groups of `model` (normalized first; the caller's model is not modified).

    `exclude` names producer nodes whose groups the user wants kept whole.
    `initializer_inputs`: how initializers listed as graph inputs are read (see `normalize`).
    `shape_feeds`: calibration data (its first sample is used), or a function giving it, called
    only when shape inference leaves some tensor without a shape; those shapes then come from
    ONNX Runtime runs (`fill_missing_shapes`). Without it such a tensor raises GraphError when a
    handler needs its shape.
    """
    normalized = normalize(model, initializer_inputs)
    if shape_feeds is not None and missing_shapes(normalized):
        fill_missing_shapes(normalized, shape_feeds() if callable(shape_feeds) else shape_feeds)
    graph = GraphIndex(normalized)
    excluded = set(exclude)
    unknown = sorted(excluded - set(graph.nodes_by_name))
    if unknown:
        raise OptionsError(f"--exclude names nodes that are not in the model: {unknown}; "
                           "`onnx-spectral analyze` lists the producer node names")
    ctx = _Context(graph)
    kept_layers: list[str] = []
    blocks = find_attention(graph)
    head_splits = {name for block in blocks for name in block.splits}
    head_merges = {block.merge: block for block in blocks}
    for node in graph.nodes:
        _freeze_all(ctx, outer_scope_names(node),
                    f"used inside a subgraph of {node.op_type} node '{node.name}'")
        if node.name in head_splits:
            continue  # the merge Reshape of its attention block couples the heads
        if node.name in head_merges:
            merge_heads(head_merges[node.name], ctx)
            continue
        barrier = _quantized_weight(graph, node)
        handler = handler_for(node.op_type, node.domain)
        if barrier is None and handler is not None:
            handler.analyze(node, ctx)
            overridden = [name for name in node.input if name in graph.overridable]
            if overridden:
                _freeze_all(ctx, [*node.input, *node.output], _overridable_reason(node, overridden))
            continue
        if barrier is not None:
            kept_layers.append(barrier)
        elif node.op_type in _QUANTIZATION_OPS:
            barrier = f"quantized: {node.op_type} node '{node.name}' reads it"
        _freeze_all(ctx, node.input, barrier or f"read by {node.op_type} node '{node.name}', an "
                                                "op onnx-spectral has no handler for")
    for name in graph.graph_outputs:
        state = ctx.state(name)
        if state is not None:
            ctx.freeze(state.group, f"tensor '{name}' is a graph output (its shape must stay)")
    for group in ctx.groups():
        for producer in excluded.intersection(group.producers):
            ctx.freeze(group.id, f"producer '{producer}' excluded by the user")
    return Analysis(graph, ctx.groups(), tuple(kept_layers))


def _freeze_all(ctx: _Context, tensors: Iterable[str], reason: str) -> None:
    for name in tensors:
        state = ctx.state(name) if name else None
        if state is not None:
            ctx.freeze(state.group, reason)


def _overridable_reason(node: onnx.NodeProto, names: list[str]) -> str:
    return (f"{node.op_type} node '{node.name}' reads {names}, initializers listed as graph "
            "inputs, which a caller may override (initializer_inputs='input')")


def _quantized_weight(graph: GraphIndex, node: onnx.NodeProto) -> str | None:
    """Why `node` must be a barrier: it reads a weight dequantized from a constant; None when
    it reads none."""
    for name in node.input:
        producer = graph.producers.get(name)
        if (producer is not None and producer.op_type == "DequantizeLinear"
                and graph.constant(producer.input[0]) is not None):
            return (f"weight '{name}' of {node.op_type} node '{node.name}' is quantized: "
                    f"DequantizeLinear node '{producer.name}' (quantized layers are kept whole)")
    return None
