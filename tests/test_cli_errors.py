"""Bad input through the CLI: one error line, the documented exit code, nothing written.

Exit codes (README "Exit codes"): 2 bad arguments, 3 unreadable or invalid model, 4 data that
does not fit, 5 safety check failed, 6 nothing prunable, 7 out of memory, 1 internal error,
130 interrupted.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnx_spectral import cli
from onnx_spectral.api import compress
from tests import graphs

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--provider", "cpu", "--calib-samples", "24", "--verify-samples", "8"]


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    path = tmp_path / "in.onnx"
    onnx.save_model(graphs.conv_sandwich(), str(path))
    return path


def _data(tmp_path: Path, samples: int = 32, name: str = "x", shape: tuple[int, ...] = (3, 8, 8),
          dtype: type = np.float32, scale: float = 1.0) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path / f"data_{name}_{samples}_{len(shape)}_{np.dtype(dtype).name}.npz"
    np.savez(path, **{name: (rng.standard_normal((samples, *shape)) * scale).astype(dtype)})
    return path


def _run(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, list[str]]:
    code = cli.main([str(arg) for arg in args])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def _assert_failed(code: int, err: list[str], expected_code: int, *phrases: str,
                   folder: Path | None = None, before: set[str] | None = None) -> None:
    assert code == expected_code, err
    assert len(err) == 1, err
    assert err[0].startswith("onnx-spectral: error: ")
    for phrase in phrases:
        assert phrase in err[0], err[0]
    if folder is not None:
        assert {p.name for p in folder.iterdir()} == (before or set())


# ---------------------------------------------------------------------------------------------
# bad arguments: 2


@pytest.mark.parametrize("ratio", ["0", "1.5", "-0.2", "nan"])
def test_ratio_outside_zero_one(capsys, tmp_path: Path, model_path: Path, ratio: str) -> None:
    before = {p.name for p in tmp_path.iterdir()}
    code, err = _run(capsys, model_path, tmp_path / "out.onnx", "--calib", "random",
                     "--ratio", ratio, *FAST)
    _assert_failed(code, err, 2, f"--ratio {float(ratio)}", "(0, 1]", folder=tmp_path,
                   before=before)


@pytest.mark.parametrize(("args", "phrase"), [
    (["--ratio", "half"], "argument --ratio: invalid float value: 'half'"),
    (["--calib", "random", "--bogus"], "unrecognized arguments: --bogus"),
    (["--provider", "tpu"], "invalid choice: 'tpu'"),
    ([], "give --calib DATA, or --stats STATS.npz"),
])
def test_argparse_errors_are_one_line_with_code_2(capsys, tmp_path: Path, model_path: Path,
                                                  args: list[str], phrase: str) -> None:
    code, err = _run(capsys, model_path, tmp_path / "out.onnx", *args)
    _assert_failed(code, err, 2, phrase, "--help")


def test_help_exits_zero(capsys) -> None:
    assert cli.main(["--help"]) == 0
    assert "--ratio" in capsys.readouterr().out


def test_output_equal_to_input(capsys, model_path: Path) -> None:
    data = model_path.read_bytes()
    code, err = _run(capsys, model_path, model_path, "--calib", "random", *FAST)
    _assert_failed(code, err, 2, "is the input model")
    assert model_path.read_bytes() == data


def test_report_equal_to_output(capsys, tmp_path: Path, model_path: Path) -> None:
    out = tmp_path / "out.onnx"
    code, err = _run(capsys, model_path, out, "--calib", "random", "--report", out, *FAST)
    _assert_failed(code, err, 2, "--report", "is the input or the output model")


def test_output_folder_is_a_file(capsys, tmp_path: Path, model_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code, err = _run(capsys, model_path, blocker / "sub" / "out.onnx", "--calib", "random",
                     *FAST)
    _assert_failed(code, err, 2, "is not a folder")


def test_output_folder_not_writable(capsys, tmp_path: Path, model_path: Path) -> None:
    # /proc refuses new files even to root; a chmod-ed folder would not stop root
    code, err = _run(capsys, model_path, "/proc/onnx-spectral-out.onnx", "--calib", "random",
                     *FAST)
    _assert_failed(code, err, 2, "folder '/proc' is not writable")


def test_output_is_a_folder(capsys, tmp_path: Path, model_path: Path) -> None:
    code, err = _run(capsys, model_path, tmp_path, "--calib", "random", *FAST)
    _assert_failed(code, err, 2, "is a folder")


# ---------------------------------------------------------------------------------------------
# unreadable or invalid model: 3


def test_missing_model(capsys, tmp_path: Path) -> None:
    code, err = _run(capsys, tmp_path / "nope.onnx", tmp_path / "out.onnx", "--calib", "random")
    _assert_failed(code, err, 3, "nope.onnx", "does not exist", folder=tmp_path)


def test_not_onnx(capsys, tmp_path: Path) -> None:
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a model\n" * 50)
    code, err = _run(capsys, text, tmp_path / "out.onnx", "--calib", "random")
    _assert_failed(code, err, 3, "notes.onnx", folder=tmp_path, before={"notes.onnx"})


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.1])
def test_truncated_model(capsys, tmp_path: Path, model_path: Path, keep: float) -> None:
    data = model_path.read_bytes()
    model_path.write_bytes(data[: int(len(data) * keep)])
    code, err = _run(capsys, model_path, tmp_path / "out.onnx", "--calib", "random")
    _assert_failed(code, err, 3, "in.onnx", folder=tmp_path, before={"in.onnx"})


@pytest.mark.parametrize("seed", range(8))
def test_corrupted_model_never_crashes(capsys, tmp_path: Path, model_path: Path,
                                       seed: int) -> None:
    """Random bytes overwritten: either a clean model error or (if the damage hit only
    weight values) a successful run; never an internal error or a traceback."""
    data = bytearray(model_path.read_bytes())
    rng = np.random.default_rng(seed)
    for position in rng.integers(0, len(data), size=12):
        data[position] = int(rng.integers(0, 256))
    model_path.write_bytes(bytes(data))
    out = tmp_path / "out.onnx"
    code, err = _run(capsys, model_path, out, "--calib", "random", *FAST)
    assert code in (0, 3, 4, 5), err
    if code:
        assert len(err) == 1 and err[0].startswith("onnx-spectral: error: "), err
        assert not out.exists()
    else:
        onnx.checker.check_model(str(out))


def test_opset_outside_range(capsys, tmp_path: Path) -> None:
    path = tmp_path / "old.onnx"
    model = graphs.conv_sandwich()
    model.opset_import[0].version = 8
    onnx.save_model(model, str(path))
    code, err = _run(capsys, path, tmp_path / "out.onnx", "--calib", "random")
    _assert_failed(code, err, 3, "opset 8", "accepted: opsets 9 to")


def test_model_that_onnx_runtime_cannot_run(capsys, tmp_path: Path) -> None:
    """Passes the checker, fails in ONNX Runtime (group count does not divide the channels)."""
    path = tmp_path / "grouped.onnx"
    onnx.save_model(graphs.conv_sandwich(graphs.grouped_conv), str(path))
    code, err = _run(capsys, path, tmp_path / "out.onnx", "--calib", "random", *FAST,
                     "--allow-unchanged")
    _assert_failed(code, err, 3, "ONNX Runtime cannot run the input model", "gconv",
                   folder=tmp_path, before={"grouped.onnx"})


def test_analyze_missing_model(capsys, tmp_path: Path) -> None:
    code, err = _run(capsys, "analyze", tmp_path / "nope.onnx")
    _assert_failed(code, err, 3, "does not exist")


# ---------------------------------------------------------------------------------------------
# calibration data that does not fit: 4


@pytest.mark.parametrize(("kwargs", "phrases"), [
    ({"name": "image"}, ("'image'", "'x'")),
    ({"dtype": np.complex64}, ("'x'", "complex64")),
    ({"shape": (3, 8)}, ("'x'",)),
    ({"shape": (4, 8, 8)}, ("'x'",)),
    ({"samples": 0}, ("0 samples",)),
])
def test_calibration_data_that_does_not_fit(capsys, tmp_path: Path, model_path: Path,
                                            kwargs: dict, phrases: tuple[str, ...]) -> None:
    data = _data(tmp_path, **kwargs)
    before = {p.name for p in tmp_path.iterdir()}
    code, err = _run(capsys, model_path, tmp_path / "out.onnx", "--calib", data, *FAST)
    _assert_failed(code, err, 4, *phrases, folder=tmp_path, before=before)


def test_nan_in_inputs_names_input_and_sample(capsys, tmp_path: Path, model_path: Path) -> None:
    array = np.random.default_rng(0).standard_normal((32, 3, 8, 8)).astype(np.float32)
    array[13, 1, 2, 3] = np.inf
    np.savez(tmp_path / "d.npz", x=array)
    code, err = _run(capsys, model_path, tmp_path / "out.onnx", "--calib", tmp_path / "d.npz",
                     *FAST)
    _assert_failed(code, err, 4, "input 'x': sample 13 holds NaN or Inf")
    array[13, 1, 2, 3] = np.nan
    np.savez(tmp_path / "d.npz", x=array)
    code, err = _run(capsys, model_path, tmp_path / "out.onnx", "--calib", tmp_path / "d.npz",
                     *FAST)
    _assert_failed(code, err, 4, "input 'x': sample 13 holds NaN or Inf")


def test_overflowing_activation_names_the_tensor(capsys, tmp_path: Path,
                                                 model_path: Path) -> None:
    """Finite inputs whose squares overflow float32 inside the Gram tap of conv1's output."""
    data = _data(tmp_path, scale=1e19)
    code, err = _run(capsys, model_path, tmp_path / "out.onnx", "--calib", data, *FAST,
                     "--batch-size", "8")
    _assert_failed(code, err, 4, "tensor 'conv1'", "NaN or Inf", "calibration samples 0..7")


def test_fewer_samples_than_channels_warns(tmp_path: Path) -> None:
    model = graphs.gemm_mlp(trans_b=1)  # hidden group of 9 channels, one row per sample
    x = np.random.default_rng(0).standard_normal((6, 12)).astype(np.float32)
    _, report = compress(model, {"x": x}, provider="cpu", calib_samples=5, verify_samples=1)
    [note] = [w for w in report.warnings if "Gram matrix is singular" in w]
    assert "5 calibration rows" in note and "9 channels" in note
    _, report = compress(model, {"x": np.tile(x, (4, 1))}, provider="cpu", calib_samples=20,
                         verify_samples=4)
    assert not [w for w in report.warnings if "singular" in w]


# ---------------------------------------------------------------------------------------------
# safety check failed: 5


def test_broken_rewrite_fails_the_safety_check(capsys, monkeypatch, tmp_path: Path,
                                               model_path: Path) -> None:
    """A rewrite bug (a node reading a tensor nobody produces) is caught before writing."""
    from onnx_spectral import rewrite as rewrite_module

    real_finish = rewrite_module._Editor.finish

    def broken(self: rewrite_module._Editor) -> onnx.ModelProto:
        model = real_finish(self)
        model.graph.node[-1].input[0] = "nowhere"
        return model

    monkeypatch.setattr(rewrite_module._Editor, "finish", broken)
    code, err = _run(capsys, model_path, tmp_path / "out.onnx", "--calib", "random", *FAST)
    _assert_failed(code, err, 5, "the compressed model fails the ONNX checker", "conv2",
                   folder=tmp_path, before={"in.onnx"})


# ---------------------------------------------------------------------------------------------
# nothing prunable: 6; internal error: 1; interrupted: 130


def test_nothing_prunable(capsys, tmp_path: Path) -> None:
    path = tmp_path / "frozen.onnx"
    onnx.save_model(graphs.conv_output_is_graph_output(), str(path))
    code, err = _run(capsys, path, tmp_path / "out.onnx", "--calib", "random", *FAST)
    _assert_failed(code, err, 6, "no channel group of the model can be pruned",
                   "--allow-unchanged", folder=tmp_path, before={"frozen.onnx"})
    code = cli.main([str(path), str(tmp_path / "out.onnx"), "--calib", "random", *FAST,
                     "--allow-unchanged"])
    assert code == 0
    assert (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize(("exception", "expected"), [
    (ValueError("boom"), 1), (KeyboardInterrupt(), 130), (MemoryError(), 7)])
def test_unexpected_exceptions_write_nothing(capsys, monkeypatch, tmp_path: Path,
                                             model_path: Path, exception: BaseException,
                                             expected: int) -> None:
    def explode(*args: object, **kwargs: object) -> None:
        raise exception

    monkeypatch.setattr("onnx_spectral.api.rewrite", explode)
    code, err = _run(capsys, model_path, tmp_path / "out.onnx", "--calib", "random", *FAST)
    assert code == expected
    assert len(err) == 1 and "no output was written" in err[0], err
    assert {p.name for p in tmp_path.iterdir()} == {"in.onnx"}


# ---------------------------------------------------------------------------------------------
# through a real process: one line, no traceback


@pytest.mark.parametrize(("args", "expected"), [
    (["{tmp}/nope.onnx", "{tmp}/out.onnx", "--calib", "random"], 3),
    (["{model}", "{tmp}/out.onnx", "--calib", "random", "--ratio", "2"], 2),
    (["{model}", "{tmp}/out.onnx", "--calib", "{tmp}/missing.npz"], 4),
])
def test_subprocess_exit_codes(tmp_path: Path, model_path: Path, args: list[str],
                               expected: int) -> None:
    argv = [arg.format(tmp=tmp_path, model=model_path) for arg in args]
    result = subprocess.run([sys.executable, "-m", "onnx_spectral.cli", *argv],
                            capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert result.returncode == expected, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnx-spectral: error: "), result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out.onnx").exists()
