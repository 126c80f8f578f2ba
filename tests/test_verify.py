"""Tests of onnx_spectral.verify: held-out agreement for outputs of every kind."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnx_spectral.verify import compare_models


def _model(scale: float) -> onnx.ModelProto:
    """x [N, 3] -> y = scale * x; a scalar mean(y) (rank 0); y > 0 as strings and as bools."""
    nodes = [
        helper.make_node("Mul", ["x", "scale"], ["y"]),
        helper.make_node("ReduceMean", ["y"], ["mean"], keepdims=0),
        helper.make_node("Greater", ["y", "zero"], ["positive"]),
        helper.make_node("Cast", ["positive"], ["label"], to=TensorProto.STRING),
    ]
    graph = helper.make_graph(
        nodes, "kinds", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3]),
         helper.make_tensor_value_info("mean", TensorProto.FLOAT, []),
         helper.make_tensor_value_info("positive", TensorProto.BOOL, ["N", 3]),
         helper.make_tensor_value_info("label", TensorProto.STRING, ["N", 3])],
        [numpy_helper.from_array(np.array(scale, dtype=np.float32), "scale"),
         numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_scalar_bool_and_string_outputs_are_compared() -> None:
    batches = [{"x": np.array([[1.0, -2.0, 3.0], [-1.0, 0.5, 2.0]], dtype=np.float32)},
               {"x": np.array([[4.0, 1.0, -3.0]], dtype=np.float32)}]
    same = compare_models(_model(1.0), _model(1.0), batches, "cpu")
    assert same.samples == 3
    assert [(o.name, o.relative_error, o.cosine) for o in same.outputs] == [
        ("y", 0.0, 1.0), ("mean", 0.0, 1.0), ("positive", 0.0, 1.0), ("label", 0.0, 1.0)]
    flipped = {o.name: o for o in compare_models(_model(1.0), _model(-1.0), batches,
                                                 "cpu").outputs}
    np.testing.assert_allclose(flipped["y"].relative_error, 2.0)
    np.testing.assert_allclose(flipped["mean"].cosine, -1.0)  # one value per batch
    assert flipped["label"].cosine == 0.0 and flipped["label"].relative_error == 1.0
