"""Affine reconstruction (SPEC section 4, optional): t_F ~ A t_J + c, c folded into sink biases.

With centered statistics (covariance ``Sigma - mu mu^T``), ``A = Cov[:, J] (Cov[J, J] +
lambda I)^-1`` and ``c = mu - A mu_J``. A sink computing ``W t + b`` then computes
``(W A) t_J + (b + W c)``: the offset goes into its bias. Supported sinks: a dense Conv with a
bias input (exact away from zero padding: at the border a padded Conv sees fewer taps of ``c``)
and a Gemm with ``alpha = beta = 1`` and a bias input, flattened or not. A tap whose sinks are not
all supported keeps the linear reconstruction.
"""

from __future__ import annotations

import numpy as np
import onnx

from onnx_spectral.analysis import Tap
from onnx_spectral.graph.model import GraphIndex, attributes
from onnx_spectral.ops.base import Editor, SinkUse
from onnx_spectral.selection.spectral import reconstruction


def supports_offset(graph: GraphIndex, tap: Tap) -> bool:
    """Whether every sink of `tap` has a bias the offset can be folded into."""
    for sink in tap.sinks:
        node = graph.nodes_by_name[sink.node]
        attrs = attributes(node)
        if len(node.input) < 3 or not node.input[2]:
            return False
        bias, weight = graph.input_constant(node, 2), graph.input_constant(node, 1)
        if bias is None or weight is None:
            return False
        if node.op_type == "Conv":
            if int(attrs.get("group", 1)) != 1:  # type: ignore[call-overload]
                return False
            outputs = weight.shape[0]
        elif node.op_type == "Gemm":
            if attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
                return False
            outputs = weight.shape[0] if attrs.get("transB", 0) else weight.shape[1]
        else:
            return False
        if bias.size != outputs:
            return False
    return True


def affine_reconstruction(sigma: np.ndarray, mean: np.ndarray, kept: np.ndarray, ridge: float
                          ) -> tuple[np.ndarray, np.ndarray]:
    """``A`` ([m, k]) and ``c`` ([m]) from the second moment ``sigma`` [m, m] and ``mean`` [m]."""
    covariance = sigma - np.outer(mean, mean)
    matrix = reconstruction(covariance, kept, ridge)
    return matrix, mean - matrix @ mean[kept]


def fold_offset(node: onnx.NodeProto, sink: SinkUse, offset: np.ndarray, editor: Editor) -> None:
    """bias += W c for the sink's current (not yet folded) weight; `offset` is c, [m]."""
    weight = editor.input_value(node, 1)
    bias = editor.input_value(node, 2)
    assert weight is not None and bias is not None
    wide = weight.astype(np.float64)
    if node.op_type == "Conv":
        delta = np.tensordot(wide, offset, axes=([1], [0])).reshape(wide.shape[0], -1).sum(1)
    else:
        rows = wide if attributes(node).get("transB", 0) else wide.T
        if sink.feature_map is None:
            delta = rows @ offset
        else:
            table = sink.feature_map.lookup(offset.size)  # [m, positions]
            delta = np.einsum("ocp,c->o", rows[:, table], offset)
    editor.set_input_value(node, 2, (bias.astype(np.float64)
                                     + np.broadcast_to(delta, bias.shape)).astype(bias.dtype))
