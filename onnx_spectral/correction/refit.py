"""Layer refit (SPEC section 5, beyond the paper): refit whole linear layers of the pruned model.

Sequential compensation reconstructs a sink's input channels one position at a time
(``W' = W A``). A refit goes further for the layers downstream of the pruning: each linear layer
whose handler allows it (`LinearLayer.refit_problem`: a dense 2-D Conv, a Gemm, a MatMul or an
Einsum by a matrix) and whose input the pruning changed gets new weights (and bias) fitted by
ridge least squares so that, on the calibration batches, it maps the PRUNED model's input to
the ORIGINAL model's output of that layer (its kept output channels):

    [W' b'] = argmin  sum ||y_orig - W' p_pruned - b'||^2 + lambda ||W' - W_c||^2

where ``p`` is the layer's receptive field (``C_in x kernel`` features of a Conv, im2col; the
input row of a Gemm/MatMul), ``y`` its output at that position and ``W_c`` the layer's current
(compensated) weight: the ridge pulls toward what the compensation found, not toward zero, so
a layer with few rows per feature (a Gemm after a Flatten) keeps what the data cannot tell.
Layers are refitted in graph order, each from the model with the earlier refits applied. A
full Conv kernel is fitted, not only a channel mix, so a layer can absorb errors its input
carries across positions.

The ridge is chosen per layer by two-fold cross-validation: the normal equations are summed
separately over the first and the second half of every batch's samples (batches of one sample
alternate between the halves), each half's fit is scored on the other half for every value of
`RIDGES`, and the best is refitted on both (a large ridge keeps the current weights). A layer
whose held-out error with every ridge is no lower than with its current weights keeps them.

A layer read only by a Relu is then refitted `RELU_PASSES` more times toward relaxed targets:
where the original's output is negative, any negative output gives the same activation, so the
target there becomes ``min(prediction, 0)``. Each pass is a majorize-minimize step on the error
after the Relu (the Gram matrix majorizes its curvature), taken from a Nesterov-extrapolated
point, which converges faster than plain steps (MNIST at --flops 0.07: the relaxed error of
its second convolution after ten passes is 4% lower).

A layer is left as it is (with the reason in the notes) when its receptive field has more than
`max_features` features (the normal equations are ``d x d``) or the batches give fewer than
`rows_per_feature` rows per feature. The normal equations are summed in float64 from the two
models' activations (float32 products), one batch at a time.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnx_spectral.analysis import Analysis
from onnx_spectral.calibration.sources import FeedDict
from onnx_spectral.graph.sessions import Provider, open_session
from onnx_spectral.graph.submodel import submodel
from onnx_spectral.ops import linear_layer_for
from onnx_spectral.ops.linear_layer import LinearLayer
from onnx_spectral.selection.plan import GroupPlan

#: Largest receptive field (features) refitted by default. The normal equations cost
#: rows x d^2: on CREPE full at --ratio 0.5 (four layers of 4,096 features, 100,000 rows each)
#: the refit took 98 s for 98.9% -> 99.9% raw pitch accuracy, past the 2-minute budget of a run.
MAX_FEATURES = 2048
#: Fewest rows (samples x positions) per feature a refit needs: below one, the fit is not
#: determined by the data at all. Cross-validation decides whether a layer with few rows gains:
#: MNIST's first Gemm at --flops 0.07 (432 features, 1,000 rows) is refitted with ridge 1,
#: held-out relative error 11.3% -> 3.6% of its output energy (ridge 1e-3: 9.2%; 1e-5: 20.7%).
ROWS_PER_FEATURE = 1
#: Ridge values (times the mean feature energy) the cross-validation chooses from. Pulling
#: toward the current weights instead of zero: MNIST CNN at --flops 0.07, five calibration
#: sets of 1,000 images, mean accuracy 98.23% -> 98.40% (two relaxed passes each).
RIDGES = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
#: Relaxed refits of a layer read by a Relu. MNIST CNN at --flops 0.07, mean over five
#: calibration sets: none 98.32%, 2 plain passes 98.40%, 10 plain 98.49%, 10 extrapolated
#: 98.52%, 20 extrapolated 98.53%.
RELU_PASSES = 10
#: Activations of one layer (its input and the original's output, all batches) kept in memory
#: for the relaxed passes; past this, each pass runs the two models again.
CACHE_BYTES = 512 * 2**20


@dataclass(frozen=True)
class _Layer:
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
class _NormalEquations:
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

    def error(self, solution: np.ndarray) -> float:
        """Sum of squared residuals of `solution` [d', C_out] over these rows."""
        return (self.energy - 2.0 * float(np.sum(solution * self.cross))
                + float(np.sum(solution * (self.gram @ solution))))


def _constant(model: onnx.ModelProto, name: str) -> np.ndarray | None:
    for tensor in model.graph.initializer:
        if tensor.name == name:
            return numpy_helper.to_array(tensor)
    return None


def _set_constant(model: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    for tensor in model.graph.initializer:
        if tensor.name == name:
            dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
            tensor.CopyFrom(numpy_helper.from_array(value.astype(dtype), name))
            return
    raise KeyError(name)


def _layer(model: onnx.ModelProto, node: onnx.NodeProto, view: LinearLayer,
           readers: Mapping[str, list[str]]) -> _Layer | str:
    """The refit form of `node`, or why it cannot be refitted (`readers`: the op types of the
    nodes reading each tensor, and "output" for a graph output)."""
    position = view.weight_input
    weight = _constant(model, node.input[position]) if len(node.input) > position else None
    if weight is None:
        return "its weight is not a constant"
    if weight.dtype != np.float32:
        return f"its weight is {weight.dtype}, only float32 layers are refitted"
    if any(len(readers.get(name, [])) > 1 for name in node.input[1:] if name):
        return "its weight or bias is shared with another node"
    problem = view.refit_problem(node, weight)
    if problem is not None:
        return problem
    outputs, features = view.weight_matrix(node, weight).shape
    bias_position = view.bias_input(node)
    bias = None if bias_position is None else _constant(model, node.input[bias_position])
    rectified = readers.get(node.output[0]) == ["Relu"]
    return _Layer(node, view, int(features), bias is not None and bias.size == outputs,
                  rectified)


def _rows(layer: _Layer, inputs: np.ndarray, outputs: np.ndarray, weight: np.ndarray
          ) -> tuple[np.ndarray, np.ndarray]:
    """(features [n, d], targets [n, C_out]) of one batch, float32 (their products are summed
    in float64 over the batches)."""
    node = layer.node
    features = layer.view.receptive_fields(node, inputs, weight)
    moved = np.moveaxis(outputs, layer.view.output_axis(node), -1)
    return features, moved.reshape(-1, moved.shape[-1]).astype(np.float32)


def _run(model: onnx.ModelProto, name: str, batches: Iterable[FeedDict], provider: Provider
         ) -> Iterable[np.ndarray]:
    session = open_session(submodel(model, [name]), provider)
    wanted = {value.name for value in session.get_inputs()}
    for feeds in batches:
        yield session.run([name], {key: value for key, value in feeds.items()
                                   if key in wanted})[0]


def _affected(model: onnx.ModelProto, changed: Iterable[str]) -> set[str]:
    """Names of the tensors computed from any of the `changed` tensors."""
    reached = set(changed)
    for node in model.graph.node:  # graph order is topological
        if any(name in reached for name in node.input):
            reached.update(node.output)
    return reached


def refit_layers(original: onnx.ModelProto, pruned: onnx.ModelProto,
                 kept_rows: Mapping[str, np.ndarray], changed: Iterable[str],
                 batches: Sequence[FeedDict], provider: Provider,
                 max_features: int = MAX_FEATURES,
                 rows_per_feature: int = ROWS_PER_FEATURE) -> tuple[onnx.ModelProto, list[str]]:
    """Refit, in graph order, the linear layers of `pruned` whose input depends on a tensor in
    `changed` (the outputs of the pruned producers).

    `kept_rows`: for a node whose output channels were pruned, the original channels it keeps
    ([k], ascending); other nodes keep all. `batches`: calibration feeds, read once per layer
    (and again per relaxed pass when its activations exceed `CACHE_BYTES`). Returns the
    refitted copy and notes on the layers left as they were.
    """
    model = onnx.ModelProto()
    model.CopyFrom(pruned)
    affected = _affected(model, changed)
    readers: dict[str, list[str]] = {value.name: ["output"] for value in model.graph.output}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node.op_type)
    originals = {node.name: node for node in original.graph.node}
    weights = {tensor.name for tensor in model.graph.initializer}
    notes = []
    refitted = 0
    for node in list(model.graph.node):
        view = linear_layer_for(node)
        if view is None or node.input[0] not in affected or node.name not in originals:
            continue
        position = view.weight_input
        if len(node.input) <= position or node.input[position] not in weights:
            continue  # a product of two activations (attention scores): no weight to refit
        layer = _layer(model, node, view, readers)
        if isinstance(layer, str):
            notes.append(f"layer '{node.name}' not refitted: {layer}")
            continue
        if layer.features > max_features:
            notes.append(f"layer '{node.name}' not refitted: {layer.features} input features "
                         f"(more than {max_features})")
            continue
        fitted = _fit(_LayerRows(model, original, layer, kept_rows.get(node.name), batches,
                                 provider), rows_per_feature)
        if isinstance(fitted, str):
            notes.append(f"layer '{node.name}' not refitted: {fitted}")
            continue
        _write(model, layer, fitted)
        refitted += 1
    if refitted:
        notes.insert(0, f"layer refit: {refitted} layer{'s' if refitted > 1 else ''} refitted "
                        "toward the original's outputs")
    return model, notes


@dataclass
class _LayerRows:
    """Where one layer's rows come from: the pruned model's input of `layer` and the original
    model's output of it (restricted to the original channels `kept`, if given).

    The first pass keeps those activations in memory, up to `CACHE_BYTES`, so that the relaxed
    passes do not run the two models again."""

    model: onnx.ModelProto
    original: onnx.ModelProto
    layer: _Layer
    kept: np.ndarray | None
    batches: Sequence[FeedDict]
    provider: Provider
    _cache: list[tuple[np.ndarray, np.ndarray]] | None = None

    def _activations(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Per batch: the layer's input in the pruned model and its output in the original."""
        if self._cache is not None:
            yield from self._cache
            return
        node = self.layer.node
        cache: list[tuple[np.ndarray, np.ndarray]] | None = []
        held = 0
        inputs = _run(self.model, node.input[0], self.batches, self.provider)
        targets = _run(self.original, node.output[0], self.batches, self.provider)
        for values, wanted in zip(inputs, targets, strict=True):
            if self.kept is not None:
                wanted = np.take(wanted, self.kept, axis=self.layer.view.output_axis(node))
            held += values.nbytes + wanted.nbytes
            if cache is not None and held <= CACHE_BYTES:
                cache.append((values, wanted))
            else:
                cache = None
            yield values, wanted
        self._cache = cache

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
        """Per batch: features [n, d'] (a last column of ones when the layer has a bias),
        targets [n, C_out], both float32, and the number of samples they come from (rows are
        grouped by sample, in sample order)."""
        weight = _weight(self.model, self.layer)
        for values, wanted in self._activations():
            features, target = _rows(self.layer, values, wanted, weight)
            if self.layer.bias:
                features = np.hstack([features, np.ones((len(features), 1), dtype=np.float32)])
            yield features, target, len(values)

    def samples(self) -> int:
        return sum(len(next(iter(feeds.values()))) for feeds in self.batches)


def _fit(rows: _LayerRows, rows_per_feature: int) -> np.ndarray | str:
    """The refitted [weight; bias] of the layer, [d', C_out], or why it is left as it is."""
    layer = rows.layer
    outputs = layer.view.weight_matrix(layer.node, _weight(rows.model, layer)).shape[0]
    halves: list[_NormalEquations] | None = None
    for batch, (features, target, samples) in enumerate(rows):
        if halves is None:
            if target.shape[1] != outputs:
                return ("the original channels its outputs keep are not known (a Concat or "
                        "Split group)")
            total = len(features) * rows.samples() // max(samples, 1)
            if total < rows_per_feature * layer.features:
                return (f"{total} calibration rows for {layer.features} input features "
                        f"(fewer than {rows_per_feature} per feature)")
            shapes = ((features.shape[1],) * 2, (features.shape[1], target.shape[1]))
            halves = [_NormalEquations(np.zeros(shapes[0]), np.zeros(shapes[1]), 0.0)
                      for _ in range(2)]
        if samples >= 2:  # the first and the second half of the batch's samples
            split = len(features) // samples * (samples // 2)
            halves[0].add(features[:split], target[:split])
            halves[1].add(features[split:], target[split:])
        else:  # batches of one sample alternate
            halves[batch % 2].add(features, target)
    if halves is None:
        return "no calibration batches"
    if min(half.rows for half in halves) == 0:
        return "one calibration sample is too few to cross-validate the fit"
    both = _NormalEquations(halves[0].gram + halves[1].gram, halves[0].cross + halves[1].cross,
                            halves[0].energy + halves[1].energy, halves[0].rows + halves[1].rows)
    current = _current(rows.model, layer)
    ridge = _cross_validated_ridge(halves, layer, current, both.error(current))
    if ridge is None:
        return "no ridge fits held-out rows better than its current weights"
    solution = _solve(both.gram, both.cross, layer, ridge, current)
    previous = solution
    for step in range(RELU_PASSES if layer.rectified else 0):
        point = solution + step / (step + 3) * (solution - previous)
        previous = solution
        solution = _solve(both.gram, _relaxed_cross(rows, point), layer, ridge, current)
    return solution


def _cross_validated_ridge(halves: Sequence[_NormalEquations], layer: _Layer,
                           current: np.ndarray, current_error: float) -> float | None:
    """The value of `RIDGES` whose fits on one half have the least error on the other (summed
    both ways), or None when none beats `current_error` (the `current` weights [d', C_out] on
    all rows)."""
    best, best_error = None, current_error
    for ridge in RIDGES:
        error = sum(halves[1 - i].error(_solve(halves[i].gram, halves[i].cross, layer, ridge,
                                               current))
                    for i in range(2))
        if error < best_error:
            best, best_error = ridge, error
    return best


def _relaxed_cross(rows: _LayerRows, solution: np.ndarray) -> np.ndarray:
    """Cross statistics [d', C_out] toward relaxed targets: where the original output is
    negative (the Relu reading it gives 0), the target is ``min(prediction, 0)``, the
    prediction of the weights `solution` [d', C_out]."""
    cross = np.zeros_like(solution)
    fitted = solution.astype(np.float32)
    for features, target, _ in rows:
        relaxed = np.where(target > 0, target, np.minimum(features @ fitted, 0))
        cross += features.T @ relaxed
    return cross


def _weight(model: onnx.ModelProto, layer: _Layer) -> np.ndarray:
    """The layer's present weight, in the node's layout."""
    weight = _constant(model, layer.node.input[layer.view.weight_input])
    assert weight is not None
    return weight


def _current(model: onnx.ModelProto, layer: _Layer) -> np.ndarray:
    """The layer's present [weight; bias] in the fitted layout, [d', C_out] float64."""
    node = layer.node
    matrix = layer.view.weight_matrix(node, _weight(model, layer)).T
    if layer.bias:
        position = layer.view.bias_input(node)
        assert position is not None
        bias = _constant(model, node.input[position])
        assert bias is not None
        matrix = np.vstack([matrix, bias.reshape(1, -1)])
    return matrix.astype(np.float64)


def _solve(gram: np.ndarray, cross: np.ndarray, layer: _Layer, rho: float,
           prior: np.ndarray) -> np.ndarray:
    """Ridge solution [d', C_out] pulled toward `prior` [d', C_out]; the ridge (rho * mean
    feature energy) spares the bias. `gram` [d', d'], `cross` [d', C_out]."""
    d = layer.features
    regularized = gram.copy()
    ridge = max(rho * float(np.trace(gram[:d, :d])) / max(d, 1), np.finfo(np.float64).tiny)
    regularized[np.arange(d), np.arange(d)] += ridge
    cross = cross.copy()
    cross[:d] += ridge * prior[:d]
    try:
        return np.linalg.solve(regularized, cross)
    except np.linalg.LinAlgError:  # e.g. all rows of a half zero: least-norm solution
        return np.linalg.lstsq(regularized, cross, rcond=None)[0]


def _write(model: onnx.ModelProto, layer: _Layer, solution: np.ndarray) -> None:
    """Store the fitted weight (and bias) in the node's constants."""
    node, view = layer.node, layer.view
    weight = _weight(model, layer)
    matrix = solution[:layer.features]  # [d, C_out]
    _set_constant(model, node.input[view.weight_input],
                  view.weight_from_matrix(node, matrix.T, weight))
    if layer.bias:
        position = view.bias_input(node)
        assert position is not None
        bias = _constant(model, node.input[position])
        assert bias is not None
        _set_constant(model, node.input[position], solution[layer.features].reshape(bias.shape))


def refit_pruned(analysis: Analysis, pruned: onnx.ModelProto, plans: Sequence[GroupPlan],
                 batches: Sequence[FeedDict], provider: Provider,
                 max_features: int = MAX_FEATURES) -> tuple[onnx.ModelProto, list[str]]:
    """`refit_layers` for the layers downstream of the groups `plans` pruned (`pruned` is the
    rewrite of `analysis.graph.model` by `plans`)."""
    kept_rows: dict[str, np.ndarray] = {}
    changed: list[str] = []
    for plan in plans:
        if plan.group.parts or plan.kept.size == plan.group.channels:
            continue
        for producer in plan.group.producers:
            kept_rows[producer] = plan.kept
            changed.extend(analysis.graph.nodes_by_name[producer].output)
    if not changed:
        return pruned, []
    return refit_layers(analysis.graph.model, pruned, kept_rows, changed, batches, provider,
                        max_features)
