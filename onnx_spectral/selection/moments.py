"""Cross moments of a tap between the original and a partially pruned model (SPEC section 5).

Sequential compensation reconstructs the ORIGINAL model's activation ``t_o`` ([m]) from the kept
channels ``J`` of the partially pruned model's activation ``t_p`` ([m]). Over all samples
(batch x positions) of the calibration batches, it needs

    S    = E[t_p t_p^T]   ([m, m])     C    = E[t_o t_p^T]   ([m, m])
    mu_p = E[t_p]         ([m])        mu_o = E[t_o]         ([m])

Linear:  ``A = C[:, J] (S[J, J] + lambda I)^-1``.
Affine:  ``t_o ~ A t_p[J] + c`` with the centered moments ``S - mu_p mu_p^T`` and
``C - mu_o mu_p^T``; ``c = mu_o - A mu_p[J]`` goes into the sinks' biases (`affine.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, eq=False)
class CrossMoments:
    """The moments above for one tap, float64."""

    second: np.ndarray
    """S, [m, m]."""
    cross: np.ndarray
    """C, [m, m] (rows: original channels, columns: pruned model's channels)."""
    mean_pruned: np.ndarray
    """mu_p, [m]."""
    mean_original: np.ndarray
    """mu_o, [m]."""

    def centered(self) -> CrossMoments:
        """The moments of the centered activations (zero means)."""
        return CrossMoments(self.second - np.outer(self.mean_pruned, self.mean_pruned),
                            self.cross - np.outer(self.mean_original, self.mean_pruned),
                            np.zeros_like(self.mean_pruned), np.zeros_like(self.mean_original))


def cross_reconstruction(moments: CrossMoments, kept: np.ndarray, ridge: float,
                         toward_kept: bool = False) -> np.ndarray:
    """``A = C[:, J] (S[J, J] + lambda I)^-1``, [m, k].

    `toward_kept`: the ridge pulls toward passing the kept channels unchanged instead of toward
    zero, ``A = P + (C[:, J] - P S[J, J]) (S[J, J] + lambda I)^-1`` with ``P`` the selector of
    ``J`` (for singular moments, where pulling toward zero drops the kept channels' directions
    that the calibration rows do not span).
    """
    second = moments.second[np.ix_(kept, kept)]
    gram = second + ridge * np.eye(kept.size)
    if not toward_kept:
        return np.linalg.solve(gram, moments.cross[:, kept].T).T
    selector = np.zeros((moments.cross.shape[0], kept.size))
    selector[kept, np.arange(kept.size)] = 1.0
    return selector + np.linalg.solve(gram, (moments.cross[:, kept] - selector @ second).T).T


def affine_cross_reconstruction(moments: CrossMoments, kept: np.ndarray, ridge: float,
                                toward_kept: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``A`` ([m, k]) from the centered moments and the offset ``c = mu_o - A mu_p[J]`` ([m])."""
    matrix = cross_reconstruction(moments.centered(), kept, ridge, toward_kept)
    return matrix, moments.mean_original - matrix @ moments.mean_pruned[kept]
