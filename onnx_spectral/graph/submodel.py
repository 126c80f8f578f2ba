"""Sub-models: the nodes a set of tensors depends on, and a model computing only those tensors."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import onnx
from onnx import TensorProto, helper

from onnx_spectral.graph.subgraphs import outer_scope_names


def _reads(node: onnx.NodeProto) -> tuple[str, ...]:
    """The tensors `node` reads: its inputs and the outer-scope names its subgraphs read."""
    return (*node.input, *outer_scope_names(node))


def needed_nodes(nodes: Sequence[onnx.NodeProto], outputs: Iterable[str]) -> list[onnx.NodeProto]:
    """The nodes `outputs` depend on (through inputs and subgraph reads), in their order."""
    producer = {name: index for index, node in enumerate(nodes) for name in node.output}
    wanted: set[int] = set()
    stack = [producer[name] for name in outputs if name in producer]
    while stack:
        index = stack.pop()
        if index in wanted:
            continue
        wanted.add(index)
        stack.extend(producer[name] for name in _reads(nodes[index]) if name in producer)
    return [node for index, node in enumerate(nodes) if index in wanted]


def submodel(model: onnx.ModelProto, outputs: Sequence[str]) -> onnx.ModelProto:
    """`model` computing only `outputs` (float tensors), with only the nodes they need."""
    nodes = needed_nodes(list(model.graph.node), outputs)
    used = {name for node in nodes for name in _reads(node)}
    graph = helper.make_graph(
        nodes, model.graph.name,
        [value for value in model.graph.input if value.name in used or value.name in outputs],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs],
        [tensor for tensor in model.graph.initializer if tensor.name in used])
    sub = helper.make_model(graph, opset_imports=list(model.opset_import))
    sub.ir_version = model.ir_version
    return sub
