"""Reconstruction layers: linear layers whose outputs cannot be pruned, computed from fewer.

A Conv, Gemm or MatMul whose output group is frozen (its outputs reach a LayerNorm, a reduction
over the channels, a graph output, an op without a handler) keeps all its ``C`` outputs. When it
has more input features ``F`` than outputs, it can instead compute ``k < C`` of them and rebuild
all ``C`` with an added linear layer: ``y ~ A y_J + c`` with ``A`` [C, k] the spectral pruning's
own reconstruction. That costs ``k (F + C)`` MACs per output position instead of ``F C``, less
whenever ``k < F C / (F + C)``.

`add_reconstruction_layers` inserts an identity layer (Gemm for rows, MatMul for rows of higher
rank, 1x1 Conv for NCHW channels) after each such producer. The identity is an ordinary sink, so
the analysis makes the producer's outputs a prunable group, calibration gathers their statistics
and the rewrite folds the reconstruction into its weights. Their group's `whole_above` makes the
width allocation keep every channel where that costs less; `fold_whole_layers` then folds such
a layer back into its producer (exactly: both are linear), so only layers that save MACs remain.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnx_spectral.analysis import Analysis, ChannelGroup
from onnx_spectral.cost import ModelCost
from onnx_spectral.graph.model import GraphIndex, attributes
from onnx_spectral.ops import linear_layer_for

ReconstructionLayers = Literal["auto", "all", "none"]
RECONSTRUCTION_LAYERS: tuple[ReconstructionLayers, ...] = ("auto", "all", "none")

AUTO_MIN_SHARE = 0.1
"""With "auto", only layers holding at least this share of the model's MACs are factorized (a
small layer saves little), and none whose outputs reach a graph output (the model's answer)."""

_PRODUCERS = frozenset({"Conv", "Gemm", "MatMul"})


@dataclass(frozen=True)
class ReconstructionLayer:
    """A layer added after a producer whose outputs cannot be pruned.

    `producer`: the producer node; `node`: the added layer; `output`: the producer's output
    tensor, now written by the added layer; `kept`: the tensor between them; `channels`: C;
    `whole_above`: kept widths above this cost more than the producer whole.
    """

    producer: str
    node: str
    output: str
    kept: str
    channels: int
    whole_above: int

    def note(self) -> str:
        return (f"{self.producer}: its {self.channels} outputs cannot be pruned; an added "
                f"reconstruction layer '{self.node}' rebuilds them from at most "
                f"{self.whole_above} kept outputs (wider, it is folded back)")


def _candidates(analysis: Analysis, cost: ModelCost, mode: ReconstructionLayers
                ) -> list[tuple[onnx.NodeProto, int, int]]:
    """Producers of frozen groups worth factorizing under `mode`: (node, C, whole_above)."""
    graph = analysis.graph
    min_share = AUTO_MIN_SHARE if mode == "auto" else 0.0
    found = []
    for group in analysis.groups:
        if group.prunable or group.parts or (
                mode == "auto" and graph.graph_outputs.intersection(group.tensors)):
            continue
        for name in group.producers:
            node = graph.nodes_by_name[name]
            features = _features(graph, node)
            share = cost.macs_by_node.get(name, 0) / max(cost.macs, 1)
            if features is None or share < min_share or cost.macs <= 0:
                continue
            whole_above = math.ceil(features * group.channels / (features + group.channels)) - 1
            if 2 * whole_above > group.channels:  # factorizing at half width saves MACs
                found.append((node, group.channels, whole_above))
    return found


def _features(graph: GraphIndex, node: onnx.NodeProto) -> int | None:
    """F, the features each output of a foldable producer reads; None for other nodes."""
    layer = linear_layer_for(node)
    if node.op_type not in _PRODUCERS or node.domain not in ("", "ai.onnx") or layer is None:
        return None
    weight = graph.input_constant(node, layer.weight_input)
    if weight is None or layer.refit_problem(node, weight) is not None:
        return None
    has_bias = len(node.input) > 2 and bool(node.input[2])
    if has_bias and (layer.bias_input(node) is None
                     or graph.input_constant(node, 2) is None):
        return None
    constants = [node.input[layer.weight_input], *node.input[2:3]]
    if any(len(graph.consumers.get(name, [])) != 1 for name in constants if name):
        return None  # a weight shared with another node cannot take the fold
    if graph.rank(node.output[0]) is None:
        return None
    return int(layer.weight_matrix(node, weight).shape[1])


def _identity_node(graph: GraphIndex, producer: onnx.NodeProto, channels: int, kept: str,
                   output: str) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    """The identity layer reading `kept` and writing `output`, and its initializers."""
    layer = linear_layer_for(producer)
    assert layer is not None
    rank = graph.rank(producer.output[0])
    assert rank is not None
    name = f"{producer.name}/reconstruction"
    dtype = graph.input_constant(producer, layer.weight_input).dtype  # type: ignore[union-attr]
    eye = np.eye(channels, dtype=dtype)
    zeros = np.zeros(channels, dtype=dtype)
    if layer.output_axis(producer) == 1 and rank > 2:
        weight = eye.reshape(channels, channels, *([1] * (rank - 2)))
        tensors = [numpy_helper.from_array(weight, f"{name}/weight"),
                   numpy_helper.from_array(zeros, f"{name}/bias")]
        op = "Conv"
    elif rank == 2 and producer.op_type == "Gemm":
        tensors = [numpy_helper.from_array(eye, f"{name}/weight"),
                   numpy_helper.from_array(zeros, f"{name}/bias")]
        op = "Gemm"
    else:  # a MatMul producer has no bias to take an offset back
        tensors = [numpy_helper.from_array(eye, f"{name}/weight")]
        op = "MatMul"
    node = helper.make_node(op, [kept, *(tensor.name for tensor in tensors)], [output], name=name)
    return node, tensors


def add_reconstruction_layers(analysis: Analysis, cost: ModelCost, mode: ReconstructionLayers,
                              reanalyze: Callable[[onnx.ModelProto], Analysis]
                              ) -> tuple[Analysis, tuple[ReconstructionLayer, ...]]:
    """`analysis` of the model with reconstruction layers after the producers of its frozen
    groups that `mode` selects ("auto": those with `AUTO_MIN_SHARE` of the MACs in `cost`, the
    model's, that reach no graph output; "all"; "none"), keeping only the layers whose
    producer then is prunable.

    `reanalyze`: the analysis of a model (with the caller's options).
    """
    if mode == "none":
        return analysis, ()
    candidates = _candidates(analysis, cost, mode)
    while candidates:
        model, layers = _with_layers(analysis.graph, candidates)
        layered = reanalyze(model)
        useful = {group.taps[0].tensor for group in layered.prunable if len(group.taps) == 1}
        if all(layer.kept in useful for layer in layers):
            return _with_whole_above(layered, layers), layers
        candidates = [candidate for candidate, layer in zip(candidates, layers, strict=True)
                      if layer.kept in useful]
    return analysis, ()


def _with_layers(graph: GraphIndex, candidates: Sequence[tuple[onnx.NodeProto, int, int]]
                 ) -> tuple[onnx.ModelProto, tuple[ReconstructionLayer, ...]]:
    """A copy of `graph.model` with an identity layer after each candidate producer."""
    model = onnx.ModelProto()
    model.CopyFrom(graph.model)
    chosen = {node.name: (channels, whole_above) for node, channels, whole_above in candidates}
    nodes: list[onnx.NodeProto] = []
    layers = []
    for node in model.graph.node:
        nodes.append(node)
        if node.name not in chosen:
            continue
        channels, whole_above = chosen[node.name]
        output = node.output[0]
        kept = f"{output}/kept"
        added, tensors = _identity_node(graph, graph.nodes_by_name[node.name], channels, kept,
                                        output)
        node.output[0] = kept
        nodes.append(added)
        model.graph.initializer.extend(tensors)
        layers.append(ReconstructionLayer(node.name, added.name, output, kept, channels,
                                          whole_above))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model, tuple(layers)


def _with_whole_above(analysis: Analysis, layers: Sequence[ReconstructionLayer]) -> Analysis:
    """`analysis` with `whole_above` set on the groups the layers read."""
    limits = {layer.kept: layer.whole_above for layer in layers}

    def limited(group: ChannelGroup) -> ChannelGroup:
        tensors = [tap.tensor for tap in group.taps if tap.tensor in limits]
        return replace(group, whole_above=limits[tensors[0]]) if tensors else group

    return replace(analysis, groups=tuple(limited(group) for group in analysis.groups))


def fold_whole_layers(model: onnx.ModelProto, layers: Sequence[ReconstructionLayer]
                      ) -> onnx.ModelProto:
    """`model` with each reconstruction layer that still reads all its producer's channels
    folded into the producer (W <- M W, b <- M b + d for the layer's ``z = M y + d``)."""
    if not layers:
        return model
    graph = GraphIndex(model)
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    values: dict[str, np.ndarray] = {}
    dropped: set[str] = set()
    renamed: dict[str, str] = {}
    between: set[str] = set()
    for layer in layers:
        added = graph.nodes_by_name.get(layer.node)
        producer = graph.nodes_by_name.get(layer.producer)
        if added is None or producer is None:
            continue
        mixing = _layer_matrix(graph, added)
        if mixing.shape[1] != layer.channels:
            continue  # the layer rebuilds pruned outputs: it stays
        producer_layer = linear_layer_for(producer)
        assert producer_layer is not None
        weight = graph.input_constant(producer, producer_layer.weight_input)
        assert weight is not None
        matrix = producer_layer.weight_matrix(producer, weight).astype(np.float64)
        values[producer.input[producer_layer.weight_input]] = producer_layer.weight_from_matrix(
            producer, mixing @ matrix, weight).astype(weight.dtype)
        offset = graph.input_constant(added, 2)
        bias = graph.input_constant(producer, 2)
        if offset is not None or bias is not None:
            total = (np.zeros(layer.channels) if offset is None else offset.astype(np.float64))
            if bias is not None:
                total = total + mixing @ bias.astype(np.float64)
            values[f"{layer.producer}/bias"] = total.astype(weight.dtype)
        dropped.add(layer.node)
        renamed[layer.producer] = layer.output
        between.add(layer.kept)
    return _apply_folds(folded, values, dropped, renamed, between)


def _layer_matrix(graph: GraphIndex, node: onnx.NodeProto) -> np.ndarray:
    """M, the [C, k] matrix of an added layer's ``z = M y + d``."""
    layer = linear_layer_for(node)
    assert layer is not None
    weight = graph.input_constant(node, layer.weight_input)
    assert weight is not None and not attributes(node).get("transB")
    return layer.weight_matrix(node, weight).astype(np.float64)


def _apply_folds(model: onnx.ModelProto, values: dict[str, np.ndarray], dropped: set[str],
                 renamed: dict[str, str], between: set[str]) -> onnx.ModelProto:
    """Write the folded weights and biases, drop the folded layers (and the shapes of the tensors
    `between` producer and layer), and let each producer write its layer's output again."""
    graph = model.graph
    for node in graph.node:
        if node.name in renamed:
            node.output[0] = renamed[node.name]
            bias_name = f"{node.name}/bias"
            if bias_name in values:
                while len(node.input) < 3:
                    node.input.append("")
                if node.input[2]:
                    values[node.input[2]] = values.pop(bias_name)
                else:
                    node.input[2] = bias_name
    unused = {name for node in graph.node if node.name in dropped for name in node.input[1:]}
    kept_nodes = [node for node in graph.node if node.name not in dropped]
    del graph.node[:]
    graph.node.extend(kept_nodes)
    tensors = [numpy_helper.from_array(values.pop(tensor.name), tensor.name)
               if tensor.name in values else tensor
               for tensor in graph.initializer if tensor.name not in unused]
    tensors += [numpy_helper.from_array(value, name) for name, value in values.items()]
    del graph.initializer[:]
    graph.initializer.extend(tensors)
    shapes = [value for value in graph.value_info if value.name not in between]
    del graph.value_info[:]
    graph.value_info.extend(shapes)
    return model
