"""Reconstruction layers: a producer whose outputs cannot be pruned computes fewer of them, and an
added layer rebuilds the rest (openWakeWord's Gemm into a LayerNorm, a Conv into a reduction
over its channels, a MatMul into a graph output)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnx_spectral import compress
from onnx_spectral.analysis import analyze
from onnx_spectral.cost import model_cost
from onnx_spectral.reconstruction_layers import add_reconstruction_layers, fold_whole_layers
from tests.graphs import GraphBuilder
from tests.mac_count import independent_macs

FEATURES, OUTPUTS, RANK = 48, 16, 6


def _gemm_into_layer_norm(features: int = FEATURES, shared_weight: bool = False
                          ) -> onnx.ModelProto:
    """x [N, F] -> Gemm 'wide' (F -> 16) -> LayerNormalization -> Relu -> Gemm 'head' (16 -> 4)
    -> y: 'wide' holds most of the MACs and its outputs reach a normalization over them."""
    b = GraphBuilder(3)
    t = b.gemm("x", "wide", features, OUTPUTS)
    if shared_weight:
        b.node("Gemm", ["x", "wide_w", "wide_b"], "twin", transB=1)
    t = b.node("LayerNormalization", [t, b.const("gamma", np.ones(OUTPUTS)),
                                      b.const("beta", np.zeros(OUTPUTS))], "norm", axis=-1)
    t = b.node("Relu", [t], "relu")
    y = b.gemm(t, "head", OUTPUTS, 4)
    outputs = [(y, ["N", 4])] + ([("twin", ["N", OUTPUTS])] if shared_weight else [])
    return b.model([("x", ["N", features])], outputs)


def _conv_into_channel_mean() -> onnx.ModelProto:
    """x [N, 8, 6, 6] -> Conv 'wide' (8 -> 12, 3x3, no padding) -> ReduceMean over channels -> y:
    a reduction over the channels freezes them; 72 features per output against 12 outputs."""
    b = GraphBuilder(4)
    t = b.conv("x", "wide", 8, 12, pad=0)
    y = b.node("ReduceMean", [t], "mean", axes=[1], keepdims=1)
    return b.model([("x", ["N", 8, 6, 6])], [(y, ["N", 1, 4, 4])])


def _matmul_into_output() -> onnx.ModelProto:
    """x [N, 5, F] -> MatMul 'wide' (F -> 16) -> y (a graph output, so its width stays)."""
    b = GraphBuilder(5)
    y = b.node("MatMul", ["x", b.random("wide_w", (FEATURES, OUTPUTS), fan_in=FEATURES)], "wide")
    return b.model([("x", ["N", 5, FEATURES])], [(y, ["N", 5, OUTPUTS])])


def _low_rank_data(shape: tuple[int, ...], axis: int = 0, count: int = 256, seed: int = 0
                   ) -> list[dict[str, np.ndarray]]:
    """Samples of `shape` whose channels (`axis`) span RANK directions, the same at every other
    position (so that RANK of a layer's outputs determine the rest), plus a little noise."""
    rng = np.random.default_rng(seed)
    channels = shape[axis]
    basis = rng.standard_normal((RANK, channels))
    rows = shape[:-1] if axis == -1 else ()
    x = rng.standard_normal((count, *rows, RANK)) @ basis
    x = x.reshape(count, *rows, channels, *([1] * (len(shape) - 1 - len(rows))))
    x = np.broadcast_to(x, (count, *shape)) + 0.001 * rng.standard_normal((count, *shape))
    return [{"x": x.astype(np.float32)}]


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


@pytest.mark.parametrize(("build", "shape", "axis", "added", "dims", "mode"), [
    (_gemm_into_layer_norm, (FEATURES,), 0, "Gemm", [8, OUTPUTS], "auto"),  # B [kept, outputs]
    (_conv_into_channel_mean, (8, 6, 6), 0, "Conv", [12, 6, 1, 1], "auto"),  # W [out, kept, 1, 1]
    (_matmul_into_output, (5, FEATURES), -1, "MatMul", [8, OUTPUTS], "all"),
])
def test_a_frozen_wide_layer_computes_half_its_outputs_and_rebuilds_the_rest(
        build, shape, axis, added, dims, mode) -> None:
    model = build()
    data = _low_rank_data(shape, axis)
    pruned, report = compress(model, data, ratio=0.5, round_to=1, calib_samples=192,
                              verify_samples=64, reconstruction_layers=mode)
    onnx.checker.check_model(pruned, full_check=True)
    layer = next(node for node in pruned.graph.node if node.name == "wide/reconstruction")
    assert layer.op_type == added
    weights = {tensor.name: tensor for tensor in pruned.graph.initializer}
    assert list(weights[layer.input[1]].dims) == dims
    assert [value.name for value in pruned.graph.output] == \
        [value.name for value in model.graph.output]
    feeds = {"x": data[0]["x"][192:]}
    for before, after in zip(_run(model, feeds), _run(pruned, feeds), strict=True):
        assert after.shape == before.shape
        assert np.abs(after - before).max() < 0.05 * np.abs(before).max()
    assert report.cost_after.macs < report.cost_before.macs
    assert any("reconstruction layer 'wide/reconstruction'" in note for note in report.notes)


def test_a_flops_budget_counts_the_added_layer_and_is_a_fraction_of_the_original() -> None:
    model = _gemm_into_layer_norm()
    data = _low_rank_data((FEATURES,))
    pruned, report = compress(model, data, flops=0.6, calib_samples=192, verify_samples=64)
    shapes = {"x": (1, FEATURES)}
    kept = independent_macs(pruned, shapes) / independent_macs(model, shapes)
    assert 0.5 < kept <= 0.6 + 1e-9  # 'wide' at k keeps k (F + 16) of 16 F MACs, plus 'head'
    assert report.cost_after.macs / report.cost_before.macs == pytest.approx(kept)


def test_a_layer_kept_whole_is_folded_back_into_its_producer_exactly() -> None:
    model = _gemm_into_layer_norm()
    data = _low_rank_data((FEATURES,))
    pruned, _ = compress(model, data, ratio=0.95, round_to=1, calib_samples=192,
                         verify_samples=64, refit=False, compensation=False)
    # 16 * 0.95 -> 16 kept: above the 12 where k (48 + 16) < 48 * 16, so 'wide' stays whole
    assert "wide/reconstruction" not in {node.name for node in pruned.graph.node}
    assert [node.op_type for node in pruned.graph.node] == \
        [node.op_type for node in model.graph.node]
    feeds = {"x": data[0]["x"][:32]}
    np.testing.assert_allclose(_run(pruned, feeds)[0], _run(model, feeds)[0], rtol=1e-4,
                               atol=1e-5)


def test_fold_whole_layers_applies_the_layer_to_the_producer() -> None:
    """z = M y + d after y = W x + b is the one layer (M W) x + (M b + d)."""
    analysis = analyze(_gemm_into_layer_norm())
    layered, layers = add_reconstruction_layers(analysis, model_cost(analysis.graph.model), "all",
                                                 analyze)
    model = onnx.ModelProto()
    model.CopyFrom(layered.graph.model)
    rng = np.random.default_rng(1)
    for tensor in model.graph.initializer:
        if tensor.name.startswith("wide/reconstruction/"):
            value = rng.standard_normal(tuple(tensor.dims)).astype(np.float32)
            tensor.CopyFrom(onnx.numpy_helper.from_array(value, tensor.name))
    model = onnx.shape_inference.infer_shapes(model)  # the kept tensor gets a shape to drop
    assert {layer.kept for layer in layers} <= {value.name for value in model.graph.value_info}
    folded = fold_whole_layers(model, layers)
    assert not {layer.kept for layer in layers} & {value.name for value in
                                                   folded.graph.value_info}
    onnx.checker.check_model(folded, full_check=True)
    added = {layer.node for layer in layers}
    assert [node.name for node in folded.graph.node] == \
        [node.name for node in model.graph.node if node.name not in added]
    feeds = {"x": rng.standard_normal((4, FEATURES)).astype(np.float32)}
    np.testing.assert_allclose(_run(folded, feeds)[0], _run(model, feeds)[0], rtol=1e-4,
                               atol=1e-4)


@pytest.mark.parametrize(("model", "mode"), [
    (_gemm_into_layer_norm(), "none"),
    (_gemm_into_layer_norm(features=OUTPUTS), "all"),  # F = C: no width saves MACs
    (_gemm_into_layer_norm(shared_weight=True), "all"),  # the twin reads the same weight
])
def test_no_layer_where_none_is_asked_for_or_it_cannot_save(model, mode) -> None:
    analysis = analyze(model)
    _, layers = add_reconstruction_layers(analysis, model_cost(analysis.graph.model), mode,
                                          analyze)
    assert "wide" not in [layer.producer for layer in layers]


def test_auto_leaves_small_layers_and_graph_outputs_alone() -> None:
    """'head' (16 -> 4, frozen as a graph output) holds under a tenth of the MACs; 'wide' in
    `_matmul_into_output` writes the graph output."""
    analysis = analyze(_gemm_into_layer_norm(features=400))
    _, layers = add_reconstruction_layers(analysis, model_cost(analysis.graph.model), "auto",
                                          analyze)
    assert [layer.producer for layer in layers] == ["wide"]
    _, every = add_reconstruction_layers(analysis, model_cost(analysis.graph.model), "all",
                                         analyze)
    assert [layer.producer for layer in every] == ["wide", "head"]
    output = analyze(_matmul_into_output())
    assert add_reconstruction_layers(output, model_cost(output.graph.model), "auto",
                                     analyze)[1] == ()


def test_analyze_lists_the_reconstruction_layers_in_text_and_json(tmp_path, capsys) -> None:
    import json

    from onnx_spectral import cli

    path = tmp_path / "wide.onnx"
    onnx.save(_gemm_into_layer_norm(), str(path))
    assert cli.main(["analyze", str(path)]) == 0
    assert "an added reconstruction layer" in capsys.readouterr().out
    assert cli.main(["analyze", str(path), "--json"]) == 0
    added = json.loads(capsys.readouterr().out)["reconstruction_layers"]
    assert [(layer["producer"], layer["channels"]) for layer in added] == [("wide", OUTPUTS)]
    assert added[0]["whole_above"] == 11  # k (48 + 16) < 48 * 16 up to k = 11
    assert cli.main(["analyze", str(path), "--json", "--reconstruction-layers", "none"]) == 0
    assert json.loads(capsys.readouterr().out)["reconstruction_layers"] == []
