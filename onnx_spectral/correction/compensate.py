"""Sequential compensation (SPEC section 5): reconstruct toward the ORIGINAL model's activations.

Groups are pruned in passes (`schedule.py`). For a pass, the original (normalized) model and the
partially pruned model are merged into one ONNX model (`merged.py`) whose outputs are each tap's
cross moments between the two, gathered over the calibration batches (`cross_run.py`). The
reconstruction of a group is then A = C[:, J] (S[J, J] + lambda I)^-1: from the kept channels
of the pruned model to the original's whole activation (`moments.py`). The first pass (groups
with nothing pruned upstream) needs no extra run: there S = C = Sigma.
"""

from __future__ import annotations

from collections.abc import Sequence

from onnx_spectral.analysis import Analysis, Tap
from onnx_spectral.calibration.collect import KeptActivations, Statistics
from onnx_spectral.calibration.sources import FeedDict
from onnx_spectral.correction.cross_run import (
    ORIGINAL_ACTIVATIONS,
    cross_statistics,
    original_activations,
)
from onnx_spectral.correction.merged import merged_model
from onnx_spectral.correction.schedule import schedule
from onnx_spectral.graph.executor import Executor, LocalExecutor
from onnx_spectral.graph.sessions import Provider
from onnx_spectral.rewrite import rewrite
from onnx_spectral.selection.group_cost import GroupCosts
from onnx_spectral.selection.plan import PlannedGroup, PlanOptions, allocate_widths, plan_group

#: A worker's share of the original model's tap activations kept for the compensation passes.
CACHE_BYTES = 1 << 30


def originals_to_keep(analysis: Analysis, compensate: bool, samples: int
                      ) -> KeptActivations | None:
    """The original model's activations the compensation passes read (on their first
    `samples` samples), for calibration's own pass over the first batches to keep rather than
    one more pass; None without compensation or later taps."""
    later = later_taps(analysis) if compensate else []
    if not later:
        return None
    return KeptActivations(tuple(tap.tensor for tap in later), samples, ORIGINAL_ACTIVATIONS,
                           CACHE_BYTES)


def later_taps(analysis: Analysis) -> list[Tap]:
    """The taps of the groups pruned after the first pass: the original model's activations
    the compensation passes read."""
    return [tap for groups in schedule(analysis)[1:] for group in groups for tap in group.taps]


def compensated_plans(analysis: Analysis, statistics: Statistics, options: PlanOptions,
                      batches: Sequence[FeedDict], provider: Provider,
                      costs: GroupCosts | None = None, cache_bytes: int = CACHE_BYTES,
                      executor: Executor | None = None, originals_kept: bool = False
                      ) -> tuple[PlannedGroup, ...]:
    """Plans with sequential compensation; widths and kept channels as `plan_groups` chooses.

    `batches`: the calibration batches read by each pass after the first. The original model's
    tap activations are computed once and kept by the workers (`executor`, default this
    process) when a worker's share fits in `cache_bytes`; each pass then runs only the pruned
    model up to its taps. Otherwise every pass runs both models. `originals_kept`: the
    calibration pass left those activations (`later_taps`) in the caches already.
    """
    executor = executor or LocalExecutor()
    widths, paths = allocate_widths(analysis, statistics, options, costs)
    width_of = {group.id: int(width) for group, width in zip(analysis.prunable, widths,
                                                              strict=True)}
    passes = schedule(analysis)
    later = later_taps(analysis)
    cached = bool(later) and options.reconstruct and (
        originals_kept
        or original_activations(analysis, later, batches, provider, cache_bytes, executor))
    planned: dict[int, PlannedGroup] = {}
    for number, groups in enumerate(passes):
        compensation = None
        pruned_so_far = any(item.plan.kept.size < item.plan.group.channels
                            for item in planned.values())
        if number > 0 and options.reconstruct and pruned_so_far:
            pruned = rewrite(analysis, [item.plan for item in planned.values()])
            model, outputs = merged_model(analysis, pruned,
                                          [tap for group in groups for tap in group.taps],
                                          cached=cached)
            compensation = cross_statistics(model, outputs, batches, provider,
                                            cached=cached, executor=executor,
                                            desc=f"compensation pass {number + 1}/{len(passes)}")
        for group in groups:
            planned[group.id] = plan_group(analysis, group, statistics, options,
                                           width_of[group.id], paths.get(group.id),
                                           compensation)
    executor.forget(ORIGINAL_ACTIVATIONS)
    return tuple(planned[group.id] for group in analysis.prunable)
