"""Per-group widths under a whole-model budget (SPEC section 3, "Widths"). Pure NumPy.

A model has ``G`` prunable groups of sizes ``m`` ([G]). Its cost (MACs or parameters) as a
function of the kept widths ``k`` ([G]) is a ``CostModel``: a constant plus a sum of terms, each
term the product over the axes of one weight tensor of an axis length that shrinks linearly
with the channels removed from the groups feeding that axis. A Conv between two pruned groups
costs ``c * k_in * k_out``: bilinear, so removing a channel of one group changes what the
neighbours' channels cost.

Three allocations:

- ``uniform``: every group keeps ``ceil(r * m)``; ``r`` by bisection to meet the budget.
- ``dof``: eigenvalues ``mu`` of ``Sigma / trace(Sigma)``; width ``ceil(N(lambda))`` with
  ``N(lambda) = sum_i mu_i / (mu_i + lambda)``; one global ``lambda`` by bisection.
- ``greedy``: along each group's normalized loss curve, repeatedly grow the group whose next
  rounding step buys the largest loss decrease per unit of cost, while the budget allows.

Widths are rounded up to a multiple of ``round_to``, never below ``min(min_keep, m)`` nor
above ``m``. Every allocation returns the widths of largest cost not above the budget found
by its search (the budget is a cap, met within one rounding step of its search variable).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

import numpy as np

from onnx_spectral.errors import OptionsError

Allocation = Literal["uniform", "dof", "greedy"]
ALLOCATIONS: tuple[Allocation, ...] = ("uniform", "dof", "greedy")
_BISECTION_STEPS = 60


@dataclass(frozen=True, eq=False)
class CostTerm:
    """One weight tensor's cost: ``scale * prod_d (dims[d] - shrink[d] @ (m - k))``.

    Attributes:
        scale: cost per element (1 for parameters; MACs per weight element for a linear node).
        dims: float64 ``[D]`` axis lengths at full width.
        shrink: float64 ``[D, G]``: how much axis ``d`` shortens per channel removed from group
            ``g`` (0 when the group does not touch that axis).
    """

    scale: float
    dims: np.ndarray
    shrink: np.ndarray

    def value(self, removed: np.ndarray) -> float:
        """The term's cost with ``removed`` ([G]) channels taken out of each group."""
        lengths = self.dims - self.shrink @ removed
        return self.scale * float(np.prod(np.maximum(lengths, 0.0)))


@dataclass(frozen=True, eq=False)
class CostModel:
    """Cost of the model as a function of the group widths.

    Attributes:
        sizes: int64 ``[G]`` full widths ``m``.
        constant: cost that no group changes.
        terms: the terms that do change.
    """

    sizes: np.ndarray
    constant: float
    terms: tuple[CostTerm, ...]
    blocks: np.ndarray | None = None
    """int64 ``[G]``: a group's width is a multiple of its block (attention heads); None: 1."""
    reference: float | None = None
    """The cost a budget's fraction is of: the model's before reconstruction layers were added
    (`reconstruction_layers`), which `full` counts at full width; None: `full`."""

    def block(self, group: int) -> int:
        return 1 if self.blocks is None else int(self.blocks[group])

    def __call__(self, widths: Sequence[int] | np.ndarray) -> float:
        """Cost at ``widths`` ([G])."""
        removed = self.sizes - np.asarray(widths, dtype=np.float64)
        return self.constant + sum(term.value(removed) for term in self.terms)

    @property
    def full(self) -> float:
        """Cost at full width."""
        return self(self.sizes)

    def budget(self, fraction: float) -> float:
        """The largest cost a budget of `fraction` allows."""
        return fraction * (self.full if self.reference is None else self.reference)

    @cached_property
    def _stacked(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The terms as arrays: scales ``[T]``, dims ``[T, D]`` and shrink ``[T, D, G]``, axes
        padded to the longest term with length 1 and no shrink."""
        depth = max((len(term.dims) for term in self.terms), default=0)
        dims = np.ones((len(self.terms), depth))
        shrink = np.zeros((len(self.terms), depth, len(self.sizes)))
        for index, term in enumerate(self.terms):
            dims[index, :len(term.dims)] = term.dims
            shrink[index, :len(term.dims)] = term.shrink
        return np.array([term.scale for term in self.terms], dtype=np.float64), dims, shrink

    def costs(self, widths: np.ndarray) -> np.ndarray:
        """Cost at each row of ``widths`` ([C, G]) at once: float64 ``[C]``, each value what
        ``self(row)`` gives (products and the sum over terms taken in the same order)."""
        scales, dims, shrink = self._stacked
        removed = self.sizes[None, :] - np.asarray(widths, dtype=np.float64)
        lengths = dims[None] - np.einsum("tdg,cg->ctd", shrink, removed)
        values = scales[None] * np.prod(np.maximum(lengths, 0.0), axis=2)
        if not self.terms:
            return np.full(len(removed), self.constant)
        return self.constant + np.add.accumulate(values, axis=1)[:, -1]


#: Automatic width rounding (`round_to` 0): groups of at least AUTO_ROUND_MIN channels keep a
#: multiple of AUTO_ROUND_TO. Measured by tools/bench_speed.py (ONNX Runtime CPU, models made by
#: --flops 0.5 with greedy widths, batch 32): CREPE full runs 1.79x faster than the original with
#: rounding to 8, 1.13x with unrounded widths (they miss ONNX Runtime's blocked convolution
#: kernels), 1.83x rounded to 16 for the same MACs; ResNet-50 1.81x / 1.30x / 1.91x. 8 keeps the
#: widths (and the budget) finest among the fast settings.
AUTO_ROUND_TO = 8
AUTO_ROUND_MIN = 64
#: Automatic rounding leaves kept widths below this unrounded: there a step of 8 is over a quarter
#: of the width, and in a small model one step can be a large share of the budget. CREPE
#: tiny at --flops 0.25 with the defaults: rounding from 16 up held its first convolution at 16
#: channels (20.2% of the MACs kept, 98.35% raw pitch accuracy); from 32 up, 24.8% (99.50%).
#: MNIST CNN at --flops 0.07: rounding every width held its 64-channel group at 8 channels
#: (97.87% accuracy). tools/bench_speed.py latency with this rule, speedup / MAC reduction at
#: batch 1 / 32: CREPE full 1.19 / 0.90 at --flops 0.5 and 1.57 / 0.83 at 0.25; ResNet-50
#: 1.17 / 0.87 and 0.93 / 0.84.
AUTO_ROUND_FROM = 32


def round_step(m: int, round_to: int, width: int) -> int:
    """The multiple a width of ``width`` channels in a group of ``m`` is rounded up to:
    ``round_to``, or for 0 (automatic) AUTO_ROUND_TO when ``m >= AUTO_ROUND_MIN`` and
    ``width >= AUTO_ROUND_FROM``, else 1."""
    if round_to:
        return round_to
    return AUTO_ROUND_TO if m >= AUTO_ROUND_MIN and width >= AUTO_ROUND_FROM else 1


def round_width(m: int, width: float, round_to: int, min_keep: int, block: int = 1) -> int:
    """``ceil(width)`` rounded up to a multiple of ``round_step(m, round_to)``, clipped to
    ``[min(min_keep, m), m]``. A group of blocks (attention heads of ``block`` channels) keeps
    whole blocks, at least one, whatever ``round_to`` says.

    A ``1e-9`` tolerance keeps ``ceil(3.0000000001)`` at 3.
    """
    rounded = max(math.ceil(width - 1e-9), min(max(min_keep, 1), m))
    step = block if block > 1 else round_step(m, round_to, rounded)
    rounded = -(-rounded // step) * step
    return int(min(rounded, m))


def _check(sizes: np.ndarray, round_to: int, min_keep: int) -> None:
    if sizes.ndim != 1 or np.any(sizes < 1):
        raise OptionsError(f"group sizes must be a 1-D array of integers >= 1, got {sizes}")
    if round_to < 0:
        raise OptionsError(f"--round-to {round_to}: must be >= 0 (0: automatic)")
    if min_keep < 1:
        raise OptionsError(f"--min-keep {min_keep}: must be >= 1")


def uniform_widths(sizes: Sequence[int] | np.ndarray, ratio: float, round_to: int = 1,
                   min_keep: int = 1, blocks: np.ndarray | None = None) -> np.ndarray:
    """``ceil(ratio * m)`` per group, rounded (to whole `blocks` where given); int64 ``[G]``."""
    m = np.asarray(sizes, dtype=np.int64)
    _check(m, round_to, min_keep)
    if not 0.0 <= ratio <= 1.0:
        raise OptionsError(f"ratio must lie in [0, 1], got {ratio!r}")
    steps = np.ones_like(m) if blocks is None else blocks
    return np.array([round_width(int(size), ratio * size, round_to, min_keep, int(block))
                     for size, block in zip(m, steps, strict=True)], dtype=np.int64)


def normalized_spectrum(sigma: np.ndarray) -> np.ndarray:
    """Eigenvalues of ``Sigma / trace(Sigma)``, float64 ``[m]``, descending, clipped at 0."""
    matrix = np.asarray(sigma, dtype=np.float64)
    trace = float(np.trace(matrix))
    if trace <= 0.0:
        return np.zeros(matrix.shape[0])
    values = np.linalg.eigvalsh((matrix + matrix.T) / (2.0 * trace))
    return np.maximum(values[::-1], 0.0)


def degrees_of_freedom(spectrum: np.ndarray, lam: float) -> float:
    """``N(lambda) = sum_i mu_i / (mu_i + lambda)`` of a normalized spectrum ``[m]``."""
    mu = np.asarray(spectrum, dtype=np.float64)
    return float(np.sum(mu / (mu + lam)))


def dof_widths(spectra: Sequence[np.ndarray], lam: float, round_to: int = 1,
               min_keep: int = 1, blocks: np.ndarray | None = None) -> np.ndarray:
    """``ceil(N_g(lambda))`` per group, rounded (to whole `blocks` where given); int64 ``[G]``."""
    sizes = np.array([len(mu) for mu in spectra], dtype=np.int64)
    _check(sizes, round_to, min_keep)
    steps = np.ones_like(sizes) if blocks is None else blocks
    return np.array([round_width(len(mu), degrees_of_freedom(mu, lam), round_to, min_keep,
                                 int(block)) for mu, block in zip(spectra, steps, strict=True)],
                    dtype=np.int64)


def _bisect(widths_at: Callable[[float], np.ndarray], cost: CostModel, budget: float,
            low: float, high: float) -> np.ndarray:
    """Widths of largest cost <= ``budget`` along a parameter whose widths grow from low to high.

    ``widths_at(low)`` must fit the budget; the search runs in the parameter itself.
    """
    best = widths_at(low)
    if cost(widths_at(high)) <= budget:
        return widths_at(high)
    for _ in range(_BISECTION_STEPS):
        middle = 0.5 * (low + high)
        candidate = widths_at(middle)
        if cost(candidate) <= budget:
            low, best = middle, candidate
        else:
            high = middle
    return best


def _minimum(cost: CostModel, round_to: int, min_keep: int) -> np.ndarray:
    return np.array([round_width(int(m), 0.0, round_to, min_keep, cost.block(g))
                     for g, m in enumerate(cost.sizes)], dtype=np.int64)


def _check_budget(cost: CostModel, budget: float, floor: np.ndarray,
                  name: str = "the budget") -> None:
    """Raise OptionsError, saying how close the narrowest widths `floor` get and why, when
    they cost more than `budget`."""
    if cost(floor) <= budget:
        return
    full = max(cost.budget(1.0), np.finfo(np.float64).tiny)
    raise OptionsError(
        f"{name} {budget / full:.4g} cannot be met: even the narrowest widths allowed "
        f"(--min-keep/--round-to) keep {cost(floor) / full:.4f} of the cost, and "
        f"{cost.constant / full:.4f} of it is in layers no prunable channel group changes "
        "(frozen groups: `onnx-spectral analyze` lists why); ask for a larger fraction or lower "
        "--min-keep")


def check_budget(cost: CostModel, fraction: float, round_to: int = 1, min_keep: int = 1,
                 name: str = "the budget") -> None:
    """Raise OptionsError when no widths keep at most `fraction` of the cost (``cost.budget``;
    `name`: the option, for the message)."""
    _check(cost.sizes, round_to, min_keep)
    _check_budget(cost, cost.budget(fraction), _minimum(cost, round_to, min_keep), name)


def allocate_uniform(cost: CostModel, budget: float, round_to: int = 1,
                     min_keep: int = 1) -> np.ndarray:
    """Uniform widths of largest cost <= ``budget``; int64 ``[G]``."""
    sizes = cost.sizes
    floor = _minimum(cost, round_to, min_keep)
    _check_budget(cost, budget, floor)
    return _bisect(lambda r: uniform_widths(sizes, r, round_to, min_keep, cost.blocks), cost,
                   budget, 0.0, 1.0)


def allocate_dof(cost: CostModel, budget: float, spectra: Sequence[np.ndarray],
                 round_to: int = 1, min_keep: int = 1) -> np.ndarray:
    """Degrees-of-freedom widths, one global ``lambda`` by bisection (in ``-log lambda``)."""
    floor = _minimum(cost, round_to, min_keep)
    _check_budget(cost, budget, floor)
    if [len(mu) for mu in spectra] != cost.sizes.tolist():
        raise OptionsError("one spectrum per group, of the group's size, is needed for dof")
    # N(lambda) grows as lambda shrinks: search t = -log10(lambda) from 12 (N ~ 0) to -30.
    return _bisect(lambda t: dof_widths(spectra, 10.0 ** -t, round_to, min_keep, cost.blocks),
                   cost, budget, -12.0, 30.0)


def allocate_greedy(cost: CostModel, budget: float, curves: Sequence[np.ndarray],
                    round_to: int = 1, min_keep: int = 1) -> np.ndarray:
    """Marginal allocation along the groups' loss curves.

    Args:
        cost: the cost model.
        budget: largest cost allowed.
        curves: per group, float64 ``[m + 1]``, the loss of keeping the first ``j`` channels of
            its greedy path divided by the loss of keeping none (non-increasing).
        round_to, min_keep: see ``round_width``.

    Starting from the narrowest widths, each step grows by one rounding step the group with the
    largest ``(L_g(k) - L_g(k'))`` per unit of added cost among those that still fit the budget;
    a step that adds no cost is taken first. Returns int64 ``[G]``.
    """
    sizes = cost.sizes
    if [len(curve) - 1 for curve in curves] != sizes.tolist():
        raise OptionsError("one loss curve of length m + 1 per group is needed for greedy")
    widths = _minimum(cost, round_to, min_keep)
    _check_budget(cost, budget, widths)
    current = cost(widths)
    while True:
        growing = np.flatnonzero(widths < sizes).tolist()
        grown = np.repeat(widths[None], len(growing), axis=0)  # [C, G]: one group grown a row
        for row, g in enumerate(growing):
            grown[row, g] = round_width(int(sizes[g]), widths[g] + 1, round_to, min_keep,
                                        cost.block(g))
        added_costs = cost.costs(grown)
        best, best_rate, best_cost = -1, -np.inf, current
        for row, g in enumerate(growing):
            added = float(added_costs[row])
            if added > budget:
                continue
            gain = float(curves[g][widths[g]] - curves[g][grown[row, g]])
            rate = np.inf if added <= current else gain / (added - current)
            if rate > best_rate:
                best, best_rate, best_cost = g, rate, added
        if best < 0:
            return widths
        widths[best] = grown[growing.index(best), best]
        current = best_cost
