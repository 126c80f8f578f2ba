"""Compensated reconstructions from cross moments, linear and affine (`moments.py`)."""

from __future__ import annotations

import numpy as np

from onnx_spectral.selection.moments import (
    CrossMoments,
    affine_cross_reconstruction,
    cross_reconstruction,
)


def _moments(original: np.ndarray, pruned: np.ndarray) -> CrossMoments:
    """Moments of rows `original`, `pruned` ([n, m] each)."""
    n = len(pruned)
    return CrossMoments(pruned.T @ pruned / n, original.T @ pruned / n, pruned.mean(axis=0),
                        original.mean(axis=0))


def test_linear_reconstruction_recovers_an_exact_linear_map() -> None:
    rng = np.random.default_rng(0)
    pruned = rng.standard_normal((500, 6))
    kept = np.array([0, 2, 3])
    mapping = rng.standard_normal((6, 3))
    original = pruned[:, kept] @ mapping.T
    matrix = cross_reconstruction(_moments(original, pruned), kept, 1e-9)
    np.testing.assert_allclose(matrix, mapping, atol=1e-6)


def test_affine_reconstruction_recovers_an_offset_the_linear_one_misses() -> None:
    rng = np.random.default_rng(1)
    pruned = rng.standard_normal((500, 6)) + 2.0
    kept = np.array([1, 4])
    mapping = rng.standard_normal((6, 2))
    offset = rng.standard_normal(6) * 3.0
    original = pruned[:, kept] @ mapping.T + offset
    moments = _moments(original, pruned)
    matrix, found = affine_cross_reconstruction(moments, kept, 1e-9)
    np.testing.assert_allclose(matrix, mapping, atol=1e-6)
    np.testing.assert_allclose(found, offset, atol=1e-6)
    linear = cross_reconstruction(moments, kept, 1e-9)
    residual = original - pruned[:, kept] @ linear.T
    assert np.linalg.norm(residual) > 0.1 * np.linalg.norm(original)
