"""Affine reconstruction (SPEC section 4, optional): t_F ~ A t_J + c, c folded into sink biases.

With centered statistics (covariance ``Sigma - mu mu^T``), ``A = Cov[:, J] (Cov[J, J] +
lambda I)^-1`` and ``c = mu - A mu_J``. A sink computing ``W t + b`` then computes
``(W A) t_J + (b + W c)``: the offset goes into its bias. Supported sinks: the linear layers
whose handler names a bias input (`LinearLayer.bias_input`): a dense Conv or FusedConv (exact
away from zero padding: at the border a padded Conv sees fewer taps of ``c``), a ConvTranspose
with unit strides, a Gemm or FusedGemm with ``alpha = beta = 1``, flattened or not. A tap whose
sinks are not all supported keeps the linear reconstruction.
"""

from __future__ import annotations

import numpy as np
import onnx

from onnx_spectral.analysis import Tap
from onnx_spectral.graph.model import GraphIndex
from onnx_spectral.ops import linear_layer_for
from onnx_spectral.ops.base import Editor, SinkUse
from onnx_spectral.ops.linear_layer import offset_delta
from onnx_spectral.selection.spectral import reconstruction


def supports_offset(graph: GraphIndex, tap: Tap) -> bool:
    """Whether every sink of `tap` has a constant bias, one value per output, that the offset
    can be folded into."""
    for sink in tap.sinks:
        node = graph.nodes_by_name[sink.node]
        layer = linear_layer_for(node)
        position = None if layer is None else layer.bias_input(node)
        if layer is None or position is None:
            return False
        bias, weight = graph.input_constant(node, position), graph.input_constant(node, 1)
        if bias is None or weight is None \
                or bias.size != layer.weight_matrix(node, weight).shape[0]:
            return False
    return True


def affine_reconstruction(sigma: np.ndarray, mean: np.ndarray, kept: np.ndarray, ridge: float,
                          exact_kept: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``A`` ([m, k]) and ``c`` ([m]) from the second moment ``sigma`` [m, m] and ``mean`` [m]
    (`exact_kept`: see `spectral.reconstruction`)."""
    covariance = sigma - np.outer(mean, mean)
    matrix = reconstruction(covariance, kept, ridge, exact_kept)
    return matrix, mean - matrix @ mean[kept]


def fold_offset(node: onnx.NodeProto, sink: SinkUse, offset: np.ndarray, editor: Editor) -> None:
    """bias += W c for the sink's current (not yet folded) weight; `offset` is c, [m]."""
    layer = linear_layer_for(node)
    position = None if layer is None else layer.bias_input(node)
    if layer is None or position is None:
        raise TypeError(f"{node.op_type} node '{node.name}' has no bias to fold an offset into")
    weight = editor.input_value(node, layer.weight_input)
    bias = editor.input_value(node, position)
    assert weight is not None and bias is not None
    delta = offset_delta(layer, node, sink, offset, weight)
    editor.set_input_value(node, position, (bias.astype(np.float64)
                                            + delta.reshape(bias.shape)).astype(bias.dtype))
