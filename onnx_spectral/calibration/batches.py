"""Reading a `SampleStream` in parts: skipping samples, and keeping the first batches for the
passes that read them again (compensation, refit, quantization)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from onnx_spectral.calibration.sources import FeedDict, SampleStream
from onnx_spectral.graph.executor import batch_samples


def skip(stream: SampleStream, count: int, batch: int) -> None:
    """Read and drop the next `count` samples of a SampleStream."""
    for _ in stream.take(count, batch):
        pass


def after(stream: SampleStream, skipped: int, count: int, batch: int) -> list[FeedDict]:
    """The `count` samples that follow the first `skipped` samples of the stream, in batches of
    `batch` samples."""
    skip(stream, skipped, batch)
    return list(stream.take(count, batch))


def teed(batches: Iterable[FeedDict], count: int, kept: list[FeedDict]) -> Iterator[FeedDict]:
    """Yield `batches`, appending to `kept` the first whole batches that hold at least `count`
    samples (a fixed batch stays whole); the rest are not kept."""
    left = count
    for feeds in batches:
        if left > 0:
            kept.append(feeds)
            left -= batch_samples(feeds)
        yield feeds
