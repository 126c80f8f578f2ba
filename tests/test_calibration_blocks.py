"""Gram matrices by upper block rows, at old and new opsets, through I/O binding.

    x [N,4,3,3] -> Conv 'conv1' (300, 1x1) -> Relu 'relu1' -> Conv 'conv2' (6, 1x1) -> y

The tap on relu1 has 300 channels: three channel blocks (0:100, 100:200, 200:300), six Gram
blocks.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx.reference import ReferenceEvaluator

from onnx_spectral.analysis import analyze
from onnx_spectral.calibration.collect import calibrate
from onnx_spectral.calibration.instrument import GramBlock, assemble_gram, gram_blocks, instrument
from tests.graphs import GraphBuilder


def _model(opset: int) -> onnx.ModelProto:
    b = GraphBuilder(seed=4, opset=opset)
    t = b.node("Relu", [b.conv("x", "conv1", 4, 300, kernel=1, pad=0)], "relu1")
    b.conv(t, "conv2", 300, 6, kernel=1, pad=0)
    return b.model([("x", ["N", 4, 3, 3])], [("conv2", ["N", 6, 3, 3])])


def test_block_rows_cover_the_upper_triangle() -> None:
    assert gram_blocks(100) == [(0, 100)]
    assert gram_blocks(300) == [(0, 100), (100, 200), (200, 300)]
    assert len(gram_blocks(4096)) == 8 and gram_blocks(4096)[-1] == (3584, 4096)
    full = np.arange(36.0).reshape(6, 6)
    full = full + full.T
    blocks = [(GramBlock("a", (0, 2), (0, 2)), full[0:2, 0:2]),
              (GramBlock("b", (0, 2), (2, 6)), full[0:2, 2:6]),
              (GramBlock("c", (2, 6), (2, 6)), full[2:6, 2:6])]
    np.testing.assert_array_equal(assemble_gram(6, blocks), full)


@pytest.mark.parametrize("opset", [9, 13, 17])
def test_blocked_gram_equals_numpy(opset: int) -> None:
    model = _model(opset)
    analysis = analyze(model)
    assert [(tap.tensor, tap.channels) for tap in analysis.taps] == [("relu1", 300)]
    instrumented = instrument(analysis.graph, analysis.taps)
    onnx.checker.check_model(instrumented.model)
    assert len(instrumented.taps[0].blocks) == 6  # 3 channel blocks, upper triangle
    samples = np.random.default_rng(2).normal(size=(7, 4, 3, 3)).astype(np.float32)
    statistics = calibrate(instrumented, [{"x": samples[:4]}, {"x": samples[4:]}], "cpu")
    relu = ReferenceEvaluator(model).run(None, {"x": samples}, intermediate=True)["relu1"]
    rows = np.moveaxis(relu.astype(np.float64), 1, -1).reshape(-1, 300)
    measured = statistics["relu1"]
    assert measured.count == 7 * 9 and statistics.samples == 7
    np.testing.assert_allclose(measured.gram, rows.T @ rows, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(measured.gram, measured.gram.T)
    np.testing.assert_allclose(measured.total, rows.sum(axis=0), rtol=1e-5, atol=1e-4)
