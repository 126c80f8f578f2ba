"""The passes of the layer refit over the calibration batches (`refit.py`): one layer's rows
(its receptive fields in the pruned model and the original's outputs) and their sums, the
normal equations of a ridge fit, on whatever worker runs them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from onnx_spectral.calibration.sources import FeedDict
from onnx_spectral.graph.executor import (
    Batch,
    Executor,
    Sums,
    WorkerCache,
    sample_range,
    total_samples,
)
from onnx_spectral.graph.sessions import Provider, open_session
from onnx_spectral.graph.submodel import submodel
from onnx_spectral.ops.linear_layer import LinearLayer

#: Activations of one layer (its input and the original's output) a worker keeps for the
#: relaxed passes; past this, each pass runs the two models again for the batches left out.
CACHE_BYTES = 512 * 2**20
#: The original model's outputs of the layers to refit, kept at once (all workers together):
#: one pass of the original computes as many layers' targets as this holds.
TARGET_BYTES = 1 << 30


@dataclass(frozen=True)
class RefitLayer:
    """A layer to refit: its node (in the pruned model), its handler's linear-layer view and
    its fitted form."""

    node: onnx.NodeProto
    view: LinearLayer
    features: int
    """d: receptive-field size."""
    bias: bool
    """Whether the node has a bias input to fit (an intercept)."""
    rectified: bool
    """Whether the node's output is read only by a Relu (its targets can be relaxed)."""


@dataclass
class NormalEquations:
    """Least-squares statistics of one set of rows: ``gram`` [d', d'] (features x features),
    ``cross`` [d', C_out] (features x targets), ``energy`` (sum of the squared targets),
    ``rows`` (how many)."""

    gram: np.ndarray
    cross: np.ndarray
    energy: float
    rows: int = 0

    def add(self, features: np.ndarray, targets: np.ndarray) -> None:
        """Add rows: features [n, d'], targets [n, C_out] (float32)."""
        self.rows += len(features)
        self.gram += features.T @ features
        self.cross += features.T @ targets
        self.energy += float(np.einsum("ij,ij->", targets, targets, dtype=np.float64))

    def merged(self, other: NormalEquations) -> NormalEquations:
        return NormalEquations(self.gram + other.gram, self.cross + other.cross,
                               self.energy + other.energy, self.rows + other.rows)

    def error(self, solution: np.ndarray) -> float:
        """Sum of squared residuals of `solution` [d', C_out] over these rows."""
        return (self.energy - 2.0 * float(np.sum(solution * self.cross))
                + float(np.sum(solution * (self.gram @ solution))))


def constant(model: onnx.ModelProto, name: str) -> np.ndarray | None:
    """The initializer `name` of `model` as an array (None when there is none)."""
    for tensor in model.graph.initializer:
        if tensor.name == name:
            return numpy_helper.to_array(tensor)
    return None


def layer_weight(model: onnx.ModelProto, layer: RefitLayer) -> np.ndarray:
    """The layer's present weight, in the node's layout."""
    weight = constant(model, layer.node.input[layer.view.weight_input])
    assert weight is not None
    return weight


def layer_rows(layer: RefitLayer, inputs: np.ndarray, outputs: np.ndarray, weight: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray]:
    """(features [n, d], targets [n, C_out]) of one batch, float32 (their products are summed
    in float64 over the batches)."""
    node = layer.node
    features = layer.view.receptive_fields(node, inputs, weight)
    moved = np.moveaxis(outputs, layer.view.output_axis(node), -1)
    return features, moved.reshape(-1, moved.shape[-1]).astype(np.float32)


def _open(model: onnx.ModelProto, names: Sequence[str], provider: Provider
          ) -> ort.InferenceSession:
    """A session on the part of `model` that computes the tensors `names`."""
    return open_session(submodel(model, names), provider)


def _outputs(session: ort.InferenceSession, feeds: FeedDict) -> list[np.ndarray]:
    wanted = {value.name for value in session.get_inputs()}
    return [np.asarray(value) for value in
            session.run(None, {key: value for key, value in feeds.items() if key in wanted})]


def _kept_channels(layer: RefitLayer, output: np.ndarray, kept: np.ndarray | None
                   ) -> np.ndarray:
    """The original's output of `layer` restricted to the channels its pruned node keeps."""
    if kept is None:
        return output
    return np.take(output, kept, axis=layer.view.output_axis(layer.node))


@dataclass(frozen=True)
class LayerSource:
    """Where one layer's rows come from: the pruned `model`'s input of `layer` and the
    `original` model's output of it (restricted to the original channels `kept`, if given)."""

    model: onnx.ModelProto
    original: onnx.ModelProto
    layer: RefitLayer
    kept: np.ndarray | None
    provider: Provider
    targets: str | None = None
    """The worker-cache namespace where `OriginalTargets` left this layer's targets, if it did."""

    @property
    def namespace(self) -> str:
        """Worker-cache namespace of this layer's activations, by batch index."""
        return f"refit/{self.layer.node.name}"


class LayerRows:
    """A worker's rows of one layer, batch by batch: its activations from the worker's cache,
    or from running the two models (then cached, up to `CACHE_BYTES` per worker)."""

    def __init__(self, source: LayerSource, cache: WorkerCache) -> None:
        self.source = source
        self.cache = cache
        self.weight = layer_weight(source.model, source.layer)
        self.pruned: ort.InferenceSession | None = None
        self.original: ort.InferenceSession | None = None

    def activations(self, batch: Batch) -> tuple[np.ndarray, np.ndarray]:
        """The layer's input in the pruned model and its output in the original."""
        source = self.source
        cached = self.cache.get(source.namespace, batch.index)
        if cached is not None:
            return cached  # type: ignore[no-any-return]
        node = source.layer.node
        if self.pruned is None:
            self.pruned = _open(source.model, [node.input[0]], source.provider)
        values = _outputs(self.pruned, batch.feeds)[0]
        wanted = (None if source.targets is None
                  else self.cache.get(source.targets, batch.index))
        if wanted is None:
            if self.original is None:
                self.original = _open(source.original, [node.output[0]], source.provider)
            wanted = _kept_channels(source.layer, _outputs(self.original, batch.feeds)[0],
                                    source.kept)
        size = values.nbytes + wanted.nbytes
        if self.cache.size(source.namespace) + size <= CACHE_BYTES:
            self.cache.put(source.namespace, batch.index, (values, wanted), size)
        return values, wanted

    def rows(self, batch: Batch) -> tuple[np.ndarray, np.ndarray]:
        """Features [n, d'] (a last column of ones when the layer has a bias) and targets
        [n, C_out] of one batch, both float32; rows are grouped by sample, in sample order."""
        values, wanted = self.activations(batch)
        features, target = layer_rows(self.source.layer, values, wanted, self.weight)
        if self.source.layer.bias:
            features = np.hstack([features, np.ones((len(features), 1), dtype=np.float32)])
        return features, target


@dataclass
class LayerSums:
    """A worker's normal equations of one layer, one per cross-validation half (None before
    the first batch or when the targets' width is not the layer's), and how many samples."""

    halves: list[NormalEquations] | None
    samples: int
    width_mismatch: bool = False

    def merged(self, other: LayerSums) -> LayerSums:
        if self.halves is None or other.halves is None:
            halves = self.halves or other.halves
        else:
            halves = [a.merged(b) for a, b in zip(self.halves, other.halves, strict=True)]
        return LayerSums(halves, self.samples + other.samples,
                         self.width_mismatch or other.width_mismatch)


@dataclass(frozen=True)
class NormalEquationsPass:
    """The pass that sums one layer's normal equations (a `PassTask`)."""

    source: LayerSource
    outputs: int
    """C_out of the layer."""

    def start(self, cache: WorkerCache) -> _NormalEquationsAccumulator:
        return _NormalEquationsAccumulator(self, LayerRows(self.source, cache))

    def merge(self, first: LayerSums, second: LayerSums) -> LayerSums:
        return first.merged(second)


class _NormalEquationsAccumulator:
    def __init__(self, task: NormalEquationsPass, rows: LayerRows) -> None:
        self.task = task
        self.rows = rows
        self.sums = LayerSums(None, 0)

    def add(self, batch: Batch) -> None:
        features, target = self.rows.rows(batch)
        self.sums.samples += batch.samples
        if target.shape[1] != self.task.outputs:
            self.sums.width_mismatch = True
            return
        if self.sums.halves is None:
            shapes = ((features.shape[1],) * 2, (features.shape[1], target.shape[1]))
            self.sums.halves = [NormalEquations(np.zeros(shapes[0]), np.zeros(shapes[1]), 0.0)
                                for _ in range(2)]
        halves = self.sums.halves
        if batch.samples >= 2:  # the first and the second half of the batch's samples
            split = len(features) // batch.samples * (batch.samples // 2)
            halves[0].add(features[:split], target[:split])
            halves[1].add(features[split:], target[split:])
        else:  # batches of one sample alternate
            halves[batch.index % 2].add(features, target)

    def result(self) -> LayerSums:
        return self.sums


@dataclass(frozen=True)
class RelaxedCrossPass:
    """Cross statistics [d', C_out] toward relaxed targets (a `PassTask`): where the original
    output is negative (the Relu reading it gives 0), the target is ``min(prediction, 0)``,
    the prediction of the weights `solution` [d', C_out]."""

    source: LayerSource
    solution: np.ndarray

    def start(self, cache: WorkerCache) -> _RelaxedCrossAccumulator:
        return _RelaxedCrossAccumulator(self, LayerRows(self.source, cache))

    def merge(self, first: np.ndarray, second: np.ndarray) -> np.ndarray:
        return first + second


class _RelaxedCrossAccumulator:
    def __init__(self, task: RelaxedCrossPass, rows: LayerRows) -> None:
        self.rows = rows
        self.fitted = task.solution.astype(np.float32)
        self.cross = np.zeros_like(task.solution)

    def add(self, batch: Batch) -> None:
        features, target = self.rows.rows(batch)
        relaxed = np.where(target > 0, target, np.minimum(features @ self.fitted, 0))
        self.cross += features.T @ relaxed

    def result(self) -> np.ndarray:
        return self.cross


class OriginalTargets:
    """The original model's outputs of the layers to refit (`layers`, in refit order), left in
    the workers' caches a group of layers at a time: one pass of the original computes as many
    consecutive layers' targets as `TARGET_BYTES` holds, instead of one pass per layer.

    A layer whose targets alone pass the limit gets none here; its rows then run the original
    for it (`LayerRows`).
    """

    def __init__(self, original: onnx.ModelProto, layers: Sequence[RefitLayer],
                 kept_rows: Mapping[str, np.ndarray], batches: Sequence[FeedDict],
                 provider: Provider, executor: Executor) -> None:
        self.original = original
        self.layers = list(layers)
        self.kept_rows = kept_rows
        self.batches = batches
        self.provider = provider
        self.executor = executor
        self.ready: set[str] = set()
        self.layer_bytes = self._bytes_per_sample() if layers and batches else {}

    @staticmethod
    def namespace(layer: RefitLayer) -> str:
        return f"refit/target/{layer.node.name}"

    def _bytes_per_sample(self) -> dict[str, int]:
        """Bytes per sample of each layer's kept targets, from one sample of the first batch."""
        one = sample_range(self.batches[0], 0, 1)
        session = _open(self.original, [layer.node.output[0] for layer in self.layers],
                        self.provider)
        return {layer.node.name: _kept_channels(layer, output,
                                                self.kept_rows.get(layer.node.name)).nbytes
                for layer, output in zip(self.layers, _outputs(session, one), strict=True)}

    def ready_for(self, index: int) -> str | None:
        """The namespace of layer `index`'s targets, after computing them (with the layers
        after it that fit) if they are not there yet; None when they do not fit alone."""
        layer = self.layers[index]
        if layer.node.name not in self.ready:
            samples = total_samples(self.batches)
            chunk: list[RefitLayer] = []
            held = 0
            for following in self.layers[index:]:
                size = self.layer_bytes[following.node.name] * samples
                if held + size > TARGET_BYTES:
                    break
                chunk.append(following)
                held += size
            if not chunk:
                return None
            self.executor.fold(_TargetsPass(self.original, tuple(chunk), {
                item.node.name: self.kept_rows[item.node.name] for item in chunk
                if item.node.name in self.kept_rows}, self.provider), self.batches,
                desc=f"original outputs of {len(chunk)} layers", total=samples)
            self.ready.update(item.node.name for item in chunk)
        return self.namespace(layer)

    def forget(self, index: int) -> None:
        """Drop layer `index`'s targets from the caches."""
        self.executor.forget(self.namespace(self.layers[index]))


@dataclass(frozen=True)
class _TargetsPass(Sums[int]):
    """One pass of the original computing `layers`' targets into the workers' caches (a
    `PassTask`; its result counts the batches)."""

    original: onnx.ModelProto
    layers: tuple[RefitLayer, ...]
    kept_rows: dict[str, np.ndarray]
    provider: Provider

    def start(self, cache: WorkerCache) -> _TargetsAccumulator:
        session = _open(self.original, [layer.node.output[0] for layer in self.layers],
                        self.provider)
        return _TargetsAccumulator(self, session, cache)


class _TargetsAccumulator:
    def __init__(self, task: _TargetsPass, session: ort.InferenceSession, cache: WorkerCache
                 ) -> None:
        self.task = task
        self.session = session
        self.cache = cache
        self.batches = 0

    def add(self, batch: Batch) -> None:
        for layer, output in zip(self.task.layers, _outputs(self.session, batch.feeds),
                                 strict=True):
            wanted = _kept_channels(layer, output, self.task.kept_rows.get(layer.node.name))
            self.cache.put(OriginalTargets.namespace(layer), batch.index, wanted, wanted.nbytes)
        self.batches += 1

    def result(self) -> int:
        return self.batches
