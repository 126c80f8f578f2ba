"""The linear-layer view of a producer or sink: its weight as a matrix, its cost, its bias.

A linear layer computes, at every output position, ``y = W p + b``: ``p`` is its receptive
field (the input row of a Gemm or MatMul; ``C_in x kernel`` features of a Conv, im2col), ``W``
its weight as a matrix ``[outputs, features]`` and ``b`` an optional bias with one value per
output. The handlers of Conv, ConvTranspose, Gemm, MatMul, Einsum, the recurrent layers and the
com.microsoft fused ops implement this protocol; the cost model, the affine offsets and the
layer refit read and write weights only through it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Protocol, runtime_checkable

import numpy as np
import onnx

from onnx_spectral.ops.base import SinkUse

Shape = tuple[int, ...]
"""Static dimensions of a tensor."""


@runtime_checkable
class LinearLayer(Protocol):
    """What the cost model, the affine offsets and the refit know of a linear layer."""

    weight_input: int
    """Position of the weight among the node's inputs."""

    def macs(self, node: onnx.NodeProto, shapes: Mapping[str, Shape]) -> int | None:
        """Multiply-accumulates of one run with the static `shapes` of its tensors; None when a
        shape it needs is unknown."""

    def weight_mac_share(self, node: onnx.NodeProto, weight: np.ndarray) -> float:
        """Fraction of `macs` proportional to the element count of the weight (its other
        MACs, e.g. a recurrent matrix, do not change with the input width)."""

    def weight_matrix(self, node: onnx.NodeProto, weight: np.ndarray) -> np.ndarray:
        """The weight as a matrix [outputs, features] (a view or copy of `weight`)."""

    def weight_from_matrix(self, node: onnx.NodeProto, matrix: np.ndarray,
                           weight: np.ndarray) -> np.ndarray:
        """Inverse of `weight_matrix`: `matrix` [outputs, features] in the layout of `weight`."""

    def input_features(self, node: onnx.NodeProto, sink: SinkUse, channels: int,
                       weight: np.ndarray) -> np.ndarray:
        """Which features (columns of the weight matrix) each input channel of the sink feeds:
        [channels, positions] int64 (positions: kernel taps or flattened spatial blocks)."""

    def bias_input(self, node: onnx.NodeProto) -> int | None:
        """Position of a bias input added unscaled, one value per output (any broadcastable
        shape of `outputs` elements), when the node computes exactly ``W p + b``; None when it
        has no such input or scales its terms (alpha, beta != 1)."""

    def refit_problem(self, node: onnx.NodeProto, weight: np.ndarray) -> str | None:
        """Why the layer cannot be refitted from (receptive field, output) rows, None if it
        can."""

    def receptive_fields(self, node: onnx.NodeProto, inputs: np.ndarray,
                         weight: np.ndarray) -> np.ndarray:
        """The rows p of a batch of the node's data input: [positions, features] float32."""

    def output_axis(self, node: onnx.NodeProto) -> int:
        """Axis of the output's channels (1 for NCHW convolutions, -1 for row layers)."""


def plain_features(sink: SinkUse, channels: int) -> np.ndarray:
    """Feature table [channels, positions] of a row layer: channel c is feature c, or the
    features of its spatial block when a layout chain (Flatten, Reshape) feeds the sink."""
    if sink.feature_map is None:
        return np.arange(channels, dtype=np.int64)[:, None]
    return sink.feature_map.lookup(channels)


def kernel_features(channels: int, weight: np.ndarray) -> np.ndarray:
    """Feature table [channels, taps] of a convolution (weight [., ., k...]) whose weight
    matrix has, per output, the input channels in order and the kernel taps within each."""
    taps = math.prod(weight.shape[2:])
    return np.arange(channels * taps, dtype=np.int64).reshape(channels, taps)


def offset_delta(layer: LinearLayer, node: onnx.NodeProto, sink: SinkUse, offset: np.ndarray,
                 weight: np.ndarray) -> np.ndarray:
    """W c: what a constant shift `offset` ([m], float64) of the sink's input channels adds to
    each output ([outputs] float64) where every tap of the layer sees it."""
    matrix = layer.weight_matrix(node, weight).astype(np.float64)
    table = layer.input_features(node, sink, offset.size, weight)  # [m, positions]
    return np.einsum("ocp,c->o", matrix[:, table], offset)


def row_layer_fields(inputs: np.ndarray) -> np.ndarray:
    """Receptive fields of a row layer: input [..., features] -> [rows, features] float32."""
    return inputs.reshape(-1, inputs.shape[-1]).astype(np.float32)
