"""Calibration that runs out of memory: the batch is halved until it fits, and the run goes on.

The failure is injected: the ONNX Runtime session is wrapped so that a run on more than
`limit` samples raises what ORT or numpy raise when an allocation fails.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from onnx_spectral import cli, compress
from onnx_spectral.analysis import analyze
from onnx_spectral.calibration.collect import calibrate
from onnx_spectral.calibration.instrument import instrument
from onnx_spectral.errors import ResourceError
from onnx_spectral.graph.sessions import open_session
from tests import graphs

ORT_MESSAGE = ("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code returned "
               "while running Gemm node. Status Message: Failed to allocate memory for requested "
               "buffer of size 1073741824")


class _Limited:
    """A session that fails like an out-of-memory allocation above `limit` samples.

    Calibration runs through I/O binding: the binding's bound input size decides the failure.
    """

    def __init__(self, session: Any, limit: int, error: BaseException) -> None:
        self.session = session
        self.limit = limit
        self.error = error
        self.sizes: list[int] = []
        self._bound = 0

    def get_providers(self) -> list[str]:
        return self.session.get_providers()

    def io_binding(self) -> _LimitedBinding:
        return _LimitedBinding(self, self.session.io_binding())

    def run_with_iobinding(self, binding: _LimitedBinding) -> None:
        self.sizes.append(self._bound)
        if self._bound > self.limit:
            raise self.error
        self.session.run_with_iobinding(binding.binding)


class _LimitedBinding:
    """An ORT IOBinding that tells its session how many samples were bound."""

    def __init__(self, owner: _Limited, binding: Any) -> None:
        self.owner = owner
        self.binding = binding

    def bind_cpu_input(self, name: str, array: np.ndarray) -> None:
        self.owner._bound = len(array)
        self.binding.bind_cpu_input(name, array)

    def bind_output(self, name: str, device: str) -> None:
        self.binding.bind_output(name, device)

    def copy_outputs_to_cpu(self) -> list[Any]:
        return self.binding.copy_outputs_to_cpu()


def _inject(monkeypatch: pytest.MonkeyPatch, limit: int, error: BaseException) -> list[_Limited]:
    sessions: list[_Limited] = []

    def limited(model: onnx.ModelProto, provider: str) -> _Limited:
        sessions.append(_Limited(open_session(model, provider), limit, error))
        return sessions[-1]

    monkeypatch.setattr("onnx_spectral.calibration.collect.open_session", limited)
    return sessions


def _batches(samples: int, batch: int) -> list[dict[str, np.ndarray]]:
    x = np.random.default_rng(0).standard_normal((samples, 3, 8, 8)).astype(np.float32)
    return [{"x": x[i:i + batch]} for i in range(0, samples, batch)]


@pytest.mark.parametrize("error", [MemoryError(), RuntimeError(ORT_MESSAGE)])
def test_batch_is_halved_and_statistics_are_unchanged(monkeypatch, error) -> None:
    analysis = analyze(graphs.residual_block())
    instrumented = instrument(analysis.graph, analysis.taps)
    reference = calibrate(instrumented, _batches(70, 32), "cpu")
    sessions = _inject(monkeypatch, 5, error)
    halved = calibrate(instrumented, _batches(70, 32), "cpu")
    # 32 fails, 16 fails, 8 fails, 4 fits; later batches go straight to 4
    assert sessions[0].sizes[:4] == [32, 16, 8, 4]
    assert max(sessions[0].sizes[4:]) == 4
    assert halved.samples == reference.samples == 70
    for tensor, stats in reference.taps.items():
        np.testing.assert_allclose(halved.taps[tensor].gram, stats.gram, rtol=1e-5)
        np.testing.assert_allclose(halved.taps[tensor].total, stats.total, rtol=1e-4, atol=1e-6)
        assert halved.taps[tensor].count == stats.count
    assert halved.notes == ("calibration ran out of memory with batches of 32 samples and went "
                            "on with batches of 4: pass --batch-size 4",)
    assert not reference.notes


def test_note_reaches_the_report(monkeypatch) -> None:
    _inject(monkeypatch, 3, MemoryError())
    x = np.random.default_rng(0).standard_normal((40, 3, 8, 8)).astype(np.float32)
    _, report = compress(graphs.residual_block(), {"x": x}, provider="cpu", calib_samples=32,
                         verify_samples=8, batch_size=16)
    assert any("pass --batch-size 2" in warning for warning in report.warnings)


def test_not_even_one_sample_fits(monkeypatch, capsys, tmp_path: Path) -> None:
    _inject(monkeypatch, 0, RuntimeError(ORT_MESSAGE))
    analysis = analyze(graphs.residual_block())
    with pytest.raises(ResourceError, match="even with a batch of 1 sample"):
        calibrate(instrument(analysis.graph, analysis.taps), _batches(8, 8), "cpu")
    model = tmp_path / "in.onnx"
    onnx.save_model(graphs.residual_block(), str(model))
    code = cli.main([str(model), str(tmp_path / "out.onnx"), "--calib", "random",
                     "--provider", "cpu", "--calib-samples", "8", "--verify-samples", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 7 and len(err) == 1 and "even with a batch of 1 sample" in err[0]
    assert not (tmp_path / "out.onnx").exists()


def test_other_runtime_errors_are_not_taken_for_memory(monkeypatch) -> None:
    sessions = _inject(monkeypatch, 0, RuntimeError("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT"))
    analysis = analyze(graphs.residual_block())
    with pytest.raises(Exception, match="ONNX Runtime fails on calibration samples 0..7"):
        calibrate(instrument(analysis.graph, analysis.taps), _batches(8, 8), "cpu")
    assert sessions[0].sizes == [8]
