"""ONNX Runtime runs of compensation: cross statistics of a merged model over batches, and the
original model's tap activations cached once for all passes."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper

from onnx_spectral.analysis import Analysis, Tap
from onnx_spectral.calibration.sources import FeedDict
from onnx_spectral.correction.merged import CrossOutputs
from onnx_spectral.errors import StatisticsError
from onnx_spectral.graph.sessions import Provider, open_session
from onnx_spectral.selection.moments import CrossMoments


def cross_statistics(model: onnx.ModelProto, outputs: Sequence[CrossOutputs],
                     batches: Iterable[FeedDict], provider: Provider
                     ) -> dict[str, CrossMoments]:
    """Per tap tensor, its cross moments (float64) over all samples of `batches`."""
    session = open_session(model, provider)
    names = [name for out in outputs for name in out.names]
    width = len(outputs[0].names) if outputs else 0
    sums: dict[str, list[np.ndarray]] = {}
    counts: dict[str, int] = {}
    wanted = {value.name for value in session.get_inputs()}
    for feeds in batches:
        results = session.run(names, {key: value for key, value in feeds.items()
                                      if key in wanted})
        for index, out in enumerate(outputs):
            cross, second, shape, sum_o, sum_p = results[width * index: width * (index + 1)]
            values = [np.asarray(value, dtype=np.float64) for value in (second, cross, sum_p,
                                                                          sum_o)]
            entry = sums.setdefault(out.tensor, [np.zeros_like(value) for value in values])
            for total, value in zip(entry, values, strict=True):
                total += value
            counts[out.tensor] = counts.get(out.tensor, 0) + int(shape[0])
    if not counts:
        raise StatisticsError("compensation received no samples: the data source is empty")
    return {tensor: CrossMoments(*(value / max(counts[tensor], 1) for value in totals))
            for tensor, totals in sums.items()}


def original_activations(analysis: Analysis, taps: Sequence[Tap],
                         batches: Sequence[FeedDict], provider: Provider,
                         limit_bytes: int) -> list[FeedDict] | None:
    """Per batch, the original model's tap tensors as float32 (None when over `limit_bytes`)."""
    names = [tap.tensor for tap in taps]
    model = onnx.ModelProto()
    model.CopyFrom(analysis.graph.model)
    del model.graph.output[:]
    model.graph.output.extend([helper.make_tensor_value_info(name, _elem_type(analysis, name),
                                                             None) for name in names])
    session = open_session(model, provider)
    cached: list[FeedDict] = []
    total = 0
    for feeds in batches:
        values = [np.asarray(value, dtype=np.float32) for value in session.run(names, feeds)]
        total += sum(value.nbytes for value in values)
        if total > limit_bytes:
            return None
        cached.append({**feeds, **dict(zip(names, values, strict=True))})
    return cached


def _elem_type(analysis: Analysis, tensor: str) -> int:
    for value in (*analysis.graph.model.graph.value_info, *analysis.graph.model.graph.input):
        if value.name == tensor:
            return int(value.type.tensor_type.elem_type)
    return TensorProto.FLOAT
