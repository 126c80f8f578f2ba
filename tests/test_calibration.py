"""In-graph statistics taps against NumPy statistics of the reference evaluator's tensors.

    x [N,3,6,6] -> Conv(8) -> Relu -> Conv(5) -> Transpose(0,2,3,1) -> MatMul(5x4) -> Relu
                                                                  \\-> Reshape [N,-1] -> Gemm(7)
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from onnx_spectral.analysis import analyze
from onnx_spectral.calibration.collect import calibrate
from onnx_spectral.calibration.instrument import instrument


def _model() -> onnx.ModelProto:
    rng = np.random.default_rng(3)

    def weight(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.normal(size=shape).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"]),
        helper.make_node("Transpose", ["c2"], ["t2"], perm=[0, 2, 3, 1]),
        helper.make_node("MatMul", ["t2", "w3"], ["m3"]),
        helper.make_node("Relu", ["m3"], ["y1"]),
        helper.make_node("Reshape", ["t2", "flat"], ["f2"]),
        helper.make_node("Gemm", ["f2", "w4"], ["y2"], transB=1),
    ]
    initializers = [
        weight("w1", 8, 3, 3, 3), weight("w2", 5, 8, 3, 3), weight("w3", 5, 4),
        weight("w4", 7, 5 * 4 * 4),
        numpy_helper.from_array(np.array([-1, 80], dtype=np.int64), "flat"),
    ]
    graph = helper.make_graph(
        nodes, "taps", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])],
        [helper.make_tensor_value_info("y1", TensorProto.FLOAT, ["N", 4, 4, 4]),
         helper.make_tensor_value_info("y2", TensorProto.FLOAT, ["N", 7])],
        initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _numpy_statistics(tensor: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray, int]:
    rows = np.moveaxis(tensor.astype(np.float64), axis, -1).reshape(-1, tensor.shape[axis])
    return rows.T @ rows, rows.sum(axis=0), rows.shape[0]


@pytest.mark.parametrize("batch", [1, 3, 4, 10])
def test_taps_equal_numpy_statistics_of_reference_intermediates(batch: int) -> None:
    model = _model()
    analysis = analyze(model)
    taps = analysis.taps
    assert {tap.tensor for tap in taps} == {"r1", "t2"}  # r1 feeds Conv w2; t2 feeds both sinks
    samples = np.random.default_rng(0).normal(size=(10, 3, 6, 6)).astype(np.float32)
    batches = [{"x": samples[i:i + batch]} for i in range(0, 10, batch)]
    statistics = calibrate(instrument(analysis.graph, taps), batches, "cpu")

    intermediates = ReferenceEvaluator(model).run(None, {"x": samples}, intermediate=True)
    assert statistics.samples == 10
    for tap in taps:
        gram, total, count = _numpy_statistics(intermediates[tap.tensor], tap.axis)
        measured = statistics[tap.tensor]
        assert measured.count == count
        np.testing.assert_allclose(measured.gram, gram, rtol=2e-5, atol=1e-3)
        np.testing.assert_allclose(measured.total, total, rtol=2e-5, atol=1e-3)
        np.testing.assert_allclose(measured.sigma, gram / count, rtol=2e-5, atol=1e-5)


def test_shards_merge_to_one_run() -> None:
    analysis = analyze(_model())
    instrumented = instrument(analysis.graph, analysis.taps)
    samples = np.random.default_rng(1).normal(size=(12, 3, 6, 6)).astype(np.float32)
    whole = calibrate(instrumented, [{"x": samples}], "cpu")
    first = calibrate(instrumented, [{"x": samples[:5]}], "cpu")
    second = calibrate(instrumented, [{"x": samples[5:]}], "cpu")
    for tensor, stats in whole.taps.items():
        merged = first[tensor].merged(second[tensor])
        assert merged.count == stats.count
        np.testing.assert_allclose(merged.gram, stats.gram, rtol=1e-5, atol=1e-3)
        np.testing.assert_allclose(merged.mean, stats.mean, rtol=1e-5, atol=1e-5)


def test_instrumented_model_only_returns_square_statistics() -> None:
    analysis = analyze(_model())
    instrumented = instrument(analysis.graph, analysis.taps)
    onnx.checker.check_model(instrumented.model)
    dims = {output.name: [d.dim_value for d in output.type.tensor_type.shape.dim]
            for output in instrumented.model.graph.output}
    for tap, names in zip(analysis.taps, instrumented.taps, strict=True):
        assert [dims[block.name] for block in names.blocks] == [[tap.channels, tap.channels]]
        assert dims[names.total] == [tap.channels]
    assert len(dims) == 3 * len(analysis.taps)
