"""Speed and scale of onnx-spectral, each figure a ratio measured side by side in one run.

    python tools/bench_speed.py [--sections calib select memory latency e2e] [--models ...]
    python tools/bench_speed.py --sections gpu      # calibration throughput, CPU vs CUDA

Sections (targets from issue 5):
  calib    instrumented calibration vs plain ONNX Runtime inference of the original model over
           the same batches, same provider and threads, interleaved, best of --repeats (<= 1.3x)
  select   greedy selection, m = 256..4096, k = m/2; fitted exponent of time vs k m^2 (<= 1),
           m = 2048 under 2 s
  memory   peak RSS of a CREPE full compression, 500 vs 5,000 streamed calibration samples, each
           in its own subprocess (difference < 10% of the model size + one batch of activations)
  latency  ORT CPU latency of compressed vs original, models made with --flops 0.5 and 0.25,
           --allocation greedy/uniform, --round-to 0/1/16, batch 1 and 32 (speedup >= 0.8 x MAC
           reduction)
  e2e      CREPE full, 2,000 calibration tones + 200 held out, end to end, seconds per stage
  gpu      calibration samples/s with --provider cpu and --provider cuda (needs onnxruntime-gpu)

Models: crepe-full and crepe-tiny (models/crepe.py), and the onnx package's light zoo graphs
such as resnet50 with seeded random weights (models/zoo.py, when present).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import crepe  # noqa: E402
from onnx_spectral import compress  # noqa: E402
from onnx_spectral.analysis import Analysis, analyze  # noqa: E402
from onnx_spectral.api import CompressOptions, calibrate_statistics  # noqa: E402
from onnx_spectral.calibration.collect import calibrate  # noqa: E402
from onnx_spectral.calibration.instrument import Instrumented, instrument  # noqa: E402
from onnx_spectral.calibration.tap_cost import gram_strides  # noqa: E402
from onnx_spectral.cost import model_cost  # noqa: E402
from onnx_spectral.graph.model import load_model  # noqa: E402
from onnx_spectral.graph.sessions import Provider, open_session  # noqa: E402
from onnx_spectral.selection.spectral import (  # noqa: E402
    TapProblem,
    default_ridge,
    greedy_select,
    information_loss,
    loss_weight,
)

Feeds = dict[str, np.ndarray]
SCRATCH = Path(tempfile.gettempdir()) / "onnx_spectral_bench"


# ------------------------------------------------------------------------------------- models

def crepe_inputs(n: int, seed: int) -> np.ndarray:
    return crepe.make_tones(n, seed=seed)[0]


def model_and_batches(name: str, batch: int, count: int) -> tuple[Path, list[Feeds]]:
    """The model file and `batch * count` real (CREPE) or random (light zoo) inputs in batches.

    The light zoo graphs have a static batch of 1 (a Reshape constant hard-codes it); the bench
    runs a copy with a dynamic batch (`dynamic_batch`) so that both batch sizes can be measured.
    """
    if name in ("crepe-full", "crepe-tiny"):
        frames = crepe_inputs(batch * count, seed=21)
        capacity = "full" if name == "crepe-full" else "tiny"
        return crepe.crepe_onnx(capacity), [{"frames": frames[i * batch:(i + 1) * batch]}
                                            for i in range(count)]
    from models import zoo

    path = dynamic_batch(zoo.light_model(name))
    images = zoo.light_inputs(batch * count, seed=21)
    input_name = zoo.light_input_name(path)
    return path, [{input_name: images[i * batch:(i + 1) * batch]} for i in range(count)]


def dynamic_batch(path: Path) -> Path:
    """A copy of a batch-1 light zoo model with batch 'N' and `[1, F]` Reshape targets `[-1, F]`.

    Written next to the bench's other scratch files (`SCRATCH`), once.
    """
    target = SCRATCH / f"{path.stem}_batchN.onnx"
    if target.is_file():
        return target
    model = onnx.load(str(path))
    for value in (*model.graph.input[:1], *model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_param = "N"
    constants = {tensor.name: tensor for tensor in model.graph.initializer}
    for node in model.graph.node:
        shape = constants.get(node.input[1]) if node.op_type == "Reshape" else None
        if shape is not None:
            value = onnx.numpy_helper.to_array(shape).copy()
            if value.ndim == 1 and value.size == 2 and value[0] == 1:
                value[0] = -1
                shape.CopyFrom(onnx.numpy_helper.from_array(value, shape.name))
    del model.graph.value_info[:]
    onnx.checker.check_model(model)
    SCRATCH.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(target))
    return target


def available_models(requested: list[str]) -> list[str]:
    names = []
    for name in requested:
        if name not in ("crepe-full", "crepe-tiny"):
            try:
                from models import zoo  # noqa: F401
            except ImportError:
                print(f"  {name}: skipped, models/zoo.py is not in this checkout")
                continue
        names.append(name)
    return names


# -------------------------------------------------------------------------------------- calib

def _timed(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def _marked(batches: list[Feeds], marks: list[float]) -> Iterator[Feeds]:
    """Yield `batches`, appending the time at which each is asked for, and at the end."""
    for feeds in batches:
        marks.append(time.perf_counter())
        yield feeds
    marks.append(time.perf_counter())


def _side_by_side(original: onnx.ModelProto, instrumented: Instrumented, batches: list[Feeds],
                  provider: Provider, repeats: int) -> dict[str, float]:
    """Best seconds of plain inference and of calibration over `batches`, runs interleaved.

    Plain: a session on the original model and `run` over the batches. Calibration: the
    library's `calibrate` (its session, I/O binding, float64 accumulation). "plain"/"calib":
    the whole run, opening the session included; "steady plain"/"steady calib": the batches
    after the first (whose run also sizes the session's memory arena), which is what a long
    calibration converges to.
    """

    def run_plain(marks: list[float]) -> None:
        session = open_session(original, provider)
        for feeds in _marked(batches, marks):
            session.run(None, feeds)

    def run_calib(marks: list[float]) -> None:
        calibrate(instrumented, _marked(batches, marks), provider)

    times: dict[str, list[float]] = {"plain": [], "calib": [], "steady plain": [],
                                     "steady calib": []}
    for label, action in (("plain", run_plain), ("calib", run_calib)) * (repeats + 1):
        marks: list[float] = []
        start = time.perf_counter()
        action(marks)
        times[label].append(time.perf_counter() - start)
        times["steady " + label].append(marks[-1] - marks[1])
    return {label: min(values[1:]) for label, values in times.items()}  # first: warm-up


#: Calibration samples the strides are sized for, and the Gram budget of the gpu section: the
#: tool's defaults (--calib-samples, --gram-budget).
CALIBRATION_SAMPLES = CompressOptions().calib_samples
DEFAULT_GRAM_BUDGET = CompressOptions().gram_budget


def bench_calibration(names: list[str], provider: Provider, repeats: int,
                      sizes: dict[str, tuple[int, int]], budget: float) -> None:
    print(f"\n== calibration overhead (provider {provider}, best of {repeats}, --gram-budget "
          f"{budget}) ==")
    for name in names:
        batch, count = sizes[name]
        path, batches = model_and_batches(name, batch, count)
        original = load_model(path)
        analysis = analyze(original)
        strides = gram_strides(analysis.graph, analysis.taps, budget, CALIBRATION_SAMPLES)
        instrumented = instrument(analysis.graph, analysis.taps, strides)

        best = _side_by_side(original, instrumented, batches, provider, repeats)
        effect = (_selection_effect(analysis, batches, instrumented, provider) if strides
                  else "")
        channels = sum(tap.channels for tap in analysis.taps)
        print(f"  {name}, {count} batches of {batch}: {len(analysis.taps)} taps ({channels} "
              f"channels), {len(strides)} subsampled (strides {sorted(set(strides.values()))}); "
              f"whole run (session, first batch): plain {best['plain']:.2f} s, calibration "
              f"{best['calib']:.2f} s, ratio {best['calib'] / best['plain']:.2f}x; batches 2.."
              f"{count}: plain {best['steady plain']:.2f} s, calibration "
              f"{best['steady calib']:.2f} s, ratio "
              f"{best['steady calib'] / best['steady plain']:.2f}x (target <= 1.3x){effect}")


def _selection_effect(analysis: Analysis, batches: list[Feeds], strided: Instrumented,
                      provider: Provider) -> str:
    """What subsampling costs the selection: per tap, the loss (on statistics from every
    position) of the m/2 channels chosen from the subsampled statistics over the loss of those
    chosen from every position; its median and worst over the taps, as a sentence."""
    full = calibrate(instrument(analysis.graph, analysis.taps), batches, provider)
    sampled = calibrate(strided, batches, provider)
    ratios = []
    for tap in analysis.taps:
        weight = loss_weight(tap.channels, None, 1.0)
        truth = TapProblem(full[tap.tensor].sigma, weight,
                           default_ridge(full[tap.tensor].sigma, 1e-3))
        estimate = TapProblem(sampled[tap.tensor].sigma, weight, truth.ridge)
        half = tap.channels // 2
        best = information_loss([truth], greedy_select([truth], half).order)
        ratios.append(information_loss([truth], greedy_select([estimate], half).order) / best)
    return (f"; selection from the subsampled statistics loses {np.median(ratios):.3f}x "
            f"(median over taps), {max(ratios):.3f}x (worst) of the loss of selection from "
            f"every position, {len(batches) * len(next(iter(batches[0].values())))} samples")


# ------------------------------------------------------------------------------------- select

def _problem(m: int, seed: int) -> TapProblem:
    """A Sigma with a decaying spectrum and a random sink Z^T Z, as real layers have."""
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((m, m)) * (1.0 / np.arange(1, m + 1) ** 0.7)
    sigma = basis @ basis.T / m
    z = rng.standard_normal((m // 2, m))
    return TapProblem(sigma, loss_weight(m, z.T @ z, 0.5), 1e-3 * np.trace(sigma) / m)


def bench_selection(sizes: list[int]) -> None:
    print("\n== greedy selection, k = m/2 ==")
    print("  (wall-clock, best of 2 below m = 4096; CPU seconds of all threads beside it: on a "
          "machine shared with other jobs the wall-clock time is inflated, CPU time much less)")
    work, seconds = [], []
    for m in sizes:
        problem = _problem(m, seed=m)
        runs = []
        for _ in range(2 if m < 4096 else 1):
            cpu = time.process_time()
            wall = _timed(lambda p=problem, k=m // 2: greedy_select([p], k))
            runs.append((wall, time.process_time() - cpu))
        elapsed, cpu_seconds = min(runs)
        work.append((m // 2) * m * m)
        seconds.append(elapsed)
        print(f"  m = {m:5d}, k = {m // 2:5d}: {elapsed:7.3f} s wall, {cpu_seconds:7.3f} s CPU")
    slope = np.polyfit(np.log(work), np.log(seconds), 1)[0]
    tail = np.polyfit(np.log(work[-3:]), np.log(seconds[-3:]), 1)[0]
    print(f"  fitted exponent of time vs k m^2: {slope:.2f} over all sizes, {tail:.2f} over the "
          "three largest (target <= 1)")
    if 2048 in sizes:
        print(f"  m = 2048: {seconds[sizes.index(2048)]:.2f} s (target < 2 s)")


# ------------------------------------------------------------------------------------- memory

def _streamed_tones(total: int, batch: int) -> Iterator[Feeds]:
    """Calibration tones generated batch by batch: the data never sits in memory whole."""
    for start in range(0, total, batch):
        yield {"frames": crepe_inputs(min(batch, total - start), seed=1000 + start)}


def memory_child(samples: int) -> None:
    """Run one CREPE full compression on `samples` streamed tones; print peak RSS (bytes)."""
    _, report = compress(crepe.crepe_onnx("full"), _streamed_tones(samples + 200, 32),
                         calib_samples=samples, verify_samples=200, provider="cpu")
    assert report.calibration_samples == samples
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"samples": samples, "peak_rss": peak}))


def _activation_bytes(model: onnx.ModelProto, batch: int) -> int:
    """Bytes of every float tensor the model computes for one batch (from inferred shapes)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    total = 0
    for value in (*inferred.graph.value_info, *inferred.graph.output):
        dims = [d.dim_value if d.HasField("dim_value") else batch
                for d in value.type.tensor_type.shape.dim]
        total += int(np.prod(dims)) * 4
    return total


def bench_memory(sizes: list[int]) -> None:
    print("\n== peak RSS of a CREPE full compression vs calibration samples ==")
    peaks = {}
    for samples in sizes:
        output = subprocess.run([sys.executable, __file__, "--memory-child", str(samples)],
                                check=True, capture_output=True, text=True).stdout
        peaks[samples] = json.loads(output.strip().splitlines()[-1])["peak_rss"]
        print(f"  {samples:5d} samples: peak RSS {peaks[samples] / 2**20:.1f} MiB")
    path = crepe.crepe_onnx("full")
    model_bytes = path.stat().st_size
    batch_bytes = _activation_bytes(onnx.load(str(path)), 32)
    limit = 0.1 * model_bytes + batch_bytes
    growth = peaks[max(sizes)] - peaks[min(sizes)]
    print(f"  growth {growth / 2**20:.1f} MiB; limit 10% of the model ({model_bytes / 2**20:.1f} "
          f"MiB) + one batch of 32 activations ({batch_bytes / 2**20:.1f} MiB) = "
          f"{limit / 2**20:.1f} MiB: {'holds' if growth < limit else 'FAILS'}")


# ------------------------------------------------------------------------------------ latency

def latencies(sessions: dict[str, ort.InferenceSession], feeds: Feeds,
               repeats: int) -> dict[str, float]:
    """Median seconds of one `run` per session; sessions take turns within each repeat."""
    times: dict[str, list[float]] = {label: [] for label in sessions}
    for _ in range(repeats):
        for label, session in sessions.items():
            times[label].append(_timed(lambda s=session: s.run(None, feeds)))
    return {label: statistics.median(values) for label, values in times.items()}


def bench_latency(names: list[str], targets: list[float], rounds: list[int],
                  allocations: list[str], repeats: int) -> None:
    """Latency of models made with `--flops R` for each allocation and `--round-to`, against
    the original (widths from 128 calibration samples; compensation does not change them)."""
    print(f"\n== ORT CPU latency, compressed vs original (median of {repeats}) ==")
    for name in names:
        path, batches = model_and_batches(name, 32, 4 if name == "crepe-full" else 1)
        saved = calibrate_statistics(path, iter(batches), calib_samples=128, verify_samples=0,
                                     provider="cpu")
        before = model_cost(load_model(path)).macs
        sessions = {"original": open_session(load_model(path), "cpu")}
        for target in targets:
            for allocation in allocations:
                for round_to in rounds:
                    model, report = compress(path, None, statistics=saved, flops=target,
                                             allocation=allocation, round_to=round_to)
                    kept = report.cost_after.macs / before
                    sessions[f"MACs {kept:.3f} (--flops {target} --allocation {allocation} "
                             f"--round-to {round_to})"] = open_session(model, "cpu")
        for batch in (1, 32):
            feeds = {key: value[:batch] for key, value in batches[0].items()}
            for session in sessions.values():
                session.run(None, feeds)  # warm up
            times = latencies(sessions, feeds, repeats if batch > 1 else 4 * repeats)
            base = times["original"]
            print(f"  {name}, batch {batch}: original {1000 * base:.1f} ms")
            for label, seconds in times.items():
                if label == "original":
                    continue
                kept = float(label.split()[1])
                speedup = base / seconds
                needed = 0.8 / kept
                print(f"    {label}: {1000 * seconds:.1f} ms, speedup {speedup:.2f}x, MAC "
                      f"reduction {1 / kept:.2f}x, speedup/MAC reduction {speedup * kept:.2f} "
                      f"(target >= 0.8: {'holds' if speedup >= needed else 'FAILS'})")


# ---------------------------------------------------------------------------------------- e2e

def bench_end_to_end() -> None:
    print("\n== end to end: CREPE full, 2,000 calibration tones + 200 held out ==")
    frames = crepe_inputs(2200, seed=11)
    start, cpu = time.perf_counter(), time.process_time()
    _, report = compress(crepe.crepe_onnx("full"), {"frames": frames}, ratio=0.5,
                         calib_samples=2000, verify_samples=200, provider="cpu")
    total, cpu = time.perf_counter() - start, time.process_time() - cpu
    stages = ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in report.seconds.items())
    print(f"  total {total:.1f} s wall (target < 120 s), {cpu:.1f} CPU seconds of all threads "
          f"(wall on a machine shared with other jobs is inflated): {stages}")


# ---------------------------------------------------------------------------------------- gpu

def _calibration_seconds(instrumented: Instrumented, batches: list[Feeds],
                         provider: Provider) -> float:
    """Seconds of `calibrate` over `batches` after one warm-up batch (CUDA kernels, arenas)."""
    calibrate(instrumented, batches[:1], provider)
    return _timed(lambda: calibrate(instrumented, batches, provider))


def bench_gpu(names: list[str], batch: int, count: int) -> None:
    print(f"\n== calibration throughput, CPU vs CUDA provider ({count} batches of {batch}) ==")
    if hasattr(ort, "preload_dlls"):  # CUDA/cuDNN from the nvidia-* wheels, when installed so
        ort.preload_dlls()
    print(f"  onnxruntime {ort.__version__}, providers {ort.get_available_providers()}")
    for name in names:
        path, batches = model_and_batches(name, batch, count)
        analysis = analyze(load_model(path))
        instrumented = instrument(analysis.graph, analysis.taps,
                                  gram_strides(analysis.graph, analysis.taps, DEFAULT_GRAM_BUDGET,
                                               CALIBRATION_SAMPLES))
        used = open_session(instrumented.model, "cuda").get_providers()
        if used[0] != "CUDAExecutionProvider":
            raise SystemExit(f"the CUDA provider did not start (session providers {used}); "
                             "check the CUDA and cuDNN libraries onnxruntime-gpu needs")
        rates = {}
        for provider in ("cpu", "cuda"):
            seconds = _calibration_seconds(instrumented, batches, provider)
            rates[provider] = batch * count / seconds
            print(f"  {name}, {provider}: {rates[provider]:.1f} samples/s")
        print(f"  {name}: CUDA/CPU throughput {rates['cuda'] / rates['cpu']:.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", nargs="+",
                        default=["calib", "select", "memory", "latency", "e2e"],
                        choices=["calib", "select", "memory", "latency", "e2e", "gpu"])
    parser.add_argument("--models", nargs="+", default=["crepe-full", "resnet50"])
    parser.add_argument("--provider", choices=["cpu", "cuda"], default="cpu",
                        help="provider of the calib section")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--zoo-batch", type=int, default=32,
                        help="calib section: batch size for the light zoo models")
    parser.add_argument("--zoo-batches", type=int, default=4)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    parser.add_argument("--memory-samples", type=int, nargs=2, default=[500, 5000])
    parser.add_argument("--macs", type=float, nargs="+", default=[0.5, 0.25])
    parser.add_argument("--round-to", type=int, nargs="+", default=[0, 1, 16],
                        help="latency section: --round-to values (0: automatic, the default)")
    parser.add_argument("--allocations", nargs="+", default=["greedy", "uniform"],
                        choices=["greedy", "uniform", "dof"],
                        help="latency section: --allocation values (greedy: the default)")
    parser.add_argument("--gram-budget", type=float, nargs="+", default=[0.05, 0.0],
                        help="calib section: --gram-budget values to measure")
    parser.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child is not None:
        memory_child(args.memory_child)
        return
    print(f"onnxruntime {ort.__version__}, {ort.get_available_providers()}; "
          f"{len(__import__('os').sched_getaffinity(0))} CPUs")
    names = available_models(args.models)
    for section in args.sections:
        if section == "calib":
            sizes = {name: ((args.batch, args.batches) if name == "crepe-full"
                            else (args.zoo_batch, args.zoo_batches)) for name in names}
            for budget in args.gram_budget:
                bench_calibration(names, args.provider, args.repeats, sizes, budget)
        elif section == "select":
            bench_selection(args.sizes)
        elif section == "memory":
            bench_memory(args.memory_samples)
        elif section == "latency":
            bench_latency(names, args.macs, args.round_to, args.allocations,
                          max(5, args.repeats))
        elif section == "e2e":
            bench_end_to_end()
        elif section == "gpu":
            bench_gpu(names, args.batch, args.batches)  # same batches for every model


if __name__ == "__main__":
    main()
