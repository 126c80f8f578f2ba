"""Channel selection: which channels of a group stay (SPEC section 3).

Pure NumPy/SciPy, no ONNX. A channel group of ``m`` channels is read by one or more *taps*
(tensors feeding sinks). Tap ``t`` brings its uncentered second-moment matrix ``Sigma_t``
(``[m, m]``), a ridge ``lambda_t > 0`` and a loss weight ``M_t`` (``[m, m]``, PSD). For a kept
set ``J`` the group's information loss is

    L(J) = sum_t trace(M_t R_t(J)),
    R_t(J) = Sigma_t - Sigma_t[:, J] (Sigma_t[J, J] + lambda_t I)^-1 Sigma_t[J, :].

``greedy_select`` adds channels one at a time, each time the one with the largest loss
decrease, and returns the whole loss-vs-width curve along the way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.linalg
from scipy.linalg import blas

from onnx_spectral.errors import OptionsError, StatisticsError

#: Number of rank-one/rank-two updates the greedy path defers before applying them to the
#: stored ``[m, m]`` matrices in one BLAS-3 call.
_BLOCK = 128
#: Rows per matrix product when computing the lower triangle of ``Sigma M Sigma``.
_PANEL = 256


def _square_matrix(name: str, value: np.ndarray) -> np.ndarray:
    """Return ``value`` as a finite, symmetric float64 ``[m, m]`` array (its symmetric part).

    Raises:
        OptionsError: ``value`` is not square 2-D or holds NaN/inf.
    """
    array = np.asarray(value, dtype=np.float64)
    if array.ndim != 2 or array.shape[0] != array.shape[1]:
        raise OptionsError(f"{name} must be a square [m, m] matrix, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise OptionsError(f"{name} holds NaN or infinite values")
    return (array + array.T) * 0.5


@dataclass(frozen=True, eq=False)
class TapProblem:
    """One tap of a channel group: what the loss of that tap needs.

    Both matrices are stored as their symmetric part in float64 (the loss only depends on
    that part).

    Attributes:
        sigma: ``Sigma``, ``[m, m]`` uncentered second moment of the group's channels at this
            tap; PSD, possibly singular or ill-conditioned.
        weight: ``M``, ``[m, m]`` PSD loss weight (see ``loss_weight``).
        ridge: ``lambda > 0`` (see ``default_ridge``).
    """

    sigma: np.ndarray
    weight: np.ndarray
    ridge: float

    def __post_init__(self) -> None:
        sigma = _square_matrix("sigma", self.sigma)
        weight = _square_matrix("weight", self.weight)
        if weight.shape != sigma.shape:
            raise OptionsError(
                f"weight has shape {weight.shape} but sigma has shape {sigma.shape}; "
                "both must be [m, m] for the same m"
            )
        ridge = float(self.ridge)
        if not (math.isfinite(ridge) and ridge > 0.0):
            raise OptionsError(f"ridge must be a finite number > 0, got {self.ridge!r}")
        object.__setattr__(self, "sigma", sigma)
        object.__setattr__(self, "weight", weight)
        object.__setattr__(self, "ridge", ridge)

    @property
    def size(self) -> int:
        """``m``, the number of channels of the group."""
        return int(self.sigma.shape[0])


def default_ridge(sigma: np.ndarray, rho: float) -> float:
    """Default ridge ``lambda = rho * trace(Sigma) / m``.

    Args:
        sigma: ``[m, m]`` second-moment matrix.
        rho: relative ridge, ``> 0`` (SPEC default ``1e-3``).

    Returns:
        ``lambda > 0``; when ``trace(Sigma)`` is 0 (all channels are zero) the smallest
        positive normal float64, so that the ridge stays positive.

    Raises:
        OptionsError: ``rho`` is not a finite number > 0 or ``sigma`` is not square.
    """
    if not (math.isfinite(rho) and rho > 0.0):
        raise OptionsError(f"rho must be a finite number > 0, got {rho!r}")
    matrix = _square_matrix("sigma", sigma)
    m = matrix.shape[0]
    if m == 0:
        raise OptionsError("sigma is empty (m = 0); a channel group has at least one channel")
    ridge = rho * float(np.trace(matrix)) / m
    return max(ridge, float(np.finfo(np.float64).tiny))


def loss_weight(m: int, sink_gram: np.ndarray | None, theta: float) -> np.ndarray:
    """Loss weight ``M = theta * I / m + (1 - theta) * ZtZ / trace(ZtZ)``.

    Both terms have trace 1, so ``trace(M) = 1`` whatever ``theta``.

    Args:
        m: number of channels.
        sink_gram: ``Z^T Z`` summed over the sinks of the tap, ``[m, m]`` PSD; ``None`` when
            the tap has no usable sink weight.
        theta: mix in ``[0, 1]``; 1 is the input-aware loss L^(A), 0 the output-aware L^(B).
            With ``sink_gram`` ``None`` or of trace ``<= 0``, ``theta`` is treated as 1.

    Returns:
        ``M``, float64 ``[m, m]``, symmetric.

    Raises:
        OptionsError: ``m < 1``, ``theta`` outside ``[0, 1]``, or ``sink_gram`` not ``[m, m]``
            or not finite.
    """
    if m < 1:
        raise OptionsError(f"m must be >= 1, got {m}")
    if not (0.0 <= theta <= 1.0):
        raise OptionsError(f"theta must lie in [0, 1], got {theta!r}")
    identity = np.eye(m, dtype=np.float64) / m
    if sink_gram is None:
        return identity
    gram = _square_matrix("sink_gram", sink_gram)
    if gram.shape != (m, m):
        raise OptionsError(f"sink_gram must have shape ({m}, {m}), got {gram.shape}")
    trace = float(np.trace(gram))
    if trace <= 0.0:
        return identity
    return theta * identity + (1.0 - theta) * (gram / trace)


def _group_size(problems: Sequence[TapProblem]) -> int:
    """The common ``m`` of all taps. Raises OptionsError on no taps or differing sizes."""
    if len(problems) == 0:
        raise OptionsError("a channel group needs at least one tap problem, got none")
    sizes = sorted({p.size for p in problems})
    if len(sizes) != 1:
        raise OptionsError(f"all taps of a group must have the same m, got sizes {sizes}")
    return sizes[0]


def _kept_indices(kept: Sequence[int] | np.ndarray, m: int) -> np.ndarray:
    """``kept`` as an int64 ``[k]`` array of distinct indices in ``0..m-1``.

    Raises:
        OptionsError: ``kept`` is not 1-D integers, out of range or has duplicates.
    """
    indices = np.asarray(kept)
    if indices.size == 0:
        return np.zeros(0, dtype=np.int64)
    if indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer):
        raise OptionsError(
            f"kept must be a 1-D sequence of channel indices, got {indices.dtype} "
            f"of shape {indices.shape}"
        )
    bad = indices[(indices < 0) | (indices >= m)]
    if bad.size:
        raise OptionsError(f"kept index {int(bad[0])} is outside 0..{m - 1}")
    if np.unique(indices).size != indices.size:
        raise OptionsError(f"kept has repeated channel indices: {indices.tolist()}")
    return indices.astype(np.int64)


def _ridge_solve(sigma: np.ndarray, kept: np.ndarray, ridge: float) -> np.ndarray:
    """``(Sigma[J, J] + lambda I)^-1 Sigma[J, :]``, ``[k, m]``, by a Cholesky solve.

    Raises:
        StatisticsError: ``Sigma[J, J] + lambda I`` is not positive definite (``sigma`` is not
            PSD, or the ridge is too small for its rounding errors).
    """
    gram = sigma[np.ix_(kept, kept)] + ridge * np.eye(kept.size)
    try:
        factor = scipy.linalg.cho_factor(gram, lower=True, check_finite=False)
    except np.linalg.LinAlgError as exc:
        raise StatisticsError(
            f"Sigma[J, J] + {ridge:g} I is not positive definite for the {kept.size} kept "
            "channels; sigma must be PSD (raise the ridge if it is only by rounding)"
        ) from exc
    return scipy.linalg.cho_solve(factor, sigma[kept, :], check_finite=False)


def information_loss(problems: Sequence[TapProblem], kept: Sequence[int] | np.ndarray) -> float:
    """The group's loss ``sum_t trace(M_t R_t(J))``, computed from the definition.

    Args:
        problems: the taps of the group, all of the same ``m``.
        kept: ``J``, distinct channel indices in ``0..m-1`` (any order, possibly empty).

    Returns:
        The loss; for ``J`` empty it is ``sum_t trace(M_t Sigma_t)``.

    Raises:
        OptionsError: no taps, differing ``m``, or a bad ``kept``.
        StatisticsError: a ``Sigma_t[J, J] + lambda_t I`` is not positive definite.
    """
    m = _group_size(problems)
    indices = _kept_indices(kept, m)
    total = 0.0
    for problem in problems:
        residual = problem.sigma
        if indices.size:
            explained = problem.sigma[:, indices] @ _ridge_solve(
                problem.sigma, indices, problem.ridge
            )
            residual = residual - explained
        total += float(np.einsum("ij,ji->", problem.weight, residual))
    return total


def reconstruction(sigma: np.ndarray, kept: np.ndarray, ridge: float,
                   exact_kept: bool = False) -> np.ndarray:
    """Ridge reconstruction ``A_J = Sigma[:, J] (Sigma[J, J] + lambda I)^-1``.

    `exact_kept`: the kept channels pass unchanged (``A_J[J] = I``) and only the dropped ones
    are regressed on them. For a singular ``Sigma`` (fewer calibration rows than channels) the
    ridge solution would project the kept channels onto the span of those rows.

    ``A_J t_J`` is the least-squares (ridge) estimate of the whole channel vector ``t`` from
    the kept channels ``t_J``.

    Args:
        sigma: ``[m, m]`` second-moment matrix.
        kept: ``J``, ``[k]`` distinct channel indices.
        ridge: ``lambda > 0``.

    Returns:
        ``A_J``, float64 ``[m, k]``, columns in the order of ``kept``.

    Raises:
        OptionsError: bad shapes, indices or ridge.
        StatisticsError: ``Sigma[J, J] + lambda I`` is not positive definite.
    """
    matrix = _square_matrix("sigma", sigma)
    if not (math.isfinite(ridge) and ridge > 0.0):
        raise OptionsError(f"ridge must be a finite number > 0, got {ridge!r}")
    indices = _kept_indices(kept, matrix.shape[0])
    if indices.size == 0:
        return np.zeros((matrix.shape[0], 0), dtype=np.float64)
    # (Sigma_JJ + lambda I) is symmetric, so A^T = (Sigma_JJ + lambda I)^-1 Sigma[J, :].
    result = _ridge_solve(matrix, indices, ridge).T
    if exact_kept:
        result[indices] = np.eye(indices.size)
    return result


@dataclass(frozen=True, eq=False)
class GreedyPath:
    """Result of ``greedy_select``.

    Attributes:
        order: int64 ``[k]``, channels in the order greedy added them.
        losses: float64 ``[k + 1]``; ``losses[i]`` is the loss of ``order[:i]``, so
            ``losses[0] = sum_t trace(M_t Sigma_t)`` (nothing kept); non-increasing.
    """

    order: np.ndarray
    losses: np.ndarray


class _DeferredSymmetric:
    """A symmetric ``[m, m]`` matrix under deferred low-rank downdates.

    The true matrix is ``base - sum_p (a_p b_p^T + b_p a_p^T)`` (rank-two terms) or
    ``base - sum_p a_p a_p^T`` (rank-one terms, ``rank_two=False``). Terms queue up in
    ``[m, block]`` buffers; a column costs ``O(m * block)``; when the buffers are full they are
    applied to the lower triangle of ``base`` by one ``dsyrk``/``dsyr2k`` call. Only the lower
    triangle of ``base`` is kept up to date.
    """

    def __init__(self, base: np.ndarray, rank_two: bool, block: int) -> None:
        """Take ownership of ``base`` (float64, Fortran order; only its lower triangle is read)."""
        m = base.shape[0]
        self._base = base
        self._a = np.zeros((m, block), dtype=np.float64, order="F")
        self._b = np.zeros((m, block), dtype=np.float64, order="F") if rank_two else None
        self._count = 0

    def column(self, j: int) -> np.ndarray:
        """Column ``j`` of the true matrix, float64 ``[m]`` (a new array)."""
        base = self._base
        col = np.empty(base.shape[0], dtype=np.float64)
        col[:j] = base[j, :j]
        col[j:] = base[j:, j]
        n = self._count
        if n:
            a = self._a[:, :n]
            if self._b is None:
                col -= a @ a[j]
            else:
                b = self._b[:, :n]
                col -= a @ b[j] + b @ a[j]
        return col

    def downdate(self, a: np.ndarray, b: np.ndarray | None = None) -> None:
        """Subtract ``a a^T`` (rank one) or ``a b^T + b a^T`` (rank two)."""
        if self._count == self._a.shape[1]:
            self._flush()
        self._a[:, self._count] = a
        if self._b is not None:
            self._b[:, self._count] = b
        self._count += 1

    def _flush(self) -> None:
        a = self._a
        if self._b is None:
            blas.dsyrk(-1.0, a, beta=1.0, c=self._base, lower=1, overwrite_c=1)
        else:
            blas.dsyr2k(-1.0, a, self._b, beta=1.0, c=self._base, lower=1, overwrite_c=1)
        self._count = 0


def _sandwich_lower(sigma: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Lower triangle (diagonal included) of ``Sigma M Sigma``, ``[m, m]`` Fortran order.

    Row panels stop at the diagonal, which saves close to half of the second product. The
    strict upper triangle is left as zeros.
    """
    m = sigma.shape[0]
    right = weight @ sigma
    out = np.zeros((m, m), dtype=np.float64, order="F")
    for start in range(0, m, _PANEL):
        stop = min(start + _PANEL, m)
        out[start:stop, :stop] = sigma[start:stop, :] @ right[:, :stop]
    return out


class _TapPath:
    """Greedy state of one tap: ``R`` and ``Q = R M R`` as deferred symmetric matrices.

    Adding channel ``j`` with ``r = R[:, j]``, ``s = R_jj + lambda``, ``u = r / s`` and
    ``w = Q[:, j] = R M r`` (so ``Q_jj = r^T M r`` and the gain is ``Q_jj / s``):

        R' = R - r r^T / s = R - c c^T,                         c = r / sqrt(s)
        Q' = R' M R' = Q - w u^T - u w^T + Q_jj u u^T = Q - a u^T - u a^T,
                                                                a = w - (Q_jj / 2) u
        diag(R') = diag(R) - c * c,   diag(Q') = diag(Q) - 2 a * u

    A step reads one column of each matrix and queues one rank-one and one rank-two term:
    ``O(m * block)``; every ``block`` steps the queued terms are applied by BLAS-3
    (``O(m^2 * block)``), so a step costs ``O(m^2)`` amortised and never reads or writes a whole
    ``[m, m]`` matrix by itself. ``Q`` plays the role of ``P = M R`` (``Q = R P``): keeping
    ``P`` would need the matrix-vector product ``P^T r`` (all of ``P``) at every step.
    """

    def __init__(self, problem: TapProblem, block: int) -> None:
        sigma = problem.sigma
        cross = _sandwich_lower(sigma, problem.weight)
        self.ridge = problem.ridge
        self.residual = _DeferredSymmetric(np.array(sigma, order="F"), rank_two=False, block=block)
        self.cross = _DeferredSymmetric(cross, rank_two=True, block=block)
        self.residual_diag = np.diagonal(sigma).copy()
        self.cross_diag = np.diagonal(cross).copy()

    def add(self, j: int) -> None:
        """Update the state for channel ``j`` joining the kept set."""
        r = self.residual.column(j)
        w = self.cross.column(j)
        s = max(r[j], 0.0) + self.ridge
        u = r / s
        a = w - (0.5 * w[j]) * u
        c = r / math.sqrt(s)
        self.residual.downdate(c)
        self.cross.downdate(a, u)
        self.residual_diag -= c * c
        self.cross_diag -= 2.0 * a * u


def greedy_select(problems: Sequence[TapProblem], k: int, lanes: int = 1) -> GreedyPath:
    """Greedy forward selection of ``k`` channels (SPEC section 3).

    Starting from ``J = {}`` and ``R_t = Sigma_t``, each step adds the not yet chosen ``j``
    maximising ``sum_t gain_t(j)``, ``gain_t(j) = r_j^T M_t r_j / (R_t[j, j] + lambda_t)``
    with ``r_j = R_t[:, j]`` (the exact loss decrease), then applies the Schur-complement
    update ``R_t <- R_t - r_j r_j^T / (R_t[j, j] + lambda_t)``. Ties go to the lowest index.
    With ``lanes`` > 1 the ``m`` channels are that many consecutive lanes of equal size, and
    each step chooses among the lanes that have the fewest channels so far: every prefix of a
    multiple of ``lanes`` channels holds as many of each lane (a grouped Conv's outputs).

    Cost: ``O(m^3)`` once per tap (``Sigma M Sigma``) and ``O(m^2)`` per step per tap,
    ``O(m^3 + k m^2)`` in all.

    Args:
        problems: the taps of the group, all of the same ``m``.
        k: number of channels to choose, ``0 <= k <= m``.
        lanes: equal consecutive lanes to keep balanced, a divisor of ``m``.

    Returns:
        The ``GreedyPath``; ``losses`` come from the maintained quantities
        (``losses[i] = losses[i - 1] - gain``).

    Raises:
        OptionsError: no taps, differing ``m``, ``k`` outside ``0..m`` or ``lanes`` not a
            divisor of ``m``.
    """
    m = _group_size(problems)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k <= m:
        raise OptionsError(f"k must be an integer in 0..{m}, got {k!r}")
    if lanes < 1 or m % lanes:
        raise OptionsError(f"{m} channels cannot form {lanes} equal lanes")
    lane = np.arange(m) // (m // lanes)  # [m] the lane of each channel
    taken = np.zeros(lanes, dtype=np.int64)
    k = int(k)
    losses = np.empty(k + 1, dtype=np.float64)
    losses[0] = sum(float(np.einsum("ij,ji->", p.weight, p.sigma)) for p in problems)
    order = np.empty(k, dtype=np.int64)
    if k == 0:
        return GreedyPath(order=order, losses=losses)
    taps = [_TapPath(p, block=min(_BLOCK, k)) for p in problems]
    ridges = np.array([tap.ridge for tap in taps])[:, None]
    chosen = np.zeros(m, dtype=bool)
    for step in range(k):
        residual_diag = np.stack([tap.residual_diag for tap in taps])
        cross_diag = np.stack([tap.cross_diag for tap in taps])
        gains = (np.maximum(cross_diag, 0.0) / (np.maximum(residual_diag, 0.0) + ridges)).sum(0)
        gains[chosen] = -np.inf
        gains[taken[lane] > taken.min()] = -np.inf
        j = int(np.argmax(gains))
        chosen[j] = True
        taken[lane[j]] += 1
        order[step] = j
        losses[step + 1] = max(losses[step] - float(gains[j]), 0.0)
        for tap in taps:
            tap.add(j)
    return GreedyPath(order=order, losses=losses)

