"""Apply channel selections: slice producers and channel-wise ops, fold reconstructions into sinks.

The rewrite works on a copy of the normalized model. Every edited constant becomes a fresh
initializer (a weight shared with another node is never changed under it); stale value_info is
dropped and shape inference rerun; the result must pass the ONNX checker, load in ONNX Runtime
and keep the original output names and shapes, or a RewriteError is raised and nothing is
returned.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import helper

from onnx_spectral.analysis import Analysis
from onnx_spectral.errors import RewriteError
from onnx_spectral.graph import external_tensors
from onnx_spectral.graph.model import GraphIndex, infer_shapes, tensor_dims
from onnx_spectral.graph.sessions import open_session
from onnx_spectral.graph.subgraphs import used_names
from onnx_spectral.ops import handler_for
from onnx_spectral.selection.affine import fold_offset
from onnx_spectral.selection.plan import GroupPlan


class _Editor:
    """Edits constants and attributes of a copy of `graph.model`, by node name."""

    def __init__(self, graph: GraphIndex) -> None:
        self.graph = graph
        self.model = onnx.ModelProto()
        self.model.CopyFrom(graph.model)
        self._nodes = {node.name: node for node in self.model.graph.node}
        self._values: dict[tuple[str, int], np.ndarray] = {}
        self._inserted: dict[str, list[onnx.NodeProto]] = {}
        """New nodes by the name of the node they go before (placed by `finish`)."""

    def input_value(self, node: onnx.NodeProto, position: int) -> np.ndarray | None:
        edited = self._values.get((node.name, position))
        return edited if edited is not None else self.graph.input_constant(node, position)

    def set_input_value(self, node: onnx.NodeProto, position: int, value: np.ndarray) -> None:
        self._values[(node.name, position)] = np.ascontiguousarray(value)

    def set_attribute(self, node: onnx.NodeProto, name: str, value: object) -> None:
        target = self._nodes[node.name]
        for attr in target.attribute:
            if attr.name == name:
                target.attribute.remove(attr)
                break
        target.attribute.append(helper.make_attribute(name, value))

    def remove_attribute(self, node: onnx.NodeProto, name: str) -> None:
        target = self._nodes[node.name]
        for attr in target.attribute:
            if attr.name == name:
                target.attribute.remove(attr)
                return

    def gather_input(self, node: onnx.NodeProto, position: int, indices: np.ndarray,
                     axis: int) -> None:
        target = self._nodes[node.name]
        name = f"{node.name}/keep_{position}"
        while name in self._nodes:
            name += "_"
        gather = helper.make_node("Gather", [target.input[position], f"{name}/indices"],
                                  [f"{name}/output"], name=name, axis=axis)
        self._nodes[name] = gather
        self._inserted.setdefault(node.name, []).append(gather)
        self.set_input_value(gather, 1, np.asarray(indices, dtype=np.int64))
        target.input[position] = gather.output[0]

    def finish(self) -> onnx.ModelProto:
        """Place the inserted nodes, write the edited constants as fresh initializers and drop
        unused ones."""
        graph = self.model.graph
        if self._inserted:
            ordered = [new for node in graph.node
                       for new in (*self._inserted.get(node.name, ()), node)]
            del graph.node[:]
            graph.node.extend(ordered)
            self._nodes = {node.name: node for node in graph.node}
            self._inserted.clear()
        taken = {init.name for init in graph.initializer}
        spill = external_tensors.is_large(self.model)
        for (node_name, position), value in self._values.items():
            node = self._nodes[node_name]
            node.input.extend([""] * (position + 1 - len(node.input)))
            name = f"{node.input[position] or 'input' + str(position)}__{node_name}"
            while name in taken:
                name += "_"
            taken.add(name)
            graph.initializer.append(external_tensors.initializer(value, name, spill))
            node.input[position] = name
        self._values.clear()  # the new tensors are in the model (or, past 2 GiB, on disk)
        used = used_names(graph)
        kept = [init for init in graph.initializer if init.name in used]
        del graph.initializer[:]
        graph.initializer.extend(kept)
        return self.model


def _apply(plan: GroupPlan, editor: _Editor) -> None:
    graph = editor.graph
    group = plan.group
    kept = np.asarray(plan.kept, dtype=np.int64)
    for member in group.members:
        node = graph.nodes_by_name[member.node]
        handler = handler_for(node.op_type, node.domain)
        assert handler is not None
        handler.slice(node, member, kept, group.channels, editor)
    for tap in group.taps:
        reconstruction = plan.reconstructions[tap.tensor]
        offset = None if plan.offsets is None else plan.offsets.get(tap.tensor)
        for sink in tap.sinks:
            node = graph.nodes_by_name[sink.node]
            handler = handler_for(node.op_type, node.domain)
            assert handler is not None
            if offset is not None:
                fold_offset(graph.nodes_by_name[sink.node], sink, offset, editor)
            handler.fold(node, sink, reconstruction, kept, editor)


def rewrite(analysis: Analysis, plans: Sequence[GroupPlan]) -> onnx.ModelProto:
    """The compressed model; raises RewriteError when it fails a safety check."""
    editor = _Editor(analysis.graph)
    for plan in plans:
        if not plan.group.prunable:
            raise RewriteError(f"group {plan.group.id} is frozen: {plan.group.frozen[0]}")
        _apply(plan, editor)
    model = editor.finish()
    try:
        model = infer_shapes(model)
        external_tensors.check_model(model, full_check=True)
    except Exception as exc:
        raise RewriteError(f"the compressed model fails the ONNX checker: {exc}") from exc
    check_interface(analysis.graph.model, model)
    return model


def check_interface(original: onnx.ModelProto, compressed: onnx.ModelProto) -> None:
    """Raise RewriteError unless `compressed` loads in ONNX Runtime with the same interface."""
    def interface(model: onnx.ModelProto) -> list[tuple[str, object]]:
        return [(value.name, tensor_dims(value)) for value in model.graph.output]

    if interface(original) != interface(compressed):
        raise RewriteError(f"the compressed model's outputs {interface(compressed)} differ from "
                           f"the original's {interface(original)}")
    try:
        open_session(compressed, "cpu")
    except Exception as exc:
        raise RewriteError(f"ONNX Runtime cannot load the compressed model: {exc}") from exc
