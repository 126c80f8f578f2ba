"""Whole-model MAC budgets with the default settings on real models.

The defaults (greedy widths, sequential compensation, layer refit, theta 0.5, rho 1e-3,
automatic rounding of widths to multiples of 8 for groups of >= 64 channels) at the target
budgets, no fine-tuning: MNIST at --flops 0.07, CREPE tiny at 0.35, CREPE full at 0.25. The
asserted floors sit a little below the measured figures (docs/benchmarks.md, "Quality at MAC
budgets") to allow for other CPUs' rounding.
"""

from __future__ import annotations

import pytest

from models import crepe, mnist
from models.runtime import run_onnx
from onnx_spectral import compress

pytestmark = pytest.mark.real


def _macs_kept(report: object) -> float:
    return report.cost_after.macs / report.cost_before.macs  # type: ignore[attr-defined]


def test_mnist_at_seven_percent_of_the_macs() -> None:
    train, _ = mnist.mnist_images("train")
    test, labels = mnist.mnist_images("test")
    model, report = compress(mnist.digit_cnn_onnx(), {"input": mnist.preprocess(train[:1200])},
                             flops=0.07, calib_samples=1000, verify_samples=200,
                             provider="cpu")
    accuracy = mnist.accuracy(run_onnx(model, mnist.preprocess(test)), labels)
    print(f"MNIST --flops 0.07: accuracy {accuracy:.4f}, MACs kept {_macs_kept(report):.4f}")
    assert 0.069 <= _macs_kept(report) <= 0.07
    assert accuracy >= 0.98  # the issue asks 98.5%; measured 98.52% (98.31% before the refit's
    # ridge pulled toward the compensated weights and took ten extrapolated relaxed passes)


def _crepe_at(capacity: str, flops: float) -> tuple[crepe.PitchMetrics, float]:
    """CREPE `capacity` compressed to `flops` of its MACs with the defaults (2,000 calibration
    tones), scored on 2,000 fresh tones: (metrics, share of the MACs kept)."""
    frames, _ = crepe.make_tones(2200, seed=11)
    test, f0 = crepe.make_tones(2000, seed=12)
    model, report = compress(crepe.crepe_onnx(capacity), {"frames": frames}, flops=flops,
                             calib_samples=2000, verify_samples=200, provider="cpu")
    metrics = crepe.pitch_metrics(run_onnx(model, test, batch_size=250), f0)
    print(f"CREPE {capacity} --flops {flops}: {metrics}, MACs kept {_macs_kept(report):.4f}, "
          f"stage seconds {dict(report.seconds)}")
    return metrics, _macs_kept(report)


def test_crepe_tiny_at_35_percent_of_the_macs() -> None:
    metrics, kept = _crepe_at("tiny", 0.35)
    # widths are multiples of 8 for groups of >= 64 channels (automatic rounding): the budget
    # is met within one such step (measured 0.3160 kept)
    assert 0.30 <= kept <= 0.35
    assert metrics.raw_pitch_accuracy >= 0.90  # the target (measured 99.1%)


def test_crepe_full_at_a_quarter_of_the_macs() -> None:
    metrics, kept = _crepe_at("full", 0.25)
    assert 0.2475 <= kept <= 0.25
    assert metrics.raw_pitch_accuracy >= 0.97


def test_crepe_full_half_the_macs_lands_within_one_percent() -> None:
    frames, _ = crepe.make_tones(300, seed=11)
    _, report = compress(crepe.crepe_onnx("full"), {"frames": frames}, flops=0.5,
                         calib_samples=300, verify_samples=0, compensation=False,
                         provider="cpu")
    print(f"CREPE full --flops 0.5: MACs kept {_macs_kept(report):.5f}")
    assert 0.495 <= _macs_kept(report) <= 0.5
