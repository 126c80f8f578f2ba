"""ONNX Runtime passes of compensation: cross statistics of a merged model over batches, and the
original model's tap activations kept on the workers once for all passes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from onnx_spectral.analysis import Analysis, Tap
from onnx_spectral.calibration.sources import FeedDict
from onnx_spectral.correction.merged import CrossOutputs
from onnx_spectral.errors import StatisticsError
from onnx_spectral.graph.executor import (
    Batch,
    Executor,
    LocalExecutor,
    Sums,
    WorkerCache,
    total_samples,
)
from onnx_spectral.graph.sessions import Provider, open_session
from onnx_spectral.selection.moments import CrossMoments

#: Worker-cache namespace of the original model's tap activations, by batch index.
ORIGINAL_ACTIVATIONS = "compensation/original"

CrossSums = dict[str, list[np.ndarray | int]]
"""Per tap tensor: float64 sums of t_p t_p^T, t_o t_p^T, t_p, t_o and the rows summed."""


def cross_statistics(model: onnx.ModelProto, outputs: Sequence[CrossOutputs],
                     batches: Sequence[FeedDict], provider: Provider, *, cached: bool = False,
                     executor: Executor | None = None, desc: str | None = None
                     ) -> dict[str, CrossMoments]:
    """Per tap tensor, its cross moments (float64) over all samples of `batches`. `cached`: the
    merged model reads the original's activations, which `original_activations` left in the
    workers' caches for these batches."""
    executor = executor or LocalExecutor()
    sums: CrossSums = executor.fold(_CrossPass(model, tuple(outputs), provider, cached),
                                    batches, desc=desc, total=total_samples(batches))
    if not sums:
        raise StatisticsError("compensation received no samples: the data source is empty")
    moments = {}
    for tensor, (second, cross, sum_p, sum_o, count) in sums.items():
        rows = max(int(count), 1)
        moments[tensor] = CrossMoments(*(np.asarray(value) / rows
                                         for value in (second, cross, sum_p, sum_o)))
    return moments


@dataclass(frozen=True)
class _CrossPass(Sums[CrossSums]):
    model: onnx.ModelProto
    outputs: tuple[CrossOutputs, ...]
    provider: Provider
    cached: bool

    def start(self, cache: WorkerCache) -> _CrossAccumulator:
        return _CrossAccumulator(self, open_session(self.model, self.provider), cache)


class _CrossAccumulator:
    def __init__(self, task: _CrossPass, session: ort.InferenceSession, cache: WorkerCache) -> None:
        self.task = task
        self.session = session
        self.cache = cache
        self.wanted = {value.name for value in session.get_inputs()}
        self.names = [name for out in task.outputs for name in out.names]
        self.sums: CrossSums = {}

    def add(self, batch: Batch) -> None:
        feeds = dict(batch.feeds)
        if self.task.cached:
            feeds.update(self.cache.get(ORIGINAL_ACTIVATIONS, batch.index))
        results = iter(self.session.run(self.names, {key: value for key, value in feeds.items()
                                                     if key in self.wanted}))
        for out in self.task.outputs:
            cross, second, shape, sum_o, sum_p = (next(results) for _ in out.names)
            values = [np.asarray(value, dtype=np.float64) for value in (second, cross, sum_p,
                                                                          sum_o)]
            entry = self.sums.setdefault(out.tensor, [*(np.zeros_like(v) for v in values), 0])
            for position, value in enumerate(values):
                entry[position] = entry[position] + value
            entry[4] = int(entry[4]) + int(shape[0])

    def result(self) -> CrossSums:
        return self.sums


def original_activations(analysis: Analysis, taps: Sequence[Tap],
                         batches: Sequence[FeedDict], provider: Provider, limit_bytes: int,
                         executor: Executor | None = None) -> bool:
    """Keep, per batch, the original model's tap tensors (float32) in the workers' caches for
    `cross_statistics(..., cached=True)`. False (and nothing kept) when a worker's share
    passes `limit_bytes`."""
    executor = executor or LocalExecutor()
    names = tuple(tap.tensor for tap in taps)
    model = onnx.ModelProto()
    model.CopyFrom(analysis.graph.model)
    del model.graph.output[:]
    model.graph.output.extend([helper.make_tensor_value_info(name, _elem_type(analysis, name),
                                                             None) for name in names])
    complete: bool = executor.fold(_OriginalPass(model, names, provider, limit_bytes), batches)
    if not complete:
        executor.forget(ORIGINAL_ACTIVATIONS)
    return complete


@dataclass(frozen=True)
class _OriginalPass:
    model: onnx.ModelProto
    names: tuple[str, ...]
    provider: Provider
    limit_bytes: int

    def start(self, cache: WorkerCache) -> _OriginalAccumulator:
        cache.forget(ORIGINAL_ACTIVATIONS)
        return _OriginalAccumulator(self, open_session(self.model, self.provider), cache)

    def merge(self, first: bool, second: bool) -> bool:
        return first and second


class _OriginalAccumulator:
    def __init__(self, task: _OriginalPass, session: ort.InferenceSession,
                 cache: WorkerCache) -> None:
        self.task = task
        self.session = session
        self.cache = cache
        self.complete = True

    def add(self, batch: Batch) -> None:
        if not self.complete:
            return
        values = [np.asarray(value, dtype=np.float32)
                  for value in self.session.run(list(self.task.names), dict(batch.feeds))]
        size = sum(value.nbytes for value in values)
        if self.cache.size(ORIGINAL_ACTIVATIONS) + size > self.task.limit_bytes:
            self.complete = False
            self.cache.forget(ORIGINAL_ACTIVATIONS)
            return
        self.cache.put(ORIGINAL_ACTIVATIONS, batch.index,
                       dict(zip(self.task.names, values, strict=True)), size)

    def result(self) -> bool:
        return self.complete


def _elem_type(analysis: Analysis, tensor: str) -> int:
    for value in (*analysis.graph.model.graph.value_info, *analysis.graph.model.graph.input):
        if value.name == tensor:
            return int(value.type.tensor_type.elem_type)
    return TensorProto.FLOAT
