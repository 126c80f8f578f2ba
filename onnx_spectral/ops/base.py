"""What op handlers see and record.

The analysis walks the graph in topological order and keeps, for every activation tensor that
carries a channel group, a *channel state*: `Plain` (the group's channels lie along one axis,
every other axis indexes samples and positions) or `Mapped` (layout ops such as Transpose,
Reshape or Flatten have scattered the channels; index arrays say which channel and which
source position own every element). Handlers read the states of a node's inputs and, through
the `AnalysisContext`, set the states of its outputs, create groups (producers), couple groups
(union-find), register sinks, and freeze groups they cannot prove safe.

At rewrite time the same handlers slice their parameters to the kept channels and fold the
reconstruction matrix into sinks through an `Editor`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Protocol

import numpy as np
import onnx

from onnx_spectral.graph.model import GraphIndex


@dataclass(frozen=True)
class Plain:
    """Channels of `group` lie along `axis` of a tensor of rank `rank`."""

    group: int
    axis: int
    rank: int


@dataclass(frozen=True, eq=False)
class Mapped:
    """Channels of `group` scattered by the layout ops `chain` applied to tensor `source`.

    Every array has the shape of the mapped tensor (static, with the sample axis sized as in
    `layout.index_arrays`): `channel` holds the owning channel of each element, `position` its
    flat position among the non-channel, non-sample axes of `source`, `sample` its sample index.
    """

    group: int
    source: str
    source_axis: int
    chain: tuple[str, ...]
    channel: np.ndarray
    position: np.ndarray
    sample: np.ndarray


ChannelState = Plain | Mapped


class Role(Enum):
    """How a node takes part in a group, which says how the rewrite must edit it."""

    PRODUCER = "producer"  # creates the channels: keep rows/columns J of its weight
    CHANNELWISE = "channelwise"  # carries channel c to channel c: slice its parameters to J
    LAYOUT = "layout"  # moves channels around: rewrite its shape constants
    HEAD_OPERAND = "head operand"  # an operand [..., H, s, s] of attention scores: keep heads


@dataclass(frozen=True)
class Member:
    """A node whose parameters the rewrite edits when its group is pruned.

    `axis` is the channel axis of the tensor the node's parameters broadcast against (its output
    for producers, its grouped input for channel-wise ops); for a layout op, the entry of its
    shape constant that scales with the channel count; for a head operand, its input position.
    """

    node: str
    role: Role
    axis: int


@dataclass(frozen=True, eq=False)
class FeatureMap:
    """Which (channel, position) of the tap feeds each input feature of a flattened sink.

    `channel[f]` and `position[f]` ([F] int64 each) for the sink's F input features; the tap is
    the Plain tensor the layout `chain` starts from.
    """

    chain: tuple[str, ...]
    channel: np.ndarray
    position: np.ndarray

    def lookup(self, channels: int) -> np.ndarray:
        """Feature index table [channels, positions]: table[c, p] = f."""
        positions = int(self.position.max()) + 1
        table = np.full((channels, positions), -1, dtype=np.int64)
        table[self.channel, self.position] = np.arange(self.channel.size)
        return table


@dataclass(frozen=True)
class SinkUse:
    """A linear layer that reads the group on input `input_index` and absorbs reconstruction.

    `tap` is the tensor whose channel statistics are gathered (the sink's input itself, or the
    start of the layout chain for a flattened sink), with its channel axis `tap_axis`.
    """

    node: str
    input_index: int
    tap: str
    tap_axis: int
    feature_map: FeatureMap | None = None


class AnalysisContext(Protocol):
    """What a handler may ask and tell the analysis."""

    graph: GraphIndex

    def state(self, tensor: str) -> ChannelState | None:
        """Channel state of an activation tensor, None when it carries no group."""

    def set_state(self, tensor: str, state: ChannelState) -> None: ...

    def new_group(self, producer: str, size: int, tensor: str, axis: int, rank: int) -> int:
        """Create a group of `size` channels produced by node `producer` along `axis`."""

    def union(self, first: int, second: int, tensor: str) -> int:
        """Merge two groups (a coupling); returns the merged group's id."""

    def freeze(self, group: int, reason: str) -> None: ...

    def new_derived(self, parts: list[tuple[int | None, int]], tensor: str, axis: int,
                    rank: int) -> int:
        """A group whose channels are the (group or None for untracked, size) parts in order
        (a concatenation along the channel axis); sets `tensor`'s state."""

    def refine(self, group: int, sizes: list[int]) -> list[int] | None:
        """Split a group into consecutive base groups of `sizes`; None when it cannot."""

    def add_member(self, group: int, member: Member) -> None: ...

    def add_sink(self, group: int, sink: SinkUse) -> None: ...

    def channels(self, group: int) -> int:
        """The channel count of a group."""

    def set_block(self, group: int, block: int) -> None:
        """Channels of the group are removed only in whole consecutive blocks of `block`
        (attention heads); a conflicting block freezes the group."""

    def set_lanes(self, group: int, lanes: int, local: bool = False) -> None:
        """The group's channels are `lanes` consecutive lanes that keep equal numbers of
        channels (the groups of a grouped Conv); `local`: a grouped Conv reads them, so each
        lane is reconstructed from its own channels. Conflicting lanes or heads, or a
        concatenation, freeze the group."""

    def add_scaled(self, group: int, nodes: tuple[str, ...]) -> None:
        """Nodes without weights whose MACs scale with the channels the group keeps."""


class Editor(Protocol):
    """Edits a copy of the model during the rewrite; reads see earlier edits."""

    graph: GraphIndex

    def input_value(self, node: onnx.NodeProto, position: int) -> np.ndarray | None:
        """Current constant value of a node input, None when absent or not constant."""

    def set_input_value(self, node: onnx.NodeProto, position: int, value: np.ndarray) -> None:
        """Give the node's input `position` a new constant (a fresh initializer)."""

    def set_attribute(self, node: onnx.NodeProto, name: str, value: object) -> None: ...

    def remove_attribute(self, node: onnx.NodeProto, name: str) -> None:
        """Drop an attribute of the node if it has it."""

    def gather_input(self, node: onnx.NodeProto, position: int, indices: np.ndarray,
                     axis: int) -> None:
        """Feed the node's input `position` through a new Gather of `indices` ([k] int64) on
        `axis`, placed before the node."""


class OpHandler(Protocol):
    """One family of ops: its part in the analysis and its edits in the rewrite."""

    op_types: tuple[str, ...]

    def analyze(self, node: onnx.NodeProto, ctx: AnalysisContext) -> None:
        """Read input states; set output states or register the node's role."""

    def slice(self, node: onnx.NodeProto, member: Member, kept: np.ndarray, channels: int,
              editor: Editor) -> None:
        """Keep only channels `kept` ([k] int64, sorted, of `channels`) in its parameters."""

    def output_rows(self, node: onnx.NodeProto, graph: GraphIndex) -> np.ndarray:
        """A producer's weight with one row per output channel ([m, ...])."""

    def sink_gram(self, node: onnx.NodeProto, sink: SinkUse, channels: int,
                  graph: GraphIndex) -> np.ndarray:
        """Z^T Z over the tap's channels ([m, m] float64) of the sink's weight."""

    def fold(self, node: onnx.NodeProto, sink: SinkUse, reconstruction: np.ndarray,
             kept: np.ndarray, editor: Editor) -> None:
        """Replace the sink weight W by W A on its input channels (A: [m, k])."""


class NoWeights:
    """Mixin for handlers of ops that neither produce channels nor absorb a reconstruction."""

    def output_rows(self, node: onnx.NodeProto, graph: GraphIndex) -> np.ndarray:
        raise TypeError(f"{node.op_type} node '{node.name}' is not a producer")

    def sink_gram(self, node: onnx.NodeProto, sink: SinkUse, channels: int,
                  graph: GraphIndex) -> np.ndarray:
        raise TypeError(f"{node.op_type} node '{node.name}' is not a sink")

    def fold(self, node: onnx.NodeProto, sink: SinkUse, reconstruction: np.ndarray,
             kept: np.ndarray, editor: Editor) -> None:
        raise TypeError(f"{node.op_type} node '{node.name}' is not a sink")


def freeze_inputs(node: onnx.NodeProto, ctx: AnalysisContext, reason: str) -> None:
    """Freeze the group of every input of `node` that carries one."""
    for position, name in enumerate(node.input):
        state = ctx.state(name) if name else None
        if state is not None:
            ctx.freeze(state.group, f"{reason} ({node.op_type} node '{node.name}', "
                                    f"input {position} '{name}')")


def fold_input_channels(weight: np.ndarray, reconstruction: np.ndarray, axis: int) -> np.ndarray:
    """W' = W A along `axis`: W'[..., j, ...] = sum_f W[..., f, ...] A[f, j]."""
    moved = np.moveaxis(weight.astype(np.float64), axis, -1)
    folded = moved @ reconstruction
    return np.moveaxis(folded, -1, axis).astype(weight.dtype)
