"""Passes over batches of data, and where they run: in this process, or on Ray workers
(`ray_executor.py`).

Every pass of the pipeline over the data (calibration, each compensation pass, each layer's
refit, verification) only needs sums over samples. A pass is a `PassTask`: picklable, it starts
an `Accumulator` on a worker, which adds the batches that worker is given and returns its sums;
the task merges the workers' sums. An executor feeds the batches and merges the results, so the
pass computes the same sums wherever it runs (up to the order of float summation).

A worker keeps a `WorkerCache` across passes (e.g. one layer's activations, read again by its
relaxed refit passes); an executor gives batch i of a pass to the same worker every time, so a
cache keyed by batch index stays valid while the batches are the same.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import numpy as np
from tqdm import tqdm

Feeds = dict[str, np.ndarray]
"""One batch: model input name -> array with samples on axis 0 (or a `Run`)."""


class Run(dict[str, np.ndarray]):
    """The feeds of one run of a model whose inputs share no sample axis (a scalar input, a
    recurrent state with its batch on axis 1, an input of fixed size beside an open one): one
    sample, fed as it is, never split or concatenated with others."""


def batching_problem(declared: dict[str, tuple[int | None, ...]]) -> str | None:
    """Why inputs of these declared shapes (None: a dim left open) cannot be batched along a
    common axis 0, so that each feed dict must be fed as one `Run`; None when they can."""
    scalar = next((name for name, shape in declared.items() if not shape), None)
    if scalar is not None:
        return f"input '{scalar}' is a scalar"
    fixed = {name: shape[0] for name, shape in declared.items() if shape[0] is not None}
    open_ = [name for name, shape in declared.items() if shape[0] is None]
    if fixed and open_:
        name, size = next(iter(fixed.items()))
        return (f"input '{name}' has a fixed axis 0 of {size} where input '{open_[0]}' leaves "
                "axis 0 open")
    if len(set(fixed.values())) > 1:
        return f"the inputs' fixed axes 0 differ {fixed}"
    return None


def sample_range(feeds: Feeds, start: int, stop: int) -> Feeds:
    """Samples ``start..stop-1`` of a batch; a `Run` (one sample) as it is."""
    if isinstance(feeds, Run):
        if start > 0 or stop < 1:
            raise ValueError(f"a run holds one sample; samples {start}..{stop - 1} asked")
        return feeds
    return {name: value[start:stop] for name, value in feeds.items()}

R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)


@dataclass(frozen=True)
class Batch:
    """Batch `index` of a pass, whose first sample is sample `offset` of the pass."""

    index: int
    offset: int
    feeds: Feeds

    @property
    def samples(self) -> int:
        return batch_samples(self.feeds)


def batch_samples(feeds: Feeds) -> int:
    """Samples in one batch: the length of axis 0 of its first input; 1 for a `Run`."""
    return 1 if isinstance(feeds, Run) else len(next(iter(feeds.values())))


def total_samples(batches: Iterable[Feeds]) -> int:
    """Samples in all `batches`."""
    return sum(batch_samples(feeds) for feeds in batches)


class Accumulator(Protocol[R_co]):
    """Sums of one pass on one worker."""

    def add(self, batch: Batch) -> None: ...

    def result(self) -> R_co: ...


class PassTask(Protocol[R]):
    """A pass over batches: picklable, so that it can be sent to Ray workers."""

    def start(self, cache: WorkerCache) -> Accumulator[R]:
        """An empty accumulator on this worker (opening its ONNX Runtime session here)."""
        ...

    def merge(self, first: R, second: R) -> R:
        """The sums of two workers added."""
        ...


@dataclass
class WorkerCache:
    """What a worker keeps between passes: values by (namespace, batch index), and the bytes
    of the arrays held, which a pass may limit."""

    entries: dict[str, dict[int, Any]] = field(default_factory=dict)
    held_bytes: dict[str, int] = field(default_factory=dict)

    def get(self, namespace: str, index: int) -> Any:
        return self.entries.get(namespace, {}).get(index)

    def put(self, namespace: str, index: int, value: Any, nbytes: int) -> None:
        self.entries.setdefault(namespace, {})[index] = value
        self.held_bytes[namespace] = self.held_bytes.get(namespace, 0) + nbytes

    def size(self, namespace: str) -> int:
        return self.held_bytes.get(namespace, 0)

    def forget(self, namespace: str) -> None:
        self.entries.pop(namespace, None)
        self.held_bytes.pop(namespace, None)


class Executor(ABC):
    """Runs passes; `progress`: show a bar per pass that names one (on a terminal)."""

    def __init__(self, progress: bool = False) -> None:
        self.progress = progress

    @abstractmethod
    def fold(self, task: PassTask[R], batches: Iterable[Feeds], *, desc: str | None = None,
             total: int | None = None) -> R:
        """Run `task` over `batches` and return the merged sums. `desc`: the progress bar's
        label (None: no bar); `total`: the samples expected, for its estimate."""

    @abstractmethod
    def forget(self, namespace: str) -> None:
        """Drop a namespace of every worker's cache."""

    @abstractmethod
    def close(self) -> None:
        """Release the workers."""

    def _bar(self, desc: str | None, total: int | None) -> tqdm:
        return tqdm(total=total, disable=not (self.progress and desc), unit="sample",
                    desc=desc, leave=False)


class LocalExecutor(Executor):
    """Every pass in this process, one batch after the other, with one cache."""

    def __init__(self, progress: bool = False) -> None:
        super().__init__(progress)
        self.cache = WorkerCache()

    def fold(self, task: PassTask[R], batches: Iterable[Feeds], *, desc: str | None = None,
             total: int | None = None) -> R:
        accumulator = task.start(self.cache)
        offset = 0
        with self._bar(desc, total) as bar:
            for index, feeds in enumerate(batches):
                batch = Batch(index, offset, feeds)
                accumulator.add(batch)
                offset += batch.samples
                bar.update(batch.samples)
        return accumulator.result()

    def forget(self, namespace: str) -> None:
        self.cache.forget(namespace)

    def close(self) -> None:
        self.cache = WorkerCache()


class Sums(Generic[R]):
    """Merges sums given as nested tuples, lists and dicts of arrays and numbers by adding
    them leaf by leaf; a base for tasks whose results are such plain sums."""

    def merge(self, first: R, second: R) -> R:
        return add_sums(first, second)


def add_sums(first: Any, second: Any) -> Any:
    """`first + second` leaf by leaf over nested dicts (by key; a key in one only is kept),
    lists and tuples of numbers and arrays."""
    if isinstance(first, dict):
        merged = dict(first)
        for key, value in second.items():
            merged[key] = add_sums(merged[key], value) if key in merged else value
        return merged
    if isinstance(first, (list, tuple)):
        return type(first)(add_sums(a, b) for a, b in zip(first, second, strict=True))
    return first + second
