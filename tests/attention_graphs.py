"""A tiny self-attention block as torch.onnx writes Hugging Face's BERT attention.

    x [N,S,C] -> MatMul+Add 'q'/'k'/'v' [C,C] -> Reshape [N,S,H,D] (target computed from
    Shape(x) like `x.view(x.size()[:-1] + (H, D))`) -> Transpose -> MatMul(q, k^T) 'scores'
    -> Div sqrt(D) -> Add mask -> Softmax -> MatMul(., v) 'context' -> Transpose ->
    Reshape [N,S,C] 'merge' -> MatMul+Add 'dense' -> Add x -> LayerNormalization -> y

`mask` is the additive attention mask [N,1,1,S]. Options vary one detail: `head_bias` gives
the scores a term with one slice per head, "constant" (a per-head temperature [1,H,1,1] they
are multiplied by), "computed" (added: per-head slopes times the channel mean of x,
[N,H,1,S], like a relative-position bias computed from the input) or "where" (a per-head
boolean [1,H,1,1] that masks them through Where, which breaks the pattern); `dead_heads`
zeroes the value projection of the last heads (their context is 0); `constant_targets` gives
the Reshapes constant targets [0,0,H,D] and [0,0,C].
"""

from __future__ import annotations

import numpy as np
import onnx

from tests.graphs import GraphBuilder

HEADS = 4
HEAD_SIZE = 6
CHANNELS = HEADS * HEAD_SIZE


def _linear(b: GraphBuilder, x: str, name: str, dead_heads: int = 0) -> str:
    w = b.rng.standard_normal((CHANNELS, CHANNELS)) / np.sqrt(CHANNELS)
    bias = b.rng.standard_normal(CHANNELS) / 2
    dead = slice(CHANNELS - dead_heads * HEAD_SIZE, CHANNELS)
    w[:, dead], bias[dead] = 0.0, 0.0
    product = b.node("MatMul", [x, b.const(f"{name}_w", w)], f"{name}_mm")
    return b.node("Add", [product, b.const(f"{name}_b", bias)], name)


def _leading_dims(b: GraphBuilder, x: str, prefix: str) -> list[str]:
    """Unsqueezed x.size(0), x.size(1) as torch.onnx computes them."""
    shape = b.node("Shape", [x], f"{prefix}_shape")
    axes = b.const(f"{prefix}_axes", np.array([0], dtype=np.int64))
    dims = []
    for i in range(2):
        index = b.const(f"{prefix}_i{i}", np.array(i, dtype=np.int64))
        gathered = b.node("Gather", [shape, index], f"{prefix}_g{i}", axis=0)
        dims.append(b.node("Unsqueeze", [gathered, axes], f"{prefix}_u{i}"))
    return dims


def _target(b: GraphBuilder, x: str, prefix: str, tail: list[int], constant: bool) -> str:
    if constant:
        return b.const(f"{prefix}_target", np.array([0, 0, *tail], dtype=np.int64))
    pieces = [*_leading_dims(b, x, prefix),
              *(b.const(f"{prefix}_t{i}", np.array([value], dtype=np.int64))
                for i, value in enumerate(tail))]
    return b.node("Concat", pieces, f"{prefix}_target", axis=0)


def _heads(b: GraphBuilder, x: str, name: str, perm: list[int], constant: bool) -> str:
    target = _target(b, x, f"{name}_split", [HEADS, HEAD_SIZE], constant)
    split = b.node("Reshape", [x, target], f"{name}_split")
    return b.node("Transpose", [split], f"{name}_heads", perm=perm)


def attention_block(*, seed: int = 0, head_bias: str | None = None, dead_heads: int = 0,
                    constant_targets: bool = False) -> onnx.ModelProto:
    b = GraphBuilder(seed)
    q = _heads(b, _linear(b, "x", "q"), "q", [0, 2, 1, 3], constant_targets)
    k = _heads(b, _linear(b, "x", "k"), "k", [0, 2, 3, 1], constant_targets)
    v = _heads(b, _linear(b, "x", "v", dead_heads), "v", [0, 2, 1, 3], constant_targets)
    scores = b.node("MatMul", [q, k], "scores")
    scaled = b.node("Div", [scores, b.const("scale", np.float32(np.sqrt(HEAD_SIZE)))], "scaled")
    masked = b.node("Add", [scaled, "mask"], "masked")
    if head_bias == "constant":
        temperature = b.const("temperature", b.rng.uniform(0.2, 3.0, (1, HEADS, 1, 1)))
        masked = b.node("Mul", [masked, temperature], "biased")
    elif head_bias == "computed":
        axes = b.const("bias_axes", np.array([1, 2], dtype=np.int64))
        mean = b.node("ReduceMean", ["x"], "bias_mean", axes=[2], keepdims=0)
        keys = b.node("Unsqueeze", [mean, axes], "bias_keys")  # [N,1,1,S]
        slopes = b.const("bias_slopes", b.rng.uniform(-6.0, 6.0, (1, HEADS, 1, 1)))
        masked = b.node("Add", [masked, b.node("Mul", [slopes, keys], "bias")], "biased")
    elif head_bias == "where":
        keep = b.const("keep", np.arange(HEADS).reshape(1, HEADS, 1, 1) % 2 == 0)
        masked = b.node("Where", [keep, masked, b.const("low", np.float32(-1e4))], "biased")
    probs = b.node("Softmax", [masked], "probs", axis=-1)
    context = b.node("MatMul", [probs, v], "context")
    back = b.node("Transpose", [context], "back", perm=[0, 2, 1, 3])
    merge = b.node("Reshape", [back, _target(b, back, "merge", [CHANNELS], constant_targets)],
                   "merge")
    dense = _linear(b, merge, "dense")
    residual = b.node("Add", [dense, "x"], "residual")
    b.node("LayerNormalization", [residual, b.const("gamma", np.ones(CHANNELS, np.float32)),
                                  b.const("beta", np.zeros(CHANNELS, np.float32))], "y", axis=-1)
    return b.model([("x", ["N", "S", CHANNELS]), ("mask", ["N", 1, 1, "S"])],
                   [("y", ["N", "S", CHANNELS])])


def attention_feeds(samples: int, seq: int = 5, seed: int = 1) -> dict[str, np.ndarray]:
    """Seeded inputs: x N(0, 1) [samples, seq, C], the last position masked out in half."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((samples, 1, 1, seq), dtype=np.float32)
    mask[: samples // 2, ..., -1] = -10000.0
    return {"x": rng.standard_normal((samples, seq, CHANNELS)).astype(np.float32),
            "mask": mask}


def fused_attention_block(seed: int = 0) -> onnx.ModelProto:
    """The block as ONNX Runtime's transformer optimizer fuses it:

        x [N,S,C] -> com.microsoft Attention 'attention' (packed QKV [C,3C], num_heads H)
        -> MatMul+Add 'dense' -> Add x -> LayerNormalization -> y
    """
    b = GraphBuilder(seed)
    weight = b.random("qkv_w", (CHANNELS, 3 * CHANNELS), fan_in=CHANNELS)
    bias = b.random("qkv_b", (3 * CHANNELS,), fan_in=4)
    b.nodes.append(onnx.helper.make_node("Attention", ["x", weight, bias], ["attention"],
                                         name="attention", domain="com.microsoft",
                                         num_heads=HEADS))
    dense = _linear(b, "attention", "dense")
    residual = b.node("Add", [dense, "x"], "residual")
    b.node("LayerNormalization", [residual, b.const("gamma", np.ones(CHANNELS, np.float32)),
                                  b.const("beta", np.zeros(CHANNELS, np.float32))], "y", axis=-1)
    graph = onnx.helper.make_graph(
        b.nodes, "fused",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", "S", CHANNELS])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", "S", CHANNELS])],
        b.initializers)
    return onnx.helper.make_model(graph, opset_imports=[
        onnx.helper.make_opsetid("", b.opset), onnx.helper.make_opsetid("com.microsoft", 1)])
