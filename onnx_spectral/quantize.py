"""INT8 quantization of the compressed model, calibrated on the same data as the pruning.

ONNX Runtime's `quantize_static` does the work: the float model is first pre-processed
(`quant_pre_process`: shape inference and ONNX Runtime's basic graph optimizations, which fold
BatchNormalization into the preceding Conv), then quantized with activation ranges calibrated
by a `CalibrationDataReader` over the calibration batches. Activations are uint8 and weights
int8 (ONNX Runtime's fast U8S8 kernels on x86), weights per output channel by default.
`quantize_dynamic_int8` runs `quantize_dynamic` instead: int8 weights, activations quantized
at run time (no calibration).
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry
from onnxruntime.quantization.shape_inference import quant_pre_process

from onnx_spectral.calibration.sources import FeedDict
from onnx_spectral.errors import OptionsError, RewriteError
from onnx_spectral.graph import external_tensors
from onnx_spectral.graph.executor import batch_samples, sample_range

Quantize = Literal["auto", "none", "int8", "dynamic"]
"""How the model written is quantized; "auto": as the input model is (int8 for a QDQ model,
`graph.dequantize`; dynamic for a dynamically quantized one, `graph.dynamic_quant`), else
none."""
QuantizeMethod = Literal["minmax", "entropy", "percentile"]
QuantizeFormat = Literal["qdq", "qoperator"]

_METHODS = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}
_FORMATS = {"qdq": QuantFormat.QDQ, "qoperator": QuantFormat.QOperator}
_FLOAT_OPS = frozenset({"BatchNormalization", "Pad"})
"""Left in float: the quantizer scales a BatchNormalization's 1-D weights along a missing axis 1
(OpenVINO refuses the model), and neither op gains from int8 in ONNX Runtime."""


class _Batches(CalibrationDataReader):
    """The calibration batches ({input name: [samples, ...]}), one per `get_next`, cut to one
    size (the histogram calibrators stack the batches' outputs)."""

    def __init__(self, batches: Sequence[FeedDict]) -> None:
        sizes = [batch_samples(feeds) for feeds in batches]
        size = math.gcd(*sizes)
        self._batches: Iterator[FeedDict] = (
            sample_range(feeds, start, start + size)
            for feeds, count in zip(batches, sizes, strict=True)
            for start in range(0, count, size))

    def get_next(self) -> FeedDict | None:
        return next(self._batches, None)


def quantize_problem(model: onnx.ModelProto, exclude: Sequence[str]) -> str | None:
    """Why `model` cannot be quantized with the nodes `exclude` kept float (None: it can)."""
    if external_tensors.is_large(model):
        return "--quantize does not yet handle models past 2 GiB; quantize without it"
    names = {node.name for node in model.graph.node}
    unknown = [name for name in exclude if name not in names]
    if unknown:
        return (f"--quantize-exclude names no node of the model: {', '.join(unknown)} (accepted: "
                "node names of the input model, as `onnx-spectral analyze` lists them)")
    return None


def quantize_int8(model: onnx.ModelProto, batches: Sequence[FeedDict], *,
                  method: QuantizeMethod = "minmax", fmt: QuantizeFormat = "qdq",
                  per_channel: bool = True, exclude: Sequence[str] = ()) -> onnx.ModelProto:
    """`model` quantized to int8: uint8 activations calibrated on `batches` by `method`, int8
    weights (per output channel when `per_channel`), written as QDQ pairs or QLinear ops
    (`fmt`); the nodes `exclude`, BatchNormalization and Pad stay float.

    Raises OptionsError for an unknown excluded node or a model past 2 GiB, RewriteError when
    ONNX Runtime cannot quantize the model or `batches` is empty.
    """
    problem = quantize_problem(model, exclude)
    if problem is not None:
        raise OptionsError(problem)
    if not batches:
        raise RewriteError("--quantize int8 needs calibration batches (not only saved "
                           "statistics) to calibrate the activation ranges")
    with tempfile.TemporaryDirectory(prefix="onnx-spectral-quantize-") as folder:
        source, prepared, quantized = (Path(folder) / f"{name}.onnx"
                                       for name in ("source", "prepared", "quantized"))
        onnx.save_model(model, str(source))
        try:
            with _quiet():
                _quantize(source, prepared, quantized, _Batches(batches), method, fmt,
                          per_channel, exclude)
        except Exception as exc:
            raise RewriteError(f"ONNX Runtime could not quantize the compressed model to int8: "
                               f"{type(exc).__name__}: {exc}; pass --quantize-exclude NODE for "
                               "the node at fault, or leave out --quantize") from exc
        return onnx.load(str(quantized))


def quantize_as(model: onnx.ModelProto, mode: Quantize, batches: Sequence[FeedDict], *,
                method: QuantizeMethod = "minmax", fmt: QuantizeFormat = "qdq",
                per_channel: bool = True, exclude: Sequence[str] = ()) -> onnx.ModelProto:
    """`model` quantized as `mode` asks: `quantize_int8` (calibrated on `batches`),
    `quantize_dynamic_int8`, or `model` itself ("none"; "auto" is decided before)."""
    if mode == "dynamic":
        return quantize_dynamic_int8(model, per_channel=per_channel, exclude=exclude)
    if mode != "int8":
        return model
    return quantize_int8(model, batches, method=method, fmt=fmt, per_channel=per_channel,
                         exclude=exclude)


def quantize_dynamic_int8(model: onnx.ModelProto, *, per_channel: bool = True,
                          exclude: Sequence[str] = ()) -> onnx.ModelProto:
    """`model` quantized by ONNX Runtime's `quantize_dynamic`: int8 weights (per output
    channel when `per_channel`), activations quantized at run time; the nodes `exclude` stay
    float. Raises OptionsError as `quantize_int8`, RewriteError when ONNX Runtime fails."""
    problem = quantize_problem(model, exclude)
    if problem is not None:
        raise OptionsError(problem)
    with tempfile.TemporaryDirectory(prefix="onnx-spectral-quantize-") as folder:
        source, quantized = Path(folder) / "source.onnx", Path(folder) / "quantized.onnx"
        onnx.save_model(model, str(source))
        try:
            with _quiet():
                quantize_dynamic(str(source), str(quantized), per_channel=per_channel,
                                 weight_type=QuantType.QInt8,
                                 nodes_to_exclude=list(exclude) or None)
        except Exception as exc:
            raise RewriteError(f"ONNX Runtime could not quantize the compressed model "
                               f"dynamically: {type(exc).__name__}: {exc}; pass "
                               "--quantize-exclude NODE for the node at fault, or --quantize "
                               "none") from exc
        return onnx.load(str(quantized))


def _quantize(source: Path, prepared: Path, quantized: Path, reader: CalibrationDataReader,
              method: QuantizeMethod, fmt: QuantizeFormat, per_channel: bool,
              exclude: Sequence[str]) -> None:
    """Pre-process the model at `source` into `prepared`, quantize that into `quantized`."""
    quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
    registry = QDQRegistry if fmt == "qdq" else QLinearOpsRegistry
    quantize_static(str(prepared), str(quantized), reader, quant_format=_FORMATS[fmt],
                    op_types_to_quantize=sorted(set(registry) - _FLOAT_OPS),
                    per_channel=per_channel, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, nodes_to_exclude=list(exclude) or None,
                    calibrate_method=_METHODS[method],
                    extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Keep ONNX Runtime's quantizer from printing progress and log warnings (about weights it
    leaves per tensor) among the tool's own output."""
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logging.disable(logging.NOTSET)


def model_bytes(model: onnx.ModelProto) -> int:
    """Bytes the model takes written: its serialized size, or its tensors' bytes past 2 GiB."""
    if external_tensors.is_large(model):
        return external_tensors.tensor_bytes(model)
    return model.ByteSize()
