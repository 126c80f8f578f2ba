"""Real models and data fetched by ``models/``: exports, data, and reference accuracies."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest

from models import cache, crepe, mnist
from models.runtime import run_onnx

pytestmark = pytest.mark.real

MNIST_REFERENCE_ACCURACY = 0.9906
CREPE_TONES = 500


@pytest.fixture(scope="module")
def mnist_test() -> tuple[np.ndarray, np.ndarray]:
    return mnist.mnist_images("test")


@pytest.fixture(scope="module")
def tones() -> tuple[np.ndarray, np.ndarray]:
    return crepe.make_tones(CREPE_TONES, seed=0)


def test_mnist_data_shapes(mnist_test: tuple[np.ndarray, np.ndarray]) -> None:
    train_images, train_labels = mnist.mnist_images("train")
    test_images, test_labels = mnist_test
    assert train_images.shape == (60000, 28, 28) and train_images.dtype == np.uint8
    assert test_images.shape == (10000, 28, 28) and test_images.dtype == np.uint8
    assert train_labels.shape == (60000,) and test_labels.dtype == np.int64
    assert set(np.unique(test_labels)) == set(range(10))
    inputs = mnist.preprocess(test_images[:4])
    assert inputs.shape == (4, 1, 28, 28) and inputs.dtype == np.float32


def test_mnist_cnn_reference_accuracy(mnist_test: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = mnist_test
    logits = run_onnx(mnist.digit_cnn_onnx(), mnist.preprocess(images), batch_size=500)
    assert logits.shape == (10000, 10)
    assert mnist.accuracy(logits, labels) == pytest.approx(MNIST_REFERENCE_ACCURACY, abs=0.002)


@pytest.mark.parametrize("capacity", ["tiny", "full"])
def test_crepe_raw_pitch_accuracy(
    capacity: crepe.Capacity, tones: tuple[np.ndarray, np.ndarray]
) -> None:
    frames, f0 = tones
    probabilities = run_onnx(crepe.crepe_onnx(capacity), frames, batch_size=100)
    assert probabilities.shape == (CREPE_TONES, 360)
    metrics = crepe.pitch_metrics(probabilities, f0)
    assert metrics.raw_pitch_accuracy >= 0.95
    assert metrics.median_cents_error < 20.0


def test_make_tones_deterministic_and_in_range() -> None:
    frames, f0 = crepe.make_tones(64, seed=3)
    again_frames, again_f0 = crepe.make_tones(64, seed=3)
    other_frames, _ = crepe.make_tones(64, seed=4)
    np.testing.assert_array_equal(frames, again_frames)
    np.testing.assert_array_equal(f0, again_f0)
    assert not np.array_equal(frames, other_frames)
    assert frames.shape == (64, 1024) and frames.dtype == np.float32
    assert f0.shape == (64,) and f0.dtype == np.float64
    assert np.all((f0 >= 50.0) & (f0 <= 1800.0))
    np.testing.assert_allclose(frames.mean(axis=1), 0.0, atol=1e-5)
    np.testing.assert_allclose(frames.std(axis=1, ddof=1), 1.0, atol=1e-4)


def test_pitch_metrics_on_exact_bins() -> None:
    bins = np.array([10, 100, 200])
    probabilities = np.zeros((3, 360))
    probabilities[np.arange(3), bins] = 0.9
    probabilities[np.arange(3), bins + 1] = 0.9
    metrics = crepe.pitch_metrics(probabilities, crepe.bin_to_hz(bins + 0.5))
    assert metrics.raw_pitch_accuracy == 1.0
    assert metrics.median_cents_error == pytest.approx(0.0, abs=1e-9)
    assert crepe.bin_to_hz(0) == pytest.approx(31.70, abs=0.01)


@pytest.mark.parametrize(
    ("export", "names", "shape"),
    [
        (mnist.digit_cnn_onnx, ("input", "logits"), (1, 28, 28)),
        (lambda: crepe.crepe_onnx("tiny"), ("frames", "probabilities"), (1024,)),
        (lambda: crepe.crepe_onnx("full"), ("frames", "probabilities"), (1024,)),
    ],
    ids=["digit_cnn", "crepe_tiny", "crepe_full"],
)
def test_export_names_and_dynamic_batch(
    export: Callable[[], Path], names: tuple[str, str], shape: tuple[int, ...]
) -> None:
    path = export()
    graph = onnx.load(path).graph
    assert [value.name for value in graph.input] == [names[0]]
    assert [value.name for value in graph.output] == [names[1]]
    for value in (graph.input[0], graph.output[0]):
        assert value.type.tensor_type.shape.dim[0].dim_param
    for batch in (1, 3):
        inputs = np.random.default_rng(0).standard_normal((batch, *shape)).astype(np.float32)
        assert run_onnx(path, inputs).shape[0] == batch


def test_fetch_package_is_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    first = cache.fetch_package("digit-recognizer-py", "0.1.0")

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("fetch_package ran pip for a cached package")

    monkeypatch.setattr(subprocess, "run", no_network)
    assert cache.fetch_package("digit-recognizer-py", "0.1.0") == first
    assert (first / "digit_recognizer" / "models" / "handwriting_model.pth").is_file()


def test_cache_dir_follows_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "cache"))
    assert cache.cache_dir() == tmp_path / "cache"
    assert cache.cache_dir().is_dir()
