"""Tests of onnx_spectral.cost on tiny hand-made graphs, hand-computed numbers."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_spectral.cost import ModelCost, model_cost
from onnx_spectral.errors import ModelError

Dims = Sequence[int | str | None]


def _init(name: str, shape: Sequence[int], dtype: type = np.float32) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ones(shape, dtype=dtype), name)


def _model(
    nodes: list[onnx.NodeProto],
    inputs: list[tuple[str, Dims]],
    outputs: list[tuple[str, Dims]],
    initializers: list[onnx.TensorProto],
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def test_grouped_conv_with_stride_and_padding_and_dynamic_batch():
    # X [N, 4, 10, 10], W [6, 2, 3, 3], group 2, stride 2, pad 1 -> Y [N, 6, 5, 5].
    conv = helper.make_node(
        "Conv", ["x", "w", "b"], ["y"], name="conv", group=2, strides=[2, 2], pads=[1, 1, 1, 1]
    )
    model = _model(
        [conv],
        [("x", ["N", 4, 10, 10])],
        [("y", ["N", 6, 5, 5])],
        [_init("w", [6, 2, 3, 3]), _init("b", [6])],
    )
    cost = model_cost(model)
    assert isinstance(cost, ModelCost)
    # 6 * 5 * 5 output elements, each 2 input channels * 9 taps.
    assert cost.macs == 150 * 18 == 2700
    assert dict(cost.macs_by_node) == {"conv": 2700}
    assert cost.params == 6 * 2 * 9 + 6
    assert cost.uncounted == ()


def test_depthwise_conv_and_fixed_batch_one_match_dynamic():
    conv = helper.make_node("Conv", ["x", "w"], ["y"], name="dw", group=8)
    weights = [_init("w", [8, 1, 3, 3])]
    fixed = _model([conv], [("x", [1, 8, 7, 7])], [("y", [1, 8, 5, 5])], weights)
    dynamic = _model([conv], [("x", ["batch", 8, 7, 7])], [("y", ["batch", 8, 5, 5])], weights)
    unknown = _model([conv], [("x", [None, 8, 7, 7])], [("y", [None, 8, 5, 5])], weights)
    for model in (fixed, dynamic, unknown):
        cost = model_cost(model)
        assert cost.macs == 8 * 5 * 5 * 9 == 1800
        assert cost.params == 72


def test_conv_transpose_grouped():
    # X [1, 4, 5, 5], W [4, 3, 2, 2], group 2 -> C_out = 6; each input element feeds
    # C_out / group * kernel = 3 * 4 outputs.
    node = helper.make_node("ConvTranspose", ["x", "w"], ["y"], name="up", group=2, strides=[2, 2])
    model = _model(
        [node], [("x", [1, 4, 5, 5])], [("y", [1, 6, 10, 10])], [_init("w", [4, 3, 2, 2])]
    )
    assert model_cost(model).macs == 100 * 12 == 1200


def test_gemm_trans_b_and_trans_a():
    # A [N, 20], B [30, 20] with transB -> Y [N, 30]: M=1, N=30, K=20.
    gemm = helper.make_node("Gemm", ["a", "b", "c"], ["y"], name="fc", transB=1)
    model = _model(
        [gemm], [("a", ["N", 20])], [("y", ["N", 30])], [_init("b", [30, 20]), _init("c", [30])]
    )
    cost = model_cost(model)
    assert cost.macs == 30 * 20
    assert cost.params == 630
    # A [7, 2] with transA (M=2, K=7), B [7, 5]: 2 * 5 * 7.
    gemm_t = helper.make_node("Gemm", ["a", "b"], ["y"], name="fc", transA=1)
    model = _model([gemm_t], [("a", [7, 2])], [("y", [2, 5])], [_init("b", [7, 5])])
    assert model_cost(model).macs == 70


def test_matmul_three_d_broadcast_and_one_d():
    # A [N, 1, 3, 4] x B [2, 4, 5] -> Y [N, 2, 3, 5]: batch 2, M=3, N=5, K=4.
    mm = helper.make_node("MatMul", ["a", "b"], ["y"], name="mm")
    model = _model([mm], [("a", ["N", 1, 3, 4])], [("y", ["N", 2, 3, 5])], [_init("b", [2, 4, 5])])
    assert model_cost(model).macs == 2 * 3 * 5 * 4
    # A [N, 3, 4] x B [4, 5]: M=3, N=5, K=4.
    model = _model([mm], [("a", ["N", 3, 4])], [("y", ["N", 3, 5])], [_init("b", [4, 5])])
    assert model_cost(model).macs == 60
    # 1-D A [4] x B [4, 5] -> Y [5].
    model = _model([mm], [("a", [4])], [("y", [5])], [_init("b", [4, 5])])
    assert model_cost(model).macs == 20


def test_chain_after_flatten_and_elementwise_not_counted():
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Reshape", ["r", "shape"], ["f"], name="flat"),
        helper.make_node("MatMul", ["f", "fc"], ["m"], name="fc"),
        helper.make_node("Add", ["m", "bias"], ["y"], name="add"),
    ]
    model = _model(
        nodes,
        [("x", ["N", 3, 4, 4])],
        [("y", ["N", 10])],
        [
            _init("w", [2, 3, 3, 3]),
            numpy_helper.from_array(np.array([-1, 32], dtype=np.int64), "shape"),
            _init("fc", [32, 10]),
            _init("bias", [10]),
        ],
    )
    cost = model_cost(model)
    assert dict(cost.macs_by_node) == {"conv": 2 * 16 * 27, "fc": 320}
    assert cost.macs == 864 + 320
    assert cost.params == 54 + 320 + 10  # the int64 shape is not a parameter


def test_pads_from_a_constant_chain_are_folded():
    # torch writes Pad's pads through Transpose/Reshape chains of constants, which shape
    # inference alone cannot follow: pads [0, 0, 1, 1, 0, 0, 1, 1] -> X [N, 2, 6, 6].
    pairs = np.array([[0, 0], [0, 0], [1, 1], [1, 1]], dtype=np.int64)
    nodes = [
        helper.make_node(
            "Constant", [], ["pairs"], name="pairs", value=numpy_helper.from_array(pairs)
        ),
        helper.make_node("Transpose", ["pairs"], ["begin_end"], name="t", perm=[1, 0]),
        helper.make_node("Reshape", ["begin_end", "flat"], ["pads"], name="r"),
        helper.make_node("Pad", ["x", "pads"], ["padded"], name="pad"),
        helper.make_node("Conv", ["padded", "w"], ["y"], name="conv"),
    ]
    model = _model(
        nodes,
        [("x", ["N", 2, 4, 4])],
        [("y", ["N", 3, 4, 4])],
        [numpy_helper.from_array(np.array([-1], dtype=np.int64), "flat"), _init("w", [3, 2, 3, 3])],
    )
    cost = model_cost(model)
    assert cost.uncounted == ()
    assert dict(cost.macs_by_node) == {"conv": 3 * 16 * 18}
    assert cost.params == 54  # the int64 pads are not parameters


def test_dynamic_spatial_dims_count_zero_and_are_listed():
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        helper.make_node("GlobalAveragePool", ["c"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "fc"], ["y"], name="head", transB=1),
    ]
    model = _model(
        nodes,
        [("x", ["N", 3, "H", "W"])],
        [("y", ["N", 5])],
        [_init("w", [4, 3, 1, 1]), _init("fc", [5, 4])],
    )
    cost = model_cost(model)
    assert cost.uncounted == ("conv",)
    assert dict(cost.macs_by_node) == {"conv": 0, "head": 20}
    assert cost.macs == 20


def test_params_rules():
    nodes = [
        helper.make_node(
            "Constant",
            [],
            ["k"],
            name="const",
            value=numpy_helper.from_array(np.ones((2, 3), np.float32)),
        ),
        helper.make_node(
            "Constant",
            [],
            ["axes"],
            name="ints",
            value=numpy_helper.from_array(np.array([0], np.int64)),
        ),
        helper.make_node("Mul", ["x", "shared"], ["a"], name="m1"),
        helper.make_node("Add", ["a", "shared"], ["b"], name="m2"),
        helper.make_node("Add", ["b", "k"], ["c"], name="m3"),
        helper.make_node("Add", ["c", "half"], ["y"], name="m4"),
    ]
    model = _model(
        nodes,
        [("x", [2, 3])],
        [("y", [2, 3])],
        [
            _init("shared", [2, 3]),  # read twice, counted once
            _init("half", [3], np.float16),
            _init("unused", [100]),  # read by no node
            numpy_helper.from_array(np.zeros(7, dtype=np.int32), "ints32"),
        ],
    )
    cost = model_cost(model)
    assert cost.params == 6 + 3 + 6
    assert cost.macs == 0 and dict(cost.macs_by_node) == {}


def test_subgraph_reads_count_params():
    then_graph = helper.make_graph(
        [helper.make_node("Add", ["x", "outer"], ["t"], name="then_add")],
        "then",
        [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, [4])],
    )
    else_graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["e"], name="else_id")],
        "else",
        [],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, [4])],
    )
    branch = helper.make_node(
        "If", ["cond"], ["y"], name="if", then_branch=then_graph, else_branch=else_graph
    )
    graph = helper.make_graph(
        [branch],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [4]),
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        [_init("outer", [4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert model_cost(model).params == 4


def test_unnamed_nodes_and_model_untouched():
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("MatMul", ["h", "w2"], ["y"]),
    ]
    model = _model(
        nodes, [("x", ["B", 4])], [("y", ["B", 2])], [_init("w1", [4, 3]), _init("w2", [3, 2])]
    )
    before = model.SerializeToString()
    cost = model_cost(model)
    assert dict(cost.macs_by_node) == {"MatMul_0": 12, "MatMul_1": 6}
    assert cost.macs == 18
    assert model.SerializeToString() == before


def test_shape_inference_failure_is_model_error():
    # A [4, 2] weight for a 3-feature input.
    matmul = helper.make_node("MatMul", ["x", "w"], ["y"], name="matmul")
    model = _model([matmul], [("x", [1, 3])], [("y", [1, 2])], [_init("w", [4, 2])])
    with pytest.raises(ModelError, match="shape inference"):
        model_cost(model)


def test_a_declared_output_shape_inference_contradicts_is_read_as_unknown():
    # Without padding the Conv gives [1, 2, 2, 2], not the declared [1, 2, 4, 4] (ONNX Runtime
    # runs such a model, warning): the MACs are those of the shape the graph computes.
    conv = helper.make_node("Conv", ["x", "w"], ["y"], name="conv")
    model = _model([conv], [("x", [1, 3, 4, 4])], [("y", [1, 2, 4, 4])], [_init("w", [2, 3, 3, 3])])
    assert model_cost(model).macs == 2 * 2 * 2 * 3 * 3 * 3
