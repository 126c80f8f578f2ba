"""`compress`: the only place that orders the pipeline stages.

load -> analyze -> instrument + calibrate -> select -> rewrite -> verify -> report
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnx_spectral.analysis import Analysis, Tap, analyze
from onnx_spectral.calibration.collect import Statistics, calibrate
from onnx_spectral.calibration.instrument import Instrumented, instrument
from onnx_spectral.calibration.sources import (
    DataSource,
    FeedDict,
    Preprocess,
    SampleStream,
    fixed_batch_size,
    model_input_specs,
    open_calibration,
    split_counts,
)
from onnx_spectral.calibration.stats_files import (
    SavedStatistics,
    Shard,
    TapKey,
    load_statistics,
    model_fingerprint,
)
from onnx_spectral.calibration.tap_cost import gram_strides
from onnx_spectral.correction.compensate import compensated_plans
from onnx_spectral.correction.refit import MAX_FEATURES, refit_pruned
from onnx_spectral.errors import OptionsError, UnsupportedGraphError
from onnx_spectral.graph import external_tensors
from onnx_spectral.graph.model import load_model
from onnx_spectral.graph.sessions import Provider
from onnx_spectral.report import GroupReport, Report
from onnx_spectral.rewrite import rewrite
from onnx_spectral.selection.group_cost import group_costs
from onnx_spectral.selection.model_cost import model_cost
from onnx_spectral.selection.plan import PlannedGroup, PlanOptions, Selection, plan_groups
from onnx_spectral.selection.widths import ALLOCATIONS, Allocation
from onnx_spectral.verify import Verification, compare_models, reconstruction_error


@dataclass(frozen=True)
class CompressOptions:
    """Every setting of a compression run; defaults are the tool's defaults."""

    ratio: float = 0.5
    """Fraction of channels each prunable group keeps."""
    theta: float = 0.5
    """Loss mix: 1 reconstructs the activation, 0 what the next layer computes."""
    ridge: float = 1e-3
    """Relative ridge rho of the channel reconstructions: lambda = rho * trace(Sigma) / m (the
    layer refit chooses its own by cross-validation)."""
    batch_size: int = 32
    calib_samples: int = 1000
    verify_samples: int = 200
    provider: Provider = "auto"
    exclude: tuple[str, ...] = ()
    """Producer nodes whose groups stay whole."""
    seed: int = 0
    round_to: int = 0
    """Round kept widths up to a multiple of this; 0 (default) = `widths.AUTO_ROUND_TO` for
    widths of at least `widths.AUTO_ROUND_FROM` in groups of at least `widths.AUTO_ROUND_MIN`
    channels, else 1 (tools/bench_speed.py: ONNX Runtime's CPU convolutions run 2x faster on
    widths that are multiples of 8)."""
    selection: Selection = "spectral"
    reconstruct: bool = True
    preprocess: Preprocess | None = None
    progress: bool = False
    require_prunable: bool = False
    """Raise UnsupportedGraphError, before calibrating, when no group can be pruned."""
    gram_budget: float = 0.05
    """The taps' Gram matrices may cost at most this share of the model's MACs; the taps
    dearest against their sinks subsample positions to meet it, keeping at least 8 rows per
    channel over `calib_samples` (`tap_cost`); 0: all positions. tools/bench_speed.py: 0.05
    brings ResNet-50's calibration to 1.23x its inference (1.50x at 0.25)."""
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
    """Affine reconstruction: offset folded into the sinks' biases (compensated taps too)."""
    compensation_samples: int = 1000
    """Calibration samples (the first ones) each compensation pass runs through both models."""
    refit: bool = True
    """Refit the linear layers downstream of the pruning toward the original's outputs
    (`refit.py`); needs calibration batches (not saved statistics)."""
    refit_features: int = MAX_FEATURES
    """Layers whose receptive field has more input features are not refitted (cost ~ d^2)."""

    def __post_init__(self) -> None:
        if not 0.0 < self.ratio <= 1.0:
            raise OptionsError(f"--ratio {self.ratio}: must lie in (0, 1]")
        if not 0.0 <= self.theta <= 1.0:
            raise OptionsError(f"--theta {self.theta}: must lie in [0, 1]")
        if not self.ridge > 0.0:
            raise OptionsError(f"--ridge {self.ridge}: must be > 0")
        if self.round_to < 0:
            raise OptionsError(f"--round-to {self.round_to}: must be >= 0 (0: automatic)")
        for name in ("batch_size", "calib_samples", "compensation_samples", "refit_features"):
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


def compress(model: str | Path | onnx.ModelProto, calibration_data: DataSource | None,
             options: CompressOptions | None = None, *,
             statistics: SavedStatistics | str | Path | None = None, **overrides: Any
             ) -> tuple[onnx.ModelProto, Report]:
    """Prune the channels of `model`, calibrated on `calibration_data`.

    `calibration_data`: a `.npz`/`.npy` path, a folder of array files or images, "random", an
    onnxruntime.quantization CalibrationDataReader, or any iterable of feed dicts
    ({input name: array with samples on axis 0}). Options come from `options` and keyword
    `overrides` (field names of CompressOptions), e.g. `compress(path, data, ratio=0.5)`.
    The caller's model is not modified. Returns the compressed model and the report.

    `statistics`: saved statistics (a `SavedStatistics` or the path of a file written by
    `onnx-spectral calibrate`/`merge-stats`) to select from instead of calibrating; they must
    come from this very model (its fingerprint) with the taps this run needs. Then
    `calibration_data` is optional and only feeds held-out verification: its first
    `calib_samples` samples as recorded in the statistics are skipped, as a one-machine run would.
    """
    options = dataclasses.replace(options or CompressOptions(), **overrides)
    if calibration_data is None and statistics is None:
        raise OptionsError("give calibration data, or saved statistics (--stats)")
    clock = _StageClock()
    with clock("load"):
        original = load_model(model)
    with clock("analyze"):
        analysis = analyze(original, options.exclude)
    if options.require_prunable and not analysis.prunable:
        raise UnsupportedGraphError(_nothing_prunable(analysis))
    specs = model_input_specs(analysis.graph.model)
    saved = (None if statistics is None
             else _saved_for(statistics, original, analysis.taps))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stream = (None if calibration_data is None
                  else open_calibration(calibration_data, specs, preprocess=options.preprocess,
                                        seed=options.seed))
    notes = [str(warning.message) for warning in caught]
    batch = fixed_batch_size(specs) or options.batch_size
    plan_options = options.plan_options()
    compensating = (options.compensation and plan_options.needs_statistics
                    and options.reconstruct and bool(analysis.taps))
    if compensating and (saved is not None or analysis.base_groups != analysis.prunable):
        compensating = False
        notes.append("sequential compensation was skipped: it needs calibration batches (not "
                     "saved statistics) and does not yet handle Concat/Split groups; the "
                     "reconstructions use parallel statistics")
    refitting = options.refit and options.reconstruct and bool(analysis.prunable)
    if refitting and saved is not None:
        refitting = False
        notes.append("the layer refit was skipped: it needs calibration batches, not saved "
                     "statistics")
    elif refitting and external_tensors.is_large(original):
        refitting = False
        notes.append("the layer refit was skipped: it does not yet handle models past 2 GiB")
    with clock("calibrate"):
        instrumented = instrument(analysis.graph, analysis.taps,
                                  gram_strides(analysis.graph, analysis.taps, options.gram_budget,
                                               options.calib_samples))
        first_batches: list[FeedDict] = []
        if saved is not None:
            gathered = saved.statistics
            held_out = ([] if stream is None
                        else _after(stream, saved.calib_samples, options.verify_samples, batch))
            notes.extend(f"statistics lack shard {shard}" for shard in saved.missing_shards())
        else:
            assert stream is not None
            n_calib, n_verify = split_counts(stream.known_length, options.calib_samples,
                                             options.verify_samples)
            calibration = stream.take(n_calib, batch)
            if compensating or refitting:  # the first batches are read again by each pass
                calibration = _teed(calibration, options.compensation_samples, first_batches)
            gathered = (calibrate(instrumented, calibration, options.provider,
                                  total_samples=n_calib, progress=options.progress)
                        if analysis.taps and plan_options.needs_statistics
                        else Statistics({}, 0))
            held_out = list(stream.take(n_verify, batch))
    notes.extend(gathered.notes)
    notes.extend(_rank_notes(gathered, analysis))
    cost_before = model_cost(analysis.graph.model)
    costs = group_costs(analysis, cost_before) if plan_options.budgeted else None
    with clock("select"):
        if compensating:
            planned = compensated_plans(analysis, gathered, plan_options, lambda: first_batches,
                                        options.provider, costs)
        else:
            planned = plan_groups(analysis, gathered, plan_options, costs)
    with clock("rewrite"):
        compressed = rewrite(analysis, [item.plan for item in planned])
    if refitting and first_batches:
        with clock("refit"):
            compressed, refit_notes = refit_pruned(analysis, compressed,
                                                   [item.plan for item in planned],
                                                   first_batches, options.provider,
                                                   options.refit_features)
        notes.extend(refit_notes)
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
        calibration_samples=gathered.samples,
        verification=verification,
        options=options.summary(),
        seconds=clock.seconds,
        warnings=tuple(notes),
    )
    return compressed, report


def _nothing_prunable(analysis: Analysis) -> str:
    reasons = sorted({reason for group in analysis.groups for reason in group.frozen})
    shown = "; ".join(reasons[:3]) + ("; ..." if len(reasons) > 3 else "")
    return (f"no channel group of the model can be pruned ({len(analysis.groups)} groups, all "
            f"frozen: {shown or 'the model has no Conv/Gemm/MatMul producer'}); "
            "`onnx-spectral analyze` lists why, --allow-unchanged writes the model anyway")


def _rank_notes(statistics: Statistics, analysis: Analysis) -> list[str]:
    """Warn about taps whose Gram matrix has fewer rows than channels (singular)."""
    notes = []
    for tap in analysis.taps:
        count = statistics.taps[tap.tensor].count if tap.tensor in statistics.taps else None
        if count is not None and count < tap.channels:
            notes.append(f"tensor '{tap.tensor}': {count} calibration rows (samples x positions)"
                         f" for {tap.channels} channels: its Gram matrix is singular and the "
                         f"selection rests on the ridge alone; give at least {tap.channels} "
                         "samples")
    return notes


def calibrate_statistics(model: str | Path | onnx.ModelProto, calibration_data: DataSource,
                         options: CompressOptions | None = None, *, shard: Shard | None = None,
                         **overrides: Any) -> SavedStatistics:
    """Calibrate `model` (or one shard of the calibration range) without compressing it.

    The calibration range is what `compress` would calibrate on: the first `calib_samples`
    samples (fewer when the data is short, see `split_counts`). Shard I/N takes its I-th
    contiguous part; the N shards' statistics merged (`stats_io.merge_statistics`) equal one run
    over the whole range up to float rounding. The result records the model's fingerprint and
    the taps (`stats_io`).
    """
    options = dataclasses.replace(options or CompressOptions(), **overrides)
    shard = shard or Shard(1, 1)
    original = load_model(model)
    analysis = analyze(original, options.exclude)
    specs = model_input_specs(analysis.graph.model)
    stream = open_calibration(calibration_data, specs, preprocess=options.preprocess,
                              seed=options.seed)
    n_calib, _ = split_counts(stream.known_length, options.calib_samples, options.verify_samples)
    start, stop = shard.bounds(n_calib)
    batch = fixed_batch_size(specs) or options.batch_size
    _skip(stream, start, batch)
    instrumented = instrument(analysis.graph, analysis.taps,
                              gram_strides(analysis.graph, analysis.taps, options.gram_budget,
                                           options.calib_samples))
    gathered = (calibrate(instrumented, stream.take(stop - start, batch), options.provider,
                          total_samples=stop - start, progress=options.progress)
                if analysis.taps else Statistics({}, 0))
    return SavedStatistics(gathered, model_fingerprint(original),
                           tuple(TapKey.of(tap) for tap in analysis.taps), n_calib, (shard,))


def _skip(stream: SampleStream, count: int, batch: int) -> None:
    """Read and drop the next `count` samples of a SampleStream."""
    for _ in stream.take(count, batch):
        pass


def _after(stream: SampleStream, skip: int, count: int, batch: int) -> list[FeedDict]:
    """The `count` samples that follow the first `skip` samples of the stream."""
    _skip(stream, skip, batch)
    return list(stream.take(count, batch))


def _saved_for(statistics: SavedStatistics | str | Path, original: onnx.ModelProto,
               taps: Sequence[Tap]) -> SavedStatistics:
    """Load saved statistics if given by path; refuse them unless made from `original`."""
    saved = (statistics if isinstance(statistics, SavedStatistics)
             else load_statistics(statistics))
    where = "given" if isinstance(statistics, SavedStatistics) else str(statistics)
    saved.check_model(model_fingerprint(original), taps, where)
    return saved


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
        if per_tap:  # a group read only through concatenations has no tap of its own
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


def _teed(batches: Iterable[FeedDict], count: int, kept: list[FeedDict]
          ) -> Iterator[FeedDict]:
    """Yield `batches`, appending to `kept` the first whole batches that hold at least `count`
    samples (a fixed batch stays whole); the rest are not kept."""
    left = count
    for feeds in batches:
        if left > 0:
            kept.append(feeds)
            left -= len(next(iter(feeds.values())))
        yield feeds


