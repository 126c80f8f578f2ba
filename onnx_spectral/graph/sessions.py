"""ONNX Runtime sessions: one place that picks the execution provider."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import onnx
import onnxruntime as ort

from onnx_spectral.errors import OptionsError
from onnx_spectral.graph import external_tensors

Provider = Literal["auto", "cpu", "cuda"]


def execution_providers(provider: Provider) -> list[str]:
    """ORT provider list for `provider`: auto = CUDA when this onnxruntime has it, else CPU."""
    available = ort.get_available_providers()
    if provider == "cpu":
        return ["CPUExecutionProvider"]
    if provider == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise OptionsError("--provider cuda: this onnxruntime has no CUDAExecutionProvider "
                               f"(available: {available}); install the 'gpu' extra "
                               "(onnxruntime-gpu) or use --provider cpu")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if provider == "auto":
        if "CUDAExecutionProvider" in available:
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        return ["CPUExecutionProvider"]
    raise OptionsError(f"unknown provider '{provider}'; accepted: auto, cpu, cuda")


_OUT_OF_MEMORY_MARKS = ("out of memory", "failed to allocate", "bad_alloc",
                        "cudaerrormemoryallocation", "cuda_error_out_of_memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` is a host MemoryError or an ONNX Runtime allocation failure (host/device)."""
    if isinstance(exc, MemoryError):
        return True
    text = str(exc).lower()
    return any(mark in text for mark in _OUT_OF_MEMORY_MARKS)


_threads = 0


def set_session_threads(threads: int) -> None:
    """ONNX Runtime intra-op threads of the sessions opened from now on in this process (0: its
    default, one per core); a Ray worker sets the CPUs it was given."""
    global _threads
    _threads = threads


def open_session(model: onnx.ModelProto, provider: Provider) -> ort.InferenceSession:
    """An inference session on an in-memory model (written to a temporary file only past 2 GiB).

    The session sees the model without its main graph's value_info: shapes read from one
    calibration sample (`shapes.fill_missing_shapes`) are static where the model is not, and
    ONNX Runtime would fold `Shape` nodes of them into constants that fail on other sizes.
    """
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = _threads
    with _without_value_info(model):
        if external_tensors.is_large(model):  # past 2 GiB: a temporary file with external data
            options.add_session_config_entry("session.disable_prepacking", "1")  # no weight copy
            with external_tensors.on_disk(model) as path:
                return ort.InferenceSession(str(path), options,
                                            providers=execution_providers(provider))
        return ort.InferenceSession(model.SerializeToString(), options,
                                    providers=execution_providers(provider))


@contextmanager
def _without_value_info(model: onnx.ModelProto) -> Iterator[None]:
    """`model` with its main graph's value_info taken out for the duration, then put back."""
    kept = []
    for value in model.graph.value_info:
        copy = onnx.ValueInfoProto()
        copy.CopyFrom(value)
        kept.append(copy)
    del model.graph.value_info[:]
    try:
        yield
    finally:
        model.graph.value_info.extend(kept)
