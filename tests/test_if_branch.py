"""A model whose layers are all inside one If (Silero VAD's form): the branch the calibration
data takes is pruned, the other kept whole, and the model written keeps its If."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from onnx_spectral import compress
from onnx_spectral.cli import main
from onnx_spectral.graph.if_branch import layers_only_in_if, take_branch
from tests import graphs
from tests.graphs import GraphBuilder

RATE = 16000


def _branch(seed: int, name: str, hidden: int) -> tuple[onnx.GraphProto, list[onnx.TensorProto]]:
    """x -> Conv '{name}1' (hidden) -> Relu -> Conv '{name}2' (4) -> out, as an If branch body
    reading x from the outer scope; its weights are main-graph initializers (read from the
    outer scope too, as exporters write them)."""
    b = GraphBuilder(seed)
    t = b.node("Relu", [b.conv("x", f"{name}1", 3, hidden)], f"{name}_relu")
    out = b.conv(t, f"{name}2", hidden, 4)
    body = helper.make_graph(b.nodes, name, [],
                             [helper.make_tensor_value_info(out, TensorProto.FLOAT,
                                                            ["N", 4, 6, 6])])
    return body, b.initializers


def _vad_like(with_outer_conv: bool = False) -> onnx.ModelProto:
    """sr (scalar) == 16000 ? then-branch (8 hidden channels) : else-branch (6) -> If -> y."""
    then_body, then_weights = _branch(1, "fast", 8)
    else_body, else_weights = _branch(2, "slow", 6)
    nodes = [helper.make_node("Equal", ["sr", "rate"], ["is_fast"], name="pick"),
             helper.make_node("If", ["is_fast"], ["y"], name="by_rate",
                              then_branch=then_body, else_branch=else_body)]
    weights = [*then_weights, *else_weights,
               onnx.numpy_helper.from_array(np.array(RATE, np.int64), "rate")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6]),
              helper.make_tensor_value_info("sr", TensorProto.INT64, [])]
    if with_outer_conv:
        b = GraphBuilder(3)
        b.conv("x0", "outer", 3, 3)
        nodes.insert(0, b.nodes[0])
        weights += b.initializers
        inputs.append(helper.make_tensor_value_info("x0", TensorProto.FLOAT, ["N", 3, 6, 6]))
    graph = helper.make_graph(nodes, "vad_like", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT,
                                                             ["N", 4, 6, 6])], weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _runs(count: int, rate: int = RATE, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((1, 3, 6, 6)).astype(np.float32),
             "sr": np.array(rate, np.int64)} for _ in range(count)]


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(["y"], feeds)[0])


def _weight(graph: onnx.GraphProto, name: str) -> np.ndarray:
    return next(onnx.numpy_helper.to_array(tensor) for tensor in graph.initializer
                if name in tensor.name)


def test_only_a_model_whose_layers_are_all_in_one_if_is_taken_apart() -> None:
    assert layers_only_in_if(_vad_like()) == 1
    assert layers_only_in_if(_vad_like(with_outer_conv=True)) is None
    model = _vad_like()
    inlined, taken = take_branch(model, lambda: _runs(1, rate=8000)[0])
    assert taken is not None and taken.branch == "else_branch"
    assert [node.op_type for node in inlined.graph.node].count("Conv") == 2
    assert "If" not in {node.op_type for node in inlined.graph.node}


def test_the_branch_taken_is_pruned_and_the_other_kept_whole() -> None:
    model = _vad_like()
    compressed, report = compress(model, _runs(96), ratio=0.5, provider="cpu",
                                  calib_samples=64, verify_samples=16)
    onnx.checker.check_model(compressed, full_check=True)
    if_node = next(node for node in compressed.graph.node if node.op_type == "If")
    branches = {attribute.name: attribute.g for attribute in if_node.attribute}
    then_reads = {name for node in branches["then_branch"].node for name in node.input}
    weight = next(name for name in then_reads if "fast1_w" in name)
    assert weight.startswith("by_rate/then_branch/")  # renamed apart from the old weights
    assert _weight(compressed.graph, weight).shape[0] == 4  # 8 -> 4 channels
    assert not any(tensor.name.startswith("fast") for tensor in compressed.graph.initializer)
    np.testing.assert_array_equal(_weight(compressed.graph, "slow1_w"),
                                  _weight(model.graph, "slow1_w"))
    assert report.cost_after.macs < 0.75 * report.cost_before.macs
    assert any("If node 'by_rate'" in note and "then_branch" in note for note in report.notes)
    slow = _runs(4, rate=8000, seed=1)
    for feeds in slow:  # the branch the data did not take computes exactly as before
        np.testing.assert_array_equal(_run(compressed, feeds), _run(model, feeds))
    fast = _runs(8, seed=2)
    got = np.concatenate([_run(compressed, feeds) for feeds in fast]).ravel()
    want = np.concatenate([_run(model, feeds) for feeds in fast]).ravel()
    assert got @ want / np.linalg.norm(got) / np.linalg.norm(want) > 0.9


def test_analyze_says_compress_prunes_the_branch_taken(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "vad_like.onnx"
    onnx.save_model(_vad_like(), str(path))
    assert main(["analyze", str(path)]) == 0
    assert ("the layers are all inside If node 'by_rate': compressing with calibration data "
            "prunes the branch that data takes") in capsys.readouterr().out


def _in_if(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` run inside both branches of an If on a new scalar input 'sr' (== 16000): the
    branches read the inputs and initializers from the outer scope."""
    graph = model.graph
    branches = {}
    for branch in ("then_branch", "else_branch"):
        writers = [helper.make_node("Identity", [value.name], [f"{value.name}_{branch}"],
                                    name=f"{value.name}_{branch}") for value in graph.output]
        outputs = []
        for value in graph.output:
            inner = onnx.ValueInfoProto()
            inner.CopyFrom(value)
            inner.name = f"{value.name}_{branch}"
            outputs.append(inner)
        branches[branch] = helper.make_graph([*graph.node, *writers], branch, [], outputs)
    if_node = helper.make_node("If", ["is_fast"], [value.name for value in graph.output],
                               name="by_rate", **branches)
    wrapped = helper.make_graph(
        [helper.make_node("Equal", ["sr", "rate"], ["is_fast"], name="pick"), if_node],
        "wrapped", [*graph.input, helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
        list(graph.output),
        [*graph.initializer, onnx.numpy_helper.from_array(np.array(RATE, np.int64), "rate")])
    result = helper.make_model(wrapped, opset_imports=list(model.opset_import))
    onnx.checker.check_model(result, full_check=True)
    return result


WRAPPED = {
    "sandwich": lambda: graphs.conv_sandwich(graphs.unary("Relu")),
    "batchnorm": lambda: graphs.conv_sandwich(graphs.batchnorm),
    "grouped": lambda: graphs.conv_sandwich(graphs.grouped_conv, channels=8),
    "residual": graphs.residual_block,
    "transposed-head": lambda: graphs.flatten_head("transpose"),
    "concat": graphs.concat_channels,
    "split": graphs.split_halves_combined,
    "gemm-mlp": lambda: graphs.gemm_mlp(1),
    "matmul-mlp": lambda: graphs.matmul_mlp(3),
    "flatten-head": lambda: graphs.flatten_head("flatten"),
}


@pytest.mark.parametrize("name", sorted(WRAPPED))
def test_graphs_inside_an_if_compress_validly(name: str) -> None:
    """The op-handler graphs wrapped in an If: compressed at --flops 0.6, a model that passes
    the checker and runs both branches with the original outputs, the other branch exact."""
    model = _in_if(WRAPPED[name]())
    x = model.graph.input[0]
    dims = [d.dim_value for d in x.type.tensor_type.shape.dim[1:]]
    rng = np.random.default_rng(0)
    runs = [{x.name: rng.standard_normal((1, *dims)).astype(np.float32),
             "sr": np.array(RATE, np.int64)} for _ in range(64)]
    compressed, report = compress(model, runs, flops=0.6, provider="cpu", calib_samples=48,
                                  verify_samples=16)
    onnx.checker.check_model(compressed, full_check=True)
    assert report.cost_after.macs <= 0.6 * report.cost_before.macs + 1
    session, reference = (ort.InferenceSession(graph.SerializeToString(),
                                               providers=["CPUExecutionProvider"])
                          for graph in (compressed, model))
    names = [value.name for value in model.graph.output]
    for rate in (RATE, 8000):
        feeds = {**runs[0], "sr": np.array(rate, np.int64)}
        got, want = session.run(names, feeds), reference.run(names, feeds)
        assert [value.shape for value in got] == [value.shape for value in want]
        if rate != RATE:
            for value, expected in zip(got, want, strict=True):
                np.testing.assert_array_equal(value, expected)
