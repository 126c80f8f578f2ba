"""Models whose layers all sit inside the branches of one If node: prune the branch the data takes.

Some exporters put a whole network inside an `If` on an input: Silero VAD chooses its 16 kHz
or 8 kHz network by the sample rate `sr`, a scalar input. The analysis works on the main graph,
where such a model has no layer. When every Conv/Gemm/MatMul of a model lies in the branches of
one top-level If and none in the main graph, the model is pruned as the branch its first
calibration sample takes:

- `take_branch` evaluates the If's condition on that sample and returns the model with the If
  replaced by that branch's nodes (its outputs written under the If's output names, which become
  graph outputs too, so that their shapes stay);
- after compression, `TakenBranch.rewrap` puts the pruned computation back as the body of that
  branch: the needed nodes, renamed under a prefix of the If's name, reading the model's inputs
  and their weights (main-graph initializers, renamed alike) from the outer scope. The other
  branch is kept whole; weights that only the old branch read are dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from onnx_spectral.graph.shapes import Feeds, first_sample, tensor_values
from onnx_spectral.graph.subgraphs import outer_scope_names, subgraphs, used_names

LINEAR_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


@dataclass(frozen=True)
class TakenBranch:
    """The If node a model was pruned inside of, and the branch its calibration data took."""

    outer: onnx.ModelProto
    """The model as it was, with the If."""
    index: int
    """Position of the If among the main graph's nodes."""
    branch: str
    """"then_branch" or "else_branch"."""

    @property
    def node(self) -> onnx.NodeProto:
        return self.outer.graph.node[self.index]

    def note(self) -> str:
        other = "else_branch" if self.branch == "then_branch" else "then_branch"
        return (f"the model's layers are all inside If node '{self.node.name}': its "
                f"{self.branch}, which the first calibration sample takes, was pruned (and "
                f"calibrated on every sample as if it took it); its {other} is kept whole")

    def rewrap(self, pruned: onnx.ModelProto) -> onnx.ModelProto:
        """`outer` whose taken branch computes what `pruned` (the compressed `inlined` model)
        computes for the If's outputs."""
        result = onnx.ModelProto()
        result.CopyFrom(self.outer)
        node = result.graph.node[self.index]
        old_reads = set(outer_scope_names(node))
        body, weights = _body(pruned, list(node.output),
                              f"{node.name or 'if'}/{self.branch}/", _branch(node, self.branch))
        for attribute in node.attribute:
            if attribute.name == self.branch:
                attribute.g.CopyFrom(body)
        graph = result.graph
        listed = {value.name for value in graph.input}
        if any(tensor.name in listed for tensor in graph.initializer):  # IR 3: listed as inputs
            graph.input.extend(helper.make_tensor_value_info(tensor.name, tensor.data_type,
                                                             list(tensor.dims))
                               for tensor in weights)
        graph.initializer.extend(weights)
        used = used_names(graph)
        unused = {tensor.name for tensor in graph.initializer
                  if tensor.name in old_reads and tensor.name not in used}
        for values in (graph.initializer, graph.input):  # weights only the old branch read
            kept = [value for value in values if value.name not in unused]
            del values[:]
            values.extend(kept)  # type: ignore[arg-type]
        return result


def layers_only_in_if(model: onnx.ModelProto) -> int | None:
    """Position of the one top-level If whose branches hold every linear layer of a model
    whose main graph has none; None for any other model."""
    graph = model.graph
    if any(node.op_type in LINEAR_OPS for node in graph.node):
        return None
    holders = [index for index, node in enumerate(graph.node)
               if any(_has_layers(inner) for inner in subgraphs(node))]
    if len(holders) != 1 or graph.node[holders[0]].op_type != "If":
        return None
    return holders[0]


def take_branch(model: onnx.ModelProto, sample: Callable[[], Feeds]
                ) -> tuple[onnx.ModelProto, TakenBranch | None]:
    """`model` with its layer-holding If (`layers_only_in_if`) replaced by the branch that the
    first sample of the calibration data (`sample()`, called only for such a model) takes, and
    how to put it back; `model` and None for other models."""
    index = layers_only_in_if(model)
    if index is None:
        return model, None
    node = model.graph.node[index]
    feeds = first_sample(model, sample())
    condition = tensor_values(model, feeds, [node.input[0]])[node.input[0]]
    branch = "then_branch" if bool(np.asarray(condition).reshape(-1)[0]) else "else_branch"
    return _inlined(model, index, branch), TakenBranch(model, index, branch)


def _has_layers(graph: onnx.GraphProto) -> bool:
    return any(node.op_type in LINEAR_OPS or any(_has_layers(inner) for inner in subgraphs(node))
               for node in graph.node)


def _branch(node: onnx.NodeProto, name: str) -> onnx.GraphProto:
    return next(attribute.g for attribute in node.attribute if attribute.name == name)


def _inlined(model: onnx.ModelProto, index: int, branch: str) -> onnx.ModelProto:
    """A copy of `model` with the If at `index` replaced by the nodes of `branch`; the If's
    outputs are written by Identity nodes and listed as graph outputs (their shapes stay).
    Branch tensors named like a tensor of the main graph are renamed apart."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    graph = result.graph
    node = graph.node[index]
    body = _branch(node, branch)
    taken = {*(value.name for value in graph.input), *(tensor.name for tensor in graph.initializer),
             *(name for other in graph.node for name in other.output)}
    defined = [*(tensor.name for tensor in body.initializer),
               *(name for inner in body.node for name in inner.output if name)]
    renamed = {name: f"{name}__{branch}" for name in defined if name in taken}
    nodes = []
    for inner in body.node:
        copy = onnx.NodeProto()
        copy.CopyFrom(inner)
        _rename(copy, renamed)
        nodes.append(copy)
    for tensor in body.initializer:
        copy_tensor = graph.initializer.add()
        copy_tensor.CopyFrom(tensor)
        copy_tensor.name = renamed.get(tensor.name, tensor.name)
    writers = [helper.make_node("Identity", [renamed.get(inner.name, inner.name)], [name],
                                name=f"{name}_from_{branch}")
               for inner, name in zip(body.output, node.output, strict=True)]
    all_nodes = [*graph.node[:index], *nodes, *writers, *graph.node[index + 1:]]
    del graph.node[:]
    graph.node.extend(all_nodes)
    graph.value_info.extend(value for value in body.value_info if value.name not in renamed)
    declared = {value.name for value in graph.output}
    for inner_value, name in zip(body.output, node.output, strict=True):
        if name not in declared:
            value = onnx.ValueInfoProto()
            value.CopyFrom(inner_value)
            value.name = name
            graph.output.append(value)
    return result


def _body(pruned: onnx.ModelProto, outputs: list[str], prefix: str, original: onnx.GraphProto
          ) -> tuple[onnx.GraphProto, list[onnx.TensorProto]]:
    """The branch body computing `outputs` of `pruned`, and the weights it reads from the outer
    scope (as exporters write them; IR 3 allows no initializer in a branch): the nodes and
    initializers they need, every name they define prefixed; the model's inputs are read from
    the outer scope too."""
    graph = pruned.graph
    producers = {name: node for node in graph.node for name in node.output if name}
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    needed: list[onnx.NodeProto] = []
    seen: set[int] = set()
    used: set[str] = set()
    pending = list(outputs)
    while pending:
        name = pending.pop()
        if name in used:
            continue
        used.add(name)
        node = producers.get(name)
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        needed.append(node)
        pending.extend(name for name in node.input if name)
        pending.extend(outer_scope_names(node))
    order = {id(node): position for position, node in enumerate(graph.node)}
    needed.sort(key=lambda node: order[id(node)])
    renamed = {name: prefix + name for node in needed for name in node.output if name}
    renamed.update({name: prefix + name for name in used if name in initializers})
    nodes = []
    for node in needed:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.name = prefix + node.name
        _rename(copy, renamed)
        nodes.append(copy)
    tensors = []
    for name in sorted(used & initializers.keys()):
        tensor = onnx.TensorProto()
        tensor.CopyFrom(initializers[name])
        tensor.name = renamed[name]
        tensors.append(tensor)
    body_outputs = []
    for name, declared in zip(outputs, original.output, strict=True):
        value = onnx.ValueInfoProto()
        value.CopyFrom(declared)
        value.name = renamed.get(name, name)
        body_outputs.append(value)
    return helper.make_graph(nodes, original.name, [], body_outputs), tensors


def _rename(node: onnx.NodeProto, renamed: Mapping[str, str]) -> None:
    """Rename, in place, the tensors `node` reads (in its subgraphs too) and writes."""
    _rename_reads(node, renamed)
    for position, name in enumerate(node.output):
        node.output[position] = renamed.get(name, name)


def _rename_reads(node: onnx.NodeProto, renamed: Mapping[str, str]) -> None:
    """Rename, in place, the tensors `node` and its subgraphs' nodes read."""
    for position, name in enumerate(node.input):
        node.input[position] = renamed.get(name, name)
    for inner in subgraphs(node):
        for inner_node in inner.node:
            _rename_reads(inner_node, renamed)
