"""Op families beyond Conv/Gemm/MatMul: Einsum, recurrent layers, ONNX Runtime's fused ops,
channel reductions and normalizations, and budgets on a channel Split.

Each test builds a tiny graph in code, analyzes it (which groups are prunable, why the others
are frozen), compresses it, and checks that the result passes the checker, runs in ONNX Runtime
with the original output names and shapes, and reproduces the original when every channel is
kept.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from onnx_spectral import compress
from onnx_spectral.analysis import analyze
from onnx_spectral.cost import model_cost
from onnx_spectral.selection.group_cost import group_costs
from tests.graphs import GraphBuilder
from tests.test_ops import FAST, _by_producer, _check_runs_like, _constant, _data

HIDDEN = 9
KEPT_HIDDEN = math.ceil(0.5 * HIDDEN)


def _keeps_everything(model: onnx.ModelProto) -> None:
    """Ratio 1 with a vanishing ridge: the outputs are the original's."""
    compressed, _ = compress(model, _data(model, 64, seed=1), ratio=1.0, ridge=1e-9, **FAST)
    want, got = _check_runs_like(model, compressed, _data(model, 6, seed=3))
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4,
                                   atol=1e-4 * float(np.abs(want[name]).max()))


# ----------------------------------------------------------------------------------------------
# Einsum as written by TensorFlow exporters


def _einsum_mlp(first: str, second: str) -> onnx.ModelProto:
    """x [N,5,12] -> Einsum 'e1' (first, 12 -> 9) -> Relu -> Einsum 'e2' (second, 9 -> 4)."""
    b = GraphBuilder(0)
    shape = (HIDDEN, 12) if first.split(",")[1].split("->")[0] == "kj" else (12, HIDDEN)
    t = b.node("Einsum", ["x", b.random("w1", shape, fan_in=12)], "e1", equation=first)
    t = b.node("Relu", [b.node("Add", [t, b.random("b1", (HIDDEN,), 4, positive=True)],
                               "add1")], "relu")
    b.node("Einsum", [t, b.random("w2", (HIDDEN, 4), fan_in=HIDDEN)], "e2", equation=second)
    return b.model([("x", ["N", 5, 12])], [("e2", ["N", 5, 4])])


@pytest.mark.parametrize(("first", "second", "w1_kept"), [
    ("bij,jk->bik", "bij,jk->bik", (12, KEPT_HIDDEN)),
    ("bij,kj->bik", "...j,jk->...k", (KEPT_HIDDEN, 12)),
])
def test_einsum_by_a_matrix_is_a_matmul(first: str, second: str,
                                        w1_kept: tuple[int, int]) -> None:
    model = _einsum_mlp(first, second)
    groups = _by_producer(analyze(model).groups)
    assert groups["e1"].prunable and groups["e1"].taps[0].sinks[0].node == "e2"
    compressed, _ = compress(model, _data(model, 64, seed=1), ratio=0.5, **FAST)
    _check_runs_like(model, compressed, _data(model, 5, seed=2))
    assert _constant(compressed, "e1", 1).shape == w1_kept
    assert _constant(compressed, "e2", 1).shape == (KEPT_HIDDEN, 4)
    _keeps_everything(model)
    assert model_cost(model).macs_by_node == {"e1": 5 * 12 * HIDDEN, "e2": 5 * HIDDEN * 4}


def test_einsum_of_two_activations_freezes() -> None:
    b = GraphBuilder(0)
    t = b.node("MatMul", ["x", b.random("w", (12, HIDDEN), fan_in=12)], "mm")
    b.node("Einsum", [t, t], "e", equation="bij,bkj->bik")
    model = b.model([("x", ["N", 5, 12])], [("e", ["N", 5, 5])])
    (group,) = [g for g in analyze(model).groups if "mm" in g.producers]
    assert any("Einsum that is not activation x constant matrix" in r for r in group.frozen)


# ----------------------------------------------------------------------------------------------
# recurrent layers

GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
STEPS, FEATURES, WIDTH, STATE = 5, 6, 8, 5


def _front(b: GraphBuilder, kind: str) -> str:
    """[N, STEPS, WIDTH] after Relu: a MatMul 'front' on x [N, STEPS, FEATURES], or a 1-D Conv
    'front' on x [N, FEATURES, STEPS] then Transpose."""
    if kind == "matmul":
        t = b.node("MatMul", ["x", b.random("front_w", (FEATURES, WIDTH), FEATURES)], "front")
        t = b.node("Add", [t, b.random("front_b", (WIDTH,), 4, positive=True)], "front_add")
        return b.node("Relu", [t], "front_relu")
    w = b.random("front_w", (WIDTH, FEATURES, 3), FEATURES * 3)
    t = b.node("Conv", ["x", w, b.random("front_b", (WIDTH,), 4, positive=True)], "front",
               kernel_shape=[3], pads=[1, 1])
    t = b.node("Relu", [t], "front_relu")
    return b.node("Transpose", [t], "front_t", perm=[0, 2, 1])


def _recurrent(op: str, layout: int, front: str = "matmul") -> onnx.ModelProto:
    """<front> -> [seq, batch] order of `layout` -> `op` 'rnn' (hidden STATE) -> Y_h output.

    The initial state comes from a MatMul 'state' of the input's time average, and
    sequence_lens from the input's shape: both depend on the batch size."""
    b = GraphBuilder(0)
    t = _front(b, front)
    if layout == 0:
        t = b.node("Transpose", [t], "to_seq_first", perm=[1, 0, 2])
    gates = GATES[op]
    w = b.random("W", (1, gates * STATE, WIDTH), WIDTH)
    r = b.random("R", (1, gates * STATE, STATE), STATE)
    bias = b.random("B", (1, 2 * gates * STATE), 4)
    source = "x" if front == "matmul" else b.node("Transpose", ["x"], "x_t", perm=[0, 2, 1])
    mean = b.node("ReduceMean", [source], "x_mean", axes=[1])
    state = b.node("MatMul", [mean, b.random("state_w", (FEATURES, STATE), FEATURES)], "state")
    if layout == 0:
        state = b.node("Transpose", [state], "state_t", perm=[1, 0, 2])
    batch = b.node("Shape", ["x"], "batch", start=0, end=1)
    lens = b.node("Expand", [b.const("steps", np.array([STEPS], dtype=np.int32)), batch],
                  "lens")
    inputs = [t, w, r, bias, lens, state]
    outputs = 2
    if op == "LSTM":
        inputs.append(state)
        outputs = 3
    b.node(op, inputs, "rnn", outputs=outputs, hidden_size=STATE, layout=layout)
    dims = ["N", 1, STATE] if layout else [1, "N", STATE]
    x_dims = ["N", STEPS, FEATURES] if front == "matmul" else ["N", FEATURES, STEPS]
    return b.model([("x", x_dims)], [("rnn_out1", dims)])


def _check_recurrent_groups(model: onnx.ModelProto) -> None:
    groups = _by_producer(analyze(model).groups)
    assert groups["front"].prunable, groups["front"].frozen
    assert [(tap.axis, [sink.node for sink in tap.sinks]) for tap in groups["front"].taps] == \
        [(2, ["rnn"])]
    assert any("recurrent state width is kept (" in r and "'rnn'" in r
               for r in groups["rnn"].frozen)
    assert any("recurrent state width is kept: input 5" in r for r in groups["state"].frozen)


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
def test_batch_first_recurrent_layers_are_sinks_of_axis_2(op: str) -> None:
    """layout 1 ([batch, seq, input]): analysis only, ONNX Runtime's CPU kernels refuse it."""
    _check_recurrent_groups(_recurrent(op, 1))


@pytest.mark.parametrize(("op", "front"), [("LSTM", "matmul"), ("LSTM", "conv"),
                                           ("GRU", "conv"), ("RNN", "matmul")])
def test_recurrent_input_is_a_sink_and_its_state_is_kept(op: str, front: str) -> None:
    model = _recurrent(op, 0, front)
    _check_recurrent_groups(model)
    compressed, _ = compress(model, _data(model, 64, seed=1), ratio=0.5, **FAST)
    _check_runs_like(model, compressed, _data(model, 5, seed=2))
    assert _constant(compressed, "rnn", 1).shape == (1, GATES[op] * STATE, WIDTH // 2)
    assert _constant(compressed, "rnn", 2).shape == (1, GATES[op] * STATE, STATE)
    _keeps_everything(model)


def test_recurrent_macs_and_their_input_share() -> None:
    model = _recurrent("LSTM", 0)
    analysis = analyze(model)
    cost = model_cost(model)
    per_step = 4 * STATE * (WIDTH + STATE)
    assert cost.macs_by_node["rnn"] == STEPS * per_step
    costs = group_costs(analysis, cost)
    column = [g.producers for g in costs.groups].index(("front",))
    widths = np.array([g.channels for g in costs.groups])
    widths[column] = WIDTH // 2
    # the front MatMul halves, and the LSTM's W part (input / (input + hidden)) halves
    saved = STEPS * FEATURES * WIDTH // 2 + STEPS * 4 * STATE * WIDTH // 2
    assert costs.macs(widths) == pytest.approx(cost.macs - saved)


# ----------------------------------------------------------------------------------------------
# ONNX Runtime's extended optimizations: FusedConv, FusedGemm


def _ort_optimized(model: onnx.ModelProto, path: str) -> onnx.ModelProto:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = path
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return onnx.load(path)


def _conv_relu_conv_head() -> onnx.ModelProto:
    """x -> conv1 (7) -> Relu -> conv2 (6) -> Relu -> Flatten -> fc1 (9) -> Relu -> fc2 (4)."""
    b = GraphBuilder(0)
    t = b.node("Relu", [b.conv("x", "conv1", 3, 7)], "relu1")
    t = b.node("Relu", [b.conv(t, "conv2", 7, 6)], "relu2")
    t = b.node("Flatten", [t], "flat")
    t = b.node("Relu", [b.gemm(t, "fc1", 6 * 64, HIDDEN, positive_bias=True)], "relu3")
    b.gemm(t, "fc2", HIDDEN, 4)
    return b.model([("x", ["N", 3, 8, 8])], [("fc2", ["N", 4])])


def test_ort_fused_ops_are_producers_and_sinks(tmp_path: object) -> None:
    model = _ort_optimized(_conv_relu_conv_head(), f"{tmp_path}/optimized.onnx")
    fused = {(node.domain, node.op_type) for node in model.graph.node}
    assert {("com.microsoft", "FusedConv"), ("com.microsoft", "FusedGemm")} <= fused
    (fc1,) = [node.name for node in model.graph.node if node.op_type == "FusedGemm"]
    groups = _by_producer(analyze(model).groups)
    for producer in ("conv1", "conv2", fc1):
        assert groups[producer].prunable, (producer, groups[producer].frozen)
    assert model_cost(model).macs_by_node["conv1"] == 64 * 7 * 27
    compressed, _ = compress(model, _data(model, 64, seed=1), ratio=0.5, **FAST)
    _check_runs_like(model, compressed, _data(model, 5, seed=2))
    assert _constant(compressed, "conv1", 1).shape == (4, 3, 3, 3)
    assert _constant(compressed, "conv2", 1).shape == (3, 4, 3, 3)
    assert _constant(compressed, fc1, 1).shape == (KEPT_HIDDEN, 3 * 64)
    assert _constant(compressed, "fc2", 1).shape == (4, KEPT_HIDDEN)
    _keeps_everything(model)


def test_fused_conv_with_unknown_activation_freezes() -> None:
    b = GraphBuilder(0)
    w, bias = b.random("w", (7, 3, 3, 3), 27), b.random("b", (7,), 4)
    b.nodes.append(helper.make_node("FusedConv", ["x", w, bias], ["fc"], name="fc",
                                    domain="com.microsoft", activation="Softmax",
                                    kernel_shape=[3, 3], pads=[1, 1, 1, 1]))
    b.conv("fc", "conv2", 7, 5)
    graph = helper.make_graph(b.nodes, "g", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, ["N", 3, 8, 8])], [helper.make_tensor_value_info(
            "conv2", TensorProto.FLOAT, ["N", 5, 8, 8])], b.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    (group,) = [g for g in analyze(model).groups if "fc" in g.producers]
    assert any("activation 'Softmax'" in reason for reason in group.frozen)


# ----------------------------------------------------------------------------------------------
# reductions and normalizations over the channel axis


def _three_convs(middle: str, opset: int = 21) -> onnx.ModelProto:
    """x -> conv1 (7) -> Relu -> conv2 (6) -> <middle> -> y: `middle` reads conv2's group."""
    b = GraphBuilder(0, opset=opset)
    t = b.node("Relu", [b.conv("x", "conv1", 3, 7)], "relu1")
    t = b.conv(t, "conv2", 7, 6)
    if middle == "reduce-axes-input":
        t = b.node("ReduceMean", [t, b.const("axes", np.array([1]))], "reduce")
        dims: list[int | str] = ["N", 1, 8, 8]
    elif middle == "layernorm-channels-last":
        t = b.node("Transpose", [t], "nhwc", perm=[0, 2, 3, 1])
        t = b.node("LayerNormalization", [t, b.random("ln_s", (6,)), b.random("ln_b", (6,))],
                   "norm", axis=-1)
        dims = ["N", 8, 8, 6]
    elif middle == "groupnorm-two-groups":
        t = b.node("GroupNormalization", [t, b.random("gn_s", (6,)), b.random("gn_b", (6,))],
                   "norm", num_groups=2)
        dims = ["N", 6, 8, 8]
    else:
        raise ValueError(middle)
    return b.model([("x", ["N", 3, 8, 8])], [(t, dims)])


@pytest.mark.parametrize(("middle", "reason"), [
    ("reduce-axes-input", "ReduceMean reduces over the channel axis (ReduceMean node 'reduce'"),
    ("layernorm-channels-last", "LayerNormalization normalizes over the channel axis "
                                "(LayerNormalization node 'norm'"),
    ("groupnorm-two-groups", "GroupNormalization normalizes channels in groups (num_groups=2) "
                             "(GroupNormalization node 'norm'"),
])
def test_a_channel_reduction_freezes_only_the_group_it_reads(middle: str, reason: str) -> None:
    model = _three_convs(middle)
    groups = _by_producer(analyze(model).groups)
    assert any(reason in text for text in groups["conv2"].frozen), groups["conv2"].frozen
    assert groups["conv1"].prunable, groups["conv1"].frozen
    # conv2's outputs stay whole (without a reconstruction layer, tests/test_reconstruction_layers)
    compressed, _ = compress(model, _data(model, 64, seed=1), ratio=0.5,
                             reconstruction_layers="none", **FAST)
    _check_runs_like(model, compressed, _data(model, 5, seed=2))
    assert _constant(compressed, "conv1", 1).shape == (4, 3, 3, 3)
    assert _constant(compressed, "conv2", 1).shape == (6, 4, 3, 3)


def test_a_layer_normalization_within_channels_is_channelwise() -> None:
    """x -> conv1 (7) -> LayerNormalization over H and W (scale [8, 8]) -> Relu -> conv2."""
    b = GraphBuilder(0, opset=18)
    t = b.conv("x", "conv1", 3, 7)
    t = b.node("LayerNormalization", [t, b.random("s", (8, 8)), b.random("b", (8, 8))], "norm",
               axis=2)
    b.conv(b.node("Relu", [t], "relu"), "conv2", 7, 5)
    model = b.model([("x", ["N", 3, 8, 8])], [("conv2", ["N", 5, 8, 8])])
    groups = _by_producer(analyze(model).groups)
    assert groups["conv1"].prunable, groups["conv1"].frozen
    compressed, _ = compress(model, _data(model, 64, seed=1), ratio=0.5, **FAST)
    _check_runs_like(model, compressed, _data(model, 5, seed=2))
    assert _constant(compressed, "conv2", 1).shape == (5, 4, 3, 3)
    _keeps_everything(model)


# ----------------------------------------------------------------------------------------------
# budgets on a channel Split (opset 13+: split sizes as an input)


def test_flops_budget_on_a_channel_split() -> None:
    """conv1 (8) -> Split [4, 4] on channels -> conv_a, conv_b -> Add -> y: probing the cost
    of the split group rewrites the Split's sizes input (and may drop its attribute)."""
    b = GraphBuilder(0, opset=13)
    t = b.node("Relu", [b.conv("x", "conv1", 3, 8)], "relu1")
    b.node("Split", [t, b.const("sizes", np.array([4, 4]))], "split", outputs=2, axis=1)
    a = b.conv("split", "conv_a", 4, 5)
    c = b.conv("split_out1", "conv_b", 4, 5)
    b.node("Add", [a, c], "y")
    model = b.model([("x", ["N", 3, 8, 8])], [("y", ["N", 5, 8, 8])])
    compressed, report = compress(model, _data(model, 64, seed=1), flops=0.5, **FAST)
    _check_runs_like(model, compressed, _data(model, 5, seed=2))
    assert report.cost_after.macs <= 0.5 * report.cost_before.macs * 1.05
    assert report.cost_after.macs < report.cost_before.macs
