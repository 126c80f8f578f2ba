"""Affine reconstruction: offsets folded into sink biases, and what they buy."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnx_spectral import compress
from onnx_spectral.analysis import analyze
from onnx_spectral.graph.sessions import open_session
from onnx_spectral.rewrite import rewrite
from onnx_spectral.selection.affine import affine_reconstruction, supports_offset
from onnx_spectral.selection.plan import GroupPlan
from tests import graphs


def test_a_strided_conv_transpose_takes_no_offset() -> None:
    """Its output positions see different subsets of the taps: no single bias shift."""
    analysis = analyze(_conv_transpose_sink(strides=2))
    (group,) = analysis.prunable
    assert not supports_offset(analysis.graph, group.taps[0])


def _conv_transpose_sink(strides: int = 1) -> onnx.ModelProto:
    """x -> conv1 (7) -> Relu -> ConvTranspose 'ct' (7 -> 5, 3x3, pads 1, `strides`) -> y."""
    b = graphs.GraphBuilder(0)
    t = b.node("Relu", [b.conv("x", "conv1", 3, 7)], "relu")
    size = 8 * strides  # (8 - 1) * s + 3 - 2 + (s - 1)
    b.node("ConvTranspose", [t, b.random("ct_w", (7, 5, 3, 3), 63), b.random("ct_b", (5,), 4)],
           "ct", kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[strides, strides],
           output_padding=[strides - 1] * 2)
    return b.model([("x", ["N", 3, 8, 8])], [("ct", ["N", 5, size, size])])


@pytest.mark.parametrize("make", [lambda: graphs.gemm_mlp(1), lambda: graphs.gemm_mlp(0),
                                  lambda: graphs.flatten_head("flatten"),
                                  lambda: graphs.conv_sandwich(graphs.unary("Relu")),
                                  _conv_transpose_sink])
def test_offset_is_folded_as_w_times_c(make: object) -> None:
    model = make()  # type: ignore[operator]
    analysis = analyze(model)
    (group,) = [g for g in analysis.prunable]
    (tap,) = group.taps
    assert supports_offset(analysis.graph, tap)
    m = group.channels
    offset = np.random.default_rng(0).standard_normal(m)
    kept = np.arange(m)
    plan = GroupPlan(group, kept, {tap.tensor: np.eye(m)}, {tap.tensor: offset})
    compressed = rewrite(analysis, [plan])
    x = np.random.default_rng(1).standard_normal((5, *_sample_shape(model))).astype(np.float32)
    name = model.graph.input[0].name
    got = open_session(compressed, "cpu").run(None, {name: x})[0].astype(np.float64)
    original = open_session(model, "cpu").run(None, {name: x})[0].astype(np.float64)
    change = got - original
    if change.ndim == 4:  # a padded Conv sink: the interior sees every tap of the offset
        change = np.moveaxis(change[:, :, 1:-1, 1:-1], 1, -1).reshape(-1, change.shape[1])
    # a constant shift of the sink's input moves its output by the same W c for every sample
    assert np.ptp(change, axis=0).max() < 1e-4
    assert np.abs(change).max() > 1e-3
    if tap.sinks[0].feature_map is None and change.ndim == 2 and "fc" in tap.sinks[0].node:
        node = analysis.graph.nodes_by_name[tap.sinks[0].node]
        weight = analysis.graph.input_constant(node, 1)
        rows = weight if node.attribute[0].i else weight.T
        np.testing.assert_allclose(change[0], rows @ offset, rtol=1e-4, atol=1e-5)


def _sample_shape(model: object) -> list[int]:
    dims = model.graph.input[0].type.tensor_type.shape.dim  # type: ignore[attr-defined]
    return [int(dim.dim_value) for dim in dims[1:]]


def test_affine_reconstruction_centers_the_statistics() -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 500))
    t = np.vstack([x, x[0] + x[1] + 5.0]) + np.array([[1.0], [2.0], [3.0], [0.0]])
    sigma, mean = t @ t.T / 500, t.mean(axis=1)
    matrix, offset = affine_reconstruction(sigma, mean, np.array([0, 1, 2]), 1e-9)
    np.testing.assert_allclose(matrix @ t[:3] + offset[:, None], t, atol=1e-6)


def test_affine_lowers_the_error_of_a_relu_mlp() -> None:
    model = graphs.gemm_mlp(1, hidden=16)
    rng = np.random.default_rng(3)
    data = {"x": rng.standard_normal((400, 12)).astype(np.float32)}
    test = rng.standard_normal((200, 12)).astype(np.float32)
    reference = open_session(model, "cpu").run(None, {"x": test})[0]

    def error(affine: bool) -> float:
        compressed, _ = compress(model, data, ratio=0.4, affine=affine, provider="cpu",
                                 calib_samples=400, verify_samples=0, refit=False)
        output = open_session(compressed, "cpu").run(None, {"x": test})[0]
        return float(np.linalg.norm(output - reference) / np.linalg.norm(reference))

    linear, affine = error(False), error(True)
    print(f"relative output error: linear {linear:.4f}, affine {affine:.4f}")
    assert affine < linear
