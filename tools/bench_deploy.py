"""Deployment matrix: compressed models (float and int8) in ONNX Runtime, ONNX Runtime's ORT
format (the mobile runtime's) and OpenVINO, against the original float model in ONNX Runtime.

    python -m tools.bench_deploy [--models mnist crepe] [--threads 2] [--rounds 20]

For each model it compresses the original once with the defaults at its MAC budget (MNIST CNN
at --flops 0.07, CREPE full at --flops 0.5), with `--quantize int8` (the int8 model's float
stage is the float model), scores the task metric of all three models (MNIST test accuracy,
CREPE raw pitch accuracy on fresh tones), then runs every model in every runtime:

- outputs equal?: the largest absolute difference from the same model in ONNX Runtime, and
  whether it is within `--atol` (float) or `--atol-int8` times the largest |output|;
- latency at batch 32 (`--batch`), with `--threads` intra-op threads everywhere; the runs of all
  models and runtimes are interleaved round by round (side by side), and each figure is the
  median over `--rounds` rounds, as a ratio to the original float model in ONNX Runtime.

Prints a Markdown table (docs/deployment.md) and, with --json, writes the figures.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnx_spectral import CompressOptions, compress
from onnx_spectral.graph import atomic
from onnx_spectral.quantize import quantize_int8

Runner = Callable[[np.ndarray], np.ndarray]
"""Runs a single-input model on a batch [N, ...] and returns its first output [N, ...]."""

RUNTIMES = ("onnxruntime", "ort-format", "openvino")


def ort_runner(path: Path, threads: int) -> Runner:
    """ONNX Runtime on the CPU with `threads` intra-op threads (an `.onnx` or `.ort` file)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    # idle threads that spin after a run would starve the next runner of the interleaved timing
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda batch: np.asarray(session.run(None, {name: batch})[0])


def to_ort_format(path: Path, folder: Path) -> Path:
    """Convert `path` to the ORT format with ONNX Runtime's own tool (as for a mobile build:
    fixed optimizations, the required-operators config beside it); return the `.ort` file."""
    folder.mkdir(parents=True, exist_ok=True)
    result = subprocess.run([sys.executable, "-m", "onnxruntime.tools.convert_onnx_models_to_ort",
                             str(path), "--output_dir", str(folder), "--optimization_style",
                             "Fixed"], capture_output=True, text=True, timeout=900)
    converted = folder / (path.stem + ".ort")
    if result.returncode != 0 or not converted.is_file():
        raise RuntimeError(f"ORT format conversion of {path} failed: {result.stderr[-2000:]}")
    return converted


def openvino_runner(path: Path, threads: int) -> Runner:
    """OpenVINO's CPU plugin on the ONNX file, with `threads` inference threads, in float32
    (by default OpenVINO computes in bfloat16 on CPUs that have it)."""
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(path)), "CPU",
                                  {"INFERENCE_NUM_THREADS": threads,
                                   "PERFORMANCE_HINT": "LATENCY",
                                   "INFERENCE_PRECISION_HINT": "f32"})
    request = compiled.create_infer_request()
    output = compiled.output(0)

    def run(batch: np.ndarray) -> np.ndarray:
        return np.asarray(request.infer([batch])[output]).copy()
    return run


def runner(runtime: str, path: Path, threads: int, folder: Path) -> Runner:
    """A runner of `path` in `runtime` (one of RUNTIMES); ORT-format files go to `folder`."""
    if runtime == "onnxruntime":
        return ort_runner(path, threads)
    if runtime == "ort-format":
        return ort_runner(to_ort_format(path, folder), threads)
    if runtime == "openvino":
        return openvino_runner(path, threads)
    raise ValueError(f"unknown runtime {runtime!r}; accepted: {', '.join(RUNTIMES)}")


def run_batched(run: Runner, inputs: np.ndarray, batch: int) -> np.ndarray:
    """`run` over `inputs` [N, ...] in batches of `batch`, concatenated."""
    return np.concatenate([run(inputs[start:start + batch])
                           for start in range(0, len(inputs), batch)])


def interleaved_latency(runners: dict[str, Runner], batch: np.ndarray, rounds: int
                        ) -> dict[str, float]:
    """Median seconds per run of each runner on `batch`; one run of each per round, in turn,
    after one warm-up run each, so that all see the same machine load."""
    times: dict[str, list[float]] = {key: [] for key in runners}
    for run in runners.values():
        run(batch)
    for _ in range(rounds):
        for key, run in runners.items():
            start = time.perf_counter()
            run(batch)
            times[key].append(time.perf_counter() - start)
    return {key: float(np.median(values)) for key, values in times.items()}


@dataclass(frozen=True)
class Task:
    """A model with its calibration data, test data and task metric (higher is better)."""

    name: str
    original: Path
    calibration: np.ndarray
    test: np.ndarray
    metric: Callable[[np.ndarray], float]
    metric_name: str
    options: dict[str, object]


def mnist_task() -> Task:
    from models import mnist

    train, _ = mnist.mnist_images("train")
    test, labels = mnist.mnist_images("test")
    return Task("MNIST CNN", mnist.digit_cnn_onnx(), mnist.preprocess(train[:1200]),
                mnist.preprocess(test), lambda logits: mnist.accuracy(logits, labels),
                "accuracy", {"flops": 0.07, "calib_samples": 1000, "verify_samples": 200})


def crepe_task() -> Task:
    from models import crepe

    frames, _ = crepe.make_tones(2200, seed=11)
    test, f0 = crepe.make_tones(2000, seed=12)
    return Task("CREPE full", crepe.crepe_onnx("full"), frames, test,
                lambda probabilities: crepe.pitch_metrics(probabilities, f0).raw_pitch_accuracy,
                "RPA", {"flops": 0.5, "calib_samples": 2000, "verify_samples": 200})


TASKS: dict[str, Callable[[], Task]] = {"mnist": mnist_task, "crepe": crepe_task}


@dataclass(frozen=True)
class Cell:
    """One model in one runtime: largest |difference| from ONNX Runtime on the test inputs,
    whether that is within tolerance, median latency (s) and its ratio to the original float
    model in ONNX Runtime."""

    task: str
    model: str
    runtime: str
    max_abs_diff: float
    equal: bool
    latency_s: float
    latency_ratio: float


def compressed_models(task: Task, folder: Path) -> dict[str, Path]:
    """The original, float compressed and int8 models of `task`, written under `folder`; prints
    the compression report's figures.

    One compression: the int8 model is the float model quantized as `--quantize int8` does it,
    from the first whole batches (of `batch_size`) holding `compensation_samples` calibration
    samples (tests/test_quantize.py checks that this equals `compress(..., quantize="int8")`).
    """
    input_name = onnx.load(str(task.original), load_external_data=False).graph.input[0].name
    options = CompressOptions(provider="cpu", **task.options)  # type: ignore[arg-type]
    model, report = compress(task.original, {input_name: task.calibration}, options)
    whole = -(-options.compensation_samples // options.batch_size)  # batches kept whole
    first = task.calibration[:whole * options.batch_size]
    batches = [{input_name: first[start:start + options.batch_size]}
               for start in range(0, len(first), options.batch_size)]
    quantized = quantize_int8(model, batches)
    paths = {"original": task.original}
    for label, written in (("float", model), ("int8", quantized)):
        paths[label] = folder / f"{task.name.replace(' ', '_')}_{label}.onnx"
        atomic.save_model(written, paths[label])
    print(f"{task.name}: MACs {report.cost_after.macs:,} of {report.cost_before.macs:,}; bytes "
          + ", ".join(f"{label} {path.stat().st_size:,}" for label, path in paths.items()),
          flush=True)
    return paths


def measure(task: Task, folder: Path, threads: int, rounds: int, batch: int,
            atol: float, atol_int8: float) -> tuple[list[Cell], dict[str, float]]:
    """The matrix cells of one task and the task metric of each model (in ONNX Runtime)."""
    paths = compressed_models(task, folder)
    runners = {(model, runtime): runner(runtime, path, threads, folder / "ort")
               for model, path in paths.items() for runtime in RUNTIMES}
    test = task.test[:256]
    reference = {model: run_batched(runners[model, "onnxruntime"], test, batch)
                 for model in paths}
    metrics = {model: task.metric(run_batched(runners[model, "onnxruntime"], task.test, batch))
               for model in paths}
    seconds = interleaved_latency({f"{m}/{r}": run for (m, r), run in runners.items()},
                                  task.test[:batch], rounds)
    base = seconds["original/onnxruntime"]
    cells = []
    for (model, runtime), run in runners.items():
        diff = float(np.max(np.abs(run_batched(run, test, batch) - reference[model])))
        scale = float(np.max(np.abs(reference[model])))
        cells.append(Cell(task.name, model, runtime, diff,
                          diff <= (atol_int8 if model == "int8" else atol) * scale,
                          seconds[f"{model}/{runtime}"], seconds[f"{model}/{runtime}"] / base))
    return cells, metrics


def markdown(cells: Sequence[Cell], metrics: dict[str, dict[str, float]]) -> str:
    """The matrix and the task metrics as Markdown tables."""
    lines = ["| model | variant | runtime | outputs equal? (max abs diff) | latency (ms) | "
             "ratio to original (ORT) |", "|---|---|---|---|---|---|"]
    for cell in cells:
        lines.append(f"| {cell.task} | {cell.model} | {cell.runtime} | "
                     f"{'yes' if cell.equal else 'no'} ({cell.max_abs_diff:.2g}) | "
                     f"{1000 * cell.latency_s:.1f} | {cell.latency_ratio:.3f} |")
    lines += ["", "| model | original | float compressed | int8 |", "|---|---|---|---|"]
    for task, values in metrics.items():
        lines.append(f"| {task} | " + " | ".join(f"{100 * values[key]:.2f}%"
                                                  for key in ("original", "float", "int8"))
                     + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(TASKS), default=sorted(TASKS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--atol", type=float, default=1e-4,
                        help="float models: largest accepted |difference| from ONNX Runtime, "
                        "as a share of the largest |output|")
    parser.add_argument("--atol-int8", type=float, default=0.05,
                        help="the same for int8 models: runtimes may round requantization "
                        "differently")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    cells: list[Cell] = []
    metrics: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-deploy-") as folder:
        for key in args.models:
            task = TASKS[key]()
            found, metrics[task.name] = measure(task, Path(folder), args.threads, args.rounds,
                                                args.batch, args.atol, args.atol_int8)
            cells.extend(found)
    print(markdown(cells, metrics))
    if args.json is not None:
        atomic.write_text(args.json, json.dumps({"cells": [asdict(cell) for cell in cells],
                                                 "metrics": metrics}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
