"""From statistics to a plan per group: widths, kept channels and reconstruction matrices.

This is where the graph (sink weights, producer weights) meets the pure selection math of
`select.py`: each tap of a group becomes a `TapProblem` (its Sigma, its ridge, its loss weight
mixed from the sinks' Z^T Z by theta), the group keeps `uniform_width` channels chosen by greedy
spectral selection (or by filter L1 norm, the Li et al. baseline), and each tap gets its ridge
reconstruction (or plain channel dropping for the baseline without reconstruction).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from .analysis import Analysis, ChannelGroup, Tap
from .calibrate import Statistics
from .ops import handler_for
from .rewrite import GroupPlan
from .select import (
    TapProblem,
    default_ridge,
    greedy_select,
    l1_norm_order,
    loss_weight,
    reconstruction,
    uniform_width,
)

Selection = Literal["spectral", "l1"]
#: Automatic width rounding (`round_to` 0): groups of at least AUTO_ROUND_MIN channels keep a
#: multiple of AUTO_ROUND_TO. Measured by tools/bench_speed.py (CREPE full, MACs kept 0.54,
#: batch 1, ONNX Runtime CPU): widths rounded to 8 run 2.29x faster than the original, unrounded
#: widths 0.97x (they miss ONNX Runtime's blocked convolution kernels); 16 and 32 gave 1.97x and
#: 1.85x for slightly more MACs.
AUTO_ROUND_TO = 8
AUTO_ROUND_MIN = 64


@dataclass(frozen=True)
class PlanOptions:
    """Selection settings (SPEC section 3)."""

    ratio: float = 0.5
    theta: float = 0.5
    rho: float = 1e-3
    round_to: int = 1
    selection: Selection = "spectral"
    reconstruct: bool = True

    @property
    def needs_statistics(self) -> bool:
        """False only for the baseline that drops L1-chosen channels without reconstruction."""
        return self.selection == "spectral" or self.reconstruct


@dataclass(frozen=True, eq=False)
class PlannedGroup:
    """A group's plan and the selection by-products the report shows.

    `loss_curve`: [k+1] greedy losses normalized by the loss of keeping nothing (None for L1).
    """

    plan: GroupPlan
    loss_curve: np.ndarray | None


def _problem(analysis: Analysis, tap: Tap, statistics: Statistics, options: PlanOptions,
             window: tuple[int, int] | None = None) -> TapProblem:
    """The selection problem of a tap; of its channels offset..offset+size when `window` is
    given (a base group's part of a concatenated tap)."""
    sigma = statistics[tap.tensor].sigma
    graph = analysis.graph
    sink_gram = np.zeros((tap.channels, tap.channels))
    for sink in tap.sinks:
        node = graph.nodes_by_name[sink.node]
        handler = handler_for(node.op_type, node.domain)
        assert handler is not None
        sink_gram += handler.sink_gram(node, sink, tap.channels, graph)
    if window is not None:
        offset, size = window
        sigma = sigma[offset : offset + size, offset : offset + size]
        sink_gram = sink_gram[offset : offset + size, offset : offset + size]
    weight = loss_weight(sigma.shape[0], sink_gram, options.theta)
    return TapProblem(sigma, weight, default_ridge(sigma, options.rho))


def _l1_kept(analysis: Analysis, group: ChannelGroup, width: int) -> np.ndarray:
    graph = analysis.graph
    norms = np.zeros(group.channels)
    for producer in group.producers:
        node = graph.nodes_by_name[producer]
        handler = handler_for(node.op_type, node.domain)
        assert handler is not None
        rows = handler.output_rows(node, graph).astype(np.float64)
        norms += np.abs(rows.reshape(rows.shape[0], -1)).sum(axis=1)
    return l1_norm_order(norms[:, None])[:width]


def _dropping(channels: int, kept: np.ndarray) -> np.ndarray:
    """A ([m, k]) that keeps channels `kept` as they are and drops the rest: no reconstruction."""
    selector = np.zeros((channels, kept.size))
    selector[kept, np.arange(kept.size)] = 1.0
    return selector


Window = tuple[Tap, int]
"""A tap of a derived group that contains a base group, with the base group's offset in it."""


def plan_group(analysis: Analysis, group: ChannelGroup, statistics: Statistics,
               options: PlanOptions, windows: Sequence[Window] = ()) -> PlannedGroup:
    """Choose the kept channels of one prunable base group and its taps' reconstructions.

    `windows`: taps of concatenations that contain the group; their blocks over the group's
    channels join its own taps in the selection (their reconstruction is the derived group's).
    """
    round_to = options.round_to or (AUTO_ROUND_TO if group.channels >= AUTO_ROUND_MIN else 1)
    width = uniform_width(group.channels, options.ratio, round_to)
    if width == group.channels:  # nothing is dropped, so nothing to reconstruct (exact)
        kept = np.arange(group.channels)
        identity = _dropping(group.channels, kept)
        return PlannedGroup(GroupPlan(group, kept, {tap.tensor: identity for tap in group.taps}),
                            None)
    if not options.needs_statistics:
        kept = np.sort(_l1_kept(analysis, group, width))
        dropping = _dropping(group.channels, kept)
        return PlannedGroup(GroupPlan(group, kept, {tap.tensor: dropping for tap in group.taps}),
                            None)
    problems = [_problem(analysis, tap, statistics, options) for tap in group.taps]
    windowed = [_problem(analysis, tap, statistics, options, (offset, group.channels))
                for tap, offset in windows]
    curve = None
    if options.selection == "spectral":
        path = greedy_select(problems + windowed, width)
        kept = np.sort(path.order)
        curve = path.losses / max(path.losses[0], np.finfo(np.float64).tiny)
    else:
        kept = np.sort(_l1_kept(analysis, group, width))
    reconstructions = {
        tap.tensor: reconstruction(problem.sigma, kept, problem.ridge)
        for tap, problem in zip(group.taps, problems, strict=True)
    }
    return PlannedGroup(GroupPlan(group, kept, reconstructions), curve)


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
        if options.reconstruct:
            problem = _problem(analysis, tap, statistics, options)
            reconstructions[tap.tensor] = reconstruction(problem.sigma, kept, problem.ridge)
        else:
            reconstructions[tap.tensor] = _dropping(group.channels, kept)
    return PlannedGroup(GroupPlan(group, kept, reconstructions), None)


def _windows(analysis: Analysis) -> dict[int, list[Window]]:
    """For each base group, the taps of prunable derived groups containing it."""
    windows: dict[int, list[Window]] = {}
    for group in analysis.prunable:
        for part, offset, _ in group.parts:
            if part is not None:
                windows.setdefault(part, []).extend((tap, offset) for tap in group.taps)
    return windows


def plan_groups(analysis: Analysis, statistics: Statistics,
                options: PlanOptions) -> tuple[PlannedGroup, ...]:
    """Plans for every prunable group of the analysis: base groups, then derived ones."""
    windows = _windows(analysis)
    base = [plan_group(analysis, group, statistics, options, windows.get(group.id, ()))
            for group in analysis.prunable if not group.parts]
    kept = {item.plan.group.id: item.plan.kept for item in base}
    derived = [plan_derived(analysis, group, kept, statistics, options)
               for group in analysis.prunable if group.parts]
    return (*base, *derived)
