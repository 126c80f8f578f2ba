"""Tests of onnx_spectral.selection.spectral: the selection math of SPEC section 3."""

from __future__ import annotations

import time

import numpy as np
import pytest

from onnx_spectral.errors import OptionsError, StatisticsError
from onnx_spectral.selection import spectral as select
from onnx_spectral.selection.baselines import l1_norm_order
from onnx_spectral.selection.cross_select import cross_greedy_select
from onnx_spectral.selection.spectral import (
    GreedyPath,
    TapProblem,
    default_ridge,
    greedy_select,
    information_loss,
    loss_weight,
    reconstruction,
)
from onnx_spectral.selection.widths import round_width


def _random_psd(rng: np.random.Generator, m: int, samples: int) -> np.ndarray:
    """Uncentered second moment of ``samples`` Gaussian vectors (rank min(m, samples))."""
    x = rng.standard_normal((m, samples)) * rng.uniform(0.2, 3.0, size=(m, 1))
    return x @ x.T / samples


def _ill_conditioned(rng: np.random.Generator, m: int) -> np.ndarray:
    """Random rotation of eigenvalues spanning 1e-10..1."""
    basis, _ = np.linalg.qr(rng.standard_normal((m, m)))
    return (basis * np.logspace(-10, 0, m)) @ basis.T


def _with_duplicates(rng: np.random.Generator, distinct: int, copies: list[int]) -> np.ndarray:
    """Second moment of ``distinct`` independent channels followed by exact copies of ``copies``."""
    x = rng.standard_normal((distinct, 4 * distinct))
    x = np.vstack([x, x[copies]])
    return x @ x.T / x.shape[1]


def _sigma(kind: str, m: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "random":
        return _random_psd(rng, m, 3 * m)
    if kind == "rank_deficient":
        return _random_psd(rng, m, m // 3)
    if kind == "ill_conditioned":
        return _ill_conditioned(rng, m)
    assert kind == "duplicates"
    distinct = m - m // 3
    return _with_duplicates(rng, distinct, list(range(0, 2 * (m // 3), 2)))


def _problems(kind: str, m: int, taps: int, rho: float, seed: int) -> list[TapProblem]:
    rng = np.random.default_rng(seed)
    problems = []
    for tap in range(taps):
        sigma = _sigma(kind, m, rng)
        z = rng.standard_normal((2 * m + tap, m))
        weight = loss_weight(m, z.T @ z, theta=0.5 if tap == 0 else 0.2)
        problems.append(TapProblem(sigma, weight, default_ridge(sigma, rho)))
    return problems


CASES = [
    pytest.param(kind, m, taps, rho, id=f"{kind}-m{m}-taps{taps}-rho{rho:g}")
    for kind in ("random", "rank_deficient", "ill_conditioned", "duplicates")
    for m in (6, 9)
    for taps in (1, 2)
    for rho in (1e-3, 1e-6)
]


@pytest.fixture(params=[128, 2], ids=["block128", "block2"])
def block(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    """Run with the default deferral block and with a tiny one (exercises the BLAS-3 flush)."""
    monkeypatch.setattr(select, "_BLOCK", request.param)
    return int(request.param)


@pytest.mark.parametrize("kind, m, taps, rho", CASES)
def test_path_losses_match_definition(kind: str, m: int, taps: int, rho: float, block: int):
    problems = _problems(kind, m, taps, rho, seed=m * 10 + taps)
    path = greedy_select(problems, m)
    assert isinstance(path, GreedyPath)
    assert path.order.dtype == np.int64 and path.order.shape == (m,)
    assert path.losses.dtype == np.float64 and path.losses.shape == (m + 1,)
    assert sorted(path.order.tolist()) == list(range(m))
    scale = path.losses[0]
    expected_empty = sum(float(np.trace(p.weight @ p.sigma)) for p in problems)
    assert path.losses[0] == pytest.approx(expected_empty, rel=1e-12)
    for i in range(m + 1):
        exact = information_loss(problems, path.order[:i])
        assert abs(path.losses[i] - exact) <= 1e-8 * scale, (i, path.losses[i], exact)
    assert np.all(np.diff(path.losses) <= 1e-12 * scale)


@pytest.mark.parametrize("kind, m, taps, rho", CASES)
def test_each_step_is_argmax_of_true_decrease(kind: str, m: int, taps: int, rho: float, block: int):
    problems = _problems(kind, m, taps, rho, seed=m * 10 + taps + 1)
    path = greedy_select(problems, m)
    scale = path.losses[0]
    for i in range(m):
        prefix = path.order[:i].tolist()
        before = information_loss(problems, prefix)
        remaining = sorted(set(range(m)) - set(prefix))
        decrease = {c: before - information_loss(problems, prefix + [c]) for c in remaining}
        best = max(decrease.values())
        chosen = int(path.order[i])
        assert decrease[chosen] >= best - 1e-9 * scale, (i, chosen, decrease)


def test_single_tap_three_channels_by_hand():
    # Diagonal Sigma, M = I/3: channel j removes Sigma_jj^2 / (Sigma_jj + lambda) / 3.
    sigma = np.diag([1.0, 4.0, 2.0])
    problem = TapProblem(sigma, loss_weight(3, None, 1.0), ridge=1.0)
    path = greedy_select([problem], 3)
    assert path.order.tolist() == [1, 2, 0]
    gains = np.array([16 / 5, 4 / 3, 1 / 2]) / 3
    expected = 7 / 3 - np.concatenate([[0.0], np.cumsum(gains)])
    np.testing.assert_allclose(path.losses, expected, rtol=1e-14)


def test_two_taps_sum_their_losses():
    problems = _problems("random", 7, 2, 1e-3, seed=3)
    kept = [4, 0, 2]
    separate = sum(information_loss([p], kept) for p in problems)
    assert information_loss(problems, kept) == pytest.approx(separate, rel=1e-14)


def test_duplicates_picked_once_each_first(block: int):
    rng = np.random.default_rng(11)
    copies = [0, 2, 4]
    sigma = _with_duplicates(rng, 6, copies)  # channels 6, 7, 8 copy channels 0, 2, 4
    problem = TapProblem(sigma, loss_weight(9, None, 1.0), default_ridge(sigma, 1e-9))
    path = greedy_select([problem], 9)
    source = list(range(6)) + copies
    first = [source[c] for c in path.order[:6]]
    assert sorted(first) == list(range(6))
    assert path.losses[6] <= 1e-7 * path.losses[0]
    assert path.losses[5] > 1e-2 * path.losses[0]


def test_exact_tie_goes_to_lowest_index():
    sigma = np.eye(4)
    problem = TapProblem(sigma, loss_weight(4, None, 1.0), ridge=0.5)
    assert greedy_select([problem], 4).order.tolist() == [0, 1, 2, 3]


def test_k_zero_and_errors():
    problems = _problems("random", 5, 1, 1e-3, seed=0)
    empty = greedy_select(problems, 0)
    assert empty.order.shape == (0,)
    np.testing.assert_allclose(empty.losses, [information_loss(problems, [])])
    for bad in (-1, 6):
        with pytest.raises(OptionsError, match=str(bad)):
            greedy_select(problems, bad)
    with pytest.raises(OptionsError, match="2.5"):
        greedy_select(problems, 2.5)  # type: ignore[arg-type]
    with pytest.raises(OptionsError, match="at least one tap"):
        greedy_select([], 0)
    other = _problems("random", 4, 1, 1e-3, seed=0)
    with pytest.raises(OptionsError, match=r"\[4, 5\]"):
        greedy_select(problems + other, 1)


def test_tap_problem_validation():
    with pytest.raises(OptionsError, match=r"\(2, 3\)"):
        TapProblem(np.zeros((2, 3)), np.eye(2), 1.0)
    with pytest.raises(OptionsError, match=r"\(3, 3\)"):
        TapProblem(np.eye(2), np.eye(3), 1.0)
    with pytest.raises(OptionsError, match="0.0"):
        TapProblem(np.eye(2), np.eye(2), 0.0)
    with pytest.raises(OptionsError, match="NaN"):
        TapProblem(np.full((2, 2), np.nan), np.eye(2), 1.0)
    problem = TapProblem(np.array([[1.0, 2.0], [0.0, 1.0]]), np.eye(2), 1)
    np.testing.assert_array_equal(problem.sigma, [[1.0, 1.0], [1.0, 1.0]])
    assert problem.sigma.dtype == np.float64 and problem.ridge == 1.0


def test_information_loss_by_hand_and_kept_errors():
    sigma = np.array([[2.0, 1.0], [1.0, 2.0]])
    problem = TapProblem(sigma, np.eye(2), ridge=1.0)
    # R = Sigma - Sigma[:, 0] Sigma[0, :] / 3 = [[2 - 4/3, 1 - 2/3], [., 2 - 1/3]].
    assert information_loss([problem], [0]) == pytest.approx(2 / 3 + 5 / 3, rel=1e-14)
    assert information_loss([problem], []) == pytest.approx(4.0)
    for bad, text in (([2], "2"), ([-1], "-1"), ([0, 0], "repeated"), ([[0]], "1-D")):
        with pytest.raises(OptionsError, match=text):
            information_loss([problem], bad)


def test_loss_weight_values():
    z = np.array([[1.0, 0.0, 2.0], [0.0, 3.0, 0.0]])
    gram = z.T @ z  # trace 14
    np.testing.assert_allclose(loss_weight(3, gram, 1.0), np.eye(3) / 3)
    np.testing.assert_allclose(loss_weight(3, gram, 0.0), gram / 14.0)
    mixed = loss_weight(3, gram, 0.25)
    np.testing.assert_allclose(mixed, 0.25 * np.eye(3) / 3 + 0.75 * gram / 14.0)
    for theta in (0.0, 0.25, 1.0):
        assert np.trace(loss_weight(3, gram, theta)) == pytest.approx(1.0)
    np.testing.assert_allclose(loss_weight(3, None, 0.0), np.eye(3) / 3)
    np.testing.assert_allclose(loss_weight(3, np.zeros((3, 3)), 0.0), np.eye(3) / 3)


def test_loss_weight_errors():
    with pytest.raises(OptionsError, match="1.5"):
        loss_weight(3, None, 1.5)
    with pytest.raises(OptionsError, match=r"\(2, 2\)"):
        loss_weight(3, np.eye(2), 0.5)
    with pytest.raises(OptionsError, match="m must be"):
        loss_weight(0, None, 0.5)


def test_default_ridge():
    assert default_ridge(np.diag([1.0, 2.0, 3.0]), 0.1) == pytest.approx(0.2)
    tiny = default_ridge(np.zeros((4, 4)), 1e-3)
    assert 0.0 < tiny < 1e-300
    with pytest.raises(OptionsError, match="-1"):
        default_ridge(np.eye(2), -1.0)


def test_reconstruction_identity_when_all_kept():
    rng = np.random.default_rng(5)
    sigma = _random_psd(rng, 8, 64)
    ridge = 1e-12 * np.trace(sigma) / 8
    a = reconstruction(sigma, np.arange(8), ridge)
    assert a.shape == (8, 8)
    np.testing.assert_allclose(a, np.eye(8), atol=1e-9)


def _reconstruction_error(sigma: np.ndarray, kept: np.ndarray, a: np.ndarray) -> float:
    """E||t - A t_J||^2 = tr(Sigma) - 2 tr(A Sigma[J, :]) + tr(A Sigma[J, J] A^T)."""
    return float(
        np.trace(sigma)
        - 2.0 * np.trace(a @ sigma[kept, :])
        + np.trace(a @ sigma[np.ix_(kept, kept)] @ a.T)
    )


def test_reconstruction_of_linear_combination():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((5, 200))
    x = np.vstack([x, 2.0 * x[0] - x[3] + 0.5 * x[4]])  # channel 5 = combination of 0, 3, 4
    sigma = x @ x.T / 200
    kept = np.array([4, 0, 1, 2, 3])
    ridge = 1e-12 * np.trace(sigma) / 6
    a = reconstruction(sigma, kept, ridge)
    assert a.shape == (6, 5)
    assert abs(_reconstruction_error(sigma, kept, a)) <= 1e-9 * np.trace(sigma)
    np.testing.assert_allclose(a[5], [0.5, 2.0, 0.0, 0.0, -1.0], atol=1e-8)
    # Columns follow `kept`: reversing kept reverses the columns.
    np.testing.assert_allclose(reconstruction(sigma, kept[::-1], ridge), a[:, ::-1], atol=1e-9)


def test_reconstruction_loss_equals_information_loss():
    rng = np.random.default_rng(7)
    sigma = _random_psd(rng, 6, 4)
    kept = np.array([1, 3, 5])
    ridge = default_ridge(sigma, 1e-3)
    a = reconstruction(sigma, kept, ridge)
    # R_J = Sigma - A_J Sigma[J, :], so the loss with M = I is its trace.
    residual = sigma - a @ sigma[kept, :]
    problem = TapProblem(sigma, np.eye(6), ridge)
    assert information_loss([problem], kept) == pytest.approx(np.trace(residual), rel=1e-12)


def test_reconstruction_errors():
    sigma = np.eye(3)
    assert reconstruction(sigma, np.zeros(0, dtype=np.int64), 1.0).shape == (3, 0)
    with pytest.raises(OptionsError, match="3"):
        reconstruction(sigma, np.array([3]), 1.0)
    with pytest.raises(OptionsError, match="ridge"):
        reconstruction(sigma, np.array([0]), 0.0)
    with pytest.raises(StatisticsError, match="positive definite"):
        reconstruction(-np.eye(3), np.array([0, 1]), 1e-3)


def test_large_group_runs_quickly():
    rng = np.random.default_rng(8)
    m, k = 512, 256
    x = rng.standard_normal((m, 700))
    sigma = x @ x.T / 700
    z = rng.standard_normal((300, m))
    problem = TapProblem(sigma, loss_weight(m, z.T @ z, 0.5), default_ridge(sigma, 1e-3))
    start = time.perf_counter()
    path = greedy_select([problem], k)
    elapsed = time.perf_counter() - start
    assert elapsed < 20.0  # generous: O(k m^2) takes well under a second here
    assert np.unique(path.order).size == k
    assert np.all(np.diff(path.losses) <= 0.0)
    exact = information_loss([problem], path.order)
    assert abs(path.losses[-1] - exact) <= 1e-8 * path.losses[0]


@pytest.mark.parametrize(
    "m, ratio, round_to, expected",
    [
        (10, 0.3, 1, 3),
        (10, 0.35, 1, 4),
        (10, 0.5, 4, 8),
        (10, 0.9, 4, 10),
        (10, 0.01, 1, 1),
        (64, 0.5, 8, 32),
        (64, 0.51, 8, 40),
        (7, 1.0, 1, 7),
        (3, 0.1, 2, 2),
    ],
)
def test_uniform_width(m: int, ratio: float, round_to: int, expected: int):
    assert round_width(m, ratio * m, round_to, 1) == expected


def test_l1_norm_order():
    rows = np.array([[1.0, -1.0], [2.0, 0.0], [0.0, 1.0], [-2.0, 0.0], [3.0, -0.5]])
    order = l1_norm_order(rows)
    assert order.dtype == np.int64
    assert order.tolist() == [4, 0, 1, 3, 2]
    conv = np.zeros((3, 2, 3, 3))
    conv[0] = 0.125
    conv[1, 0, 1, 1] = -5.0
    conv[2, 1] = -0.25
    assert l1_norm_order(conv).tolist() == [1, 0, 2]  # norms 2.25, 5, 2.25: tie, 0 first
    assert l1_norm_order(np.array([0.5, -3.0])).tolist() == [1, 0]
    with pytest.raises(OptionsError, match="scalar"):
        l1_norm_order(np.array(1.0))


def test_cross_greedy_equals_greedy_when_the_target_is_the_input() -> None:
    rng = np.random.default_rng(5)
    sigma = _random_psd(rng, 12, 40)
    weight = loss_weight(12, _random_psd(rng, 12, 30), 0.5)
    ridge = default_ridge(sigma, 1e-3)
    expected = greedy_select([TapProblem(sigma, weight, ridge)], 6).order
    order = cross_greedy_select([(sigma, sigma, weight, ridge)], 6)
    np.testing.assert_array_equal(order, expected)


def test_cross_greedy_finds_the_channel_that_carries_the_target() -> None:
    rng = np.random.default_rng(6)
    x = rng.standard_normal((5, 400))
    target = np.vstack([x[3] * 2.0, x[3] * -1.0])  # the target only depends on channel 3
    second = x @ x.T / 400
    cross = target @ x.T / 400
    cross_square = np.zeros((5, 5))
    cross_square[:2] = cross
    order = cross_greedy_select([(second, cross_square, np.eye(5) / 5, 1e-6)], 1)
    assert order.tolist() == [3]


def test_greedy_keeps_lanes_balanced() -> None:
    """A grouped Conv's 9 outputs in 3 lanes: every prefix of 3r channels holds r of each lane,
    and the path still starts with the best channel overall."""
    problems = _problems("random", 9, 2, 1e-3, seed=4)
    free = greedy_select(problems, 9)
    path = greedy_select(problems, 9, lanes=3)
    assert path.order[0] == free.order[0]
    for r in range(1, 4):
        assert np.bincount(path.order[: 3 * r] // 3, minlength=3).tolist() == [r] * 3
    assert np.all(np.diff(path.losses) <= 1e-12)
    with pytest.raises(OptionsError, match="9 channels cannot form 2 equal lanes"):
        greedy_select(problems, 4, lanes=2)


def test_exact_kept_reconstruction_passes_the_kept_channels() -> None:
    """Rank 3 for 6 channels: the kept rows are the identity, the dropped rows the ridge
    regression of the formula."""
    sigma = _random_psd(np.random.default_rng(3), 6, 3)
    kept = np.array([0, 1, 4, 5])
    ridge = default_ridge(sigma, 1e-3)
    formula = reconstruction(sigma, kept, ridge)
    exact = reconstruction(sigma, kept, ridge, exact_kept=True)
    np.testing.assert_array_equal(exact[kept], np.eye(4))
    np.testing.assert_allclose(exact[[2, 3]], formula[[2, 3]])
    assert np.abs(formula[kept] - np.eye(4)).max() > 0.1  # the projection it avoids
