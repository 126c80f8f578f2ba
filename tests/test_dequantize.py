"""Quantized input models (QDQ, dynamic): pruned as their float model, then quantized again.

The quantized models here are made the way users make theirs, by ONNX Runtime's
`quantize_static` and `quantize_dynamic` (through `onnx_spectral.quantize`), from the tiny float
graphs of tests/graphs.py.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnx_spectral import compress
from onnx_spectral.analysis import analyze
from onnx_spectral.graph.dequantize import dequantize_qdq
from onnx_spectral.graph.dynamic_quant import dequantize_dynamic
from onnx_spectral.quantize import quantize_dynamic_int8, quantize_int8
from onnx_spectral.verify import OutputAgreement, Verification, quantization_warning
from tests import graphs
from tests.graphs import GraphBuilder, conv_sandwich, unary

FAST = {"provider": "cpu", "calib_samples": 48, "verify_samples": 16, "batch_size": 16}


def _x(samples: int = 64, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((samples, 3, 8, 8)).astype(np.float32)}


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, feeds)[0])


def _ops(model: onnx.ModelProto) -> Counter[str]:
    return Counter(node.op_type for node in model.graph.node)


@pytest.fixture(scope="module")
def float_and_qdq() -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """conv1 -> Relu -> conv2 in float, and quantized by ONNX Runtime (per-channel int8
    weights, uint8 activations: the quantizer drops the Relu, whose range the pair clips to)."""
    model = conv_sandwich(unary("Relu"))
    return model, quantize_int8(model, [_x(32, seed=5)])


def test_qdq_model_dequantizes_to_its_float_model(
        float_and_qdq: tuple[onnx.ModelProto, onnx.ModelProto]) -> None:
    model, qdq = float_and_qdq
    assert "Relu" not in _ops(qdq)
    dequantized, found = dequantize_qdq(qdq)
    assert found is not None and found.per_channel
    assert found.weights == 4 and found.activations == _ops(qdq)["DequantizeLinear"] - 4
    assert not {"QuantizeLinear", "DequantizeLinear"} & set(_ops(dequantized))
    onnx.checker.check_model(dequantized, full_check=True)
    feeds = _x(8, seed=1)
    reference, got = _run(model, feeds), _run(dequantized, feeds)
    # the weights carry their int8 rounding, the activations no rounding: close to the float
    # model, and exactly as non-negative after conv1 as the Relu made it
    assert np.abs(got - reference).max() < 0.05 * np.abs(reference).max()


def test_activation_pair_becomes_the_clip_it_applies() -> None:
    """uint8 with zero point 10 and scale 0.1 holds [-1.0, 24.5]: the float model clips there."""
    b = GraphBuilder(seed=2, opset=13)
    scale, zero = b.const("a_scale", np.float32(0.1)), b.const("a_zero", np.uint8(10))
    t = b.conv("x", "conv1", 3, 4)
    t = b.node("DequantizeLinear", [b.node("QuantizeLinear", [t, scale, zero], "q"), scale, zero],
               "dq")
    weight = b.const("w_q", np.full((2, 4, 3, 3), 3, np.int8))
    t = b.node("Conv", [t, b.node("DequantizeLinear", [weight, b.const("w_scale", np.float32(0.5))],
                                  "dq_w")], "conv2", kernel_shape=[3, 3], pads=[1] * 4)
    model = b.model([("x", ["N", 3, 8, 8])], [("conv2", ["N", 2, 8, 8])])
    dequantized, found = dequantize_qdq(model)
    assert found is not None and (found.weights, found.activations) == (1, 1)
    clip = next(node for node in dequantized.graph.node if node.op_type == "Clip")
    bounds = {init.name: onnx.numpy_helper.to_array(init) for init in
              dequantized.graph.initializer}
    assert (bounds[clip.input[1]], bounds[clip.input[2]]) == (np.float32(-1.0), np.float32(24.5))
    feeds = {"x": 40 * _x(4)["x"]}
    np.testing.assert_allclose(_run(dequantized, feeds), _run(model, feeds), atol=0.05 * 1.5 * 36)


def test_weight_only_quantization_is_left_as_it_is() -> None:
    """quantize_static would also quantize the activations: such a model keeps its quantized
    layers whole, and says so."""
    b = GraphBuilder(seed=3, opset=13)
    weight = b.const("w_q", np.ones((4, 3, 3, 3), np.int8))
    t = b.node("Conv", ["x", b.node("DequantizeLinear", [weight, b.const("s", np.float32(0.1))],
                                    "dq_w")], "conv1", kernel_shape=[3, 3], pads=[1] * 4)
    b.conv(t, "conv2", 4, 2)
    weight_only = b.model([("x", ["N", 3, 8, 8])], [("conv2", ["N", 2, 8, 8])])
    assert dequantize_qdq(weight_only) == (weight_only, None)
    assert any("is quantized: DequantizeLinear node 'dq_w'" in reason
               for reason in analyze(weight_only).kept_layers)


def test_qdq_model_is_pruned_and_quantized_again(
        float_and_qdq: tuple[onnx.ModelProto, onnx.ModelProto]) -> None:
    _, qdq = float_and_qdq
    assert all(group.frozen for group in analyze(qdq).groups)  # quantized, as it comes
    compressed, report = compress(qdq, _x(), ratio=0.5, **FAST)
    onnx.checker.check_model(compressed, full_check=True)
    assert {"QuantizeLinear", "DequantizeLinear"} <= set(_ops(compressed))
    assert report.options["quantize"] == "int8" and "int8" in report.sizes
    assert report.cost_after.macs < 0.75 * report.cost_before.macs
    assert any("QDQ-quantized" in note and "quantized again to int8" in note
               for note in report.notes)
    assert report.verification is not None and report.float_verification is not None
    feeds = _x(8, seed=3)
    assert _run(compressed, feeds).shape == _run(qdq, feeds).shape

    floating, report = compress(qdq, _x(), ratio=0.5, quantize="none", **FAST)
    assert not {"QuantizeLinear", "DequantizeLinear"} & set(_ops(floating))
    assert any("written in float (--quantize none)" in note for note in report.notes)


QUANTIZED_GRAPHS = {
    "batchnorm": lambda: conv_sandwich(graphs.batchnorm),
    "depthwise": lambda: conv_sandwich(graphs.depthwise),
    "grouped": lambda: conv_sandwich(graphs.grouped_conv, channels=8),
    "max-pool": lambda: conv_sandwich(graphs.pool("MaxPool"), out_size=4),
    "residual": graphs.residual_block,
    "flatten-gemm": lambda: graphs.flatten_head("flatten"),
    "transposed-head": lambda: graphs.flatten_head("transpose"),
    "concat": graphs.concat_channels,
    "split": graphs.split_halves_combined,
}


@pytest.mark.parametrize("name", sorted(QUANTIZED_GRAPHS))
def test_quantized_graphs_compress_validly(name: str) -> None:
    """The op-handler graphs, quantized by quantize_static, then compressed at --flops 0.6:
    a model that passes the checker, runs, keeps its outputs, and is int8 again."""
    model = QUANTIZED_GRAPHS[name]()
    x = {"x": np.random.default_rng(0).standard_normal(
        (64, *(d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:])),
        dtype=np.float32)}
    qdq = quantize_int8(model, [{"x": x["x"][:32]}])
    compressed, report = compress(qdq, x, flops=0.6, **FAST)
    onnx.checker.check_model(compressed, full_check=True)
    assert "DequantizeLinear" in _ops(compressed)
    assert report.cost_after.macs <= 0.6 * report.cost_before.macs + 1
    assert [value.name for value in compressed.graph.output] == [
        value.name for value in qdq.graph.output]
    feeds = {"x": x["x"][:4]}
    assert _run(compressed, feeds).shape == _run(qdq, feeds).shape


# ---------------------------------------------------------------------------------------------
# dynamic quantization (quantize_dynamic: ConvInteger, MatMulInteger, DynamicQuantizeLSTM)


def _conv_lstm() -> onnx.ModelProto:
    """x [N,2,3,4] -> Conv 'conv1' (5) -> Reshape [0, 5, -1] -> Transpose -> LSTM 'rnn'
    (hidden 3) -> Y_h -> MatMul 'head' (4) -> y [1, N, 4]."""
    b = GraphBuilder(4)
    t = b.conv("x", "conv1", 2, 5)
    flat = b.node("Reshape", [t, b.const("shape", np.array([0, 5, -1], np.int64))], "reshape")
    sequence = b.node("Transpose", [flat], "transpose", perm=[2, 0, 1])
    b.node("LSTM", [sequence, b.random("W", (1, 12, 5), fan_in=5),
                    b.random("R", (1, 12, 3), fan_in=3), b.random("B", (1, 24))],
           "rnn", outputs=2, hidden_size=3)
    b.node("MatMul", ["rnn_out1", b.random("head_w", (3, 4), fan_in=3)], "head")
    return b.model([("x", ["N", 2, 3, 4])], [("head", [1, "N", 4])])


@pytest.mark.parametrize("build", [lambda: conv_sandwich(unary("Relu")), _conv_lstm],
                         ids=["convs", "conv-lstm-matmul"])
def test_dynamically_quantized_model_dequantizes_to_its_float_model(build: Callable) -> None:
    model = build()
    dynamic = quantize_dynamic_int8(model)
    integer_ops = {"ConvInteger", "MatMulInteger", "DynamicQuantizeLSTM"}
    assert integer_ops & set(_ops(dynamic))
    floating, found = dequantize_dynamic(dynamic)
    assert found is not None and found.layers == sum(_ops(dynamic)[op] for op in integer_ops)
    assert not integer_ops & set(_ops(floating))
    assert {op: _ops(model)[op] for op in ("Conv", "LSTM", "MatMul")} == {
        op: _ops(floating)[op] for op in ("Conv", "LSTM", "MatMul")}
    onnx.checker.check_model(floating, full_check=True)
    x = model.graph.input[0]
    dims = [d.dim_value for d in x.type.tensor_type.shape.dim[1:]]
    feeds = {x.name: np.random.default_rng(1).standard_normal((4, *dims)).astype(np.float32)}
    reference, got = _run(dynamic, feeds), _run(floating, feeds)
    assert np.abs(got - reference).max() < 0.05 * np.abs(reference).max()


def test_dynamically_quantized_model_is_pruned_and_quantized_again() -> None:
    dynamic = quantize_dynamic_int8(conv_sandwich(unary("Relu")))
    compressed, report = compress(dynamic, _x(), ratio=0.5, **FAST)
    onnx.checker.check_model(compressed, full_check=True)
    assert "ConvInteger" in _ops(compressed)
    assert report.options["quantize"] == "dynamic" and "dynamic" in report.sizes
    assert report.cost_after.macs < 0.75 * report.cost_before.macs
    assert any("dynamically quantized" in note for note in report.notes)
    assert _run(compressed, _x(2))[0].shape == _run(dynamic, _x(2))[0].shape


def _verification(cosine: float, top1: float | None) -> Verification:
    return Verification(8, (OutputAgreement("y", 0.1, cosine, top1),))


def test_a_quantization_that_costs_agreement_is_a_warning() -> None:
    floating = _verification(0.99, 0.95)
    assert quantization_warning(_verification(0.98, 0.93), floating, "int8") is None
    assert quantization_warning(_verification(0.98, 0.80), floating, "dynamic") == (
        "quantizing the pruned model (dynamic) lowers the top-1 agreement of output 'y' from "
        "0.95 to 0.8 on held-out samples; --quantize none writes the float model")
    assert "cosine" in (quantization_warning(_verification(0.5, None), floating, "int8") or "")
    assert quantization_warning(None, floating, "int8") is None
