"""Quality of onnx-spectral against baselines on real models at whole-model MAC budgets.

    python -m tools.bench_quality [--models mnist crepe-tiny crepe-full ppocr]
        [--budgets 0.75 0.5 0.35 0.25] [--methods NAME ...] [--plot bench_quality.png]

No fine-tuning; every method gets the same calibration data, the same test data and the same
MAC budget (fraction of the whole model's MACs kept, `--flops`). Task metrics: MNIST test
accuracy (10,000 images); CREPE raw pitch accuracy (RPA) and median cents error on 2,000 fresh
tones; PP-OCR top-1 agreement with the original on 400 held-out page-line crops. The stages
are run once per model where the statistics are the same, through the steps `compress` runs
(`onnx_spectral.api`): one `prepare` (analysis), one `shared_statistics` (calibration under the
Gram budget; its statistics serve every method), one cost model; each method then only
`decide_corrections` (the rules users get: no compensation with Concat/Split groups), `plan`,
`rewrite_model` and `correct` (the refit). The acceptance
budgets (MNIST 0.07, CREPE tiny 0.35, CREPE full 0.25) are added to the budgets of their model.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from models import crepe, mnist, ppocr
from models.runtime import run_onnx
from onnx_spectral.api import (
    Calibrated,
    CompressOptions,
    Prepared,
    correct,
    decide_corrections,
    plan,
    prepare,
    rewrite_model,
    shared_statistics,
)
from onnx_spectral.calibration.sources import FeedDict
from onnx_spectral.cost import model_cost
from onnx_spectral.graph.model import load_model
from onnx_spectral.selection.group_cost import GroupCosts, group_costs

DEFAULTS = CompressOptions()
BASE = CompressOptions(allocation="uniform", round_to=1, compensation=False, refit=False,
                       provider="cpu", verify_samples=0)
"""What a method starts from: uniform widths, no rounding, no correction; no held-out data
(each task scores with its own)."""
# name -> CompressOptions fields over BASE; budgets come from --budgets.
METHODS: dict[str, dict[str, Any]] = {
    "random channels": {"selection": "random", "reconstruct": False},
    "L1-norm, no reconstruction": {"selection": "l1", "reconstruct": False},
    "L1-norm + reconstruction": {"selection": "l1"},
    "ThiNet-like (theta 0, ridge 1e-8)": {"theta": 0.0, "ridge": 1e-8},
    "spectral theta 0, uniform": {"theta": 0.0},
    "spectral theta 0.5, uniform": {"theta": 0.5},
    "spectral theta 1, uniform": {"theta": 1.0},
    "spectral, dof": {"allocation": "dof"},
    "spectral, greedy": {"allocation": "greedy"},
    "spectral, uniform + compensation": {"compensation": True},
    "spectral, dof + compensation": {"allocation": "dof", "compensation": True},
    "spectral, greedy + compensation": {"allocation": "greedy", "compensation": True},
    "spectral, greedy + compensation + cross selection": {
        "allocation": "greedy", "compensation": True, "cross_selection": True},
    "spectral, uniform + compensation + refit": {"compensation": True, "refit": True},
    "spectral, greedy + compensation + refit": {"allocation": "greedy", "compensation": True,
                                                "refit": True},
    "defaults": {name: getattr(DEFAULTS, name)
                 for name in ("theta", "ridge", "allocation", "round_to", "min_keep",
                              "compensation", "refit")},
}
TORCH_PRUNING = ("Torch-Pruning magnitude (its model)", "Torch-Pruning channels, exact surgery")
ACCEPTANCE = {"mnist": 0.07, "crepe-tiny": 0.35, "crepe-full": 0.25}


@dataclass(frozen=True)
class Task:
    """A real model with its calibration batches, its metric and the metric's name."""

    model: Path
    calibration: list[FeedDict]
    score: Callable[[onnx.ModelProto | Path], tuple[float, str]]
    """(main metric in %, text)."""


def _batches(name: str, array: np.ndarray, size: int = 32) -> list[FeedDict]:
    return [{name: array[start:start + size]} for start in range(0, len(array), size)]


def mnist_task() -> Task:
    train, _ = mnist.mnist_images("train")
    test, labels = mnist.mnist_images("test")
    inputs = mnist.preprocess(test)

    def score(model: onnx.ModelProto | Path) -> tuple[float, str]:
        value = 100 * mnist.accuracy(run_onnx(model, inputs), labels)
        return value, f"{value:.2f}%"

    return Task(mnist.digit_cnn_onnx(), _batches("input", mnist.preprocess(train[:1000])), score)


def crepe_task(capacity: crepe.Capacity) -> Task:
    frames, _ = crepe.make_tones(2000, seed=11)
    test, f0 = crepe.make_tones(2000, seed=12)

    def score(model: onnx.ModelProto | Path) -> tuple[float, str]:
        metrics = crepe.pitch_metrics(run_onnx(model, test, batch_size=250), f0)
        value = 100 * metrics.raw_pitch_accuracy
        return value, f"{value:.2f}% / {metrics.median_cents_error:.1f} c"

    return Task(crepe.crepe_onnx(capacity), _batches("frames", frames), score)


def ppocr_task() -> Task:
    """PP-OCR's text-orientation classifier: agreement of the top-1 class with the original on
    400 held-out page-line crops (it has no labels of its own); 500 calibration crops."""
    calibration, _ = ppocr.crop_batch(500, seed=0)
    test, _ = ppocr.crop_batch(400, seed=1, sources=ppocr.PAGE)
    reference = run_onnx(ppocr.cls_model(), test).argmax(1)

    def score(model: onnx.ModelProto | Path) -> tuple[float, str]:
        value = 100 * float(np.mean(run_onnx(model, test).argmax(1) == reference))
        return value, f"{value:.2f}%"

    return Task(ppocr.cls_model(), _batches("x", calibration), score)


TASKS: dict[str, Callable[[], Task]] = {
    "mnist": mnist_task,
    "ppocr": ppocr_task,
    "crepe-tiny": lambda: crepe_task("tiny"),
    "crepe-full": lambda: crepe_task("full"),
}


@dataclass
class Stages:
    """What every method of one model shares: the prepared model, its statistics, its cost
    model, the options they were made with."""

    prepared: Prepared
    calibrated: Calibrated
    costs: GroupCosts
    options: CompressOptions
    macs: int
    """The original model's MACs per sample."""
    seconds: dict[str, float] = field(default_factory=dict)


def shared_stages(task: Task) -> Stages:
    """Prepare and calibrate on all of the task's calibration samples, as `compress` does."""
    start = time.perf_counter()
    samples = sum(len(next(iter(feeds.values()))) for feeds in task.calibration)
    options = dataclasses.replace(BASE, calib_samples=samples)
    prepared = prepare(load_model(task.model), task.calibration, options)
    calibrated = shared_statistics(prepared, options, keep_batches=True)
    calibrated_at = time.perf_counter()
    cost = prepared.cost  # at the shape the model runs at, as compress counts
    return Stages(prepared, calibrated,
                  group_costs(prepared.analysis, prepared.analyzed_cost, prepared.reference_cost),
                  options, cost.macs,
                  {"calibration": calibrated_at - start})


def compress_with(stages: Stages, flops: float, settings: dict[str, Any]
                  ) -> tuple[onnx.ModelProto, float]:
    """The model at `flops` MACs kept with one method's settings; and the MACs kept."""
    options = dataclasses.replace(stages.options, flops=flops, **settings)
    corrections = decide_corrections(stages.prepared, options)
    planned = plan(stages.prepared, stages.calibrated, options, corrections, stages.costs)
    model = rewrite_model(stages.prepared, planned)
    model, _ = correct(stages.prepared, model, planned, stages.calibrated, options, corrections)
    return model, model_cost(model, stages.prepared.cost.input_shapes).macs / stages.macs


def bench(name: str, budgets: list[float], methods: list[str],
          results: dict[str, dict[str, list[tuple[float, float]]]]) -> None:
    task = TASKS[name]()
    stages = shared_stages(task)
    _, original = task.score(task.model)
    budgets = sorted(set(budgets) | ({ACCEPTANCE[name]} if name in ACCEPTANCE else set()),
                     reverse=True)
    print(f"\n## {name} (original: {original}; calibration "
          f"{stages.seconds['calibration']:.0f} s, shared by all methods)")
    print("| method | " + " | ".join(f"MACs {b:g}" for b in budgets) + " |")
    print("|---|" + "---|" * len(budgets))
    curves = results.setdefault(name, {})
    for method in methods:
        if method == "torch-pruning" and name == "ppocr":
            print("| Torch-Pruning | n/a: the classifier exists only as ONNX here |")
            continue
        if method == "torch-pruning":
            _bench_torch_pruning(name, task, stages, budgets, curves)
            continue
        cells = []
        for budget in budgets:
            start = time.perf_counter()
            model, kept = compress_with(stages, budget, METHODS[method])
            seconds = time.perf_counter() - start
            value, text = task.score(model)
            curves.setdefault(method, []).append((kept, value))
            cells.append(f"{text} ({100 * kept:.1f}%, {seconds:.0f} s)")
        print(f"| {method} | " + " | ".join(cells) + " |", flush=True)


def _bench_torch_pruning(name: str, task: Task, stages: Stages, budgets: list[float],
                         curves: dict[str, list[tuple[float, float]]]) -> None:
    from tools.torch_pruning_baseline import torch_pruning_models

    rows: tuple[list[str], list[str]] = ([], [])
    for budget in budgets:
        start = time.perf_counter()
        path, surgery, kept = torch_pruning_models(name, stages.prepared.analysis, stages.costs,
                                                     budget)
        seconds = time.perf_counter() - start
        for row, label, model in zip(rows, TORCH_PRUNING, (path, surgery), strict=True):
            value, text = task.score(model)
            curves.setdefault(label, []).append((kept, value))
            row.append(f"{text} ({100 * kept:.1f}%, {seconds:.0f} s)")
    for label, row in zip(TORCH_PRUNING, rows, strict=True):
        print(f"| {label} | " + " | ".join(row) + " |", flush=True)


def plot(results: dict[str, dict[str, list[tuple[float, float]]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5), squeeze=False)
    for axis, (name, curves) in zip(axes[0], results.items(), strict=True):
        for method, points in curves.items():
            xs, ys = zip(*sorted(points), strict=True)
            axis.plot(xs, ys, marker="o", label=method)
        axis.set_title(name)
        axis.set_xlabel("MACs kept")
        axis.set_ylabel("accuracy / raw pitch accuracy (%)")
    axes[0][0].legend(fontsize=6)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=sorted(TASKS), default=sorted(TASKS))
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.75, 0.5, 0.35, 0.25])
    parser.add_argument("--methods", nargs="+", choices=[*METHODS, "torch-pruning"],
                        default=[*METHODS, "torch-pruning"])
    parser.add_argument("--plot", type=Path, help="write the metric-vs-MACs figure here")
    args = parser.parse_args()
    results: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for name in args.models:
        bench(name, args.budgets, args.methods, results)
    if args.plot is not None:
        plot(results, args.plot)
        print(f"\nwrote {args.plot}")


if __name__ == "__main__":
    main()
