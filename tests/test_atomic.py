"""Atomic writes and determinism: kill the CLI mid-write, the destination stays whole.

Each kill test runs the CLI in a subprocess whose write path is patched to SIGKILL (or SIGINT)
the process at a chosen point, then checks that the destination holds the old model (or the
new, complete one), and that nothing but the documented `.NAME.*.tmp` leftovers of a SIGKILL
remain.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnx_spectral import cli
from onnx_spectral.graph import atomic
from tests import graphs

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--provider", "cpu", "--calib-samples", "24", "--verify-samples", "8"]

_SCRIPT = r"""
import os, signal, sys, time
from onnx_spectral import cli
from onnx_spectral.graph import atomic

mode, argv = sys.argv[1], sys.argv[2:]
# a shell runs background jobs with SIGINT ignored; a user's Ctrl-C reaches the default handler
signal.signal(signal.SIGINT, signal.default_int_handler)
real_replace = os.replace
renames = []

def write_half(path, data):
    with open(path, "wb") as handle:
        handle.write(data[: len(data) // 2])
        handle.flush()
    os.kill(os.getpid(), signal.SIGINT if mode == "sigint-mid-write" else signal.SIGKILL)
    time.sleep(30)

def replace(source, target):
    renames.append(str(target))
    which, when = mode.split("-")[1:3]
    if len(renames) == int(which) and when == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    real_replace(source, target)
    if len(renames) == int(which) and when == "after":
        os.kill(os.getpid(), signal.SIGKILL)

if mode.endswith("mid-write"):
    atomic._write_bytes = write_half
else:
    os.replace = replace
sys.exit(cli.main(argv))
"""


def _cli(mode: str, *args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", _SCRIPT, mode, *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def _setup(tmp_path: Path, external: bool = False) -> tuple[Path, Path, list[str]]:
    """An input model and an old output (ratio 0.75) at the destination."""
    model = tmp_path / "in.onnx"
    onnx.save_model(graphs.residual_block(), str(model))
    out = tmp_path / "out.onnx"
    extra = ["--external-data"] if external else []
    assert cli.main([str(model), str(out), "--calib", "random", "--ratio", "0.75", *FAST,
                     *extra]) == 0
    return model, out, extra


def _files(folder: Path) -> set[str]:
    return {path.name for path in folder.iterdir()}


def _runs(path: Path) -> None:
    onnx.checker.check_model(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: np.ones((2, 3, 8, 8), np.float32)}
    assert np.isfinite(session.run(None, feed)[0]).all()


@pytest.mark.parametrize("mode", ["kill-mid-write", "kill-1-before"])
def test_kill_before_the_rename_keeps_the_old_file(tmp_path: Path, mode: str) -> None:
    model, out, _ = _setup(tmp_path)
    old = out.read_bytes()
    before = _files(tmp_path)
    result = _cli(mode, model, out, "--calib", "random", "--ratio", "0.5", *FAST)
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert out.read_bytes() == old
    left = _files(tmp_path) - before
    assert len(left) == 1 and next(iter(left)).startswith(".out.onnx.")
    assert next(iter(left)).endswith(".tmp")  # the documented SIGKILL leftover
    _runs(out)


def test_kill_after_the_rename_gives_the_new_complete_file(tmp_path: Path) -> None:
    model, out, _ = _setup(tmp_path)
    old = out.read_bytes()
    before = _files(tmp_path)
    result = _cli("kill-1-after", model, out, "--calib", "random", "--ratio", "0.5", *FAST)
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert out.read_bytes() != old
    assert _files(tmp_path) == before
    _runs(out)


def test_kill_without_an_old_file_leaves_no_destination(tmp_path: Path) -> None:
    model = tmp_path / "in.onnx"
    onnx.save_model(graphs.residual_block(), str(model))
    result = _cli("kill-mid-write", model, tmp_path / "out.onnx", "--calib", "random", *FAST)
    assert result.returncode == -signal.SIGKILL
    assert not (tmp_path / "out.onnx").exists()


def test_ctrl_c_mid_write_cleans_up(tmp_path: Path) -> None:
    model, out, _ = _setup(tmp_path)
    old = out.read_bytes()
    before = _files(tmp_path)
    result = _cli("sigint-mid-write", model, out, "--calib", "random", "--ratio", "0.5", *FAST)
    assert result.returncode == cli.INTERRUPTED, result.stderr
    assert "interrupted; no output was written" in result.stderr
    assert out.read_bytes() == old
    assert _files(tmp_path) == before  # the temporary was removed


@pytest.mark.parametrize("mode", ["kill-1-before", "kill-1-after", "kill-2-before"])
def test_kill_between_data_and_model_renames(tmp_path: Path, mode: str) -> None:
    """External data: the data file is renamed first (under a new, content-named file), the
    model second; the old model keeps reading its own data file until the model's rename."""
    model, out, extra = _setup(tmp_path, external=True)
    old = out.read_bytes()
    [old_data] = [name for name in _files(tmp_path) if name.endswith(".data")]
    result = _cli(mode, model, out, "--calib", "random", "--ratio", "0.5", *FAST, *extra)
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert out.read_bytes() == old
    assert old_data in _files(tmp_path)
    for name in _files(tmp_path) - {"in.onnx", "out.onnx", old_data}:  # documented leftovers
        assert (name.startswith(".out.onnx.") and name.endswith(".tmp")) or (
            name.startswith("out.onnx.") and name.endswith(".data")), name
    _runs(out)


def test_external_data_replaces_the_old_data_file(tmp_path: Path) -> None:
    model, out, extra = _setup(tmp_path, external=True)
    [old_data] = [name for name in _files(tmp_path) if name.endswith(".data")]
    assert cli.main([str(model), str(out), "--calib", "random", "--ratio", "0.5", *FAST,
                     *extra]) == 0
    [new_data] = [name for name in _files(tmp_path) if name.endswith(".data")]
    assert new_data != old_data and new_data.startswith("out.onnx.")
    assert _files(tmp_path) == {"in.onnx", "out.onnx", new_data}
    assert atomic.uses_external_data(onnx.load(str(out), load_external_data=False))
    _runs(out)


def test_input_with_external_data_gives_output_with_external_data(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    onnx.save_model(graphs.residual_block(), str(source / "in.onnx"),
                    save_as_external_data=True, location="in.weights", size_threshold=0)
    out = tmp_path / "out" / "pruned.onnx"
    assert cli.main([str(source / "in.onnx"), str(out), "--calib", "random", *FAST]) == 0
    names = _files(out.parent)
    assert len(names) == 2 and {n for n in names if n.endswith(".data")}
    assert atomic.uses_external_data(onnx.load(str(out), load_external_data=False))
    _runs(out)


def test_failed_check_writes_nothing(tmp_path: Path) -> None:
    model = graphs.residual_block()
    model.graph.node[0].op_type = "NoSuchOp"
    with pytest.raises(Exception, match="fails the ONNX checker"):
        atomic.save_model(model, tmp_path / "bad.onnx")
    assert _files(tmp_path) == set()


# ---------------------------------------------------------------------------------------------
# determinism


@pytest.mark.parametrize("extra", [[], ["--external-data"]])
def test_same_inputs_give_byte_identical_files(tmp_path: Path, extra: list[str]) -> None:
    model = tmp_path / "in.onnx"
    onnx.save_model(graphs.residual_block(), str(model))
    rng = np.random.default_rng(3)
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((40, 3, 8, 8)).astype(np.float32))
    outputs = []
    for run in range(2):
        folder = tmp_path / f"run{run}"
        assert cli.main([str(model), str(folder / "out.onnx"), "--calib",
                         str(tmp_path / "d.npz"), *FAST, *extra]) == 0
        outputs.append({path.name: path.read_bytes() for path in folder.iterdir()})
    assert outputs[0] == outputs[1]
    assert len(outputs[0]) == 1 + bool(extra)
    # a third run in a fresh process: no state carried by the interpreter
    folder = tmp_path / "run2"
    result = subprocess.run([sys.executable, "-m", "onnx_spectral.cli", str(model),
                             str(folder / "out.onnx"), "--calib", str(tmp_path / "d.npz"),
                             *FAST, *extra], capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert result.returncode == 0, result.stderr
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == outputs[0]


# ---------------------------------------------------------------------------------------------
# modes


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


@pytest.mark.parametrize(("mask", "expected"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_honour_the_umask(tmp_path: Path, mask: int, expected: int) -> None:
    """The model, its data file, the report and a statistics file get 0666 less the umask, as a
    plain open() (and onnx.save) gives."""
    model = tmp_path / "in.onnx"
    onnx.save_model(graphs.residual_block(), str(model))
    old = os.umask(mask)
    try:
        assert cli.main([str(model), str(tmp_path / "out.onnx"), "--calib", "random", *FAST,
                         "--external-data", "--report", str(tmp_path / "r.json")]) == 0
        assert cli.main(["calibrate", str(model), "--calib", "random", "--calib-samples", "8",
                         "--provider", "cpu", "-o", str(tmp_path / "s.npz")]) == 0
    finally:
        os.umask(old)
    written = [path for path in tmp_path.iterdir() if path.name != "in.onnx"]
    assert {path.suffix for path in written} == {".onnx", ".data", ".json", ".npz"}
    assert {path.name: _mode(path) for path in written} == {path.name: expected
                                                            for path in written}


def test_a_replaced_file_keeps_its_mode(tmp_path: Path) -> None:
    model, out, _ = _setup(tmp_path, external=True)
    report = tmp_path / "r.json"
    report.write_text("{}")
    out.chmod(0o640)
    report.chmod(0o604)
    assert cli.main([str(model), str(out), "--calib", "random", "--ratio", "0.5", *FAST,
                     "--external-data", "--report", str(report)]) == 0
    [data] = [path for path in tmp_path.iterdir() if path.suffix == ".data"]
    assert (_mode(out), _mode(data), _mode(report)) == (0o640, 0o640, 0o604)


def test_save_model_mode_without_external_data(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        atomic.save_model(graphs.residual_block(), tmp_path / "m.onnx")
        atomic.write_text(tmp_path / "t.txt", "x")
    finally:
        os.umask(old)
    assert (_mode(tmp_path / "m.onnx"), _mode(tmp_path / "t.txt")) == (0o640, 0o640)
    assert atomic.target_mode(tmp_path / "m.onnx") == 0o640
