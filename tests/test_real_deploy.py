"""Compressed real models in edge runtimes: the MNIST CNN at --flops 0.07, float and
`--quantize int8`, in OpenVINO and in the ORT format, against ONNX Runtime; the int8 model's
accuracy within 0.2 points of the float compressed model's. CREPE tiny int8 (BatchNormalization
after each activation) in OpenVINO."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models import crepe, mnist
from onnx_spectral import compress
from onnx_spectral.graph import atomic
from tools.bench_deploy import openvino_runner, ort_runner, run_batched, to_ort_format

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The MNIST CNN compressed to 7% of its MACs, as float and as int8 files."""
    folder = tmp_path_factory.mktemp("deploy")
    train, _ = mnist.mnist_images("train")
    paths = {}
    for quantize in ("none", "int8"):
        model, report = compress(mnist.digit_cnn_onnx(), {"input": mnist.preprocess(train[:1200])},
                                 flops=0.07, calib_samples=1000, verify_samples=200,
                                 provider="cpu", quantize=quantize)
        assert report.cost_after.macs <= 0.07 * report.cost_before.macs
        paths[quantize] = folder / f"mnist_{quantize}.onnx"
        atomic.save_model(model, paths[quantize])
    return paths


@pytest.fixture(scope="module")
def test_set() -> tuple[np.ndarray, np.ndarray]:
    images, labels = mnist.mnist_images("test")
    return mnist.preprocess(images), labels


def test_int8_accuracy_within_two_tenths_of_a_point(models: dict[str, Path],
                                                     test_set: tuple[np.ndarray, np.ndarray]
                                                     ) -> None:
    images, labels = test_set
    accuracy = {key: mnist.accuracy(run_batched(ort_runner(path, 2), images, 500), labels)
                for key, path in models.items()}
    print(f"MNIST --flops 0.07 accuracy: float {accuracy['none']:.4f}, "
          f"int8 {accuracy['int8']:.4f}")
    assert abs(accuracy["int8"] - accuracy["none"]) <= 0.002
    assert models["int8"].stat().st_size < models["none"].stat().st_size / 2


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_openvino_gives_onnx_runtimes_outputs(models: dict[str, Path],
                                              test_set: tuple[np.ndarray, np.ndarray],
                                              quantize: str) -> None:
    pytest.importorskip("openvino")
    images, _ = test_set
    images = images[:1000]
    expected = run_batched(ort_runner(models[quantize], 2), images, 100)
    got = run_batched(openvino_runner(models[quantize], 2), images, 100)
    agree = float(np.mean(got.argmax(1) == expected.argmax(1)))
    scale = float(np.max(np.abs(expected)))
    difference = float(np.max(np.abs(got - expected)))
    print(f"OpenVINO vs ONNX Runtime ({quantize}): max |diff| {difference:.3g} of {scale:.3g}, "
          f"top-1 agreement {agree:.4f}")
    assert difference <= (1e-4 if quantize == "none" else 0.05) * scale
    assert agree >= (1.0 if quantize == "none" else 0.998)


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_ort_format_runs_the_compressed_model(models: dict[str, Path],
                                              test_set: tuple[np.ndarray, np.ndarray],
                                              quantize: str, tmp_path: Path) -> None:
    images, _ = test_set
    images = images[:1000]
    converted = to_ort_format(models[quantize], tmp_path)
    expected = run_batched(ort_runner(models[quantize], 2), images, 100)
    got = run_batched(ort_runner(converted, 2), images, 100)
    np.testing.assert_allclose(got, expected, rtol=1e-4,
                               atol=1e-4 * float(np.max(np.abs(expected))))


def test_openvino_runs_int8_crepe(tmp_path: Path) -> None:
    """Quantized BatchNormalization weights made OpenVINO refuse this model; they stay float."""
    pytest.importorskip("openvino")
    frames, _ = crepe.make_tones(400, seed=11)
    model, _ = compress(crepe.crepe_onnx("tiny"), {"frames": frames}, flops=0.5,
                        calib_samples=300, verify_samples=100, provider="cpu", quantize="int8")
    path = tmp_path / "crepe_int8.onnx"
    atomic.save_model(model, path)
    test, _ = crepe.make_tones(64, seed=12)
    expected = run_batched(ort_runner(path, 2), test, 32)
    got = run_batched(openvino_runner(path, 2), test, 32)
    assert float(np.max(np.abs(got - expected))) <= 0.05
    assert float(np.mean(got.argmax(1) == expected.argmax(1))) >= 0.95
