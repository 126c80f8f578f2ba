"""Property-based fuzzer: random CNN graphs (tests/fuzz_graphs.py) through `compress`.

For every generated graph: each channel group is pruned to ceil(ratio * channels) (summed
over its parts when a Concat or Split cuts it) or frozen
with a reason; the output passes the full ONNX checker and runs in ONNX Runtime with the
original output names and shapes; and with every channel kept (ratio 1, ridge 1e-9) it
reproduces the original outputs.

CI runs 200 examples (a fixed, derandomized sequence). The long run:

    ONNX_SPECTRAL_FUZZ_EXAMPLES=5000 python -m pytest -q tests/test_fuzz.py
"""

from __future__ import annotations

import math
import os

import numpy as np
import onnx
import onnxruntime as ort
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from onnx_spectral import compress
from tests.fuzz_graphs import cnn_graphs

EXAMPLES = int(os.environ.get("ONNX_SPECTRAL_FUZZ_EXAMPLES", "200"))
FAST = {"provider": "cpu", "calib_samples": 16, "verify_samples": 4, "batch_size": 8}


def _inputs(model: onnx.ModelProto, samples: int, seed: int) -> dict[str, np.ndarray]:
    """Random inputs; symbolic spatial dims get size 5."""
    dims = [d.dim_value or 5 for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]
    x = np.random.default_rng(seed).standard_normal((samples, *dims)).astype(np.float32)
    return {model.graph.input[0].name: x}


def _run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(names, feed), strict=True))


def _interface(model: onnx.ModelProto) -> list[tuple[str, list[str | int]]]:
    return [(value.name, [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim])
            for value in model.graph.output]


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(model=cnn_graphs(), ratio=st.sampled_from([0.25, 0.5, 0.75]))
def test_random_graphs(model: onnx.ModelProto, ratio: float) -> None:
    calibration = _inputs(model, 20, seed=1)
    fresh = _inputs(model, 3, seed=2)
    want = _run(model, fresh)

    compressed, report = compress(model, calibration, ratio=ratio, **FAST)
    pruned = sum(not group.frozen for group in report.groups)
    event(f"groups pruned: {min(pruned, 3)}{'+' if pruned >= 3 else ''}")
    event(f"groups frozen: {min(len(report.groups) - pruned, 3)}")
    for group in report.groups:
        if group.frozen:
            assert group.kept == group.channels and all(group.frozen)
        else:  # ceil(ratio * m) exactly, or per part when a Concat/Split cuts the group
            assert math.ceil(ratio * group.channels) <= group.kept <= group.channels, group
    onnx.checker.check_model(compressed, full_check=True)
    assert _interface(compressed) == _interface(model)
    got = _run(compressed, fresh)
    assert list(got) == list(want)
    for name in want:
        assert got[name].shape == want[name].shape, name
        assert np.isfinite(got[name]).all(), name

    whole, report = compress(model, calibration, ratio=1.0, ridge=1e-9, **FAST)
    assert all(group.kept == group.channels for group in report.groups)
    got = _run(whole, fresh)
    for name in want:
        scale = float(np.abs(want[name]).max())
        np.testing.assert_allclose(got[name], want[name], rtol=1e-3, atol=1e-3 * scale,
                                   err_msg=name)
