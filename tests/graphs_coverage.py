"""Tiny in-code graphs of the structures real exported models have (issue 3).

Concatenations (SqueezeNet fire modules, DenseNet blocks), channel Split and Slice (YOLO C2f),
squeeze-excitation gates, decoders with ConvTranspose and Resize, transformer feed-forward
blocks and a Reshape that hard-codes the channel count. Same conventions as `tests.graphs`:
seeded weights, dynamic batch "N", node names equal their first output's name.
"""

from __future__ import annotations

import numpy as np
import onnx

from tests.graphs import GraphBuilder


def fire(opset: int = 17, seed: int = 0) -> onnx.ModelProto:
    """SqueezeNet fire module; the head reads one concatenation:

        x [N,3,8,8] -> Conv 'sq' (6, 1x1) -> Relu 'sq_r' -+-> Conv 'e1' (5, 1x1) -> Relu 'r1' -+
                                                           +-> Conv 'e3' (7, 3x3) -> Relu 'r3' -+
        Concat 'cat' (axis 1, 12) -> BatchNormalization 'bn' -> Relu 'rc' -> Conv 'head' (4) -> y
    """
    b = GraphBuilder(seed, opset)
    squeeze = b.node("Relu", [b.conv("x", "sq", 3, 6, kernel=1, pad=0)], "sq_r")
    r1 = b.node("Relu", [b.conv(squeeze, "e1", 6, 5, kernel=1, pad=0)], "r1")
    r3 = b.node("Relu", [b.conv(squeeze, "e3", 6, 7)], "r3")
    cat = b.node("Concat", [r1, r3], "cat", axis=1)
    params = [b.random("bn_scale", (12,), positive=True), b.random("bn_bias", (12,)),
              b.random("bn_mean", (12,)), b.random("bn_var", (12,), positive=True)]
    bn = b.node("BatchNormalization", [cat, *params], "bn", epsilon=1e-5)
    b.conv(b.node("Relu", [bn], "rc"), "head", 12, 4)
    return b.model([("x", ["N", 3, 8, 8])], [("head", ["N", 4, 8, 8])])


def _doubled_conv(b: GraphBuilder, x: str, name: str, in_channels: int, out_channels: int
                  ) -> str:
    """Conv whose output channels out/2.. are exactly 2 x channels 0..out/2-1 (bias too), so
    they stay exact copies after a Relu."""
    half = b.rng.standard_normal((out_channels // 2, in_channels, 3, 3)) / np.sqrt(9 * in_channels)
    bias = b.rng.standard_normal(out_channels // 2) * 0.1
    weight = b.const(f"{name}_w", np.concatenate([half, 2 * half]).astype(np.float32))
    bias_name = b.const(f"{name}_b", np.concatenate([bias, 2 * bias]).astype(np.float32))
    return b.node("Conv", [x, weight, bias_name], name, kernel_shape=[3, 3], pads=[1] * 4)


def dense_block(seed: int = 0, copies: bool = False) -> onnx.ModelProto:
    """DenseNet-style: 'stem' feeds two nested concatenations and a conv; 'l1' feeds two
    concatenations (one nested in the other's input, one separate):

        x -> Conv 'stem' (6) -> Relu 's' --+--> Conv 'l1' (4) -> Relu 'a1'
        Concat 'cat1' (s, a1) (10) -> Relu 'b1' -> Conv 'l2' (4) -> Relu 'a2'
        Concat 'cat2' (cat1, a2) (14) -> Conv 'head' (5) -> y
        Concat 'cat3' (a1, a2) (8) -> Conv 'side' (3) -> y2

    With `copies`, the second half of the channels of stem, l1 and l2 are exact copies (x 2) of
    the first half: keeping half of each group then loses nothing.
    """
    b = GraphBuilder(seed)

    def conv(x: str, name: str, in_channels: int, out_channels: int) -> str:
        if copies:
            return _doubled_conv(b, x, name, in_channels, out_channels)
        return b.conv(x, name, in_channels, out_channels)

    s = b.node("Relu", [conv("x", "stem", 3, 6)], "s")
    a1 = b.node("Relu", [conv(s, "l1", 6, 4)], "a1")
    cat1 = b.node("Concat", [s, a1], "cat1", axis=1)
    a2 = b.node("Relu", [conv(b.node("Relu", [cat1], "b1"), "l2", 10, 4)], "a2")
    b.conv(b.node("Concat", [cat1, a2], "cat2", axis=1), "head", 14, 5)
    b.conv(b.node("Concat", [a1, a2], "cat3", axis=1), "side", 8, 3)
    return b.model([("x", ["N", 3, 8, 8])], [("head", ["N", 5, 8, 8]), ("side", ["N", 3, 8, 8])])


def c2f(opset: int = 17, equal: bool = False, seed: int = 0) -> onnx.ModelProto:
    """YOLOv8 C2f: split the first conv's channels, transform one piece, concatenate all:

        x -> Conv 'cv1' (8) -> Relu 'r' -> Split 'split' (axis 1, [3, 5], or [4, 4] if equal)
        split:0 (a) ---------------------------------------+
        split:1 (b) -+-------------------------------------+-> Concat 'cat' -> Conv 'cv2' (4) -> y
                     +-> Conv 'm' (b -> b) -> Relu 'rm' ---+

    `equal` splits without sizes (opset 18+: attribute num_outputs = 2).
    """
    b = GraphBuilder(seed, opset)
    r = b.node("Relu", [b.conv("x", "cv1", 3, 8)], "r")
    sizes = [4, 4] if equal else [3, 5]
    if equal:
        extra = {"num_outputs": 2} if opset >= 18 else {}
        split = b.node("Split", [r], "split", outputs=2, axis=1, **extra)
    elif opset >= 13:
        split = b.node("Split", [r, b.const("split_sizes", np.array(sizes, np.int64))], "split",
                       outputs=2, axis=1)
    else:
        split = b.node("Split", [r], "split", outputs=2, axis=1, split=sizes)
    first, second = split, f"{split}_out1"
    rm = b.node("Relu", [b.conv(second, "m", sizes[1], sizes[1])], "rm")
    cat = b.node("Concat", [first, second, rm], "cat", axis=1)
    b.conv(cat, "cv2", 8 + sizes[1], 4)
    return b.model([("x", ["N", 3, 8, 8])], [("cv2", ["N", 4, 8, 8])])


def channel_slices(opset: int = 17, seed: int = 0) -> onnx.ModelProto:
    """Two channel ranges of one conv, each read by its own conv:

        x -> Conv 'c1' (8) -> Relu 'r' -+-> Slice 'lo' (channels 0:3) -> Conv 'ha' (4) -> y1
                                        +-> Slice 'hi' (channels 3:end) -> Conv 'hb' (4) -> y2
    """
    b = GraphBuilder(seed, opset)
    r = b.node("Relu", [b.conv("x", "c1", 3, 8)], "r")
    ranges = {"lo": (0, 3), "hi": (3, 2**62)}
    outputs = {}
    for name, (start, end) in ranges.items():
        if opset >= 10:
            inputs = [r, b.const(f"{name}_starts", np.array([start], np.int64)),
                      b.const(f"{name}_ends", np.array([end], np.int64)),
                      b.const(f"{name}_axes", np.array([1], np.int64))]
            sliced = b.node("Slice", inputs, name)
        else:
            sliced = b.node("Slice", [r], name, starts=[start], ends=[end], axes=[1])
        outputs[name] = sliced
    b.conv(outputs["lo"], "ha", 3, 4)
    b.conv(outputs["hi"], "hb", 5, 4)
    return b.model([("x", ["N", 3, 8, 8])], [("ha", ["N", 4, 8, 8]), ("hb", ["N", 4, 8, 8])])


def squeeze_excitation(gate: str, seed: int = 0) -> onnx.ModelProto:
    """x * gate(Conv(Relu(Conv(GlobalAveragePool(x))))), MobileNetV3 style:

        x -> Conv 'c1' (8) -> Relu 'r' -+-> GlobalAveragePool 'gap' -> Conv 'se1' (3, 1x1)
                                        |   -> Relu 'se_r' -> Conv 'se2' (8, 1x1) -> <gate> 'gate'
                                        +-> Mul 'scale' (r, gate) -> Conv 'c2' (5) -> y

    `gate`: Sigmoid, HardSigmoid or HardSwish.
    """
    b = GraphBuilder(seed)
    r = b.node("Relu", [b.conv("x", "c1", 3, 8)], "r")
    squeezed = b.node("Relu", [b.conv(b.node("GlobalAveragePool", [r], "gap"), "se1", 8, 3,
                                      kernel=1, pad=0)], "se_r")
    attrs = {"alpha": 0.2, "beta": 0.5} if gate == "HardSigmoid" else {}
    gated = b.node(gate, [b.conv(squeezed, "se2", 3, 8, kernel=1, pad=0)], "gate", **attrs)
    b.conv(b.node("Mul", [r, gated], "scale"), "c2", 8, 5)
    return b.model([("x", ["N", 3, 8, 8])], [("c2", ["N", 5, 8, 8])])


def decoder(opset: int = 17, seed: int = 0) -> onnx.ModelProto:
    """Segmentation-style decoder:

        x [N,3,8,8] -> Conv 'enc' (6, stride 2) -> Relu 'er' -> ConvTranspose 'up' (7, 2x2,
        stride 2) -> Relu 'ur' -> Resize 'resize' (x2 nearest; Upsample at opset 9)
        -> Conv 'out' (5) -> y [N,5,16,16]
    """
    b = GraphBuilder(seed, opset)
    enc = b.node("Conv", ["x", b.random("enc_w", (6, 3, 3, 3), fan_in=27),
                          b.random("enc_b", (6,), fan_in=4)], "enc",
                 kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2])
    er = b.node("Relu", [enc], "er")
    up = b.node("ConvTranspose", [er, b.random("up_w", (6, 7, 2, 2), fan_in=6),
                                  b.random("up_b", (7,), fan_in=4)], "up",
                kernel_shape=[2, 2], strides=[2, 2])
    ur = b.node("Relu", [up], "ur")
    scales = b.const("scales", np.array([1, 1, 2, 2], np.float32))
    if opset < 10:
        resized = b.node("Upsample", [ur, scales], "resize", mode="nearest")
    elif opset == 10:
        resized = b.node("Resize", [ur, scales], "resize", mode="nearest")
    else:
        resized = b.node("Resize", [ur, "", scales], "resize", mode="nearest")
    b.conv(resized, "out", 7, 5)
    return b.model([("x", ["N", 3, 8, 8])], [("out", ["N", 5, 16, 16])])


def transformer_ffn(activation: str, seed: int = 0) -> onnx.ModelProto:
    """Pre-norm transformer feed-forward block on [batch, seq, hidden] = [N, 5, 12]:

        x -> LayerNormalization 'ln' -> MatMul 'ff1' (12 -> 16) -> Add 'ff1_bias'
          -> <activation> -> MatMul 'ff2' (16 -> 12) -> Add 'ff2_bias' -> Add 'residual' (+x) -> y

    `activation`: "Gelu" (opset 20) or "Erf" (x * 0.5 * (1 + Erf(x / sqrt 2)), opset 17).
    """
    b = GraphBuilder(seed, 20 if activation == "Gelu" else 17)
    ln = b.node("LayerNormalization", ["x", b.random("ln_scale", (12,), positive=True),
                                       b.random("ln_bias", (12,))], "ln", axis=-1)
    h = b.node("MatMul", [ln, b.random("ff1_w", (12, 16), fan_in=12)], "ff1")
    h = b.node("Add", [h, b.random("ff1_b", (16,), fan_in=16)], "ff1_bias")
    if activation == "Gelu":
        act = b.node("Gelu", [h], "gelu")
    else:
        scaled = b.node("Div", [h, b.const("sqrt2", np.float32(np.sqrt(2.0)))], "erf_in")
        one_plus = b.node("Add", [b.node("Erf", [scaled], "erf"), b.const("one", np.float32(1))],
                          "erf_1")
        act = b.node("Mul", [b.node("Mul", [h, one_plus], "erf_x"),
                             b.const("half", np.float32(0.5))], "gelu")
    out = b.node("MatMul", [act, b.random("ff2_w", (16, 12), fan_in=16)], "ff2")
    out = b.node("Add", [out, b.random("ff2_b", (12,), fan_in=16)], "ff2_bias")
    b.node("Add", [out, "x"], "residual")
    return b.model([("x", ["N", 5, 12])], [("residual", ["N", 5, 12])])


def reshape_keeps_channels(seed: int = 0) -> onnx.ModelProto:
    """A Reshape whose target hard-codes the channel count (7), channels staying on axis 1:

        x -> Conv 'c1' (7) -> Relu 'r' -> Reshape 'flat' (target [0, 7, 64])
          -> ReduceMean 'pool' (axis 2, keepdims 0) -> Gemm 'fc' (7 -> 3) -> y
    """
    b = GraphBuilder(seed, 17)
    r = b.node("Relu", [b.conv("x", "c1", 3, 7)], "r")
    flat = b.node("Reshape", [r, b.const("flat_shape", np.array([0, 7, 64], np.int64))], "flat")
    pooled = b.node("ReduceMean", [flat], "pool", axes=[2], keepdims=0)
    b.gemm(pooled, "fc", 7, 3)
    return b.model([("x", ["N", 3, 8, 8])], [("fc", ["N", 3])])
