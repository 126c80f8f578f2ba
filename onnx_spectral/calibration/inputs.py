"""Model inputs and the checks data must pass, and the re-batching `SampleStream`.

A *feed dict* maps model input names to arrays whose axis 0 is the sample axis:
``{name: (n, *sample_shape)}``. Names, dtypes and static dims are checked before any inference
runs; an initializer listed as a graph input (the IR-3 convention) is a weight, never fed.

A model whose inputs share no sample axis (`batching_problem`: a scalar input such as a sample
rate, a recurrent state ``[layers, batch, hidden]`` beside an input ``[batch, time]``) is fed
*runs*: each feed dict is one sample, fed as it is (`graph.executor.Run`), never split or
concatenated.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from onnx_spectral.errors import DataError, OptionsError
from onnx_spectral.graph.executor import Run, batch_samples
from onnx_spectral.graph.executor import batching_problem as declared_batching_problem
from onnx_spectral.graph.shapes import declared_dims

FeedDict = dict[str, np.ndarray]
"""Model input name -> batch array of shape (n, *sample_shape); axis 0 is the sample axis."""

ArrayMeta = tuple[tuple[int, ...], np.dtype]


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
    if not tensor.HasField("shape"):
        raise DataError(
            f"model input '{value.name}' has no declared rank; onnx-spectral needs the rank of "
            "every input (re-export the model with input shapes, dynamic dims allowed)"
        )
    try:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type))
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(
            f"model input '{value.name}' has element type {tensor.elem_type}, which has no "
            "numpy equivalent"
        ) from exc
    return InputSpec(value.name, dtype, declared_dims(value))


def batching_problem(inputs: Sequence[InputSpec]) -> str | None:
    """Why the model's inputs cannot be batched along a common axis 0 (each feed dict is then
    one run), or None when they can (`graph.executor.batching_problem`)."""
    return declared_batching_problem({spec.name: spec.shape for spec in inputs})


def runs_note(inputs: Sequence[InputSpec]) -> str | None:
    """What the report says of a model fed runs (None for one whose data is batched)."""
    problem = batching_problem(inputs)
    return (None if problem is None
            else f"each feed dict is one run of the model, not batched with others: {problem}")


def fixed_batch_size(inputs: Sequence[InputSpec]) -> int | None:
    """The batch size the model requires when every input declares the same static axis 0,
    else None (also for runs, which are never re-batched).

    `SampleStream.take` must then be called with this `batch_size`; the last batch of a finite
    source may still be smaller.
    """
    if batching_problem(inputs) is not None:
        return None
    return next((spec.shape[0] for spec in inputs if spec.shape[0] is not None), None)


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


def _check_array(spec: InputSpec, meta: ArrayMeta, where: str, runs: bool) -> None:
    """Dtype, rank and the static dims (past axis 0 unless the model is fed `runs`)."""
    shape, dtype = meta
    if not _castable(dtype, spec.dtype):
        raise DataError(
            f"{where}: input '{spec.name}' has dtype {dtype}, expected {spec.dtype} (only "
            "float -> float and integer -> integer are cast)"
        )
    if len(shape) != len(spec.shape):
        raise DataError(
            f"{where}: input '{spec.name}' has shape {shape}, expected rank {len(spec.shape)} "
            f"({'one run' if runs else 'samples first'}; model shape {show_shape(spec.shape)})"
        )
    for axis in range(0 if runs else 1, len(shape)):
        if spec.shape[axis] is not None and shape[axis] != spec.shape[axis]:
            raise DataError(
                f"{where}: input '{spec.name}' axis {axis} has size {shape[axis]}, expected "
                f"{spec.shape[axis]} (model shape {show_shape(spec.shape)})"
            )


def check_meta(meta: Mapping[str, ArrayMeta], inputs: Sequence[InputSpec], where: str) -> int:
    """Check names, dtypes, static dims and sample counts; return the number of samples (1 for
    a model fed runs)."""
    _check_names(meta, inputs, where)
    runs = batching_problem(inputs) is not None
    for spec in inputs:
        _check_array(spec, meta[spec.name], where, runs)
    if runs:
        return 1
    counts = {name: shape[0] for name, (shape, _) in meta.items()}
    if len(set(counts.values())) > 1:
        raise DataError(
            f"{where}: inputs hold different numbers of samples {counts}; every input needs "
            "the same count along axis 0"
        )
    return next(iter(counts.values()))


def show_shape(shape: tuple[int | None, ...]) -> str:
    return "(" + ", ".join("?" if size is None else str(size) for size in shape) + ")"


def conform_feed(feed: object, inputs: Sequence[InputSpec], where: str) -> FeedDict:
    """Validate one in-memory feed dict; an array of rank (model rank - 1) is one sample. For a
    model fed runs, the feed dict is one `Run`."""
    if not isinstance(feed, Mapping):
        raise DataError(f"{where}: expected a dict input name -> array, got {type(feed).__name__}")
    if batching_problem(inputs) is not None:
        run = Run({name: np.asarray(value) for name, value in feed.items()})
        check_meta({name: (a.shape, a.dtype) for name, a in run.items()}, inputs, where)
        return run
    ranks = {spec.name: len(spec.shape) for spec in inputs}
    arrays: FeedDict = {}
    for name, value in feed.items():
        array = np.asarray(value)
        arrays[name] = array[np.newaxis] if array.ndim == ranks.get(name, 0) - 1 else array
    check_meta({name: (a.shape, a.dtype) for name, a in arrays.items()}, inputs, where)
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
            flat = np.isfinite(array.reshape(batch_samples(batch), -1)).all(axis=1)
            sample = offset + int(np.argmin(flat))
            raise DataError(f"input '{name}': sample {sample} holds NaN or Inf; calibration "
                            "accepts finite values only")


# ---------------------------------------------------------------------------------------------
# The stream


def sample_count(feed: FeedDict) -> int:
    """Samples in a feed dict: the length of axis 0; 1 for a `Run`."""
    return batch_samples(feed)


class SampleStream:
    """Sequential source of samples; `take` consumes from where the previous take stopped.

    Wraps an iterator of validated chunks (feed dicts of any number of samples, each array in
    a dtype castable to its input's) and re-batches them along axis 0. A model fed runs
    (`batching_problem`) gets each chunk as one batch, a `Run` of one sample.
    """

    def __init__(
        self, chunks: Iterable[FeedDict], inputs: Sequence[InputSpec], known_length: int | None
    ) -> None:
        self._chunks = iter(chunks)
        self._inputs = tuple(inputs)
        self._runs = batching_problem(inputs) is not None
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
            left -= sample_count(batch)
            yield batch

    def peek(self, count: int = 1) -> FeedDict:
        """The next `count` samples (fewer when the source runs out) without consuming them:
        the next `take` still starts with them. Each array has shape (b, *sample_shape); for
        a model fed runs, the next run whatever `count`.

        Raises:
            DataError: the source holds no sample.
        """
        while self._pending_count < count and self._read_chunk():
            pass
        if not self._pending_count:
            raise DataError("the data holds 0 samples; calibration needs at least 1")
        if self._runs:
            return self._cast(self._pending[0])
        pieces, got = [], 0
        for chunk in self._pending:
            if got >= count:
                break
            pieces.append({name: a[:count - got] for name, a in chunk.items()})
            got += sample_count(pieces[-1])
        return {spec.name: _cast(spec, np.concatenate([piece[spec.name] for piece in pieces]))
                for spec in self._inputs}

    def _next_batch(self, size: int) -> FeedDict | None:
        while self._pending_count < size and self._read_chunk():
            pass
        size = min(size, self._pending_count)
        if size == 0:
            return None
        if self._runs:
            self._pending_count -= 1
            run = self._cast(self._pending.popleft())
            _check_finite(run, self._emitted)
            self._emitted += 1
            return run
        pieces: list[FeedDict] = []
        got = 0
        while got < size:
            chunk = self._pending.popleft()
            need = size - got
            if sample_count(chunk) > need:
                self._pending.appendleft({name: a[need:] for name, a in chunk.items()})
                chunk = {name: a[:need] for name, a in chunk.items()}
            pieces.append(chunk)
            got += sample_count(chunk)
        self._pending_count -= size
        batch = {
            spec.name: _cast(spec, np.concatenate([piece[spec.name] for piece in pieces]))
            for spec in self._inputs
        }
        _check_finite(batch, self._emitted)
        self._emitted += size
        return batch

    def _cast(self, run: FeedDict) -> Run:
        return Run({spec.name: _cast(spec, np.asarray(run[spec.name])) for spec in self._inputs})

    def _read_chunk(self) -> bool:
        chunk = next(self._chunks, None)
        if chunk is None:
            return False
        if self._runs and not isinstance(chunk, Run):  # a file's arrays: one run
            chunk = Run(chunk)
        if sample_count(chunk):
            self._pending.append(chunk)
            self._pending_count += sample_count(chunk)
        return True

