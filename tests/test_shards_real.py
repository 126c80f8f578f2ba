"""Sharded calibration on a real model: CREPE tiny, 3 shards merged against one run."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import numpy_helper

from models import crepe
from onnx_spectral import compress
from onnx_spectral.api import calibrate_statistics
from onnx_spectral.calibration.stats_files import Shard, merge_statistics

pytestmark = pytest.mark.real


def test_crepe_tiny_three_shards_select_like_one_run() -> None:
    path = crepe.crepe_onnx("tiny")
    frames, _ = crepe.make_tones(360, seed=31)
    data = {"frames": frames}
    options = {"calib_samples": 300, "verify_samples": 60, "batch_size": 32, "provider": "cpu"}
    parts = [calibrate_statistics(path, data, shard=Shard(i, 3), **options) for i in (1, 2, 3)]
    assert [part.statistics.samples for part in parts] == [100, 100, 100]
    merged = merge_statistics(parts, ["1", "2", "3"])

    # saved statistics are parallel statistics: compare with a run without compensation (and
    # without the layer refit, which needs calibration batches)
    direct, direct_report = compress(path, data, ratio=0.5, compensation=False, refit=False,
                                     **options)
    sharded, sharded_report = compress(path, data, ratio=0.5, statistics=merged, **options)
    pruned = [group for group in direct_report.groups if not group.frozen]
    assert len(pruned) == 6
    for one, other in zip(direct_report.groups, sharded_report.groups, strict=True):
        assert (one.producers, one.kept) == (other.producers, other.kept)
        if one.heldout_error is not None:
            assert one.heldout_error == pytest.approx(other.heldout_error, rel=1e-6)
    # the same channels are kept: every weight, sliced or reconstructed, agrees
    for before, after in zip(direct.graph.initializer, sharded.graph.initializer, strict=True):
        assert before.name == after.name
        np.testing.assert_allclose(numpy_helper.to_array(after), numpy_helper.to_array(before),
                                   rtol=1e-4, atol=1e-5)
    assert sharded_report.verification is not None
    assert sharded_report.verification.samples == 60
    direct_error = direct_report.verification.outputs[0].relative_error  # type: ignore[union-attr]
    assert sharded_report.verification.outputs[0].relative_error == pytest.approx(
        direct_error, rel=1e-3)
    assert np.isfinite(direct_error)
