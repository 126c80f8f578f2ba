"""Run the instrumented model over batches and accumulate channel statistics in float64.

Statistics are additive: Gram sums, channel sums and sample counts of two runs (or shards)
merge by adding. Nothing is kept per batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm import tqdm

from onnx_spectral.calibration.instrument import Instrumented, TapOutputs, assemble_gram
from onnx_spectral.calibration.sources import FeedDict
from onnx_spectral.errors import DataError, ModelError, ResourceError, StatisticsError
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

    def statistics(self) -> TapStatistics:
        gram = assemble_gram(self.tap.channels, list(zip(self.tap.blocks, self.blocks,
                                                         strict=True)))
        return TapStatistics(gram, self.total, self.count)


def calibrate(instrumented: Instrumented, batches: Iterable[FeedDict], provider: Provider,
              *, total_samples: int | None = None, progress: bool = False) -> Statistics:
    """Feed `batches` to the instrumented model; raise StatisticsError if none came.

    Runs through ONNX Runtime's I/O binding: inputs are bound from the host arrays, outputs
    (the instrumented model has only the taps' Gram blocks, sums and shapes) are allocated on
    the provider's device and only they are copied back, once per batch. A batch that runs out
    of memory (host MemoryError, ONNX Runtime allocation failure) is split in halves, and later
    batches are split the same way; ResourceError when even one sample does not fit. A
    non-finite statistic raises DataError naming the tap tensor.
    """
    try:
        session = open_session(instrumented.model, provider)
    except Exception as exc:
        if is_out_of_memory(exc):
            raise ResourceError(f"out of memory loading the model into ONNX Runtime: {exc}"
                                ) from exc
        raise ModelError(f"ONNX Runtime cannot load the model: {exc}") from exc
    runner = _SplittingRunner(session, instrumented.taps)
    sums = {tap.tensor: _TapSums(tap) for tap in instrumented.taps}
    samples = 0
    with tqdm(total=total_samples, disable=not progress, unit="sample",
              desc="calibrating", leave=False) as bar:
        for feeds in batches:
            runner.run(feeds, samples, sums)
            batch = _length(feeds)
            samples += batch
            bar.update(batch)
    if samples == 0:
        raise StatisticsError("calibration received no samples: the data source is empty")
    accumulated = {tensor: tap_sums.statistics() for tensor, tap_sums in sums.items()}
    return Statistics(accumulated, samples, runner.notes())


def _length(feeds: FeedDict) -> int:
    return len(next(iter(feeds.values())))


class _SplittingRunner:
    """Runs the instrumented session by I/O binding, in pieces of at most `limit` samples."""

    def __init__(self, session: Any, taps: tuple[TapOutputs, ...]) -> None:
        self.session = session
        self.taps = taps
        device = "cuda" if session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        self.binding = session.io_binding()
        for tap in taps:
            for name in (*(block.name for block in tap.blocks), tap.total):
                self.binding.bind_output(name, device)
            self.binding.bind_output(tap.shape, "cpu")
        self.limit: int | None = None
        self.first_failure: int | None = None

    def run(self, feeds: FeedDict, offset: int, sums: Mapping[str, _TapSums]) -> None:
        """Add the statistics of `feeds` (samples offset..offset+b of the run) to `sums`."""
        size = _length(feeds)
        step = size if self.limit is None else min(self.limit, size)
        start = 0
        while start < size:
            try:
                results = self._run_piece({name: array[start:start + step]
                                           for name, array in feeds.items()})
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise DataError(f"ONNX Runtime fails on calibration samples {offset + start}"
                                    f"..{offset + start + step - 1}: {exc}") from exc
                if step == 1:
                    raise ResourceError("calibration runs out of memory even with a batch of "
                                        f"1 sample: {exc}") from exc
                self.first_failure = self.first_failure or step
                step = step // 2
                self.limit = step
                continue
            self._add(results, offset + start, step, sums)
            start += step

    def _run_piece(self, piece: FeedDict) -> list[np.ndarray]:
        for name, array in piece.items():
            self.binding.bind_cpu_input(name, np.ascontiguousarray(array))
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
