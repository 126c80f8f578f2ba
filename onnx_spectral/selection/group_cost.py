"""The cost model of a graph as a function of its groups' widths (see `widths.CostModel`).

Each prunable group is probed once (a Concat/Split group's shrink is charged to each of its base
parts, whose channels it carries): its handlers slice and fold as if one channel were removed,
into an editor that only records the new shapes of the constants they edit. An axis of a weight
that lost ``s`` elements shrinks by ``s`` per channel removed from that group (1 for a Conv's
channel axis, ``H*W`` for a flattened Gemm input). Parameters of an edited tensor are the
product of its axis lengths; the MACs of a linear layer (`ops.linear_layer.LinearLayer`) that
scale with its weight (all of a Conv's, Gemm's or MatMul's; an LSTM's input part) are those at
full width times the fraction of its weight's elements that remain.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from onnx_spectral.analysis import Analysis, ChannelGroup
from onnx_spectral.cost import ModelCost, model_cost
from onnx_spectral.graph.model import GraphIndex
from onnx_spectral.ops import linear_layer_for, require_handler
from onnx_spectral.selection.widths import CostModel, CostTerm


class _ShapeEditor:
    """An Editor that computes edits like the rewrite but keeps only their shapes."""

    def __init__(self, graph: GraphIndex) -> None:
        self.graph = graph
        self._values: dict[tuple[str, int], np.ndarray] = {}

    def input_value(self, node: onnx.NodeProto, position: int) -> np.ndarray | None:
        edited = self._values.get((node.name, position))
        return edited if edited is not None else self.graph.input_constant(node, position)

    def set_input_value(self, node: onnx.NodeProto, position: int, value: np.ndarray) -> None:
        self._values[(node.name, position)] = np.asarray(value)

    def set_attribute(self, node: onnx.NodeProto, name: str, value: object) -> None:
        del node, name, value  # attributes carry no cost

    def remove_attribute(self, node: onnx.NodeProto, name: str) -> None:
        del node, name  # attributes carry no cost

    def gather_input(self, node: onnx.NodeProto, position: int, indices: np.ndarray,
                     axis: int) -> None:
        del node, position, indices, axis  # a Gather of activations has no parameters

    def shapes(self) -> dict[tuple[str, int], tuple[int, ...]]:
        return {key: tuple(value.shape) for key, value in self._values.items()}


def _probe(graph: GraphIndex, group: ChannelGroup) -> dict[tuple[str, int], tuple[int, ...]]:
    """Shapes of the constants the rewrite edits when `group` drops one step of channels: its
    last channel, its last block (a head group), or the last channel of each lane."""
    editor = _ShapeEditor(graph)
    if group.lanes > 1:
        size = group.channels // group.lanes
        kept = np.flatnonzero(np.arange(group.channels) % size != size - 1)
    else:
        kept = np.arange(group.channels - group.block, dtype=np.int64)
    for member in group.members:
        node = graph.nodes_by_name[member.node]
        require_handler(node).slice(node, member, kept, group.channels, editor)
    dropping = np.eye(group.channels)[:, kept]
    for tap in group.taps:
        for sink in tap.sinks:
            node = graph.nodes_by_name[sink.node]
            require_handler(node).fold(node, sink, dropping, kept, editor)
    return editor.shapes()


@dataclass(frozen=True)
class GroupCosts:
    """The MACs and parameter cost models over `groups` (in this order)."""

    groups: tuple[ChannelGroup, ...]
    macs: CostModel
    params: CostModel


def group_costs(analysis: Analysis, cost: ModelCost | None = None,
                reference: ModelCost | None = None) -> GroupCosts:
    """Cost models of `analysis.graph.model` over its base groups (`Analysis.base_groups`).

    `cost`: the model's `model_cost` when the caller already has it. `reference`: the cost that
    budgets are fractions of, when it is not the model's at full width (reconstruction layers
    were added to it; `CostModel.reference`).
    """
    graph = analysis.graph
    groups = analysis.base_groups
    column = {group.id: index for index, group in enumerate(groups)}
    cost = cost if cost is not None else model_cost(graph.model)
    sizes = np.array([group.channels for group in groups], dtype=np.int64)
    shrink: dict[tuple[str, int], np.ndarray] = {}
    for group in analysis.prunable:
        # a Concat/Split group loses one channel per channel of each of its base parts
        columns = ([column[part] for part, _, _ in group.parts if part in column]
                   if group.parts else [column[group.id]])
        if group.channels <= group.step or not columns:
            continue
        for key, shape in _probe(graph, group).items():
            node = graph.nodes_by_name[key[0]]
            original = graph.input_constant(node, key[1])
            if original is None:  # an input the rewrite adds (an equal Split's sizes): no cost
                continue
            if key not in shrink:
                shrink[key] = np.zeros((original.ndim, len(groups)))
            if len(shape) == original.ndim:
                lost = (np.array(original.shape) - np.array(shape)) / group.step
                for column_index in columns:  # a part may repeat (a Split into equal halves)
                    shrink[key][:, column_index] += lost
    param_terms, mac_terms = [], []
    varying_params = 0
    seen: set[str] = set()
    for (node_name, position), table in shrink.items():
        node = graph.nodes_by_name[node_name]
        original = graph.input_constant(node, position)
        assert original is not None
        dims = np.array(original.shape, dtype=np.float64)
        name = node.input[position]
        if name not in seen and np.issubdtype(original.dtype, np.floating):
            seen.add(name)
            varying_params += original.size
            param_terms.append(CostTerm(1.0, dims, table))
        layer = linear_layer_for(node)
        if layer is not None and layer.weight_input == position \
                and node_name in cost.macs_by_node:
            share = layer.weight_mac_share(node, original)
            scale = cost.macs_by_node[node_name] * share / max(original.size, 1)
            mac_terms.append(CostTerm(scale, dims, table))
    mac_terms += _scaled_terms(groups, cost)
    varying_macs = sum(term.scale * float(np.prod(term.dims)) for term in mac_terms)
    blocks = np.array([group.step for group in groups], dtype=np.int64)
    return GroupCosts(
        groups=groups,
        macs=CostModel(sizes, float(cost.macs) - varying_macs, tuple(mac_terms), blocks,
                       None if reference is None else float(reference.macs)),
        params=CostModel(sizes, float(cost.params - varying_params), tuple(param_terms), blocks,
                         None if reference is None else float(reference.params)),
    )


def _scaled_terms(groups: tuple[ChannelGroup, ...], cost: ModelCost) -> list[CostTerm]:
    """MACs of weightless nodes that scale with a group's width (attention score and context
    MatMuls: one head's share per head kept)."""
    terms = []
    for column, group in enumerate(groups):
        for name in group.scaled:
            if cost.macs_by_node.get(name):
                shrink = np.zeros((1, len(groups)))
                shrink[0, column] = 1.0
                terms.append(CostTerm(cost.macs_by_node[name] / group.channels,
                                      np.array([float(group.channels)]), shrink))
    return terms
