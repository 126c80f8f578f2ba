"""Parameters and multiply-accumulates (MACs) of an ONNX model.

What is counted:

- ``params``: elements of every floating-point initializer (float, double, float16,
  bfloat16, float8, float4) that some node reads, each initializer once, plus the elements of
  every ``Constant`` node whose ``value`` attribute is a floating-point tensor. Integer tensors
  (shapes, indices, quantized weights) and sparse initializers are not counted. Nodes of
  subgraphs (``If``, ``Loop``, ``Scan`` bodies) count as readers and their constants count.
- ``macs``: multiply-accumulates of one sample, for the nodes of the main graph only, after
  ``graph.normalize`` (nodes computed only from constants are folded away and not counted):

  =================================  ===================================================
  Conv, com.microsoft FusedConv      output elements * C_in / group * prod(kernel)
  ConvTranspose                      input elements * C_out / group * prod(kernel)
  Gemm, com.microsoft FusedGemm      M * N * K
  MatMul, Einsum as a MatMul,        broadcast batch product * M * N * K
  com.microsoft FusedMatMul          (= output elements * K)
  LSTM, GRU, RNN                     steps * batch * (elements of W + elements of R)
  =================================  ===================================================

  The counts are the `macs` of each op's handler (`ops.linear_layer.LinearLayer`). Every
  other operator counts 0: element-wise ops, normalisations, pooling, activations, bias
  additions, and quantized kernels are not counted.

The MACs are counted at the shape the model runs at: given the graph inputs' shapes (or arrays,
samples first), every tensor's shape comes from `graph.shapes.concrete_shapes` (shape inference
with the inputs fixed, then an ONNX Runtime run for what it cannot tell). Without them the model
is counted at its declared shapes, with the leading dimension of every graph input that is
symbolic or unknown (the batch) set to 1, and so every other dimension carrying the same symbol;
a fixed leading dimension is left as it is (a model exported with a fixed batch of 8 counts 8
samples). A node whose MACs then depend on a dimension that inference leaves unknown (a dynamic
image size or sequence length) counts 0 and is listed in ``ModelCost.uncounted``: such a count
is a lower bound, and `ModelCost.complete` says so.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import onnx

from onnx_spectral.graph.model import normalize
from onnx_spectral.graph.shapes import Feeds, InputShapes, concrete_shapes
from onnx_spectral.graph.subgraphs import subgraphs
from onnx_spectral.ops import linear_layer_for
from onnx_spectral.ops.linear_layer import Shape


@dataclass(frozen=True)
class ModelCost:
    """Size and compute of a model.

    Attributes:
        params: elements of the floating-point initializers that nodes read and of the
            floating-point ``Constant`` nodes.
        macs: multiply-accumulates of one sample (batch 1), summed over ``macs_by_node``.
        macs_by_node: MACs of each linear layer (Conv, ConvTranspose, Gemm, MatMul, ...) of
            the main graph, by node name as ``graph.normalize`` gives it (the model's name,
            made unique; ``"<op_type>_<index>"`` for a node without one).
        uncounted: names (as in ``macs_by_node``) of those nodes whose shapes are not static
            after fixing the batch to 1; each counts 0.
        input_shapes: the graph inputs' shapes the MACs are counted at; None when counted at
            the declared shapes with the batch set to 1.
        symbolic_inputs: without `input_shapes`, the graph inputs with a dimension other than
            the batch that is not static, with their declared dims (None for an unknown one).
    """

    params: int
    macs: int
    macs_by_node: Mapping[str, int]
    uncounted: tuple[str, ...] = field(default=())
    input_shapes: Mapping[str, Shape] | None = None
    symbolic_inputs: Mapping[str, tuple[int | str | None, ...]] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        """Whether every linear layer is counted (`macs` is not a lower bound)."""
        return not self.uncounted

    def shape_text(self) -> str:
        """The input shapes the MACs are for, in words: "x [1, 3, 48, 192]", or "the declared
        input shapes, batch 1"."""
        if self.input_shapes is None:
            return "the declared input shapes, batch 1"
        return ", ".join(f"{name} [{', '.join(map(str, shape))}]"
                         for name, shape in self.input_shapes.items())

    def missing_shape_text(self) -> str:
        """Why the MACs are incomplete and what would complete them ("" when complete)."""
        if self.complete:
            return ""
        shown = ", ".join(f"{name} [{', '.join('?' if d is None else str(d) for d in dims)}]"
                          for name, dims in self.symbolic_inputs.items())
        example = next(iter(self.symbolic_inputs), "NAME")
        where = (f" inputs with symbolic dims: {shown};" if shown else "")
        return (f"{len(self.uncounted)} of {len(self.macs_by_node)} linear layers depend on "
                f"dims the model does not fix ({where} the MACs need a shape): give "
                f"--input-shape {example}:1,... (input_shape= in Python), or calibration data")


def model_cost(model: onnx.ModelProto, inputs: Feeds | InputShapes | None = None
               ) -> ModelCost:
    """Count the parameters and the MACs of ``model`` (see the module docstring).

    `inputs`: each graph input's full shape (samples first, e.g. ``{"x": (1, 3, 48, 192)}``)
    or an array of that shape, to count the MACs at; None: the declared shapes, batch 1.
    The model is not modified.

    Raises:
        ModelError: the model has no default-domain opset or ONNX shape inference fails on it
            (from ``graph.normalize``).
        DataError: `inputs` does not fit the model's inputs (from `concrete_shapes`).
    """
    if inputs is None:
        graph = _normalized_batch_one(model).graph
        shapes = _static_shapes(graph)
        input_shapes = None
    else:
        normalized = normalize(model)
        graph = normalized.graph
        shapes = concrete_shapes(normalized, inputs)
        input_shapes = {name: tuple(int(d) for d in (value if isinstance(value, tuple)
                                                      else value.shape))
                        for name, value in inputs.items()}
    macs_by_node: dict[str, int] = {}
    uncounted: list[str] = []
    for node in graph.node:
        layer = linear_layer_for(node)
        if layer is None:
            continue
        macs = layer.macs(node, shapes)
        if macs is None:
            uncounted.append(node.name)
            macs = 0
        macs_by_node[node.name] = macs
    return ModelCost(
        params=_count_params(model.graph),
        macs=sum(macs_by_node.values()),
        macs_by_node=macs_by_node,
        uncounted=tuple(uncounted),
        input_shapes=input_shapes,
        symbolic_inputs={} if inputs is not None else _symbolic_inputs(model.graph),
    )


def _symbolic_inputs(graph: onnx.GraphProto) -> dict[str, tuple[int | str | None, ...]]:
    """Graph inputs with a non-static dimension past the leading one: their declared dims."""
    initializers = {tensor.name for tensor in graph.initializer}
    found = {}
    for value in graph.input:
        if value.name in initializers or not value.type.tensor_type.HasField("shape"):
            continue
        dims = tuple(int(d.dim_value) if d.HasField("dim_value") else (d.dim_param or None)
                     for d in value.type.tensor_type.shape.dim)
        if any(not isinstance(d, int) for d in dims[1:]):
            found[value.name] = dims
    return found


def _is_float(data_type: int) -> bool:
    """Whether a TensorProto data type is a floating-point type (any width)."""
    name = onnx.TensorProto.DataType.Name(data_type)
    return name.startswith(("FLOAT", "DOUBLE", "BFLOAT"))


def _all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Nodes of ``graph`` and, recursively, of its subgraphs."""
    for node in graph.node:
        yield node
        for subgraph in subgraphs(node):
            yield from _all_nodes(subgraph)


def _all_initializers(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Initializers of ``graph`` and of its subgraphs."""
    yield from graph.initializer
    for node in graph.node:
        for subgraph in subgraphs(node):
            yield from _all_initializers(subgraph)


def _count_params(graph: onnx.GraphProto) -> int:
    read = {name for node in _all_nodes(graph) for name in node.input if name}
    counted: set[str] = set()
    total = 0
    for tensor in _all_initializers(graph):
        if tensor.name in read and tensor.name not in counted and _is_float(tensor.data_type):
            counted.add(tensor.name)
            total += math.prod(tensor.dims)
    for node in _all_nodes(graph):
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for attribute in node.attribute:
                if attribute.name == "value" and _is_float(attribute.t.data_type):
                    total += math.prod(attribute.t.dims)
    return total


def _batch_to_one(graph: onnx.GraphProto) -> None:
    """Set the non-fixed leading dimension of each graph input, and its symbol anywhere, to 1."""
    initializers = {tensor.name for tensor in graph.initializer}
    symbols: set[str] = set()
    for value in graph.input:
        if value.name in initializers or not value.type.tensor_type.HasField("shape"):
            continue
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            if dims[0].dim_param:
                symbols.add(dims[0].dim_param)
            dims[0].dim_value = 1
    for value in (*graph.input, *graph.output, *graph.value_info):
        if value.type.tensor_type.HasField("shape"):
            for dim in value.type.tensor_type.shape.dim:
                if dim.HasField("dim_param") and dim.dim_param in symbols:
                    dim.dim_value = 1


def _normalized_batch_one(model: onnx.ModelProto) -> onnx.ModelProto:
    """``graph.normalize`` of a copy of ``model`` whose batch dimension is fixed to 1."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    _batch_to_one(copy.graph)
    return normalize(copy)


def _static_shapes(graph: onnx.GraphProto) -> dict[str, Shape]:
    """Shapes of the tensors of ``graph`` whose dimensions are all known."""
    shapes: dict[str, Shape] = {tensor.name: tuple(tensor.dims) for tensor in graph.initializer}
    for value in (*graph.input, *graph.value_info, *graph.output):
        tensor_type = value.type.tensor_type
        if value.name in shapes or not tensor_type.HasField("shape"):
            continue
        dims = tensor_type.shape.dim
        if all(dim.HasField("dim_value") for dim in dims):
            shapes[value.name] = tuple(int(dim.dim_value) for dim in dims)
    return shapes
