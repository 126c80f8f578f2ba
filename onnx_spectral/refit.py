"""Layer refit (SPEC section 5, beyond the paper): refit whole linear layers of the pruned model.

Sequential compensation reconstructs a sink's input channels one position at a time
(``W' = W A``). A refit goes further for the layers downstream of the pruning: each dense Conv,
Gemm or MatMul whose input the pruning changed gets new weights (and bias) fitted by ridge least
squares so that, on the calibration batches, it maps the PRUNED model's input to the ORIGINAL
model's output of that layer (its kept output channels):

    [W' b'] = argmin  sum ||y_orig - W' p_pruned - b'||^2 + lambda ||W'||^2

where ``p`` is the layer's receptive field (``C_in x kernel`` features of a Conv, im2col; the
input row of a Gemm/MatMul) and ``y`` its output at that position. Layers are refitted in
graph order, each from the model with the earlier refits applied. A full Conv kernel is fitted,
not only a channel mix, so a layer can absorb errors its input carries across positions.

A layer is left as it is (with the reason in the notes) when its receptive field has more than
`max_features` features (the normal equations are ``d x d``) or the batches give fewer than
`rows_per_feature` rows per feature (the fit would chase noise). The normal equations are summed
in float64 from the two models' activations (float32 products), one batch at a time.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .analysis import Analysis
from .compensate import needed_nodes
from .data import FeedDict
from .graph import attributes
from .rewrite import GroupPlan
from .runtime import Provider, open_session

#: Largest receptive field (features) refitted by default. The normal equations cost
#: rows x d^2: on CREPE full at --ratio 0.5 (four layers of 4,096 features, 100,000 rows each)
#: the refit took 98 s for 98.9% -> 99.9% raw pitch accuracy, past the 2-minute budget of a run.
MAX_FEATURES = 2048
#: Fewest rows (samples x positions) per feature a refit needs. Measured with the defaults:
#: with 2, PP-OCR's classifier layer was refitted from 2.5 rows per feature and the agreement
#: fell from 95.0% to 93.5%; with 8, CREPE tiny at --flops 0.35 kept its last two layers and
#: reached 94.3% raw pitch accuracy instead of 99.1%.
ROWS_PER_FEATURE = 4
import os
RELAX_PASSES = int(os.environ.get('RELAX', '0'))


@dataclass(frozen=True)
class _Layer:
    """A layer to refit: its node (in the pruned model) and its fitted form."""

    node: onnx.NodeProto
    features: int
    """d: receptive-field size."""
    bias: bool
    """Whether the node has a bias input to fit (an intercept)."""


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


def _layer(model: onnx.ModelProto, node: onnx.NodeProto, readers: Mapping[str, int]
           ) -> _Layer | str:
    """The refit form of `node`, or why it cannot be refitted (`readers`: nodes per tensor)."""
    weight = _constant(model, node.input[1]) if len(node.input) > 1 else None
    if weight is None:
        return "its weight is not a constant"
    if weight.dtype != np.float32:
        return f"its weight is {weight.dtype}, only float32 layers are refitted"
    if any(readers.get(name, 0) > 1 for name in node.input[1:] if name):
        return "its weight or bias is shared with another node"
    attrs = attributes(node)
    bias = len(node.input) > 2 and bool(node.input[2]) and \
        _constant(model, node.input[2]) is not None
    if node.op_type == "Conv":
        if int(attrs.get("group", 1)) != 1 or weight.ndim != 4:  # type: ignore[call-overload]
            return "only dense 2-D convolutions are refitted"
        if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            return "auto_pad convolutions are not refitted"
        return _Layer(node, int(np.prod(weight.shape[1:])), bias)
    if node.op_type == "Gemm":
        if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or \
                attrs.get("beta", 1.0) != 1.0:
            return "only Gemm with transA = 0 and alpha = beta = 1 is refitted"
        features = weight.shape[1] if attrs.get("transB", 0) else weight.shape[0]
        outputs = weight.shape[0] if attrs.get("transB", 0) else weight.shape[1]
        bias_value = _constant(model, node.input[2]) if bias else None
        return _Layer(node, int(features), bias and bias_value is not None
                      and bias_value.size == outputs)
    if node.op_type == "MatMul" and weight.ndim == 2:
        return _Layer(node, int(weight.shape[0]), False)
    return f"{node.op_type} layers are not refitted"


def _patches(values: np.ndarray, node: onnx.NodeProto, kernel: Sequence[int]) -> np.ndarray:
    """Receptive fields of a 2-D Conv: input [N, C, H, W] -> [N * H' * W', C * kh * kw]."""
    attrs = attributes(node)
    pads = list(attrs.get("pads", [0, 0, 0, 0]))  # type: ignore[call-overload]
    strides = list(attrs.get("strides", [1, 1]))  # type: ignore[call-overload]
    dilations = list(attrs.get("dilations", [1, 1]))  # type: ignore[call-overload]
    padded = np.pad(values, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    span = [dilations[i] * (kernel[i] - 1) + 1 for i in range(2)]
    windows = np.lib.stride_tricks.sliding_window_view(padded, span, axis=(2, 3))
    windows = windows[:, :, ::strides[0], ::strides[1], ::dilations[0], ::dilations[1]]
    n, c, height, width, kh, kw = windows.shape
    return windows.transpose(0, 2, 3, 1, 4, 5).reshape(n * height * width, c * kh * kw)


def _rows(node: onnx.NodeProto, inputs: np.ndarray, outputs: np.ndarray, kernel: Sequence[int]
          ) -> tuple[np.ndarray, np.ndarray]:
    """(features [n, d], targets [n, C_out]) of one batch, float32 (their products are summed
    in float64 over the batches)."""
    if node.op_type == "Conv":
        features = _patches(inputs.astype(np.float32), node, kernel)
        targets = np.moveaxis(outputs, 1, -1).reshape(-1, outputs.shape[1])
    else:
        features = inputs.reshape(-1, inputs.shape[-1]).astype(np.float32)
        targets = outputs.reshape(-1, outputs.shape[-1])
    return features, targets.astype(np.float32)


def _submodel(model: onnx.ModelProto, outputs: Sequence[str]) -> onnx.ModelProto:
    """`model` computing only `outputs` (float tensors), with only the nodes they need."""
    nodes = needed_nodes(list(model.graph.node), outputs)
    used = {name for node in nodes for name in node.input}
    graph = helper.make_graph(
        nodes, model.graph.name,
        [value for value in model.graph.input if value.name in used or value.name in outputs],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs],
        [tensor for tensor in model.graph.initializer if tensor.name in used])
    sub = helper.make_model(graph, opset_imports=list(model.opset_import))
    sub.ir_version = model.ir_version
    return sub


def _run(model: onnx.ModelProto, name: str, batches: Iterable[FeedDict], provider: Provider
         ) -> Iterable[np.ndarray]:
    session = open_session(_submodel(model, [name]), provider)
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
                 batches: Sequence[FeedDict], provider: Provider, rho: float = 1e-3,
                 max_features: int = MAX_FEATURES,
                 rows_per_feature: int = ROWS_PER_FEATURE) -> tuple[onnx.ModelProto, list[str]]:
    """Refit, in graph order, the linear layers of `pruned` whose input depends on a tensor in
    `changed` (the outputs of the pruned producers).

    `kept_rows`: for a node whose output channels were pruned, the original channels it keeps
    ([k], ascending); other nodes keep all. `batches`: calibration feeds, read once per layer.
    Returns the refitted copy and notes on the layers left as they were.
    """
    model = onnx.ModelProto()
    model.CopyFrom(pruned)
    affected = _affected(model, changed)
    readers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    originals = {node.name: node for node in original.graph.node}
    notes = []
    refitted = 0
    for node in list(model.graph.node):
        if node.op_type not in ("Conv", "Gemm", "MatMul") or node.input[0] not in affected \
                or node.name not in originals:
            continue
        layer = _layer(model, node, readers)
        if isinstance(layer, str):
            notes.append(f"layer '{node.name}' not refitted: {layer}")
            continue
        if layer.features > max_features:
            notes.append(f"layer '{node.name}' not refitted: {layer.features} input features "
                         f"(more than {max_features})")
            continue
        statistics = _accumulate(model, original, layer, kept_rows.get(node.name), batches,
                                 provider, rows_per_feature)
        if isinstance(statistics, str):
            notes.append(f"layer '{node.name}' not refitted: {statistics}")
            continue
        gram, cross = statistics
        solution = _solve(gram, cross, layer, rho)
        pool = _rectified(model, node)
        if pool is not None:
            for _ in range(RELAX_PASSES):
                cross = _relaxed_cross(model, original, layer, kept_rows.get(node.name),
                                       batches, provider, solution, pool)
                solution = _solve(gram, cross, layer, rho)
        _write(model, layer, solution)
        refitted += 1
    if refitted:
        notes.insert(0, f"layer refit: {refitted} layer{'s' if refitted > 1 else ''} refitted "
                        "toward the original's outputs")
    return model, notes


def _accumulate(model: onnx.ModelProto, original: onnx.ModelProto, layer: _Layer,
                rows: np.ndarray | None, batches: Sequence[FeedDict], provider: Provider,
                rows_per_feature: int) -> tuple[np.ndarray, np.ndarray] | str:
    """Normal equations of the layer over `batches`: ([d', d'], [d', C_out]), with d' = d + 1
    when the layer has a bias (a constant feature last); or, when the batches cannot give
    `rows_per_feature` rows per feature (known after the first batch), why not."""
    node = layer.node
    weight = _constant(model, node.input[1])
    assert weight is not None
    kernel = weight.shape[2:] if node.op_type == "Conv" else ()
    samples = sum(len(next(iter(feeds.values()))) for feeds in batches)
    gram = cross = None
    inputs = _run(model, node.input[0], batches, provider)
    targets = _run(original, node.output[0], batches, provider)
    for values, wanted in zip(inputs, targets, strict=True):
        if rows is not None:
            wanted = np.take(wanted, rows, axis=1 if node.op_type == "Conv" else -1)
        features, target = _rows(node, values, wanted, kernel)
        if gram is None:
            if target.shape[1] != _outputs(node, weight):
                return ("the original channels its outputs keep are not known (a Concat or "
                        "Split group)")
            total = len(features) * samples // max(len(values), 1)
            if total < rows_per_feature * layer.features:
                return (f"{total} calibration rows for {layer.features} input features "
                        f"(fewer than {rows_per_feature} per feature)")
            gram = np.zeros((features.shape[1] + layer.bias,) * 2)
            cross = np.zeros((features.shape[1] + layer.bias, target.shape[1]))
        if layer.bias:
            features = np.hstack([features, np.ones((len(features), 1), dtype=np.float32)])
        gram += features.T @ features
        cross += features.T @ target
    if gram is None or cross is None:
        return "no calibration batches"
    return gram, cross


def _rectified(model: onnx.ModelProto, node: onnx.NodeProto):
    def reader(name):
        readers = [other for other in model.graph.node if name in other.input]
        outputs = {value.name for value in model.graph.output}
        return readers[0] if len(readers) == 1 and name not in outputs else None
    relu = reader(node.output[0])
    if relu is None or relu.op_type != "Relu":
        return None
    pool = reader(relu.output[0])
    if os.environ.get("POOL", "0") == "1" and pool is not None and pool.op_type == "MaxPool":
        attrs = attributes(pool)
        k = list(attrs.get("kernel_shape", []))
        if list(attrs.get("strides", [1, 1])) == k and not any(attrs.get("pads", [0])) and len(k) == 2 and not attrs.get("ceil_mode", 0) and not any(d != 1 for d in attrs.get("dilations", [1, 1])):
            return tuple(k)
    return ()


def _relax(target, predicted, pool):
    """target, predicted: [N, C, H, W] or [N, C]"""
    if not pool:
        return np.where(target > 0, target, np.minimum(predicted, 0))
    kh, kw = pool
    n, c, h, w = target.shape
    hh, ww = h // kh, w // kw
    out = predicted.copy()  # positions outside windows: free
    t = target[:, :, :hh * kh, :ww * kw].reshape(n, c, hh, kh, ww, kw).transpose(0, 1, 2, 4, 3, 5).reshape(n, c, hh, ww, kh * kw)
    p = predicted[:, :, :hh * kh, :ww * kw].reshape(n, c, hh, kh, ww, kw).transpose(0, 1, 2, 4, 3, 5).reshape(n, c, hh, ww, kh * kw)
    m = np.maximum(t.max(-1, keepdims=True), 0)
    relaxed = np.minimum(p, m)
    arg = t.argmax(-1)[..., None]
    np.put_along_axis(relaxed, arg, np.where(np.take_along_axis(t, arg, -1) > 0, np.take_along_axis(t, arg, -1), np.minimum(np.take_along_axis(p, arg, -1), 0)), -1)
    relaxed = relaxed.reshape(n, c, hh, ww, kh, kw).transpose(0, 1, 2, 4, 3, 5).reshape(n, c, hh * kh, ww * kw)
    out[:, :, :hh * kh, :ww * kw] = relaxed
    return out


def _relaxed_cross(model, original, layer, rows, batches, provider, solution, pool):
    node = layer.node
    weight = _constant(model, node.input[1])
    kernel = weight.shape[2:] if node.op_type == "Conv" else ()
    cross = np.zeros_like(solution)
    inputs = _run(model, node.input[0], batches, provider)
    targets = _run(original, node.output[0], batches, provider)
    for values, wanted in zip(inputs, targets, strict=True):
        if rows is not None:
            wanted = np.take(wanted, rows, axis=1 if node.op_type == "Conv" else -1)
        features, target = _rows(node, values, wanted, kernel)
        if layer.bias:
            features = np.hstack([features, np.ones((len(features), 1), dtype=np.float32)])
        predicted = features @ solution.astype(np.float32)
        if node.op_type == "Conv":
            shape = (wanted.shape[0], wanted.shape[2], wanted.shape[3], wanted.shape[1])
            pred4 = np.moveaxis(predicted.reshape(shape), -1, 1)
            relaxed = _relax(wanted.astype(np.float32), pred4, pool)
            target = np.moveaxis(relaxed, 1, -1).reshape(-1, wanted.shape[1])
        else:
            target = _relax(target, predicted, ())
        cross += features.T @ target
    return cross


def _outputs(node: onnx.NodeProto, weight: np.ndarray) -> int:
    """Output channels (features) of a Conv/Gemm/MatMul with this weight."""
    if node.op_type == "Conv" or (node.op_type == "Gemm" and attributes(node).get("transB", 0)):
        return int(weight.shape[0])
    return int(weight.shape[-1])


def _solve(gram: np.ndarray, cross: np.ndarray, layer: _Layer, rho: float) -> np.ndarray:
    """Ridge solution [d', C_out]; the ridge (rho * mean feature energy) spares the bias."""
    d = layer.features
    regularized = gram.copy()
    ridge = rho * float(np.trace(gram[:d, :d])) / max(d, 1)
    regularized[np.arange(d), np.arange(d)] += max(ridge, np.finfo(np.float64).tiny)
    return np.linalg.solve(regularized, cross)


def _write(model: onnx.ModelProto, layer: _Layer, solution: np.ndarray) -> None:
    """Store the fitted weight (and bias) in the node's constants."""
    node = layer.node
    weight = _constant(model, node.input[1])
    assert weight is not None
    matrix = solution[:layer.features]  # [d, C_out]
    if node.op_type == "Conv":
        fitted = matrix.T.reshape(weight.shape)
    elif node.op_type == "Gemm" and attributes(node).get("transB", 0):
        fitted = matrix.T
    else:
        fitted = matrix
    _set_constant(model, node.input[1], fitted)
    if layer.bias:
        bias = _constant(model, node.input[2])
        assert bias is not None
        _set_constant(model, node.input[2], solution[layer.features].reshape(bias.shape))


def refit_pruned(analysis: Analysis, pruned: onnx.ModelProto, plans: Sequence[GroupPlan],
                 batches: Sequence[FeedDict], provider: Provider, rho: float = 1e-3,
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
                        rho, max_features)
