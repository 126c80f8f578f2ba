"""Position strides that bound the cost of the Gram taps, and strided statistics.

    x [N,16,64,64] -> Conv 'conv1' (1024, 1x1) -> Relu 'relu1' -> Conv 'conv2' (8, 1x1) -> y

The tap on relu1 (1024 channels, 4096 positions) costs 2.4e9 multiply-adds per sample for its
Gram matrix, 24x the whole model (1.0e8 MACs): it must be subsampled.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx.reference import ReferenceEvaluator

from onnx_spectral.analysis import analyze
from onnx_spectral.calibration.collect import calibrate
from onnx_spectral.calibration.instrument import instrument
from onnx_spectral.calibration.tap_cost import (
    GRAM_FLOOR,
    gram_macs,
    gram_strides,
    positions_per_sample,
)
from tests.graphs import GraphBuilder


def _wide(size: int = 64, batch: int | str = "N") -> onnx.ModelProto:
    b = GraphBuilder(seed=6)
    t = b.node("Relu", [b.conv("x", "conv1", 16, 1024, kernel=1, pad=0)], "relu1")
    b.conv(t, "conv2", 1024, 8, kernel=1, pad=0)
    return b.model([("x", [batch, 16, size, size])], [("conv2", [batch, 8, size, size])])


def test_dear_tap_gets_the_stride_that_meets_the_budget() -> None:
    analysis = analyze(_wide())
    (tap,) = analysis.taps
    assert positions_per_sample(analysis.graph, tap) == 4096
    gram = gram_macs(1024, 4096)
    assert gram == 128 * (1024 + 896 + 768 + 640 + 512 + 384 + 256 + 128) * 4096
    model_macs = 1024 * 16 * 4096 + 8 * 1024 * 4096
    strides = gram_strides(analysis.graph, analysis.taps, 0.25)
    # allowed: max(0.25 * model MACs, GRAM_FLOOR) = GRAM_FLOOR; the smallest stride meeting it
    assert 0.25 * model_macs < GRAM_FLOOR
    assert strides == {"relu1": -(-gram // GRAM_FLOOR)} == {"relu1": 25}
    assert gram_strides(analysis.graph, analysis.taps, 0.0) == {}
    assert gram_strides(analysis.graph, analysis.taps, 100.0) == {}


def test_small_model_is_calibrated_exactly() -> None:
    analysis = analyze(_wide(size=4))
    assert gram_strides(analysis.graph, analysis.taps, 0.25) == {}


def test_too_few_samples_cap_the_stride() -> None:
    analysis = analyze(_wide())
    # the budget asks for stride 25 (see above); 1024 channels x 8 rows each from 40 samples
    # of 4096 positions allow at most 20
    assert gram_strides(analysis.graph, analysis.taps, 0.25, samples=1000) == {"relu1": 25}
    assert gram_strides(analysis.graph, analysis.taps, 0.25, samples=40) == {"relu1": 20}
    # 2 samples cannot give 8 rows per channel even from every position
    assert gram_strides(analysis.graph, analysis.taps, 0.25, samples=2) == {}


@pytest.mark.parametrize(("stride", "grid"), [(2, (2, 1)), (5, (3, 2))])
def test_strided_statistics_of_an_image_tap_keep_a_grid(stride: int, grid: tuple[int, int]
                                                        ) -> None:
    model = _wide(size=3)
    analysis = analyze(model)
    instrumented = instrument(analysis.graph, analysis.taps, {"relu1": stride})
    assert instrumented.taps[0].stride == grid[0] * grid[1]
    assert any(node.op_type == "MaxPool" for node in instrumented.model.graph.node)
    samples = np.random.default_rng(3).normal(size=(4, 16, 3, 3)).astype(np.float32)
    statistics = calibrate(instrumented, [{"x": samples}], "cpu")
    relu = ReferenceEvaluator(model).run(None, {"x": samples}, intermediate=True)["relu1"]
    kept = relu[:, :, ::grid[0], ::grid[1]].astype(np.float64)
    rows = np.moveaxis(kept, 1, 0).reshape(1024, -1)
    measured = statistics["relu1"]
    assert measured.count == rows.shape[1] == 4 * -(-3 // grid[0]) * -(-3 // grid[1])
    np.testing.assert_allclose(measured.gram, rows @ rows.T, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(measured.total, rows.sum(axis=1), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("stride", [2, 3])
def test_strided_statistics_of_a_token_tap_count_every_stride_th_position(stride: int
                                                                          ) -> None:
    from tests.graphs import matmul_mlp

    model = matmul_mlp(3)
    analysis = analyze(model)
    (tap,) = analysis.taps
    instrumented = instrument(analysis.graph, analysis.taps, {tap.tensor: stride})
    assert instrumented.taps[0].stride == stride
    samples = np.random.default_rng(4).normal(size=(3, 5, 12)).astype(np.float32)
    statistics = calibrate(instrumented, [{"x": samples}], "cpu")
    values = ReferenceEvaluator(model).run(None, {"x": samples}, intermediate=True)[tap.tensor]
    rows = values.astype(np.float64).reshape(-1, values.shape[-1]).T[:, ::stride]
    measured = statistics[tap.tensor]
    assert measured.count == -(-15 // stride)
    np.testing.assert_allclose(measured.gram, rows @ rows.T, rtol=1e-5, atol=1e-4)


def test_stride_costs_little_selection_quality() -> None:
    """Accuracy effect of subsampling: channels chosen from every 4th position lose at most 5%
    more (true loss, full statistics) than channels chosen from all positions (measured:
    +0%, +1.9%, +0% at k = 8, 16, 32); Sigma itself moves by 10% (sampling noise)."""
    from onnx_spectral.selection.spectral import (
        TapProblem,
        greedy_select,
        information_loss,
        loss_weight,
    )

    b = GraphBuilder(seed=7)
    t = b.node("Relu", [b.conv("x", "conv1", 8, 64)], "relu1")
    b.conv(t, "conv2", 64, 8)
    model = b.model([("x", ["N", 8, 16, 16])], [("conv2", ["N", 8, 16, 16])])
    analysis = analyze(model)
    rng = np.random.default_rng(8)
    # spatially smooth inputs (as images are): cumulative sums of noise, standardized
    x = np.cumsum(np.cumsum(rng.normal(size=(64, 8, 16, 16)), axis=2), axis=3)
    x = ((x - x.mean()) / x.std()).astype(np.float32)
    batches = [{"x": x[i:i + 16]} for i in range(0, 64, 16)]
    full = calibrate(instrument(analysis.graph, analysis.taps), batches, "cpu")["relu1"]
    strided = calibrate(instrument(analysis.graph, analysis.taps, {"relu1": 4}), batches,
                        "cpu")["relu1"]
    assert strided.count == full.count // 4
    weight = loss_weight(64, None, 1.0)
    ridge = 1e-3 * np.trace(full.sigma) / 64
    sigma_error = np.linalg.norm(strided.sigma - full.sigma) / np.linalg.norm(full.sigma)
    assert sigma_error < 0.15
    truth = TapProblem(full.sigma, weight, ridge)
    for k in (8, 16, 32):
        chosen_full = greedy_select([truth], k).order
        chosen_strided = greedy_select([TapProblem(strided.sigma, weight, ridge)], k).order
        loss_full = information_loss([truth], chosen_full)
        ratio = information_loss([truth], chosen_strided) / loss_full
        assert ratio <= 1.05


@pytest.mark.parametrize(("channels", "round_to", "kept"),
                         [(100, 0, 56), (100, 1, 50), (40, 0, 20), (100, 16, 64)])
def test_automatic_width_rounding(channels: int, round_to: int, kept: int) -> None:
    """round_to 0 (default) rounds groups of >= 64 channels up to a multiple of 8."""
    from onnx_spectral import compress

    b = GraphBuilder(seed=9)
    t = b.node("Relu", [b.conv("x", "conv1", 3, channels)], "relu1")
    b.conv(t, "conv2", channels, 5)
    model = b.model([("x", ["N", 3, 6, 6])], [("conv2", ["N", 5, 6, 6])])
    x = np.random.default_rng(1).normal(size=(40, 3, 6, 6)).astype(np.float32)
    _, report = compress(model, {"x": x}, ratio=0.5, round_to=round_to, calib_samples=30,
                         verify_samples=10, provider="cpu")
    (group,) = [group for group in report.groups if not group.frozen]
    assert (group.channels, group.kept) == (channels, kept)
