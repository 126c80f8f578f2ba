"""In-graph statistics taps: the model returns per-batch Gram matrices, not activations.

For every tap tensor T with m channels on axis a, the instrumented model computes
`X = reshape(transpose(T, a -> last), [-1, m])` and returns `X^T X` ([m, m], via Gemm with
transA=1), `sum(X, axis=0)` ([m]) and `shape(X)` ([2], whose first entry counts the samples).
Only m x m floats per tap leave the runtime, whatever the batch and spatial size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .analysis import Tap
from .graph import GraphIndex, opset_version

_PREFIX = "onnx_spectral_tap"


@dataclass(frozen=True)
class TapOutputs:
    """The instrumented model's output names for the tap on `tensor`."""

    tensor: str
    gram: str
    total: str
    shape: str


@dataclass(frozen=True)
class Instrumented:
    """A copy of the model whose only outputs are the taps' statistics."""

    model: onnx.ModelProto
    taps: tuple[TapOutputs, ...]


def _value_type(graph: GraphIndex, tensor: str) -> int:
    for value in (*graph.model.graph.input, *graph.model.graph.value_info,
                  *graph.model.graph.output):
        if value.name == tensor:
            return int(value.type.tensor_type.elem_type)
    return TensorProto.FLOAT


def _tap_nodes(graph: GraphIndex, tap: Tap, index: int, opset: int
               ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto], TapOutputs]:
    prefix = f"{_PREFIX}{index}_"
    rank = graph.rank(tap.tensor)
    assert rank is not None
    nodes: list[onnx.NodeProto] = []
    current = tap.tensor
    if _value_type(graph, tap.tensor) != TensorProto.FLOAT:
        nodes.append(helper.make_node("Cast", [current], [prefix + "float"], to=TensorProto.FLOAT))
        current = prefix + "float"
    if tap.axis != rank - 1:
        perm = [i for i in range(rank) if i != tap.axis] + [tap.axis]
        nodes.append(helper.make_node("Transpose", [current], [prefix + "last"], perm=perm))
        current = prefix + "last"
    shape_const = numpy_helper.from_array(np.array([-1, tap.channels], dtype=np.int64),
                                          prefix + "rows_shape")
    rows = prefix + "rows"
    nodes.append(helper.make_node("Reshape", [current, shape_const.name], [rows]))
    outputs = TapOutputs(tap.tensor, prefix + "gram", prefix + "sum", prefix + "shape")
    initializers = [shape_const]
    gemm_inputs = [rows, rows]
    if opset < 11:  # Gemm's C is optional from opset 11 on
        zero = numpy_helper.from_array(np.zeros((), dtype=np.float32), prefix + "zero")
        initializers.append(zero)
        gemm_inputs.append(zero.name)
    nodes.append(helper.make_node("Gemm", gemm_inputs, [outputs.gram], transA=1))
    if opset >= 13:
        axes = numpy_helper.from_array(np.array([0], dtype=np.int64), prefix + "axes")
        initializers.append(axes)
        nodes.append(helper.make_node("ReduceSum", [rows, axes.name], [outputs.total],
                                      keepdims=0))
    else:
        nodes.append(helper.make_node("ReduceSum", [rows], [outputs.total], axes=[0],
                                      keepdims=0))
    nodes.append(helper.make_node("Shape", [rows], [outputs.shape]))
    return nodes, initializers, outputs


def instrument(graph: GraphIndex, taps: Sequence[Tap]) -> Instrumented:
    """Copy of `graph.model` whose outputs are the Gram/sum/shape of every tap tensor."""
    model = onnx.ModelProto()
    model.CopyFrom(graph.model)
    opset = opset_version(model)
    del model.graph.output[:]
    outputs = []
    for index, tap in enumerate(taps):
        nodes, initializers, names = _tap_nodes(graph, tap, index, opset)
        model.graph.node.extend(nodes)
        model.graph.initializer.extend(initializers)
        model.graph.output.extend([
            helper.make_tensor_value_info(names.gram, TensorProto.FLOAT,
                                          [tap.channels, tap.channels]),
            helper.make_tensor_value_info(names.total, TensorProto.FLOAT, [tap.channels]),
            helper.make_tensor_value_info(names.shape, TensorProto.INT64, [2]),
        ])
        outputs.append(names)
    return Instrumented(model, tuple(outputs))
