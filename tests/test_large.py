"""Large models, external data, float16 models, symbolic dimensions.

The 2 GiB code paths (skeletons with external references, sessions and checks through
temporary files, saving with external data) are exercised on tiny models by lowering
`LARGE_BYTES`; a real model over 2 GiB runs only with ONNX_SPECTRAL_SLOW=1 (about two
minutes and 2.5 GB of memory, 1.25x the model's size; see docs/benchmarks.md "Large models"):

    ONNX_SPECTRAL_SLOW=1 python -m pytest -q -m slow tests/test_large.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_spectral import cli, compress
from onnx_spectral.graph import atomic, external_tensors
from tests import graphs

ROOT = Path(__file__).resolve().parents[1]
#: Without the layer refit, which large (external data) models skip: paths compare exactly.
FAST = {"provider": "cpu", "calib_samples": 24, "verify_samples": 8, "batch_size": 8,
        "refit": False}


def _run(model: onnx.ModelProto | str, x: np.ndarray) -> list[np.ndarray]:
    source = model if isinstance(model, str) else model.SerializeToString()
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})


def _initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {tensor.name: numpy_helper.to_array(tensor) for tensor in model.graph.initializer}


def test_large_model_paths_match_the_in_memory_paths(monkeypatch, tmp_path: Path) -> None:
    """With the 2 GiB threshold lowered to 1 kB, every session, check and shape inference
    goes through skeletons; the result must be the same model, saved with external data."""
    model = tmp_path / "in.onnx"
    onnx.save_model(graphs.residual_block(channels=8), str(model))
    args = ["--calib", "random", "--provider", "cpu", "--calib-samples", "24",
            "--verify-samples", "8", "--no-refit"]  # large models skip the refit
    assert cli.main([str(model), str(tmp_path / "small" / "out.onnx"), *args]) == 0
    monkeypatch.setattr(external_tensors, "LARGE_BYTES", 1000)
    monkeypatch.setattr(external_tensors, "STUB_BYTES", 100)
    opened = []
    real_on_disk = external_tensors.on_disk

    def counting(*a, **k):
        opened.append(1)
        return real_on_disk(*a, **k)

    monkeypatch.setattr(external_tensors, "on_disk", counting)
    assert cli.main([str(model), str(tmp_path / "big" / "out.onnx"), *args]) == 0
    assert len(opened) >= 4  # checker, calibration, verification and interface sessions
    small = onnx.load(str(tmp_path / "small" / "out.onnx"))
    big_path = tmp_path / "big" / "out.onnx"
    assert atomic.uses_external_data(onnx.load(str(big_path), load_external_data=False))
    assert len(list(big_path.parent.iterdir())) == 2
    want, got = _initializers(small), _initializers(onnx.load(str(big_path)))
    assert want.keys() == got.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])


def test_skeleton_keeps_small_tensors_and_references_large_ones(tmp_path: Path,
                                                                monkeypatch) -> None:
    monkeypatch.setattr(external_tensors, "STUB_BYTES", 100)
    model = graphs.residual_block(channels=8)
    light = external_tensors.skeleton(model, tmp_path / "t.bin")
    onnx.save_model(light, str(tmp_path / "m.onnx"))
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(_run(str(tmp_path / "m.onnx"), x)[0], _run(model, x)[0])
    external = [t.name for t in light.graph.initializer if t.data_location == 1]
    inline = [t.name for t in light.graph.initializer if t.data_location != 1]
    assert external and inline  # 8x8x3x3 weights go out, biases stay
    assert len(model.graph.initializer[0].raw_data) > 0  # the model itself is untouched


def _to_float16(model: onnx.ModelProto) -> onnx.ModelProto:
    for index, tensor in enumerate(model.graph.initializer):
        array = numpy_helper.to_array(tensor)
        if array.dtype == np.float32:
            model.graph.initializer[index].CopyFrom(
                numpy_helper.from_array(array.astype(np.float16), tensor.name))
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.elem_type = TensorProto.FLOAT16
    onnx.checker.check_model(model, full_check=True)
    return model


def test_float16_model_is_calibrated_in_float32_and_written_in_float16() -> None:
    model16 = _to_float16(graphs.residual_block(channels=8))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 3, 8, 8)).astype(np.float32)
    out16, report16 = compress(model16, {"x": x.astype(np.float16)}, ratio=0.5, **FAST)
    out32, report32 = compress(graphs.residual_block(channels=8), {"x": x}, ratio=0.5, **FAST)
    types = {t.name: t.data_type for t in out16.graph.initializer}
    assert set(types.values()) == {TensorProto.FLOAT16}
    assert [v.type.tensor_type.elem_type for v in (*out16.graph.input, *out16.graph.output)] \
        == [TensorProto.FLOAT16] * 2
    # the statistics are float32 Gram matrices (a Cast before the tap), so the same channels
    # are kept as for the float32 model, and the result is about as good
    assert [g.kept for g in report16.groups] == [g.kept for g in report32.groups]
    error16 = report16.verification.outputs[0].relative_error
    error32 = report32.verification.outputs[0].relative_error
    assert abs(error16 - error32) < 0.02, (error16, error32)
    fresh = rng.standard_normal((4, 3, 8, 8)).astype(np.float32)
    y16 = _run(out16, fresh.astype(np.float16))[0]
    y32 = _run(out32, fresh)[0]
    assert y16.dtype == np.float16
    assert np.linalg.norm(y16 - y32) / np.linalg.norm(y32) < 0.01
    whole, _ = compress(model16, {"x": x.astype(np.float16)}, ratio=1.0, **FAST)
    np.testing.assert_allclose(_run(whole, fresh.astype(np.float16))[0].astype(np.float32),
                               _run(model16, fresh.astype(np.float16))[0].astype(np.float32),
                               atol=2e-3 * float(np.abs(y32).max()))


def test_symbolic_batch_and_spatial_dims() -> None:
    """Input [N, 3, H, W]: calibrated at 8x8, the result runs at other sizes and batches."""
    b = graphs.GraphBuilder(0)
    t = b.node("Relu", [b.conv("x", "conv1", 3, 8)], "relu1")
    t = b.node("Relu", [b.conv(t, "conv2", 8, 8)], "relu2")
    pooled = b.node("Flatten", [b.node("GlobalAveragePool", [t], "gap")], "flat")
    b.gemm(pooled, "fc", 8, 5)
    model = b.model([("x", ["N", 3, "H", "W"])], [("fc", ["N", 5])])
    x = np.random.default_rng(0).standard_normal((40, 3, 8, 8)).astype(np.float32)
    compressed, report = compress(model, {"x": x}, ratio=0.5, **FAST)
    assert [g.kept for g in report.groups if not g.frozen] == [4, 4]
    dims = [d.dim_param or d.dim_value
            for d in compressed.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["N", 3, "H", "W"]
    for shape in [(1, 3, 5, 7), (3, 3, 16, 12)]:
        y = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
        assert _run(compressed, y)[0].shape == (shape[0], 5)
    whole, _ = compress(model, {"x": x}, ratio=1.0, **FAST)
    y = np.random.default_rng(2).standard_normal((2, 3, 11, 9)).astype(np.float32)
    np.testing.assert_allclose(_run(whole, y)[0], _run(model, y)[0], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# a real model over 2 GiB

WIDE = 525_000
"""Input features; fc1 [512, WIDE] and fc3 [WIDE, 512] take 1.075 GB each: 2.15 GB in all."""
HIDDEN = 512


def wide_mlp(folder: Path, wide: int = WIDE) -> Path:
    """x [N, wide] -> fc1 (512) -> Relu -> fc2 (512) -> Relu -> fc3 (wide) -> y, saved with
    external data (past 2 GiB a single file cannot hold it); 4096 * wide bytes of weights.
    The data file is written a block of rows at a time: the model is never in memory."""
    rng = np.random.default_rng(0)
    inits = []
    with open(folder / "wide.data", "wb") as data:
        for name, shape in (("fc1_w", (HIDDEN, wide)), ("fc2_w", (HIDDEN, HIDDEN)),
                            ("fc3_w", (wide, HIDDEN)), ("fc1_b", (HIDDEN,)),
                            ("fc2_b", (HIDDEN,)), ("fc3_b", (wide,))):
            offset = data.tell()
            if name.endswith("_w"):
                scale = np.float32(1.0 / np.sqrt(shape[1]))
                step = max(1, (1 << 24) // shape[1])
                for start in range(0, shape[0], step):
                    rows = min(step, shape[0] - start)
                    (rng.standard_normal((rows, shape[1]), dtype=np.float32) * scale).tofile(data)
            else:
                np.full(shape, 0.1, np.float32).tofile(data)
            tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=shape)
            tensor.data_location = TensorProto.EXTERNAL
            for key, value in (("location", "wide.data"), ("offset", str(offset)),
                               ("length", str(data.tell() - offset))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            inits.append(tensor)
    nodes = [
        helper.make_node("Gemm", ["x", "fc1_w", "fc1_b"], ["h1"], name="fc1", transB=1),
        helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
        helper.make_node("Gemm", ["r1", "fc2_w", "fc2_b"], ["h2"], name="fc2", transB=1),
        helper.make_node("Relu", ["h2"], ["r2"], name="relu2"),
        helper.make_node("Gemm", ["r2", "fc3_w", "fc3_b"], ["y"], name="fc3", transB=1),
    ]
    graph = helper.make_graph(nodes, "wide", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, ["N", wide])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, ["N", wide])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = folder / "wide.onnx"
    onnx.save_model(model, str(path))
    onnx.checker.check_model(str(path))
    return path


def compress_in_subprocess(path: Path, out: Path, large_bytes: int | None = None
                           ) -> tuple[subprocess.CompletedProcess[str], float, float]:
    """Compress the wide MLP at `path` with the CLI in a fresh process (48 random samples:
    40 to calibrate, 8 to verify). `large_bytes`: take the paths of models past 2 GiB at a
    small size (LARGE_BYTES and the float64 block size of big sink weights lowered).
    Returns the finished process, its peak resident memory in GB (2^30 bytes: VmHWM, which
    counts mapped file pages; not ru_maxrss, which Linux carries over from the parent across
    fork + exec) and the wall time in seconds."""
    wide = onnx.load(str(path), load_external_data=False).graph.input[0] \
        .type.tensor_type.shape.dim[1].dim_value
    np.save(out.parent / "x.npy",
            np.random.default_rng(1).standard_normal((48, wide)).astype(np.float32))
    lower = (f"external_tensors.LARGE_BYTES = {large_bytes}; "
             f"linear._BLOCK_BYTES = {large_bytes // 8}; " if large_bytes else "")
    script = ("import sys; from onnx_spectral import cli; "
              "from onnx_spectral.graph import external_tensors; "
              "from onnx_spectral.ops import linear; " + lower +
              "code = cli.main(sys.argv[1:]); "
              "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0]; "
              "print('peak_rss_gb', int(hwm.split()[1]) / 2**20); "
              "sys.exit(code)")
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", script, str(path), str(out), "--calib", str(out.parent / "x.npy"),
         "--provider", "cpu", "--calib-samples", "40", "--verify-samples", "8",
         "--batch-size", "8"],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    seconds = time.perf_counter() - start
    peaks = [float(line.split()[1]) for line in result.stdout.splitlines()
             if line.startswith("peak_rss_gb")]
    return result, (peaks[0] if peaks else float("nan")), seconds


def _check_wide_output(out: Path, wide: int) -> None:
    files = sorted(p.name for p in out.parent.iterdir() if p.suffix != ".npy")
    assert len(files) == 2 and files[1].endswith(".data"), files
    onnx.checker.check_model(str(out))
    pruned = onnx.load(str(out))
    shapes = {t.name: tuple(t.dims) for t in pruned.graph.initializer}
    assert shapes["fc1_w__fc1"] == (HIDDEN // 2, wide)
    assert shapes["fc3_w__fc3"] == (wide, HIDDEN // 2)
    assert [v.name for v in pruned.graph.output] == ["y"]
    del pruned
    x = np.random.default_rng(2).standard_normal((2, wide)).astype(np.float32)
    assert _run(str(out), x)[0].shape == (2, wide)


def test_lazy_large_model_matches_the_in_memory_path(tmp_path: Path) -> None:
    """A model file with external data past LARGE_BYTES (lowered to 1 MB) is loaded lazily
    (weights memory-mapped, streamed to the output): the same tensors and report figures as
    the ordinary path, byte-identical on a rerun, and the weights are not all held."""
    path = wide_mlp(tmp_path, wide=2048)  # 8 MB of weights
    runs = {}
    for name, limit in (("ordinary", None), ("lazy", 1 << 20), ("again", 1 << 20)):
        out = tmp_path / name / "out.onnx"
        out.parent.mkdir()
        result, _, _ = compress_in_subprocess(path, out, limit)
        assert result.returncode == 0, result.stderr
        _check_wide_output(out, 2048)
        runs[name] = out
    want = _initializers(onnx.load(str(runs["ordinary"])))
    got = _initializers(onnx.load(str(runs["lazy"])))
    assert want.keys() == got.keys()
    # the same channels are kept (fc1's sliced rows are bit-identical); sessions past 2 GiB
    # skip ORT's weight prepacking, whose different summation order moves the Gram matrices
    # in the last digits, and the folded reconstructions (40 samples, 512 channels: a
    # singular Gram matrix, ridge only) a little more
    np.testing.assert_array_equal(got["fc1_w__fc1"], want["fc1_w__fc1"])
    for name in want:
        error = np.linalg.norm(got[name] - want[name]) / np.linalg.norm(want[name])
        assert error < 1e-3, (name, error)
    lazy, again = runs["lazy"], runs["again"]
    assert lazy.read_bytes() == again.read_bytes()
    data = sorted(p.name for p in lazy.parent.glob("*.data"))
    assert data == sorted(p.name for p in again.parent.glob("*.data"))
    assert (lazy.parent / data[0]).read_bytes() == (again.parent / data[0]).read_bytes()


def test_lazy_load_maps_weights_instead_of_reading_them(tmp_path: Path, monkeypatch) -> None:
    path = wide_mlp(tmp_path, wide=2048)
    monkeypatch.setattr(external_tensors, "LARGE_BYTES", 1 << 20)
    model = external_tensors.load(path)
    assert external_tensors.is_large(model)
    # weights are references; the biases (2 or 8 KB, under INLINE_BYTES) are read
    assert [external_tensors.is_lazy(t) for t in model.graph.initializer] == [
        len(t.dims) == 2 for t in model.graph.initializer]
    assert model.ByteSize() < 20_000
    reference = onnx.load(str(path))
    for lazy, full in zip(model.graph.initializer, reference.graph.initializer, strict=True):
        np.testing.assert_array_equal(external_tensors.to_array(lazy), numpy_helper.to_array(full))
    values = external_tensors.constants(model.graph.initializer, set())
    assert isinstance(values, external_tensors.LazyConstants) and "fc1_w" in values
    weight = values["fc1_w"]
    weight[0, 0] = 7.0  # copy-on-write: the file keeps its bytes
    np.testing.assert_array_equal(values["fc1_w"], numpy_helper.to_array(
        reference.graph.initializer[0]))
    outside = tmp_path / "m2.onnx"
    for tensor in reference.graph.initializer:
        tensor.data_location = TensorProto.EXTERNAL
        tensor.ClearField("raw_data")
        entry = tensor.external_data.add()
        entry.key, entry.value = "location", "../../etc/passwd"
    onnx.save_model(reference, str(outside))
    with pytest.raises(ValueError, match="is not a file in"):
        external_tensors.load(outside)


def test_lazy_model_with_external_shape_constants_compresses(tmp_path: Path,
                                                            monkeypatch) -> None:
    """A model past LARGE_BYTES whose Reshape shape is stored externally too (as our own
    outputs are, saved with every tensor external): the shape constant is read at load, so
    shape inference sees it and the model compresses."""
    model = graphs.flatten_head("dynamic")
    path = tmp_path / "head.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location="head.data",
                    size_threshold=0)
    monkeypatch.setattr(external_tensors, "LARGE_BYTES", 1000)
    monkeypatch.setattr(external_tensors, "INLINE_BYTES", 64)  # the weights stay references
    loaded = external_tensors.load(path)
    assert any(external_tensors.is_lazy(t) for t in loaded.graph.initializer)
    assert not any(external_tensors.is_lazy(t) for t in loaded.graph.initializer
                   if t.data_type == TensorProto.INT64)
    x = np.random.default_rng(0).standard_normal((24, 3, 4, 4)).astype(np.float32)
    compressed, report = compress(loaded, {"x": x}, ratio=0.5, calib_samples=20,
                                  verify_samples=4, provider="cpu")
    assert any(group.kept < group.channels for group in report.groups)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("ONNX_SPECTRAL_SLOW"), reason="set ONNX_SPECTRAL_SLOW=1")
def test_model_over_2_gib(tmp_path: Path) -> None:
    path = wide_mlp(tmp_path)
    assert external_tensors.tensor_bytes(onnx.load(str(path), load_external_data=False)) > 2**31
    out = tmp_path / "out" / "wide_pruned.onnx"
    out.parent.mkdir()
    result, peak, seconds = compress_in_subprocess(path, out)
    model_gb = sum(p.stat().st_size for p in tmp_path.glob("wide.*")) / 2**30
    print(result.stdout[-1500:], result.stderr[-1500:],
          f"model {model_gb:.2f} GB, peak RSS {peak:.2f} GB ({peak / model_gb:.2f}x), "
          f"wall {seconds:.0f} s")
    assert result.returncode == 0, result.stderr
    _check_wide_output(out, WIDE)
    assert peak <= 3.0 * model_gb, (peak, model_gb)
