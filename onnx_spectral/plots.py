"""PNG figures of a compression report: spectra per group, widths before and after.

Needs matplotlib (the `plots` extra: `pip install onnx-spectral[plots]`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from onnx_spectral.errors import OptionsError
from onnx_spectral.report import GroupReport, Report


def require_matplotlib() -> None:
    """Raise OptionsError now, before any work, when --plots cannot be honoured."""
    _pyplot()


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise OptionsError("--plots needs matplotlib: pip install 'onnx-spectral[plots]'") from exc
    return plt


def write_plots(report: Report, folder: Path) -> list[Path]:
    """Write `spectra.png` and `widths.png` into `folder` (created); returns their paths."""
    plt = _pyplot()
    folder.mkdir(parents=True, exist_ok=True)
    groups = [group for group in report.groups if not group.frozen]
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for group in groups:
        if group.spectrum:
            values = [max(value, 1e-12) for value in group.spectrum]
            axes.semilogy(range(1, len(values) + 1), values, label=_label(group))
    axes.set_xlabel("eigenvalue index")
    axes.set_ylabel("eigenvalue of Sigma / trace(Sigma)")
    axes.set_title("Spectrum of each pruned group")
    if any(group.spectrum for group in groups):
        axes.legend(fontsize=7)
    spectra = folder / "spectra.png"
    figure.tight_layout()
    figure.savefig(spectra, dpi=120)
    plt.close(figure)
    figure, axes = plt.subplots(figsize=(7, 4.5))
    positions = range(len(report.groups))
    axes.bar([p - 0.2 for p in positions], [g.channels for g in report.groups], width=0.4,
             label="before")
    axes.bar([p + 0.2 for p in positions], [g.kept for g in report.groups], width=0.4,
             label="after")
    axes.set_xticks(list(positions), [str(g.id) for g in report.groups])
    axes.set_xlabel("channel group")
    axes.set_ylabel("channels")
    axes.set_title("Widths before and after")
    axes.legend()
    widths = folder / "widths.png"
    figure.tight_layout()
    figure.savefig(widths, dpi=120)
    plt.close(figure)
    return [spectra, widths]


def _label(group: GroupReport) -> str:
    """Legend entry of a group's spectrum: its id, where it comes from, its dof if known."""
    dof = "" if group.dof is None else f", dof {group.dof:.1f}"
    return f"group {group.id} ({group.origin}){dof}"
