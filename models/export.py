"""Rebuilding PyTorch modules from a package's own source and exporting them to checked ONNX."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from unittest import mock

import numpy as np
import torch

from models.cache import staged
from models.runtime import run_onnx
from onnx_spectral.errors import DataError

OPSET = 17
ATOL = 1e-4


def load_source_module(
    path: Path, name: str, stubs: Mapping[str, ModuleType] | None = None
) -> ModuleType:
    """Execute one Python file of a fetched package as a module named ``name``.

    Args:
        path: the ``.py`` file.
        name: the module name to give it (it is not added to ``sys.modules``).
        stubs: modules that the file imports, substituted while it executes, for packages
            whose ``__init__`` imports dependencies that are not installed.
    """
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise DataError(f"cannot load Python source {path}")
    module = importlib.util.module_from_spec(spec)
    with mock.patch.dict(sys.modules, dict(stubs or {})):
        spec.loader.exec_module(module)
    return module


def export_onnx(
    module: torch.nn.Module,
    path: Path,
    *,
    input_name: str,
    output_name: str,
    check_inputs: np.ndarray,
    source: str,
) -> Path:
    """Export ``module`` to a single-file ONNX model at ``path`` with a dynamic batch axis.

    Uses the TorchScript exporter (``dynamo=False``) at opset 17 and keeps its graph as is.
    The file is published only after onnxruntime reproduces the torch outputs on
    ``check_inputs`` (a batch of another size than the export's example) within ``ATOL``.

    Args:
        module: the model in eval mode; one input, one output, both batch first.
        path: where to write the ``.onnx`` file.
        input_name: name of the graph input.
        output_name: name of the graph output.
        check_inputs: float32 inputs [N, ...] with N >= 3; the first two are the export example.
        source: the package the model comes from, for error messages.

    Raises:
        DataError: the ONNX model does not reproduce the torch outputs.
    """
    module.eval()
    example = torch.from_numpy(check_inputs[:2])
    with staged(path) as staging:
        torch.onnx.export(
            module,
            (example,),
            str(staging),
            input_names=[input_name],
            output_names=[output_name],
            dynamic_axes={input_name: {0: "N"}, output_name: {0: "N"}},
            opset_version=OPSET,
            dynamo=False,
            external_data=False,
        )
        _check_export(module, staging, check_inputs, source)
    return path


def _check_export(module: torch.nn.Module, path: Path, inputs: np.ndarray, source: str) -> None:
    """Raise DataError unless the ONNX model at ``path`` matches ``module`` on ``inputs``."""
    with torch.no_grad():
        expected = module(torch.from_numpy(inputs)).numpy()
    actual = run_onnx(path, inputs)
    if actual.shape != expected.shape or not np.allclose(actual, expected, rtol=0, atol=ATOL):
        error = np.abs(actual - expected).max() if actual.shape == expected.shape else "n/a"
        raise DataError(
            f"ONNX export of {source} does not reproduce torch: output shapes "
            f"{actual.shape} vs {expected.shape}, max abs difference {error} (atol {ATOL})"
        )
