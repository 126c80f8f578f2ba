"""Edge runtimes on tiny compressed models: OpenVINO and the ORT format (ONNX Runtime's mobile
format) give the outputs ONNX Runtime gives, for the float and the int8 model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from onnx_spectral import compress
from onnx_spectral.graph import atomic
from tests import graphs
from tools.bench_deploy import openvino_runner, ort_runner, runner, to_ort_format

FAST = {"calib_samples": 48, "verify_samples": 16, "provider": "cpu", "ratio": 0.5}


def _compressed(tmp_path: Path, original: onnx.ModelProto | None = None, **extra: object
                ) -> tuple[Path, np.ndarray]:
    """`original` (default: a residual block) compressed and written to tmp_path, and 8 fresh
    inputs."""
    rng = np.random.default_rng(0)
    data = {"x": rng.standard_normal((64, 3, 8, 8)).astype(np.float32)}
    model, _ = compress(original or graphs.residual_block(), data, **FAST,
                        **extra)  # type: ignore[arg-type]
    path = tmp_path / "model.onnx"
    atomic.save_model(model, path)
    return path, rng.standard_normal((8, 3, 8, 8)).astype(np.float32)


@pytest.mark.parametrize("quantize", ["none", "int8"])
@pytest.mark.parametrize("graph", ["residual", "relu_batchnorm"])
def test_openvino_matches_onnx_runtime(tmp_path: Path, quantize: str, graph: str) -> None:
    """Also a BatchNormalization after the activation (as in CREPE), which the int8 model keeps
    in float (tests/test_real_deploy.py has the CREPE model OpenVINO refused otherwise)."""
    pytest.importorskip("openvino")
    model = (graphs.residual_block() if graph == "residual"
             else graphs.conv_sandwich(graphs.relu_batchnorm))
    path, x = _compressed(tmp_path, model, quantize=quantize)
    expected = ort_runner(path, threads=1)(x)
    got = openvino_runner(path, threads=1)(x)
    assert got.shape == expected.shape
    scale = float(np.max(np.abs(expected)))
    # int8: OpenVINO may round a requantization step differently from ONNX Runtime
    tolerance = 1e-5 if quantize == "none" else 0.05
    assert float(np.max(np.abs(got - expected))) <= tolerance * scale


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_ort_format_runs_like_the_onnx_model(tmp_path: Path, quantize: str) -> None:
    path, x = _compressed(tmp_path, quantize=quantize)
    converted = to_ort_format(path, tmp_path / "ort")
    assert converted.suffix == ".ort" and converted.read_bytes()[4:8] == b"ORTM"
    assert list((tmp_path / "ort").glob("*.config"))  # the operators a minimal build needs
    expected = ort_runner(path, threads=1)(x)
    np.testing.assert_allclose(ort_runner(converted, threads=1)(x), expected,
                               rtol=1e-5, atol=1e-5 * float(np.max(np.abs(expected))))


def test_unknown_runtime_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save_model(graphs.residual_block(), str(path))
    with pytest.raises(ValueError, match="accepted: onnxruntime, ort-format, openvino"):
        runner("tflite", path, 1, tmp_path)
