"""A dynamically quantized model as the float model it was quantized from.

ONNX Runtime's `quantize_dynamic` (the usual int8 recipe for CPU inference of recurrent and
transformer models) replaces each layer by integer ops around a run-time quantization of its
input:

    x -> DynamicQuantizeLinear -> ConvInteger / MatMulInteger (int8 weight) [-> Add int32 bias]
      -> Cast to float -> Mul by (input scale x weight scale) [-> Add float bias]

and an LSTM by com.microsoft `DynamicQuantizeLSTM` (int8 weights stored transposed,
[directions, input, 4 x hidden]). `dequantize_dynamic` turns each such chain back into the float
layer (Conv or MatMul on x with the dequantized weight, the bias the chain quantized at run
time as its own input), so that the model can be pruned, and `onnx_spectral.quantize` quantizes
the pruned model dynamically again. A chain in any other form leaves the model as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnx_spectral.graph import external_tensors
from onnx_spectral.graph.subgraphs import used_names

_INTEGER_LAYERS = ("ConvInteger", "MatMulInteger")
_LSTM = "DynamicQuantizeLSTM"


@dataclass(frozen=True)
class DynamicallyQuantized:
    """What `dequantize_dynamic` turned back into float layers."""

    layers: int
    """ConvInteger/MatMulInteger chains and DynamicQuantizeLSTM nodes."""
    quantize: ClassVar[Literal["dynamic"]] = "dynamic"
    """The --quantize that writes the pruned model quantized as this one was."""

    def note(self, quantize: str) -> str:
        """What the report says: how the model was pruned and is written (`quantize`)."""
        written = ("quantized dynamically again (--quantize dynamic)" if quantize == "dynamic"
                   else f"written as --quantize {quantize} asks")
        return (f"the input model is dynamically quantized: it was pruned as its float model "
                f"({self.layers} integer layers made float again) and {written}")


class _NotDynamic(Exception):
    """The integer layers are not in the form `quantize_dynamic` writes."""


def dequantize_dynamic(model: onnx.ModelProto
                       ) -> tuple[onnx.ModelProto, DynamicallyQuantized | None]:
    """The float model of a dynamically quantized `model` and what was made float; `model`
    itself and None when it has no integer layer, or one in another form."""
    graph = model.graph
    layers = [node for node in graph.node
              if (node.op_type in _INTEGER_LAYERS and node.domain in ("", "ai.onnx"))
              or (node.op_type == _LSTM and node.domain == "com.microsoft")]
    if not layers:
        return model, None
    try:
        return _float_model(model, layers), DynamicallyQuantized(len(layers))
    except (_NotDynamic, ValueError, IndexError):  # a chain, or parameters, of another form
        return model, None


def _float_model(model: onnx.ModelProto, layers: list[onnx.NodeProto]) -> onnx.ModelProto:
    result = onnx.ModelProto()
    result.CopyFrom(model)
    graph = result.graph
    chains = _Chains(graph)
    replaced: dict[int, list[onnx.NodeProto]] = {}  # position of the chain's last node -> float
    removed: set[int] = set()
    for layer in layers:
        position = chains.position[layer.output[0]]
        if layer.op_type == _LSTM:
            replaced[position] = [chains.float_lstm(graph.node[position])]
        else:
            chain, nodes = chains.float_layer(graph.node[position])
            removed.update(chain)
            replaced[max(chain)] = nodes
    nodes = []
    for position, node in enumerate(graph.node):
        if position in replaced:
            nodes.extend(replaced[position])
        elif position not in removed:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(chains.new_weights)
    _drop_dead(graph)
    return result


class _Chains:
    """Reads the integer chains of one graph."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.position = {name: index for index, node in enumerate(graph.node)
                         for name in node.output if name}
        self.readers: dict[str, list[int]] = {}
        for index, node in enumerate(graph.node):
            for name in node.input:
                self.readers.setdefault(name, []).append(index)
        self.initializers = {tensor.name: tensor for tensor in graph.initializer}
        self.new_weights: list[onnx.TensorProto] = []

    def constant(self, name: str) -> np.ndarray:
        """The value of an initializer or Constant node; _NotDynamic for anything else."""
        if name in self.initializers:
            return np.asarray(external_tensors.constants([self.initializers[name]],
                                                         set())[name])
        producer = self.producer(name)
        if producer is not None and producer.op_type == "Constant":
            return numpy_helper.to_array(producer.attribute[0].t)
        raise _NotDynamic(name)

    def producer(self, name: str) -> onnx.NodeProto | None:
        index = self.position.get(name)
        return None if index is None else self.graph.node[index]

    def only_reader(self, name: str, op_type: str | None = None) -> int:
        """Position of the one node reading `name` (of `op_type` when given)."""
        readers = self.readers.get(name, [])
        if len(readers) != 1 or op_type not in (None, self.graph.node[readers[0]].op_type):
            raise _NotDynamic(name)
        return readers[0]

    def weight(self, name: str, array: np.ndarray) -> str:
        """A new float initializer named after the quantized one."""
        self.new_weights.append(numpy_helper.from_array(array, f"{name}_dequantized"))
        return f"{name}_dequantized"

    def float_layer(self, layer: onnx.NodeProto) -> tuple[list[int], list[onnx.NodeProto]]:
        """The positions of a ConvInteger/MatMulInteger chain and the float nodes for it."""
        quantizer = self.producer(layer.input[0])
        if quantizer is None or quantizer.op_type != "DynamicQuantizeLinear":
            raise _NotDynamic(layer.input[0])
        chain = [self.position[layer.output[0]]]
        tensor, bias = layer.output[0], None
        reader = self.graph.node[self.only_reader(tensor)]
        if reader.op_type == "Add":  # an int32 bias quantized at run time: Div, Floor, Cast
            chain.append(self.position[reader.output[0]])
            bias = self._run_time_bias(reader.input[1] if reader.input[0] == tensor
                                       else reader.input[0], chain)
            tensor = reader.output[0]
        cast = self.only_reader(tensor, "Cast")
        scaled = self.only_reader(self.graph.node[cast].output[0], "Mul")
        chain += [cast, scaled]
        output = self.graph.node[scaled].output[0]
        scale_name = next((name for name in self.graph.node[scaled].input
                           if name != self.graph.node[cast].output[0]), "")
        weight_scale = self._weight_scale(scale_name, quantizer.output[1])
        quantized = self.constant(layer.input[1]).astype(np.float64)
        zero = (self.constant(layer.input[3]).astype(np.float64)
                if len(layer.input) > 3 and layer.input[3] else np.zeros(1))
        axis = 0 if layer.op_type == "ConvInteger" else quantized.ndim - 1
        shape = [1] * quantized.ndim
        shape[axis] = -1
        weight = ((quantized - zero.reshape(shape if zero.size > 1 else [1]))
                  * weight_scale.reshape(shape if weight_scale.size > 1 else [1])
                  ).astype(weight_scale.dtype)
        inputs = [quantizer.input[0], self.weight(layer.input[1], weight)]
        if layer.op_type == "ConvInteger":
            if bias is not None:
                inputs.append(bias)
            return chain, [_with_attributes(helper.make_node("Conv", inputs, [output],
                                                             name=layer.name), layer)]
        if bias is None:
            return chain, [helper.make_node("MatMul", inputs, [output], name=layer.name)]
        return chain, [helper.make_node("MatMul", inputs, [f"{output}_unbiased"],
                                        name=layer.name),
                       helper.make_node("Add", [f"{output}_unbiased", bias], [output],
                                        name=f"{layer.name}_bias")]

    def _weight_scale(self, scale: str, input_scale: str) -> np.ndarray:
        """The constant factor of Mul(input scale, weight scale)."""
        product = self.producer(scale)
        if product is None or product.op_type != "Mul" or input_scale not in product.input:
            raise _NotDynamic(scale)
        other = next((name for name in product.input if name != input_scale), "")
        return self.constant(other)

    def _run_time_bias(self, name: str, chain: list[int]) -> str:
        """The float bias behind an int32 bias computed at run time: Reshape? <- Cast <- Floor
        <- Div(bias, scale); the name of a float initializer holding it ([C])."""
        node = self.producer(name)
        while node is not None and node.op_type in ("Reshape", "Cast", "Floor"):
            node = self.producer(node.input[0])
        if node is None or node.op_type != "Div":
            raise _NotDynamic(name)
        bias = self.constant(node.input[0]).reshape(-1)
        return self.weight(node.input[0], bias.astype(np.float32))

    def float_lstm(self, lstm: onnx.NodeProto) -> onnx.NodeProto:
        """An LSTM for a DynamicQuantizeLSTM: weights [dirs, input, 4H] int8 made float and
        transposed to the LSTM's [dirs, 4H, input]."""
        inputs = list(lstm.input) + [""] * (12 - len(lstm.input))
        floats = []
        for weight, scale, zero in ((1, 8, 9), (2, 10, 11)):
            quantized = self.constant(inputs[weight]).astype(np.float64)
            scales = self.constant(inputs[scale])
            zeros = (self.constant(inputs[zero]).astype(np.float64) if inputs[zero]
                     else np.zeros_like(scales, dtype=np.float64))
            shape = (scales.shape[0], 1, -1) if scales.ndim == 2 else (-1, 1, 1)
            value = (quantized - zeros.reshape(shape)) * scales.reshape(shape)
            floats.append(self.weight(inputs[weight], np.transpose(value, (0, 2, 1))
                                      .astype(scales.dtype)))
        float_inputs = [inputs[0], *floats, *inputs[3:8]]
        while float_inputs and not float_inputs[-1]:
            float_inputs.pop()
        return _with_attributes(helper.make_node("LSTM", float_inputs, list(lstm.output),
                                                 name=lstm.name), lstm)


def _with_attributes(node: onnx.NodeProto, source: onnx.NodeProto) -> onnx.NodeProto:
    """`node` with the attributes of `source` (the integer op it replaces)."""
    node.attribute.extend(source.attribute)
    return node


def _drop_dead(graph: onnx.GraphProto) -> None:
    """Remove, in place, the nodes and initializers nothing reads any more (the run-time
    quantization of the inputs, the old weights)."""
    while True:
        used = used_names(graph)
        live = [node for node in graph.node if any(name in used for name in node.output)]
        if len(live) == len(graph.node):
            break
        del graph.node[:]
        graph.node.extend(live)
    used = used_names(graph) | {value.name for value in graph.input}
    kept = [tensor for tensor in graph.initializer if tensor.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
