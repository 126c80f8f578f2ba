"""`--quantize int8`: the pruned model quantized by ONNX Runtime from the same calibration data,
verified and reported beside the float model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from onnx_spectral import cli, compress
from onnx_spectral.api import calibrate_statistics
from onnx_spectral.errors import OptionsError
from onnx_spectral.quantize import quantize_int8
from tests import graphs

FAST = {"calib_samples": 48, "verify_samples": 16, "provider": "cpu"}


def _data(samples: int = 64, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((samples, 3, 8, 8)).astype(np.float32)}


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"x": x})[0])


def _weight_of(model: onnx.ModelProto, node_name: str) -> tuple[np.ndarray, np.ndarray | None]:
    """The weight a Conv reads, and its DequantizeLinear scale (None when it reads a float
    initializer directly)."""
    initializers = {tensor.name: numpy_helper.to_array(tensor)
                    for tensor in model.graph.initializer}
    producers = {output: node for node in model.graph.node for output in node.output}
    [conv] = [node for node in model.graph.node if node.name == node_name]
    weight = conv.input[1]
    if weight in initializers:
        return initializers[weight], None
    dequantize = producers[weight]
    assert dequantize.op_type == "DequantizeLinear"
    return initializers[dequantize.input[0]], initializers[dequantize.input[1]]


def test_int8_model_is_qdq_with_per_channel_weights_and_close_to_the_float_model() -> None:
    data = _data()
    model, report = compress(graphs.residual_block(), data, ratio=0.5, quantize="int8", **FAST)
    ops = {node.op_type for node in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    weight, scale = _weight_of(model, "conv3")
    assert weight.dtype == np.int8 and weight.shape[0] == 4
    assert scale is not None and scale.shape == (4,)  # one scale per output channel
    float_model, float_report = compress(graphs.residual_block(), data, ratio=0.5, **FAST)
    held_out = data["x"][48:]
    reference = _run(float_model, held_out)
    error = np.linalg.norm(_run(model, held_out) - reference) / np.linalg.norm(reference)
    assert 0.0 < error < 0.05
    # the report speaks of the int8 model written, and of the float model beside it
    assert report.float_verification == float_report.verification
    assert report.verification is not None
    [output] = report.verification.outputs
    [float_output] = report.float_verification.outputs
    assert output.relative_error != float_output.relative_error
    assert abs(output.relative_error - float_output.relative_error) < 0.05
    assert list(report.sizes) == ["original", "compressed", "int8"]
    assert report.sizes["int8"] == model.ByteSize()
    assert report.sizes["compressed"] == float_model.ByteSize()
    assert report.cost_after == float_report.cost_after  # the same layers, counted on the int8
    assert "quantize" in report.seconds
    text = report.format()
    assert "(float model)" in text and "(int8 model written)" in text
    assert f"int8 {model.ByteSize():,}" in text


def test_per_tensor_scales_and_qoperator_format() -> None:
    model, _ = compress(graphs.residual_block(), _data(), ratio=0.5, quantize="int8",
                        quantize_per_channel=False, **FAST)
    _, scale = _weight_of(model, "conv3")
    assert scale is not None and scale.size == 1
    qoperator, _ = compress(graphs.residual_block(), _data(), ratio=0.5, quantize="int8",
                            quantize_format="qoperator", **FAST)
    assert "QLinearConv" in {node.op_type for node in qoperator.graph.node}


def test_excluded_nodes_stay_float() -> None:
    model, _ = compress(graphs.residual_block(), _data(), ratio=0.5, quantize="int8",
                        quantize_exclude=("conv3",), **FAST)
    weight, scale = _weight_of(model, "conv3")
    assert scale is None and weight.dtype == np.float32
    assert _weight_of(model, "conv1")[1] is not None


def test_budget_and_methods_apply_to_the_int8_model() -> None:
    for method in ("entropy", "percentile"):
        model, report = compress(graphs.residual_block(), _data(), flops=0.6, quantize="int8",
                                 quantize_method=method, **FAST)
        assert report.cost_after.macs <= 0.6 * report.cost_before.macs
        assert report.options["quantize_method"] == method
        assert np.isfinite(_run(model, _data(4, seed=1)["x"])).all()


def test_quantize_refusals_come_before_calibration(tmp_path: Path) -> None:
    with pytest.raises(OptionsError, match="--quantize-exclude names no node of the model: "
                                           "nope"):
        compress(graphs.residual_block(), _data(), quantize="int8", quantize_exclude=("nope",),
                 **FAST)
    with pytest.raises(OptionsError, match="accepted: auto, none, int8"):
        compress(graphs.residual_block(), _data(), quantize="int4", **FAST)
    saved = calibrate_statistics(graphs.residual_block(), _data(), **FAST)
    with pytest.raises(OptionsError, match="--quantize needs calibration batches"):
        compress(graphs.residual_block(), None, statistics=saved, quantize="int8", **FAST)
    with pytest.raises(Exception, match="needs calibration batches"):
        quantize_int8(graphs.residual_block(), [])


def test_cli_writes_the_int8_model_and_both_fidelities(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "in.onnx"
    onnx.save_model(graphs.residual_block(), str(model))
    np.savez(tmp_path / "d.npz", **_data())
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    assert cli.main([str(model), str(out), "--calib", str(tmp_path / "d.npz"), "--quantize",
                     "int8", "--calib-samples", "48", "--verify-samples", "16", "--provider",
                     "cpu", "--report", str(report)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out} ({out.stat().st_size:,} bytes)" in printed
    written = onnx.load(str(out))
    assert "QuantizeLinear" in {node.op_type for node in written.graph.node}
    figures = json.loads(report.read_text())
    assert figures["bytes"]["int8"] == out.stat().st_size
    assert figures["float_verification"]["outputs"][0]["name"] == "conv3"
    assert figures["options"]["quantize"] == "int8"
    assert cli.main([str(model), str(tmp_path / "o2.onnx"), "--calib", "random",
                     "--quantize", "int4"]) == 2


def test_the_int8_model_is_the_float_model_quantized_on_the_first_batches() -> None:
    """What tools/bench_deploy.py relies on: compress(quantize="int8") equals quantize_int8 of
    compress's float model on the first whole batches holding `compensation_samples`."""
    data = _data()
    options = {"ratio": 0.5, "batch_size": 8, "compensation_samples": 20, **FAST}
    written, _ = compress(graphs.residual_block(), data, quantize="int8", **options)
    float_model, _ = compress(graphs.residual_block(), data, **options)
    batches = [{"x": data["x"][start:start + 8]} for start in range(0, 24, 8)]
    direct = quantize_int8(float_model, batches)
    assert written.graph.SerializeToString() == direct.graph.SerializeToString()
    fewer = quantize_int8(float_model, batches[:2])
    assert written.graph.SerializeToString() != fewer.graph.SerializeToString()


def test_batch_normalization_stays_float() -> None:
    model, _ = compress(graphs.conv_sandwich(graphs.relu_batchnorm), _data(), ratio=0.5,
                        quantize="int8", **FAST)
    producers = {output: node.op_type for node in model.graph.node for output in node.output}
    [norm] = [node for node in model.graph.node if node.op_type == "BatchNormalization"]
    assert all(producers.get(name) != "DequantizeLinear" for name in norm.input[1:])
    assert _weight_of(model, "conv2")[1] is not None
