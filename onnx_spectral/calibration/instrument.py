"""In-graph statistics taps: the model returns per-batch Gram matrices, not activations.

For every tap tensor T with m channels on axis a, the instrumented model computes the
channel-first rows `Y = reshape(transpose(T, a -> first), [m, -1])` ([m, P], P = positions x
batch), the channel sums `sum(Y, axis=1)` ([m]), `shape(Y)` ([2], whose second entry counts the
samples) and the Gram matrix `Y Y^T` ([m, m]) by upper blocks: one Split cuts the channels
into `b` blocks `Y_i` and block `(i, j)`, `j >= i`, is `Y_i Y_j^T`, so only the upper triangle
(and the diagonal blocks) is multiplied, `(b + 1) / (2 b)` of the full product's multiply-adds,
and Y is copied once whatever `b`. The host mirrors it to the full symmetric matrix
(`assemble_gram`). Only about m x m / 2 floats per tap leave the runtime, whatever the batch
and spatial size.

A tap may get a position stride s (see `tap_cost.gram_strides`): an [N, C, H, W] tap with static
H, W then keeps a grid of positions, every s_h-th row and s_w-th column (s_h s_w >= s), taken
first by a 1x1 MaxPool with strides (ONNX Runtime runs it in its blocked layout, so nothing
copies the whole tensor); any other tap keeps every s-th column of Y (opset 10 and later).
`TapOutputs.stride` records the stride used; the sums and the count cover exactly the kept
positions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnx_spectral.analysis import Tap
from onnx_spectral.graph.model import GraphIndex, opset_version

_PREFIX = "onnx_spectral_tap"
#: Target channels per Gram block row, and the most block rows per tap.
BLOCK_CHANNELS = 128
MAX_BLOCKS = 8


@dataclass(frozen=True)
class GramBlock:
    """Output `name` holds Gram rows `rows[0]:rows[1]`, columns `columns[0]:columns[1]`."""

    name: str
    rows: tuple[int, int]
    columns: tuple[int, int]

    @property
    def shape(self) -> list[int]:
        return [self.rows[1] - self.rows[0], self.columns[1] - self.columns[0]]


@dataclass(frozen=True)
class TapOutputs:
    """The instrumented model's output names for the tap on `tensor`."""

    tensor: str
    channels: int
    blocks: tuple[GramBlock, ...]
    total: str
    shape: str
    stride: int = 1
    """Every `stride`-th position is counted."""


@dataclass(frozen=True)
class Instrumented:
    """A copy of the model whose only outputs are the taps' statistics."""

    model: onnx.ModelProto
    taps: tuple[TapOutputs, ...]


def gram_blocks(m: int) -> list[tuple[int, int]]:
    """Channel blocks [start, stop) of an m-channel tap: ceil(m / 128) blocks, at most 8."""
    count = min(MAX_BLOCKS, max(1, math.ceil(m / BLOCK_CHANNELS)))
    return [(i * m // count, (i + 1) * m // count) for i in range(count)]


def assemble_gram(channels: int, blocks: Sequence[tuple[GramBlock, np.ndarray]]) -> np.ndarray:
    """Full symmetric [m, m] float64 Gram from its upper blocks (each `block.shape`)."""
    upper = np.zeros((channels, channels), dtype=np.float64)
    for block, value in blocks:
        upper[block.rows[0]:block.rows[1], block.columns[0]:block.columns[1]] = value
    return np.triu(upper) + np.triu(upper, 1).T


def _value_type(graph: GraphIndex, tensor: str) -> int:
    for value in (*graph.model.graph.input, *graph.model.graph.value_info,
                  *graph.model.graph.output):
        if value.name == tensor:
            return int(value.type.tensor_type.elem_type)
    return TensorProto.FLOAT


def _pooling_grid(graph: GraphIndex, tap: Tap, stride: int) -> tuple[int, int] | None:
    """Row and column steps ``(s_h, s_w)`` with ``s_h * s_w >= stride``, as square as the map
    allows, for an ``[N, C, H, W]`` tap with static H, W (None otherwise, or for stride 1).

    The subsample is then a ``MaxPool`` with a 1x1 kernel: ONNX Runtime runs it in its blocked
    channel layout, so only the kept positions are reordered and transposed afterwards.
    """
    dims = graph.shapes.get(tap.tensor)
    if stride <= 1 or dims is None or len(dims) != 4 or tap.axis != 1:
        return None
    height, width = dims[2], dims[3]
    if height is None or width is None:
        return None
    rows = min(height, math.ceil(math.sqrt(stride)))
    columns = min(width, math.ceil(stride / rows))
    return min(height, math.ceil(stride / columns)), columns  # a narrow map: taller steps


def _tap_nodes(graph: GraphIndex, tap: Tap, index: int, opset: int, stride: int
               ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto], TapOutputs]:
    prefix = f"{_PREFIX}{index}_"
    rank = graph.rank(tap.tensor)
    assert rank is not None
    nodes: list[onnx.NodeProto] = []
    current = tap.tensor
    if _value_type(graph, tap.tensor) != TensorProto.FLOAT:
        nodes.append(helper.make_node("Cast", [current], [prefix + "float"], to=TensorProto.FLOAT))
        current = prefix + "float"
    grid = _pooling_grid(graph, tap, stride)
    if grid is not None:  # subsample before anything copies the whole tensor
        nodes.append(helper.make_node("MaxPool", [current], [prefix + "pooled"],
                                      kernel_shape=[1, 1], strides=list(grid)))
        current = prefix + "pooled"
    if tap.axis != 0:
        perm = [tap.axis] + [i for i in range(rank) if i != tap.axis]
        nodes.append(helper.make_node("Transpose", [current], [prefix + "first"], perm=perm))
        current = prefix + "first"
    shape_const = numpy_helper.from_array(np.array([tap.channels, -1], dtype=np.int64),
                                          prefix + "rows_shape")
    rows = prefix + "rows"
    nodes.append(helper.make_node("Reshape", [current, shape_const.name], [rows]))
    initializers = [shape_const]
    sliced = stride > 1 and grid is None and opset >= 10  # Slice has steps from opset 10
    if sliced:
        steps = [numpy_helper.from_array(np.array([value], dtype=np.int64), f"{prefix}{label}")
                 for label, value in (("s0", 0), ("s1", np.iinfo(np.int64).max), ("s2", 1),
                                      ("s3", stride))]
        initializers.extend(steps)
        nodes.append(helper.make_node("Slice", [rows, *(t.name for t in steps)],
                                      [prefix + "strided"]))
        rows = prefix + "strided"
    spans = gram_blocks(tap.channels)
    parts = [rows] if len(spans) == 1 else _split(nodes, initializers, rows, spans, prefix, opset)
    operands_c = []
    if opset < 11:  # Gemm's C is optional from opset 11 on
        zero = numpy_helper.from_array(np.zeros((), dtype=np.float32), prefix + "zero")
        initializers.append(zero)
        operands_c.append(zero.name)
    blocks = []
    for i, first in enumerate(parts):
        for j in range(i, len(parts)):
            name = f"{prefix}gram{i}_{j}"
            nodes.append(helper.make_node("Gemm", [first, parts[j], *operands_c], [name],
                                          transB=1))
            blocks.append(GramBlock(name, spans[i], spans[j]))
    outputs = TapOutputs(tap.tensor, tap.channels, tuple(blocks), prefix + "sum",
                         prefix + "shape",
                         grid[0] * grid[1] if grid is not None else stride if sliced else 1)
    if opset >= 13:
        axes = numpy_helper.from_array(np.array([1], dtype=np.int64), prefix + "axes")
        initializers.append(axes)
        nodes.append(helper.make_node("ReduceSum", [rows, axes.name], [outputs.total],
                                      keepdims=0))
    else:
        nodes.append(helper.make_node("ReduceSum", [rows], [outputs.total], axes=[1],
                                      keepdims=0))
    nodes.append(helper.make_node("Shape", [rows], [outputs.shape]))
    return nodes, initializers, outputs


def _split(nodes: list[onnx.NodeProto], initializers: list[onnx.TensorProto], rows: str,
           spans: Sequence[tuple[int, int]], prefix: str, opset: int) -> list[str]:
    """Split the [m, P] tensor `rows` along the channels into the blocks `spans`."""
    names = [f"{prefix}part{i}" for i in range(len(spans))]
    sizes = [stop - start for start, stop in spans]
    if opset < 13:  # split sizes are an attribute before opset 13
        nodes.append(helper.make_node("Split", [rows], names, axis=0, split=sizes))
        return names
    split = numpy_helper.from_array(np.array(sizes, dtype=np.int64), prefix + "split")
    initializers.append(split)
    nodes.append(helper.make_node("Split", [rows, split.name], names, axis=0))
    return names


def instrument(graph: GraphIndex, taps: Sequence[Tap],
               strides: Mapping[str, int] | None = None) -> Instrumented:
    """Copy of `graph.model` whose outputs are the Gram blocks/sum/shape of every tap tensor.

    `strides`: position stride per tap tensor (default 1). An [N, C, H, W] tap with static H, W
    keeps a grid of positions (`_pooling_grid`, in every sample); another tap every stride-th
    position of its flattened (batch x positions) axis, from opset 10 on (Slice steps; below it
    such a tap keeps every position).
    """
    model = onnx.ModelProto()
    model.CopyFrom(graph.model)
    opset = opset_version(model)
    del model.graph.output[:]
    outputs = []
    for index, tap in enumerate(taps):
        stride = (strides or {}).get(tap.tensor, 1)
        nodes, initializers, names = _tap_nodes(graph, tap, index, opset, stride)
        model.graph.node.extend(nodes)
        model.graph.initializer.extend(initializers)
        model.graph.output.extend([
            *(helper.make_tensor_value_info(block.name, TensorProto.FLOAT, block.shape)
              for block in names.blocks),
            helper.make_tensor_value_info(names.total, TensorProto.FLOAT, [tap.channels]),
            helper.make_tensor_value_info(names.shape, TensorProto.INT64, [2]),
        ])
        outputs.append(names)
    return Instrumented(model, tuple(outputs))

