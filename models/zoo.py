"""The ONNX model zoo's ``light_*`` graphs shipped in the onnx package, with random weights.

The onnx package ships ResNet-50, VGG-19, DenseNet-121, Inception v1/v2, SqueezeNet,
ShuffleNet, AlexNet and ZFNet-512 under ``onnx/backend/test/data/light/`` at opset 9, with
every weight produced by a ``ConstantOfShape`` node filled with 0.02 (real topologies, no
trained weights). :func:`light_model` turns one into a usable model: each weight becomes an
initializer with seeded random values (He initialisation for Conv and Gemm weights, zero
biases, BatchNormalization scale around 1 and small shift), and every BatchNormalization's
mean and variance are measured on its own input, layer by layer in topological order, on
random calibration images, so that each BN normalises what actually reaches it and the
activations stay non-degenerate through the whole depth. The input keeps its shipped static
shape ``[1, 3, 224, 224]`` (some shape constants hard-code batch 1).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from models.cache import cache_dir, staged
from onnx_spectral.errors import DataError

LIGHT_MODELS = (
    "bvlc_alexnet", "densenet121", "inception_v1", "inception_v2", "resnet50",
    "shufflenet", "squeezenet", "vgg19", "zfnet512",
)
_ALIASES = {"alexnet": "bvlc_alexnet", "zfnet": "zfnet512"}
BN_SAMPLES = 8
"""Random images whose activations set every BatchNormalization's mean and variance."""
BN_SCALE_RANGE = (0.5, 1.5)
BN_SHIFT_STD = 0.1
_BN_SEED_OFFSET = 7919


def light_source(name: str) -> Path:
    """Return the shipped ``light_<name>.onnx`` inside the installed onnx package.

    ``name`` is one of :data:`LIGHT_MODELS` (``alexnet`` and ``zfnet`` are accepted too).
    """
    key = _ALIASES.get(name, name)
    if key not in LIGHT_MODELS:
        raise DataError(f"unknown light model '{name}': accepted: {', '.join(LIGHT_MODELS)}")
    path = Path(os.path.dirname(onnx.__file__)) / "backend/test/data/light" / f"light_{key}.onnx"
    if not path.is_file():
        raise DataError(f"{path} is missing from the installed onnx {onnx.__version__}")
    return path


def light_model(name: str, seed: int = 0) -> Path:
    """Return the cached randomized ``light_<name>`` model, building it on first use.

    The graph maps one float32 input [1, 3, 224, 224] to the shipped output (class
    probabilities [1, 1000] after Softmax); the file lies under ``<cache>/onnx/``.
    """
    source = light_source(name)
    path = cache_dir() / "onnx" / f"{source.stem}_seed{seed}.onnx"
    if path.is_file():
        return path
    model = randomize_light_model(onnx.load(str(source)), seed)
    with staged(path) as staging:
        onnx.save(model, str(staging))
        onnx.checker.check_model(str(staging), full_check=True)
    return path


def light_input_name(model: str | Path | onnx.ModelProto) -> str:
    """The name of the one data input of a light model (a name or a loaded/saved model)."""
    proto = (model if isinstance(model, onnx.ModelProto)
             else onnx.load(str(light_model(model) if str(model) in _names() else model),
                            load_external_data=False))
    constants = {tensor.name for tensor in proto.graph.initializer}
    names = [value.name for value in proto.graph.input if value.name not in constants]
    if len(names) != 1:
        raise DataError(f"expected one data input in the light model, found {names}")
    return names[0]


def light_inputs(count: int, seed: int = 1) -> np.ndarray:
    """Seeded standard-normal images: float32 [count, 3, 224, 224]."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((count, 3, 224, 224), dtype=np.float32)


def light_batches(name: str, count: int, seed: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """Yield ``count`` feed dicts ``{input name: [1, 3, 224, 224]}`` of :func:`light_inputs`."""
    input_name = light_input_name(name)
    images = light_inputs(count, seed)
    for index in range(count):
        yield {input_name: images[index : index + 1]}


def randomize_light_model(model: onnx.ModelProto, seed: int) -> onnx.ModelProto:
    """Return a copy of a shipped light model with seeded random, calibrated weights.

    ``ConstantOfShape`` weight nodes become initializers; initializers stop being listed as
    graph inputs (IR version raised to 4 where needed); float weights read by Conv, Gemm,
    BatchNormalization or the Mul/Add affine that DenseNet and Inception v2 put after their
    BNs are drawn anew; BN statistics are then calibrated (see the module docstring).
    """
    model = _constants_to_initializers(model)
    rng = np.random.default_rng(seed)
    weights = {tensor.name: numpy_helper.to_array(tensor) for tensor in model.graph.initializer}
    roles = _weight_roles(model)
    for name, role in roles.items():
        weights[name] = _draw(role, weights[name].shape, rng)
    _calibrate_batch_norms(model, weights, light_inputs(BN_SAMPLES, seed + _BN_SEED_OFFSET))
    del model.graph.initializer[:]
    model.graph.initializer.extend(numpy_helper.from_array(value.astype(value.dtype), name)
                                   for name, value in weights.items())
    return model


def _names() -> set[str]:
    return set(LIGHT_MODELS) | set(_ALIASES)


def _constants_to_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """Replace ``ConstantOfShape`` nodes of constant shape by initializers; drop init inputs."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    graph = result.graph
    constants = {tensor.name: numpy_helper.to_array(tensor) for tensor in graph.initializer}
    kept_nodes = []
    for node in graph.node:
        if node.op_type == "ConstantOfShape" and node.input[0] in constants:
            shape = tuple(int(dim) for dim in constants[node.input[0]])
            value = next((numpy_helper.to_array(attr.t) for attr in node.attribute
                          if attr.name == "value"), np.zeros(1, np.float32))
            graph.initializer.append(numpy_helper.from_array(
                np.full(shape, value.reshape(-1)[0], dtype=value.dtype), node.output[0]))
        else:
            kept_nodes.append(node)
    del graph.node[:]
    graph.node.extend(kept_nodes)
    used = {name for node in graph.node for name in node.input}
    initializers = [tensor for tensor in graph.initializer if tensor.name in used]
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    names = {tensor.name for tensor in graph.initializer}
    data_inputs = [value for value in graph.input if value.name not in names
                   and value.name not in constants]
    del graph.input[:]
    graph.input.extend(data_inputs)
    del graph.value_info[:]
    result.ir_version = max(result.ir_version, 4)
    return result


def _weight_aliases(model: onnx.ModelProto) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Map each float initializer and each Reshape/Unsqueeze of one to ``(source, shape)``."""
    values = {tensor.name: numpy_helper.to_array(tensor) for tensor in model.graph.initializer}
    aliases = {name: (name, value.shape) for name, value in values.items()
               if value.dtype == np.float32}
    for node in model.graph.node:
        if node.input and node.input[0] in aliases and node.op_type in ("Reshape", "Unsqueeze"):
            source, shape = aliases[node.input[0]]
            probe = np.zeros(shape, np.float32)
            if node.op_type == "Reshape":
                target = [int(dim) for dim in values[node.input[1]]]
                target = [shape[i] if dim == 0 else dim for i, dim in enumerate(target)]
                aliases[node.output[0]] = (source, probe.reshape(target).shape)
            else:
                axes = next(list(attr.ints) for attr in node.attribute if attr.name == "axes")
                aliases[node.output[0]] = (source, np.expand_dims(probe, tuple(axes)).shape)
    return aliases


def _weight_roles(model: onnx.ModelProto) -> dict[str, tuple[str, int]]:
    """Map each float weight initializer to ``(role, fan_in)``; roles name what it feeds.

    A weight reaches its consumer directly or through Reshape/Unsqueeze (Inception v1 reshapes
    its classifier weight, DenseNet unsqueezes its BN affine).
    """
    aliases = _weight_aliases(model)
    roles: dict[str, tuple[str, int]] = {}
    for node in model.graph.node:
        inputs = [aliases.get(name) for name in node.input]
        if node.op_type == "Conv" and inputs[1] is not None:
            roles[inputs[1][0]] = ("he", int(np.prod(inputs[1][1][1:])))
            if len(inputs) > 2 and inputs[2] is not None:
                roles[inputs[2][0]] = ("zero", 0)
        elif node.op_type == "Gemm" and inputs[1] is not None:
            trans_b = next((attr.i for attr in node.attribute if attr.name == "transB"), 0)
            roles[inputs[1][0]] = ("he", int(inputs[1][1][1 if trans_b else 0]))
            if len(inputs) > 2 and inputs[2] is not None:
                roles[inputs[2][0]] = ("zero", 0)
        elif node.op_type == "BatchNormalization":
            for alias, role in zip(inputs[1:], ("scale", "shift", "mean", "var"), strict=True):
                if alias is not None:
                    roles[alias[0]] = (role, 0)
        elif node.op_type in ("Mul", "Add"):
            for alias in inputs:
                if alias is not None:
                    roles[alias[0]] = ("scale" if node.op_type == "Mul" else "shift", 0)
    return roles


def _draw(role: tuple[str, int], shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Draw a weight of ``shape`` for ``role`` (see :func:`_weight_roles`)."""
    kind, fan_in = role
    if kind == "he":
        return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
    if kind == "scale":
        return rng.uniform(*BN_SCALE_RANGE, size=shape).astype(np.float32)
    if kind == "shift":
        return (rng.standard_normal(shape) * BN_SHIFT_STD).astype(np.float32)
    if kind == "var":
        return np.ones(shape, np.float32)
    return np.zeros(shape, np.float32)


def _calibrate_batch_norms(model: onnx.ModelProto, weights: dict[str, np.ndarray],
                           images: np.ndarray) -> None:
    """Set every BN's mean/var in ``weights`` to the measured statistics of its input.

    Runs the graph node by node (one small ONNX Runtime session per node) on each image
    [1, 3, 224, 224] of ``images``, so a BN is measured after all BNs before it are set.
    """
    input_name = next(value.name for value in model.graph.input)
    opset = next(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx"))
    last_use = {name: index for index, node in enumerate(model.graph.node) for name in node.input}
    envs: list[dict[str, np.ndarray]] = [{input_name: image[None]} for image in images]
    for index, node in enumerate(model.graph.node):
        if node.op_type == "BatchNormalization":
            _set_statistics(node, weights, [env[node.input[0]] for env in envs])
        session = None
        for env in envs:
            feeds = {name: env[name] if name in env else weights[name]
                     for name in node.input if name}
            session = session or _node_session(node, opset, feeds)
            outputs = session.run(None, feeds)
            env.update(zip(node.output, outputs, strict=False))
            for name in [name for name in env if last_use.get(name, -1) <= index]:
                del env[name]


def _set_statistics(node: onnx.NodeProto, weights: dict[str, np.ndarray],
                    inputs: list[np.ndarray]) -> None:
    """Set the BN's mean and var to the per-channel moments of its inputs [1, C, H, W]."""
    stacked = np.concatenate([value.astype(np.float64) for value in inputs])
    axes = (0, *range(2, stacked.ndim))
    mean = stacked.mean(axis=axes)
    var = stacked.var(axis=axes)
    if not np.all(np.isfinite(var)) or var.max() <= 0:
        raise DataError(f"BatchNormalization '{node.name or node.output[0]}': degenerate input "
                        "activations while calibrating random weights")
    weights[node.input[3]] = mean.astype(np.float32)
    weights[node.input[4]] = np.maximum(var, 1e-6 * var.max()).astype(np.float32)


def _node_session(node: onnx.NodeProto, opset: int,
                  feeds: dict[str, np.ndarray]) -> ort.InferenceSession:
    """A session running the single ``node`` on ``feeds``; its outputs take the first input's
    dtype (true of every op in the light models)."""
    inputs = [helper.make_tensor_value_info(
        name, helper.np_dtype_to_tensor_dtype(value.dtype), None)
        for name, value in feeds.items()]
    out_type = helper.np_dtype_to_tensor_dtype(feeds[node.input[0]].dtype)
    outputs = [helper.make_tensor_value_info(node.output[0], out_type, None)]
    single = onnx.NodeProto()
    single.CopyFrom(node)
    del single.output[1:]
    graph = helper.make_graph([single], "node", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 4
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])
