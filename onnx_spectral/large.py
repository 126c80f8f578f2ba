"""Models past protobuf's 2 GiB limit on one serialized message.

Such a model lives in memory as one ModelProto, but it cannot be serialized, so ONNX shape
inference, the checker and ONNX Runtime cannot take it as bytes. They get a *skeleton* instead:
the same model whose large tensors (over STUB_BYTES) are references to an external data file.
For shape inference the file need not exist; for the checker it is a sparse file of the right
size (nothing is written); for ONNX Runtime the tensor bytes are written to a temporary folder.
Models under LARGE_BYTES take the ordinary in-memory paths.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import onnx
from onnx import TensorProto, numpy_helper

LARGE_BYTES = 2**31 - 2**26
"""Tensor bytes above which a model is handled through a skeleton (and saved with external
data): protobuf's 2 GiB limit, with room for the graph itself."""
STUB_BYTES = 1 << 20
"""Tensors larger than this become external references in a skeleton."""
_DATA_FILE = "tensors.bin"
_ALIGN = 4096


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes the model's initializers take when serialized."""
    return sum(tensor.ByteSize() for tensor in model.graph.initializer)


def is_large(model: onnx.ModelProto) -> bool:
    return tensor_bytes(model) > LARGE_BYTES


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


def skeleton(model: onnx.ModelProto, data: Path | None = None, sparse: bool = False
             ) -> onnx.ModelProto:
    """`model` with every initializer over STUB_BYTES turned into a reference to `data`.

    `data`: the file the tensor bytes are written to (None: `tensors.bin`, not written).
    `sparse`: create `data` as a sparse file of the right size instead of writing the bytes.
    The big tensors are not copied in memory; `model` is not modified.
    """
    out = onnx.ModelProto()
    _copy_fields(model, out, "graph")
    _copy_fields(model.graph, out.graph, "initializer")
    location = _DATA_FILE if data is None else data.name
    offset = 0
    handle = None if data is None or sparse else open(data, "wb")
    try:
        for tensor in model.graph.initializer:
            if tensor.ByteSize() <= STUB_BYTES:
                out.graph.initializer.append(tensor)
                continue
            payload = _payload(tensor)
            offset = -(-offset // _ALIGN) * _ALIGN
            if handle is not None:
                handle.seek(offset)
                handle.write(payload)
            stub = out.graph.initializer.add()
            stub.name = tensor.name
            stub.data_type = tensor.data_type
            stub.dims.extend(tensor.dims)
            stub.data_location = TensorProto.EXTERNAL
            for key, value in (("location", location), ("offset", str(offset)),
                               ("length", str(len(payload)))):
                entry = stub.external_data.add()
                entry.key = key
                entry.value = value
            offset += len(payload)
    finally:
        if handle is not None:
            handle.close()
    if data is not None and sparse:
        with open(data, "wb") as file:
            file.truncate(offset)
    return out


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
    value_info and outputs (the same object as `model` when it is large)."""
    if not is_large(model):
        return onnx.shape_inference.infer_shapes(model, **options)
    inferred = onnx.shape_inference.infer_shapes(skeleton(model), **options)
    for name in ("value_info", "output"):
        field = getattr(model.graph, name)
        del field[:]
        field.extend(getattr(inferred.graph, name))
    return model


def check_model(model: onnx.ModelProto, full_check: bool = False) -> None:
    """onnx.checker for a model of any size (a large one is checked by path, sparse data)."""
    if not is_large(model):
        onnx.checker.check_model(model, full_check=full_check)
        return
    with on_disk(model, sparse=True) as path:
        onnx.checker.check_model(str(path), full_check=full_check)
