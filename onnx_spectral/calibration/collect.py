"""Run the instrumented model over batches and accumulate channel statistics in float64.

Statistics are additive: Gram sums, channel sums and sample counts of two runs (or shards)
merge by adding. Nothing is kept per batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from onnx_spectral.analysis import Tap
from onnx_spectral.calibration.instrument import Instrumented, TapOutputs, assemble_gram
from onnx_spectral.calibration.sources import FeedDict
from onnx_spectral.errors import DataError, ModelError, ResourceError, StatisticsError
from onnx_spectral.graph.executor import (
    Batch,
    Executor,
    LocalExecutor,
    WorkerCache,
    add_sums,
    batch_samples,
    sample_range,
)
from onnx_spectral.graph.sessions import Provider, is_out_of_memory, open_session


@dataclass(frozen=True)
class TapStatistics:
    """Uncentered statistics of one tap over `count` samples (positions x batch)."""

    gram: np.ndarray
    """[m, m] float64, sum over samples of t t^T."""
    total: np.ndarray
    """[m] float64, sum over samples of t."""
    count: int

    @property
    def sigma(self) -> np.ndarray:
        """[m, m] second moment (1/n) sum t t^T."""
        return self.gram / max(self.count, 1)

    @property
    def mean(self) -> np.ndarray:
        """[m] channel means."""
        return self.total / max(self.count, 1)

    def merged(self, other: TapStatistics) -> TapStatistics:
        return TapStatistics(self.gram + other.gram, self.total + other.total,
                             self.count + other.count)


@dataclass(frozen=True)
class Statistics:
    """Statistics of every tap tensor, gathered over `samples` model inputs."""

    taps: Mapping[str, TapStatistics]
    samples: int
    notes: tuple[str, ...] = ()
    """Warnings for the report (e.g. the batch was halved after running out of memory)."""
    activations_kept: bool = False
    """Whether the workers' caches hold the activations `calibrate` was asked to keep."""

    def __getitem__(self, tensor: str) -> TapStatistics:
        try:
            return self.taps[tensor]
        except KeyError:
            raise StatisticsError(f"no statistics for tensor '{tensor}'") from None


class _TapSums:
    """Running float64 sums of one tap's Gram blocks, channel sums and sample count."""

    def __init__(self, tap: TapOutputs) -> None:
        self.tap = tap
        self.blocks = [np.zeros(block.shape) for block in tap.blocks]
        self.total = np.zeros(tap.channels)
        self.count = 0

    def add(self, blocks: Sequence[np.ndarray], total: np.ndarray, shape: np.ndarray) -> None:
        for running, block in zip(self.blocks, blocks, strict=True):
            running += block
        self.total += total
        self.count += int(shape[1])


def calibrate(instrumented: Instrumented, batches: Iterable[FeedDict], provider: Provider,
              *, total_samples: int | None = None, progress: bool = False,
              executor: Executor | None = None, desc: str = "calibrating",
              keep: KeptActivations | None = None) -> Statistics:
    """Feed `batches` to the instrumented model; raise StatisticsError if none came.

    Runs through ONNX Runtime's I/O binding: inputs are bound from the host arrays, outputs
    (the instrumented model has only the taps' Gram blocks, sums and shapes) are allocated on
    the provider's device and only they are copied back, once per batch. A batch that runs out
    of memory (host MemoryError, ONNX Runtime allocation failure) is split in halves, and later
    batches are split the same way; ResourceError when even one sample does not fit. A
    non-finite statistic raises DataError naming the tap tensor. `executor`: where the pass
    runs (default: in this process, with a progress bar labelled `desc` when `progress`).
    `keep`: tensors of the model to leave in the workers' caches for the first batches (the
    compensation passes read them); `Statistics.activations_kept` says whether all were kept.
    """
    executor = executor or LocalExecutor(progress)
    sums = executor.fold(GramPass(instrumented.model, instrumented.taps, provider, keep),
                         batches, desc=desc, total=total_samples)
    if keep is not None and not sums.kept:
        executor.forget(keep.namespace)
    if sums.samples == 0:
        raise StatisticsError("calibration received no samples: the data source is empty")
    accumulated = {tap.tensor: TapStatistics(
        assemble_gram(tap.channels, list(zip(tap.blocks, sums.blocks[tap.tensor], strict=True))),
        sums.totals[tap.tensor], sums.counts[tap.tensor]) for tap in instrumented.taps}
    return Statistics(accumulated, sums.samples, sums.notes, keep is not None and sums.kept)


@dataclass(frozen=True)
class GramSums:
    """A worker's float64 sums: per tap tensor, its Gram blocks, channel sums and rows; the
    samples seen; notes on batches halved for memory."""

    blocks: dict[str, list[np.ndarray]]
    totals: dict[str, np.ndarray]
    counts: dict[str, int]
    samples: int
    notes: tuple[str, ...]
    kept: bool
    """Whether the worker kept every activation asked for (`KeptActivations`)."""


@dataclass(frozen=True)
class KeptActivations:
    """Tensors of the model to keep, as float32, in the workers' caches under `namespace` (by
    batch index, {tensor: array}) for the batches that start before sample `samples`, as long
    as a worker's share stays within `limit_bytes` (else none are kept)."""

    tensors: tuple[str, ...]
    samples: int
    namespace: str
    limit_bytes: int


@dataclass(frozen=True)
class GramPass:
    """The calibration pass of an instrumented model (a `PassTask`); with `keep`, the first
    batches run a copy that also returns those tensors."""

    model: onnx.ModelProto
    taps: tuple[TapOutputs, ...]
    provider: Provider
    keep: KeptActivations | None = None

    def start(self, cache: WorkerCache) -> _GramAccumulator:
        runner = _SplittingRunner(_session(self.model, self.provider), self.taps)
        keeping = None
        if self.keep is not None:
            cache.forget(self.keep.namespace)
            model = _with_outputs(self.model, self.keep.tensors)
            keeping = _SplittingRunner(_session(model, self.provider), self.taps,
                                       self.keep.tensors)
        return _GramAccumulator(runner, keeping, self.keep, cache)

    def merge(self, first: GramSums, second: GramSums) -> GramSums:
        return GramSums(add_sums(first.blocks, second.blocks),
                        add_sums(first.totals, second.totals),
                        add_sums(first.counts, second.counts), first.samples + second.samples,
                        tuple(dict.fromkeys((*first.notes, *second.notes))),
                        first.kept and second.kept)


def _session(model: onnx.ModelProto, provider: Provider) -> Any:
    try:
        return open_session(model, provider)
    except Exception as exc:
        if is_out_of_memory(exc):
            raise ResourceError(f"out of memory loading the model into ONNX Runtime: {exc}"
                                ) from exc
        raise ModelError(f"ONNX Runtime cannot load the model: {exc}") from exc


def _with_outputs(model: onnx.ModelProto, tensors: Sequence[str]) -> onnx.ModelProto:
    """A copy of `model` that also outputs `tensors` (typed as its value_info says)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    types = {value.name: value.type.tensor_type.elem_type
             for value in (*model.graph.value_info, *model.graph.input)}
    copy.graph.output.extend(helper.make_tensor_value_info(name, types.get(name) or
                                                           TensorProto.FLOAT, None)
                             for name in tensors)
    return copy


class BatchRunError(DataError):
    """ONNX Runtime failed on the instrumented model for `feeds`, the samples `where` names
    (the caller may check whether the input model itself runs on them)."""

    def __init__(self, where: str, feeds: FeedDict, cause: str) -> None:
        super().__init__(f"ONNX Runtime fails on {where}: {cause}")
        self.where = where
        self.feeds = feeds
        self.cause = cause

    def __reduce__(self) -> tuple[type[BatchRunError], tuple[str, FeedDict, str]]:
        return BatchRunError, (self.where, self.feeds, self.cause)  # from Ray workers


class _GramAccumulator:
    def __init__(self, runner: _SplittingRunner, keeping: _SplittingRunner | None,
                 keep: KeptActivations | None, cache: WorkerCache) -> None:
        self.runner = runner
        self.keeping = keeping
        self.keep = keep
        self.cache = cache
        self.kept = keep is not None
        self.sums = {tap.tensor: _TapSums(tap) for tap in runner.taps}
        self.samples = 0

    def add(self, batch: Batch) -> None:
        self.samples += batch.samples
        keep = self.keep
        if keep is None or self.keeping is None or batch.offset >= keep.samples \
                or not self.kept:
            self.runner.run(batch.feeds, batch.offset, self.sums)
            return
        values = self.keeping.run(batch.feeds, batch.offset, self.sums)
        size = sum(value.nbytes for value in values)
        if self.cache.size(keep.namespace) + size > keep.limit_bytes:
            self.kept = False
            self.cache.forget(keep.namespace)
            return
        self.cache.put(keep.namespace, batch.index,
                       dict(zip(keep.tensors, values, strict=True)), size)

    def result(self) -> GramSums:
        notes = (*self.runner.notes(), *(self.keeping.notes() if self.keeping else ()))
        return GramSums({tensor: sums.blocks for tensor, sums in self.sums.items()},
                        {tensor: sums.total for tensor, sums in self.sums.items()},
                        {tensor: sums.count for tensor, sums in self.sums.items()},
                        self.samples, tuple(dict.fromkeys(notes)), self.kept)


class _SplittingRunner:
    """Runs the instrumented session by I/O binding, in pieces of at most `limit` samples;
    `extra`: further outputs of the session, copied to the host."""

    def __init__(self, session: Any, taps: tuple[TapOutputs, ...],
                 extra: tuple[str, ...] = ()) -> None:
        self.session = session
        self.taps = taps
        self.extra = extra
        device = "cuda" if session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        self.binding = session.io_binding()
        for tap in taps:
            for name in (*(block.name for block in tap.blocks), tap.total):
                self.binding.bind_output(name, device)
            self.binding.bind_output(tap.shape, "cpu")
        for name in extra:
            self.binding.bind_output(name, "cpu")
        self.limit: int | None = None
        self.first_failure: int | None = None

    def run(self, feeds: FeedDict, offset: int, sums: Mapping[str, _TapSums]
            ) -> list[np.ndarray]:
        """Add the statistics of `feeds` (samples offset..offset+b of the run) to `sums`;
        return the `extra` outputs over the whole batch, as float32."""
        size = batch_samples(feeds)
        step = size if self.limit is None else min(self.limit, size)
        start = 0
        pieces: list[list[np.ndarray]] = []
        while start < size:
            try:
                results = self._run_piece(sample_range(feeds, start, start + step))
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise BatchRunError(
                        f"calibration samples {offset + start}..{offset + start + step - 1}",
                        sample_range(feeds, start, start + step), str(exc)) from exc
                if step == 1:
                    raise ResourceError("calibration runs out of memory even with a batch of "
                                        f"1 sample: {exc}") from exc
                self.first_failure = self.first_failure or step
                step = step // 2
                self.limit = step
                continue
            self._add(results, offset + start, step, sums)
            pieces.append(results[len(results) - len(self.extra):] if self.extra else [])
            start += step
        return [np.concatenate([np.asarray(piece[i], dtype=np.float32) for piece in pieces])
                for i in range(len(self.extra))]

    def _run_piece(self, piece: FeedDict) -> list[np.ndarray]:
        for name, array in piece.items():
            self.binding.bind_cpu_input(name, np.ascontiguousarray(array))
        for name in self.extra:  # unallocated again: their shapes follow the batch
            self.binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(self.binding)
        return list(self.binding.copy_outputs_to_cpu())

    def _add(self, results: list[np.ndarray], offset: int, step: int,
             sums: Mapping[str, _TapSums]) -> None:
        outputs = iter(results)
        for tap in self.taps:
            blocks = [next(outputs) for _ in tap.blocks]  # float32, summed in float64
            total = next(outputs)
            shape = next(outputs)
            if not (all(np.isfinite(block).all() for block in blocks)
                    and np.isfinite(total).all()):
                raise DataError(f"tensor '{tap.tensor}' holds NaN or Inf values (or its squares "
                                f"overflow float32) on calibration samples {offset}.."
                                f"{offset + step - 1}; check those inputs and the model's "
                                "weights: only finite activations can be calibrated")
            sums[tap.tensor].add(blocks, total, shape)

    def notes(self) -> tuple[str, ...]:
        if self.first_failure is None:
            return ()
        return (f"calibration ran out of memory with batches of {self.first_failure} samples "
                f"and went on with batches of {self.limit}: pass --batch-size {self.limit}",)


def rank_notes(statistics: Statistics, taps: Sequence[Tap]) -> list[str]:
    """Warnings about taps whose Gram matrix has fewer rows than channels (singular)."""
    notes = []
    for tap in taps:
        count = statistics.taps[tap.tensor].count if tap.tensor in statistics.taps else None
        if count is not None and count < tap.channels:
            notes.append(f"tensor '{tap.tensor}': {count} calibration rows (samples x positions)"
                         f" for {tap.channels} channels: its Gram matrix is singular, so the "
                         "kept channels pass unchanged and only the dropped ones are "
                         f"reconstructed; give at least {tap.channels} samples")
    return notes
