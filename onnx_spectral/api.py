"""`compress`: the only place that orders the pipeline stages.

load -> analyze -> instrument + calibrate -> select -> rewrite -> verify -> report
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from .analysis import Analysis, analyze
from .calibrate import Statistics, calibrate
from .compensate import compensated_plans
from .cost import model_cost
from .data import (
    DataSource,
    FeedDict,
    Preprocess,
    fixed_batch_size,
    model_input_specs,
    open_calibration,
    split_counts,
)
from .errors import OptionsError
from .graph import load_model
from .group_cost import group_costs
from .instrument import Instrumented, instrument
from .plan import PlannedGroup, PlanOptions, Selection, plan_groups
from .report import GroupReport, Report
from .rewrite import rewrite
from .runtime import Provider
from .verify import Verification, compare_models, reconstruction_error
from .widths import ALLOCATIONS, Allocation


@dataclass(frozen=True)
class CompressOptions:
    """Every setting of a compression run; defaults are the tool's defaults."""

    ratio: float = 0.5
    """Fraction of channels each prunable group keeps."""
    theta: float = 0.5
    """Loss mix: 1 reconstructs the activation, 0 what the next layer computes."""
    ridge: float = 1e-3
    """Relative ridge rho: lambda = rho * trace(Sigma) / m."""
    batch_size: int = 32
    calib_samples: int = 1000
    verify_samples: int = 200
    provider: Provider = "auto"
    exclude: tuple[str, ...] = ()
    """Producer nodes whose groups stay whole."""
    seed: int = 0
    round_to: int = 1
    selection: Selection = "spectral"
    reconstruct: bool = True
    preprocess: Preprocess | None = None
    progress: bool = False
    flops: float | None = None
    """Fraction of the whole model's MACs to keep; overrides `ratio`."""
    params: float | None = None
    """Fraction of the whole model's parameters to keep; overrides `ratio`."""
    allocation: Allocation = "greedy"
    """How a flops/params budget becomes group widths: uniform, dof or greedy."""
    min_keep: int = 1
    """No group keeps fewer channels (unless it has fewer)."""
    compensation: bool = True
    """Sequential compensation: reconstruct toward the original model's activations."""
    affine: bool = False
    """Affine reconstruction: offset folded into the sinks' biases (taps not compensated)."""
    compensation_samples: int = 1000
    """Calibration samples (the first ones) each compensation pass runs through both models."""

    def __post_init__(self) -> None:
        if not 0.0 < self.ratio <= 1.0:
            raise OptionsError(f"--ratio {self.ratio}: must lie in (0, 1]")
        if not 0.0 <= self.theta <= 1.0:
            raise OptionsError(f"--theta {self.theta}: must lie in [0, 1]")
        if not self.ridge > 0.0:
            raise OptionsError(f"--ridge {self.ridge}: must be > 0")
        for name in ("batch_size", "calib_samples", "round_to", "compensation_samples"):
            if getattr(self, name) < 1:
                raise OptionsError(f"--{name.replace('_', '-')} {getattr(self, name)}: "
                                   "must be >= 1")
        if self.verify_samples < 0:
            raise OptionsError(f"--verify-samples {self.verify_samples}: must be >= 0")
        if self.selection not in ("spectral", "l1", "random"):
            raise OptionsError(f"selection '{self.selection}': accepted: spectral, l1, random")
        if self.flops is not None and self.params is not None:
            raise OptionsError("give one budget: --flops or --params, not both")
        for name in ("flops", "params"):
            value = getattr(self, name)
            if value is not None and not 0.0 < value <= 1.0:
                raise OptionsError(f"--{name} {value}: must lie in (0, 1]")
        if self.allocation not in ALLOCATIONS:
            raise OptionsError(f"allocation '{self.allocation}': accepted: "
                               f"{', '.join(ALLOCATIONS)}")
        if self.min_keep < 1:
            raise OptionsError(f"--min-keep {self.min_keep}: must be >= 1")

    def plan_options(self) -> PlanOptions:
        return PlanOptions(ratio=self.ratio, theta=self.theta, rho=self.ridge,
                           round_to=self.round_to, selection=self.selection,
                           reconstruct=self.reconstruct, flops=self.flops, params=self.params,
                           allocation=self.allocation, min_keep=self.min_keep,
                           affine=self.affine)

    def summary(self) -> dict[str, Any]:
        """The options as plain values, for the report."""
        values = dataclasses.asdict(self)
        values["exclude"] = list(self.exclude)
        values["preprocess"] = None if self.preprocess is None else str(self.preprocess)
        return values


class _StageClock:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start


def compress(model: str | Path | onnx.ModelProto, calibration_data: DataSource,
             options: CompressOptions | None = None, **overrides: Any
             ) -> tuple[onnx.ModelProto, Report]:
    """Prune the channels of `model`, calibrated on `calibration_data`.

    `calibration_data`: a `.npz`/`.npy` path, a folder of array files or images, "random", an
    onnxruntime.quantization CalibrationDataReader, or any iterable of feed dicts
    ({input name: array with samples on axis 0}). Options come from `options` and keyword
    `overrides` (field names of CompressOptions), e.g. `compress(path, data, ratio=0.5)`.
    The caller's model is not modified. Returns the compressed model and the report.
    """
    options = dataclasses.replace(options or CompressOptions(), **overrides)
    clock = _StageClock()
    with clock("load"):
        original = load_model(model)
    with clock("analyze"):
        analysis = analyze(original, options.exclude)
    specs = model_input_specs(analysis.graph.model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stream = open_calibration(calibration_data, specs, preprocess=options.preprocess,
                                  seed=options.seed)
    notes = [str(warning.message) for warning in caught]
    n_calib, n_verify = split_counts(stream.known_length, options.calib_samples,
                                     options.verify_samples)
    batch = fixed_batch_size(specs) or options.batch_size
    plan_options = options.plan_options()
    compensating = (options.compensation and plan_options.needs_statistics
                    and options.reconstruct and bool(analysis.taps))
    with clock("calibrate"):
        instrumented = instrument(analysis.graph, analysis.taps)
        calibration = stream.take(n_calib, batch)
        if compensating:
            calibration = list(calibration)  # the first batches are read again for compensation
        statistics = (calibrate(instrumented, calibration, options.provider,
                                total_samples=n_calib, progress=options.progress)
                      if analysis.taps and plan_options.needs_statistics
                      else Statistics({}, 0))
        held_out = list(stream.take(n_verify, batch))
    cost_before = model_cost(analysis.graph.model)
    costs = group_costs(analysis, cost_before) if plan_options.budgeted else None
    with clock("select"):
        if compensating:
            batches = _first_samples(calibration, options.compensation_samples)
            planned = compensated_plans(analysis, statistics, plan_options, lambda: batches,
                                        options.provider, costs)
        else:
            planned = plan_groups(analysis, statistics, plan_options, costs)
    with clock("rewrite"):
        compressed = rewrite(analysis, [item.plan for item in planned])
        _stamp(compressed, original, options)
    with clock("verify"):
        verification, group_errors = _verify(original, compressed, instrumented, planned,
                                             held_out, options)
    if not held_out:
        notes.append("no held-out samples were left for verification: give more data or "
                     "lower --calib-samples")
    if not analysis.prunable:
        notes.append("no channel group is prunable: the model is unchanged (see the reasons)")
    report = Report(
        groups=_group_reports(analysis, planned, group_errors),
        cost_before=cost_before,
        cost_after=model_cost(compressed),
        calibration_samples=statistics.samples,
        verification=verification,
        options=options.summary(),
        seconds=clock.seconds,
        warnings=tuple(notes),
    )
    return compressed, report


def _stamp(compressed: onnx.ModelProto, original: onnx.ModelProto,
           options: CompressOptions) -> None:
    """Keep the original's metadata and record how the model was made."""
    compressed.producer_name = original.producer_name
    compressed.producer_version = original.producer_version
    del compressed.metadata_props[:]
    compressed.metadata_props.extend(original.metadata_props)
    entry = compressed.metadata_props.add()
    entry.key = "onnx_spectral"
    entry.value = str(options.summary())


def _verify(original: onnx.ModelProto, compressed: onnx.ModelProto,
            instrumented: Instrumented, planned: Sequence[PlannedGroup],
            held_out: Sequence[FeedDict], options: CompressOptions
            ) -> tuple[Verification | None, dict[int, float]]:
    """Output agreement, and each pruned group's reconstruction error, on held-out data."""
    if not held_out:
        return None, {}
    verification = compare_models(original, compressed, held_out, options.provider)
    if not planned:
        return verification, {}
    statistics = calibrate(instrumented, held_out, options.provider)
    errors = {}
    for item in planned:
        plan = item.plan
        per_tap = [reconstruction_error(statistics[tap.tensor], plan.kept,
                                        plan.reconstructions[tap.tensor])
                   for tap in plan.group.taps]
        errors[plan.group.id] = float(np.mean(per_tap))
    return verification, errors


def _group_reports(analysis: Analysis, planned: Sequence[PlannedGroup],
                   errors: dict[int, float]) -> tuple[GroupReport, ...]:
    kept = {item.plan.group.id: int(item.plan.kept.size) for item in planned}
    by_id = {item.plan.group.id: item for item in planned}
    return tuple(
        GroupReport(
            id=group.id,
            producers=group.producers,
            channels=group.channels,
            kept=kept.get(group.id, group.channels),
            heldout_error=errors.get(group.id),
            frozen=group.frozen,
            spectrum=_spectrum(by_id.get(group.id)),
            dof=None if group.id not in by_id else by_id[group.id].dof,
        )
        for group in analysis.groups
    )


def _spectrum(item: PlannedGroup | None) -> tuple[float, ...]:
    if item is None or item.spectrum is None:
        return ()
    return tuple(float(value) for value in item.spectrum)


def _first_samples(batches: Sequence[FeedDict], count: int) -> list[FeedDict]:
    """The first whole batches that hold at least `count` samples (a fixed batch stays whole)."""
    taken: list[FeedDict] = []
    left = count
    for feeds in batches:
        if left <= 0:
            break
        taken.append(feeds)
        left -= len(next(iter(feeds.values())))
    return taken
