"""An independent MAC count for the tests: ONNX shape inference on a copy of the model whose
input dims are fixed, then the formulas of Conv, Gemm and MatMul over the inferred shapes and
the constants (initializers and `Constant` nodes). Shapes inference cannot tell (Paddle's
computed `Reshape` targets) come from an ONNX Runtime run on zeros. It shares no code with
`onnx_spectral`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import onnx
import onnxruntime as ort

_LINEAR = ("Conv", "Gemm", "MatMul")


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
    inferred = onnx.shape_inference.infer_shapes(fixed, data_prop=True)
    known = {value.name: [d.dim_value for d in value.type.tensor_type.shape.dim]
             for value in (*inferred.graph.input, *inferred.graph.value_info,
                           *inferred.graph.output)}
    known.update({tensor.name: list(tensor.dims) for tensor in inferred.graph.initializer})
    for node in inferred.graph.node:
        for attribute in node.attribute:
            if node.op_type == "Constant" and attribute.name == "value":
                known[node.output[0]] = list(attribute.t.dims)
    needed = {name for node in inferred.graph.node if node.op_type in _LINEAR
              for name in (node.input[0], node.output[0])}
    unknown = sorted(name for name in needed
                     if not known.get(name) or min(known[name]) <= 0)
    known.update(_run_shapes(fixed, shapes, unknown))
    total = 0
    for node in inferred.graph.node:
        if node.op_type not in _LINEAR:
            continue
        out = known[node.output[0]]
        if node.op_type == "Conv":
            total += math.prod(out) * math.prod(known[node.input[1]][1:])
        elif node.op_type == "Gemm":
            trans_a = any(a.name == "transA" and a.i for a in node.attribute)
            total += math.prod(out) * known[node.input[0]][0 if trans_a else 1]
        else:
            total += math.prod(out) * known[node.input[0]][-1]
    return total


def _run_shapes(model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]],
                names: list[str]) -> dict[str, list[int]]:
    """Shapes of the tensors `names` in an ONNX Runtime run of `model` on zeros."""
    if not names:
        return {}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(onnx.ValueInfoProto(name=name) for name in names)
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {name: np.zeros(shape, np.float32) for name, shape in shapes.items()}
    return {name: list(np.shape(value))
            for name, value in zip(names, session.run(names, feeds), strict=True)}
