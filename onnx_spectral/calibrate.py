"""Run the instrumented model over batches and accumulate channel statistics in float64.

Statistics are additive: Gram sums, channel sums and sample counts of two runs (or shards)
merge by adding. Nothing is kept per batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm import tqdm

from .data import FeedDict
from .errors import DataError, ModelError, ResourceError, StatisticsError
from .instrument import Instrumented, TapOutputs
from .runtime import Provider, is_out_of_memory, open_session


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


def calibrate(instrumented: Instrumented, batches: Iterable[FeedDict], provider: Provider,
              *, total_samples: int | None = None, progress: bool = False) -> Statistics:
    """Feed `batches` to the instrumented model; raise StatisticsError if none came.

    A batch that runs out of memory (host MemoryError, ONNX Runtime allocation failure) is
    split in halves, and later batches are split the same way; ResourceError when even one
    sample does not fit. A non-finite statistic raises DataError naming the tap tensor.
    """
    try:
        session = open_session(instrumented.model, provider)
    except Exception as exc:
        if is_out_of_memory(exc):
            raise ResourceError(f"out of memory loading the model into ONNX Runtime: {exc}"
                                ) from exc
        raise ModelError(f"ONNX Runtime cannot load the model: {exc}") from exc
    runner = _SplittingRunner(session, instrumented.taps)
    accumulated: dict[str, TapStatistics] = {}
    samples = 0
    with tqdm(total=total_samples, disable=not progress, unit="sample",
              desc="calibrating", leave=False) as bar:
        for feeds in batches:
            for part in runner.run(feeds, samples):
                for tensor, batch_stats in part.items():
                    previous = accumulated.get(tensor)
                    accumulated[tensor] = (batch_stats if previous is None
                                           else previous.merged(batch_stats))
            batch = len(next(iter(feeds.values())))
            samples += batch
            bar.update(batch)
    if samples == 0:
        raise StatisticsError("calibration received no samples: the data source is empty")
    return Statistics(accumulated, samples, runner.notes())


def _length(feeds: FeedDict) -> int:
    return len(next(iter(feeds.values())))


class _SplittingRunner:
    """Runs the instrumented session on a batch, in pieces of at most `limit` samples."""

    def __init__(self, session: Any, taps: tuple[TapOutputs, ...]) -> None:
        self.session = session
        self.taps = taps
        self.names = [name for tap in taps for name in (tap.gram, tap.total, tap.shape)]
        self.limit: int | None = None
        self.first_failure: int | None = None

    def run(self, feeds: FeedDict, offset: int) -> list[dict[str, TapStatistics]]:
        """Statistics of `feeds` (samples offset..offset+b of the run), one dict per piece."""
        size = _length(feeds)
        step = size if self.limit is None else min(self.limit, size)
        parts = []
        start = 0
        while start < size:
            piece = {name: array[start:start + step] for name, array in feeds.items()}
            try:
                results = self.session.run(self.names, piece)
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
            parts.append(self._statistics(results, offset + start, step))
            start += step
        return parts

    def _statistics(self, results: list[Any], offset: int, step: int
                    ) -> dict[str, TapStatistics]:
        part = {}
        for index, tap in enumerate(self.taps):
            gram, total, shape = results[3 * index: 3 * index + 3]
            gram = np.asarray(gram, dtype=np.float64)
            total = np.asarray(total, dtype=np.float64)
            if not (np.isfinite(gram).all() and np.isfinite(total).all()):
                raise DataError(f"tensor '{tap.tensor}' holds NaN or Inf values (or its squares "
                                f"overflow float32) on calibration samples {offset}.."
                                f"{offset + step - 1}; check those inputs and the model's "
                                "weights: only finite activations can be calibrated")
            part[tap.tensor] = TapStatistics(gram, total, int(shape[0]))
        return part

    def notes(self) -> tuple[str, ...]:
        if self.first_failure is None:
            return ()
        return (f"calibration ran out of memory with batches of {self.first_failure} samples "
                f"and went on with batches of {self.limit}: pass --batch-size {self.limit}",)
