"""Tiny in-code ONNX graphs for the op-handler and CLI tests.

Every builder returns a checked `onnx.ModelProto` (opset 17 unless the op needs another) with
seeded random weights, a dynamic batch dimension "N" on its input and output, and named nodes,
so that tests can look nodes up by name in the compressed model. The node names in the ASCII
sketches are the real node names.

Most op tests use `conv_sandwich`, which puts the op under test between two convolutions:

    x [N,3,8,8] -> Conv 'conv1' (C=7, 3x3, pad 1, bias) -> <middle> -> Conv 'conv2' (5, 3x3) -> y

`conv1`'s group is the one under test: prunable when <middle> is channel-wise, frozen when it is
a barrier. `conv2`'s group is always frozen (its output is the graph output).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

Dims = Sequence[int | str]
Middle = Callable[["GraphBuilder", str, int], str]
"""Adds nodes after tensor `t` of `channels` channels (NCHW); returns the last tensor's name."""

OPSET = 17
CHANNELS = 7
"""Width of the group under test in the conv graphs; ratio 0.5 keeps ceil(3.5) = 4."""


class GraphBuilder:
    """Collects nodes and constants; constants are initializers or `Constant` nodes."""

    def __init__(self, seed: int = 0, opset: int = OPSET, constant_nodes: bool = False) -> None:
        self.rng = np.random.default_rng(seed)
        self.opset = opset
        self.constant_nodes = constant_nodes
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def const(self, name: str, value: np.ndarray | float | int | Sequence[int]) -> str:
        """A constant named `name` (an initializer, or a `Constant` node when asked)."""
        array = np.asarray(value)
        if array.dtype == np.float64:
            array = array.astype(np.float32)
        tensor = numpy_helper.from_array(array, name)
        if self.constant_nodes:
            self.nodes.append(helper.make_node("Constant", [], [name], name=f"const_{name}",
                                               value=tensor))
        else:
            self.initializers.append(tensor)
        return name

    def random(self, name: str, shape: Sequence[int], fan_in: int | None = None,
               positive: bool = False) -> str:
        """Seeded N(0, 1/fan_in) constant (|.| + 0.5/sqrt(fan_in) when `positive`)."""
        scale = 1.0 / np.sqrt(fan_in) if fan_in else 1.0
        value = self.rng.standard_normal(tuple(shape)) * scale
        if positive:
            value = np.abs(value) + 0.5 * scale
        return self.const(name, value.astype(np.float32))

    def node(self, op: str, inputs: Sequence[str], name: str, outputs: int = 1,
             **attrs: object) -> str:
        """Add a node named `name`; its (first) output tensor is also called `name`."""
        names = [name] + [f"{name}_out{i}" for i in range(1, outputs)]
        self.nodes.append(helper.make_node(op, list(inputs), names, name=name, **attrs))
        return name

    def conv(self, x: str, name: str, in_channels: int, out_channels: int, kernel: int = 3,
             pad: int = 1, bias: bool = True, group: int = 1,
             weight: np.ndarray | None = None) -> str:
        """Conv `name` with weight '{name}_w' [out, in/group, k, k] and bias '{name}_b'."""
        shape = (out_channels, in_channels // group, kernel, kernel)
        if weight is None:
            w = self.random(f"{name}_w", shape, fan_in=shape[1] * kernel * kernel)
        else:
            w = self.const(f"{name}_w", weight)
        inputs = [x, w]
        if bias:
            inputs.append(self.random(f"{name}_b", (out_channels,), fan_in=4))
        return self.node("Conv", inputs, name, kernel_shape=[kernel, kernel],
                         pads=[pad] * 4, group=group)

    def gemm(self, x: str, name: str, in_features: int, out_features: int,
             trans_b: int = 1, positive_bias: bool = False) -> str:
        """Gemm `name`: B '{name}_w' ([out, in] if trans_b else [in, out]), C '{name}_b'.

        A positive bias keeps a following Relu from being dead on every calibration sample.
        """
        shape = (out_features, in_features) if trans_b else (in_features, out_features)
        w = self.random(f"{name}_w", shape, fan_in=in_features)
        b = self.random(f"{name}_b", (out_features,), fan_in=4, positive=positive_bias)
        return self.node("Gemm", [x, w, b], name, transB=trans_b)

    def model(self, inputs: Sequence[tuple[str, Dims]],
              outputs: Sequence[tuple[str, Dims]]) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, "tiny",
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(s)) for n, s in inputs],
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(s)) for n, s in outputs],
            self.initializers,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        onnx.checker.check_model(model, full_check=True)
        return model


# ----------------------------------------------------------------------------------------------
# conv -> <middle> -> conv


def conv_sandwich(middle: Middle | None = None, *, channels: int = CHANNELS, size: int = 8,
                  out_size: int | None = None, opset: int = OPSET, seed: int = 0,
                  conv1_bias: bool = True, constant_nodes: bool = False,
                  conv1_weight: np.ndarray | None = None) -> onnx.ModelProto:
    """Two convs around `middle` (none: conv1 feeds conv2 directly).

        x [N,3,S,S] -> Conv 'conv1' [C,3,3,3] -> <middle> -> Conv 'conv2' [5,C',3,3] -> y

    `middle` may change the channel count (C') or the spatial size (`out_size`, the size of y).
    """
    b = GraphBuilder(seed, opset, constant_nodes)
    t = b.conv("x", "conv1", 3, channels, bias=conv1_bias, weight=conv1_weight)
    t = middle(b, t, channels) if middle is not None else t
    in_channels = _channels_after(middle, channels)
    b.conv(t, "conv2", in_channels, 5)
    out = size if out_size is None else out_size
    return b.model([("x", ["N", 3, size, size])], [("conv2", ["N", 5, out, out])])


def _channels_after(middle: Middle | None, channels: int) -> int:
    return int(getattr(middle, "out_channels", channels))


def unary(op: str, **attrs: object) -> Middle:
    """    t -> <op>(attrs) -> """
    def middle(b: GraphBuilder, t: str, channels: int) -> str:
        return b.node(op, [t], op.lower(), **attrs)
    return middle


def relu_then(op: str, **attrs: object) -> Middle:
    """    t -> Relu 'relu' -> <op> -> """
    def middle(b: GraphBuilder, t: str, channels: int) -> str:
        return b.node(op, [b.node("Relu", [t], "relu")], op.lower(), **attrs)
    return middle


def prelu_per_channel(b: GraphBuilder, t: str, channels: int) -> str:
    """    t -> PRelu 'prelu' (slope 'slope' [C,1,1]) -> """
    slope = b.const("slope", b.rng.uniform(0.05, 0.5, (channels, 1, 1)))
    return b.node("PRelu", [t, slope], "prelu")


def clip_min_max(b: GraphBuilder, t: str, channels: int) -> str:
    """    t -> Clip 'clip' (min input -0.5, max input 0.75) -> """
    return b.node("Clip", [t, b.const("lo", np.float32(-0.5)), b.const("hi", np.float32(0.75))],
                  "clip")


def batchnorm(b: GraphBuilder, t: str, channels: int) -> str:
    """    t -> BatchNormalization 'bn' (scale, bias, mean, var [C]) -> Relu 'relu' -> """
    return b.node("Relu", [_bn(b, t, channels)], "relu")


def relu_batchnorm(b: GraphBuilder, t: str, channels: int) -> str:
    """    t -> Relu 'relu' -> BatchNormalization 'bn' -> """
    return _bn(b, b.node("Relu", [t], "relu"), channels)


def _bn(b: GraphBuilder, t: str, channels: int) -> str:
    params = [b.random("bn_scale", (channels,), positive=True),
              b.random("bn_bias", (channels,)),
              b.random("bn_mean", (channels,)),
              b.random("bn_var", (channels,), positive=True)]
    return b.node("BatchNormalization", [t, *params], "bn", epsilon=1e-5)


def instancenorm(b: GraphBuilder, t: str, channels: int) -> str:
    """    t -> InstanceNormalization 'inorm' (scale, bias [C]) -> """
    scale = b.random("in_scale", (channels,), positive=True)
    bias = b.random("in_bias", (channels,))
    return b.node("InstanceNormalization", [t, scale, bias], "inorm")


def arithmetic(op: str, shape: Sequence[int] | None, constant_first: bool = False) -> Middle:
    """    t -> <op> 'arith' with a constant 'k' (shape [C,1,1] if `shape` is (C,1,1), [] if None)
    -> Relu 'relu' ->

    The constant is positive (and away from zero) so that Div by it is safe.
    """
    def middle(b: GraphBuilder, t: str, channels: int) -> str:
        dims = () if shape is None else tuple(shape)
        k = b.const("k", b.rng.uniform(0.5, 2.0, dims).astype(np.float32))
        inputs = [k, t] if constant_first else [t, k]
        return b.node("Relu", [b.node(op, inputs, "arith")], "relu")
    return middle


def pow_cube(b: GraphBuilder, t: str, channels: int) -> str:
    """    t -> Pow 'arith' (exponent 3, as in GELU's tanh approximation) -> Relu 'relu' ->"""
    return b.node("Relu", [b.node("Pow", [t, b.const("k", np.float32(3.0))], "arith")], "relu")


def bias_add(b: GraphBuilder, t: str, channels: int) -> str:
    """Bias of a bias-free conv as a separate Add:  t -> Add 'bias' (const [C,1,1]) -> Relu ->"""
    k = b.random("bias_k", (channels, 1, 1))
    return b.node("Relu", [b.node("Add", [t, k], "bias")], "relu")


def pool(op: str) -> Middle:
    """    t -> Relu 'relu' -> <op> 'pool' (2x2, stride 2; spatial size halves) -> """
    def middle(b: GraphBuilder, t: str, channels: int) -> str:
        relu = b.node("Relu", [t], "relu")
        return b.node(op, [relu], "pool", kernel_shape=[2, 2], strides=[2, 2])
    return middle


def pad_spatial(b: GraphBuilder, t: str, channels: int) -> str:
    """    t -> Relu 'relu' -> Pad 'pad' (pads input [0,0,1,1,0,0,1,1], constant 0) -> """
    pads = b.const("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], dtype=np.int64))
    return b.node("Pad", [b.node("Relu", [t], "relu"), pads], "pad", mode="constant")


def pad_channels(b: GraphBuilder, t: str, channels: int) -> str:
    """Barrier:  t -> Pad 'pad' (pads one channel before and after: C -> C+2) -> """
    pads = b.const("pads", np.array([0, 1, 0, 0, 0, 1, 0, 0], dtype=np.int64))
    return b.node("Pad", [t, pads], "pad", mode="constant")


pad_channels.out_channels = CHANNELS + 2  # type: ignore[attr-defined]


def dropout(b: GraphBuilder, t: str, channels: int) -> str:
    """    t -> Dropout 'dropout' (inference: identity; mask output unused) -> Relu 'relu' ->"""
    return b.node("Relu", [b.node("Dropout", [t], "dropout", outputs=2)], "relu")


def depthwise(b: GraphBuilder, t: str, channels: int) -> str:
    """    t -> Conv 'dw' (group=C, weight [C,1,3,3], bias [C]) -> Relu 'relu' -> """
    return b.node("Relu", [b.conv(t, "dw", channels, channels, group=channels)], "relu")


def grouped_conv(b: GraphBuilder, t: str, channels: int) -> str:
    """C must be even:  t -> Conv 'gconv' (group=2, weight [6, C/2, 3, 3]) -> (t stays whole)"""
    return b.conv(t, "gconv", channels, 6, group=2)


grouped_conv.out_channels = 6  # type: ignore[attr-defined]


def softmax_channels(b: GraphBuilder, t: str, channels: int) -> str:
    """Barrier:  t -> Softmax 'softmax' (axis=1, over channels) -> """
    return b.node("Softmax", [t], "softmax", axis=1)


def lrn(b: GraphBuilder, t: str, channels: int) -> str:
    """Barrier (mixes neighbouring channels):  t -> LRN 'lrn' (size 3) -> """
    return b.node("LRN", [t], "lrn", size=3)


def duplicated_conv1_weight(channels: int = 8, seed: int = 1) -> np.ndarray:
    """conv1 weight [C,3,3,3] whose rows C/2.. are exactly 2 * rows 0..C/2-1."""
    rng = np.random.default_rng(seed)
    half = rng.standard_normal((channels // 2, 3, 3, 3)).astype(np.float32) / 5.0
    return np.concatenate([half, 2.0 * half])


def duplicate_channels() -> onnx.ModelProto:
    """Channels 4..7 of conv1 are exact copies (times 2) of channels 0..3; no bias:

        x [N,3,8,8] -> Conv 'conv1' [8,3,3,3] -> Identity 'identity' -> Conv 'conv2' -> y
    """
    return conv_sandwich(unary("Identity"), channels=8, conv1_bias=False,
                         conv1_weight=duplicated_conv1_weight())


# ----------------------------------------------------------------------------------------------
# residual block


def residual_block(channels: int = 6, seed: int = 0) -> onnx.ModelProto:
    """A ResNet basic block; conv0 and conv2 are coupled by the residual Add.

        x [N,3,8,8] -> Conv 'conv0' (C) -> Relu 'relu0' -> r0 --------------+
                                                  |                          |
                                                  +-> Conv 'conv1' (C) -> Relu 'relu1'
                                                      -> Conv 'conv2' (C) -> Add 'add'
                                                                              |
        y [N,4,8,8] <- Conv 'conv3' (4) <- Relu 'relu2' <----------------------+
    """
    b = GraphBuilder(seed)
    r0 = b.node("Relu", [b.conv("x", "conv0", 3, channels)], "relu0")
    r1 = b.node("Relu", [b.conv(r0, "conv1", channels, channels)], "relu1")
    added = b.node("Add", [b.conv(r1, "conv2", channels, channels), r0], "add")
    b.conv(b.node("Relu", [added], "relu2"), "conv3", channels, 4)
    return b.model([("x", ["N", 3, 8, 8])], [("conv3", ["N", 4, 8, 8])])


# ----------------------------------------------------------------------------------------------
# heads: conv features flattened into a Gemm


HEAD_SIZE = 4
"""Spatial size of the conv features in the head graphs (H = W = 4)."""


def flatten_head(kind: str, channels: int = CHANNELS, seed: int = 0) -> onnx.ModelProto:
    """Conv features [N,C,4,4] flattened into Gemm 'fc' (transB=1, 10 outputs):

        x [N,3,4,4] -> Conv 'conv1' -> Relu 'relu' -> <kind> -> Gemm 'fc' [10, F] -> y [N,10]

    kind:
      "flatten":   Flatten 'flatten' (axis 1); channel c owns features c*16 .. c*16+15
      "reshape":   Reshape 'reshape' to constant [-1, C*16] (the C*16 entry is rewritten)
      "transpose": Transpose 'transpose' (0,2,1,3) -> Reshape 'reshape' [0, -1]
                   (channel c owns the strided features h*C*4 + c*4 + w)
      "dynamic":   Shape 'shape' -> Gather 'gather' (0) -> Unsqueeze 'unsqueeze'
                   -> Concat 'concat' ([N], [-1]) -> Reshape 'reshape'  (torch's x.view(N, -1))
      "gap":       GlobalAveragePool 'pool' -> Flatten 'flatten' (F = C)
    """
    b = GraphBuilder(seed)
    t = b.node("Relu", [b.conv("x", "conv1", 3, channels)], "relu")
    features = channels * HEAD_SIZE * HEAD_SIZE
    if kind == "flatten":
        t = b.node("Flatten", [t], "flatten", axis=1)
    elif kind == "reshape":
        t = b.node("Reshape", [t, b.const("target", np.array([-1, features], np.int64))],
                   "reshape")
    elif kind == "transpose":
        t = b.node("Transpose", [t], "transpose", perm=[0, 2, 1, 3])
        t = b.node("Reshape", [t, b.const("target", np.array([0, -1], np.int64))], "reshape")
    elif kind == "dynamic":
        shape = b.node("Shape", [t], "shape")
        n = b.node("Gather", [shape, b.const("zero", np.array(0, np.int64))], "gather", axis=0)
        n = b.node("Unsqueeze", [n, b.const("axes0", np.array([0], np.int64))], "unsqueeze")
        target = b.node("Concat", [n, b.const("minus1", np.array([-1], np.int64))], "concat",
                        axis=0)
        t = b.node("Reshape", [t, target], "reshape")
    elif kind == "gap":
        t = b.node("Flatten", [b.node("GlobalAveragePool", [t], "pool")], "flatten", axis=1)
        features = channels
    else:
        raise ValueError(kind)
    b.gemm(t, "fc", features, 10)
    return b.model([("x", ["N", 3, HEAD_SIZE, HEAD_SIZE])], [("fc", ["N", 10])])


# ----------------------------------------------------------------------------------------------
# MLPs


def gemm_mlp(trans_b: int, hidden: int = 9, seed: int = 0) -> onnx.ModelProto:
    """    x [N,12] -> Gemm 'fc1' (transB) -> Relu 'relu' -> Gemm 'fc2' (transB) -> y [N,4]

    With trans_b=0, B is [in, out]; with trans_b=1, [out, in].
    """
    b = GraphBuilder(seed)
    t = b.node("Relu", [b.gemm("x", "fc1", 12, hidden, trans_b, positive_bias=True)], "relu")
    b.gemm(t, "fc2", hidden, 4, trans_b)
    return b.model([("x", ["N", 12])], [("fc2", ["N", 4])])


def matmul_mlp(rank: int, hidden: int = 9, seed: int = 0) -> onnx.ModelProto:
    """MatMul + Add bias layers on a 2-D [N,12] or 3-D [N,5,12] input:

        x -> MatMul 'mm1' (w [12,H]) -> Add 'add1' (b [H]) -> Relu 'relu'
          -> MatMul 'mm2' (w [H,4]) -> Add 'add2' (b [4]) -> y [N,(5,)4]
    """
    b = GraphBuilder(seed)
    lead: list[int | str] = ["N"] if rank == 2 else ["N", 5]
    t = b.node("MatMul", ["x", b.random("mm1_w", (12, hidden), fan_in=12)], "mm1")
    bias = b.random("add1_b", (hidden,), fan_in=4, positive=True)
    t = b.node("Relu", [b.node("Add", [t, bias], "add1")], "relu")
    t = b.node("MatMul", [t, b.random("mm2_w", (hidden, 4), fan_in=hidden)], "mm2")
    b.node("Add", [t, b.random("add2_b", (4,))], "add2")
    return b.model([("x", [*lead, 12])], [("add2", [*lead, 4])])


# ----------------------------------------------------------------------------------------------
# barriers that need their own graph


def concat_channels(seed: int = 0) -> onnx.ModelProto:
    """    x -> Conv 'conv1' (4) --+
                               +-> Concat 'concat' (axis 1) -> Conv 'conv2' (5) -> y
           x -> Conv 'conv1b' (4) +
    """
    b = GraphBuilder(seed)
    first = b.conv("x", "conv1", 3, 4)
    second = b.conv("x", "conv1b", 3, 4)
    b.conv(b.node("Concat", [first, second], "concat", axis=1), "conv2", 8, 5)
    return b.model([("x", ["N", 3, 8, 8])], [("conv2", ["N", 5, 8, 8])])


def split_halves_combined(seed: int = 0) -> onnx.ModelProto:
    """A magnitude as an STFT computes it: both halves of one Conv, channel by channel.

        x -> Conv 'conv1' (8) -> Split 'halves' (4, 4) -> re, im -> re*re + im*im
          -> Conv 'conv2' (5) -> y

    The Conv's 8 channels are a derived group whose two parts are the same base group.
    """
    b = GraphBuilder(seed)
    real, imaginary = (f"halves_out{index}" if index else "halves" for index in range(2))
    b.node("Split", [b.conv("x", "conv1", 3, 8)], "halves", outputs=2, axis=1)
    squares = [b.node("Mul", [half, half], f"square{index}")
               for index, half in enumerate((real, imaginary))]
    b.conv(b.node("Add", squares, "magnitude"), "conv2", 4, 5)
    return b.model([("x", ["N", 3, 8, 8])], [("conv2", ["N", 5, 8, 8])])


def conv_output_is_graph_output(seed: int = 0) -> onnx.ModelProto:
    """conv1's output is read by the next layer and is also a graph output 'conv1':

        x -> Conv 'conv1' (C) -> Relu 'relu' -> Conv 'conv2' (5) -> y
                 |
                 +-> graph output 'conv1' [N,C,8,8]
    """
    b = GraphBuilder(seed)
    b.conv(b.node("Relu", [b.conv("x", "conv1", 3, CHANNELS)], "relu"), "conv2", CHANNELS, 5)
    return b.model([("x", ["N", 3, 8, 8])],
                   [("conv2", ["N", 5, 8, 8]), ("conv1", ["N", CHANNELS, 8, 8])])


def matmul_of_activations(seed: int = 0) -> onnx.ModelProto:
    """Attention scores: q k^T, both activations.

        x [N,5,12] -> MatMul 'q' (w [12,6]) ----------------------------+
                   -> MatMul 'k' (w [12,6]) -> Transpose 'kt' (0,2,1) -> MatMul 'scores' -> y
    """
    b = GraphBuilder(seed)
    q = b.node("MatMul", ["x", b.random("q_w", (12, 6), fan_in=12)], "q")
    k = b.node("MatMul", ["x", b.random("k_w", (12, 6), fan_in=12)], "k")
    kt = b.node("Transpose", [k], "kt", perm=[0, 2, 1])
    b.node("MatMul", [q, kt], "scores")
    return b.model([("x", ["N", 5, 12])], [("scores", ["N", 5, 5])])
