"""Layer refit (`refit.py`): receptive fields, exact recovery, and when a layer is left alone."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import pytest
from onnx import helper

from onnx_spectral import compress
from onnx_spectral.correction import refit, refit_rows
from onnx_spectral.correction.refit import _cross_validated_ridge, _solve, refit_layers
from onnx_spectral.correction.refit_rows import NormalEquations, RefitLayer
from onnx_spectral.graph.sessions import open_session
from onnx_spectral.ops.conv import patches
from onnx_spectral.ops.linear import MatMulHandler
from tests.graphs import GraphBuilder


@pytest.mark.parametrize(("kernel", "pads", "strides", "dilations"),
                         [((3, 3), (1, 1, 1, 1), (1, 1), (1, 1)),
                          ((3, 2), (0, 1, 2, 0), (2, 1), (1, 2)),
                          ((5, 1), (2, 0, 2, 0), (1, 1), (1, 1))])
def test_receptive_fields_times_the_kernel_are_the_convolution(
        kernel: tuple[int, int], pads: tuple[int, ...], strides: tuple[int, int],
        dilations: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 7, 6)).astype(np.float32)
    w = rng.standard_normal((4, 3, *kernel)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=list(kernel),
                            pads=list(pads), strides=list(strides), dilations=list(dilations))
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", 1, None)],
                              [helper.make_tensor_value_info("y", 1, None)],
                              [onnx.numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    expected = open_session(model, "cpu").run(None, {"x": x})[0]
    fields = patches(x, node, kernel)
    got = (fields @ w.reshape(4, -1).T).reshape(2, *expected.shape[2:], 4)
    np.testing.assert_allclose(np.moveaxis(got, -1, 1), expected, rtol=1e-4, atol=1e-4)


def _chain(seed: int = 0) -> onnx.ModelProto:
    """x [N,3,8,8] -> conv1 (8) -> Relu -> conv2 (6) -> Relu -> conv3 (4) -> y."""
    b = GraphBuilder(seed)
    t = b.node("Relu", [b.conv("x", "conv1", 3, 8)], "relu1")
    t = b.node("Relu", [b.conv(t, "conv2", 8, 6)], "relu2")
    b.conv(t, "conv3", 6, 4)
    return b.model([("x", ["N", 3, 8, 8])], [("conv3", ["N", 4, 8, 8])])


def _batches(count: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((16, 3, 8, 8)).astype(np.float32)} for _ in range(count)]


def _changed(model: onnx.ModelProto, names: tuple[str, ...],
             change: Callable[[np.ndarray], np.ndarray]) -> onnx.ModelProto:
    """A copy of `model` whose initializers `names` are replaced by `change` of their value."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for tensor in copy.graph.initializer:
        if tensor.name in names:
            value = change(onnx.numpy_helper.to_array(tensor).copy())
            tensor.CopyFrom(onnx.numpy_helper.from_array(value, tensor.name))
    return copy


def _half_of_conv1_dropped(weight: np.ndarray) -> np.ndarray:
    weight[::2] = 0.0
    return weight


def test_a_layer_recovers_weights_that_reproduce_the_original_exactly() -> None:
    """conv2 is perturbed in the 'pruned' model; nothing upstream changed, so its input is the
    original's and the refit finds weights (and bias) giving the original output exactly."""
    original = _chain()
    pruned = _changed(original, ("conv2_w", "conv2_b"), lambda value: value * 1.7 + 0.1)
    batches = _batches(4, seed=1)
    # conv2 reads relu1: "changed" makes it (and conv3) a layer to refit
    refitted, notes = refit_layers(original, pruned, {}, ["relu1"], batches, "cpu")
    assert notes == ["layer refit: 2 layers refitted toward the original's outputs"]
    test = _batches(1, seed=2)[0]
    want = open_session(original, "cpu").run(None, test)[0]
    got = open_session(refitted, "cpu").run(None, test)[0]
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)
    onnx.checker.check_model(refitted)


def test_layers_too_wide_or_short_of_rows_are_left_with_a_reason() -> None:
    original = _chain()
    perturbed = _changed(original, ("conv3_w",), lambda value: value * 0.5)
    batches = _batches(1, seed=1)  # 16 samples x 64 positions = 1,024 rows
    _, notes = refit_layers(original, perturbed, {}, ["relu1"], batches, "cpu",
                            max_features=60)
    assert notes == ["layer refit: 1 layer refitted toward the original's outputs",
                     "layer 'conv2' not refitted: 72 input features (more than 60)"]
    _, notes = refit_layers(original, perturbed, {}, ["relu1"], batches, "cpu",
                            rows_per_feature=20)
    assert notes[0] == ("layer 'conv2' not refitted: 1024 calibration rows for 72 input "
                        "features (fewer than 20 per feature)")


def test_refit_is_on_by_default_and_lowers_the_error_of_a_pruned_chain() -> None:
    model = _chain(seed=3)
    rng = np.random.default_rng(4)
    data = {"x": rng.standard_normal((300, 3, 8, 8)).astype(np.float32)}
    test = {"x": rng.standard_normal((100, 3, 8, 8)).astype(np.float32)}
    reference = open_session(model, "cpu").run(None, test)[0]

    def error(**options: object) -> tuple[float, tuple[str, ...]]:
        compressed, report = compress(model, data, ratio=0.5, provider="cpu",
                                      calib_samples=300, verify_samples=0, **options)
        output = open_session(compressed, "cpu").run(None, test)[0]
        return (float(np.linalg.norm(output - reference) / np.linalg.norm(reference)),
                report.notes)

    with_refit, notes = error()
    without, _ = error(refit=False)
    print(f"relative output error: refit {with_refit:.4f}, without {without:.4f}")
    assert with_refit < 0.9 * without
    assert "layer refit: 2 layers refitted toward the original's outputs" in notes


def _halves(features: np.ndarray, targets: np.ndarray) -> list[NormalEquations]:
    halves = []
    for rows in (slice(0, len(features) // 2), slice(len(features) // 2, None)):
        half = NormalEquations(np.zeros((features.shape[1],) * 2),
                                np.zeros((features.shape[1], targets.shape[1])), 0.0)
        half.add(features[rows], targets[rows])
        halves.append(half)
    return halves


def test_cross_validation_refuses_a_fit_of_noise_and_takes_a_fit_of_signal() -> None:
    """40 rows for 30 features: a fit of targets unrelated to the features does worse on held-out
    rows than zero weights, so no ridge is chosen or only one large enough to keep the weights
    near zero; a fit of a linear map with noise is kept."""
    rng = np.random.default_rng(0)
    features = rng.standard_normal((40, 30)).astype(np.float32)
    layer = RefitLayer(helper.make_node("MatMul", ["x", "w"], ["y"]), MatMulHandler(), 30, False,
                       False)
    noise = rng.standard_normal((40, 5)).astype(np.float32)
    zero = np.zeros((30, 5))
    halves = _halves(features, noise)
    ridge = _cross_validated_ridge(halves, layer, zero,
                                   halves[0].error(zero) + halves[1].error(zero))
    assert ridge is None or ridge >= 10.0
    signal = features @ rng.standard_normal((30, 5)).astype(np.float32) + 0.1 * noise
    halves = _halves(features, signal)
    ridge = _cross_validated_ridge(halves, layer, zero,
                                   halves[0].error(zero) + halves[1].error(zero))
    assert ridge is not None and ridge <= 1e-1


def test_the_ridge_pulls_toward_the_current_weights() -> None:
    """A small ridge gives the least-squares fit, a large one the prior (the current weights);
    with few noisy rows a good prior beats both the plain fit and shrinking toward zero."""
    rng = np.random.default_rng(1)
    features = rng.standard_normal((40, 30))
    truth = rng.standard_normal((30, 5))
    targets = features @ truth + 0.5 * rng.standard_normal((40, 5))
    layer = RefitLayer(helper.make_node("MatMul", ["x", "w"], ["y"]), MatMulHandler(), 30, False,
                       False)
    prior = truth + 0.05 * rng.standard_normal((30, 5))
    gram, cross = features.T @ features, features.T @ targets
    least_squares = np.linalg.solve(gram, cross)
    np.testing.assert_allclose(_solve(gram, cross, layer, 1e-9, prior), least_squares, rtol=1e-5)
    np.testing.assert_allclose(_solve(gram, cross, layer, 1e9, prior), prior, atol=1e-6)
    pulled = np.linalg.norm(_solve(gram, cross, layer, 1.0, prior) - truth)
    shrunk = np.linalg.norm(_solve(gram, cross, layer, 1.0, np.zeros_like(prior)) - truth)
    assert pulled < 0.5 * min(shrunk, np.linalg.norm(least_squares - truth))


def test_relaxed_passes_lower_the_error_after_the_relu(monkeypatch: pytest.MonkeyPatch) -> None:
    """conv1 loses half its channels in the 'pruned' model, so conv2 (read by relu2) cannot be
    fitted exactly; with the relaxed passes its rectified output is closer to the original's on
    held-out data than with the plain fit."""
    original = _chain()
    original.graph.output.append(helper.make_tensor_value_info("relu2", 1, None))
    pruned = _changed(original, ("conv1_w",), _half_of_conv1_dropped)
    batches, test = _batches(8, seed=1), _batches(2, seed=2)
    want = np.concatenate([open_session(original, "cpu").run(["relu2"], feeds)[0]
                           for feeds in test])

    def error() -> float:
        refitted, _ = refit_layers(original, pruned, {}, ["conv1"], batches, "cpu")
        session = open_session(refitted, "cpu")
        got = np.concatenate([session.run(["relu2"], feeds)[0] for feeds in test])
        return float(np.linalg.norm(got - want) / np.linalg.norm(want))

    relaxed = error()
    monkeypatch.setattr(refit, "RELU_PASSES", 0)
    plain = error()
    print(f"relative error after relu2: relaxed {relaxed:.4f}, plain {plain:.4f}")
    assert relaxed < plain


def test_cached_activations_give_the_same_fit_as_running_the_models_again(
        monkeypatch: pytest.MonkeyPatch) -> None:
    original = _chain()
    pruned = _changed(original, ("conv1_w",), _half_of_conv1_dropped)
    batches = _batches(4, seed=1)
    runs: list[list[str]] = []
    real_open = refit_rows._open

    def counted(model: onnx.ModelProto, names: list[str], *args: object) -> object:
        runs.append(list(names))
        return real_open(model, names, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(refit_rows, "_open", counted)
    cached, _ = refit_layers(original, pruned, {}, ["conv1"], batches, "cpu")
    # the original once for both layers' targets (after a one-sample probe of their sizes),
    # the pruned model once per layer: conv2 (read by a Relu: 1 + RELU_PASSES passes, cached)
    # reads relu1, conv3 relu2
    targets = ["conv2", "conv3"]
    assert runs == [targets, targets, ["relu1"], ["relu2"]]
    runs.clear()
    monkeypatch.setattr(refit_rows, "CACHE_BYTES", 0)
    rerun, _ = refit_layers(original, pruned, {}, ["conv1"], batches, "cpu")
    assert runs == [targets, targets, *[["relu1"]] * (1 + refit.RELU_PASSES), ["relu2"]]
    runs.clear()
    monkeypatch.setattr(refit_rows, "TARGET_BYTES", 0)  # no targets kept: one run per layer
    alone, _ = refit_layers(original, pruned, {}, ["conv1"], batches, "cpu")
    assert runs == [targets, *[["relu1"], ["conv2"]] * (1 + refit.RELU_PASSES), ["relu2"],
                    ["conv3"]]
    for a, b in zip(cached.graph.initializer, alone.graph.initializer, strict=True):
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(a),
                                      onnx.numpy_helper.to_array(b))
    for a, b in zip(cached.graph.initializer, rerun.graph.initializer, strict=True):
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(a),
                                      onnx.numpy_helper.to_array(b))


def test_batches_of_one_sample_alternate_between_the_halves() -> None:
    """Eight batches of one sample: the halves of the cross-validation get four each and the
    perturbed conv2 is refitted; a single sample cannot be cross-validated and is refused."""
    original = _chain()
    pruned = _changed(original, ("conv2_w",), lambda value: value * 1.5)
    singles = [{"x": feeds["x"][i:i + 1]} for feeds in _batches(1, seed=1) for i in range(8)]
    _, notes = refit_layers(original, pruned, {}, ["relu1"], singles, "cpu")
    assert notes[0].startswith("layer refit: ")
    _, notes = refit_layers(original, pruned, {}, ["relu1"], singles[:1], "cpu",
                            rows_per_feature=0)
    assert notes[0] == ("layer 'conv2' not refitted: one calibration sample is too few to "
                        "cross-validate the fit")
