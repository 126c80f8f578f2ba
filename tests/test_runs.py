"""Models whose inputs share no sample axis are fed runs: a scalar input (a sample rate), a
recurrent state with its batch on axis 1. Each feed dict is one sample, never split or joined."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_spectral import compress
from onnx_spectral.calibration.sources import (
    InputSpec,
    batching_problem,
    fixed_batch_size,
    model_input_specs,
    open_calibration,
)
from onnx_spectral.errors import DataError
from onnx_spectral.graph.executor import Run, batch_samples, sample_range

HIDDEN = 16


def _mlp_with_state() -> onnx.ModelProto:
    """x [N, 6] -> Gemm (16) -> Relu -> Gemm (6) -> + ReduceSum(state [2, N, 6], axis 0) * scale
    (a scalar input, the graph's first) -> y [N, 6]."""
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
               for name, shape in (("w1", (6, HIDDEN)), ("b1", (HIDDEN,)), ("w2", (HIDDEN, 6)),
                                   ("b2", (6,)))]
    axes = numpy_helper.from_array(np.array([0], np.int64), "axes")
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="up"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Gemm", ["r", "w2", "b2"], ["z"], name="down"),
        helper.make_node("ReduceSum", ["state", "axes"], ["s"], name="sum_state", keepdims=0),
        helper.make_node("Add", ["z", "s"], ["t"], name="add_state"),
        helper.make_node("Mul", ["t", "scale"], ["y"], name="scale_by"),
    ]
    graph = helper.make_graph(
        nodes, "runs",
        [helper.make_tensor_value_info("scale", TensorProto.FLOAT, []),  # first: no axis 0
         helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6]),
         helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "N", 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6])],
        [*weights, axes])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _feeds(count: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """One run each: a sample of x, its state, and the scalar."""
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((1, 6)).astype(np.float32),
             "state": rng.standard_normal((2, 1, 6)).astype(np.float32),
             "scale": np.array(0.5, np.float32)} for _ in range(count)]


def test_inputs_without_a_common_sample_axis_are_runs() -> None:
    specs = model_input_specs(_mlp_with_state())
    assert batching_problem(specs) == "input 'scale' is a scalar"
    assert fixed_batch_size(specs) is None
    without_scalar = [spec for spec in specs if spec.name != "scale"]
    assert batching_problem(without_scalar) == ("input 'state' has a fixed axis 0 of 2 where "
                                                "input 'x' leaves axis 0 open")
    assert batching_problem([spec for spec in specs if spec.name == "x"]) is None


def test_a_run_stream_yields_each_feed_dict_whole() -> None:
    model = _mlp_with_state()
    feeds = _feeds(5)
    stream = open_calibration(feeds, model_input_specs(model))
    assert stream.known_length == 5
    first = stream.peek(3)
    assert isinstance(first, Run) and first["state"].shape == (2, 1, 6)
    batches = list(stream.take(4, batch_size=8))
    assert len(batches) == 4 and all(isinstance(batch, Run) for batch in batches)
    assert [batch_samples(batch) for batch in batches] == [1, 1, 1, 1]
    np.testing.assert_array_equal(batches[2]["x"], feeds[2]["x"])
    assert batches[0]["scale"].shape == ()
    assert sample_range(batches[0], 0, 1) is batches[0]
    with pytest.raises(ValueError, match="one sample"):
        sample_range(batches[0], 1, 2)


def test_a_run_is_checked_on_every_fixed_dim(tmp_path: Path) -> None:
    specs = model_input_specs(_mlp_with_state())
    wrong = _feeds(1)[0]
    wrong["state"] = np.zeros((3, 1, 6), np.float32)
    with pytest.raises(DataError, match="feed dict 0: input 'state' axis 0 has size 3, expected 2"):
        open_calibration([wrong], specs)
    files = tmp_path / "runs"
    files.mkdir()
    for index, feed in enumerate(_feeds(3)):
        np.savez(files / f"{index}.npz", **feed)
    stream = open_calibration(str(files), specs)
    assert stream.known_length == 3
    assert all(isinstance(batch, Run) for batch in stream.take(3, 2))


def test_random_runs_need_every_dim_fixed() -> None:
    with pytest.raises(DataError, match="input 'x' axis 0 is dynamic"):
        open_calibration("random", model_input_specs(_mlp_with_state()))
    fixed = [InputSpec("rate", np.dtype(np.int64), ()),
             InputSpec("audio", np.dtype(np.float32), (2, 3))]
    with pytest.warns(UserWarning, match="RANDOM"):
        stream = open_calibration("random", fixed)
    runs = list(stream.take(2, 8))
    assert [run["rate"].shape for run in runs] == [(), ()]
    assert [run["audio"].shape for run in runs] == [(2, 3), (2, 3)]


def test_a_model_fed_runs_compresses_and_keeps_its_outputs() -> None:
    model = _mlp_with_state()
    feeds = _feeds(48)
    compressed, report = compress(model, feeds, ratio=0.5, calib_samples=40, verify_samples=8,
                                  provider="cpu")
    onnx.checker.check_model(compressed)
    assert report.calibration_samples == 40
    assert any("each feed dict is one run" in note and "'scale' is a scalar" in note
               for note in report.notes)
    up = next(init for init in compressed.graph.initializer if init.name.startswith("w1"))
    assert list(up.dims) == [6, HIDDEN // 2]
    session = ort.InferenceSession(compressed.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    reference = ort.InferenceSession(model.SerializeToString(),
                                     providers=["CPUExecutionProvider"])
    batch = {"x": np.ones((3, 6), np.float32), "state": np.ones((2, 3, 6), np.float32),
             "scale": np.array(2.0, np.float32)}
    pruned, = session.run(None, batch)
    original, = reference.run(None, batch)
    assert pruned.shape == original.shape == (3, 6)
