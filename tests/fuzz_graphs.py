"""Random CNN graphs for the property-based fuzzer (tests/test_fuzz.py), built with hypothesis.

A graph is a chain of blocks on an NCHW tensor, then a head:

    x [N, C0, H, W] -> Conv -> block -> block -> ... -> head -> y (+ side outputs)

Each block is a function `(draw, builder, state) -> None` that adds nodes after `state.tensor`
and updates `state` (tensor name, channel count, extra graph outputs). To cover a new op, write
one block function and add it to BLOCKS; the fuzzer draws blocks uniformly from that table.
Blocks that are barriers today (Concat, Split, graph outputs in the middle) stay in the table:
the property is that the tool prunes or freezes each group, whatever the graph holds.

Heads (HEADS): a conv, GAP -> Flatten -> Gemm or MatMul, or a recurrent layer (LSTM or GRU)
fed by the conv features as a sequence (`_sequence`), then its output, its last state, a Gemm
on the last state, a MatMul on each step, or a second recurrent layer.

Inputs that leave no common sample axis (`RUN_INPUTS`), drawn last: a scalar 'gain' that
scales x, or the initial state 'h0' [dirs, N, hidden] of the first recurrent layer (batch on
axis 1); such a model is fed one feed dict per run.

Each spatial dim of the input is static, symbolic (dim_param 'H'/'W') or unknown. Each graph
also draws a `Variant`, applied once the float32 graph is built: the opset (9 to 21; Split and
ReduceMean take their sizes/axes as attributes before 13/18), constants as initializers or
Constant nodes, float16 (weights and activations; inputs and outputs float16, or float32 with a
Cast after each input and before each output), and the IR-3 convention (ir_version 3, every
initializer also a graph input). One graph in five then runs inside both branches of an If on a
scalar input (`in_if`, Silero VAD's form), so that the whole model is pruned in the branch its
data takes. `canonical` undoes all but the opset.
`model.doc_string` describes what was drawn, one line, for the fuzzer's notes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from tests.graphs import GraphBuilder

OPSETS = (17, 9, 11, 13, 21)
"""Drawn opsets (examples shrink toward the first)."""
FLOAT16 = ("no", "io", "cast")
"""float32 model; float16 model with float16 inputs/outputs; float16 inside, float32 outside."""

Dim = int | str | None
"""A tensor dimension: static, symbolic (dim_param), or unknown."""
WIDTHS = st.integers(min_value=1, max_value=8)


@dataclass
class State:
    """The tensor the next block reads, its channel count, and the graph outputs so far."""

    tensor: str
    channels: int
    spatial: list[Dim]
    outputs: list[tuple[str, list[Dim]]] = field(default_factory=list)
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


def grouped(draw: st.DrawFn, b: GraphBuilder, s: State) -> None:
    """Grouped 3x3 conv of 2 or 3 groups (a 1x1 conv first when the width is not a multiple):
    its outputs go evenly from each group; what it reads stays whole."""
    groups = draw(st.sampled_from([2, 3]))
    if s.channels % groups:
        width = groups * draw(st.integers(min_value=1, max_value=3))
        s.tensor = _conv(b, s, s.tensor, s.channels, width, kernel=1)
        s.channels = width
    width = groups * draw(st.integers(min_value=1, max_value=3))
    s.tensor = _conv(b, s, s.tensor, s.channels, width, group=groups)
    s.channels = width


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


def _channel_axis(draw: st.DrawFn, b: GraphBuilder) -> int:
    """1, or -3 where the opset allows negative axes (11 on, for Concat and Split)."""
    return draw(st.sampled_from([1, -3] if b.opset >= 11 else [1]))


def concat(draw: st.DrawFn, b: GraphBuilder, s: State) -> None:
    """Two or three parts concatenated on the channel axis (1 or -3): convs of random widths
    from t, and maybe t itself (DenseNet)."""
    count = draw(st.integers(2, 3))
    dense = draw(st.integers(-1, count - 1))  # position of t itself, -1: none
    widths = [s.channels if index == dense else draw(WIDTHS) for index in range(count)]
    parts = [s.tensor if index == dense else _conv(b, s, s.tensor, s.channels, width)
             for index, width in enumerate(widths)]
    s.tensor = b.node("Concat", parts, s.name("concat"), axis=_channel_axis(draw, b))
    s.channels = sum(widths)


def _split_sizes(draw: st.DrawFn, b: GraphBuilder, channels: int) -> tuple[list[int], str]:
    """Part sizes (each >= 1) and how the Split gives them: 'sizes' (input from opset 13,
    attribute before), 'equal' (no sizes, equal parts; before opset 18) or 'num_outputs'
    (from opset 18)."""
    count = draw(st.integers(2, min(3, channels)))
    forms = ["sizes"]
    if channels % count == 0 and b.opset < 18:
        forms.append("equal")
    chunk = -(-channels // count)
    if b.opset >= 18 and channels - chunk * (count - 1) >= 1:
        forms.append("num_outputs")
    form = draw(st.sampled_from(forms))
    if form == "equal":
        return [channels // count] * count, form
    if form == "num_outputs":
        return [chunk] * (count - 1) + [channels - chunk * (count - 1)], form
    cuts = sorted(draw(st.sets(st.integers(1, channels - 1), min_size=count - 1,
                               max_size=count - 1)))
    return [end - start for start, end in zip([0, *cuts], [*cuts, channels], strict=True)], form


def split(draw: st.DrawFn, b: GraphBuilder, s: State) -> None:
    """Split the channels (axis 1 or -3) in two or three parts (widths >= 1); then a conv on
    each part, summed, or the parts (each through a conv or not) concatenated in reverse."""
    if s.channels < 2:
        return conv(draw, b, s)
    sizes, form = _split_sizes(draw, b, s.channels)
    name = s.name("split")
    attrs: dict[str, object] = {"axis": _channel_axis(draw, b)}
    inputs = [s.tensor]
    if form == "sizes" and b.opset >= 13:
        inputs.append(b.const(f"{name}_sizes", np.array(sizes, dtype=np.int64)))
    elif form == "sizes":
        attrs["split"] = sizes
    elif form == "num_outputs":
        attrs["num_outputs"] = len(sizes)
    b.node("Split", inputs, name, outputs=len(sizes), **attrs)
    parts = [name] + [f"{name}_out{index}" for index in range(1, len(sizes))]
    if draw(st.booleans()):
        width = draw(WIDTHS)
        total = _conv(b, s, parts[0], sizes[0], width)
        for part, size in zip(parts[1:], sizes[1:], strict=True):
            total = b.node("Add", [total, _conv(b, s, part, size, width)], s.name("add"))
        s.tensor, s.channels = total, width
        return None
    widths = [draw(st.sampled_from([size, draw(WIDTHS)])) for size in sizes]
    convs = [part if draw(st.booleans()) and width == size else _conv(b, s, part, size, width)
             for part, size, width in zip(parts, sizes, widths, strict=True)]
    s.tensor = b.node("Concat", convs[::-1], s.name("concat"), axis=1)
    s.channels = sum(widths)
    return None


def side_output(draw: st.DrawFn, b: GraphBuilder, s: State) -> None:
    """The current tensor also becomes a graph output."""
    if all(name != s.tensor for name, _ in s.outputs):
        s.outputs.append((s.tensor, ["N", s.channels, *s.spatial]))


BLOCKS: dict[str, Block] = {
    "conv": conv,
    "depthwise": depthwise,
    "grouped": grouped,
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


def _head(draw: st.DrawFn, b: GraphBuilder, s: State) -> tuple[str, list[Dim]]:
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


def _sequence(draw: st.DrawFn, b: GraphBuilder, s: State) -> tuple[str, int | str, int]:
    """The conv features as a sequence: (tensor, sequence length, features per step).

    positions: [N, C, H, W] -> Reshape [N, C, H*W] -> Transpose -> [H*W, N, C]; the Reshape's
    shape is [0, C, -1] or [0, 0, -1].
    columns (CRNN, H static): Transpose -> [W, N, C, H] -> Reshape -> [W, N, C*H].
    pooled (CRNN): ReduceMean over H -> [N, C, W] -> Transpose -> [W, N, C].
    (ONNX Runtime's CPU recurrent kernels refuse layout 1, batch first.)
    """
    height, width = s.spatial
    kind = draw(st.sampled_from(["positions", "columns", "pooled"]))
    if kind == "pooled":
        name = s.name("reducemean")
        if b.opset >= 18:
            b.node("ReduceMean", [s.tensor, b.const(f"{name}_axes", np.array([2], np.int64))],
                   name, keepdims=0)
        else:
            b.node("ReduceMean", [s.tensor], name, axes=[2], keepdims=0)
        moved = b.node("Transpose", [name], s.name("transpose"), perm=[2, 0, 1])
        return moved, width if isinstance(width, int) else "W", s.channels
    if kind == "columns" and isinstance(height, int):
        moved = b.node("Transpose", [s.tensor], s.name("transpose"), perm=[3, 0, 1, 2])
        name = s.name("reshape")
        shape = b.const(f"{name}_shape", np.array([0, 0, -1], dtype=np.int64))
        length = width if isinstance(width, int) else "W"
        return b.node("Reshape", [moved, shape], name), length, s.channels * height
    name = s.name("reshape")
    channels = draw(st.sampled_from([0, s.channels]))
    shape = b.const(f"{name}_shape", np.array([0, channels, -1], dtype=np.int64))
    flat = b.node("Reshape", [s.tensor, shape], name)
    steps = height * width if isinstance(height, int) and isinstance(width, int) else "S"
    return b.node("Transpose", [flat], s.name("transpose"), perm=[2, 0, 1]), steps, s.channels


def _rnn(draw: st.DrawFn, b: GraphBuilder, s: State, sequence: str, features: int
         ) -> tuple[str, int, int]:
    """An LSTM or GRU on `sequence` [S, N, features]: its name (Y [S, dirs, N, hidden] is the
    tensor of that name, Y_h [dirs, N, hidden] '<name>_out1'), dirs and hidden."""
    op = draw(st.sampled_from(["LSTM", "GRU"]))
    hidden = draw(WIDTHS)
    direction = draw(st.sampled_from(["forward", "reverse", "bidirectional"]))
    dirs = 2 if direction == "bidirectional" else 1
    gates = 4 if op == "LSTM" else 3
    name = s.name(op.lower())
    weights = [b.random(f"{name}_W", (dirs, gates * hidden, features), fan_in=features),
               b.random(f"{name}_R", (dirs, gates * hidden, hidden), fan_in=hidden),
               b.random(f"{name}_B", (dirs, 2 * gates * hidden), fan_in=4)]
    attrs: dict[str, object] = {"hidden_size": hidden, "direction": direction}
    if op == "GRU":
        attrs["linear_before_reset"] = draw(st.sampled_from([0, 1]))
    b.node(op, [sequence, *weights], name, outputs=2, **attrs)
    return name, dirs, hidden


def _steps(b: GraphBuilder, s: State, y: str) -> str:
    """Y [S, dirs, N, hidden] -> Transpose [S, N, dirs, hidden] -> Reshape [S, N, dirs*hidden]."""
    moved = b.node("Transpose", [y], s.name("transpose"), perm=[0, 2, 1, 3])
    name = s.name("reshape")
    return b.node("Reshape", [moved, b.const(f"{name}_shape", np.array([0, 0, -1], np.int64))],
                  name)


def _recurrent(draw: st.DrawFn, b: GraphBuilder, s: State) -> tuple[str, list[Dim]]:
    """LSTM or GRU over the conv features, then one of: its output Y; its last state Y_h;
    Gemm(Y_h as [N, dirs*hidden]); MatMul on each step of Y; a second LSTM/GRU on Y (its Y_h)."""
    sequence, length, features = _sequence(draw, b, s)
    name, dirs, hidden = _rnn(draw, b, s, sequence, features)
    last = f"{name}_out1"
    kind = draw(st.sampled_from(["sequence", "last", "gemm", "matmul", "stacked"]))
    if kind == "sequence":
        return name, [length, dirs, "N", hidden]
    if kind == "last":
        return last, [dirs, "N", hidden]
    width = draw(WIDTHS)
    if kind == "matmul":
        weight = b.random(f"{name}_proj", (dirs * hidden, width), fan_in=dirs * hidden)
        return b.node("MatMul", [_steps(b, s, name), weight], s.name("matmul")), [length, "N",
                                                                                 width]
    if kind == "stacked":
        second, dirs, hidden = _rnn(draw, b, s, _steps(b, s, name), dirs * hidden)
        return f"{second}_out1", [dirs, "N", hidden]
    batch_first = b.node("Transpose", [last], s.name("transpose"), perm=[1, 0, 2])
    flat = s.name("reshape")
    shape = b.const(f"{flat}_shape", np.array([0, -1], dtype=np.int64))
    b.node("Reshape", [batch_first, shape], flat)
    return b.gemm(flat, s.name("fc"), dirs * hidden, width), ["N", width]


HEADS = {"plain": _head, "recurrent": _recurrent}


def _scalar_gain(model: onnx.ModelProto) -> bool:
    """x -> Mul by a scalar graph input 'gain' -> what read x (in place)."""
    graph = model.graph
    for node in graph.node:
        node.input[:] = ["x_gained" if name == "x" else name for name in node.input]
    graph.node.insert(0, helper.make_node("Mul", ["x", "gain"], ["x_gained"], name="gain_x"))
    graph.input.append(helper.make_tensor_value_info("gain", TensorProto.FLOAT, []))
    return True


def _initial_state(model: onnx.ModelProto) -> bool:
    """The first LSTM/GRU reads its initial state from a graph input 'h0' [dirs, N, hidden]
    (in place); False when the graph has no recurrent layer."""
    graph = model.graph
    rnn = next((node for node in graph.node if node.op_type in ("LSTM", "GRU")), None)
    if rnn is None:
        return False
    attributes = {attribute.name: helper.get_attribute_value(attribute)
                  for attribute in rnn.attribute}
    dirs = 2 if attributes["direction"] == b"bidirectional" else 1
    hidden = attributes["hidden_size"]
    rnn.input[:] = [*rnn.input[:4], "", "h0"]
    graph.input.append(helper.make_tensor_value_info("h0", TensorProto.FLOAT,
                                                     [dirs, "N", hidden]))
    return True


RUN_INPUTS: dict[str, Callable[[onnx.ModelProto], bool]] = {
    "scalar gain": _scalar_gain, "initial state": _initial_state}


@dataclass(frozen=True)
class Variant:
    """How a built float32 graph is stored: see the module docstring."""

    opset: int = 17
    float16: str = "no"
    ir3: bool = False
    constant_nodes: bool = False


variants = st.builds(Variant, opset=st.sampled_from(OPSETS), float16=st.sampled_from(FLOAT16),
                     ir3=st.booleans(), constant_nodes=st.booleans())


def _to_float16(model: onnx.ModelProto, cast_io: bool) -> None:
    """Make every float32 constant and tensor float16 (in place); `cast_io`: keep float32
    inputs and outputs, with a Cast to float16 after each input and to float32 before each
    output."""
    graph = model.graph
    for index, tensor in enumerate(graph.initializer):
        if tensor.data_type == TensorProto.FLOAT:
            half = numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float16),
                                           tensor.name)
            graph.initializer[index].CopyFrom(half)
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.name == "value" and attribute.t.data_type == TensorProto.FLOAT:
                attribute.t.CopyFrom(numpy_helper.from_array(
                    numpy_helper.to_array(attribute.t).astype(np.float16), attribute.t.name))
    if not cast_io:
        for value in [*graph.input, *graph.output]:
            value.type.tensor_type.elem_type = TensorProto.FLOAT16
        return
    for value in graph.input:
        inner = f"{value.name}_f16"
        for node in graph.node:
            node.input[:] = [inner if name == value.name else name for name in node.input]
        graph.node.insert(0, helper.make_node("Cast", [value.name], [inner],
                                              name=f"cast_{inner}", to=TensorProto.FLOAT16))
    for value in graph.output:
        inner = f"{value.name}_f16"
        for node in graph.node:
            node.input[:] = [inner if name == value.name else name for name in node.input]
            node.output[:] = [inner if name == value.name else name for name in node.output]
        graph.node.append(helper.make_node("Cast", [inner], [value.name],
                                           name=f"cast_{value.name}", to=TensorProto.FLOAT))


def _as_ir3(model: onnx.ModelProto) -> None:
    """IR version 3, where every initializer is also listed in graph.input (in place)."""
    model.ir_version = 3
    for tensor in model.graph.initializer:
        model.graph.input.append(helper.make_tensor_value_info(
            tensor.name, tensor.data_type, list(tensor.dims)))


IF_NODE = "by_gate"
"""Name of the If `in_if` wraps a graph in."""


def in_if(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` run inside both branches of If 'by_gate' on a new scalar input 'gate' > 0 (as
    Silero VAD picks its network by the sample rate): the branches read the inputs and weights
    from the outer scope, and write the outputs under branch names."""
    graph = model.graph
    branches = {}
    for branch in ("then_branch", "else_branch"):
        writers = [helper.make_node("Identity", [value.name], [f"{value.name}_{branch}"],
                                    name=f"{value.name}_{branch}") for value in graph.output]
        outputs = [helper.make_value_info(f"{value.name}_{branch}", value.type)
                   for value in graph.output]
        branches[branch] = helper.make_graph([*graph.node, *writers], branch, [], outputs)
    nodes = [helper.make_node("Greater", ["gate", "gate_zero"], ["gate_open"], name="open"),
             helper.make_node("If", ["gate_open"], [value.name for value in graph.output],
                              name=IF_NODE, **branches)]
    del graph.node[:]
    graph.node.extend(nodes)
    graph.input.append(helper.make_tensor_value_info("gate", TensorProto.FLOAT, []))
    graph.initializer.append(numpy_helper.from_array(np.array(0.0, np.float32), "gate_zero"))
    if model.ir_version == 3:
        graph.input.append(helper.make_tensor_value_info("gate_zero", TensorProto.FLOAT, []))
    onnx.checker.check_model(model, full_check=True)
    return model


def _out_of_if(model: onnx.ModelProto) -> None:
    """Undo `in_if` (in place): the then-branch's nodes in the main graph again."""
    graph = model.graph
    wrapper = next((node for node in graph.node if node.name == IF_NODE), None)
    if wrapper is None:
        return
    body = next(attribute.g for attribute in wrapper.attribute if attribute.name == "then_branch")
    writers = len(graph.output)
    nodes = list(body.node[:len(body.node) - writers])
    del graph.node[:]
    graph.node.extend(nodes)
    extra = {"gate", "gate_zero"}
    for field_values in (graph.input, graph.initializer):
        kept = [value for value in field_values if value.name not in extra]
        del field_values[:]
        field_values.extend(kept)  # type: ignore[arg-type]


def apply_variant(model: onnx.ModelProto, variant: Variant) -> onnx.ModelProto:
    """`model` (built float32 at `variant.opset`) stored as `variant` asks; checked."""
    if variant.float16 != "no":
        _to_float16(model, cast_io=variant.float16 == "cast")
    if variant.ir3:
        _as_ir3(model)
    onnx.checker.check_model(model, full_check=True)
    return model


def canonical(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` (made by `cnn_graphs`) with its variant undone but for the opset:
    float32, constants as initializers, the current IR with only data inputs."""
    plain = onnx.ModelProto()
    plain.CopyFrom(model)
    _out_of_if(plain)
    graph = plain.graph
    for node in [node for node in graph.node if node.op_type == "Constant"]:
        graph.initializer.append(numpy_helper.from_array(
            numpy_helper.to_array(node.attribute[0].t), node.output[0]))
        graph.node.remove(node)
    for index, tensor in enumerate(graph.initializer):
        if tensor.data_type == TensorProto.FLOAT16:
            graph.initializer[index].CopyFrom(numpy_helper.from_array(
                numpy_helper.to_array(tensor).astype(np.float32), tensor.name))
    inputs = {value.name for value in graph.input}
    for node in [node for node in graph.node if node.name.startswith("cast_")]:
        old, new = ((node.output[0], node.input[0]) if node.input[0] in inputs
                    else (node.input[0], node.output[0]))
        graph.node.remove(node)
        for other in graph.node:
            other.input[:] = [new if name == old else name for name in other.input]
            other.output[:] = [new if name == old else name for name in other.output]
    constants = {tensor.name for tensor in graph.initializer}
    data = [value for value in graph.input if value.name not in constants]
    del graph.input[:]
    graph.input.extend(data)
    for value in [*graph.input, *graph.output]:
        value.type.tensor_type.elem_type = TensorProto.FLOAT
    plain.ir_version = onnx.IR_VERSION
    onnx.checker.check_model(plain, full_check=True)
    return plain


def unnamed(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` whose graph inputs and outputs have their symbolic dims other than the
    batch 'N' unknown (no dim_param)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for value in [*copy.graph.input, *copy.graph.output]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param") and dim.dim_param != "N":
                dim.ClearField("dim_param")
    return copy


@st.composite
def cnn_graphs(draw: st.DrawFn, max_blocks: int = 6, channel_cut: bool = False
               ) -> onnx.ModelProto:
    """A random checked CNN with a symbolic batch 'N' and a drawn `Variant`.

    `channel_cut`: the graph holds at least one Concat or Split on the channel axis.
    """
    variant = draw(variants)
    seed = draw(st.integers(min_value=0, max_value=2**16))
    b = GraphBuilder(seed, variant.opset, variant.constant_nodes)
    in_channels = draw(st.integers(min_value=1, max_value=4))
    spatial: list[Dim] = [draw(st.sampled_from([draw(st.integers(3, 6)), name, None]))
                          for name in ("H", "W")]
    s = State("x", in_channels, spatial)
    s.channels = draw(WIDTHS)
    s.tensor = _conv(b, s, "x", in_channels, s.channels)
    blocks = draw(st.lists(st.sampled_from(sorted(BLOCKS)), max_size=max_blocks))
    if channel_cut:
        blocks.insert(draw(st.integers(0, len(blocks))), draw(st.sampled_from(["concat",
                                                                                "split"])))
    for name in blocks:
        BLOCKS[name](draw, b, s)
    head = draw(st.sampled_from(sorted(HEADS)))
    output = HEADS[head](draw, b, s)
    outputs = [output, *[item for item in s.outputs if item[0] != output[0]]]
    model = b.model([("x", ["N", in_channels, *spatial])],  # type: ignore[list-item]
                    outputs)  # type: ignore[arg-type]
    extra = draw(st.sampled_from(["none", *RUN_INPUTS]))
    if extra == "none" or not RUN_INPUTS[extra](model):
        extra = "none"
    wrapped = draw(st.integers(0, 4)) == 0  # one graph in five runs inside an If
    model.doc_string = (f"{variant}; input [N, {in_channels}, {spatial[0]}, {spatial[1]}]; "
                        f"blocks {blocks}; head {head} -> {output[0]} {output[1]}; "
                        f"run inputs {extra}{', in if' if wrapped else ''}")
    model = apply_variant(model, variant)
    return in_if(model) if wrapped else model
