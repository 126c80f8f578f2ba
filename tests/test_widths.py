"""Widths under a whole-model budget: cost models, uniform / dof / greedy allocations."""

from __future__ import annotations

import numpy as np
import pytest

from onnx_spectral.analysis import analyze
from onnx_spectral.cost import model_cost
from onnx_spectral.errors import OptionsError
from onnx_spectral.rewrite import rewrite
from onnx_spectral.selection.group_cost import group_costs
from onnx_spectral.selection.plan import GroupPlan
from onnx_spectral.selection.widths import (
    CostModel,
    CostTerm,
    allocate_dof,
    allocate_greedy,
    allocate_uniform,
    degrees_of_freedom,
    dof_widths,
    normalized_spectrum,
    round_width,
    uniform_widths,
)
from tests import graphs


def _chain(sizes: list[int], inner: int = 4) -> CostModel:
    """conv chain: input(inner) -> g0 -> g1 -> ... ; cost of layer i = k_{i-1} * k_i."""
    terms = []
    count = len(sizes)
    for i in range(count):
        shrink = np.zeros((2, count))
        shrink[0, i] = 1.0
        if i > 0:
            shrink[1, i - 1] = 1.0
        dims = np.array([sizes[i], sizes[i - 1] if i else inner], dtype=np.float64)
        terms.append(CostTerm(1.0, dims, shrink))
    return CostModel(np.array(sizes), 10.0, tuple(terms))


def test_cost_model_is_bilinear_in_neighbouring_widths() -> None:
    cost = _chain([8, 6])
    assert cost.full == 10 + 8 * 4 + 6 * 8
    assert cost([4, 3]) == 10 + 4 * 4 + 3 * 4
    # removing a channel of group 0 also removes the cost its channel had in layer 1
    assert cost([7, 6]) - cost([8, 6]) == -(4 + 6)


@pytest.mark.parametrize(("m", "width", "round_to", "min_keep", "expected"), [
    (10, 3.0000000001, 1, 1, 3), (10, 3.2, 1, 1, 4), (10, 3.2, 4, 1, 4), (10, 4.1, 4, 1, 8),
    (10, 9.5, 4, 1, 10), (10, 0.0, 1, 1, 1), (10, 0.0, 1, 3, 3), (2, 0.0, 1, 3, 2),
])
def test_round_width(m: int, width: float, round_to: int, min_keep: int, expected: int) -> None:
    assert round_width(m, width, round_to, min_keep) == expected


def test_uniform_widths_match_ceil() -> None:
    assert uniform_widths([10, 7, 1], 0.3).tolist() == [3, 3, 1]
    assert uniform_widths([10, 7, 1], 0.3, round_to=4).tolist() == [4, 4, 1]


@pytest.mark.parametrize("fraction", [0.2, 0.35, 0.5, 0.8])
def test_uniform_allocation_meets_budget_within_one_step(fraction: float) -> None:
    cost = _chain([64, 32, 48])
    budget = fraction * cost.full
    widths = allocate_uniform(cost, budget)
    assert cost(widths) <= budget
    # one more channel in every group would overshoot: the budget is met within one step
    assert cost(np.minimum(widths + 1, cost.sizes)) > budget


def test_allocation_below_the_minimum_is_refused() -> None:
    cost = _chain([8, 8])
    with pytest.raises(OptionsError, match="min-keep"):
        allocate_uniform(cost, 0.01 * cost.full, min_keep=4)


def test_spectrum_and_degrees_of_freedom() -> None:
    sigma = np.diag([3.0, 1.0, 0.0, 0.0])
    spectrum = normalized_spectrum(sigma)
    np.testing.assert_allclose(spectrum, [0.75, 0.25, 0.0, 0.0])
    assert degrees_of_freedom(spectrum, 0.25) == pytest.approx(0.75 / 1.0 + 0.25 / 0.5)
    assert dof_widths([spectrum], 1e-12).tolist() == [2]  # zero eigenvalues cost no width


def test_dof_allocation_shrinks_the_fast_decaying_group() -> None:
    flat = np.full(16, 1 / 16)
    decaying = np.array([0.9] + [0.1 / 15] * 15)
    cost = _chain([16, 16])
    budget = 0.3 * cost.full
    widths = allocate_dof(cost, budget, [flat, decaying])
    assert cost(widths) <= budget
    assert widths[0] > widths[1]


def test_greedy_allocation_follows_marginal_gain_per_cost() -> None:
    cost = _chain([8, 8])
    # group 0: loss drops fast then flat; group 1: linear decrease
    flat_after_two = np.array([1.0, 0.3, 0.01] + [0.0] * 6)
    linear = np.linspace(1.0, 0.0, 9)
    budget = 0.45 * cost.full
    widths = allocate_greedy(cost, budget, [flat_after_two, linear])
    assert cost(widths) <= budget
    assert widths[0] <= 3  # no width spent where the loss is already flat
    assert widths[1] > widths[0]
    # nothing else fits: growing any group by one step overshoots
    for g in range(2):
        grown = widths.copy()
        grown[g] += 1
        assert grown[g] > 8 or cost(grown) > budget


def test_greedy_allocation_respects_round_to_and_min_keep() -> None:
    cost = _chain([16, 16])
    curves = [np.linspace(1.0, 0.0, 17)] * 2
    widths = allocate_greedy(cost, 0.4 * cost.full, curves, round_to=4, min_keep=4)
    assert all(w % 4 == 0 and w >= 4 for w in widths)


@pytest.mark.parametrize("make", [
    lambda: graphs.conv_sandwich(graphs.relu_batchnorm),
    lambda: graphs.flatten_head("flatten"),
    lambda: graphs.residual_block(),
    lambda: graphs.concat_channels(),
    lambda: graphs.split_halves_combined(),
    lambda: graphs.conv_sandwich(graphs.grouped_conv, channels=8),
    lambda: graphs.gemm_mlp(1),
])
def test_group_cost_model_equals_cost_of_rewritten_model(make: object) -> None:
    model = make()  # type: ignore[operator]
    analysis = analyze(model)
    costs = group_costs(analysis)
    assert costs.macs.full == model_cost(analysis.graph.model).macs
    assert costs.params.full == model_cost(analysis.graph.model).params
    rng = np.random.default_rng(0)
    for _ in range(3):
        widths = [g.step * int(rng.integers(1, g.channels // g.step + 1))
                  for g in costs.groups]
        plans = []
        for g, k in zip(costs.groups, widths, strict=True):
            lane = g.channels // g.lanes  # the first k / lanes channels of each lane
            kept = np.flatnonzero(np.arange(g.channels) % lane < k // g.lanes)
            plans.append(GroupPlan(g, kept, {t.tensor: np.eye(g.channels)[:, kept]
                                             for t in g.taps}))
        kept = {plan.group.id: plan.kept for plan in plans}
        for derived in (g for g in analysis.prunable if g.parts):  # a Concat of base groups
            index = np.concatenate([offset + kept.get(part, np.arange(size))
                                    for part, offset, size in derived.parts])
            plans.append(GroupPlan(derived, index, {t.tensor: np.eye(derived.channels)[:, index]
                                                    for t in derived.taps}))
        after = model_cost(rewrite(analysis, plans))
        assert costs.macs(widths) == after.macs
        assert costs.params(widths) == after.params


@pytest.mark.parametrize("allocation", ["uniform", "dof", "greedy"])
def test_cli_meets_a_flops_budget_and_reports_it(tmp_path: object, allocation: str) -> None:
    import json
    from pathlib import Path

    import onnx

    from onnx_spectral.cli import main

    folder = Path(str(tmp_path))
    model = graphs.residual_block(channels=6)
    onnx.save(model, folder / "in.onnx")
    code = main([str(folder / "in.onnx"), str(folder / "out.onnx"), "--calib", "random",
                 "--calib-samples", "64", "--verify-samples", "8", "--flops", "0.5",
                 "--allocation", allocation, "--report", str(folder / "report.json")])
    assert code == 0
    report = json.loads((folder / "report.json").read_text())
    assert report["macs"]["after"] <= 0.5 * report["macs"]["before"]
    assert report["macs"]["after"] >= 0.3 * report["macs"]["before"]
    assert all(len(g["spectrum"]) == g["channels"] for g in report["groups"] if not g["frozen"])


def test_cli_writes_plots(tmp_path: object) -> None:
    pytest.importorskip("matplotlib")
    from pathlib import Path

    import onnx

    from onnx_spectral.cli import main

    folder = Path(str(tmp_path))
    onnx.save(graphs.conv_sandwich(graphs.unary("Relu")), folder / "in.onnx")
    assert main([str(folder / "in.onnx"), str(folder / "out.onnx"), "--calib", "random",
                 "--calib-samples", "32", "--flops", "0.6", "--plots",
                 str(folder / "plots")]) == 0
    assert (folder / "plots" / "spectra.png").stat().st_size > 1000
    assert (folder / "plots" / "widths.png").stat().st_size > 1000


def test_both_budgets_are_refused() -> None:
    from onnx_spectral import CompressOptions

    with pytest.raises(OptionsError, match="flops or params"):
        CompressOptions(flops=0.5, params=0.5)
    with pytest.raises(OptionsError, match="allocation"):
        CompressOptions(allocation="best")  # type: ignore[arg-type]


def test_automatic_rounding_keeps_multiples_of_eight_from_thirty_two_up() -> None:
    """round_to 0: in groups of >= 64 channels, widths below 32 stay as they are and grow by 1;
    from 32 up they are multiples of 8 and grow by 8."""
    assert round_width(128, 0.0, 0, 1) == 1
    assert round_width(128, 11.0, 0, 1) == 11
    assert round_width(128, 23.0, 0, 1) == 23
    assert round_width(128, 31.5, 0, 1) == 32
    assert round_width(128, 33.0, 0, 1) == 40
    assert round_width(128, 41.0, 0, 1) == 48
    assert round_width(32, 21.0, 0, 1) == 21
    assert round_width(70, 69.0, 0, 1) == 70  # clipped to the group
    cost = CostModel(np.array([128, 32]), 0.0, (CostTerm(1.0, np.array([128.0, 32.0]),
                                                         np.array([[1.0, 0.0], [0.0, 1.0]])),))
    for budget, small in ((0.4, False), (0.1, True)):
        widths = allocate_greedy(cost, budget * cost.full, [np.linspace(1, 0, 129),
                                                             np.linspace(1, 0, 33)], round_to=0)
        assert (widths[0] < 32) == small
        assert widths[0] < 32 or widths[0] % 8 == 0


def test_batched_costs_equal_the_single_evaluations_exactly() -> None:
    """`CostModel.costs` gives bit for bit what `CostModel.__call__` gives, row by row: the
    greedy allocation compares these numbers, so a last-digit difference could change a width."""
    rng = np.random.default_rng(7)
    sizes = np.array([16, 48, 64, 9])
    terms = []
    for _ in range(12):
        depth = int(rng.integers(1, 4))
        shrink = np.zeros((depth, len(sizes)))
        for axis in range(depth):
            shrink[axis, rng.integers(len(sizes))] = float(rng.integers(1, 10))
        dims = np.array([float(shrink[axis] @ sizes) + rng.integers(0, 5) for axis in range(depth)])
        terms.append(CostTerm(float(rng.uniform(0.1, 9.0)), dims, shrink))
    cost = CostModel(sizes, 3.25, tuple(terms))
    widths = np.stack([rng.integers(1, sizes + 1) for _ in range(20)])
    assert cost.costs(widths).tolist() == [cost(row) for row in widths]
    assert CostModel(sizes, 2.0, ()).costs(widths[:3]).tolist() == [2.0, 2.0, 2.0]
