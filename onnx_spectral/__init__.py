"""onnx-spectral: post-training structured pruning of ONNX models by spectral pruning.

    model, report = onnx_spectral.compress("in.onnx", "calib.npz", ratio=0.5)
"""

from .api import CompressOptions, compress
from .report import Report

__all__ = ["CompressOptions", "Report", "compress"]
