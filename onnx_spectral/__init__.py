"""onnx-spectral: post-training structured pruning of ONNX models by spectral pruning.

    model, report = onnx_spectral.compress("in.onnx", "calib.npz", ratio=0.5)
"""

from onnx_spectral.api import CompressOptions, compress
from onnx_spectral.report import Report

__all__ = ["CompressOptions", "Report", "compress"]
