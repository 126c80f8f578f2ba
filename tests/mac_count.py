"""An independent MAC count for the tests: ONNX shape inference on a copy of the model whose
input dims are fixed, then the formulas of Conv, Gemm and MatMul over the inferred shapes and
the constants (initializers and `Constant` nodes). It shares no code with `onnx_spectral.cost`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import onnx


def independent_macs(model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]]) -> int:
    """MACs of `model` with its inputs at `shapes` (input name -> full shape): Conv output
    elements x weight elements per output channel, Gemm M x N x K, MatMul output elements x K."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for value in fixed.graph.input:
        if value.name in shapes:
            dims = value.type.tensor_type.shape.dim
            for dim, size in zip(dims, shapes[value.name], strict=True):
                dim.Clear()
                dim.dim_value = size
    inferred = onnx.shape_inference.infer_shapes(fixed, strict_mode=True, data_prop=True)
    known = {value.name: [d.dim_value for d in value.type.tensor_type.shape.dim]
             for value in (*inferred.graph.input, *inferred.graph.value_info,
                           *inferred.graph.output)}
    known.update({tensor.name: list(tensor.dims) for tensor in inferred.graph.initializer})
    for node in inferred.graph.node:
        for attribute in node.attribute:
            if node.op_type == "Constant" and attribute.name == "value":
                known[node.output[0]] = list(attribute.t.dims)
    total = 0
    for node in inferred.graph.node:
        out = known[node.output[0]]
        assert all(size > 0 for size in out), (node.name, out)
        if node.op_type == "Conv":
            total += math.prod(out) * math.prod(known[node.input[1]][1:])
        elif node.op_type == "Gemm":
            trans_a = any(a.name == "transA" and a.i for a in node.attribute)
            features = known[node.input[0]][0 if trans_a else 1]
            total += math.prod(out) * features
        elif node.op_type == "MatMul":
            total += math.prod(out) * known[node.input[0]][-1]
    return total
