"""Random CNN graphs for the property-based fuzzer (tests/test_fuzz.py), built with hypothesis.

A graph is a chain of blocks on an NCHW tensor of fixed spatial size, then a head:

    x [N, C0, S, S] -> block -> block -> ... -> head -> y

Each block is a function `(draw, builder, state) -> None` that adds nodes after `state.tensor`
and updates `state` (tensor name, channel count, extra graph outputs). To cover a new op, write
one block function and add it to BLOCKS; the fuzzer draws blocks uniformly from that table.
Blocks that are barriers today (Concat, Split, graph outputs in the middle) stay in the table:
the property is that the tool prunes or freezes each group, whatever the graph holds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
from hypothesis import strategies as st

from tests.graphs import GraphBuilder

WIDTHS = st.integers(min_value=1, max_value=8)


@dataclass
class State:
    """The tensor the next block reads, its channel count, and the graph outputs so far."""

    tensor: str
    channels: int
    spatial: list[int | str]
    outputs: list[tuple[str, list[int | str]]] = field(default_factory=list)
    count: int = 0

    def name(self, kind: str) -> str:
        self.count += 1
        return f"{kind}{self.count}"


Block = Callable[[st.DrawFn, GraphBuilder, State], None]


def _conv(b: GraphBuilder, s: State, x: str, channels: int, width: int, kernel: int = 3,
          bias: bool = True, group: int = 1) -> str:
    return b.conv(x, s.name("conv"), channels, width, kernel=kernel, pad=kernel // 2,
                  bias=bias, group=group)


def conv(draw: st.DrawFn, b: GraphBuilder, s: State) -> None:
    """Dense conv (1x1 or 3x3, with or without bias) to a random width."""
    width = draw(WIDTHS)
    s.tensor = _conv(b, s, s.tensor, s.channels, width, kernel=draw(st.sampled_from([1, 3])),
                     bias=draw(st.booleans()))
    s.channels = width


def depthwise(draw: st.DrawFn, b: GraphBuilder, s: State) -> None:
    """Depthwise 3x3 conv: channel-wise, keeps the width."""
    s.tensor = _conv(b, s, s.tensor, s.channels, s.channels, group=s.channels)


def activation(draw: st.DrawFn, b: GraphBuilder, s: State) -> None:
    op = draw(st.sampled_from(["Relu", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid", "Elu"]))
    s.tensor = b.node(op, [s.tensor], s.name(op.lower()))


def batchnorm(draw: st.DrawFn, b: GraphBuilder, s: State) -> None:
    name = s.name("bn")
    c = s.channels
    s.tensor = b.node("BatchNormalization", [
        s.tensor, b.random(f"{name}_scale", (c,), positive=True), b.random(f"{name}_bias", (c,)),
        b.random(f"{name}_mean", (c,)), b.random(f"{name}_var", (c,), positive=True)], name)


def pool(draw: st.DrawFn, b: GraphBuilder, s: State) -> None:
    """3x3 stride-1 max or average pool with padding 1 (keeps the spatial size)."""
    op = draw(st.sampled_from(["MaxPool", "AveragePool"]))
    s.tensor = b.node(op, [s.tensor], s.name(op.lower()), kernel_shape=[3, 3],
                      pads=[1, 1, 1, 1], strides=[1, 1])


def channel_bias(draw: st.DrawFn, b: GraphBuilder, s: State) -> None:
    """Add or Mul with a per-channel constant [C, 1, 1]."""
    op = draw(st.sampled_from(["Add", "Mul"]))
    name = s.name(op.lower())
    constant = b.random(f"{name}_c", (s.channels, 1, 1), positive=op == "Mul")
    s.tensor = b.node(op, [s.tensor, constant], name)


def residual(draw: st.DrawFn, b: GraphBuilder, s: State) -> None:
    """t -> conv -> relu -> conv (same width) -> Add(t): couples the two widths."""
    inner = draw(WIDTHS)
    hidden = b.node("Relu", [_conv(b, s, s.tensor, s.channels, inner)], s.name("relu"))
    back = _conv(b, s, hidden, inner, s.channels)
    s.tensor = b.node("Add", [back, s.tensor], s.name("add"))


def branches(draw: st.DrawFn, b: GraphBuilder, s: State) -> None:
    """Two convs of the same width from t, summed."""
    width = draw(WIDTHS)
    left = _conv(b, s, s.tensor, s.channels, width, kernel=1)
    right = b.node("Relu", [_conv(b, s, s.tensor, s.channels, width)], s.name("relu"))
    s.tensor = b.node("Add", [left, right], s.name("add"))
    s.channels = width


def se_gate(draw: st.DrawFn, b: GraphBuilder, s: State) -> None:
    """Squeeze-excitation: t * sigmoid(conv(relu(conv(GAP(t)))))."""
    squeeze = draw(WIDTHS)
    pooled = b.node("GlobalAveragePool", [s.tensor], s.name("gap"))
    hidden = b.node("Relu", [_conv(b, s, pooled, s.channels, squeeze, kernel=1)],
                    s.name("relu"))
    gate = b.node("Sigmoid", [_conv(b, s, hidden, squeeze, s.channels, kernel=1)],
                  s.name("sigmoid"))
    s.tensor = b.node("Mul", [s.tensor, gate], s.name("gate"))


def concat(draw: st.DrawFn, b: GraphBuilder, s: State) -> None:
    """Two convs of random widths from t, concatenated on the channel axis."""
    widths = [draw(WIDTHS), draw(WIDTHS)]
    parts = [_conv(b, s, s.tensor, s.channels, width) for width in widths]
    s.tensor = b.node("Concat", parts, s.name("concat"), axis=1)
    s.channels = sum(widths)


def split(draw: st.DrawFn, b: GraphBuilder, s: State) -> None:
    """Split the channels in two (widths >= 1), a conv on each part, summed."""
    if s.channels < 2:
        return conv(draw, b, s)
    first = draw(st.integers(min_value=1, max_value=s.channels - 1))
    name = s.name("split")
    sizes = b.const(f"{name}_sizes", np.array([first, s.channels - first], dtype=np.int64))
    b.node("Split", [s.tensor, sizes], name, outputs=2, axis=1)
    width = draw(WIDTHS)
    left = _conv(b, s, name, first, width)
    right = _conv(b, s, f"{name}_out1", s.channels - first, width)
    s.tensor = b.node("Add", [left, right], s.name("add"))
    s.channels = width
    return None


def side_output(draw: st.DrawFn, b: GraphBuilder, s: State) -> None:
    """The current tensor also becomes a graph output."""
    if all(name != s.tensor for name, _ in s.outputs):
        s.outputs.append((s.tensor, ["N", s.channels, *s.spatial]))


BLOCKS: dict[str, Block] = {
    "conv": conv,
    "depthwise": depthwise,
    "activation": activation,
    "batchnorm": batchnorm,
    "pool": pool,
    "channel_bias": channel_bias,
    "residual": residual,
    "branches": branches,
    "se_gate": se_gate,
    "concat": concat,
    "split": split,
    "side_output": side_output,
}


def _head(draw: st.DrawFn, b: GraphBuilder, s: State) -> tuple[str, list[int | str]]:
    """Final layer: a conv output, or GAP -> Flatten -> Gemm, or GAP -> Flatten -> MatMul."""
    kind = draw(st.sampled_from(["conv", "gemm", "matmul"]))
    width = draw(WIDTHS)
    if kind == "conv":
        return _conv(b, s, s.tensor, s.channels, width), ["N", width, *s.spatial]
    flat = b.node("Flatten", [b.node("GlobalAveragePool", [s.tensor], s.name("gap"))],
                  s.name("flatten"))
    if kind == "gemm":
        return b.gemm(flat, s.name("fc"), s.channels, width), ["N", width]
    name = s.name("matmul")
    weight = b.random(f"{name}_w", (s.channels, width), fan_in=s.channels)
    return b.node("MatMul", [flat, weight], name), ["N", width]


@st.composite
def cnn_graphs(draw: st.DrawFn, max_blocks: int = 6) -> onnx.ModelProto:
    """A random checked CNN (opset 17): symbolic batch 'N', spatial size static or symbolic."""
    seed = draw(st.integers(min_value=0, max_value=2**16))
    b = GraphBuilder(seed)
    in_channels = draw(st.integers(min_value=1, max_value=4))
    spatial: list[int | str] = (["H", "W"] if draw(st.booleans())
                                else [draw(st.integers(min_value=3, max_value=6))] * 2)
    s = State("x", in_channels, spatial)
    s.channels = draw(WIDTHS)
    s.tensor = _conv(b, s, "x", in_channels, s.channels)
    for name in draw(st.lists(st.sampled_from(sorted(BLOCKS)), max_size=max_blocks)):
        BLOCKS[name](draw, b, s)
    output = _head(draw, b, s)
    outputs = [output, *[item for item in s.outputs if item[0] != output[0]]]
    return b.model([("x", ["N", in_channels, *spatial])], outputs)

