"""Calibration and verification data: every source becomes one re-batching `SampleStream`.

Sources: `.npz`/`.npy` files, folders of them, image folders (with `Preprocess`), synthetic
``"random"`` data, ONNX Runtime's `CalibrationDataReader` protocol (``get_next()``), iterables
of feed dicts and in-memory dicts. A *feed dict* maps model input names to arrays whose axis 0
is the sample axis: ``{name: (n, *sample_shape)}``.

Names, dtypes and static dims are checked before any inference runs: at open time for files,
dicts and lists, on the first feed for readers and generators. Files are read one at a time.
Input specs, validation and the stream are in `calibration.inputs`, images in
`calibration.images`; this module re-exports the names callers use.
"""

from __future__ import annotations

import os
import warnings
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Protocol, runtime_checkable

import numpy as np

from onnx_spectral.calibration.images import Preprocess, open_images
from onnx_spectral.calibration.inputs import (
    ArrayMeta,
    FeedDict,
    InputSpec,
    SampleStream,
    batching_problem,
    check_meta,
    conform_feed,
    fixed_batch_size,
    model_input_specs,
    runs_note,
    sample_count,
    show_shape,
    split_counts,
)
from onnx_spectral.errors import DataError, OptionsError
from onnx_spectral.graph.executor import Run

__all__ = [
    "ACCEPTED_SOURCES", "DataSource", "FeedDict", "FeedReader", "InputSpec", "Preprocess",
    "RANDOM_WARNING", "SampleStream", "batching_problem", "fixed_batch_size", "model_input_specs",
    "open_calibration", "runs_note", "split_counts",
]

ARRAY_SUFFIXES = (".npy", ".npz")
IMAGE_SUFFIXES = (".bmp", ".jpeg", ".jpg", ".png", ".webp")
ACCEPTED_SOURCES = (
    "a .npz file (one array per model input), a .npy file (single-input models), a folder of "
    ".npy/.npz batches, a folder of images (" + "/".join(IMAGE_SUFFIXES) + "), 'random', an "
    "object with get_next() (onnxruntime CalibrationDataReader), an iterable of feed dicts, or "
    "a dict input name -> array"
)
RANDOM_WARNING = (
    "CALIBRATING ON RANDOM DATA: statistics come from synthetic N(0, 1) inputs, not from the "
    "data the model sees. Channel selection and every quality figure (errors, agreement, "
    "accuracy) computed from them are MEANINGLESS; give real calibration data."
)
_RANDOM_CHUNK = 64  # samples generated at a time; the sample sequence does not depend on it


@runtime_checkable
class FeedReader(Protocol):
    """ONNX Runtime's `CalibrationDataReader` protocol: feed dicts, then None when done."""

    def get_next(self) -> Mapping[str, Any] | None: ...


DataSource = str | os.PathLike[str] | Mapping[str, Any] | FeedReader | Iterable[Mapping[str, Any]]



def open_calibration(
    source: DataSource,
    inputs: Sequence[InputSpec],
    *,
    preprocess: Preprocess | None = None,
    seed: int = 0,
) -> SampleStream:
    """Open `source` as a stream of samples for the model inputs `inputs`.

    Args:
        source: see `ACCEPTED_SOURCES`; the string "random" gives endless synthetic data.
        inputs: the model's inputs, from `model_input_specs`.
        preprocess: how images become samples (image folders only; None: from the model).
        seed: seed of "random" data.

    Raises:
        DataError: the data does not fit the model, or a path is missing or unreadable.
        OptionsError: `preprocess` was given for a source that is not an image folder.
    """
    if not inputs:
        raise DataError("the model has no inputs to feed")
    if isinstance(source, (str, os.PathLike)):
        if source == "random":
            _refuse_preprocess(preprocess, "'random'")
            return _open_random(inputs, seed)
        return _open_path(Path(source), inputs, preprocess)
    _refuse_preprocess(preprocess, f"a {type(source).__name__}")
    if isinstance(source, Mapping):
        chunk = conform_feed(source, inputs, "the data dict")
        return SampleStream([chunk], inputs, sample_count(chunk))
    if isinstance(source, FeedReader):
        return SampleStream(_checked(iter(source.get_next, None), inputs), inputs, None)
    if isinstance(source, Sequence):
        chunks = [conform_feed(f, inputs, f"feed dict {i}") for i, f in enumerate(source)]
        return SampleStream(chunks, inputs, sum(map(sample_count, chunks)))
    if isinstance(source, Iterable):
        return SampleStream(_checked(source, inputs), inputs, None)
    raise DataError(
        f"cannot read data from a {type(source).__name__}; accepted: {ACCEPTED_SOURCES}"
    )


def _refuse_preprocess(preprocess: Preprocess | None, source: str) -> None:
    if preprocess is not None:
        raise OptionsError(f"preprocessing applies to image folders only, the source is {source}")


def _checked(feeds: Iterable[object], inputs: Sequence[InputSpec]) -> Iterator[FeedDict]:
    for index, feed in enumerate(feeds):
        yield conform_feed(feed, inputs, f"feed dict {index}")


# ---------------------------------------------------------------------------------------------
# Files and folders


def _open_path(
    path: Path, inputs: Sequence[InputSpec], preprocess: Preprocess | None
) -> SampleStream:
    if path.is_dir():
        return _open_folder(path, inputs, preprocess)
    if not path.is_file():
        raise DataError(f"'{path}' does not exist; accepted: {ACCEPTED_SOURCES}")
    if path.suffix.lower() not in ARRAY_SUFFIXES:
        raise DataError(f"'{path}' is not a .npz or .npy file; accepted: {ACCEPTED_SOURCES}")
    _refuse_preprocess(preprocess, f"'{path}'")
    return _open_array_files([path], inputs)


def _open_folder(
    folder: Path, inputs: Sequence[InputSpec], preprocess: Preprocess | None
) -> SampleStream:
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    arrays = [p for p in files if p.suffix.lower() in ARRAY_SUFFIXES]
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    if arrays and images:
        raise DataError(f"folder '{folder}' holds both array files and images; give one kind")
    if images:
        return open_images(images, inputs, preprocess)
    if not arrays:
        raise DataError(
            f"folder '{folder}' holds no .npy/.npz or image files; accepted: {ACCEPTED_SOURCES}"
        )
    _refuse_preprocess(preprocess, f"folder '{folder}' of array files")
    return _open_array_files(arrays, inputs)


def _open_array_files(paths: Sequence[Path], inputs: Sequence[InputSpec]) -> SampleStream:
    """Check every file's headers now; load one file at a time as the stream is read."""
    total = sum(check_meta(_file_meta(path, inputs), inputs, f"'{path}'") for path in paths)
    return SampleStream((_load_file(path, inputs) for path in paths), inputs, total)


def _file_meta(path: Path, inputs: Sequence[InputSpec]) -> dict[str, ArrayMeta]:
    try:
        if path.suffix.lower() == ".npz":
            with zipfile.ZipFile(path) as archive:
                return {
                    member[: -len(".npy")]: _npy_meta(archive.open(member))
                    for member in archive.namelist()
                    if member.endswith(".npy")
                }
        _single_input(path, inputs)
        with path.open("rb") as file:
            return {inputs[0].name: _npy_meta(file)}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"cannot read '{path}' as {path.suffix.lower()}: {exc}") from exc


def _npy_meta(file: IO[bytes]) -> ArrayMeta:
    version = np.lib.format.read_magic(file)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(file)
    else:
        shape, _, dtype = np.lib.format.read_array_header_2_0(file)
    return shape, dtype


def _single_input(path: Path, inputs: Sequence[InputSpec]) -> None:
    if len(inputs) != 1:
        raise DataError(
            f"'{path}' is a .npy file, which can feed a single-input model only; this model's "
            f"inputs are {[spec.name for spec in inputs]}: give .npz files, one array per input"
        )


def _load_file(path: Path, inputs: Sequence[InputSpec]) -> FeedDict:
    """One file's arrays: a .npy memory-mapped, a .npz loaded."""
    try:
        if path.suffix.lower() == ".npy":
            return {inputs[0].name: np.load(path, mmap_mode="r")}
        with np.load(path) as archive:
            return {spec.name: archive[spec.name] for spec in inputs}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"cannot read '{path}': {exc}") from exc


# ---------------------------------------------------------------------------------------------
# Synthetic data


def _open_random(inputs: Sequence[InputSpec], seed: int) -> SampleStream:
    runs = batching_problem(inputs) is not None
    shapes = [_static_shape(spec, 0 if runs else 1) for spec in inputs]
    warnings.warn(RANDOM_WARNING, UserWarning, stacklevel=3)
    return SampleStream(_random_chunks(inputs, shapes, seed, runs), inputs, None)


def _static_shape(spec: InputSpec, first: int) -> tuple[int, ...]:
    """The input's dims from axis `first` on (1: a sample's; 0: a run's), all static."""
    for axis, size in enumerate(spec.shape[first:], start=first):
        if size is None:
            raise DataError(
                f"random data: input '{spec.name}' axis {axis} is dynamic (model shape "
                f"{show_shape(spec.shape)}), so no size can be invented; give real data"
            )
    return tuple(size for size in spec.shape[first:] if size is not None)


def _random_chunks(
    inputs: Sequence[InputSpec], shapes: Sequence[tuple[int, ...]], seed: int, runs: bool
) -> Iterator[FeedDict]:
    """Endless chunks of `_RANDOM_CHUNK` samples (one run each when `runs`): float inputs
    ~ N(0, 1), other inputs zeros."""
    rng = np.random.default_rng(seed)
    while True:
        chunk: FeedDict = Run() if runs else {}
        for spec, shape in zip(inputs, shapes, strict=True):
            full = shape if runs else (_RANDOM_CHUNK, *shape)
            if spec.dtype.kind == "f":
                chunk[spec.name] = rng.standard_normal(full).astype(spec.dtype)
            else:
                chunk[spec.name] = np.zeros(full, spec.dtype)
        yield chunk
