"""`compress` and its steps: the only place that orders the pipeline stages.

    load -> prepare (analyze, open data) -> decide_corrections -> shared_statistics -> plan
         -> rewrite_model -> correct (refit) -> quantize -> verify -> build_report

Each step is a function of its own so that tools measure what users run: tools/bench_quality.py
prepares and calibrates a model once, then plans, rewrites and corrects it once per method
through the same steps, under the same rules (Gram budget, which corrections apply).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import onnx

from onnx_spectral.calibration.batches import after, skip, teed
from onnx_spectral.calibration.collect import (
    BatchRunError,
    KeptActivations,
    Statistics,
    calibrate,
    rank_notes,
)
from onnx_spectral.calibration.instrument import Instrumented, instrument
from onnx_spectral.calibration.sources import (
    DataSource,
    FeedDict,
    split_counts,
)
from onnx_spectral.calibration.stats_files import (
    SavedStatistics,
    Shard,
    TapKey,
    model_fingerprint,
)
from onnx_spectral.calibration.tap_cost import gram_strides
from onnx_spectral.correction.compensate import compensated_plans, originals_to_keep
from onnx_spectral.correction.refit import refit_pruned
from onnx_spectral.cost import ModelCost, model_cost
from onnx_spectral.errors import OptionsError
from onnx_spectral.graph import external_tensors
from onnx_spectral.graph.executor import Executor, LocalExecutor
from onnx_spectral.graph.model import load_model, stamp
from onnx_spectral.options import CompressOptions, with_overrides
from onnx_spectral.prepare import Prepared, prepare
from onnx_spectral.quantize import model_bytes, quantize_as
from onnx_spectral.reconstruction_layers import (
    fold_whole_layers,
)
from onnx_spectral.report import Report, StageClock, group_reports
from onnx_spectral.rewrite import rewrite
from onnx_spectral.selection.budget import budget_costs, check_budget_met
from onnx_spectral.selection.group_cost import GroupCosts
from onnx_spectral.selection.plan import PlannedGroup, plan_groups
from onnx_spectral.streams import energy_taps
from onnx_spectral.verify import (
    Verified,
    check_input_runs,
    quantization_warning,
    verify_on_held_out,
)

__all__ = ["CompressOptions", "calibrate_statistics", "compress"]

@dataclass(frozen=True)
class Corrections:
    """Which corrections of the plain reconstruction a run applies; notes say what was skipped
    and why."""

    compensate: bool
    refit: bool
    notes: tuple[str, ...]

    @property
    def need_batches(self) -> bool:
        """Whether calibration must keep its first batches for the correction passes."""
        return self.compensate or self.refit


@dataclass(frozen=True)
class Calibrated:
    """What calibration leaves for the later steps, shared by every plan of one model.

    `first_batches`: the first batches holding `compensation_samples` samples, kept for the
    correction passes (empty unless asked for). `held_out`: the verification batches.
    `warnings`: about the calibration (batches halved for memory, singular Gram matrices).
    """

    statistics: Statistics
    instrumented: Instrumented
    first_batches: tuple[FeedDict, ...]
    held_out: tuple[FeedDict, ...]
    warnings: tuple[str, ...]


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
    options = with_overrides(options, overrides)
    if calibration_data is None and statistics is None:
        raise OptionsError("give calibration_data, or saved statistics (statistics=)")
    clock = StageClock()
    with clock("load"):
        original = load_model(model)
    with clock("analyze"):
        prepared = prepare(original, calibration_data, options, statistics)
        options = replace(options, quantize=prepared.quantize)
        costs = budget_costs(prepared.analysis, prepared.analyzed_cost, options.plan_options(),
                             options.require_prunable, prepared.reference_cost)
    corrections = decide_corrections(prepared, options)
    with clock("workers") if options.ray is not None else nullcontext():
        executor = open_executor(options)
    try:
        with clock("calibrate"):
            calibrated = shared_statistics(prepared, options,
                                           corrections.need_batches or options.quantize == "int8",
                                           executor, originals_to_keep(
                                               prepared.analysis, corrections.compensate,
                                               options.compensation_samples))
        with clock("select"):
            planned = plan(prepared, calibrated, options, corrections, costs, executor)
        with clock("rewrite"):
            compressed = rewrite_model(prepared, planned)
        with clock("refit") if corrections.refit else nullcontext():
            compressed, correction_notes = correct(prepared, compressed, planned, calibrated,
                                                   options, corrections, executor)
        stamp(compressed, original, str(options.summary()))
        with clock("quantize") if options.quantize != "none" else nullcontext():
            quantized = quantize(compressed, calibrated, options)
        written = prepared.outer(quantized)
        stamp(written, original, str(options.summary()))
        with clock("verify"):
            verified = verify(prepared, written, calibrated, planned, options,
                              float_model=None if quantized is compressed
                              else prepared.outer(compressed), executor=executor)
    finally:
        executor.close()
    cost_before = prepared.cost
    notes = (*prepared.notes, *corrections.notes, *correction_notes)
    warnings = (*prepared.warnings, *calibrated.warnings)
    cost_after = model_cost(compressed, cost_before.input_shapes)  # quantizing keeps layers
    check_budget_met(cost_before, cost_after, options.flops, options.params)
    sizes = {"original": model_bytes(original), "compressed": model_bytes(compressed)}
    if quantized is not compressed:
        sizes[options.quantize] = model_bytes(written)
    report = build_report(prepared, calibrated, planned, verified, cost_before,
                          cost_after, options, clock.seconds, notes, warnings, sizes)
    return written, report


def open_executor(options: CompressOptions) -> Executor:
    """Where the passes over the data run: on Ray workers with `options.ray`, else here."""
    if options.ray is None:
        return LocalExecutor(options.progress)
    from onnx_spectral.graph.ray_executor import RayExecutor  # the optional 'ray' extra
    return RayExecutor(options.ray, options.ray_workers or None, provider=options.provider,
                       progress=options.progress)


def decide_corrections(prepared: Prepared, options: CompressOptions) -> Corrections:
    """Sequential compensation and the layer refit where the options ask for them and they
    apply; the notes say which were skipped and why."""
    analysis = prepared.analysis
    notes = []
    compensate = (options.compensation and options.plan_options().needs_statistics
                  and options.reconstruct and bool(analysis.taps))
    if compensate and (prepared.saved is not None
                       or analysis.base_groups != analysis.prunable):
        compensate = False
        notes.append("sequential compensation was skipped: it needs calibration batches (not "
                     "saved statistics) and does not yet handle Concat/Split groups; the "
                     "reconstructions use parallel statistics")
    refit = options.refit and options.reconstruct and bool(analysis.prunable)
    if refit and prepared.saved is not None:
        refit = False
        notes.append("the layer refit was skipped: it needs calibration batches, not saved "
                     "statistics")
    elif refit and external_tensors.is_large(prepared.original):
        refit = False
        notes.append("the layer refit was skipped: it does not yet handle models past 2 GiB")
    return Corrections(compensate, refit, tuple(notes))


def shared_statistics(prepared: Prepared, options: CompressOptions, keep_batches: bool,
                      executor: Executor | None = None, keep: KeptActivations | None = None
                      ) -> Calibrated:
    """Calibrate on the first `calib_samples` samples (or take the saved statistics), under the
    Gram budget, on `executor`'s workers (default: here); set the held-out batches apart; with
    `keep_batches`, keep the first batches for the correction passes, and with `keep` the
    activations the compensation passes read (`calibrate`)."""
    analysis = prepared.analysis
    instrumented = _instrumented(prepared, options)
    stream = prepared.stream
    first_batches: list[FeedDict] = []
    if prepared.saved is not None:
        gathered = prepared.saved.statistics
        held_out = ([] if stream is None
                    else after(stream, prepared.saved.calib_samples, options.verify_samples,
                                prepared.batch))
    else:
        assert stream is not None
        n_calib, n_verify = split_counts(stream.known_length, options.calib_samples,
                                         options.verify_samples)
        calibration = stream.take(n_calib, prepared.batch)
        if keep_batches:  # the first batches are read again by each correction pass
            calibration = teed(calibration, options.compensation_samples, first_batches)
        try:
            gathered = (calibrate(instrumented, calibration, options.provider,
                                  total_samples=n_calib, progress=options.progress,
                                  executor=executor, keep=keep)
                        if analysis.taps and options.plan_options().needs_statistics
                        else Statistics({}, 0))
        except BatchRunError as error:  # the model's fault, or the data's?
            check_input_runs(prepared.original, error.feeds, options.provider, error.where)
            raise
        held_out = list(stream.take(n_verify, prepared.batch))
    warnings = (*gathered.notes, *rank_notes(gathered, analysis.taps))
    return Calibrated(gathered, instrumented, tuple(first_batches), tuple(held_out), warnings)


def plan(prepared: Prepared, calibrated: Calibrated, options: CompressOptions,
         corrections: Corrections, costs: GroupCosts | None, executor: Executor | None = None
         ) -> tuple[PlannedGroup, ...]:
    """Widths, kept channels and reconstructions of every prunable group; compensated (passes
    on `executor`'s workers) when `corrections` say so. `costs`: the cost model, needed under a
    flops/params budget."""
    plan_options = options.plan_options()
    if corrections.compensate:
        return compensated_plans(prepared.analysis, calibrated.statistics, plan_options,
                                 calibrated.first_batches, options.provider, costs,
                                 executor=executor or LocalExecutor(options.progress),
                                 originals_kept=calibrated.statistics.activations_kept)
    return plan_groups(prepared.analysis, calibrated.statistics, plan_options, costs)


def rewrite_model(prepared: Prepared, planned: Sequence[PlannedGroup]) -> onnx.ModelProto:
    """The model with the planned channels deleted and the reconstructions folded in."""
    return rewrite(prepared.analysis, [item.plan for item in planned])


def correct(prepared: Prepared, compressed: onnx.ModelProto, planned: Sequence[PlannedGroup],
            calibrated: Calibrated, options: CompressOptions, corrections: Corrections,
            executor: Executor | None = None) -> tuple[onnx.ModelProto, tuple[str, ...]]:
    """Refit the layers downstream of the pruning (passes on `executor`'s workers) when
    `corrections` say so, then fold back the reconstruction layers of groups kept whole; and
    the refit's notes."""
    if not (corrections.refit and calibrated.first_batches):
        return fold_whole_layers(compressed, prepared.layers), ()
    refitted, notes = refit_pruned(prepared.analysis, compressed, [item.plan for item in planned],
                                   calibrated.first_batches, options.provider,
                                   options.refit_features,
                                   executor=executor or LocalExecutor(options.progress))
    return fold_whole_layers(refitted, prepared.layers), tuple(notes)


def quantize(compressed: onnx.ModelProto, calibrated: Calibrated, options: CompressOptions
             ) -> onnx.ModelProto:
    """The model to write: `compressed` quantized as `options.quantize` asks, calibrated on the
    first calibration batches (`compressed` itself for "none")."""
    return quantize_as(compressed, options.quantize, calibrated.first_batches,
                       method=options.quantize_method, fmt=options.quantize_format,
                       per_channel=options.quantize_per_channel, exclude=options.quantize_exclude)


def verify(prepared: Prepared, compressed: onnx.ModelProto, calibrated: Calibrated,
           planned: Sequence[PlannedGroup], options: CompressOptions,
           float_model: onnx.ModelProto | None = None, executor: Executor | None = None
           ) -> Verified:
    """`verify_on_held_out` with this run's models, held-out batches and workers."""
    return verify_on_held_out(prepared.given, compressed, calibrated.instrumented,
                              calibrated.held_out, [item.plan for item in planned],
                              options.provider, executor or LocalExecutor(options.progress),
                              float_model)


def build_report(prepared: Prepared, calibrated: Calibrated, planned: Sequence[PlannedGroup],
                 verified: Verified, cost_before: ModelCost, cost_after: ModelCost,
                 options: CompressOptions, seconds: dict[str, float], notes: Sequence[str],
                 warnings: Sequence[str], sizes: dict[str, int] | None = None) -> Report:
    """The report of a run; warnings on missing verification and an unchanged model added.
    `notes`: what the run did; `warnings`: what the user should act on; `sizes`: serialized
    bytes of the original, the compressed and the quantized model."""
    warnings = list(warnings)
    if not calibrated.held_out:
        warnings.append("no held-out samples were left for verification: give more data or "
                        "lower --calib-samples")
    if not prepared.analysis.prunable:
        warnings.append("no channel group is prunable: the model is unchanged (see the "
                        "reasons)")
    lost = quantization_warning(verified.verification, verified.float_verification,
                                options.quantize)
    warnings += [lost] if lost else []
    return Report(
        groups=group_reports(prepared.analysis, planned, verified.group_errors),
        cost_before=cost_before,
        cost_after=cost_after,
        calibration_samples=calibrated.statistics.samples,
        verification=verified.verification,
        float_verification=verified.float_verification,
        sizes=sizes or {},
        options=options.summary(),
        seconds=seconds,
        notes=tuple(notes),
        warnings=tuple(warnings),
    )


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
    options = with_overrides(options, overrides)
    shard = shard or Shard(1, 1)
    original = load_model(model)
    prepared = prepare(original, calibration_data, options)
    assert prepared.stream is not None
    analysis = prepared.analysis
    n_calib, _ = split_counts(prepared.stream.known_length, options.calib_samples,
                              options.verify_samples)
    start, stop = shard.bounds(n_calib)
    skip(prepared.stream, start, prepared.batch)
    gathered = (calibrate(_instrumented(prepared, options),
                          prepared.stream.take(stop - start, prepared.batch), options.provider,
                          total_samples=stop - start, progress=options.progress)
                if analysis.taps else Statistics({}, 0))
    return SavedStatistics(gathered, model_fingerprint(original),
                           tuple(TapKey.of(tap) for tap in (*analysis.taps,
                                                            *energy_taps(analysis))),
                           n_calib, (shard,))


def _instrumented(prepared: Prepared, options: CompressOptions) -> Instrumented:
    """The model with its taps' statistics as outputs, positions subsampled to the Gram
    budget."""
    analysis = prepared.analysis
    return instrument(analysis.graph, (*analysis.taps, *energy_taps(analysis)),
                      gram_strides(analysis.graph, analysis.taps, options.gram_budget,
                                   options.calib_samples, prepared.analyzed_cost))
