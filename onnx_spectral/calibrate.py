"""Run the instrumented model over batches and accumulate channel statistics in float64.

Statistics are additive: Gram sums, channel sums and sample counts of two runs (or shards)
merge by adding. Nothing is kept per batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from .data import FeedDict
from .errors import StatisticsError
from .instrument import Instrumented
from .runtime import Provider, open_session


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

    def __getitem__(self, tensor: str) -> TapStatistics:
        try:
            return self.taps[tensor]
        except KeyError:
            raise StatisticsError(f"no statistics for tensor '{tensor}'") from None


def calibrate(instrumented: Instrumented, batches: Iterable[FeedDict], provider: Provider,
              *, total_samples: int | None = None, progress: bool = False) -> Statistics:
    """Feed `batches` to the instrumented model; raise StatisticsError if none came."""
    session = open_session(instrumented.model, provider)
    output_names = [name for tap in instrumented.taps
                    for name in (tap.gram, tap.total, tap.shape)]
    accumulated: dict[str, TapStatistics] = {}
    samples = 0
    with tqdm(total=total_samples, disable=not progress, unit="sample",
              desc="calibrating", leave=False) as bar:
        for feeds in batches:
            results = session.run(output_names, feeds)
            for index, tap in enumerate(instrumented.taps):
                gram, total, shape = results[3 * index: 3 * index + 3]
                batch_stats = TapStatistics(np.asarray(gram, dtype=np.float64),
                                            np.asarray(total, dtype=np.float64), int(shape[0]))
                previous = accumulated.get(tap.tensor)
                accumulated[tap.tensor] = (batch_stats if previous is None
                                           else previous.merged(batch_stats))
            batch = len(next(iter(feeds.values())))
            samples += batch
            bar.update(batch)
    if samples == 0:
        raise StatisticsError("calibration received no samples: the data source is empty")
    return Statistics(accumulated, samples)
