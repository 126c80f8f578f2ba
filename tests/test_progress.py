"""Progress bars: one per pass over the data (calibration, each compensation pass, each refit
layer, verification) when asked for, none otherwise; `--quiet` turns them off on a terminal."""

from __future__ import annotations

import numpy as np
import pytest

from onnx_spectral import compress
from onnx_spectral.cli import _compress_parser, _progress
from tests.test_compensate import three_convs


def _data() -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(0).standard_normal((96, 3, 8, 8)).astype(np.float32)}


def test_every_pass_shows_a_bar(capsys: pytest.CaptureFixture[str]) -> None:
    compress(three_convs(), _data(), ratio=0.5, batch_size=16, provider="cpu", progress=True)
    shown = capsys.readouterr().err
    for label in ("calibrating", "compensation pass 2/2", "refit conv2", "verifying",
                  "held-out statistics"):
        assert label in shown, label
    assert "sample/s" in shown  # a rate, and an estimate with the total known


def test_no_bar_unless_asked(capsys: pytest.CaptureFixture[str]) -> None:
    compress(three_convs(), _data(), ratio=0.5, batch_size=16, provider="cpu")
    assert capsys.readouterr().err == ""


def test_quiet_turns_the_bars_off_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stderr.isatty", lambda: True)
    args = ["in.onnx", "out.onnx", "--calib", "data.npz"]
    assert _progress(_compress_parser().parse_args(args))
    assert not _progress(_compress_parser().parse_args([*args, "--quiet"]))
