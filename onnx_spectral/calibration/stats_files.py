"""Saved calibration statistics: save, load, merge, and check them against a model.

Statistics are additive (SPEC section 2), so calibration shards: each machine calibrates one
shard of the data (`onnx-spectral calibrate ... --shard I/N`), the shards' files merge by adding
Gram sums, channel sums and counts, and compression runs from the merged file.

A file is an `.npz` without pickles: `meta` holds a JSON document (format version, the model
fingerprint, the taps, the shards it covers, the calibration range) and tap `i` stores
`gram_i` ([m, m] float64), `total_i` ([m] float64) and `count_i` (int64 scalar).

The model fingerprint is the SHA-256 of the input model as loaded (`onnx.load`, external data
included) and serialized again with protobuf's deterministic serialization: it does not depend
on the file's byte layout, nor on the tool's normalization (constant folding, shape
inference), so the same model hashes the same whatever onnx version normalizes it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnx_spectral.analysis import Tap
from onnx_spectral.calibration.collect import Statistics, TapStatistics
from onnx_spectral.errors import OptionsError, StatisticsError

FORMAT = "onnx-spectral-statistics"
VERSION = 1


@dataclass(frozen=True)
class TapKey:
    """What identifies a tap across runs: its tensor (in the normalized graph), axis, size."""

    tensor: str
    axis: int
    channels: int

    @classmethod
    def of(cls, tap: Tap) -> TapKey:
        return cls(tap.tensor, tap.axis, tap.channels)


@dataclass(frozen=True)
class Shard:
    """Shard `index` (1-based) of `count`: calibration samples [start, stop) of `total`."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        """`'I/N'` with 1 <= I <= N, e.g. '2/4'."""
        try:
            index_text, count_text = text.split("/")
            shard = cls(int(index_text), int(count_text))
        except ValueError:
            raise OptionsError(f"--shard '{text}': expected I/N with integers, e.g. 2/4"
                               ) from None
        if not 1 <= shard.index <= shard.count:
            raise OptionsError(f"--shard '{text}': need 1 <= I <= N")
        return shard

    def bounds(self, total: int) -> tuple[int, int]:
        """[start, stop) of this shard among `total` samples: contiguous, near-equal ranges."""
        return ((self.index - 1) * total // self.count, self.index * total // self.count)

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


@dataclass(frozen=True)
class SavedStatistics:
    """Statistics with what they were made from.

    `model_sha256`: see `model_fingerprint`. `calib_samples`: size of the calibration range the
    shards split (held-out verification data starts after it). `shards`: the shards this holds
    (one for a shard file, several after a merge; `[1/1]` for a run without sharding).
    """

    statistics: Statistics
    model_sha256: str
    taps: tuple[TapKey, ...]
    calib_samples: int
    shards: tuple[Shard, ...]

    def missing_shards(self) -> list[str]:
        """Shards of the same split not yet merged in, as 'I/N' strings."""
        count = self.shards[0].count
        have = {shard.index for shard in self.shards}
        return [f"{index}/{count}" for index in range(1, count + 1) if index not in have]

    def check_model(self, fingerprint: str, taps: Sequence[Tap], where: str) -> Statistics:
        """The statistics for `taps` of the model with `fingerprint`, or StatisticsError."""
        if fingerprint != self.model_sha256:
            raise StatisticsError(
                f"statistics '{where}' were made from another model (model sha256 "
                f"{self.model_sha256[:16]}..., this model {fingerprint[:16]}...); calibrate "
                "this model again")
        known = {key.tensor: key for key in self.taps}
        for tap in taps:
            key = known.get(tap.tensor)
            if key != TapKey.of(tap):
                found = "none" if key is None else f"axis {key.axis}, {key.channels} channels"
                raise StatisticsError(
                    f"statistics '{where}' lack tap '{tap.tensor}' (axis {tap.axis}, "
                    f"{tap.channels} channels; found {found}); calibrate with the same "
                    "--exclude")
        return self.statistics


def model_fingerprint(model: onnx.ModelProto) -> str:
    """SHA-256 (hex) of the model's deterministic protobuf serialization."""
    return hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()


def save_statistics(path: str | Path, saved: SavedStatistics) -> None:
    """Write `saved` to `path` (an `.npz`; numpy appends the suffix when it is missing)."""
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "model_sha256": saved.model_sha256,
        "samples": saved.statistics.samples,
        "calib_samples": saved.calib_samples,
        "shards": [str(shard) for shard in saved.shards],
        "taps": [{"tensor": key.tensor, "axis": key.axis, "channels": key.channels}
                 for key in saved.taps],
    }
    arrays: dict[str, Any] = {"meta": np.array(json.dumps(meta))}  # Any: savez's **kwds
    for index, key in enumerate(saved.taps):
        tap = saved.statistics[key.tensor]
        arrays[f"gram_{index}"] = tap.gram
        arrays[f"total_{index}"] = tap.total
        arrays[f"count_{index}"] = np.array(tap.count, dtype=np.int64)
    with open(path, "wb") as file:
        np.savez(file, **arrays)


def load_statistics(path: str | Path) -> SavedStatistics:
    """Read a file written by `save_statistics`; StatisticsError names what is wrong."""
    where = str(path)
    try:
        with np.load(where, allow_pickle=False) as archive:
            meta = json.loads(str(archive["meta"]))
            if meta.get("format") != FORMAT or meta.get("version") != VERSION:
                raise StatisticsError(f"'{where}' is not an onnx-spectral statistics file "
                                      f"(format {FORMAT} version {VERSION})")
            taps = tuple(TapKey(entry["tensor"], int(entry["axis"]), int(entry["channels"]))
                         for entry in meta["taps"])
            values = {}
            for index, key in enumerate(taps):
                gram = np.asarray(archive[f"gram_{index}"], dtype=np.float64)
                total = np.asarray(archive[f"total_{index}"], dtype=np.float64)
                if gram.shape != (key.channels, key.channels) or total.shape != (key.channels,):
                    raise StatisticsError(f"'{where}': tap '{key.tensor}' has Gram "
                                          f"{gram.shape} and sum {total.shape}, expected "
                                          f"({key.channels}, {key.channels}) and "
                                          f"({key.channels},)")
                values[key.tensor] = TapStatistics(gram, total, int(archive[f"count_{index}"]))
    except (OSError, KeyError, ValueError) as exc:
        raise StatisticsError(f"cannot read statistics file '{where}': {exc}") from exc
    shards = tuple(Shard.parse(text) for text in meta["shards"])
    return SavedStatistics(Statistics(values, int(meta["samples"])), str(meta["model_sha256"]),
                           taps, int(meta["calib_samples"]), shards)


def merge_statistics(parts: Sequence[SavedStatistics], names: Sequence[str]) -> SavedStatistics:
    """Add shards' statistics; refuse different models, taps, splits or a shard given twice.

    `names`: one label per part (file names) for the error messages.
    """
    if not parts:
        raise OptionsError("merge-stats needs at least one statistics file")
    first = parts[0]
    seen: dict[Shard, str] = {}
    for part, name in zip(parts, names, strict=True):
        if part.model_sha256 != first.model_sha256:
            raise StatisticsError(f"'{name}' was made from another model than '{names[0]}' "
                                  f"(sha256 {part.model_sha256[:16]}... vs "
                                  f"{first.model_sha256[:16]}...)")
        if part.taps != first.taps:
            raise StatisticsError(f"'{name}' has other taps than '{names[0]}' (different "
                                  "--exclude or tool version)")
        if part.calib_samples != first.calib_samples:
            raise StatisticsError(f"'{name}' splits {part.calib_samples} calibration samples, "
                                  f"'{names[0]}' {first.calib_samples}: not one split")
        for shard in part.shards:
            if shard.count != first.shards[0].count:
                raise StatisticsError(f"'{name}' holds shard {shard}, '{names[0]}' shard "
                                      f"{first.shards[0]}: not one split")
            if shard in seen:
                raise StatisticsError(f"shard {shard} is in both '{seen[shard]}' and "
                                      f"'{name}': it would count twice")
            seen[shard] = name
    taps = {key.tensor: first.statistics[key.tensor] for key in first.taps}
    for part in parts[1:]:
        for key in first.taps:
            taps[key.tensor] = taps[key.tensor].merged(part.statistics[key.tensor])
    samples = sum(part.statistics.samples for part in parts)
    shards = tuple(sorted(seen, key=lambda shard: shard.index))
    return SavedStatistics(Statistics(taps, samples), first.model_sha256, first.taps,
                           first.calib_samples, shards)


def saved_for_model(statistics: SavedStatistics | str | Path, model: onnx.ModelProto,
                    taps: Sequence[Tap]) -> SavedStatistics:
    """Load saved statistics if given by path; StatisticsError unless made from `model` with
    `taps`."""
    saved = (statistics if isinstance(statistics, SavedStatistics)
             else load_statistics(statistics))
    where = "given" if isinstance(statistics, SavedStatistics) else str(statistics)
    saved.check_model(model_fingerprint(model), taps, where)
    return saved
