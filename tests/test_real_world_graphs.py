"""Constructs of real exported graphs, on tiny graphs built in code: initializers listed as graph
inputs (IR 3), shapes only ONNX Runtime can tell, If subgraphs reading outer tensors, QDQ
quantization and symbolic H/W."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from graphs import GraphBuilder, conv_sandwich
from onnx import TensorProto, helper, numpy_helper

from onnx_spectral import compress
from onnx_spectral.analysis import analyze
from onnx_spectral.calibration.sources import model_input_specs, open_calibration
from onnx_spectral.errors import GraphError, UnsupportedGraphError
from onnx_spectral.graph.model import GraphIndex, initializer_inputs_note, normalize
from onnx_spectral.graph.shapes import (
    BATCH_DIM,
    concrete_shapes,
    fill_missing_shapes,
    missing_shapes,
    observed_shapes,
)
from onnx_spectral.graph.subgraphs import IMPLICIT_POSITION, outer_scope_names

FAST = {"calib_samples": 16, "verify_samples": 4, "batch_size": 8, "compensation": False,
        "refit": False}


def _x(samples: int = 16, size: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((samples, 3, size, size)).astype(np.float32)}


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return [np.asarray(value) for value in session.run(None, feeds)]


def _group_of(analysis_groups: tuple, producer: str):  # type: ignore[no-untyped-def]
    return next(group for group in analysis_groups if producer in group.producers)


# ---------------------------------------------------------------------------------------------
# IR 3: every initializer is also a graph input


def _ir3_sandwich() -> onnx.ModelProto:
    model = conv_sandwich(opset=9)
    model.ir_version = 3
    for tensor in model.graph.initializer:
        model.graph.input.append(
            helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    onnx.checker.check_model(model)
    return model


def test_ir3_initializer_inputs_are_constants_by_default() -> None:
    model = _ir3_sandwich()
    analysis = analyze(model)
    assert _group_of(analysis.groups, "conv1").prunable
    assert [value.name for value in analysis.graph.model.graph.input] == ["x"]
    assert analysis.graph.model.ir_version == 4
    assert [spec.name for spec in model_input_specs(model)] == ["x"]
    assert initializer_inputs_note(model) == (
        "4 initializers listed as graph inputs are treated as constants (weights no caller "
        "overrides); the output lists them as initializers only")
    assert initializer_inputs_note(conv_sandwich()) is None


def test_ir3_model_compresses_to_a_valid_model_with_the_same_outputs_at_full_width() -> None:
    model = _ir3_sandwich()
    compressed, _ = compress(model, _x(), ratio=1.0, ridge=1e-9, **FAST)
    onnx.checker.check_model(compressed, full_check=True)
    assert [value.name for value in compressed.graph.input] == ["x"]
    feeds = {"x": _x(2, seed=1)["x"]}
    np.testing.assert_allclose(_run(compressed, feeds)[0], _run(model, feeds)[0], atol=1e-4)
    smaller, report = compress(model, _x(), ratio=0.5, **FAST)
    assert any("treated as constants" in note for note in report.notes)
    weights = {t.name: t.dims for t in smaller.graph.initializer}
    conv1 = next(node for node in smaller.graph.node if node.name == "conv1")
    assert list(weights[conv1.input[1]])[0] == 4  # ceil(0.5 * 7)
    assert _run(smaller, feeds)[0].shape == (2, 5, 8, 8)


def test_ir3_initializer_inputs_kept_as_inputs_freeze_their_groups() -> None:
    model = _ir3_sandwich()
    analysis = analyze(model, initializer_inputs="input")
    group = _group_of(analysis.groups, "conv1")
    assert group.frozen
    assert "Conv node 'conv1' reads ['conv1_w', 'conv1_b'], initializers listed as graph " \
           "inputs, which a caller may override" in group.frozen[0]
    assert [value.name for value in analysis.graph.model.graph.input][0] == "x"
    assert "may override" in str(initializer_inputs_note(model, "input"))
    stream = open_calibration(_x(4), model_input_specs(model))
    assert list(next(stream.take(4, 4))) == ["x"]
    with pytest.raises(UnsupportedGraphError, match="may override"):
        compress(model, _x(), ratio=0.5, initializer_inputs="input", require_prunable=True,
                 **FAST)


# ---------------------------------------------------------------------------------------------
# Shapes shape inference cannot tell


def _lost_shape_model() -> onnx.ModelProto:
    """A Reshape whose target has a length inference cannot tell (Compress): no rank after it.

        x [N,3,8,8] -> conv1 [7] -> Reshape(conv1, Compress(Shape(conv1), [1,1,1,1]))
            -> conv_a [6] -> relu_a --\
            -> conv_b [6] ------------ Add 'add' -> conv2 [5] -> y
    """
    b = GraphBuilder(seed=3)
    t = b.conv("x", "conv1", 3, 7)
    target = b.node("Compress", [b.node("Shape", [t], "shape"),
                                 b.const("mask", np.array([True] * 4))], "kept_dims", axis=0)
    reshaped = b.node("Reshape", [t, target], "reshape")
    relu = b.node("Relu", [b.conv(reshaped, "conv_a", 7, 6)], "relu_a")
    b.conv(b.node("Add", [relu, b.conv(reshaped, "conv_b", 7, 6)], "add"), "conv2", 6, 5)
    return b.model([("x", ["N", 3, 8, 8])], [("conv2", ["N", 5, 8, 8])])


def test_lost_shapes_without_data_name_the_tensor_and_the_remedy() -> None:
    model = _lost_shape_model()
    assert "reshape" in missing_shapes(normalize(model))
    with pytest.raises(GraphError, match="'relu_a'.*calibration data gives the shapes"):
        analyze(model)


def test_lost_shapes_come_from_a_run_with_the_batch_dim_symbolic() -> None:
    model = normalize(_lost_shape_model())
    filled = fill_missing_shapes(model, _x(3))
    assert "reshape" in filled and missing_shapes(model) == ()
    dims = {value.name: value.type.tensor_type.shape.dim for value in model.graph.value_info}
    assert dims["reshape"][0].dim_param == BATCH_DIM
    assert [d.dim_value for d in dims["reshape"][1:]] == [7, 8, 8]
    assert GraphIndex(model).shapes["relu_a"] == (None, 6, 8, 8)


def test_analysis_with_shape_feeds_prunes_through_the_lost_shape() -> None:
    model = _lost_shape_model()
    asked = []

    def feeds() -> dict[str, np.ndarray]:
        asked.append(1)
        return _x(2)

    analysis = analyze(model, shape_feeds=feeds)
    assert asked == [1]
    assert _group_of(analysis.groups, "conv_a").prunable
    assert _group_of(analysis.groups, "conv_a") == _group_of(analysis.groups, "conv_b")
    analyze(conv_sandwich(), shape_feeds=lambda: pytest.fail("no shape was missing"))


def test_compress_fills_lost_shapes_from_the_calibration_data() -> None:
    model = _lost_shape_model()
    compressed, report = compress(model, _x(), ratio=0.5, **FAST)
    onnx.checker.check_model(compressed, full_check=True)
    assert any(group.kept < group.channels for group in report.groups)
    assert _run(compressed, _x(2, seed=1))[0].shape == _run(model, _x(2, seed=1))[0].shape


def test_peek_gives_the_first_samples_without_consuming_them() -> None:
    data = _x(5)
    stream = open_calibration([{"x": data["x"][:2]}, {"x": data["x"][2:]}],
                              model_input_specs(conv_sandwich()))
    np.testing.assert_array_equal(stream.peek(3)["x"], data["x"][:3])
    np.testing.assert_array_equal(stream.peek()["x"], data["x"][:1])
    batches = list(stream.take(5, 4))
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in batches]), data["x"])


def test_observed_shapes_read_intermediate_tensors() -> None:
    shapes = observed_shapes(conv_sandwich(), _x(2), ["conv1"])
    assert shapes == {"conv1": (2, 7, 8, 8)}


def _symbolic_hw_model() -> onnx.ModelProto:
    b = GraphBuilder(seed=4)
    t = b.conv("x", "conv1", 3, 6)
    t = b.node("Relu", [t], "relu")
    b.conv(t, "conv2", 6, 5)
    return b.model([("x", ["N", 3, "H", "W"])], [("conv2", ["N", 5, "H", "W"])])


def test_concrete_shapes_fix_symbolic_dims() -> None:
    shapes = concrete_shapes(_symbolic_hw_model(), {"x": (2, 3, 10, 12)})
    assert shapes["relu"] == (2, 6, 10, 12)
    assert shapes["conv1_w"] == (6, 3, 3, 3)
    lost = concrete_shapes(_lost_shape_model(), _x(3))
    assert lost["reshape"] == (3, 7, 8, 8)  # from the ONNX Runtime run
    assert concrete_shapes(_lost_shape_model(), {"x": (1, 3, 8, 8)})["add"] == (1, 6, 8, 8)


def test_symbolic_hw_analyze_and_compress() -> None:
    model = _symbolic_hw_model()
    analysis = analyze(model)
    assert _group_of(analysis.groups, "conv1").prunable
    compressed, _ = compress(model, _x(), ratio=0.5, **FAST)
    out = _run(compressed, {"x": _x(1, size=11)["x"]})[0]
    assert out.shape == (1, 5, 11, 11)


# ---------------------------------------------------------------------------------------------
# If subgraphs


def _if_model(read_activation: bool) -> onnx.ModelProto:
    """x -> conv1 -> relu -> conv2 -> y, and If 'branch' (condition a Constant) whose branches
    read the outer Constant 'k' and, when `read_activation`, relu's output."""
    b = GraphBuilder(seed=5)
    t = b.conv("x", "conv1", 3, 7)
    relu = b.node("Relu", [t], "relu")
    b.conv(relu, "conv2", 7, 5)
    b.nodes.append(helper.make_node("Constant", [], ["cond"], name="cond",
                                    value=numpy_helper.from_array(np.array(True))))
    b.nodes.append(helper.make_node("Constant", [], ["k"], name="k",
                                    value=numpy_helper.from_array(np.float32([2.0]))))
    read = relu if read_activation else "x"

    def branch(name: str, op: str) -> onnx.GraphProto:
        node = helper.make_node(op, [read, "k"], [f"{name}_out"], name=f"{name}_op")
        pooled = helper.make_node("ReduceMean", [f"{name}_out"], [f"{name}_y"],
                                  name=f"{name}_mean")
        return helper.make_graph([node, pooled], name, [], [
            helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, [1, 1, 1, 1])])

    b.nodes.append(helper.make_node("If", ["cond"], ["z"], name="branch",
                                    then_branch=branch("then", "Mul"),
                                    else_branch=branch("else", "Add")))
    return b.model([("x", ["N", 3, 8, 8])], [("conv2", ["N", 5, 8, 8]), ("z", [1, 1, 1, 1])])


def test_outer_scope_reads_are_consumers_and_freeze_the_group() -> None:
    model = _if_model(read_activation=True)
    node = next(node for node in model.graph.node if node.op_type == "If")
    assert outer_scope_names(node) == ("relu", "k")
    graph = GraphIndex(normalize(model))
    assert [(n.name, p) for n, p in graph.consumers["relu"]] == [
        ("conv2", 0), ("branch", IMPLICIT_POSITION)]
    group = _group_of(analyze(model).groups, "conv1")
    assert "used inside a subgraph of If node 'branch'" in group.frozen


def test_constants_read_only_by_subgraphs_survive_normalize_and_rewrite() -> None:
    model = _if_model(read_activation=False)
    normalized = normalize(model)
    assert "k" in {tensor.name for tensor in normalized.graph.initializer}
    compressed, _ = compress(model, _x(), ratio=0.5, **FAST)
    onnx.checker.check_model(compressed, full_check=True)
    feeds = {"x": _x(2, seed=2)["x"]}
    np.testing.assert_allclose(_run(compressed, feeds)[1], _run(model, feeds)[1], rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# QDQ quantization


def _qdq_model(activation_qdq: bool) -> onnx.ModelProto:
    """x -> conv0 -> relu [-> Q -> DQ] -> conv1 (weight DequantizeLinear of int8) -> conv2 -> y."""
    b = GraphBuilder(seed=6, opset=13)
    t = b.node("Relu", [b.conv("x", "conv0", 3, 6)], "relu0")
    if activation_qdq:
        scale, zero = b.const("a_scale", np.float32(0.05)), b.const("a_zero", np.int8(0))
        t = b.node("DequantizeLinear", [b.node("QuantizeLinear", [t, scale, zero], "q_act"),
                                        scale, zero], "dq_act")
    weight = b.const("conv1_wq", np.random.default_rng(0).integers(-100, 100, (4, 6, 3, 3),
                                                                    dtype=np.int8))
    dq = b.node("DequantizeLinear", [weight, b.const("w_scale", np.float32(0.01)),
                                     b.const("w_zero", np.int8(0))], "dq_w")
    t = b.node("Conv", [t, dq], "conv1", kernel_shape=[3, 3], pads=[1] * 4)
    b.conv(t, "conv2", 4, 5)
    return b.model([("x", ["N", 3, 8, 8])], [("conv2", ["N", 5, 8, 8])])


def test_quantized_weight_freezes_the_group_it_reads() -> None:
    model = _qdq_model(activation_qdq=False)
    analysis = analyze(model)
    assert "dq_w" in analysis.graph.nodes_by_name  # never folded into a float weight
    assert _group_of(analysis.groups, "conv0").frozen == (
        "weight 'dq_w' of Conv node 'conv1' is quantized: DequantizeLinear node 'dq_w' "
        "(quantized layers are kept whole)",)
    with pytest.raises(UnsupportedGraphError, match="is quantized: DequantizeLinear"):
        compress(model, _x(), require_prunable=True, reconstruction_layers="none", **FAST)
    assert analysis.kept_layers == (
        "weight 'dq_w' of Conv node 'conv1' is quantized: DequantizeLinear node 'dq_w' "
        "(quantized layers are kept whole)",)


def test_quantized_activation_freezes_the_group_it_reads() -> None:
    analysis = analyze(_qdq_model(activation_qdq=True))
    assert _group_of(analysis.groups, "conv0").frozen == (
        "quantized: QuantizeLinear node 'q_act' reads it",)


def test_lost_shapes_are_filled_with_a_scalar_input_fed_as_it_is() -> None:
    """A scalar input (a sample rate, a threshold) is fed whole, not cut to one sample."""
    model = _lost_shape_model()
    scale = helper.make_tensor_value_info("scale", TensorProto.FLOAT, [])
    model.graph.input.append(scale)
    x_use = next(node for node in model.graph.node if node.name == "conv1")
    model.graph.node.insert(0, helper.make_node("Mul", ["x", "scale"], ["x_scaled"],
                                                name="scale_x"))
    x_use.input[0] = "x_scaled"
    normalized = normalize(model)
    filled = fill_missing_shapes(normalized, {**_x(3), "scale": np.array(2.0, np.float32)})
    assert "reshape" in filled and missing_shapes(normalized) == ()


def test_integer_linear_layers_refuse_a_budget_naming_them() -> None:
    """x -> ConvInteger 'qconv' -> Cast -> y: no float MACs to keep a share of."""
    x = helper.make_tensor_value_info("x", TensorProto.UINT8, ["N", 2, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 4, 4])
    weight = numpy_helper.from_array(np.ones((3, 2, 1, 1), np.uint8), "w")
    graph = helper.make_graph(
        [helper.make_node("ConvInteger", ["x", "w"], ["acc"], name="qconv"),
         helper.make_node("Cast", ["acc"], ["y"], to=TensorProto.FLOAT, name="cast")],
        "integer", [x], [y], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    data = {"x": np.ones((8, 2, 4, 4), np.uint8)}
    with pytest.raises(UnsupportedGraphError, match="integer .quantized. ops, kept whole: "
                                                    "ConvInteger 'qconv'"):
        compress(model, data, flops=0.5, calib_samples=6, verify_samples=2, provider="cpu")


def test_sessions_ignore_value_info_read_from_one_sample() -> None:
    """r = Relu(x [N, W]) with value_info r: [1, 4] (a size read from one sample): ONNX Runtime
    would fold Shape(r) into [1, 4] and fail on W = 6; open_session leaves value_info out, and
    the model keeps it."""
    from onnx_spectral.graph.sessions import open_session
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Shape", ["r"], ["s"], name="shape"),
             helper.make_node("Reshape", ["r", "s"], ["y"], name="reshape")]
    graph = helper.make_graph(
        nodes, "sized", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "W"])],
        value_info=[helper.make_tensor_value_info("r", TensorProto.FLOAT, [1, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = open_session(model, "cpu")
    assert session.run(None, {"x": np.ones((1, 6), np.float32)})[0].shape == (1, 6)
    assert [value.name for value in model.graph.value_info] == ["r"]


def test_a_declared_output_shape_the_graph_contradicts_is_not_fatal() -> None:
    """y is declared [N, 8] but the graph reshapes to [N, 2, 4] (ONNX Runtime ignores the
    declaration, as ddddocr's OCR model relies on): normalize infers without it and keeps it."""
    nodes = [helper.make_node("Reshape", ["x", "target"], ["y"], name="reshape")]
    graph = helper.make_graph(
        nodes, "contradicted", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
        [numpy_helper.from_array(np.array([0, 2, 4], np.int64), "target")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    normalized = normalize(model)
    declared = normalized.graph.output[0].type.tensor_type.shape.dim
    assert [dim.dim_param or dim.dim_value for dim in declared] == ["N", 8]
    inferred = {value.name: value for value in normalized.graph.value_info}["y"]
    assert len(inferred.type.tensor_type.shape.dim) == 3
