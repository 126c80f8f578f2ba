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


def test_toward_kept_keeps_what_few_rows_cannot_see() -> None:
    """3 rows for 6 channels: pulling toward zero projects the kept channels onto the rows'
    span (a kept direction the rows miss is lost); pulling toward the kept channels passes it.
    With enough rows both give the exact map."""
    rng = np.random.default_rng(2)
    kept = np.array([0, 2, 4, 5])
    few = rng.standard_normal((3, 6))
    moments = _moments(few, few)  # no pruning upstream: original == pruned
    toward_zero = cross_reconstruction(moments, kept, 1e-6)
    toward_kept = cross_reconstruction(moments, kept, 1e-6, toward_kept=True)
    np.testing.assert_allclose(toward_kept[kept], np.eye(4), atol=1e-9)
    unseen = np.linalg.svd(few[:, kept])[2][-1]  # a kept direction orthogonal to the rows
    assert np.linalg.norm(toward_zero[kept] @ unseen) < 1e-3
    np.testing.assert_allclose(toward_kept[kept] @ unseen, unseen, atol=1e-9)
    many = rng.standard_normal((500, 6))
    mapping = rng.standard_normal((6, 4))
    exact = _moments(many[:, kept] @ mapping.T, many)
    np.testing.assert_allclose(cross_reconstruction(exact, kept, 1e-9, toward_kept=True),
                               mapping, atol=1e-6)
