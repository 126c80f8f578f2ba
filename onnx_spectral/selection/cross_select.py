"""Greedy channel selection toward another model's activations (sequential compensation).

The kept channels of a group are chosen from the pruned model's channels so that they best
reconstruct the ORIGINAL model's activations, from their cross moments (SPEC section 3 with
the target moments taken across the two models).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from onnx_spectral.errors import OptionsError


@dataclass
class _CrossTap:
    """One tap's running state: residual second moment ``[m, m]``, residual cross moment
    ``[m, m]``, ``M R_C`` ``[m, m]``, the loss weight ``M`` ``[m, m]`` and the ridge."""

    residual_s: np.ndarray
    residual_c: np.ndarray
    product: np.ndarray
    weight: np.ndarray
    ridge: float


def cross_greedy_select(problems: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray, float]],
                        k: int) -> np.ndarray:
    """Greedy selection toward another model's activation (sequential compensation).

    Each tap brings ``(S, C, M, lambda)``: ``S`` ``[m, m]`` second moment of the channels the
    kept set is taken from, ``C`` ``[m, m]`` cross moment ``E[t_target t^T]``, ``M`` the loss
    weight and the ridge. The loss of ``J`` is
    ``sum_t trace(M (Sigma_target - C[:, J] (S[J, J] + lambda I)^-1 C[:, J]^T))``; each step adds
    the channel of largest decrease ``r^T M r / (R_S[j, j] + lambda)`` with ``r`` the column of
    the cross residual ``R_C``, then updates ``R_S -= s s^T / d`` and ``R_C -= r s^T / d``
    (``s = R_S[:, j]``, ``d = R_S[j, j] + lambda``). With ``C = S`` it is ``greedy_select``.
    Cost ``O(k m^2)`` per tap.

    Returns:
        int64 ``[k]``, channels in the order chosen.
    """
    m = problems[0][0].shape[0]
    if not 0 <= k <= m:
        raise OptionsError(f"k must be an integer in 0..{m}, got {k!r}")
    states = []
    for second, cross, weight, ridge in problems:
        residual_c = np.array(cross, dtype=np.float64)
        states.append(_CrossTap(np.array(second, dtype=np.float64), residual_c,
                                weight @ residual_c, weight, float(ridge)))
    chosen = np.zeros(m, dtype=bool)
    order = np.empty(k, dtype=np.int64)
    for step in range(k):
        gains = np.zeros(m)
        for tap in states:
            gains += (np.maximum(np.einsum("ij,ij->j", tap.residual_c, tap.product), 0.0)
                      / (np.maximum(np.diagonal(tap.residual_s), 0.0) + tap.ridge))
        gains[chosen] = -np.inf
        j = int(np.argmax(gains))
        chosen[j] = True
        order[step] = j
        for tap in states:
            d = max(tap.residual_s[j, j], 0.0) + tap.ridge
            s = tap.residual_s[:, j].copy()
            r = tap.residual_c[:, j].copy()
            tap.residual_s -= np.outer(s, s / d)
            tap.residual_c -= np.outer(r, s / d)
            tap.product = tap.product - np.outer(tap.weight @ r, s / d)
    return order
