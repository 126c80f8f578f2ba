"""Sequential compensation: pass schedule, in-graph cross statistics, and its effect."""

from __future__ import annotations

import numpy as np
import onnx
from onnx.reference import ReferenceEvaluator

from onnx_spectral import compress
from onnx_spectral.analysis import analyze
from onnx_spectral.calibration.collect import KeptActivations, calibrate
from onnx_spectral.calibration.instrument import instrument
from onnx_spectral.correction.compensate import later_taps
from onnx_spectral.correction.cross_run import (
    ORIGINAL_ACTIVATIONS,
    cross_statistics,
    original_activations,
)
from onnx_spectral.correction.merged import merged_model
from onnx_spectral.correction.schedule import schedule
from onnx_spectral.graph.executor import LocalExecutor
from onnx_spectral.graph.sessions import open_session
from onnx_spectral.rewrite import rewrite
from onnx_spectral.selection.plan import GroupPlan
from tests.graphs import GraphBuilder


def three_convs(seed: int = 0) -> onnx.ModelProto:
    """x [N,3,8,8] -> conv1 (6) -> Relu -> conv2 (6) -> Relu -> conv3 (4) -> y.

    Two prunable groups in a chain (conv1's and conv2's outputs).
    """
    b = GraphBuilder(seed)
    t = b.node("Relu", [b.conv("x", "conv1", 3, 6)], "relu1")
    t = b.node("Relu", [b.conv(t, "conv2", 6, 6)], "relu2")
    b.conv(t, "conv3", 6, 4)
    return b.model([("x", ["N", 3, 8, 8])], [("conv3", ["N", 4, 8, 8])])


def test_chain_is_pruned_one_group_per_pass() -> None:
    analysis = analyze(three_convs())
    passes = schedule(analysis)
    assert [[group.producers for group in step] for step in passes] == [[("conv1",)],
                                                                         [("conv2",)]]


def test_cross_statistics_match_the_two_models_run_apart() -> None:
    model = three_convs()
    analysis = analyze(model)
    first, second = analysis.prunable
    kept = np.array([0, 2, 5])
    plan = GroupPlan(first, kept, {tap.tensor: np.eye(6)[:, kept] * 1.3 for tap in first.taps})
    pruned = rewrite(analysis, [plan])
    merged, outputs = merged_model(analysis, pruned, second.taps)
    onnx.checker.check_model(merged)
    x = np.random.default_rng(1).standard_normal((5, 3, 8, 8)).astype(np.float32)
    stats = cross_statistics(merged, outputs, [{"x": x}], "cpu")
    tap = second.taps[0].tensor
    original = ReferenceEvaluator(analysis.graph.model).run(None, {"x": x}, intermediate=True)
    compressed = ReferenceEvaluator(pruned).run(None, {"x": x}, intermediate=True)
    rows_o = np.moveaxis(original[tap], 1, -1).reshape(-1, 6).astype(np.float64)
    rows_p = np.moveaxis(compressed[tap], 1, -1).reshape(-1, 6).astype(np.float64)
    moments = stats[tap]
    second_moment, cross = moments.second, moments.cross
    np.testing.assert_allclose(second_moment, rows_p.T @ rows_p / len(rows_p), rtol=1e-4,
                               atol=1e-5)
    np.testing.assert_allclose(cross, rows_o.T @ rows_p / len(rows_p), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(moments.mean_pruned, rows_p.mean(axis=0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(moments.mean_original, rows_o.mean(axis=0), rtol=1e-4,
                               atol=1e-6)
    assert not np.allclose(cross, rows_o.T @ rows_o / len(rows_o), atol=1e-3)
    # the same from the original's activations computed once and fed in
    executor = LocalExecutor()
    batches = [{"x": x}]
    assert original_activations(analysis, second.taps, batches, "cpu", 1 << 20, executor)
    cached_model, cached_outputs = merged_model(analysis, pruned, second.taps, cached=True)
    assert all(not node.name.startswith("conv1") for node in cached_model.graph.node)
    cached = cross_statistics(cached_model, cached_outputs, batches, "cpu", cached=True,
                              executor=executor)[tap]
    np.testing.assert_allclose(cached.cross, cross, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cached.second, second_moment, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cached.mean_original, moments.mean_original, rtol=1e-5,
                               atol=1e-6)
    assert not original_activations(analysis, second.taps, batches, "cpu", 100, executor)
    assert executor.cache.size(ORIGINAL_ACTIVATIONS) == 0


def test_calibration_keeps_the_original_activations_the_compensation_passes_read() -> None:
    """With `keep`, the calibration pass leaves the later taps' activations of the batches that
    start before sample 6 in the cache (batches of 4, 2 and 6 samples), equal to a pass of
    their own, and the statistics do not change; past the byte limit nothing is kept."""
    analysis = analyze(three_convs())
    tensors = tuple(tap.tensor for tap in later_taps(analysis))
    assert tensors
    rng = np.random.default_rng(3)
    batches = [{"x": rng.standard_normal((size, 3, 8, 8)).astype(np.float32)}
               for size in (4, 2, 6)]
    instrumented = instrument(analysis.graph, analysis.taps)
    executor = LocalExecutor()
    keep = KeptActivations(tensors, 6, ORIGINAL_ACTIVATIONS, 1 << 20)
    kept = calibrate(instrumented, batches, "cpu", executor=executor, keep=keep)
    assert kept.activations_kept
    assert sorted(executor.cache.entries[ORIGINAL_ACTIVATIONS]) == [0, 1]
    reference = LocalExecutor()
    assert original_activations(analysis, later_taps(analysis), batches[:2], "cpu", 1 << 20,
                                reference)
    for index in (0, 1):
        for tensor in tensors:
            np.testing.assert_array_equal(
                executor.cache.get(ORIGINAL_ACTIVATIONS, index)[tensor],
                reference.cache.get(ORIGINAL_ACTIVATIONS, index)[tensor])
    plain = calibrate(instrumented, batches, "cpu")
    for tap in analysis.taps:
        np.testing.assert_allclose(kept[tap.tensor].gram, plain[tap.tensor].gram, rtol=1e-6)
    small = LocalExecutor()
    over = calibrate(instrumented, batches, "cpu", executor=small,
                     keep=KeptActivations(tensors, 6, ORIGINAL_ACTIVATIONS, 100))
    assert not over.activations_kept and small.cache.size(ORIGINAL_ACTIVATIONS) == 0


def test_compensation_lowers_the_output_error_and_is_exact_at_full_width() -> None:
    model = three_convs()
    rng = np.random.default_rng(2)
    data = {"x": rng.standard_normal((300, 3, 8, 8)).astype(np.float32)}
    test = rng.standard_normal((100, 3, 8, 8)).astype(np.float32)
    reference = open_session(model, "cpu").run(None, {"x": test})[0]

    def error(**options: object) -> float:
        compressed, _ = compress(model, data, provider="cpu", calib_samples=300,
                                 verify_samples=0, **options)
        output = open_session(compressed, "cpu").run(None, {"x": test})[0]
        return float(np.linalg.norm(output - reference) / np.linalg.norm(reference))

    parallel = error(ratio=0.5, compensation=False, refit=False)
    sequential = error(ratio=0.5, compensation=True, refit=False)
    affine = error(ratio=0.5, compensation=True, affine=True, refit=False)
    refit = error(ratio=0.5)  # the defaults: compensation, then the layer refit
    print(f"relative output error: parallel {parallel:.4f}, sequential {sequential:.4f}, "
          f"sequential affine {affine:.4f}, sequential + refit {refit:.4f}")
    assert sequential < parallel
    assert affine < parallel
    assert refit < sequential
    assert error(ratio=1.0, compensation=True, ridge=1e-9) < 1e-4


def test_residual_stream_and_branch_are_scheduled_in_graph_order() -> None:
    from tests.graphs import residual_block

    analysis = analyze(residual_block(channels=6))
    passes = schedule(analysis)
    assert sum(len(step) for step in passes) == len(analysis.prunable) == 2
    assert passes[0][0].producers[0] == "conv0"


def test_three_layer_chain_with_cached_activations_runs_every_pass() -> None:
    b = GraphBuilder(4)
    t = b.node("Relu", [b.conv("x", "conv1", 3, 6)], "relu1")
    t = b.node("Relu", [b.conv(t, "conv2", 6, 6)], "relu2")
    t = b.node("Relu", [b.conv(t, "conv3", 6, 6)], "relu3")
    b.conv(t, "conv4", 6, 4)
    model = b.model([("x", ["N", 3, 8, 8])], [("conv4", ["N", 4, 8, 8])])
    data = {"x": np.random.default_rng(5).standard_normal((64, 3, 8, 8)).astype(np.float32)}
    compressed, report = compress(model, data, flops=0.5, provider="cpu", calib_samples=64,
                                  verify_samples=0)
    assert report.cost_after.macs <= 0.5 * report.cost_before.macs
    assert len(schedule(analyze(model))) == 3
    onnx.checker.check_model(compressed)
