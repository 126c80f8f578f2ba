"""Calibration and verification data: every source becomes one re-batching `SampleStream`.

Sources: `.npz`/`.npy` files, folders of them, image folders (with `Preprocess`), synthetic
``"random"`` data, ONNX Runtime's `CalibrationDataReader` protocol (``get_next()``), iterables
of feed dicts and in-memory dicts. A *feed dict* maps model input names to arrays whose axis 0
is the sample axis: ``{name: (n, *sample_shape)}``.

Names, dtypes and static dims are checked before any inference runs: at open time for files,
dicts and lists, on the first feed for readers and generators. Files are read one at a time.
"""

from __future__ import annotations

import os
import warnings
import zipfile
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import IO, Any, Protocol, runtime_checkable

import numpy as np
import onnx
from PIL import Image

from onnx_spectral.errors import DataError, OptionsError

FeedDict = dict[str, np.ndarray]
"""Model input name -> batch array of shape (n, *sample_shape); axis 0 is the sample axis."""

ArrayMeta = tuple[tuple[int, ...], np.dtype]
"""(shape, dtype) of an array, read without loading its values."""

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


@dataclass(frozen=True)
class InputSpec:
    """One graph input that data must feed.

    Attributes:
        name: graph input name.
        dtype: numpy dtype of the ONNX tensor type.
        shape: declared shape, None for a dynamic or symbolic dim; axis 0 is the sample axis.
    """

    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...]


def model_input_specs(model: onnx.ModelProto) -> tuple[InputSpec, ...]:
    """The graph inputs that are not initializers, in graph order."""
    initializers = {tensor.name for tensor in model.graph.initializer}
    graph_inputs = [value for value in model.graph.input if value.name not in initializers]
    return tuple(_input_spec(value) for value in graph_inputs)


def _input_spec(value: onnx.ValueInfoProto) -> InputSpec:
    if not value.type.HasField("tensor_type"):
        raise DataError(f"model input '{value.name}' is not a tensor; only tensors can be fed")
    tensor = value.type.tensor_type
    if not tensor.HasField("shape") or not tensor.shape.dim:
        raise DataError(
            f"model input '{value.name}' has no declared rank or rank 0; inputs must have rank "
            ">= 1 with axis 0 as the sample axis"
        )
    try:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type))
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(
            f"model input '{value.name}' has element type {tensor.elem_type}, which has no "
            "numpy equivalent"
        ) from exc
    shape = tuple(dim.dim_value if dim.HasField("dim_value") and dim.dim_value >= 0 else None
                  for dim in tensor.shape.dim)
    return InputSpec(value.name, dtype, shape)


def fixed_batch_size(inputs: Sequence[InputSpec]) -> int | None:
    """The batch size the model requires when an input declares a static axis 0, else None.

    `SampleStream.take` must then be called with this `batch_size`; the last batch of a finite
    source may still be smaller.
    """
    sizes = {spec.name: spec.shape[0] for spec in inputs if spec.shape[0] is not None}
    if len(set(sizes.values())) > 1:
        raise DataError(f"model inputs declare different static batch sizes {sizes}")
    return next(iter(sizes.values()), None)


def split_counts(
    known_length: int | None, calib_samples: int, verify_samples: int
) -> tuple[int, int]:
    """How many samples go to calibration, then to verification.

    Unknown length: the requested counts. Known length L: the requested counts when L covers
    both; else verification gets min(verify_samples, L // 5) and calibration the rest, up to
    calib_samples.
    """
    if calib_samples < 1 or verify_samples < 0:
        raise OptionsError(
            f"calibration samples must be >= 1 and verification samples >= 0, got "
            f"{calib_samples} and {verify_samples}"
        )
    if known_length is None or known_length >= calib_samples + verify_samples:
        return calib_samples, verify_samples
    verify = min(verify_samples, known_length // 5)
    calib = min(calib_samples, known_length - verify)
    if calib == 0:
        raise DataError(f"the data holds {known_length} samples; calibration needs at least 1")
    return calib, verify


# ---------------------------------------------------------------------------------------------
# Validation


def _check_names(given: Iterable[str], inputs: Sequence[InputSpec], where: str) -> None:
    expected = [spec.name for spec in inputs]
    names = list(given)
    missing = [name for name in expected if name not in names]
    unknown = [name for name in names if name not in expected]
    if missing or unknown:
        faults = ([f"missing input(s) {missing}"] if missing else []) + (
            [f"unknown name(s) {unknown}"] if unknown else []
        )
        raise DataError(
            f"{where}: {'; '.join(faults)}; the model's inputs are {expected}, the data gives "
            f"{names}"
        )


def _castable(given: np.dtype, expected: np.dtype) -> bool:
    """Equal dtypes, or a cast within a kind: float -> float, integer -> integer."""
    return (
        given == expected
        or (given.kind == expected.kind == "f")
        or (given.kind in "iu" and expected.kind in "iu")
    )


def _check_array(spec: InputSpec, meta: ArrayMeta, where: str) -> None:
    shape, dtype = meta
    if not _castable(dtype, spec.dtype):
        raise DataError(
            f"{where}: input '{spec.name}' has dtype {dtype}, expected {spec.dtype} (only "
            "float -> float and integer -> integer are cast)"
        )
    if len(shape) != len(spec.shape):
        raise DataError(
            f"{where}: input '{spec.name}' has shape {shape}, expected rank {len(spec.shape)} "
            f"(samples first; model shape {_show(spec.shape)})"
        )
    for axis in range(1, len(shape)):
        if spec.shape[axis] is not None and shape[axis] != spec.shape[axis]:
            raise DataError(
                f"{where}: input '{spec.name}' axis {axis} has size {shape[axis]}, expected "
                f"{spec.shape[axis]} (model shape {_show(spec.shape)})"
            )


def _check_meta(meta: Mapping[str, ArrayMeta], inputs: Sequence[InputSpec], where: str) -> int:
    """Check names, dtypes, static dims and sample counts; return the number of samples."""
    _check_names(meta, inputs, where)
    for spec in inputs:
        _check_array(spec, meta[spec.name], where)
    counts = {name: shape[0] for name, (shape, _) in meta.items()}
    if len(set(counts.values())) > 1:
        raise DataError(
            f"{where}: inputs hold different numbers of samples {counts}; every input needs "
            "the same count along axis 0"
        )
    return next(iter(counts.values()))


def _show(shape: tuple[int | None, ...]) -> str:
    return "(" + ", ".join("?" if size is None else str(size) for size in shape) + ")"


def _conform_feed(feed: object, inputs: Sequence[InputSpec], where: str) -> FeedDict:
    """Validate one in-memory feed dict; an array of rank (model rank - 1) is one sample."""
    if not isinstance(feed, Mapping):
        raise DataError(f"{where}: expected a dict input name -> array, got {type(feed).__name__}")
    ranks = {spec.name: len(spec.shape) for spec in inputs}
    arrays: FeedDict = {}
    for name, value in feed.items():
        array = np.asarray(value)
        arrays[name] = array[np.newaxis] if array.ndim == ranks.get(name, 0) - 1 else array
    _check_meta({name: (a.shape, a.dtype) for name, a in arrays.items()}, inputs, where)
    return arrays


def _cast(spec: InputSpec, array: np.ndarray) -> np.ndarray:
    """`array` as `spec.dtype`; integers must fit the model's integer type."""
    if array.dtype == spec.dtype:
        return array
    if spec.dtype.kind in "iu" and array.size:
        info = np.iinfo(spec.dtype)
        low, high = array.min(), array.max()
        if low < info.min or high > info.max:
            raise DataError(
                f"input '{spec.name}': values in [{low}, {high}] do not fit the model's "
                f"{spec.dtype} (range [{info.min}, {info.max}])"
            )
    return array.astype(spec.dtype)


def _check_finite(batch: FeedDict, offset: int) -> None:
    """Raise DataError naming the input and sample when a float array holds NaN or Inf."""
    for name, array in batch.items():
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            flat = np.isfinite(array.reshape(len(array), -1)).all(axis=1)
            sample = offset + int(np.argmin(flat))
            raise DataError(f"input '{name}': sample {sample} holds NaN or Inf; calibration "
                            "accepts finite values only")


# ---------------------------------------------------------------------------------------------
# The stream


def _count(feed: FeedDict) -> int:
    return len(next(iter(feed.values())))


class SampleStream:
    """Sequential source of samples; `take` consumes from where the previous take stopped.

    Wraps an iterator of validated chunks (feed dicts of any number of samples, each array in
    a dtype castable to its input's) and re-batches them along axis 0.
    """

    def __init__(
        self, chunks: Iterable[FeedDict], inputs: Sequence[InputSpec], known_length: int | None
    ) -> None:
        self._chunks = iter(chunks)
        self._inputs = tuple(inputs)
        self._known_length = known_length
        self._pending: deque[FeedDict] = deque()  # read, not yet emitted
        self._pending_count = 0
        self._emitted = 0  # samples returned so far, for error messages

    @property
    def known_length(self) -> int | None:
        """Samples in the whole source (from its start); None when unknown or endless."""
        return self._known_length

    def take(self, count: int, batch_size: int) -> Iterator[FeedDict]:
        """Yield the next `count` samples in batches of `batch_size`, the last maybe smaller.

        Each batch maps every model input name to an array of shape (b, *sample_shape) in the
        input's dtype, 1 <= b <= batch_size. Fewer than `count` samples come when the source
        runs out. Arguments are checked at the call; data is read as batches are pulled.
        """
        if count < 0 or batch_size < 1:
            raise OptionsError(
                f"take needs count >= 0 and batch_size >= 1, got {count} and {batch_size}"
            )
        return self._batches(count, batch_size)

    def _batches(self, count: int, batch_size: int) -> Iterator[FeedDict]:
        left = count
        while left > 0:
            batch = self._next_batch(min(batch_size, left))
            if batch is None:
                return
            left -= _count(batch)
            yield batch

    def _next_batch(self, size: int) -> FeedDict | None:
        while self._pending_count < size and self._read_chunk():
            pass
        size = min(size, self._pending_count)
        if size == 0:
            return None
        pieces: list[FeedDict] = []
        got = 0
        while got < size:
            chunk = self._pending.popleft()
            need = size - got
            if _count(chunk) > need:
                self._pending.appendleft({name: a[need:] for name, a in chunk.items()})
                chunk = {name: a[:need] for name, a in chunk.items()}
            pieces.append(chunk)
            got += _count(chunk)
        self._pending_count -= size
        batch = {
            spec.name: _cast(spec, np.concatenate([piece[spec.name] for piece in pieces]))
            for spec in self._inputs
        }
        _check_finite(batch, self._emitted)
        self._emitted += size
        return batch

    def _read_chunk(self) -> bool:
        chunk = next(self._chunks, None)
        if chunk is None:
            return False
        if _count(chunk):
            self._pending.append(chunk)
            self._pending_count += _count(chunk)
        return True


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
        chunk = _conform_feed(source, inputs, "the data dict")
        return SampleStream([chunk], inputs, _count(chunk))
    if isinstance(source, FeedReader):
        return SampleStream(_checked(iter(source.get_next, None), inputs), inputs, None)
    if isinstance(source, Sequence):
        chunks = [_conform_feed(f, inputs, f"feed dict {i}") for i, f in enumerate(source)]
        return SampleStream(chunks, inputs, sum(map(_count, chunks)))
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
        yield _conform_feed(feed, inputs, f"feed dict {index}")


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
        return _open_images(images, inputs, preprocess)
    if not arrays:
        raise DataError(
            f"folder '{folder}' holds no .npy/.npz or image files; accepted: {ACCEPTED_SOURCES}"
        )
    _refuse_preprocess(preprocess, f"folder '{folder}' of array files")
    return _open_array_files(arrays, inputs)


def _open_array_files(paths: Sequence[Path], inputs: Sequence[InputSpec]) -> SampleStream:
    """Check every file's headers now; load one file at a time as the stream is read."""
    total = sum(_check_meta(_file_meta(path, inputs), inputs, f"'{path}'") for path in paths)
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
    shapes = [_static_sample_shape(spec) for spec in inputs]
    warnings.warn(RANDOM_WARNING, UserWarning, stacklevel=3)
    return SampleStream(_random_chunks(inputs, shapes, seed), inputs, None)


def _static_sample_shape(spec: InputSpec) -> tuple[int, ...]:
    for axis, size in enumerate(spec.shape[1:], start=1):
        if size is None:
            raise DataError(
                f"random data: input '{spec.name}' axis {axis} is dynamic "
                f"(model shape {_show(spec.shape)}), so no size can be invented; give real data"
            )
    return tuple(size for size in spec.shape[1:] if size is not None)


def _random_chunks(
    inputs: Sequence[InputSpec], shapes: Sequence[tuple[int, ...]], seed: int
) -> Iterator[FeedDict]:
    """Endless chunks: float inputs ~ N(0, 1), other inputs zeros."""
    rng = np.random.default_rng(seed)
    while True:
        chunk: FeedDict = {}
        for spec, shape in zip(inputs, shapes, strict=True):
            full = (_RANDOM_CHUNK, *shape)
            if spec.dtype.kind == "f":
                chunk[spec.name] = rng.standard_normal(full).astype(spec.dtype)
            else:
                chunk[spec.name] = np.zeros(full, spec.dtype)
        yield chunk


# ---------------------------------------------------------------------------------------------
# Images

_LAYOUTS = ("nchw", "nhwc")
_COLORS = ("rgb", "bgr", "gray")
_PREPROCESS_FORMS = {
    "resize": "a positive integer (shorter side in pixels)",
    "crop": "H, HxW or H:W (positive integers)",
    "mean": "numbers separated by ':' (one, or one per channel)",
    "std": "non-zero numbers separated by ':' (one, or one per channel)",
    "scale": "a positive number such as 0.0039 or 1/255",
    "layout": " or ".join(_LAYOUTS),
    "color": " or ".join(_COLORS),
}


@dataclass(frozen=True)
class Preprocess:
    """How an image file becomes one sample of a rank-4 image input.

    Steps: decode and convert to `color`; resize (bilinear) so the shorter side is `resize`
    pixels, or, when `resize` is None, to the smallest size that covers `crop`; center-crop to
    `crop` (offsets floor((size - crop) / 2)); `value = (pixel * scale - mean[c]) / std[c]`;
    lay out as (C, H, W) for "nchw" or (H, W, C) for "nhwc"; cast to the input's dtype.

    Attributes:
        resize: target length of the shorter side, or None.
        crop: (H, W) of the center crop; None: the model input's H, W.
        mean: per-channel offsets (one value or one per channel); (): 0.
        std: per-channel divisors (one value or one per channel); (): 1.
        scale: pixel multiplier; None: 1/255 for a float input, 1 for an integer input.
        layout: "nchw" or "nhwc"; None: "nhwc" when the model's axis 3 (and not axis 1) has
            1 or 3 channels, else "nchw".
        color: "rgb", "bgr" or "gray"; None: "gray" for a 1-channel input, else "rgb".
    """

    resize: int | None = None
    crop: tuple[int, int] | None = None
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    scale: float | None = None
    layout: str | None = None
    color: str | None = None

    def __post_init__(self) -> None:
        faults = {
            "resize": self.resize is not None and self.resize < 1,
            "crop": self.crop is not None and (len(self.crop) != 2 or min(self.crop) < 1),
            "mean": not all(np.isfinite(self.mean)),
            "std": not all(np.isfinite(self.std)) or 0 in self.std,
            "scale": self.scale is not None and not (0 < self.scale < np.inf),
            "layout": self.layout not in (None, *_LAYOUTS),
            "color": self.color not in (None, *_COLORS),
        }
        for key, bad in faults.items():
            if bad:
                raise OptionsError(
                    f"preprocess {key}={getattr(self, key)!r} is invalid; expected "
                    f"{_PREPROCESS_FORMS[key]}"
                )

    @classmethod
    def parse(cls, text: str) -> Preprocess:
        """Read the CLI form, e.g. "resize=256,crop=224,mean=0.485:0.456:0.406,layout=nchw".

        Keys: resize, crop, mean, std, scale, layout, color; unnamed keys keep their default.
        """
        values: dict[str, Any] = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            key, sep, raw = (part.strip() for part in item.partition("="))
            if key not in _PREPROCESS_FORMS:
                raise OptionsError(
                    f"unknown preprocess key '{key}'; accepted keys: {', '.join(_PREPROCESS_FORMS)}"
                )
            if not sep:
                raise OptionsError(f"preprocess item '{item}' is not key=value")
            if key in values:
                raise OptionsError(f"preprocess key '{key}' is given twice")
            values[key] = _parse_value(key, raw)
        return cls(**values)


def _parse_value(key: str, raw: str) -> Any:
    try:
        if key == "resize":
            return int(raw)
        if key == "crop":
            sizes = tuple(int(size) for size in raw.lower().replace("x", ":").split(":"))
            return sizes * 2 if len(sizes) == 1 else sizes
        if key in ("mean", "std"):
            return tuple(float(Fraction(value)) for value in raw.split(":"))
        if key == "scale":
            return float(Fraction(raw))
        return raw.lower()
    except (ValueError, ZeroDivisionError) as exc:
        raise OptionsError(
            f"preprocess {key}='{raw}' cannot be read; expected {_PREPROCESS_FORMS[key]}"
        ) from exc


@dataclass(frozen=True)
class _ImagePlan:
    """A `Preprocess` resolved against one model input: every choice concrete."""

    resize: int | None
    crop: tuple[int, int]
    color: str
    layout: str
    scale: float
    mean: np.ndarray  # (C,)
    std: np.ndarray  # (C,)
    dtype: np.dtype


def _plan_images(spec: InputSpec, preprocess: Preprocess) -> _ImagePlan:
    where = f"image input '{spec.name}' (model shape {_show(spec.shape)})"
    if len(spec.shape) != 4 or spec.dtype.kind not in "fiu":
        raise DataError(f"{where}: image folders feed rank-4 numeric inputs (NCHW or NHWC) only")
    layout = preprocess.layout or _guess_layout(spec.shape)
    axes = (1, 2, 3) if layout == "nchw" else (3, 1, 2)
    channels, height, width = (spec.shape[axis] for axis in axes)
    color = preprocess.color or ("gray" if channels == 1 else "rgb")
    if channels is not None and channels != _channels(color):
        raise DataError(
            f"{where}: {channels} channels, but color '{color}' gives {_channels(color)}"
        )
    crop_height, crop_width = preprocess.crop or (height, width)
    if crop_height is None or crop_width is None:
        raise DataError(f"{where}: H and W are dynamic; give preprocess crop=HxW")
    if (height or crop_height, width or crop_width) != (crop_height, crop_width):
        raise DataError(f"{where}: crop ({crop_height}, {crop_width}) differs from the model's")
    floats = spec.dtype.kind == "f"
    if preprocess.scale is not None:
        scale = preprocess.scale
    else:
        scale = 1 / 255 if floats else 1.0
    if not floats and (scale, preprocess.mean, preprocess.std) != (1.0, (), ()):
        raise OptionsError(f"{where}: an integer input takes raw pixels; give no scale/mean/std")
    return _ImagePlan(
        resize=preprocess.resize,
        crop=(crop_height, crop_width),
        color=color,
        layout=layout,
        scale=scale,
        mean=_per_channel(preprocess.mean, 0.0, color, "mean"),
        std=_per_channel(preprocess.std, 1.0, color, "std"),
        dtype=spec.dtype,
    )


def _guess_layout(shape: tuple[int | None, ...]) -> str:
    return "nhwc" if shape[1] not in (1, 3) and shape[3] in (1, 3) else "nchw"


def _channels(color: str) -> int:
    return 1 if color == "gray" else 3


def _per_channel(values: tuple[float, ...], default: float, color: str, key: str) -> np.ndarray:
    channels = _channels(color)
    if len(values) not in (0, 1, channels):
        raise OptionsError(
            f"preprocess {key} has {len(values)} values; color '{color}' needs 1 or {channels}"
        )
    return np.broadcast_to(np.asarray(values or (default,), np.float64), (channels,))


def _open_images(
    paths: Sequence[Path], inputs: Sequence[InputSpec], preprocess: Preprocess | None
) -> SampleStream:
    if len(inputs) != 1:
        raise DataError(
            f"image folder '{paths[0].parent}' can feed a single-input model only; this model's "
            f"inputs are {[spec.name for spec in inputs]}"
        )
    spec = inputs[0]
    plan = _plan_images(spec, preprocess or Preprocess())
    chunks = ({spec.name: _load_image(path, plan)[np.newaxis]} for path in paths)
    return SampleStream(chunks, inputs, len(paths))


def _load_image(path: Path, plan: _ImagePlan) -> np.ndarray:
    """One image as (C, H, W) or (H, W, C) per `plan.layout`, in `plan.dtype`."""
    try:
        with Image.open(path) as image:
            converted = image.convert("L" if plan.color == "gray" else "RGB")
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read image '{path}': {exc}") from exc
    cropped = _center_crop(_resize(converted, plan), plan.crop, path)
    pixels = np.asarray(cropped, dtype=np.float64).reshape(*plan.crop, -1)  # (H, W, C)
    if plan.color == "bgr":
        pixels = pixels[:, :, ::-1]
    values = (pixels * plan.scale - plan.mean) / plan.std
    return (values.transpose(2, 0, 1) if plan.layout == "nchw" else values).astype(plan.dtype)


def _resize(image: Image.Image, plan: _ImagePlan) -> Image.Image:
    width, height = image.size
    crop_height, crop_width = plan.crop
    if plan.resize is None:
        factor = max(crop_height / height, crop_width / width)
    else:
        factor = plan.resize / min(height, width)
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    return image if size == image.size else image.resize(size, Image.Resampling.BILINEAR)


def _center_crop(image: Image.Image, crop: tuple[int, int], path: Path) -> Image.Image:
    width, height = image.size
    crop_height, crop_width = crop
    if height < crop_height or width < crop_width:
        raise DataError(
            f"image '{path}' is (H, W) = ({height}, {width}) after resizing, smaller than the "
            f"crop {crop}; raise preprocess resize"
        )
    top, left = (height - crop_height) // 2, (width - crop_width) // 2
    return image.crop((left, top, left + crop_width, top + crop_height))
