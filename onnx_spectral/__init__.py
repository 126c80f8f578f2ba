"""onnx-spectral: post-training structured pruning of ONNX models by spectral pruning."""
