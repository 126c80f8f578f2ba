"""The fidelity metrics of the corpus table (tools/corpus_metrics.py) on hand-made outputs."""

from __future__ import annotations

import numpy as np
import pytest

from tools.corpus_metrics import (
    DETECTORS,
    Detector,
    cosine,
    ctc_decode,
    detections,
    fidelity,
    sequence,
    top1,
)


def test_top1_counts_positions_and_accuracy_against_labels() -> None:
    original = [np.array([[0.1, 0.9]]), np.array([[0.8, 0.2]]), np.array([[0.3, 0.7]])]
    changed = [np.array([[0.2, 0.8]]), np.array([[0.4, 0.6]]), np.array([[0.1, 0.9]])]
    result = top1(original, changed, axis=-1, labels=np.array([1, 0, 0]))
    assert result.value == pytest.approx(2 / 3)
    assert "accuracy 66.7% -> 33.3%" in result.text


def test_cosine_of_scaled_and_flipped_outputs() -> None:
    a = np.array([[1.0, 2.0, 3.0]])
    assert cosine([a], [2 * a]).value == pytest.approx(1.0)
    assert cosine([a, a], [2 * a, -a]).value == pytest.approx(0.0)


def test_ctc_decode_merges_repeats_and_drops_blanks() -> None:
    steps = np.eye(4)[[0, 2, 2, 0, 2, 3, 3, 0]]  # [T, classes]
    assert ctc_decode(steps[:, None, :], axis=-1) == (2, 2, 3)
    changed = np.eye(4)[[0, 2, 2, 2, 2, 3, 3, 0]]  # the blank between the 2s is lost
    result = sequence([steps[:, None, :]], [changed[:, None, :]], axis=-1)
    assert result.value == 0.0
    assert "per-step argmax 87.5%" in result.text


def test_detections_f1_over_anchor_and_class() -> None:
    layout = Detector(channels_first=False, first_score=5, objectness=4, threshold=0.25)
    # anchors x [4 box, objectness, 2 classes]
    original = np.zeros((1, 4, 7))
    original[0, 0, 4:] = [0.9, 0.9, 0.1]  # anchor 0, class 0, score 0.81
    original[0, 2, 4:] = [0.8, 0.1, 0.7]  # anchor 2, class 1, score 0.56
    changed = original.copy()
    changed[0, 2, 4:] = [0.8, 0.7, 0.1]  # anchor 2 now class 0
    changed[0, 3, 4:] = [0.2, 0.9, 0.9]  # score 0.18: below the threshold
    result = detections([original], [changed], layout)
    assert result.value == pytest.approx(0.5)  # 1 matched of 2 and 2
    assert "2 -> 2 anchors, 1 kept" in result.text


def test_channels_first_detector_and_fallback_to_cosine() -> None:
    output = np.zeros((1, 6, 3))  # [4 box + 2 classes, 3 anchors]
    output[0, 5, 1] = 0.9
    assert detections([output], [output], DETECTORS["yolov8"]).value == 1.0
    empty = detections([0 * output], [output], DETECTORS["yolov8"])
    assert empty.value == 0.0 and empty.text.startswith("no detections by the original (1 after)")
    unknown = fidelity("not_a_detector", "detections", -1, [output], [output], None)
    assert unknown.text.startswith("cosine")


def test_count_params_reads_initializers_constants_and_constant_of_shape() -> None:
    from onnx import TensorProto, helper, numpy_helper

    from tools.corpus_coverage import count_params

    shape = numpy_helper.from_array(np.array([4, 3, 2], dtype=np.int64), "shape")
    bias = numpy_helper.from_array(np.zeros(5, dtype=np.float32), "bias")
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["w"]),  # 24 weights
             helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(
                 np.ones((2, 2), dtype=np.float32))),  # 4
             helper.make_node("Add", ["x", "c"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                         [2, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])],
                              [shape, bias])
    assert count_params(helper.make_model(graph)) == 3 + 5 + 4 + 24


def test_corpus_row_and_summary_name_outcomes_and_budget_losses() -> None:
    from tools.corpus_coverage import Row, Side, format_corpus_row, summary

    spectral = Side("compressed", macs=(1000, 480), report_macs=(900, 450), params=(10, 4),
                    groups=(3, 1), reasons={"read by Softmax node '*'": 1}, fidelity=0.9,
                    fidelity_text="cosine 0.9000", seconds=2.0)
    onnxsim = Side("pruned", macs=(1000, 500), params=(10, 5), fidelity=0.5,
                   fidelity_text="cosine 0.5000", seconds=1.0)
    refused = Side("refused", "GraphError: node 'n1': no channel group", groups=(0, 2))
    row = format_corpus_row(Row("m", spectral, onnxsim))
    assert "1.0k -> 0.5k (48.0%; report 50.0%)" in row and "valid, MACs 50.0%" in row
    assert row.endswith("| - |")
    assert "refused: GraphError: node 'n1'" in format_corpus_row(
        Row("r", refused, Side("failed")))
    text = summary([Row("m", spectral, onnxsim), Row("r", refused, Side("failed"))], 0.5)
    assert "2 models: 1 compressed, 1 refused" in text
    assert "lose >= 25% of the MACs at --flops 0.5: 1 (m)" in text
    assert "valid smaller model: 1; onnx-spectral keeps no more MACs with at least its " \
        "fidelity on 1" in text
    assert "m: MACs kept onnx-spectral 48.0% vs onnxsim 50.0%; fidelity 90.0% vs 50.0%" in text


def test_corpus_compares_at_onnxsims_macs_where_onnxsim_keeps_fewer() -> None:
    from tools.corpus_coverage import Row, Side, format_corpus_row, matched_budget, summary

    spectral = Side("compressed", macs=(1000, 500), fidelity=0.9, fidelity_text="cosine 0.9")
    onnxsim = Side("pruned", macs=(1000, 490), fidelity=0.8, fidelity_text="cosine 0.8")
    budget = matched_budget(0.5, spectral, onnxsim)
    assert budget is not None and abs(budget - 0.5 * 0.98 * 0.999) < 1e-12
    assert matched_budget(0.5, Side("compressed", macs=(1000, 480)), onnxsim) is None
    assert matched_budget(0.5, spectral, Side("failed", macs=(1000, 400))) is None
    behind = Side("compressed", macs=(1000, 489), fidelity=0.7, fidelity_text="cosine 0.7")
    text = summary([Row("m", spectral, onnxsim, behind)], 0.5)
    assert "fidelity on 0" in text
    assert "m: MACs kept onnx-spectral (at onnxsim's MACs) 48.9% vs onnxsim 49.0%; fidelity " \
        "70.0% vs 80.0%  <- onnxsim ahead" in text
    assert format_corpus_row(Row("m", spectral, onnxsim, behind)).endswith(
        "| MACs 48.9%, cosine 0.7 |")
    ahead = Side("compressed", macs=(1000, 489), fidelity=0.85)
    assert "fidelity on 1" in summary([Row("m", spectral, onnxsim, ahead)], 0.5)
