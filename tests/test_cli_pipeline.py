"""The command line and the Python API as a user meets them, on a tiny conv sandwich.

    x [N,3,8,8] -> Conv 'conv1' [7,3,3,3] -> Relu -> Conv 'conv2' [5,7,3,3] -> y

The compress command writes a smaller valid model, prints the per-group table and the
whole-model figures, and writes the same as JSON; `analyze` lists the groups; a
CalibrationDataReader feeds `compress`; errors exit with their code and write nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnxruntime.quantization import CalibrationDataReader

from onnx_spectral import compress
from onnx_spectral.cli import main
from tests import graphs
from tests.graphs import CHANNELS

KEPT = (CHANNELS + 1) // 2


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    path = tmp_path / "in.onnx"
    onnx.save_model(graphs.conv_sandwich(graphs.unary("Relu")), str(path))
    return path


@pytest.fixture
def calib_path(tmp_path: Path) -> Path:
    path = tmp_path / "calib.npz"
    rng = np.random.default_rng(0)
    np.savez(path, x=rng.standard_normal((80, 3, 8, 8)).astype(np.float32))
    return path


def _compress_args(model: Path, out: Path, calib: Path, *extra: str) -> list[str]:
    return [str(model), str(out), "--calib", str(calib), "--calib-samples", "64",
            "--verify-samples", "16", "--provider", "cpu", *extra]


def test_compress_writes_model_table_and_json(model_path: Path, calib_path: Path,
                                               tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    out, report_path = tmp_path / "out.onnx", tmp_path / "report.json"
    code = main(_compress_args(model_path, out, calib_path, "--ratio", "0.5",
                               "--report", str(report_path)))
    assert code == 0
    printed = capsys.readouterr().out
    assert f"{CHANNELS} -> {KEPT}" in printed
    assert "conv1" in printed and "held-out rel. error" in printed
    assert "parameters:" in printed and "MACs/sample:" in printed

    compressed = onnx.load(str(out))
    onnx.checker.check_model(compressed, full_check=True)
    weights = {init.name: init.dims for init in compressed.graph.initializer}
    assert any(list(dims) == [KEPT, 3, 3, 3] for dims in weights.values())
    assert any(list(dims) == [5, KEPT, 3, 3] for dims in weights.values())
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (result,) = session.run(None, {"x": np.zeros((2, 3, 8, 8), np.float32)})
    assert result.shape == (2, 5, 8, 8)

    report = json.loads(report_path.read_text())
    pruned = [group for group in report["groups"] if not group["frozen"]]
    assert [(group["channels"], group["kept"]) for group in pruned] == [(CHANNELS, KEPT)]
    assert 0.0 <= pruned[0]["heldout_error"] < 1.0
    conv1_params = CHANNELS * 27 + CHANNELS + 5 * CHANNELS * 9 + 5
    kept_params = KEPT * 27 + KEPT + 5 * KEPT * 9 + 5
    assert report["params"] == {"before": conv1_params, "after": kept_params}
    assert report["macs"]["after"] < report["macs"]["before"]
    assert report["calibration_samples"] == 64
    assert report["verification"]["samples"] == 16


def test_analyze_lists_groups_and_cost(model_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["analyze", str(model_path), "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    by_producer = {group["producers"][0]: group for group in listing["groups"]}
    assert by_producer["conv1"]["prunable"] and by_producer["conv1"]["sinks"] == ["conv2"]
    assert not by_producer["conv2"]["prunable"]
    assert "graph output" in by_producer["conv2"]["frozen"][0]
    assert listing["params"] == CHANNELS * 27 + CHANNELS + 5 * CHANNELS * 9 + 5

    assert main(["analyze", str(model_path)]) == 0
    assert "1 of 2 groups prunable" in capsys.readouterr().out


class _Reader(CalibrationDataReader):
    """Four batches of 20 samples, the protocol of onnxruntime's quantize_static."""

    def __init__(self) -> None:
        rng = np.random.default_rng(1)
        self._batches = iter([{"x": rng.standard_normal((20, 3, 8, 8)).astype(np.float32)}
                              for _ in range(4)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def test_api_accepts_a_calibration_data_reader(model_path: Path) -> None:
    model, report = compress(model_path, _Reader(), ratio=0.5, calib_samples=64,
                             verify_samples=16, provider="cpu")
    assert report.calibration_samples == 64
    assert report.verification is not None and report.verification.samples == 16
    assert [(g.channels, g.kept) for g in report.groups if not g.frozen] == [(CHANNELS, KEPT)]
    onnx.checker.check_model(model, full_check=True)


@pytest.mark.parametrize(("extra", "code"), [
    (("--ratio", "1.5"), 2),
    (("--exclude", "no_such_node"), 2),
])
def test_bad_options_exit_with_code_and_write_nothing(model_path: Path, calib_path: Path,
                                                      tmp_path: Path, extra: tuple[str, ...],
                                                      code: int,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out.onnx"
    assert main(_compress_args(model_path, out, calib_path, *extra)) == code
    assert "onnx-spectral: error:" in capsys.readouterr().err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.npz", "in.onnx"]


def test_calibration_that_does_not_fit_the_model_is_a_data_error(
        model_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    calib = tmp_path / "wrong.npz"
    np.savez(calib, image=np.zeros((8, 3, 8, 8), np.float32))
    out = tmp_path / "out.onnx"
    assert main(_compress_args(model_path, out, calib)) == 4
    error = capsys.readouterr().err
    assert "image" in error and "x" in error
    assert not out.exists()


def test_output_equal_to_input_is_refused(model_path: Path, calib_path: Path) -> None:
    before = model_path.read_bytes()
    assert main(_compress_args(model_path, model_path, calib_path)) == 2
    assert model_path.read_bytes() == before
