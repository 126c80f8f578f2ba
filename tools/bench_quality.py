"""Quality of onnx-spectral against baselines on real models, one table per model.

    python tools/bench_quality.py [--models mnist crepe-tiny crepe-full] [--ratio 0.5]

Every method gets the same calibration and test data, the same per-group widths (`--ratio`),
and no fine-tuning. Task metrics: MNIST test accuracy (10,000 images); CREPE raw pitch
accuracy and median cents error on 2,000 fresh tones. Also prints the wall-clock seconds of each
compression (calibration included) and where they went.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from models import crepe, mnist
from models.runtime import run_onnx
from onnx_spectral import compress

METHODS: dict[str, dict[str, Any]] = {
    "spectral (defaults)": {},
    "spectral theta=1 (input-aware)": {"theta": 1.0},
    "spectral theta=0 (output-aware)": {"theta": 0.0},
    "ThiNet-like (theta=0, ridge->0)": {"theta": 0.0, "ridge": 1e-8},
    "L1-norm + reconstruction": {"selection": "l1"},
    "L1-norm, no reconstruction": {"selection": "l1", "reconstruct": False},
}


@dataclass(frozen=True)
class Task:
    """A real model with its calibration data and its task metric."""

    model: Path
    calibration: dict[str, np.ndarray]
    calib_samples: int
    score: Callable[[onnx.ModelProto | Path], str]


def mnist_task() -> Task:
    train, _ = mnist.mnist_images("train")
    test, labels = mnist.mnist_images("test")
    inputs = mnist.preprocess(test)

    def score(model: onnx.ModelProto | Path) -> str:
        return f"accuracy {100 * mnist.accuracy(run_onnx(model, inputs), labels):.2f}%"

    return Task(mnist.digit_cnn_onnx(), {"input": mnist.preprocess(train[:1200])}, 1000, score)


def crepe_task(capacity: crepe.Capacity) -> Task:
    frames, _ = crepe.make_tones(2200, seed=11)
    test, f0 = crepe.make_tones(2000, seed=12)

    def score(model: onnx.ModelProto | Path) -> str:
        metrics = crepe.pitch_metrics(run_onnx(model, test, batch_size=250), f0)
        return (f"RPA {100 * metrics.raw_pitch_accuracy:.2f}%, "
                f"median {metrics.median_cents_error:.1f} cents")

    return Task(crepe.crepe_onnx(capacity), {"frames": frames}, 2000, score)


TASKS: dict[str, Callable[[], Task]] = {
    "mnist": mnist_task,
    "crepe-tiny": lambda: crepe_task("tiny"),
    "crepe-full": lambda: crepe_task("full"),
}


def bench(name: str, ratio: float) -> None:
    task = TASKS[name]()
    print(f"\n## {name}, --ratio {ratio}  (original: {task.score(task.model)})")
    print("| method | task metric | MACs kept | params kept | seconds | stages |")
    print("|---|---|---|---|---|---|")
    for method, options in METHODS.items():
        start = time.perf_counter()
        model, report = compress(task.model, task.calibration, ratio=ratio, provider="cpu",
                                 calib_samples=task.calib_samples, verify_samples=200,
                                 **options)
        seconds = time.perf_counter() - start
        stages = ", ".join(f"{stage} {value:.1f}" for stage, value in report.seconds.items())
        macs = report.cost_after.macs / report.cost_before.macs
        params = report.cost_after.params / report.cost_before.params
        print(f"| {method} | {task.score(model)} | {100 * macs:.1f}% | {100 * params:.1f}% "
              f"| {seconds:.1f} | {stages} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=sorted(TASKS), default=sorted(TASKS))
    parser.add_argument("--ratio", type=float, default=0.5)
    args = parser.parse_args()
    for name in args.models:
        bench(name, args.ratio)


if __name__ == "__main__":
    main()
