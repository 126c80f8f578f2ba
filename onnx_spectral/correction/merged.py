"""The merged model of a compensation pass: the original and the partially pruned model side by
side, with each tap's cross statistics as outputs.

The pruned copy's tensors are renamed, graph inputs are shared, and each tap gets, in the graph,

    C = sum t_orig t_pruned^T   ([m, m], Gemm with transA=1)
    S = sum t_pruned t_pruned^T ([m, m])
    sum t_orig, sum t_pruned    ([m] each, for the affine variant)

over all samples (batch x positions). Only the nodes these outputs need are kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnx_spectral.analysis import Analysis, Tap
from onnx_spectral.graph.model import opset_version
from onnx_spectral.graph.submodel import needed_nodes

_PRUNED = "onnx_spectral_pruned/"
_TAP = "onnx_spectral_cross"


@dataclass(frozen=True)
class CrossOutputs:
    """Output names of one tap's cross statistics in the merged model (`tensor`: the tap)."""

    tensor: str
    cross: str
    second: str
    shape: str
    sum_original: str
    sum_pruned: str

    @property
    def names(self) -> tuple[str, ...]:
        return (self.cross, self.second, self.shape, self.sum_original, self.sum_pruned)


def _renamed_copy(pruned: onnx.ModelProto) -> tuple[list[onnx.NodeProto],
                                                   list[onnx.TensorProto]]:
    """Nodes and initializers of `pruned` with every non-input tensor name prefixed."""
    inputs = {value.name for value in pruned.graph.input}
    initializers = {init.name for init in pruned.graph.initializer}

    def rename(name: str) -> str:
        return name if not name or (name in inputs and name not in initializers) \
            else _PRUNED + name

    nodes = []
    for node in pruned.graph.node:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.name = _PRUNED + node.name
        copy.input[:] = [rename(name) for name in node.input]
        copy.output[:] = [rename(name) for name in node.output]
        nodes.append(copy)
    tensors = []
    for init in pruned.graph.initializer:
        copy = onnx.TensorProto()
        copy.CopyFrom(init)
        copy.name = _PRUNED + init.name
        tensors.append(copy)
    return nodes, tensors


def _rows(tensor: str, axis: int, rank: int, channels: int, prefix: str
          ) -> tuple[list[onnx.NodeProto], onnx.TensorProto, str]:
    """Nodes turning `tensor` into float rows [samples, channels]."""
    nodes = [helper.make_node("Cast", [tensor], [prefix + "float"], to=TensorProto.FLOAT)]
    current = prefix + "float"
    if axis != rank - 1:
        perm = [i for i in range(rank) if i != axis] + [axis]
        nodes.append(helper.make_node("Transpose", [current], [prefix + "last"], perm=perm))
        current = prefix + "last"
    shape = numpy_helper.from_array(np.array([-1, channels], dtype=np.int64), prefix + "shape")
    nodes.append(helper.make_node("Reshape", [current, shape.name], [prefix + "rows"]))
    return nodes, shape, prefix + "rows"


def merged_model(analysis: Analysis, pruned: onnx.ModelProto, taps: Sequence[Tap],
                 cached: bool = False) -> tuple[onnx.ModelProto, tuple[CrossOutputs, ...]]:
    """One model running the original and `pruned` side by side, returning cross statistics.

    `pruned` must keep the original's tensor names and graph inputs (as `rewrite` does). With
    `cached`, the original is not run: its tap tensors become extra graph inputs (fed from
    `original_activations`).
    """
    original = analysis.graph.model
    nodes, initializers = _renamed_copy(pruned)
    all_nodes = ([] if cached else list(original.graph.node)) + nodes
    extra: list[onnx.TensorProto] = []
    outputs = []
    value_infos = []
    for index, tap in enumerate(taps):
        rank = analysis.graph.rank(tap.tensor)
        assert rank is not None
        prefix = f"{_TAP}{index}_"
        left, shape_o, rows_o = _rows(tap.tensor, tap.axis, rank, tap.channels, prefix + "o_")
        right, shape_p, rows_p = _rows(_PRUNED + tap.tensor, tap.axis, rank, tap.channels,
                                       prefix + "p_")
        names = CrossOutputs(tap.tensor, prefix + "cross", prefix + "second", prefix + "count",
                              prefix + "sum_o", prefix + "sum_p")
        bias = []
        if opset_version(original) < 11:  # Gemm's C is optional from opset 11 on
            zero = numpy_helper.from_array(np.zeros((), dtype=np.float32), prefix + "zero")
            extra.append(zero)
            bias = [zero.name]
        all_nodes += left + right + [
            helper.make_node("Gemm", [rows_o, rows_p, *bias], [names.cross], transA=1),
            helper.make_node("Gemm", [rows_p, rows_p, *bias], [names.second], transA=1),
            helper.make_node("Shape", [rows_p], [names.shape]),
        ]
        for rows, total in ((rows_o, names.sum_original), (rows_p, names.sum_pruned)):
            all_nodes.append(_column_sums(rows, total, prefix, extra, opset_version(original)))
        extra += [shape_o, shape_p]
        value_infos += [
            helper.make_tensor_value_info(names.cross, TensorProto.FLOAT,
                                          [tap.channels, tap.channels]),
            helper.make_tensor_value_info(names.second, TensorProto.FLOAT,
                                          [tap.channels, tap.channels]),
            helper.make_tensor_value_info(names.shape, TensorProto.INT64, [2]),
            helper.make_tensor_value_info(names.sum_original, TensorProto.FLOAT, [tap.channels]),
            helper.make_tensor_value_info(names.sum_pruned, TensorProto.FLOAT, [tap.channels]),
        ]
        outputs.append(names)
    kept = needed_nodes(all_nodes, [name for out in outputs for name in out.names])
    used = {name for node in kept for name in node.input}
    inputs = list(original.graph.input)
    if cached:
        inputs += [helper.make_tensor_value_info(tap.tensor, TensorProto.FLOAT, None)
                   for tap in taps]
    graph = helper.make_graph(
        kept, "onnx_spectral_compensation", inputs, value_infos,
        [init for init in (*original.graph.initializer, *initializers, *extra)
         if init.name in used])
    model = helper.make_model(graph, opset_imports=list(original.opset_import))
    model.ir_version = original.ir_version
    return model, tuple(outputs)


def _column_sums(rows: str, output: str, prefix: str, initializers: list[onnx.TensorProto],
                 opset: int) -> onnx.NodeProto:
    """ReduceSum of `rows` ([samples, m]) over the samples into `output` ([m])."""
    if opset < 13:
        return helper.make_node("ReduceSum", [rows], [output], axes=[0], keepdims=0)
    axes = prefix + "axes0"
    if all(init.name != axes for init in initializers):
        initializers.append(numpy_helper.from_array(np.array([0], dtype=np.int64), axes))
    return helper.make_node("ReduceSum", [rows, axes], [output], keepdims=0)
