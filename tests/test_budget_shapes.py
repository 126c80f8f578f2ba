"""MAC budgets at the shape the model runs at, for models with symbolic input dims.

The MACs of each model are counted independently of `onnx_spectral.cost` (`tests.mac_count`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnx_spectral import cli
from onnx_spectral.api import calibrate_statistics, compress
from onnx_spectral.cost import model_cost
from onnx_spectral.errors import OptionsError, UnsupportedGraphError
from tests import graphs
from tests.graphs import GraphBuilder
from tests.mac_count import independent_macs

FAST = {"provider": "cpu", "calib_samples": 48, "verify_samples": 8, "compensation": False,
        "refit": False}


def symbolic_convnet(seed: int = 0) -> onnx.ModelProto:
    """x [N, 3, h, w] -> conv1 (16) -> Relu -> conv2 (16, stride 2) -> Relu -> conv3 (8) ->
    GlobalAveragePool -> Flatten -> Gemm 'head' (4) -> y [N, 4]."""
    b = GraphBuilder(seed)
    t = b.node("Relu", [b.conv("x", "conv1", 3, 16)], "relu1")
    t = b.node("Conv", [t, b.random("conv2_w", (16, 16, 3, 3), fan_in=144)], "conv2",
               kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2])
    t = b.node("Relu", [t], "relu2")
    t = b.node("GlobalAveragePool", [b.conv(t, "conv3", 16, 8)], "pool")
    t = b.node("Flatten", [t], "flat")
    b.gemm(t, "head", 8, 4)
    return b.model([("x", ["N", 3, "h", "w"])], [("head", ["N", 4])])


def _macs(model: onnx.ModelProto, shape: tuple[int, ...]) -> int:
    return independent_macs(model, {"x": shape})


def _data(height: int, width: int, samples: int = 64) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {"x": rng.standard_normal((samples, 3, height, width)).astype(np.float32)}


def _kept(original: onnx.ModelProto, compressed: onnx.ModelProto,
          shape: tuple[int, ...]) -> float:
    return _macs(compressed, shape) / _macs(original, shape)


def test_the_independent_count_sees_the_spatial_size() -> None:
    model = symbolic_convnet()
    # conv1 32*48 * 16 * 27, conv2 16*24 * 16 * 144, conv3 16*24 * 8 * 144, head 8*4
    assert _macs(model, (1, 3, 32, 48)) == (
        32 * 48 * 16 * 27 + 16 * 24 * 16 * 144 + 16 * 24 * 8 * 144 + 32)
    cost = model_cost(model, {"x": (1, 3, 32, 48)})
    assert cost.macs == _macs(model, (1, 3, 32, 48))
    assert cost.complete and cost.input_shapes == {"x": (1, 3, 32, 48)}
    placeholder = model_cost(model)  # declared shapes: only the head is counted
    assert placeholder.macs == 32 and not placeholder.complete
    assert set(placeholder.uncounted) == {"conv1", "conv2", "conv3"}
    assert "--input-shape x:1,..." in placeholder.missing_shape_text()


@pytest.mark.parametrize("height, width", [(32, 48), (16, 96)])
def test_flops_half_keeps_half_of_the_macs_at_the_calibration_shape(height: int,
                                                                    width: int) -> None:
    model = symbolic_convnet()
    compressed, report = compress(model, _data(height, width), flops=0.5, **FAST)
    shape = (1, 3, height, width)
    kept = _kept(model, compressed, shape)
    assert 0.48 <= kept <= 0.5 + 1e-9, kept
    assert report.cost_before.input_shapes == {"x": shape}
    assert report.cost_before.macs == _macs(model, shape)
    assert report.cost_after.macs == _macs(compressed, shape)
    assert f"at x [1, 3, {height}, {width}]" in report.format()
    assert report.to_dict()["macs"]["input_shapes"] == {"x": list(shape)}


def test_input_shape_option_overrides_the_data_shape() -> None:
    model = symbolic_convnet()
    shape = (1, 3, 64, 64)
    compressed, report = compress(model, _data(32, 48), flops=0.5, input_shape={"x": shape},
                                  **FAST)
    assert report.cost_before.input_shapes == {"x": shape}
    assert 0.48 <= _kept(model, compressed, shape) <= 0.5 + 1e-9
    with pytest.raises(OptionsError, match="does not fit the model's input 'x'"):
        compress(model, _data(32, 48), flops=0.5, input_shape=["x:1,4,64,64"], **FAST)
    with pytest.raises(OptionsError, match="not an input of the model"):
        compress(model, _data(32, 48), flops=0.5, input_shape=["y:1,3,64,64"], **FAST)


def test_a_budget_that_cannot_be_met_is_an_error() -> None:
    model = symbolic_convnet()
    # every group keeps at least 12 of its 16 (8 of 8) channels: over half of the MACs
    with pytest.raises(OptionsError, match=r"--flops 0.5 cannot be met: .* keep 0\.\d+"):
        compress(model, _data(32, 48), flops=0.5, min_keep=12, **FAST)
    frozen = graphs.conv_output_is_graph_output()
    data = {"x": np.random.default_rng(0).standard_normal((32, 3, 8, 8)).astype(np.float32)}
    for allow_unchanged in (True, False):  # require_prunable False: --allow-unchanged
        with pytest.raises(UnsupportedGraphError, match="--flops 0.5 cannot be met"):
            compress(frozen, data, flops=0.5, require_prunable=not allow_unchanged, **FAST)
    # ratio runs keep their --allow-unchanged semantics
    unchanged, _ = compress(frozen, data, ratio=0.5, require_prunable=False, **FAST)
    assert len(unchanged.graph.node) == len(frozen.graph.node)


def test_flops_without_a_shape_for_symbolic_dims_is_an_error() -> None:
    model = symbolic_convnet()
    saved = calibrate_statistics(model, _data(32, 48), **FAST)
    with pytest.raises(OptionsError, match="MACs are not known .* --input-shape x:"):
        compress(model, None, statistics=saved, flops=0.5, **FAST)
    compressed, report = compress(model, None, statistics=saved, flops=0.5,
                                  input_shape=["x:1,3,32,48"], **FAST)
    assert 0.48 <= _kept(model, compressed, (1, 3, 32, 48)) <= 0.5 + 1e-9
    # ratio runs need no MACs: they report the lower bound and say so
    _, report = compress(model, None, statistics=saved, ratio=0.5, **FAST)
    assert "a lower bound" in report.format()


def test_cli_unmet_budget_exits_non_zero_and_writes_nothing(capsys: pytest.CaptureFixture[str],
                                                            tmp_path: Path) -> None:
    path, data = tmp_path / "in.onnx", tmp_path / "x.npz"
    onnx.save_model(symbolic_convnet(), str(path))
    np.savez(data, **_data(32, 48))
    code = cli.main([str(path), str(tmp_path / "out.onnx"), "--calib", str(data), "--flops",
                     "0.5", "--min-keep", "12", "--provider", "cpu", "--no-refit",
                     "--no-compensation"])
    assert code == 2
    assert "cannot be met" in capsys.readouterr().err
    assert not (tmp_path / "out.onnx").exists()


def test_cli_analyze_counts_at_the_given_input_shape(capsys: pytest.CaptureFixture[str],
                                                     tmp_path: Path) -> None:
    model = symbolic_convnet()
    path = tmp_path / "in.onnx"
    onnx.save_model(model, str(path))
    macs = _macs(model, (1, 3, 48, 192))
    assert cli.main(["analyze", str(path), "--input-shape", "x:1,3,48,192"]) == 0
    assert f"MACs/sample: {macs:,}, at x [1, 3, 48, 192]" in capsys.readouterr().out
    assert cli.main(["analyze", str(path), "--input-shape", "1,3,48,192", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["macs"] == macs and listed["input_shapes"] == {"x": [1, 3, 48, 192]}
    assert cli.main(["analyze", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "MACs/sample: unknown; at least 32" in printed and "--input-shape x:1," in printed
    assert cli.main(["analyze", str(path), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["macs"] is None and listed["macs_counted"] == 32
    assert sorted(listed["uncounted"]) == ["conv1", "conv2", "conv3"]


def test_cli_input_shape_is_repeatable(tmp_path: Path) -> None:
    args = cli._compress_parser().parse_args(
        ["in.onnx", "out.onnx", "--input-shape", "a:1,2", "--input-shape", "b:1,3", "c:4"])
    assert cli._options(args).input_shape == (("a", (1, 2)), ("b", (1, 3)), ("c", (4,)))
    with pytest.raises(OptionsError, match="whole numbers"):
        cli._compress_parser().parse_args(["in.onnx", "out.onnx", "--input-shape", "x:1,h"])
