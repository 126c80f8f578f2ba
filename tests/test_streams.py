"""Residual streams: which groups write into one, its energy taps, and the loss unit."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnx_spectral.analysis import analyze
from onnx_spectral.api import calibrate_statistics
from onnx_spectral.graph.model import GraphIndex, normalize
from onnx_spectral.ops.residual import stream_partner
from onnx_spectral.selection.stream_unit import loss_units, stream_energy
from onnx_spectral.streams import energy_taps, stream_writes
from tests.graphs import GraphBuilder

WIDTH, HIDDEN = 8, 24


def _residual_mlp_then_head() -> onnx.ModelProto:
    """x [N,S,8] -> MatMul [8,24] 'up' -> Relu -> MatMul [24,8] 'down' -> Add bias -> Add x
    'stream' -> MatMul [8,24] 'head_in' -> Relu -> MatMul [24,4] 'head_out' -> y: the hidden
    group of 'up' writes into the stream x, the one of 'head_in' does not."""
    b = GraphBuilder(3)
    hidden = b.node("Relu", [b.node("MatMul", ["x", b.random("w_up", (WIDTH, HIDDEN), WIDTH)],
                                    "up")], "up_relu")
    down = b.node("MatMul", [hidden, b.random("w_down", (HIDDEN, WIDTH), HIDDEN)], "down")
    biased = b.node("Add", [down, b.random("b_down", (WIDTH,))], "down_bias")
    stream = b.node("Add", ["x", biased], "stream")
    head = b.node("Relu", [b.node("MatMul", [stream, b.random("w_in", (WIDTH, HIDDEN), WIDTH)],
                                  "head_in")], "head_relu")
    b.node("MatMul", [head, b.random("w_out", (HIDDEN, 4), HIDDEN)], "y")
    return b.model([("x", ["N", "S", WIDTH])], [("y", ["N", "S", 4])])


def _feeds(samples: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"x": (2.0 * rng.standard_normal((samples, 5, WIDTH))).astype(np.float32)}


def test_a_sink_writes_into_the_stream_through_its_bias_only() -> None:
    graph = GraphIndex(normalize(_residual_mlp_then_head()))
    assert stream_partner(graph, "down") == "x"
    assert stream_partner(graph, "y") is None  # a graph output
    assert stream_partner(graph, "up") is None  # a Relu comes first


def test_the_fused_skip_layer_normalization_sums_the_stream() -> None:
    b = GraphBuilder(1)
    dense = b.node("MatMul", ["x", b.random("w", (WIDTH, WIDTH), WIDTH)], "dense")
    ones, zeros = np.ones(WIDTH, np.float32), np.zeros(WIDTH, np.float32)
    b.nodes.append(onnx.helper.make_node(
        "SkipLayerNormalization", [dense, "x", b.const("gamma", ones), b.const("beta", zeros),
                                   b.const("bias", zeros)], ["y"], name="skip_norm",
        domain="com.microsoft"))
    value = onnx.helper.make_tensor_value_info
    graph_proto = onnx.helper.make_graph(
        b.nodes, "skip", [value("x", onnx.TensorProto.FLOAT, ["N", "S", WIDTH])],
        [value("y", onnx.TensorProto.FLOAT, ["N", "S", WIDTH])], b.initializers)
    model = onnx.helper.make_model(graph_proto, opset_imports=[
        onnx.helper.make_opsetid("", b.opset), onnx.helper.make_opsetid("com.microsoft", 1)])
    graph = GraphIndex(normalize(model))
    assert stream_partner(graph, "dense") == "x"


def test_only_the_group_whose_sink_writes_into_the_stream_gets_an_energy_tap() -> None:
    analysis = analyze(_residual_mlp_then_head())
    producers = {group.id: group.producers for group in analysis.base_groups}
    writes = stream_writes(analysis)
    assert [producers[group] for group in writes] == [("up",)]
    assert [(tap.tensor, tap.channels, tap.sinks) for tap in energy_taps(analysis)] == [
        ("x", 1, ())]


def test_the_stream_energy_is_the_mean_squared_norm_of_its_rows() -> None:
    model = _residual_mlp_then_head()
    feeds = _feeds(64)
    saved = calibrate_statistics(model, [feeds], calib_samples=64, verify_samples=0)
    analysis = analyze(model)
    expected = float(np.mean(np.sum(feeds["x"].astype(np.float64) ** 2, axis=-1)))
    assert stream_energy(analysis, saved.statistics) == pytest.approx(expected, rel=1e-5)
    own = {group.id: 7.0 + group.id for group in analysis.base_groups}
    # one group outside the stream: every group keeps its own unit
    assert loss_units(analysis, saved.statistics, own) == own


def test_groups_that_all_write_into_the_stream_share_its_unit() -> None:
    model = _residual_mlp_then_head()
    analysis = analyze(model, exclude=["head_in"])
    saved = calibrate_statistics(model, [_feeds(64)], calib_samples=64, verify_samples=0,
                                 exclude=("head_in",))
    (group,) = analysis.base_groups
    expected = stream_energy(analysis, saved.statistics)
    assert expected is not None
    assert loss_units(analysis, saved.statistics, {group.id: 7.0}) == {
        group.id: pytest.approx(expected)}
