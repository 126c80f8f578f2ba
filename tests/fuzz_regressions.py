"""Smallest graphs of the failures the fuzzer (tests/test_fuzz.py) found, with their options.

Each entry of REGRESSIONS builds one graph; `test_fuzz.test_regression` runs the fuzzer's
properties (`check_case`) on it, marked xfail (not strict) with the failure while it is open:
once fixed it passes as a plain test, and its mark can go.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from tests.fuzz_graphs import Variant, apply_variant
from tests.graphs import GraphBuilder, conv_sandwich


def split_then_convs(opset: int = 17) -> onnx.ModelProto:
    """x [N,2,5,6] -> Conv 'conv1' (4) -> Split 'split' [1, 3] -> Conv 'conv2', Conv 'conv3'
    (3 each) -> Add 'add' -> Conv 'conv4' (2) -> y."""
    b = GraphBuilder(0, opset)
    t = b.conv("x", "conv1", 2, 4)
    sizes = np.array([1, 3], dtype=np.int64)
    if opset >= 13:
        b.node("Split", [t, b.const("sizes", sizes)], "split", outputs=2, axis=1)
    else:
        b.node("Split", [t], "split", outputs=2, axis=1, split=[1, 3])
    total = b.node("Add", [b.conv("split", "conv2", 1, 3), b.conv("split_out1", "conv3", 3, 3)],
                   "add")
    b.conv(total, "conv4", 3, 2)
    return b.model([("x", ["N", 2, 5, 6])], [("conv4", ["N", 2, 5, 6])])


def equal_split_concat() -> onnx.ModelProto:
    """x [N,1,3,3] -> Conv 'conv1' (2) -> Split 'split' (no sizes: two equal parts) -> Conv
    'conv2', Conv 'conv3' (1 each) -> Concat 'concat' (conv3, conv2) -> Conv 'conv4' (1) -> y."""
    b = GraphBuilder(0)
    t = b.conv("x", "conv1", 1, 2)
    b.node("Split", [t], "split", outputs=2, axis=1)
    joined = b.node("Concat", [b.conv("split_out1", "conv3", 1, 1), b.conv("split", "conv2", 1, 1)],
                    "concat", axis=1)
    b.conv(joined, "conv4", 2, 1)
    return b.model([("x", ["N", 1, 3, 3])], [("conv4", ["N", 1, 3, 3])])


def shapeless_concat_se() -> onnx.ModelProto:
    """Opset 9 with Concat axis -3 (negative axes came in opset 11, but the checker and ONNX
    Runtime accept it; ONNX shape inference then gives the Concat and all after it no shape):
    x [N,1,3,3] -> Conv 'conv1' (3) -> Conv 'conv2', 'conv3' (2 each) -> Concat 'concat' ->
    squeeze-excitation (GlobalAveragePool 'gap' -> Conv 'squeeze' (1) -> Conv 'excite' (4) ->
    Sigmoid 'sigmoid' -> Mul 'gate') -> Conv 'conv4' (1) -> y."""
    b = GraphBuilder(0, 9)
    t = b.conv("x", "conv1", 1, 3)
    joined = b.node("Concat", [b.conv(t, "conv2", 3, 2), b.conv(t, "conv3", 3, 2)], "concat",
                    axis=-3)
    hidden = b.conv(b.node("GlobalAveragePool", [joined], "gap"), "squeeze", 4, 1, kernel=1,
                    pad=0)
    gate = b.node("Sigmoid", [b.conv(hidden, "excite", 1, 4, kernel=1, pad=0)], "sigmoid")
    b.conv(b.node("Mul", [joined, gate], "gate"), "conv4", 4, 1)
    return b.model([("x", ["N", 1, 3, 3])], [("conv4", ["N", 1, 3, 3])])


def ir3_sandwich(constant_nodes: bool = False) -> onnx.ModelProto:
    """tests.graphs.conv_sandwich (conv1 -> conv2) at IR 3: initializers also graph inputs, or
    (`constant_nodes`) no initializer at all, the weights in Constant nodes."""
    return apply_variant(conv_sandwich(constant_nodes=constant_nodes), Variant(ir3=True))


def ir3_gap_gemm() -> onnx.ModelProto:
    """IR 3, weights in Constant nodes: x [N,3,4,4] -> Conv 'conv1' (6) -> GlobalAveragePool
    'gap' -> Flatten 'flatten' -> Gemm 'fc' (2) -> y."""
    b = GraphBuilder(0, 17, constant_nodes=True)
    t = b.conv("x", "conv1", 3, 6)
    flat = b.node("Flatten", [b.node("GlobalAveragePool", [t], "gap")], "flatten")
    b.gemm(flat, "fc", 6, 2)
    return apply_variant(b.model([("x", ["N", 3, 4, 4])], [("fc", ["N", 2])]),
                         Variant(ir3=True))


def concat_symbolic_spatial() -> onnx.ModelProto:
    """x [N,2,'H','W'] -> Conv 'conv1' (4) -> Conv 'conv2' (3), Conv 'conv3' (2) -> Concat
    'concat' -> Conv 'conv4' (1) -> y: no Conv has static MACs."""
    b = GraphBuilder(0)
    t = b.conv("x", "conv1", 2, 4)
    joined = b.node("Concat", [b.conv(t, "conv2", 4, 3), b.conv(t, "conv3", 4, 2)], "concat",
                    axis=1)
    b.conv(joined, "conv4", 5, 1)
    return b.model([("x", ["N", 2, "H", "W"])], [("conv4", ["N", 1, "H", "W"])])


def unknown_height() -> onnx.ModelProto:
    """x [N,3,?,5] (height unknown: no dim_value, no dim_param) -> Conv 'conv1' (4) -> Conv
    'conv2' (2) -> y [N,2,?,5]."""
    b = GraphBuilder(0)
    b.conv(b.conv("x", "conv1", 3, 4), "conv2", 4, 2)
    return b.model([("x", ["N", 3, None, 5])], [("conv2", ["N", 2, None, 5])])  # type: ignore[list-item]


def side_concat_gru(width: int | str | None) -> onnx.ModelProto:
    """x [N,2,6,width] -> Conv 'conv1' (3, also a graph output [N,3,6,width]) -> Conv 'conv2'
    (4) -> Concat 'concat' (conv1, conv2) -> Reshape 'reshape' [0, 7, -1] -> Transpose ->
    [6*W, N, 7] -> GRU 'gru' (hidden 3) -> Y_h 'gru_out1' -> y."""
    b = GraphBuilder(0)
    t = b.conv("x", "conv1", 2, 3)
    joined = b.node("Concat", [t, b.conv(t, "conv2", 3, 4)], "concat", axis=1)
    flat = b.node("Reshape", [joined, b.const("shape", np.array([0, 7, -1], np.int64))],
                  "reshape")
    sequence = b.node("Transpose", [flat], "transpose", perm=[2, 0, 1])
    b.node("GRU", [sequence, b.random("W", (1, 9, 7), fan_in=7),
                   b.random("R", (1, 9, 3), fan_in=3), b.random("B", (1, 18))],
           "gru", outputs=2, hidden_size=3)
    dims: list[Any] = ["N", 3, 6, width]  # GraphBuilder.model also takes None: unknown
    return b.model([("x", ["N", 2, 6, *dims[3:]])], [("gru_out1", [1, "N", 3]),
                                                     ("conv1", dims)])


def conv_lstm(op: str = "LSTM") -> onnx.ModelProto:
    """x [N,2,3,4] -> Conv 'conv1' (5) -> Reshape [0, 5, -1] -> Transpose -> [12, N, 5] ->
    LSTM/GRU 'rnn' (hidden 3) -> Y_h 'rnn_out1' [1, N, 3] -> y."""
    b = GraphBuilder(0)
    t = b.conv("x", "conv1", 2, 5)
    flat = b.node("Reshape", [t, b.const("shape", np.array([0, 5, -1], np.int64))], "reshape")
    sequence = b.node("Transpose", [flat], "transpose", perm=[2, 0, 1])
    gates = 4 if op == "LSTM" else 3
    b.node(op, [sequence, b.random("W", (1, gates * 3, 5), fan_in=5),
                b.random("R", (1, gates * 3, 3), fan_in=3), b.random("B", (1, 6 * gates))],
           "rnn", outputs=2, hidden_size=3)
    return b.model([("x", ["N", 2, 3, 4])], [("rnn_out1", [1, "N", 3])])


@dataclass(frozen=True)
class Regression:
    """A fuzzer failure: its graph, the options that failed, and the failure while open."""

    name: str
    build: Callable[[], onnx.ModelProto]
    options: dict[str, Any]
    failure: str | None = None
    """What fails, where (None: fixed)."""
    same_groups_as: Callable[[], onnx.ModelProto] | None = None
    """A graph that must give the same groups and widths under `options`."""


REGRESSIONS = (
    Regression("split_flops", split_then_convs, {"flops": 0.5, "allocation": "uniform"}),
    Regression("split_params_opset11", lambda: split_then_convs(11),
               {"params": 0.5, "allocation": "greedy"}),
    Regression("equal_split_flops", equal_split_concat,
               {"flops": 0.25, "allocation": "uniform"}),
    Regression("ir3_initializer_inputs", ir3_sandwich, {"ratio": 0.5}),
    Regression("ir3_constant_nodes", lambda: ir3_sandwich(constant_nodes=True), {"ratio": 0.5}),
    Regression("ir3_constant_nodes_flatten", ir3_gap_gemm, {"ratio": 0.5}),
    Regression("flops_symbolic_spatial", concat_symbolic_spatial,
               {"flops": 0.5, "allocation": "greedy"}),
    Regression("unknown_output_dim", unknown_height, {"ratio": 0.5}),
    Regression("shapeless_tap", shapeless_concat_se, {"flops": 0.75, "allocation": "uniform"}),
    Regression("reshape_symbolic_width", lambda: side_concat_gru("W"), {"ratio": 0.5},
               same_groups_as=lambda: side_concat_gru(5)),
    Regression("conv_lstm", conv_lstm, {"ratio": 0.5}),
    Regression("conv_gru_flops", lambda: conv_lstm("GRU"), {"flops": 0.5, "allocation": "dof"}),
)
