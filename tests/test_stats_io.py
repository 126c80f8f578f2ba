"""Sharded calibration: saved statistics, merging, and compressing from them.

    x [N,3,8,8] -> Conv 'conv1' (16) -> Relu 'relu1' -> Conv 'conv2' (12) -> Relu 'relu2'
                -> Conv 'conv3' (5) -> y

Groups of conv1 (16 channels) and conv2 (12) are prunable; conv3 feeds the output.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnx_spectral import compress
from onnx_spectral.api import calibrate_statistics
from onnx_spectral.calibration.stats_files import (
    Shard,
    load_statistics,
    merge_statistics,
    model_fingerprint,
    save_statistics,
)
from onnx_spectral.cli import main
from onnx_spectral.errors import OptionsError, StatisticsError
from tests.graphs import GraphBuilder

SAMPLES = 150


def _model(seed: int = 0) -> onnx.ModelProto:
    b = GraphBuilder(seed)
    t = b.node("Relu", [b.conv("x", "conv1", 3, 16)], "relu1")
    t = b.node("Relu", [b.conv(t, "conv2", 16, 12)], "relu2")
    b.conv(t, "conv3", 12, 5)
    return b.model([("x", ["N", 3, 8, 8])], [("conv3", ["N", 5, 8, 8])])


def _data(samples: int = SAMPLES + 40) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    # correlated channels, so that selection has real choices to make
    mix = rng.normal(size=(3, 3)).astype(np.float32)
    x = rng.normal(size=(samples, 8, 8, 3)).astype(np.float32) @ mix
    return {"x": np.ascontiguousarray(x.transpose(0, 3, 1, 2))}


def _kept(model: onnx.ModelProto) -> dict[str, int]:
    return {init.name: int(numpy_helper.to_array(init).shape[0])
            for init in model.graph.initializer if "_w" in init.name}


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}


@pytest.mark.parametrize("count", [2, 3])
def test_merged_shards_equal_one_run(count: int) -> None:
    model, data = _model(), _data()
    options = {"calib_samples": SAMPLES, "verify_samples": 40, "batch_size": 7,
               "provider": "cpu"}
    whole = calibrate_statistics(model, data, **options)
    parts = [calibrate_statistics(model, data, shard=Shard(i, count), **options)
             for i in range(1, count + 1)]
    assert sorted(part.statistics.samples for part in parts)[0] >= SAMPLES // count
    merged = merge_statistics(parts, [f"part{i}" for i in range(count)])
    assert merged.statistics.samples == whole.statistics.samples == SAMPLES
    assert merged.missing_shards() == []
    for key in whole.taps:
        one, sharded = whole.statistics[key.tensor], merged.statistics[key.tensor]
        assert sharded.count == one.count == SAMPLES * 64
        np.testing.assert_allclose(sharded.gram, one.gram, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(sharded.total, one.total, rtol=1e-6, atol=1e-6)

    # saved statistics are parallel statistics: compare with a run without compensation (and
    # without the layer refit, which needs calibration batches)
    direct, direct_report = compress(model, data, ratio=0.5, compensation=False, refit=False,
                                     **options)
    from_stats, stats_report = compress(model, data, ratio=0.5, statistics=merged, **options)
    assert _kept(from_stats) == _kept(direct) == {"conv1_w__conv1": 8, "conv2_w__conv2": 6,
                                                   "conv3_w__conv3": 5}
    for name, value in _weights(direct).items():
        np.testing.assert_allclose(_weights(from_stats)[name], value, rtol=1e-4, atol=1e-5)
    # the same held-out samples follow the calibration range in both runs
    assert stats_report.verification is not None and direct_report.verification is not None
    assert stats_report.verification.samples == direct_report.verification.samples == 40
    assert (stats_report.verification.outputs[0].relative_error
            == pytest.approx(direct_report.verification.outputs[0].relative_error, rel=1e-4))


def test_file_round_trip_and_refusals(tmp_path: Path) -> None:
    model, data = _model(), _data()
    saved = calibrate_statistics(model, data, calib_samples=SAMPLES, provider="cpu",
                                 shard=Shard(2, 3))
    path = tmp_path / "s.npz"
    save_statistics(path, saved)
    loaded = load_statistics(path)
    assert loaded.model_sha256 == model_fingerprint(model) == saved.model_sha256
    assert loaded.taps == saved.taps and loaded.shards == (Shard(2, 3),)
    assert loaded.missing_shards() == ["1/3", "3/3"]
    for key in saved.taps:
        np.testing.assert_array_equal(loaded.statistics[key.tensor].gram,
                                      saved.statistics[key.tensor].gram)

    with pytest.raises(StatisticsError, match="another model"):
        compress(_model(seed=1), data, statistics=path)
    with pytest.raises(StatisticsError, match="would count twice"):
        merge_statistics([loaded, saved], ["a", "b"])
    other = calibrate_statistics(_model(seed=1), data, calib_samples=SAMPLES, provider="cpu",
                                 shard=Shard(1, 3))
    with pytest.raises(StatisticsError, match="another model"):
        merge_statistics([loaded, other], ["a", "b"])
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(StatisticsError, match="bad.npz"):
        load_statistics(tmp_path / "bad.npz")


@pytest.mark.parametrize("text", ["0/2", "3/2", "1", "a/b"])
def test_bad_shard_is_refused(text: str) -> None:
    with pytest.raises(OptionsError, match="--shard"):
        Shard.parse(text)


def test_shard_bounds_partition_the_range() -> None:
    bounds = [Shard(i, 4).bounds(10) for i in range(1, 5)]
    assert bounds == [(0, 2), (2, 5), (5, 7), (7, 10)]


def test_cli_calibrate_merge_compress(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                      ) -> None:
    model_path, data_path = tmp_path / "in.onnx", tmp_path / "data.npz"
    onnx.save_model(_model(), str(model_path))
    np.savez(data_path, **_data())
    common = ["--calib-samples", str(SAMPLES), "--provider", "cpu"]
    for index in (1, 2):
        assert main(["calibrate", str(model_path), "--calib", str(data_path), "--shard",
                     f"{index}/2", "-o", str(tmp_path / f"s{index}.npz"), *common]) == 0
    assert main(["merge-stats", str(tmp_path / "s1.npz"), str(tmp_path / "s2.npz"),
                 "-o", str(tmp_path / "s.npz")]) == 0
    assert main([str(model_path), str(tmp_path / "out.onnx"), "--stats",
                 str(tmp_path / "s.npz"), "--calib", str(data_path)]) == 0
    printed = capsys.readouterr().out
    assert f"calibration samples: {SAMPLES}" in printed
    assert "held-out verification on 40 samples" in printed
    assert "seconds: load " in printed and " select " in printed
    # without --calib there is no verification, but the model is written
    assert main([str(model_path), str(tmp_path / "out2.onnx"), "--stats",
                 str(tmp_path / "s.npz")]) == 0
    assert _kept(onnx.load(str(tmp_path / "out2.onnx")))["conv1_w__conv1"] == 8
    # a model the statistics were not made from: exit code 4, nothing written
    onnx.save_model(_model(seed=2), str(tmp_path / "other.onnx"))
    assert main([str(tmp_path / "other.onnx"), str(tmp_path / "out3.onnx"), "--stats",
                 str(tmp_path / "s.npz")]) == 4
    assert not (tmp_path / "out3.onnx").exists()
    assert "another model" in capsys.readouterr().err
    assert main([str(model_path), str(tmp_path / "out4.onnx")]) == 2
