"""onnx-spectral and onnxsim 0.8.1 on every corpus model (models/corpus.py) at one MAC budget.

``python -m tools.bench_coverage --corpus`` runs this. Per model, two or three worker processes
(``python -m tools.corpus_coverage SIDE NAME FLOPS CALIB VERIFY TEST OUT.json``), each under its
own time limit, so that a slow or crashing model costs one row, not the table:

- ``spectral``: ``onnx_spectral.compress(path, calibration, flops=FLOPS, provider="cpu",
  calib_samples=CALIB, verify_samples=VERIFY)`` on the entry's seed-0 draw of CALIB + VERIFY
  samples. The outcome is ``compressed``; ``refused`` (an ``onnx_spectral.errors`` error: its
  first line); ``INTERNAL ERROR`` (any other exception: type, message and traceback); or
  ``INVALID`` (a compressed model that fails onnx.checker, does not run in ONNX Runtime, or
  changes output names or shapes on a held-out sample). Groups and frozen reasons come from
  ``onnx_spectral.analysis.analyze`` (and the report's groups once compressed).
- ``onnxsim``: ``tools.onnxsim_baseline.onnxsim_prune`` on the first CALIB samples at FLOPS.
- ``matched``: where onnxsim's valid model keeps fewer MACs than onnx-spectral's, onnx-spectral
  again with its budget scaled to onnxsim's MACs (`matched_budget`), so that the summary
  compares the two tools at no more MACs for onnx-spectral.

Both measure MACs with ``tools.onnxsim_baseline.count_macs`` at the shape of the first
calibration sample (batch 1), parameters as the elements of the initializers and Constant
tensors (subgraphs included), and fidelity on TEST held-out samples (the entry's seed-1 draw)
by the entry's metric (tools/corpus_metrics.py).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import traceback
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

Feeds = dict[str, np.ndarray]
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Side:
    """One tool's result on one model.

    `outcome`: "compressed", "refused", "INTERNAL ERROR", "INVALID", "timeout" or "setup
    error" (the model or its data could not be had); onnxsim: "pruned", "failed" or "timeout".
    `message`: the error's first line (refusals, internal errors, invalid models, failures).
    `traceback`: the whole traceback of an internal error. `macs`: (before, after) by
    count_macs at the first calibration sample's shape; `report_macs`, `params`: (before,
    after) by the report's cost model and by counting weights. `groups`: (prunable, frozen)
    channel groups. `reasons`: frozen reasons without names, by count. `analysis_error`: why
    `analyze` gave no groups. `fidelity` and
    `fidelity_text`: see tools/corpus_metrics.py. `seconds`: the tool's own time.
    """

    outcome: str
    message: str = ""
    traceback: str = ""
    macs: tuple[int, int] | None = None
    report_macs: tuple[int, int] | None = None
    params: tuple[int, int] | None = None
    groups: tuple[int, int] | None = None
    reasons: dict[str, int] = field(default_factory=dict)
    fidelity: float | None = None
    fidelity_text: str = ""
    seconds: float = 0.0
    analysis_error: str = ""

    @property
    def macs_kept(self) -> float | None:
        """MACs after / before by count_macs (None when unknown or zero)."""
        if not self.macs or not self.macs[0]:
            return None
        return self.macs[1] / self.macs[0]


def reason_kind(reason: str) -> str:
    """A frozen reason without node and tensor names, so equal causes count together."""
    text = re.sub(r"'[^']*'", "'*'", reason)
    return re.sub(r"\(([A-Za-z]+ node '\*', input \d+ '\*')\)", "", text).strip()


def count_params(model: onnx.ModelProto) -> int:
    """Elements of the initializers, Constant-node tensors and ConstantOfShape outputs of a
    constant shape (the weights of the IR-3 zoo graphs) of every graph of `model`."""

    def graph_params(graph: onnx.GraphProto) -> int:
        values = {tensor.name: tensor for tensor in graph.initializer}
        values.update({node.output[0]: attribute.t for node in graph.node
                       if node.op_type == "Constant" for attribute in node.attribute
                       if attribute.name == "value"})
        total = sum(int(np.prod(tensor.dims)) for tensor in values.values())
        for node in graph.node:
            if node.op_type == "ConstantOfShape" and node.input[0] in values:
                total += int(np.prod(onnx.numpy_helper.to_array(values[node.input[0]])))
            for attribute in node.attribute:
                for sub in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
                    total += graph_params(sub)
        return total

    return graph_params(model.graph)


def run_output(model: onnx.ModelProto, output: str, samples: list[Feeds]) -> list[np.ndarray]:
    """The value of graph output `output` on each sample."""
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return [np.asarray(session.run([output], feeds)[0]) for feeds in samples]


def first_line(error: BaseException) -> str:
    """`Type: first line of the message`."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


@dataclass(frozen=True)
class Loaded:
    """A corpus entry's model and data: `calibration` (seed 0, CALIB + VERIFY samples),
    `held_out` (seed 1, TEST samples) and their `labels` (None without ground truth)."""

    entry: Any
    path: Path
    model: onnx.ModelProto
    calibration: list[Feeds]
    held_out: list[Feeds]
    labels: np.ndarray | None


def load(name: str, calib: int, verify: int, test: int) -> Loaded:
    """Fetch or build corpus model `name` and draw its data."""
    from models.corpus import corpus_entry

    entry = corpus_entry(name)
    path = entry.path()
    model = onnx.load(str(path))
    labels = None if entry.labels is None else np.asarray(entry.labels(test, 1))
    return Loaded(entry, path, model, entry.data(calib + verify, 0), entry.data(test, 1), labels)


def _fidelity(loaded: Loaded, changed: onnx.ModelProto) -> tuple[float, str]:
    from tools.corpus_metrics import fidelity

    entry = loaded.entry
    original = run_output(loaded.model, entry.output, loaded.held_out)
    result = fidelity(entry.name, entry.metric, entry.axis, original,
                      run_output(changed, entry.output, loaded.held_out), loaded.labels)
    return result.value, result.text


def _groups(model: onnx.ModelProto, feeds: Feeds, side: Side) -> None:
    """Set the (prunable, frozen) group counts and the frozen reasons by count of `side` from
    the analysis compress makes (`prepare`: a quantized model's float model, the If branch
    `feeds` take, reconstruction layers, shapes it cannot infer from `feeds`); an analysis that
    fails is noted in `side.analysis_error` (and its traceback kept unless it is a
    SpectralError)."""
    from onnx_spectral.errors import SpectralError
    from onnx_spectral.options import CompressOptions
    from onnx_spectral.prepare import prepare

    try:
        analysis = prepare(model, feeds, CompressOptions(require_prunable=False)).analysis
    except SpectralError as error:
        side.analysis_error = first_line(error)
        return
    except Exception as error:  # a bug in the analysis
        side.analysis_error = "INTERNAL ERROR " + first_line(error)
        side.traceback += "analyze:\n" + traceback.format_exc()
        return
    prunable = len(analysis.prunable)
    reasons = Counter(reason_kind(reason) for group in analysis.groups for reason in group.frozen)
    side.groups = (prunable, len(analysis.groups) - prunable)
    side.reasons = dict(reasons.most_common())


def measure_spectral(loaded: Loaded, flops: float, calib: int, verify: int) -> Side:
    """Compress with onnx-spectral and measure (see the module docstring)."""
    from onnx_spectral import compress
    from onnx_spectral.errors import SpectralError
    from tools.onnxsim_baseline import check_valid, count_macs

    side = Side("compressed")
    start = time.perf_counter()
    try:
        compressed, report = compress(str(loaded.path), loaded.calibration, flops=flops,
                                      provider="cpu", calib_samples=calib,
                                      verify_samples=verify)
    except SpectralError as error:
        side.outcome, side.message = "refused", first_line(error)
    except Exception as error:  # anything else is a bug to report
        side.outcome, side.message = "INTERNAL ERROR", first_line(error)
        side.traceback = traceback.format_exc()
    side.seconds = time.perf_counter() - start
    _groups(loaded.model, loaded.calibration[0], side)
    if side.outcome != "compressed":
        return side
    reasons = Counter(reason_kind(reason) for group in report.groups for reason in group.frozen)
    side.reasons = dict(reasons.most_common())
    side.report_macs = (report.cost_before.macs, report.cost_after.macs)
    side.params = (count_params(loaded.model), count_params(compressed))
    problem = check_valid(loaded.model, compressed, loaded.held_out[0])
    if problem is not None:
        side.outcome, side.message = "INVALID", problem.splitlines()[0]
        return side
    first = loaded.calibration[0]
    side.macs = (count_macs(loaded.model, first), count_macs(compressed, first))
    side.fidelity, side.fidelity_text = _fidelity(loaded, compressed)
    return side


def measure_onnxsim(loaded: Loaded, flops: float, calib: int, timeout: float) -> Side:
    """Prune with onnxsim 0.8.1 at the same budget and measure it the same way."""
    from tools.onnxsim_baseline import onnxsim_prune

    result = onnxsim_prune(loaded.model, loaded.calibration[:calib], flops, timeout=timeout)
    side = Side("pruned" if result.model is not None and result.valid else "failed",
                message=(result.reason or "").strip().splitlines()[0] if result.reason else "",
                seconds=result.seconds)
    if result.model is None:
        return side
    side.macs = (result.macs_before, result.macs_after)
    side.params = (count_params(loaded.model), count_params(result.model))
    if result.valid:
        side.fidelity, side.fidelity_text = _fidelity(loaded, result.model)
    return side


def worker(argv: list[str]) -> None:
    """``SIDE NAME FLOPS CALIB VERIFY TEST TIMEOUT OUT``: measure one side, write it as JSON."""
    side_name, name, flops, calib, verify, test, timeout, out = argv
    try:
        loaded = load(name, int(calib), int(verify), int(test))
    except Exception as error:
        side = Side("setup error", first_line(error), traceback.format_exc())
    else:
        side = (measure_spectral(loaded, float(flops), int(calib), int(verify))
                if side_name == "spectral"
                else measure_onnxsim(loaded, float(flops), int(calib), float(timeout)))
    Path(out).write_text(json.dumps(asdict(side)))


@dataclass(frozen=True)
class Settings:
    """What every model runs with: the MAC budget, samples, time limits (seconds)."""

    flops: float = 0.5
    calib: int = 16
    verify: int = 4
    test: int = 16
    spectral_timeout: float = 300.0
    onnxsim_timeout: float = 150.0


def run_side(side: str, name: str, settings: Settings, scratch: Path,
             flops: float | None = None, tag: str | None = None) -> Side:
    """One worker process at `flops` (the settings' by default), its result kept in
    ``NAME.TAG.json`` (TAG = `side` by default); a timeout or a crash becomes the row's
    outcome."""
    out = scratch / f"{name}.{tag or side}.json"
    limit = settings.spectral_timeout if side == "spectral" else settings.onnxsim_timeout
    budget = settings.flops if flops is None else flops
    command = [sys.executable, "-m", "tools.corpus_coverage", side, name, str(budget),
               str(settings.calib), str(settings.verify), str(settings.test), str(limit),
               str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=limit + 60, check=False)
    except subprocess.TimeoutExpired:
        result = Side("timeout", f"no result after {limit + 60:.0f} s",
                      seconds=time.perf_counter() - start)
    else:
        if done.returncode == 0 and out.is_file():
            return read_side(out)
        tail = done.stderr.strip().splitlines()[-1:] or [""]
        result = Side("INTERNAL ERROR" if side == "spectral" else "failed",
                      f"worker exit code {done.returncode}: {tail[0]}", done.stderr[-3000:],
                      seconds=time.perf_counter() - start)
    out.write_text(json.dumps(asdict(result)))
    return result


def read_side(path: Path) -> Side:
    """A Side as a worker wrote it."""
    fields = json.loads(path.read_text())
    for key in ("macs", "report_macs", "params", "groups"):
        if fields[key] is not None:
            fields[key] = tuple(fields[key])
    return Side(**fields)


@dataclass(frozen=True)
class Row:
    """One model's results: onnx-spectral at the budget, onnxsim at the budget, and, where
    onnxsim's valid model keeps fewer MACs than onnx-spectral's, onnx-spectral again at
    onnxsim's MACs (`matched`; None otherwise)."""

    name: str
    spectral: Side
    onnxsim: Side
    matched: Side | None = None


def matched_budget(flops: float, spectral: Side, onnxsim: Side) -> float | None:
    """The budget at which onnx-spectral keeps no more MACs (by count_macs) than onnxsim's
    valid model, when onnxsim kept fewer than onnx-spectral did at `flops`; None otherwise.

    The budget is a fraction of onnx-spectral's own cost model, so it is scaled by the ratio
    of the two MAC fractions measured by count_macs (0.1% lower, for rounding)."""
    ours, theirs = spectral.macs_kept, onnxsim.macs_kept
    if (spectral.outcome != "compressed" or onnxsim.outcome != "pruned" or ours is None
            or theirs is None or theirs >= ours):
        return None
    return flops * theirs / ours * 0.999


def read_results(names: list[str], folder: Path) -> Iterator[Row]:
    """The rows of earlier runs whose worker results lie in `folder` (a missing side reads as
    "not run")."""
    for name in names:
        spectral, onnxsim, matched = (folder / f"{name}.{tag}.json"
                                      for tag in ("spectral", "onnxsim", "matched"))
        yield Row(name, read_side(spectral) if spectral.is_file() else Side("not run"),
                  read_side(onnxsim) if onnxsim.is_file() else Side("not run"),
                  read_side(matched) if matched.is_file() else None)


def run_corpus(names: list[str], settings: Settings, scratch: Path) -> Iterator[Row]:
    """Each model's row, as they finish."""
    scratch.mkdir(parents=True, exist_ok=True)
    for name in names:
        spectral = run_side("spectral", name, settings, scratch)
        onnxsim = run_side("onnxsim", name, settings, scratch)
        budget = matched_budget(settings.flops, spectral, onnxsim)
        matched = (None if budget is None
                   else run_side("spectral", name, settings, scratch, budget, "matched"))
        yield Row(name, spectral, onnxsim, matched)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _kept(pair: tuple[int, int] | None) -> str:
    if not pair or not pair[0]:
        return "-"
    return f"{pair[1] / pair[0]:.1%}"


def _millions(value: int) -> str:
    return f"{value / 1e6:.1f}M" if value >= 1e5 else f"{value / 1e3:.1f}k"


def outcome_text(side: Side) -> str:
    """The outcome cell: the outcome and, for errors, their first line."""
    if not side.message:
        return side.outcome
    return f"{side.outcome}: {side.message}".replace("|", "/")[:300]


def matched_text(matched: Side | None) -> str:
    """The cell of onnx-spectral's run at onnxsim's MACs: MACs kept and fidelity."""
    if matched is None:
        return "-"
    if matched.outcome != "compressed":
        return outcome_text(matched)[:200]
    return f"MACs {_pct(matched.macs_kept)}, {matched.fidelity_text}"


def format_corpus_row(row: Row) -> str:
    """One markdown table row (see CORPUS_HEADER)."""
    spectral, onnxsim = row.spectral, row.onnxsim
    groups = ("-" if spectral.groups is None else f"{spectral.groups[0]} / {spectral.groups[1]}")
    if spectral.analysis_error:
        groups = f"analyze: {spectral.analysis_error}".replace("|", "/")[:200]
    reasons = "; ".join(f"{count} x {text}" for text, count in spectral.reasons.items())
    macs = "-"
    if spectral.macs:
        macs = (f"{_millions(spectral.macs[0])} -> {_millions(spectral.macs[1])} "
                f"({_kept(spectral.macs)}; report {_kept(spectral.report_macs)})")
    sim_macs = "-" if not onnxsim.macs else _kept(onnxsim.macs)
    sim = outcome_text(onnxsim).replace("pruned", "valid", 1)[:200]
    cells = [row.name, outcome_text(spectral), groups, reasons.replace("|", "/")[:400] or "-", macs,
             _kept(spectral.params), spectral.fidelity_text or "-", f"{spectral.seconds:.0f}",
             f"{sim}, MACs {sim_macs}, params {_kept(onnxsim.params)}",
             onnxsim.fidelity_text or "-", f"{onnxsim.seconds:.0f}",
             matched_text(row.matched)]
    return "| " + " | ".join(cells) + " |"


CORPUS_HEADER = (
    "| model | onnx-spectral outcome | groups prunable / frozen | frozen reasons (count) | "
    "MACs at calib shape (kept; report's) | params kept | fidelity | s | onnxsim 0.8.1 | "
    "onnxsim fidelity | s | onnx-spectral at onnxsim's MACs |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|")


def versus_onnxsim(row: Row) -> tuple[bool, str]:
    """Whether onnx-spectral keeps no more MACs than onnxsim's valid model with at least its
    fidelity (at onnxsim's MACs where that run was made), and the line that says so."""
    ours = row.matched or row.spectral
    theirs = row.onnxsim
    ahead = (ours.macs_kept is not None and theirs.macs_kept is not None
             and ours.macs_kept <= theirs.macs_kept + 1e-9 and ours.fidelity is not None
             and (theirs.fidelity is None or ours.fidelity >= theirs.fidelity))
    at = " (at onnxsim's MACs)" if row.matched else ""
    return ahead, (f"  {row.name}: MACs kept onnx-spectral{at} {_pct(ours.macs_kept)} vs "
                   f"onnxsim {_pct(theirs.macs_kept)}; fidelity {_pct(ours.fidelity)} vs "
                   f"{_pct(theirs.fidelity)}{'' if ahead else '  <- onnxsim ahead'}")


def summary(rows: list[Row], flops: float) -> str:
    """Counts of outcomes, of models losing >= 25% of the MACs, and the onnxsim comparison."""
    outcomes = Counter(row.spectral.outcome for row in rows)
    losing = [row.name for row in rows
              if row.spectral.macs_kept is not None and row.spectral.macs_kept <= 0.75]
    lines = [f"{len(rows)} models: " + ", ".join(f"{count} {kind}"
                                                for kind, count in outcomes.most_common()),
             f"lose >= 25% of the MACs at --flops {flops}: {len(losing)} ({', '.join(losing)})"]
    smaller = [row for row in rows if row.onnxsim.outcome == "pruned"
               and row.onnxsim.macs_kept is not None and row.onnxsim.macs_kept < 0.99]
    compared = [versus_onnxsim(row) for row in smaller]
    lines.append(f"onnxsim writes a valid smaller model: {len(smaller)}; onnx-spectral keeps no "
                 f"more MACs with at least its fidelity on "
                 f"{sum(ahead for ahead, _ in compared)}")
    lines.extend(line for _, line in compared)
    return "\n".join(lines)


def tracebacks(rows: list[Row]) -> str:
    """Every internal error's traceback, by model (its run at onnxsim's MACs included)."""
    return "\n".join(f"--- {row.name}{label}: {side.message}\n{side.traceback}"
                     for row in rows
                     for label, side in (("", row.spectral), (" at onnxsim's MACs", row.matched))
                     if side is not None and side.traceback)


if __name__ == "__main__":
    worker(sys.argv[1:])
