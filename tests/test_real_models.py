"""Acceptance on real models: half the channels of every prunable group, no fine-tuning.

MNIST digit CNN calibrated on 1,000 training images, scored on the full 10,000-image test set;
CREPE full calibrated on 2,000 generated tones, scored on 2,000 fresh tones. The L1-norm
baseline (same widths, channels dropped without reconstruction) runs beside each.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from models import crepe, mnist
from models.runtime import run_onnx
from onnx_spectral import compress

pytestmark = pytest.mark.real

L1_BASELINE = {"selection": "l1", "reconstruct": False}


def _pruned_widths(report: object) -> dict[str, tuple[int, int]]:
    return {group.producers[0]: (group.channels, group.kept)
            for group in report.groups if not group.frozen}  # type: ignore[attr-defined]


def test_mnist_digit_cnn_at_half_width() -> None:
    path = mnist.digit_cnn_onnx()
    train_images, _ = mnist.mnist_images("train")
    test_images, test_labels = mnist.mnist_images("test")
    calibration = {"input": mnist.preprocess(train_images[:1200])}  # 1,000 + 200 held out
    test_inputs = mnist.preprocess(test_images)

    model, report = compress(path, calibration, ratio=0.5, calib_samples=1000,
                             verify_samples=200, provider="cpu")
    baseline, _ = compress(path, calibration, ratio=0.5, provider="cpu", **L1_BASELINE)
    accuracy = mnist.accuracy(run_onnx(model, test_inputs), test_labels)
    baseline_accuracy = mnist.accuracy(run_onnx(baseline, test_inputs), test_labels)
    print(f"MNIST ratio 0.5: spectral {accuracy:.4f}, L1 without reconstruction "
          f"{baseline_accuracy:.4f}")

    assert report.calibration_samples == 1000
    widths = _pruned_widths(report)
    assert len(widths) == 4  # three convs and the hidden fully connected layer
    assert all(after == math.ceil(before / 2) for before, after in widths.values())
    assert report.cost_after.params < 0.3 * report.cost_before.params
    assert accuracy >= 0.988
    assert baseline_accuracy < accuracy


def test_crepe_full_at_half_width() -> None:
    path = crepe.crepe_onnx("full")
    frames, _ = crepe.make_tones(2200, seed=11)  # 2,000 calibration + 200 held out
    test_frames, test_f0 = crepe.make_tones(2000, seed=12)

    model, report = compress(path, {"frames": frames}, ratio=0.5, calib_samples=2000,
                             verify_samples=200, provider="cpu")
    baseline, _ = compress(path, {"frames": frames}, ratio=0.5, provider="cpu", **L1_BASELINE)
    metrics = crepe.pitch_metrics(run_onnx(model, test_frames, batch_size=250), test_f0)
    baseline_metrics = crepe.pitch_metrics(run_onnx(baseline, test_frames, batch_size=250),
                                           test_f0)
    print(f"CREPE full ratio 0.5: spectral {metrics}, L1 without reconstruction "
          f"{baseline_metrics}; stage seconds {dict(report.seconds)}")

    widths = _pruned_widths(report)
    assert len(widths) == 6  # all six convs
    assert all(after == math.ceil(before / 2) for before, after in widths.values())
    assert metrics.raw_pitch_accuracy >= 0.88
    assert baseline_metrics.raw_pitch_accuracy < metrics.raw_pitch_accuracy
    assert np.isfinite(metrics.median_cents_error)
