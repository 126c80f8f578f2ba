"""Run the instrumented model over batches and accumulate channel statistics in float64.

Statistics are additive: Gram sums, channel sums and sample counts of two runs (or shards)
merge by adding. Nothing is kept per batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from .data import FeedDict
from .errors import StatisticsError
from .instrument import Instrumented, TapOutputs, assemble_gram
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


class _TapSums:
    """Running float64 sums of one tap's Gram block rows, channel sums and sample count."""

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
    the provider's device and only they are copied back, once per batch.
    """
    session = open_session(instrumented.model, provider)
    device = "cuda" if session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
    binding = session.io_binding()
    for tap in instrumented.taps:
        for name in (*(block.name for block in tap.blocks), tap.total):
            binding.bind_output(name, device)
        binding.bind_output(tap.shape, "cpu")
    sums = {tap.tensor: _TapSums(tap) for tap in instrumented.taps}
    samples = 0
    with tqdm(total=total_samples, disable=not progress, unit="sample",
              desc="calibrating", leave=False) as bar:
        for feeds in batches:
            for name, array in feeds.items():
                binding.bind_cpu_input(name, np.ascontiguousarray(array))
            session.run_with_iobinding(binding)
            results = iter(binding.copy_outputs_to_cpu())
            for tap in instrumented.taps:
                sums[tap.tensor].add([next(results) for _ in tap.blocks], next(results),
                                     next(results))
            batch = len(next(iter(feeds.values())))
            samples += batch
            bar.update(batch)
    if samples == 0:
        raise StatisticsError("calibration received no samples: the data source is empty")
    accumulated = {tensor: tap_sums.statistics() for tensor, tap_sums in sums.items()}
    return Statistics(accumulated, samples)
