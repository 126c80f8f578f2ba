"""ONNX Runtime's fused self-attention (com.microsoft Attention) and GELU variants.

The transformer optimizer (`onnxruntime.transformers.optimizer`) replaces a BERT attention block
by one `Attention` node: input X [b, s, hidden], packed weight [hidden, 3C] (the Q, K and V
columns side by side), bias [3C], optional mask, attribute `num_heads` H; output [b, s, C],
head ``h`` owning channels ``h*D .. h*D+D-1`` (D = C / H). The node is the producer of a group
of whole heads: removing heads keeps their columns in all three sections, their biases, and
sets `num_heads`; the output projection reading the output is the group's sink. Its input
channels (the residual stream) are kept whole.

The feed-forward activation becomes `BiasGelu` (or `FastGelu`, com.microsoft `Gelu`,
`QuickGelu`): GELU of the input plus an optional per-channel bias, channel c to channel c.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx

from onnx_spectral.graph.model import GraphIndex, attributes
from onnx_spectral.ops.base import (
    AnalysisContext,
    Editor,
    Member,
    NoWeights,
    SinkUse,
    freeze_inputs,
)
from onnx_spectral.ops.elementwise import ArithmeticHandler
from onnx_spectral.ops.linear_layer import Shape, plain_features, row_layer_fields

_UNSUPPORTED_INPUTS = {4: "past", 5: "attention_bias", 6: "past_sequence_length"}


class FusedAttentionHandler(NoWeights):
    """com.microsoft Attention with packed QKV weights: a producer of whole heads."""

    op_types: tuple[str, ...] = ("Attention",)
    weight_input = 1

    def analyze(self, node: onnx.NodeProto, ctx: AnalysisContext) -> None:
        problem = self._problem(node, ctx.graph)
        state = ctx.state(node.input[0])
        if state is not None:
            ctx.freeze(state.group, f"input channels of Attention '{node.name}' are kept whole")
        if problem is not None:
            return
        weight = ctx.graph.input_constant(node, 1)
        assert weight is not None
        channels = weight.shape[1] // 3
        group = ctx.new_group(node.name, channels, node.output[0], axis=2, rank=3)
        ctx.set_block(group, channels // self._heads(node))

    def _problem(self, node: onnx.NodeProto, graph: GraphIndex) -> str | None:
        """Why the node cannot be a producer of heads; None when it can."""
        weight = graph.input_constant(node, 1)
        heads = self._heads(node)
        if weight is None or weight.ndim != 2 or weight.shape[1] % 3:
            return "its QKV weight is not a constant [hidden, 3C]"
        sizes = attributes(node).get("qkv_hidden_sizes")
        if isinstance(sizes, list) and len(set(sizes)) != 1:
            return "Q, K and V have different widths (qkv_hidden_sizes)"
        if heads < 1 or (weight.shape[1] // 3) % heads:
            return "its width is not a whole number of heads"
        if len(node.output) > 1 and any(node.output[1:]):
            return "it returns its key/value cache"
        for position, name in _UNSUPPORTED_INPUTS.items():
            if position < len(node.input) and node.input[position]:
                return f"it reads a {name} input"
        return None

    @staticmethod
    def _heads(node: onnx.NodeProto) -> int:
        return int(attributes(node).get("num_heads", 0))  # type: ignore[call-overload]

    @staticmethod
    def _columns(kept: np.ndarray, channels: int) -> np.ndarray:
        return np.concatenate([kept + section * channels for section in range(3)])

    def slice(self, node: onnx.NodeProto, member: Member, kept: np.ndarray, channels: int,
              editor: Editor) -> None:
        columns = self._columns(kept, channels)
        weight = editor.input_value(node, 1)
        assert weight is not None
        editor.set_input_value(node, 1, weight[:, columns])
        bias = editor.input_value(node, 2)
        if bias is not None:
            editor.set_input_value(node, 2, bias[columns])
        heads = self._heads(node) * kept.size // channels
        editor.set_attribute(node, "num_heads", heads)
        if "qkv_hidden_sizes" in attributes(node):
            editor.set_attribute(node, "qkv_hidden_sizes", [kept.size] * 3)

    def output_rows(self, node: onnx.NodeProto, graph: GraphIndex) -> np.ndarray:
        """[C, 3 * hidden]: per output channel, its Q, K and V columns."""
        weight = graph.input_constant(node, 1)
        assert weight is not None
        channels = weight.shape[1] // 3
        return np.concatenate([weight[:, s * channels:(s + 1) * channels].T for s in range(3)],
                              axis=1)

    # the linear-layer view (ops.linear_layer.LinearLayer): cost only, never refitted

    def macs(self, node: onnx.NodeProto, shapes: Mapping[str, Shape]) -> int | None:
        """Projections b*s*hidden*3C plus scores and context 2*b*s*s*C."""
        data, weight = shapes.get(node.input[0]), shapes.get(node.input[1])
        if data is None or weight is None or len(data) != 3:
            return None
        batch, sequence, hidden = data
        channels = weight[1] // 3
        return batch * sequence * hidden * 3 * channels + 2 * batch * sequence ** 2 * channels

    def weight_mac_share(self, node: onnx.NodeProto, weight: np.ndarray) -> float:
        return 1.0  # scores and context shrink with the heads, like the weight's columns

    def weight_matrix(self, node: onnx.NodeProto, weight: np.ndarray) -> np.ndarray:
        return weight.T

    def weight_from_matrix(self, node: onnx.NodeProto, matrix: np.ndarray,
                           weight: np.ndarray) -> np.ndarray:
        return matrix.T.astype(weight.dtype)

    def input_features(self, node: onnx.NodeProto, sink: SinkUse, channels: int,
                       weight: np.ndarray) -> np.ndarray:
        return plain_features(sink, channels)

    def bias_input(self, node: onnx.NodeProto) -> int | None:
        return None

    def refit_problem(self, node: onnx.NodeProto, weight: np.ndarray) -> str | None:
        return "a fused Attention is not linear in its weight (softmax of Q K^T)"

    def receptive_fields(self, node: onnx.NodeProto, inputs: np.ndarray,
                         weight: np.ndarray) -> np.ndarray:
        return row_layer_fields(inputs)

    def output_axis(self, node: onnx.NodeProto) -> int:
        return -1


class BiasGeluHandler(ArithmeticHandler):
    """com.microsoft BiasGelu, FastGelu, Gelu and QuickGelu: GELU of X (+ a constant bias per
    channel); channel c to channel c, the bias sliced with the channels."""

    op_types: tuple[str, ...] = ("BiasGelu", "FastGelu", "Gelu", "QuickGelu")


class SkipLayerNormalizationHandler(NoWeights):
    """com.microsoft SkipLayerNormalization (LayerNorm of input + skip + bias over the last
    axis) and its simplified form: they normalize over the channel axis, the residual stream
    of a transformer, so the groups of their inputs stay whole."""

    op_types: tuple[str, ...] = ("SkipLayerNormalization", "SkipSimplifiedLayerNormalization",
                                 "LayerNormalization", "SimplifiedLayerNormalization")
    summing: frozenset[str] = frozenset({"SkipLayerNormalization",
                                         "SkipSimplifiedLayerNormalization"})
    """The ops that sum their inputs 0 and 1 (the residual stream and what a layer adds)."""

    def analyze(self, node: onnx.NodeProto, ctx: AnalysisContext) -> None:
        freeze_inputs(node, ctx, f"{node.op_type} normalizes over the channel axis (the "
                                 "residual stream of a transformer is kept whole)")

    def slice(self, node: onnx.NodeProto, member: Member, kept: np.ndarray, channels: int,
              editor: Editor) -> None:
        raise TypeError(f"{node.op_type} node '{node.name}' has no channel parameters")
