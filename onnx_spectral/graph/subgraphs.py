"""Tensors of a graph read from inside the subgraphs of its If/Loop/Scan nodes.

A subgraph may read any tensor of the enclosing scopes by name (an *outer-scope reference*).
Such a tensor is an implicit input of the node holding the subgraph: it must stay in the graph
under its name, and its readers include that node.
"""

from __future__ import annotations

from collections.abc import Iterator

import onnx

IMPLICIT_POSITION = -1
"""Input position recorded for a node's implicit (outer-scope) inputs in a consumer index."""


def subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    """The graphs held by the node's GRAPH and GRAPHS attributes (If branches, Loop/Scan body)."""
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def outer_scope_names(node: onnx.NodeProto) -> tuple[str, ...]:
    """Names the node's subgraphs (nested ones included) read from enclosing scopes, in order of
    first use; empty for a node without subgraphs."""
    names: list[str] = []
    for graph in subgraphs(node):
        names += _free_names(graph, frozenset())
    return tuple(dict.fromkeys(names))


def _free_names(graph: onnx.GraphProto, bound: frozenset[str]) -> list[str]:
    """Names `graph` or its nested subgraphs read that neither they nor `bound` (the names the
    enclosing subgraphs define) define: what `graph` reads from outside."""
    defined = set(bound) | {value.name for value in graph.input}
    defined |= {tensor.name for tensor in graph.initializer}
    defined |= {tensor.values.name for tensor in graph.sparse_initializer}
    free: list[str] = []
    for node in graph.node:
        free += [name for name in node.input if name and name not in defined]
        for inner in subgraphs(node):
            free += _free_names(inner, frozenset(defined))
        defined.update(name for name in node.output if name)
    free += [value.name for value in graph.output if value.name not in defined]
    return free


def used_names(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name `graph` needs: node inputs, outer-scope references of its subgraphs and
    graph outputs."""
    used = {name for node in graph.node for name in node.input if name}
    used.update(name for node in graph.node for name in outer_scope_names(node))
    used.update(value.name for value in graph.output)
    return used
