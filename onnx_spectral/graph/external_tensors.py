"""Models past protobuf's 2 GiB limit on one serialized message.

Such a model lives in memory as one ModelProto, but it cannot be serialized, so ONNX shape
inference, the checker and ONNX Runtime cannot take it as bytes. They get a *skeleton* instead:
the same model whose large tensors (over STUB_BYTES) are references to an external data file.
For shape inference the file need not exist; for the checker it is a sparse file of the right
size (nothing is written); for ONNX Runtime the tensor bytes are written to a temporary folder.
Models under LARGE_BYTES take the ordinary in-memory paths.

A model file with external data whose tensors exceed LARGE_BYTES is loaded *lazily* (`load`):
its top-level initializers stay references to the data file (their location made absolute, so
copies of the model still find it), and their values are memory-mapped on each access
(`to_array`, `constants`), never held. Sessions read that file through a hard link (or a copy
on another file system) in their temporary folder, and `save_with_external_data` streams it
into the output's data file, so the weights are never all in memory at once.
"""

from __future__ import annotations

import atexit
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, MutableMapping
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, external_data_helper, helper, numpy_helper

LARGE_BYTES = 2**31 - 2**26
"""Tensor bytes above which a model is handled through a skeleton (and saved with external
data): protobuf's 2 GiB limit, with room for the graph itself."""
STUB_BYTES = 1 << 20
"""Tensors larger than this become external references in a skeleton."""
INLINE_BYTES = 1 << 16
"""A lazily loaded model's initializers up to this size are read at load (shape constants
that shape inference with data propagation must see), larger ones stay references."""
_DATA_FILE = "tensors.bin"
_ALIGN = 4096


_CHUNK = 1 << 24
_MAPPABLE = frozenset({
    TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.INT8,
    TensorProto.UINT8, TensorProto.INT16, TensorProto.UINT16, TensorProto.INT32,
    TensorProto.UINT32, TensorProto.INT64, TensorProto.UINT64, TensorProto.BOOL})
"""Data types whose raw bytes are the numpy array's bytes (memory-mappable as they are)."""


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the model's initializers' data (external tensors: their data file extent):
    for raw data, elements times item size from the header, which needs no pass over the data;
    otherwise (typed fields, strings, sub-byte types) their serialized size."""
    return sum(_data_bytes(tensor) for tensor in model.graph.initializer)


def _data_bytes(tensor: TensorProto) -> int:
    if external_data_helper.uses_external_data(tensor):
        return _extent(tensor)[2]
    if tensor.data_type not in _MAPPABLE or not tensor.HasField("raw_data"):
        return tensor.ByteSize()
    itemsize = helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return math.prod(tensor.dims) * itemsize


def is_large(model: onnx.ModelProto) -> bool:
    """Whether the model needs the skeleton paths: past 2 GiB, or loaded lazily."""
    return tensor_bytes(model) > LARGE_BYTES or any(is_lazy(t) for t in model.graph.initializer)


def is_lazy(tensor: TensorProto) -> bool:
    """Whether `tensor` is a reference to its model's data file left by `load` (absolute)."""
    return (tensor.data_location == TensorProto.EXTERNAL
            and os.path.isabs(external_data_helper.ExternalDataInfo(tensor).location))


def _extent(tensor: TensorProto) -> tuple[str, int, int]:
    """(location, offset, length) of an external tensor's bytes."""
    info = external_data_helper.ExternalDataInfo(tensor)
    length = info.length
    if length is None:
        count = int(np.prod(tensor.dims, dtype=np.int64))
        length = count * helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return info.location, info.offset or 0, int(length)


def load(path: Path) -> onnx.ModelProto:
    """`onnx.load(path)`, except that a model whose external tensors exceed LARGE_BYTES keeps
    its top-level initializers over INLINE_BYTES as (absolute) references to their files (see
    the module doc); smaller ones (shape constants that shape inference must read) are loaded."""
    model = onnx.load(str(path), load_external_data=False)
    if tensor_bytes(model) <= LARGE_BYTES:  # the ordinary path: exactly onnx.load
        external_data_helper.load_external_data_for_model(model, os.path.dirname(str(path)))
        return model
    folder = Path(path).resolve().parent
    for tensor in model.graph.initializer:
        if external_data_helper.uses_external_data(tensor):
            name = _extent(tensor)[0]
            source = (folder / name).resolve()
            if folder not in source.parents or not source.is_file():
                raise ValueError(f"tensor '{tensor.name}': external data file '{name}' is not "
                                 f"a file in '{folder}'")
            if _extent(tensor)[2] <= INLINE_BYTES:
                external_data_helper.load_external_data_for_tensor(tensor, str(folder))
                tensor.data_location = TensorProto.DEFAULT
                del tensor.external_data[:]
            else:
                _set_location(tensor, str(source))
    for tensor in external_data_helper._get_all_tensors(model):  # attribute, subgraph tensors
        if external_data_helper.uses_external_data(tensor) and not is_lazy(tensor):
            external_data_helper.load_external_data_for_tensor(tensor, str(folder))
    return model


def _set_location(tensor: TensorProto, location: str) -> None:
    for entry in tensor.external_data:
        if entry.key == "location":
            entry.value = location


def to_array(tensor: TensorProto) -> np.ndarray:
    """`numpy_helper.to_array`; a lazy tensor is memory-mapped from its file (copy-on-write:
    writable, and the file is never changed), or read when its type is not mappable."""
    if not is_lazy(tensor):
        return numpy_helper.to_array(tensor)
    location, offset, length = _extent(tensor)
    shape = tuple(int(d) for d in tensor.dims)
    if tensor.data_type in _MAPPABLE and length > 0:
        dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
        mapped = np.memmap(location, dtype=dtype, mode="c", offset=offset,
                           shape=(length // dtype.itemsize,))
        return np.asarray(mapped).reshape(shape)
    copy = TensorProto()
    copy.CopyFrom(tensor)
    copy.data_location = TensorProto.DEFAULT
    del copy.external_data[:]
    copy.raw_data = b"".join(read_chunks(tensor))
    return numpy_helper.to_array(copy)


def read_chunks(tensor: TensorProto) -> Iterator[bytes]:
    """The bytes of a lazy tensor, read from its file in chunks."""
    location, offset, length = _extent(tensor)
    with open(location, "rb") as handle:
        handle.seek(offset)
        while length > 0:
            chunk = handle.read(min(length, _CHUNK))
            if not chunk:
                raise OSError(f"tensor '{tensor.name}': '{location}' ends before its data")
            length -= len(chunk)
            yield chunk


class LazyConstants(MutableMapping[str, np.ndarray]):
    """Constant values by name; lazy tensors are memory-mapped on each access, never held."""

    def __init__(self, tensors: Iterable[TensorProto], skip: set[str]) -> None:
        self._values: dict[str, np.ndarray] = {}
        self._lazy: dict[str, TensorProto] = {}
        for tensor in tensors:
            if tensor.name in skip:
                continue
            if is_lazy(tensor):
                self._lazy[tensor.name] = TensorProto()
                self._lazy[tensor.name].CopyFrom(tensor)
            else:
                self._values[tensor.name] = numpy_helper.to_array(tensor)

    def __getitem__(self, name: str) -> np.ndarray:
        if name in self._values:
            return self._values[name]
        return to_array(self._lazy[name])

    def __setitem__(self, name: str, value: np.ndarray) -> None:
        self._lazy.pop(name, None)
        self._values[name] = value

    def __delitem__(self, name: str) -> None:
        if self._values.pop(name, None) is None:
            del self._lazy[name]

    def __contains__(self, name: object) -> bool:
        return name in self._values or name in self._lazy

    def __iter__(self) -> Iterator[str]:
        yield from self._values
        yield from self._lazy

    def __len__(self) -> int:
        return len(self._values) + len(self._lazy)


def constants(tensors: Iterable[TensorProto], skip: set[str]
              ) -> dict[str, np.ndarray] | LazyConstants:
    """Values of `tensors` (but those named in `skip`) by name: a dict, or LazyConstants when
    some are lazy."""
    tensors = list(tensors)
    if any(is_lazy(tensor) for tensor in tensors):
        return LazyConstants(tensors, skip)
    return {tensor.name: numpy_helper.to_array(tensor) for tensor in tensors
            if tensor.name not in skip}


_spill: list[Path] = []


def _spill_folder() -> Path:
    """This process's folder for the new tensors of large models; removed at exit."""
    if not _spill:
        _spill.append(Path(tempfile.mkdtemp(prefix="onnx-spectral-tensors-")))
        atexit.register(shutil.rmtree, _spill[0], True)
    return _spill[0]


def initializer(value: np.ndarray, name: str, spill: bool) -> TensorProto:
    """`numpy_helper.from_array(value, name)`; with `spill`, a value over STUB_BYTES is
    written to a file of a temporary folder (removed when the process exits) and the tensor
    is a lazy reference to it, so that a large model's new tensors are never held in memory.
    A model holding such tensors is saved with `save_with_external_data` (as
    `atomic.save_model` does), which copies their bytes to the model's own data file."""
    if (not spill or value.nbytes <= STUB_BYTES
            or helper.np_dtype_to_tensor_dtype(value.dtype) not in _MAPPABLE):
        return numpy_helper.from_array(value, name)
    handle, location = tempfile.mkstemp(dir=_spill_folder(), suffix=".data")
    with os.fdopen(handle, "wb") as file:
        np.ascontiguousarray(value).astype(value.dtype.newbyteorder("<"), copy=False).tofile(file)
    tensor = TensorProto()
    tensor.name = name
    tensor.data_type = helper.np_dtype_to_tensor_dtype(value.dtype)
    tensor.dims.extend(value.shape)
    _point(tensor, location, 0, value.nbytes)
    return tensor


def _copy_fields(source: object, target: object, skip: str) -> None:
    """Copy every set field of protobuf message `source` but `skip` into `target`."""
    for descriptor, value in source.ListFields():  # type: ignore[attr-defined]
        if descriptor.name == skip:
            continue
        field = getattr(target, descriptor.name)
        if hasattr(value, "extend") and not isinstance(value, (str, bytes)):
            field.extend(value)
        elif hasattr(value, "CopyFrom"):
            field.CopyFrom(value)
        else:
            setattr(target, descriptor.name, value)


def _payload(tensor: TensorProto) -> bytes:
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    return numpy_helper.to_array(tensor).tobytes()


def _length(tensor: TensorProto) -> int:
    """Bytes of an in-memory tensor's data, without copying it where the type allows."""
    if tensor.HasField("raw_data") and tensor.data_type in _MAPPABLE:
        count = int(np.prod(tensor.dims, dtype=np.int64))
        return count * helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return len(_payload(tensor))


def _reference(stub: TensorProto, tensor: TensorProto, location: str, offset: int,
               length: int) -> None:
    """Make `stub` a reference to `length` bytes at `offset` of `location` for `tensor`."""
    stub.name = tensor.name
    stub.data_type = tensor.data_type
    stub.dims.extend(tensor.dims)
    _point(stub, location, offset, length)


def _point(tensor: TensorProto, location: str, offset: int, length: int) -> None:
    """Set `tensor`'s external data entries as onnx.external_data_helper does."""
    del tensor.external_data[:]
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)),
                       ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key = key
        entry.value = value


def _link(source: str, folder: Path, links: dict[str, str]) -> str:
    """Name, in `folder`, of a hard link to (or, across file systems, a copy of) `source`."""
    if source not in links:
        name = f"source{len(links)}.data"
        try:
            os.link(source, folder / name)
        except OSError:
            shutil.copyfile(source, folder / name)
        links[source] = name
    return links[source]


def skeleton(model: onnx.ModelProto, data: Path | None = None, sparse: bool = False
             ) -> onnx.ModelProto:
    """`model` with every initializer over STUB_BYTES turned into a reference to `data`.

    `data`: the file the tensor bytes are written to (None: `tensors.bin`, not written).
    `sparse`: create `data` as a sparse file of the right size instead of writing the bytes.
    A lazy tensor (see `load`) keeps its bytes in its own file, linked into `data`'s folder
    when `data` is written, or gets a place in `data` otherwise.
    The big tensors are not copied in memory; `model` is not modified.
    """
    out = onnx.ModelProto()
    _copy_fields(model, out, "graph")
    _copy_fields(model.graph, out.graph, "initializer")
    location = _DATA_FILE if data is None else data.name
    offset = 0
    links: dict[str, str] = {}
    handle = None if data is None or sparse else open(data, "wb")
    try:
        for tensor in model.graph.initializer:
            if handle is not None and is_lazy(tensor):
                source, start, length = _extent(tensor)
                _reference(out.graph.initializer.add(), tensor,
                           _link(source, data.parent, links), start, length)  # type: ignore
                continue
            if not is_lazy(tensor) and tensor.ByteSize() <= STUB_BYTES:
                out.graph.initializer.append(tensor)
                continue
            offset = -(-offset // _ALIGN) * _ALIGN
            if handle is not None:
                payload = _payload(tensor)
                handle.seek(offset)
                handle.write(payload)
                length = len(payload)
                del payload
            else:
                length = _extent(tensor)[2] if is_lazy(tensor) else _length(tensor)
            _reference(out.graph.initializer.add(), tensor, location, offset, length)
            offset += length
    finally:
        if handle is not None:
            handle.close()
    if data is not None and sparse:
        with open(data, "wb") as file:
            file.truncate(offset)
    return out


def save_with_external_data(model: onnx.ModelProto, path: Path, location: str) -> None:
    """`onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
    location=location, size_threshold=0)`, whose data file a lazy model's tensors are streamed
    into from their own files (in the same order and layout onnx writes)."""
    if not any(is_lazy(tensor) for tensor in model.graph.initializer):
        onnx.save_model(model, str(path), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=location, size_threshold=0)
        return
    external_data_helper.convert_model_to_external_data(model, True, location, 0)
    handle = None
    try:
        for tensor in external_data_helper._get_all_tensors(model):
            if not external_data_helper.uses_external_data(tensor):
                continue
            if handle is None:
                handle = open(path.parent / location, "wb")
            offset = handle.tell()
            if is_lazy(tensor):
                for chunk in read_chunks(tensor):
                    handle.write(chunk)
            else:
                handle.write(tensor.raw_data)
                tensor.ClearField("raw_data")
            _point(tensor, location, offset, handle.tell() - offset)
    finally:
        if handle is not None:
            handle.close()
    path.write_bytes(model.SerializeToString())


@contextmanager
def on_disk(model: onnx.ModelProto, sparse: bool = False) -> Iterator[Path]:
    """A temporary `model.onnx` (+ its tensor file) of a skeleton of `model`; removed after."""
    folder = Path(tempfile.mkdtemp(prefix="onnx-spectral-large-"))
    try:
        path = folder / "model.onnx"
        onnx.save_model(skeleton(model, folder / _DATA_FILE, sparse=sparse), str(path))
        yield path
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def infer_shapes(model: onnx.ModelProto, **options: bool) -> onnx.ModelProto:
    """ONNX shape inference for a model of any size; returns a model with the inferred
    value_info, outputs and nodes (whose subgraphs get their value_info): a copy of `model`,
    `model` itself when it is large.

    Inference runs on the skeleton (tensors over STUB_BYTES as external references), so the
    weights are neither serialized for the C++ inference nor parsed back.
    """
    inferred = onnx.shape_inference.infer_shapes(skeleton(model), **options)
    result = model
    if not is_large(model):
        result = onnx.ModelProto()
        result.CopyFrom(model)
    for name in ("node", "value_info", "output"):
        field = getattr(result.graph, name)
        del field[:]
        field.extend(getattr(inferred.graph, name))
    return result


def check_model(model: onnx.ModelProto, full_check: bool = False) -> None:
    """onnx.checker for a model of any size (a large one is checked by path, sparse data)."""
    if not is_large(model):
        onnx.checker.check_model(model, full_check=full_check)
        return
    with on_disk(model, sparse=True) as path:
        onnx.checker.check_model(str(path), full_check=full_check)
