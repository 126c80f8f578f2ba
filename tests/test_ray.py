"""`--ray`: every pass over the data on Ray workers of a two-node cluster (started here, in the
test process) gives the one-process run's kept channels and weights, up to float summation
order; a worker's error reaches the caller as itself."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import onnx
import pytest
import ray
from onnx import numpy_helper
from ray.cluster_utils import Cluster

from models import crepe, transformer
from onnx_spectral import compress
from onnx_spectral.errors import DataError
from onnx_spectral.graph.executor import Batch, WorkerCache
from onnx_spectral.graph.ray_executor import RayExecutor
from tests.attention_graphs import attention_block, attention_feeds

# the workers cannot import this test module: its task classes travel by value
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def cluster_address() -> Iterator[str]:
    """A local Ray cluster of two nodes with one CPU each."""
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
    try:
        yield cluster.address
    finally:
        ray.shutdown()
        cluster.shutdown()


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {tensor.name: numpy_helper.to_array(tensor) for tensor in model.graph.initializer}


def _kept(report: Any) -> list[tuple[int, int]]:
    return [(group.channels, group.kept) for group in report.groups]


def _assert_same_run(model: onnx.ModelProto | str, data: Any, address: str,
                     **options: Any) -> Any:
    """Compress in this process and on the cluster; the same groups, widths and weights."""
    local, local_report = compress(model, data, provider="cpu", **options)
    distributed, report = compress(model, data, provider="cpu", ray=address, **options)
    assert _kept(report) == _kept(local_report)
    assert any(kept < channels for channels, kept in _kept(report))
    local_weights, weights = _weights(local), _weights(distributed)
    assert local_weights.keys() == weights.keys()
    for name, value in local_weights.items():
        assert value.shape == weights[name].shape, name
        scale = max(float(np.abs(value).max()), 1e-6)
        np.testing.assert_allclose(weights[name], value, rtol=1e-3, atol=1e-4 * scale,
                                   err_msg=name)
    assert report.seconds.get("workers", 0.0) > 0.0
    assert report.verification.samples == local_report.verification.samples
    for ours, theirs in zip(report.verification.outputs, local_report.verification.outputs,
                            strict=True):
        assert ours.cosine == pytest.approx(theirs.cosine, abs=1e-5)
    return report


def test_attention_heads_on_two_nodes(cluster_address: str) -> None:
    """Calibration, compensation, refit and verification over 8-sample batches spread on two
    workers (the attention block prunes heads; its output projection is refitted)."""
    report = _assert_same_run(attention_block(), attention_feeds(160), cluster_address,
                              ratio=0.5, calib_samples=128, verify_samples=32, batch_size=8)
    assert any("refitted" in note for note in report.notes)


def test_a_worker_error_is_raised_as_itself(cluster_address: str) -> None:
    feeds = attention_feeds(40)
    feeds["x"][17] *= 1e25  # finite, but squares overflow float32 in the worker's Gram sums
    with pytest.raises(DataError, match=r"NaN or Inf .* samples 16\.\.23"):
        compress(attention_block(), feeds, ratio=0.5, batch_size=8, provider="cpu",
                 ray=cluster_address)


class _WhereTask:
    """A pass that records which process added each batch."""

    def start(self, cache: WorkerCache) -> _WhereAccumulator:
        return _WhereAccumulator()

    def merge(self, first: dict[int, int], second: dict[int, int]) -> dict[int, int]:
        return {**first, **second}


class _WhereAccumulator:
    def __init__(self) -> None:
        self.where: dict[int, int] = {}

    def add(self, batch: Batch) -> None:
        self.where[batch.index] = os.getpid()

    def result(self) -> dict[int, int]:
        return self.where


def test_batches_go_to_the_same_worker_in_every_pass(cluster_address: str) -> None:
    batches = [{"x": np.full((2, 3), index, dtype=np.float32)} for index in range(7)]
    executor = RayExecutor(cluster_address)
    try:
        assert len(executor.workers) == 2  # one per CPU of the two nodes
        first = executor.fold(_WhereTask(), batches)
        second = executor.fold(_WhereTask(), iter(batches))  # a stream: sent batch by batch
    finally:
        executor.close()
    assert first == second and sorted(first) == list(range(7))
    assert len(set(first.values())) == 2


@pytest.mark.real
def test_crepe_tiny_on_two_nodes(cluster_address: str) -> None:
    frames, _ = crepe.make_tones(300, seed=3)
    _assert_same_run(str(crepe.crepe_onnx("tiny")), {"frames": frames}, cluster_address,
                     ratio=0.5, calib_samples=256, verify_samples=44)


@pytest.mark.real
def test_transformer_encoder_on_two_nodes(cluster_address: str) -> None:
    tokens = transformer.token_batch(160, seed=1)
    _assert_same_run(str(transformer.encoder_onnx()), {"tokens": tokens}, cluster_address,
                     ratio=0.5, calib_samples=128, verify_samples=32)
