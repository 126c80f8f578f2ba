"""Structures of real exported graphs (issue 3), end to end on tiny graphs.

Each graph of `tests.graphs_coverage` is analyzed and compressed at ratio 0.5; the compressed
model must pass the checker, run in ONNX Runtime with the original output names and shapes,
and have exactly the expected parameter shapes (kept channels of concatenations, rewritten
Split sizes and Slice ranges). Keeping every channel with a vanishing ridge must reproduce the
original outputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
import pytest

from onnx_spectral import compress
from onnx_spectral.analysis import analyze
from tests import graphs_coverage as coverage
from tests.test_ops import (
    CALIB,
    FAST,
    _by_producer,
    _check_runs_like,
    _constant,
    _data,
    _kept_channels,
    _node,
    _relative_error,
    _run,
    _with_outputs,
)


@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[], onnx.ModelProto]
    prunable: tuple[str, ...]
    frozen: Mapping[str, str] = field(default_factory=dict)
    shapes: Mapping[tuple[str, int], tuple[int, ...]] = field(default_factory=dict)
    values: Mapping[tuple[str, int], tuple[int, ...]] = field(default_factory=dict)
    """(node, input position) -> exact integer value of a rewritten shape/size constant."""


def _fire(opset: int) -> Case:
    return Case(f"fire-Concat-opset{opset}", lambda: coverage.fire(opset), ("sq", "e1", "e3"),
                {"head": "graph output"},
                {("sq", 1): (3, 3, 1, 1), ("e1", 1): (3, 3, 1, 1), ("e3", 1): (4, 3, 3, 3),
                 ("bn", 1): (7,), ("bn", 4): (7,), ("head", 1): (4, 7, 3, 3)})


def _c2f(opset: int, equal: bool) -> Case:
    pieces = (2, 2) if equal else (2, 3)
    return Case(f"C2f-Split-opset{opset}{'-equal' if equal else ''}",
                lambda: coverage.c2f(opset, equal), ("m",), {"cv2": "graph output"},
                {("cv1", 1): (sum(pieces), 3, 3, 3), ("m", 1): (pieces[1], pieces[1], 3, 3),
                 ("cv2", 1): (4, sum(pieces) + pieces[1], 3, 3)},
                {} if opset < 13 else {("split", 1): pieces})


def _slices(opset: int) -> Case:
    values = {} if opset < 10 else {("lo", 1): (0,), ("lo", 2): (2,), ("hi", 1): (2,),
                                    ("hi", 2): (5,)}
    return Case(f"channel-Slice-opset{opset}", lambda: coverage.channel_slices(opset), (),
                {"ha": "graph output", "hb": "graph output"},
                {("c1", 1): (5, 3, 3, 3), ("ha", 1): (4, 2, 3, 3), ("hb", 1): (4, 3, 3, 3)},
                values)


def _se(gate: str) -> Case:
    return Case(f"SE-{gate}", lambda: coverage.squeeze_excitation(gate), ("c1", "se2", "se1"),
                {"c2": "graph output"},
                {("c1", 1): (4, 3, 3, 3), ("se2", 1): (4, 2, 1, 1), ("se2", 2): (4,),
                 ("se1", 1): (2, 4, 1, 1), ("c2", 1): (5, 4, 3, 3)})


def _decoder(opset: int) -> Case:
    return Case(f"ConvTranspose-Resize-opset{opset}", lambda: coverage.decoder(opset),
                ("enc", "up"), {"out": "graph output"},
                {("enc", 1): (3, 3, 3, 3), ("up", 1): (3, 4, 2, 2), ("up", 2): (4,),
                 ("out", 1): (5, 4, 3, 3)})


def _ffn(activation: str) -> Case:
    return Case(f"FFN-{activation}", lambda: coverage.transformer_ffn(activation), ("ff1",),
                {"ff2": "carries no channel group"},
                {("ff1", 1): (12, 8), ("ff1_bias", 1): (8,), ("ff2", 1): (8, 12)})


CURRENT = onnx.defs.onnx_opset_version()
"""The newest opset this onnx release defines (28 for onnx 1.23)."""

CASES = [
    _fire(17), _fire(9), _fire(CURRENT),
    Case("dense-block-nested-Concat", coverage.dense_block, ("stem", "l1", "l2"),
         {"head": "graph output", "side": "graph output"},
         {("stem", 1): (3, 3, 3, 3), ("l1", 1): (2, 3, 3, 3), ("l2", 1): (2, 5, 3, 3),
          ("head", 1): (5, 7, 3, 3), ("side", 1): (3, 4, 3, 3)}),
    _c2f(17, False), _c2f(11, False), _c2f(18, True), _c2f(13, True), _c2f(CURRENT, True),
    _slices(17), _slices(9), _slices(CURRENT),
    _se("Sigmoid"), _se("HardSigmoid"), _se("HardSwish"),
    _decoder(17), _decoder(10), _decoder(9), _decoder(CURRENT),
    _ffn("Gelu"), _ffn("Erf"),
    Case("Reshape-hard-coded-channels", coverage.reshape_keeps_channels, ("c1",),
         {"fc": "graph output"}, {("c1", 1): (4, 3, 3, 3), ("fc", 1): (3, 4)},
         {("flat", 1): (0, 4, 64)}),
]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_structure_compresses_to_expected_shapes(case: Case) -> None:
    model = case.build()
    groups = _by_producer(analyze(model).groups)
    for producer in case.prunable:
        assert groups[producer].prunable, (producer, groups[producer].frozen)
    for producer, text in case.frozen.items():
        assert any(text in reason for reason in groups[producer].frozen), groups[producer].frozen
    compressed, report = compress(model, _data(model, 64, seed=1), ratio=0.5, **FAST)
    _check_runs_like(model, compressed, _data(model, 5, seed=2))
    for (node, position), shape in case.shapes.items():
        assert _constant(compressed, node, position).shape == shape, (node, position)
    for (node, position), value in case.values.items():
        assert tuple(_constant(compressed, node, position).tolist()) == value, (node, position)
    assert report.cost_after.params < report.cost_before.params


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_keeping_every_channel_reproduces_the_original(case: Case) -> None:
    model = case.build()
    compressed, _ = compress(model, _data(model, 64, seed=1), ratio=1.0, ridge=1e-9, **FAST)
    want, got = _check_runs_like(model, compressed, _data(model, 6, seed=3))
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4,
                                   atol=1e-4 * float(np.abs(want[name]).max()))


def test_concatenation_sink_gets_one_reconstruction_over_all_kept_channels() -> None:
    """head reads Relu(BN(Concat(e1, e3))): its weight absorbs A = Sigma[:, J] (Sigma[J, J] +
    lambda I)^-1 with J the kept channels of e1 and (offset 5) of e3 together."""
    model = coverage.fire()
    calib = _data(model, 64, seed=1)
    compressed, _ = compress(model, calib, ratio=0.5, ridge=1e-2, exclude=("sq",), **FAST)
    kept = np.concatenate([_kept_channels(model, compressed, "e1"),
                           5 + _kept_channels(model, compressed, "e3")])
    assert kept.size == 3 + 4
    probe = _with_outputs(model, ["rc"])
    rows = np.moveaxis(_run(probe, {"x": calib["x"][:CALIB]})["rc"].astype(np.float64), 1, -1)
    rows = rows.reshape(-1, 12)
    sigma = rows.T @ rows / rows.shape[0]
    ridge = 1e-2 * np.trace(sigma) / 12
    a = sigma[:, kept] @ np.linalg.inv(sigma[np.ix_(kept, kept)] + ridge * np.eye(kept.size))
    weight = _constant(model, "head", 1).astype(np.float64)
    expected = np.einsum("ofhw,fj->ojhw", weight, a)
    np.testing.assert_allclose(_constant(compressed, "head", 1), expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(_constant(compressed, "bn", 1),
                                  _constant(model, "bn", 1)[kept])


def test_group_feeding_several_concatenations_keeps_one_kept_set() -> None:
    """Half of every channel of stem, l1 and l2 are exact copies; keeping half of each group
    reproduces both outputs only if every concatenation sees the same kept channels."""
    model = coverage.dense_block(copies=True)
    compressed, _ = compress(model, _data(model, 64, seed=1), ratio=0.5, ridge=1e-9, **FAST)
    assert _constant(compressed, "head", 1).shape == (5, 3 + 2 + 2, 3, 3)
    want, got = _check_runs_like(model, compressed, _data(model, 6, seed=3))
    for name in want:
        assert _relative_error(got[name], want[name]) < 1e-3, name


def test_split_sizes_follow_the_kept_pieces_at_other_ratios() -> None:
    model = coverage.c2f(17)
    compressed, _ = compress(model, _data(model, 64, seed=1), ratio=0.25, **FAST)
    sizes = tuple(_constant(compressed, "split", 1).tolist())
    assert sizes == (math.ceil(0.25 * 3), math.ceil(0.25 * 5))
    assert _node(compressed, "split").op_type == "Split"
    _check_runs_like(model, compressed, _data(model, 3, seed=2))


def test_grouped_conv_reading_a_concatenation_is_frozen_with_its_reason() -> None:
    """x -> conv1 (4), conv1b (4) -> Concat (8) -> gconv (group 2) -> y: the lanes of gconv would
    have to stay balanced across the two parts, which are selected on their own."""
    from tests.graphs import GraphBuilder
    b = GraphBuilder(0)
    joined = b.node("Concat", [b.conv("x", "conv1", 3, 4), b.conv("x", "conv1b", 3, 4)],
                    "concat", axis=1)
    b.conv(joined, "gconv", 8, 6, group=2)
    model = b.model([("x", ["N", 3, 8, 8])], [("gconv", ["N", 6, 8, 8])])
    groups = analyze(model).groups
    concat = next(group for group in groups if group.parts)
    assert any("a grouped Conv reads a concatenation or split" in reason
               for reason in concat.frozen)
    assert all(not group.prunable for group in groups if group.producers != ("gconv",))


def test_negative_dim_value_is_read_as_dynamic() -> None:
    """Paddle exports write dim_value -1 for a dynamic axis (the PP-OCR classifier does)."""
    from tests import graphs
    model = graphs.conv_sandwich(graphs.unary("Relu"))
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = -1
    compressed, _ = compress(model, _data(model, 64, seed=1), ratio=0.5, **FAST)
    assert _constant(compressed, "conv1", 1).shape == (4, 3, 3, 3)
    _check_runs_like(model, compressed, _data(model, 3, seed=2))
