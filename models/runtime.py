"""Running single-input, single-output ONNX models with onnxruntime on the CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnx_spectral.errors import DataError


def run_onnx(model_path: Path | onnx.ModelProto, inputs: np.ndarray,
             batch_size: int = 500) -> np.ndarray:
    """Run a model with one input and one output over ``inputs`` in batches.

    Args:
        model_path: the ``.onnx`` file, or a model in memory.
        inputs: the input array, batch first: [N, ...].
        batch_size: rows per ``session.run``.

    Returns:
        The first output of the model for all rows, concatenated: [N, ...].
    """
    source = (model_path.SerializeToString() if isinstance(model_path, onnx.ModelProto)
              else str(model_path))
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    model_inputs = session.get_inputs()
    if len(model_inputs) != 1:
        names = [meta.name for meta in model_inputs]
        where = source if isinstance(source, str) else "the model"
        raise DataError(f"{where}: expected a model with one input, it has {names}")
    name = model_inputs[0].name
    outputs = [
        session.run(None, {name: inputs[start : start + batch_size]})[0]
        for start in range(0, len(inputs), batch_size)
    ]
    return np.concatenate(outputs)
