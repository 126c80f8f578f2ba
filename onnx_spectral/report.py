"""What the user reads: per-group tables, whole-model figures, and the same as JSON."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

from onnx_spectral.analysis import Analysis, Part
from onnx_spectral.cost import ModelCost
from onnx_spectral.selection.plan import PlannedGroup
from onnx_spectral.verify import Verification


@dataclass(frozen=True)
class GroupReport:
    """One channel group: its size before and after, and why it was kept whole if it was.

    `heldout_error`: mean over the group's taps of the relative reconstruction error
    E||t - A t_J||^2 / E||t||^2 on held-out data (None when there was none or it is frozen).
    """

    id: int
    producers: tuple[str, ...]
    channels: int
    kept: int
    heldout_error: float | None
    frozen: tuple[str, ...]
    spectrum: tuple[float, ...] = ()
    """Eigenvalues of Sigma / trace(Sigma), descending (empty when not computed)."""
    dof: float | None = None
    """Degrees of freedom N(lambda) = sum mu / (mu + lambda) at lambda = the relative ridge."""
    parts: tuple[Part, ...] = ()
    """A Concat/Split group's pieces: (base group id or None when untracked, offset, size)."""
    head_size: int = 1
    """Channels per attention head in a head group (whole heads are kept); 1 otherwise."""

    @property
    def widths(self) -> str:
        """"m -> k", with the heads for a head group: "384 -> 256 (12 -> 8 heads)"."""
        text = f"{self.channels} -> {self.kept}"
        if self.head_size > 1:
            text += (f" ({self.channels // self.head_size} -> {self.kept // self.head_size} "
                     "heads)")
        return text

    @property
    def origin(self) -> str:
        """Where the channels come from, in a few words: the first producer (and how many
        more), the groups a Concat/Split group is made of ("?": an untracked part), or "-"
        when neither is known (a piece of a Split)."""
        pieces = ", ".join("?" if part is None else str(part) for part, _, _ in self.parts)
        if self.producers:
            more = len(self.producers) - 1
            name = self.producers[0] + (f" (+{more})" if more else "")
            return f"{name} (parts {pieces})" if self.parts else name
        return f"concat/split of {pieces}" if self.parts else "-"

    @property
    def status(self) -> str:
        """The status column: pruned, or frozen with its first reason."""
        return "frozen: " + self.frozen[0] if self.frozen else "pruned"


@dataclass(frozen=True)
class Report:
    """Everything a compression run measured."""

    groups: tuple[GroupReport, ...]
    cost_before: ModelCost
    cost_after: ModelCost
    calibration_samples: int
    verification: Verification | None
    options: Mapping[str, Any]
    seconds: Mapping[str, float]
    """Wall-clock seconds per pipeline stage."""
    notes: tuple[str, ...] = ()
    """What the run did that the table does not show (layers refitted, corrections skipped)."""
    warnings: tuple[str, ...] = ()
    """What the user should act on (more data, a smaller batch, an unchanged model)."""
    float_verification: Verification | None = None
    """The float model's agreement, when the model written (`verification`) is quantized."""
    sizes: Mapping[str, int] = field(default_factory=dict)
    """Serialized bytes by model: "original", "compressed" (float) and, when quantized, the
    quantized model's ("int8"); the last is the model written."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (per-node MACs left out)."""
        return {
            "groups": [asdict(group) for group in self.groups],
            "params": {"before": self.cost_before.params, "after": self.cost_after.params},
            "macs": {"before": self.cost_before.macs, "after": self.cost_after.macs,
                     **_macs_shape(self.cost_before)},
            "calibration_samples": self.calibration_samples,
            "verification": None if self.verification is None else asdict(self.verification),
            "float_verification": (None if self.float_verification is None
                                   else asdict(self.float_verification)),
            "bytes": dict(self.sizes),
            "options": dict(self.options),
            "seconds": dict(self.seconds),
            "notes": list(self.notes),
            "warnings": list(self.warnings),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    def format(self) -> str:
        """The table the CLI prints."""
        rows = [("group", "producer", "channels", "dof", "held-out rel. error", "status")]
        for group in self.groups:
            error = "-" if group.heldout_error is None else f"{group.heldout_error:.4f}"
            dof = "-" if group.dof is None else f"{group.dof:.1f}"
            rows.append((str(group.id), group.origin, group.widths, dof,
                         error, group.status))
        lines = _table(rows)
        lines.append("")
        lines.append(_ratio_line("parameters", self.cost_before.params, self.cost_after.params))
        lines.append(_ratio_line("MACs/sample", self.cost_before.macs, self.cost_after.macs)
                     + f", at {self.cost_before.shape_text()}")
        if not self.cost_before.complete:
            lines.append(f"  (a lower bound: {self.cost_before.missing_shape_text()})")
        if self.sizes:
            lines.append("model bytes: " + " -> ".join(f"{name} {size:,}"
                                                       for name, size in self.sizes.items()))
        lines.append(f"calibration samples: {self.calibration_samples}")
        quantized = list(self.sizes)[-1] if self.float_verification is not None else None
        for verification, which in ((self.float_verification, " (float model)"),
                                    (self.verification, f" ({quantized} model written)"
                                     if quantized else "")):
            if verification is not None:
                lines.extend(_verification_lines(verification, which))
        lines.extend(f"note: {note}" for note in self.notes)
        lines.extend(f"warning: {warning}" for warning in self.warnings)
        return "\n".join(lines)


def _verification_lines(verification: Verification, which: str) -> list[str]:
    """The held-out agreement of one model with the original, one line per output."""
    lines = [f"held-out verification{which} on {verification.samples} samples:"]
    for output in verification.outputs:
        top1 = ("" if output.top1_agreement is None
                else f", top-1 agreement {100 * output.top1_agreement:.2f}%")
        lines.append(f"  output '{output.name}': relative error "
                     f"{output.relative_error:.4f}, cosine {output.cosine:.4f}{top1}")
    return lines


def group_reports(analysis: Analysis, planned: Sequence[PlannedGroup],
                  errors: Mapping[int, float]) -> tuple[GroupReport, ...]:
    """One GroupReport per group of `analysis`, in its order; `errors`: held-out error by group
    id."""
    by_id = {item.plan.group.id: item for item in planned}
    return tuple(
        GroupReport(
            id=group.id,
            producers=group.producers,
            channels=group.channels,
            kept=int(by_id[group.id].plan.kept.size) if group.id in by_id else group.channels,
            heldout_error=errors.get(group.id),
            frozen=group.frozen,
            spectrum=_spectrum(by_id.get(group.id)),
            dof=None if group.id not in by_id else by_id[group.id].dof,
            parts=group.parts,
            head_size=group.block,
        )
        for group in analysis.groups
    )


def _spectrum(item: PlannedGroup | None) -> tuple[float, ...]:
    if item is None or item.spectrum is None:
        return ()
    return tuple(float(value) for value in item.spectrum)


def format_seconds(seconds: Mapping[str, float]) -> str:
    """One line: wall-clock seconds per pipeline stage and their total."""
    stages = ", ".join(f"{stage} {value:.1f}" for stage, value in seconds.items())
    return f"seconds: {stages} (total {sum(seconds.values()):.1f})"


def _ratio_line(label: str, before: int, after: int) -> str:
    share = after / before if before else 1.0
    return f"{label}: {before:,} -> {after:,} ({100 * share:.1f}% kept)"


def _table(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
            for row in rows]


def format_analysis(analysis: Analysis, cost: ModelCost) -> str:
    """The listing of `onnx-spectral analyze`: every group, its ops, prunable or why not."""
    lines = []
    for group in analysis.groups:
        status = "prunable" if group.prunable else "frozen"
        heads = "" if group.heads is None else f" ({group.heads} attention heads of {group.block})"
        lines.append(f"group {group.id}: {group.channels} channels{heads}, {status}")
        if group.parts:
            pieces = [f"{'untracked' if part is None else 'group ' + str(part)}"
                      f"[{offset}:{offset + size}]" for part, offset, size in group.parts]
            lines.append(f"  made of (Concat/Split): {', '.join(pieces)}")
        else:
            lines.append(f"  producers: {', '.join(group.producers)}")
        others = [f"{member.node} ({member.role.value})" for member in group.members
                  if member.node not in group.producers]
        if others:
            lines.append(f"  channel-wise/layout: {', '.join(others)}")
        sinks = [sink.node for tap in group.taps for sink in tap.sinks]
        if sinks:
            lines.append(f"  sinks: {', '.join(sinks)}")
        lines.extend(f"  reason: {reason}" for reason in group.frozen)
    base = [group for group in analysis.groups if not group.parts]
    prunable = sum(group.channels for group in base if group.prunable)
    total = sum(group.channels for group in base)
    lines.append("")
    lines.append(f"{sum(group.prunable for group in base)} of {len(base)} groups prunable "
                 f"({prunable} of {total} channels; concatenations and splits not counted)")
    lines.append(f"parameters: {cost.params:,}")
    if cost.complete:
        lines.append(f"MACs/sample: {cost.macs:,}, at {cost.shape_text()}")
    else:
        lines.append(f"MACs/sample: unknown; at least {cost.macs:,} (at {cost.shape_text()}); "
                     f"{cost.missing_shape_text()}")
    return "\n".join(lines)


def analysis_dict(analysis: Analysis, cost: ModelCost) -> dict[str, Any]:
    """The analysis as a JSON-ready dict."""
    return {
        "groups": [
            {
                "id": group.id,
                "channels": group.channels,
                "prunable": group.prunable,
                "producers": list(group.producers),
                "members": [{"node": m.node, "role": m.role.value} for m in group.members],
                "sinks": [sink.node for tap in group.taps for sink in tap.sinks],
                "frozen": list(group.frozen),
                "parts": [list(part) for part in group.parts],
            }
            for group in analysis.groups
        ],
        "params": cost.params,
        "macs": cost.macs if cost.complete else None,
        "macs_counted": cost.macs,
        **_macs_shape(cost),
    }


def _macs_shape(cost: ModelCost) -> dict[str, Any]:
    """Which input shapes the MACs are for (None: the declared ones, batch 1) and the linear
    layers left uncounted there (their dims depend on symbolic input dims)."""
    return {"input_shapes": None if cost.input_shapes is None
            else {name: list(shape) for name, shape in cost.input_shapes.items()},
            "uncounted": list(cost.uncounted)}


class StageClock:
    """Seconds spent in each stage of a run (`with clock("calibrate"): ...`), for the report."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start
