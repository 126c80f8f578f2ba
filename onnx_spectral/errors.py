"""Errors raised by onnx-spectral.

Every error names what is at fault (file, node, tensor, input) and what would be accepted, so
that the CLI can print it as-is and exit non-zero.
"""

from __future__ import annotations


class SpectralError(Exception):
    """Base class of every error onnx-spectral raises on purpose."""


class ModelError(SpectralError):
    """The model file cannot be read, is not valid ONNX, or uses something we refuse."""


class GraphError(SpectralError):
    """A node or tensor of the graph is malformed for the analysis.

    Args:
        message: what is wrong and what would be accepted.
        node: name of the node at fault, when there is one.
        tensor: name of the tensor at fault, when there is one.
    """

    def __init__(self, message: str, *, node: str | None = None, tensor: str | None = None):
        where = []
        if node is not None:
            where.append(f"node '{node}'")
        if tensor is not None:
            where.append(f"tensor '{tensor}'")
        prefix = (", ".join(where) + ": ") if where else ""
        super().__init__(prefix + message)
        self.node = node
        self.tensor = tensor


class DataError(SpectralError):
    """Calibration or verification data does not fit the model (names, dtypes, shapes, files)."""


class OptionsError(SpectralError):
    """An option value is out of range or options contradict each other."""


class StatisticsError(SpectralError):
    """Calibration statistics are missing, empty or do not belong to the model."""


class RewriteError(SpectralError):
    """The compressed model failed a safety check; nothing was written."""


class UnsupportedGraphError(SpectralError):
    """No channel group of the model can be pruned: compressing it would change nothing."""


class ResourceError(SpectralError):
    """Calibration or verification ran out of memory even with batches of one sample."""
