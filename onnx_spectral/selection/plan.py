"""From statistics to a plan per group: widths, kept channels and reconstruction matrices.

This is where the graph (sink weights, producer weights) meets the pure selection math of
`select.py` and `widths.py`: each tap of a group becomes a `TapProblem` (its Sigma, its ridge,
its loss weight mixed from the sinks' Z^T Z by theta); the widths come from `--ratio` or from a
`--flops`/`--params` budget split by the chosen allocation; each base group keeps its width in
channels chosen by greedy spectral selection (or by a baseline: filter L1 norm, random), each
tap gets its ridge reconstruction (or the compensated one, or plain channel dropping for the
baselines), and a Concat/Split group takes its parts' kept channels with one reconstruction per
tap over all of them.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from onnx_spectral.analysis import Analysis, ChannelGroup, Tap
from onnx_spectral.calibration.collect import Statistics
from onnx_spectral.ops import require_handler
from onnx_spectral.selection.affine import affine_reconstruction, supports_offset
from onnx_spectral.selection.baselines import Selection, baseline_kept
from onnx_spectral.selection.cross_select import cross_greedy_select
from onnx_spectral.selection.group_cost import GroupCosts
from onnx_spectral.selection.heads import greedy_select_blocks
from onnx_spectral.selection.moments import (
    CrossMoments,
    affine_cross_reconstruction,
    cross_reconstruction,
)
from onnx_spectral.selection.spectral import (
    GreedyPath,
    TapProblem,
    default_ridge,
    greedy_select,
    loss_weight,
    reconstruction,
)
from onnx_spectral.selection.stream_unit import loss_units
from onnx_spectral.selection.widths import (
    Allocation,
    allocate_dof,
    allocate_greedy,
    allocate_uniform,
    degrees_of_freedom,
    normalized_spectrum,
    round_width,
)


@dataclass(frozen=True, eq=False)
class GroupPlan:
    """What to do with one prunable group.

    `kept`: [k] int64 sorted channel indices that stay. `reconstructions`: per tap tensor, the
    matrix A ([m, k], columns in the order of `kept`) folded into that tap's sinks.
    """

    group: ChannelGroup
    kept: np.ndarray
    reconstructions: Mapping[str, np.ndarray]
    offsets: Mapping[str, np.ndarray] | None = None
    """Per tap tensor, the affine offset c ([m]) folded into its sinks' biases (optional)."""


@dataclass(frozen=True)
class PlanOptions:
    """Selection settings (SPEC section 3)."""

    ratio: float = 0.5
    theta: float = 0.5
    rho: float = 1e-3
    round_to: int = 1
    selection: Selection = "spectral"
    reconstruct: bool = True
    flops: float | None = None
    """Fraction of the whole model's MACs to keep (replaces `ratio` when given)."""
    params: float | None = None
    """Fraction of the whole model's parameters to keep (replaces `ratio` when given)."""
    allocation: Allocation = "uniform"
    """How a `flops`/`params` budget is split into group widths."""
    min_keep: int = 1
    affine: bool = False
    """Affine reconstruction (centered statistics, offset folded into sink biases) where the
    sinks allow it, compensated taps included."""
    cross_selection: bool = False
    """Under compensation, choose the kept channels toward the original's activation too."""

    @property
    def budgeted(self) -> bool:
        return self.flops is not None or self.params is not None

    @property
    def needs_statistics(self) -> bool:
        """False only for the baseline that drops L1-chosen channels without reconstruction."""
        return (self.selection == "spectral" or self.reconstruct
                or (self.budgeted and self.allocation != "uniform"))


@dataclass(frozen=True, eq=False)
class PlannedGroup:
    """A group's plan and the selection by-products the report shows.

    `loss_curve`: [k+1] greedy losses normalized by the loss of keeping nothing (None for L1).
    """

    plan: GroupPlan
    loss_curve: np.ndarray | None
    spectrum: np.ndarray | None = None
    """[m] eigenvalues of Sigma / trace(Sigma) (mean over the taps), descending."""
    rho: float = 1e-3

    @property
    def dof(self) -> float | None:
        """Degrees of freedom N(lambda) of the spectrum at the ridge's relative lambda."""
        return None if self.spectrum is None else degrees_of_freedom(self.spectrum, self.rho)


def _lane_diagonal(matrix: np.ndarray, lanes: int) -> np.ndarray:
    """`matrix` [m, m] with the entries between different lanes (of m / lanes consecutive
    channels) set to zero: what a lane-by-lane reconstruction sees."""
    lane = np.arange(matrix.shape[0]) // (matrix.shape[0] // lanes)
    return np.where(lane[:, None] == lane[None, :], matrix, 0.0)


def _lane_local(moments: CrossMoments, lanes: int) -> CrossMoments:
    """Moments whose reconstruction `cross_reconstruction` is block-diagonal over the lanes."""
    return CrossMoments(_lane_diagonal(moments.second, lanes), _lane_diagonal(moments.cross, lanes),
                        moments.mean_pruned, moments.mean_original)


def _problem(analysis: Analysis, tap: Tap, statistics: Statistics, options: PlanOptions,
             window: tuple[int, int] | None = None, lanes: int = 1) -> TapProblem:
    """The selection problem of a tap; of its channels offset..offset+size when `window` is
    given (a base group's part of a concatenated tap); within each of `lanes` lanes only
    (cross-lane entries zeroed) when a grouped Conv reads them."""
    sigma = statistics[tap.tensor].sigma
    graph = analysis.graph
    sink_gram = np.zeros((tap.channels, tap.channels))
    for sink in tap.sinks:
        node = graph.nodes_by_name[sink.node]
        sink_gram += require_handler(node).sink_gram(node, sink, tap.channels, graph)
    if window is not None:
        offset, size = window
        sigma = sigma[offset : offset + size, offset : offset + size]
        sink_gram = sink_gram[offset : offset + size, offset : offset + size]
    if lanes > 1:
        sigma, sink_gram = _lane_diagonal(sigma, lanes), _lane_diagonal(sink_gram, lanes)
    weight = loss_weight(sigma.shape[0], sink_gram, options.theta)
    return TapProblem(sigma, weight, default_ridge(sigma, options.rho))


def _greedy(problems: Sequence[TapProblem], group: ChannelGroup, width: int) -> GreedyPath:
    """The greedy path of `width` channels: whole heads for a head group."""
    if group.block > 1:
        return greedy_select_blocks(problems, group.block, width)
    return greedy_select(problems, width, group.lanes)


def _dropping(channels: int, kept: np.ndarray) -> np.ndarray:
    """A ([m, k]) that keeps channels `kept` as they are and drops the rest: no reconstruction."""
    selector = np.zeros((channels, kept.size))
    selector[kept, np.arange(kept.size)] = 1.0
    return selector


def group_spectrum(analysis: Analysis, group: ChannelGroup,
                   statistics: Statistics) -> np.ndarray | None:
    """[m] normalized eigenvalues of the group's Sigma, averaged over its taps (None when only
    concatenations read the group: it has no tap of its own)."""
    spectra = [normalized_spectrum(statistics[tap.tensor].sigma) for tap in group.taps]
    return np.mean(spectra, axis=0) if spectra else None


def group_problems(analysis: Analysis, group: ChannelGroup, statistics: Statistics,
                   options: PlanOptions) -> list[TapProblem]:
    """The selection problem of each tap of `group`."""
    lanes = group.lanes if group.lane_local else 1
    return [_problem(analysis, tap, statistics, options, lanes=lanes) for tap in group.taps]


Window = tuple[Tap, int]
"""A tap of a derived group that contains a base group, with the base group's offset in it."""


def _window_problems(analysis: Analysis, group: ChannelGroup, statistics: Statistics,
                     options: PlanOptions, windows: Sequence[Window]) -> list[TapProblem]:
    """The problems of the concatenated taps' blocks over `group`'s channels."""
    return [_problem(analysis, tap, statistics, options, (offset, group.channels))
            for tap, offset in windows]


def _windows(analysis: Analysis) -> dict[int, list[Window]]:
    """For each base group, the taps of prunable derived groups containing it."""
    windows: dict[int, list[Window]] = {}
    for group in analysis.prunable:
        for part, offset, _ in group.parts:
            if part is not None:
                windows.setdefault(part, []).extend((tap, offset) for tap in group.taps)
    return windows


def _selection_spectrum(analysis: Analysis, group: ChannelGroup, statistics: Statistics,
                        options: PlanOptions, windows: Sequence[Window]) -> np.ndarray:
    """[m] the group's spectrum, from its concatenated taps' blocks when it has no tap."""
    own = group_spectrum(analysis, group, statistics)
    if own is not None:
        return own
    problems = _window_problems(analysis, group, statistics, options, windows)
    return np.mean([normalized_spectrum(problem.sigma) for problem in problems], axis=0)


def allocate_widths(analysis: Analysis, statistics: Statistics, options: PlanOptions,
                    costs: GroupCosts | None) -> tuple[np.ndarray, dict[int, GreedyPath]]:
    """Widths ([G], over `analysis.base_groups`) and the greedy paths computed on the way.

    Without a budget every group keeps `ratio` of its channels; with `flops`/`params` the
    allocation meets the budget on the cost model `costs` (required then). A factorized group
    (`ChannelGroup.whole_above`) wider than its limit keeps every channel: that costs less.
    """
    widths, paths = _allocation(analysis, statistics, options, costs)
    return np.array([group.channels if group.whole_above is not None
                     and width > group.whole_above else width
                     for group, width in zip(analysis.base_groups, widths, strict=True)],
                    dtype=np.int64), paths


def _allocation(analysis: Analysis, statistics: Statistics, options: PlanOptions,
                costs: GroupCosts | None) -> tuple[np.ndarray, dict[int, GreedyPath]]:
    """`allocate_widths` before factorized groups above their `whole_above` are made whole."""
    groups = analysis.base_groups
    paths: dict[int, GreedyPath] = {}
    if not options.budgeted:
        return np.array([round_width(g.channels, options.ratio * g.channels, options.round_to,
                                     options.min_keep, g.step) for g in groups],
                        dtype=np.int64), paths
    assert costs is not None
    model = costs.macs if options.flops is not None else costs.params
    fraction = options.flops if options.flops is not None else options.params
    assert fraction is not None
    budget = model.budget(fraction)
    steps = (options.round_to, options.min_keep)
    if options.allocation == "uniform":
        return allocate_uniform(model, budget, *steps), paths
    windows = _windows(analysis)
    if options.allocation == "dof":
        spectra = [_selection_spectrum(analysis, group, statistics, options,
                                       windows.get(group.id, ())) for group in groups]
        return allocate_dof(model, budget, spectra, *steps), paths
    for group in groups:
        problems = (group_problems(analysis, group, statistics, options)
                    + _window_problems(analysis, group, statistics, options,
                                       windows.get(group.id, ())))
        paths[group.id] = _greedy(problems, group, group.channels)
    units = loss_units(analysis, statistics,
                       {group.id: float(paths[group.id].losses[0]) for group in groups})
    curves = [paths[group.id].losses / units[group.id] for group in groups]
    return allocate_greedy(model, budget, curves, *steps), paths


def plan_group(analysis: Analysis, group: ChannelGroup, statistics: Statistics,
               options: PlanOptions, width: int | None = None, path: GreedyPath | None = None,
               compensation: Mapping[str, CrossMoments] | None = None,
               windows: Sequence[Window] = ()) -> PlannedGroup:
    """Choose the kept channels of one prunable base group and its taps' reconstructions.

    `width`: channels to keep (default: `ratio` of them). `path`: a greedy path of at least
    `width` steps already computed for this group (its prefix is the selection).
    `compensation`: per tap tensor, its moments between the original and the partially pruned
    model; the reconstruction then maps the pruned model's kept channels to the original's
    activation, A = C[:, J] (S[J, J] + lambda I)^-1 (SPEC section 5; `moments.py`).
    `windows`: taps of concatenations that contain the group; their blocks over the group's
    channels join its own taps in the selection (their reconstruction is the derived group's).
    """
    if width is None:
        width = round_width(group.channels, options.ratio * group.channels, options.round_to, 1,
                            group.step)
    if width == group.channels and compensation is None:
        kept = np.arange(group.channels)  # nothing is dropped: nothing to reconstruct (exact)
        identity = _dropping(group.channels, kept)
        return PlannedGroup(GroupPlan(group, kept, {tap.tensor: identity for tap in group.taps}),
                            None)
    if not options.needs_statistics:
        kept = np.sort(baseline_kept(analysis, group, width, options.selection))
        dropping = _dropping(group.channels, kept)
        return PlannedGroup(GroupPlan(group, kept, {tap.tensor: dropping for tap in group.taps}),
                            None)
    problems = group_problems(analysis, group, statistics, options)
    curve = None
    if options.selection == "spectral" and compensation is not None and \
            options.cross_selection and group.step == 1:
        kept = np.sort(cross_greedy_select(
            [(compensation[tap.tensor].second, compensation[tap.tensor].cross, problem.weight,
              default_ridge(compensation[tap.tensor].second, options.rho))
             for tap, problem in zip(group.taps, problems, strict=True)], width))
        if path is not None:
            curve = path.losses / max(path.losses[0], np.finfo(np.float64).tiny)
    elif options.selection == "spectral":
        if path is None or path.order.size < width:
            windowed = _window_problems(analysis, group, statistics, options, windows)
            path = _greedy(problems + windowed, group, width)
        kept = np.sort(path.order[:width])
        curve = path.losses / max(path.losses[0], np.finfo(np.float64).tiny)
    else:
        kept = np.sort(baseline_kept(analysis, group, width, options.selection))
    reconstructions = {}
    offsets = {}
    affine = options.affine and not group.lane_local  # an offset would couple the lanes
    for tap, problem in zip(group.taps, problems, strict=True):
        # fewer rows than channels: the kept channels pass unchanged (`reconstruction`)
        singular = statistics[tap.tensor].count < group.channels
        if not options.reconstruct:
            reconstructions[tap.tensor] = _dropping(group.channels, kept)
        elif compensation is not None and tap.tensor in compensation:
            moments = compensation[tap.tensor]
            if group.lane_local:
                moments = _lane_local(moments, group.lanes)
            ridge = default_ridge(moments.second, options.rho)
            if affine and supports_offset(analysis.graph, tap):
                reconstructions[tap.tensor], offsets[tap.tensor] = affine_cross_reconstruction(
                    moments, kept, ridge, singular)
            else:
                reconstructions[tap.tensor] = cross_reconstruction(moments, kept, ridge,
                                                                   singular)
        elif affine and supports_offset(analysis.graph, tap):
            reconstructions[tap.tensor], offsets[tap.tensor] = affine_reconstruction(
                problem.sigma, statistics[tap.tensor].mean, kept, problem.ridge, singular)
        else:
            reconstructions[tap.tensor] = reconstruction(problem.sigma, kept, problem.ridge,
                                                         singular)
    return PlannedGroup(GroupPlan(group, kept, reconstructions, offsets or None), curve,
                        group_spectrum(analysis, group, statistics), options.rho)


def plan_derived(analysis: Analysis, group: ChannelGroup, kept_by_group: dict[int, np.ndarray],
                 statistics: Statistics, options: PlanOptions) -> PlannedGroup:
    """A derived group's plan: its parts' kept channels (frozen parts whole) at their offsets,
    and one reconstruction per tap over all of them."""
    kept = np.concatenate([
        offset + kept_by_group.get(part, np.arange(size)) if part is not None
        else offset + np.arange(size)
        for part, offset, size in group.parts
    ]).astype(np.int64)
    reconstructions = {}
    for tap in group.taps:
        if options.reconstruct and kept.size < group.channels:
            problem = _problem(analysis, tap, statistics, options)
            reconstructions[tap.tensor] = reconstruction(
                problem.sigma, kept, problem.ridge, statistics[tap.tensor].count < group.channels)
        else:
            reconstructions[tap.tensor] = _dropping(group.channels, kept)
    return PlannedGroup(GroupPlan(group, kept, reconstructions), None)


def plan_groups(analysis: Analysis, statistics: Statistics, options: PlanOptions,
                costs: GroupCosts | None = None) -> tuple[PlannedGroup, ...]:
    """Plans for every prunable group (parallel statistics): base groups, then derived ones."""
    widths, paths = allocate_widths(analysis, statistics, options, costs)
    windows = _windows(analysis)
    base = [plan_group(analysis, group, statistics, options, int(width), paths.get(group.id),
                       windows=windows.get(group.id, ()))
            for group, width in zip(analysis.base_groups, widths, strict=True)]
    kept = {item.plan.group.id: item.plan.kept for item in base}
    derived = [plan_derived(analysis, group, kept, statistics, options)
               for group in analysis.prunable if group.parts]
    return (*base, *derived)
