"""A QDQ-quantized model as the float model its quantization was made from.

ONNX Runtime's static quantization (and most others that write the QDQ format) leaves the float
graph in place and adds `DequantizeLinear` nodes that turn integer weights into float weights,
and `QuantizeLinear -> DequantizeLinear` pairs that round activations to 8 bits. Pruning needs
float weights to slice and fold, and the activation ranges calibrated for the original channels
no longer hold once channels are removed and reconstructed. So a QDQ model is pruned as its
float model (each weight dequantized; each activation pair replaced by the Clip to its integer
range that it applies besides rounding, since quantizers drop a Relu whose range the pair
already clips to) and quantized again on the calibration data afterwards
(`onnx_spectral.quantize`).

Only the plain QDQ form is taken apart: every `DequantizeLinear` of the main graph reads either
a constant (a weight or bias) or a `QuantizeLinear` with the same per-tensor scale and zero
point whose output only `DequantizeLinear` nodes read. Any other use of quantization (integer
ops such as ConvInteger or QLinearConv, a quantized graph input or output, blocked
quantization) leaves the model as it is, and the analysis says which layers it keeps whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import onnx
from onnx import numpy_helper

from onnx_spectral.graph import external_tensors
from onnx_spectral.graph.dynamic_quant import DynamicallyQuantized, dequantize_dynamic
from onnx_spectral.graph.model import opset_version
from onnx_spectral.graph.subgraphs import used_names

_DEFAULT_DOMAINS = ("", "ai.onnx")


@dataclass(frozen=True)
class Dequantized:
    """What `dequantize_qdq` took apart: the model's weights and activation pairs."""

    weights: int
    """DequantizeLinear nodes of constants replaced by their float values."""
    activations: int
    """QuantizeLinear -> DequantizeLinear activation pairs replaced by a Clip."""
    per_channel: bool
    """Whether some weight has a scale per channel (per-axis quantization)."""
    quantize: ClassVar[Literal["int8"]] = "int8"
    """The --quantize that writes the pruned model quantized as this one was."""

    def note(self, quantize: str) -> str:
        """What the report says: how the model was pruned and is written (`quantize`)."""
        written = ("quantized again to int8 on the calibration data" if quantize == "int8"
                   else "written in float (--quantize none)")
        return (f"the input model is QDQ-quantized: it was pruned as its float model "
                f"({self.weights} weights dequantized, {self.activations} activation "
                f"QuantizeLinear/DequantizeLinear pairs replaced by the Clip they apply) and "
                f"{written}")


def as_float_model(model: onnx.ModelProto
                   ) -> tuple[onnx.ModelProto, Dequantized | DynamicallyQuantized | None]:
    """The float model of a QDQ (`dequantize_qdq`) or dynamically quantized
    (`graph.dynamic_quant`) model, and what was made float; `model` and None otherwise."""
    floating, qdq = dequantize_qdq(model)
    if qdq is not None:
        return floating, qdq
    return dequantize_dynamic(model)


def dequantize_qdq(model: onnx.ModelProto) -> tuple[onnx.ModelProto, Dequantized | None]:
    """The float model of a QDQ-quantized `model` and what was taken apart; `model` itself and
    None when it quantizes no weight, or no activation (weight-only quantization, which
    quantizing again would not reproduce), or uses quantization other than plain QDQ."""
    graph = model.graph
    if not any(node.op_type == "DequantizeLinear" for node in graph.node):
        return model, None
    constants = _constants(graph)
    producers = {name: node for node in graph.node for name in node.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    outputs = {value.name for value in graph.output} | {value.name for value in graph.input}
    weights: dict[str, np.ndarray] = {}
    clips: dict[str, tuple[str, np.ndarray, np.ndarray]] = {}
    """DequantizeLinear output -> (the float tensor quantized, low, high): the pair's Clip."""
    for node in graph.node:
        if node.domain not in _DEFAULT_DOMAINS or node.op_type not in (
                "QuantizeLinear", "DequantizeLinear"):
            continue
        if any(attr.name == "block_size" and attr.i for attr in node.attribute):
            return model, None
        if node.op_type == "QuantizeLinear":
            if any(reader.op_type != "DequantizeLinear" for reader in readers.get(
                    node.output[0], [])) or node.output[0] in outputs:
                return model, None
            continue
        source = producers.get(node.input[0])
        if node.input[0] in constants:
            value = _dequantized(node, constants)
            if value is None:
                return model, None
            weights[node.output[0]] = value
        elif source is not None and source.op_type == "QuantizeLinear" \
                and source.domain in _DEFAULT_DOMAINS:
            bounds = _clip_bounds(source, node, constants)
            if bounds is None:
                return model, None
            clips[node.output[0]] = (source.input[0], *bounds)
        else:
            return model, None
    if not weights or not clips:  # weight-only quantization is not redone by quantize_static
        return model, None
    per_channel = any(_scale_size(node, constants) > 1 for node in graph.node
                      if node.op_type == "DequantizeLinear" and node.output[0] in weights)
    return (_float_model(model, weights, clips),
            Dequantized(len(weights), len(clips), per_channel))


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """The values of the constants that QuantizeLinear/DequantizeLinear nodes read (other
    weights, possibly large or stored apart, are not read)."""
    wanted = {name for node in graph.node if node.op_type in ("QuantizeLinear", "DequantizeLinear")
              for name in node.input}
    values = {tensor.name: value for tensor in graph.initializer if tensor.name in wanted
              for value in [external_tensors.constants([tensor], set())[tensor.name]]}
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] in wanted and node.attribute \
                and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def _dequantized(node: onnx.NodeProto, constants: dict[str, np.ndarray]) -> np.ndarray | None:
    """(x - zero_point) * scale of a DequantizeLinear of constants, per tensor or along its
    `axis`; None when a parameter is not constant or x is not an integer tensor."""
    if any(name and name not in constants for name in node.input):
        return None
    quantized = constants[node.input[0]]
    scale = constants[node.input[1]]
    zero = (constants[node.input[2]] if len(node.input) > 2 and node.input[2]
            else np.zeros_like(scale, dtype=quantized.dtype))
    if not np.issubdtype(quantized.dtype, np.integer) or scale.ndim > 1:
        return None
    try:
        if scale.size > 1:
            axis = next((int(attr.i) for attr in node.attribute if attr.name == "axis"), 1)
            shape = [1] * quantized.ndim
            shape[axis] = scale.size
            scale, zero = scale.reshape(shape), zero.reshape(shape)
        return ((quantized.astype(np.float64) - zero.astype(np.float64)) * scale
                ).astype(scale.dtype)
    except (IndexError, ValueError):  # an axis or sizes that do not fit: not ours to fix
        return None


def _scale_size(node: onnx.NodeProto, constants: dict[str, np.ndarray]) -> int:
    return int(constants[node.input[1]].size)


def _clip_bounds(quantize: onnx.NodeProto, dequantize: onnx.NodeProto,
                 constants: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray] | None:
    """The float range [low, high] an activation pair clips to: (integer range - zero point) x
    scale; None unless both nodes share one constant per-tensor scale and zero point."""
    parameters = []
    for node in (quantize, dequantize):
        names = [*node.input[1:3]] + [""] * (3 - len(node.input))
        if any(name and name not in constants for name in names[:2]):
            return None
        scale = constants[names[0]]
        zero = constants[names[1]] if names[1] else np.zeros((), np.uint8)
        if scale.size != 1 or zero.size != 1 or not np.issubdtype(zero.dtype, np.integer):
            return None
        parameters.append((scale.reshape(()), zero.reshape(())))
    (scale, zero), (scale2, zero2) = parameters
    if scale != scale2 or zero != zero2 or zero.dtype != zero2.dtype:
        return None
    limits = np.iinfo(zero.dtype)
    low = (float(limits.min) - float(zero)) * scale.astype(np.float64)
    high = (float(limits.max) - float(zero)) * scale.astype(np.float64)
    return low.astype(scale.dtype), high.astype(scale.dtype)


def _float_model(model: onnx.ModelProto, weights: dict[str, np.ndarray],
                 clips: dict[str, tuple[str, np.ndarray, np.ndarray]]) -> onnx.ModelProto:
    """A copy of `model` whose dequantized weights are float initializers and whose activation
    pairs are Clip nodes writing the pairs' output tensors."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    graph = result.graph
    attributes_clip = opset_version(model) < 11  # min and max were attributes before opset 11
    nodes = []
    for node in graph.node:
        if node.domain not in _DEFAULT_DOMAINS or node.op_type not in (
                "QuantizeLinear", "DequantizeLinear"):
            nodes.append(node)
            continue
        name = node.output[0]
        if name not in clips:
            continue
        source, low, high = clips[name]
        clip_name = node.name or f"{name}_clip"
        if attributes_clip:
            nodes.append(onnx.helper.make_node("Clip", [source], [name], name=clip_name,
                                               min=float(low), max=float(high)))
            continue
        bounds = [f"{name}_clip_min", f"{name}_clip_max"]
        graph.initializer.extend([numpy_helper.from_array(low, bounds[0]),
                                  numpy_helper.from_array(high, bounds[1])])
        nodes.append(onnx.helper.make_node("Clip", [source, *bounds], [name], name=clip_name))
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(numpy_helper.from_array(value, name)
                             for name, value in weights.items())
    used = used_names(graph)
    live = [node for node in graph.node if node.op_type != "Constant" or node.output[0] in used]
    del graph.node[:]
    graph.node.extend(live)
    kept = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return result
