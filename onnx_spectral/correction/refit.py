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
models' activations (float32 products), one batch at a time, by the passes of `refit_rows.py`:
the pruned model runs once per layer (its input changes with every refit before it), the
original once for as many layers' outputs as `TARGET_BYTES` holds.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper
from scipy.linalg import cho_factor, cho_solve

from onnx_spectral.analysis import Analysis
from onnx_spectral.calibration.sources import FeedDict
from onnx_spectral.correction.refit_rows import (
    LayerSource,
    LayerSums,
    NormalEquations,
    NormalEquationsPass,
    OriginalTargets,
    RefitLayer,
    RelaxedCrossPass,
    constant,
    layer_weight,
)
from onnx_spectral.graph.executor import Executor, LocalExecutor, total_samples
from onnx_spectral.graph.sessions import Provider
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


def _set_constant(model: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    for tensor in model.graph.initializer:
        if tensor.name == name:
            dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
            tensor.CopyFrom(numpy_helper.from_array(value.astype(dtype), name))
            return
    raise KeyError(name)


def _layer(model: onnx.ModelProto, node: onnx.NodeProto, view: LinearLayer,
           readers: Mapping[str, list[str]]) -> RefitLayer | str:
    """The refit form of `node`, or why it cannot be refitted (`readers`: the op types of the
    nodes reading each tensor, and "output" for a graph output)."""
    position = view.weight_input
    weight = constant(model, node.input[position]) if len(node.input) > position else None
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
    bias = None if bias_position is None else constant(model, node.input[bias_position])
    rectified = readers.get(node.output[0]) == ["Relu"]
    return RefitLayer(node, view, int(features), bias is not None and bias.size == outputs,
                  rectified)


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
                 rows_per_feature: int = ROWS_PER_FEATURE, executor: Executor | None = None
                 ) -> tuple[onnx.ModelProto, list[str]]:
    """Refit, in graph order, the linear layers of `pruned` whose input depends on a tensor in
    `changed` (the outputs of the pruned producers).

    `kept_rows`: for a node whose output channels were pruned, the original channels it keeps
    ([k], ascending); other nodes keep all. `batches`: calibration feeds, read by the pruned
    model once per layer (and again per relaxed pass when a worker's share of its activations
    exceeds `CACHE_BYTES`) and by the original once per group of layers whose outputs fit in
    `TARGET_BYTES` (`OriginalTargets`), on the workers of `executor` (default: this process).
    Returns the refitted copy and notes on the layers left as they were.
    """
    executor = executor or LocalExecutor()
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
    layers: list[RefitLayer] = []
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
        elif layer.features > max_features:
            notes.append(f"layer '{node.name}' not refitted: {layer.features} input features "
                         f"(more than {max_features})")
        else:
            layers.append(layer)
    targets = OriginalTargets(original, layers, kept_rows, batches, provider, executor)
    for index, layer in enumerate(layers):
        source = LayerSource(model, original, layer, kept_rows.get(layer.node.name), provider,
                             targets.ready_for(index))
        fitted = _fit(source, batches, executor, rows_per_feature)
        executor.forget(source.namespace)
        targets.forget(index)
        if isinstance(fitted, str):
            notes.append(f"layer '{layer.node.name}' not refitted: {fitted}")
            continue
        _write(model, layer, fitted)
        refitted += 1
    if refitted:
        notes.insert(0, f"layer refit: {refitted} layer{'s' if refitted > 1 else ''} refitted "
                        "toward the original's outputs")
    return model, notes


def _fit(source: LayerSource, batches: Sequence[FeedDict], executor: Executor,
         rows_per_feature: int) -> np.ndarray | str:
    """The refitted [weight; bias] of the layer, [d', C_out], or why it is left as it is."""
    layer = source.layer
    outputs = layer.view.weight_matrix(layer.node, layer_weight(source.model, layer)).shape[0]
    desc = f"refit {layer.node.name}"
    total = total_samples(batches)
    sums: LayerSums = executor.fold(NormalEquationsPass(source, outputs), batches, desc=desc,
                                     total=total)
    if sums.width_mismatch:
        return ("the original channels its outputs keep are not known (a Concat or Split "
                "group)")
    halves = sums.halves
    if halves is None:
        return "no calibration batches"
    rows = halves[0].rows + halves[1].rows
    if rows < rows_per_feature * layer.features:
        return (f"{rows} calibration rows for {layer.features} input features "
                f"(fewer than {rows_per_feature} per feature)")
    if min(half.rows for half in halves) == 0:
        return "one calibration sample is too few to cross-validate the fit"
    both = halves[0].merged(halves[1])
    current = _current(source.model, layer)
    ridge = _cross_validated_ridge(halves, layer, current, both.error(current))
    if ridge is None:
        return "no ridge fits held-out rows better than its current weights"
    system = _RidgeSystem(both.gram, layer, ridge, current)
    solution = system.solve(both.cross)
    previous = solution
    for step in range(RELU_PASSES if layer.rectified else 0):
        point = solution + step / (step + 3) * (solution - previous)
        previous = solution
        cross = executor.fold(RelaxedCrossPass(source, point), batches,
                              desc=f"{desc} (relaxed {step + 1}/{RELU_PASSES})", total=total)
        solution = system.solve(cross)
    return solution


def _cross_validated_ridge(halves: Sequence[NormalEquations], layer: RefitLayer,
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


def _current(model: onnx.ModelProto, layer: RefitLayer) -> np.ndarray:
    """The layer's present [weight; bias] in the fitted layout, [d', C_out] float64."""
    node = layer.node
    matrix = layer.view.weight_matrix(node, layer_weight(model, layer)).T
    if layer.bias:
        position = layer.view.bias_input(node)
        assert position is not None
        bias = constant(model, node.input[position])
        assert bias is not None
        matrix = np.vstack([matrix, bias.reshape(1, -1)])
    return matrix.astype(np.float64)


class _RidgeSystem:
    """The ridge normal equations ``(G + r I) W = C + r W_prior`` of one layer, factored once
    (Cholesky) and solved for as many right-hand sides as the relaxed passes bring. The ridge
    ``r`` (rho * mean feature energy) spares the bias. `gram` G [d', d'], `prior` [d', C_out].
    """

    def __init__(self, gram: np.ndarray, layer: RefitLayer, rho: float, prior: np.ndarray
                 ) -> None:
        d = self.features = layer.features
        self.regularized = gram.copy()
        self.ridge = max(rho * float(np.trace(gram[:d, :d])) / max(d, 1),
                         np.finfo(np.float64).tiny)
        self.regularized[np.arange(d), np.arange(d)] += self.ridge
        self.pull = self.ridge * prior[:d]
        try:
            self.factor: tuple[np.ndarray, bool] | None = cho_factor(self.regularized)
        except np.linalg.LinAlgError:  # e.g. all rows of a half zero: least-norm solutions
            self.factor = None

    def solve(self, cross: np.ndarray) -> np.ndarray:
        """The solution [d', C_out] for the cross statistics `cross` [d', C_out]."""
        cross = cross.copy()
        cross[:self.features] += self.pull
        if self.factor is not None:
            return np.asarray(cho_solve(self.factor, cross))
        return np.linalg.lstsq(self.regularized, cross, rcond=None)[0]


def _solve(gram: np.ndarray, cross: np.ndarray, layer: RefitLayer, rho: float,
           prior: np.ndarray) -> np.ndarray:
    """Ridge solution [d', C_out] pulled toward `prior` [d', C_out] (`_RidgeSystem`), for one
    right-hand side `cross` [d', C_out]."""
    return _RidgeSystem(gram, layer, rho, prior).solve(cross)


def _write(model: onnx.ModelProto, layer: RefitLayer, solution: np.ndarray) -> None:
    """Store the fitted weight (and bias) in the node's constants."""
    node, view = layer.node, layer.view
    weight = layer_weight(model, layer)
    matrix = solution[:layer.features]  # [d, C_out]
    _set_constant(model, node.input[view.weight_input],
                  view.weight_from_matrix(node, matrix.T, weight))
    if layer.bias:
        position = view.bias_input(node)
        assert position is not None
        bias = constant(model, node.input[position])
        assert bias is not None
        _set_constant(model, node.input[position], solution[layer.features].reshape(bias.shape))


def refit_pruned(analysis: Analysis, pruned: onnx.ModelProto, plans: Sequence[GroupPlan],
                 batches: Sequence[FeedDict], provider: Provider,
                 max_features: int = MAX_FEATURES, executor: Executor | None = None
                 ) -> tuple[onnx.ModelProto, list[str]]:
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
                        max_features, executor=executor)
