"""Sub-models keep what If/Loop bodies read from the outer scope."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from onnx_spectral.graph.submodel import needed_nodes, submodel


def _if_reading_outer_scope() -> onnx.ModelProto:
    """x [2] -> Scale 'scale' (x * 3) -> If 'if' (then: s + k, else: s - k; k = [1, 2] and
    s read from the outer scope) -> Relu 'relu' -> z."""
    def branch(op: str, out: str) -> onnx.GraphProto:
        return helper.make_graph([helper.make_node(op, ["s", "k"], [out])], out, [],
                                 [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)])

    nodes = [helper.make_node("Mul", ["x", "three"], ["s"], name="scale"),
             helper.make_node("If", ["c"], ["y"], name="if", then_branch=branch("Add", "t"),
                              else_branch=branch("Sub", "e")),
             helper.make_node("Relu", ["y"], ["z"], name="relu")]
    constants = [numpy_helper.from_array(np.array([1, 2], np.float32), "k"),
                 numpy_helper.from_array(np.array(3, np.float32), "three"),
                 numpy_helper.from_array(np.array(True), "c")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [2])],
                              [helper.make_tensor_value_info("z", 1, [2])], constants)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def test_needed_nodes_follow_subgraph_reads() -> None:
    model = _if_reading_outer_scope()
    assert [node.name for node in needed_nodes(list(model.graph.node), ["y"])] == ["scale", "if"]


def test_submodel_keeps_initializers_read_inside_subgraphs() -> None:
    sub = submodel(_if_reading_outer_scope(), ["y"])
    assert sorted(tensor.name for tensor in sub.graph.initializer) == ["c", "k", "three"]
    session = ort.InferenceSession(sub.SerializeToString(), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"x": np.array([1.0, -1.0], np.float32)})
    np.testing.assert_array_equal(y, [4.0, -1.0])  # 3x + k
