"""tools/bench_quality.py measures what users run: its per-method compression goes through the
steps of `compress` (api.py) and gives the same model as `compress` with the same options.

Tiny graphs: a residual block (compensation and refit apply) and a C2f block (a Concat/Split
group: compensation is switched off by the rule `compress` applies).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnx_spectral import compress
from tests import graphs, graphs_coverage
from tools.bench_quality import BASE, METHODS, Task, compress_with, shared_stages


def _task(model: onnx.ModelProto, tmp_path: Path) -> Task:
    path = tmp_path / "model.onnx"
    onnx.save_model(model, str(path))
    rng = np.random.default_rng(0)
    data = rng.standard_normal((48, 3, 8, 8)).astype(np.float32)
    batches = [{"x": data[start:start + 16]} for start in range(0, 48, 16)]
    return Task(path, batches, lambda model: (0.0, ""))


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}


@pytest.mark.parametrize("build", [graphs.residual_block, graphs_coverage.c2f],
                         ids=["residual", "c2f"])
@pytest.mark.parametrize("method", ["defaults", "spectral, uniform + compensation + refit",
                                    "L1-norm, no reconstruction"])
def test_bench_method_equals_compress(build, method: str, tmp_path: Path) -> None:
    task = _task(build(), tmp_path)
    stages = shared_stages(task)
    model, kept = compress_with(stages, 0.6, METHODS[method])
    options = dataclasses.replace(BASE, calib_samples=48, flops=0.6, **METHODS[method])
    expected, report = compress(task.model, task.calibration, options)
    assert kept == pytest.approx(report.cost_after.macs / report.cost_before.macs, rel=1e-6)
    ours, theirs = _weights(model), _weights(expected)
    assert ours.keys() == theirs.keys()
    for name, value in theirs.items():
        np.testing.assert_allclose(ours[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    compensation_skipped = any("compensation was skipped" in note for note in report.notes)
    assert compensation_skipped == (build is graphs_coverage.c2f
                                    and METHODS[method].get("compensation", False))
