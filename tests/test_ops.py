"""Op handlers end to end on tiny graphs: analysis -> compress -> checker -> ONNX Runtime.

For every op in scope (SPEC sections 1 and 4) a tiny graph (tests/graphs.py) is analyzed and
compressed at ratio 0.5 on random calibration data. The tests assert which groups are prunable
and why the others are frozen, that the output passes the checker and runs in ONNX Runtime
with the original output names and shapes, the exact sizes of every sliced or folded
parameter, and that keeping every channel with a vanishing ridge reproduces the original.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from onnx_spectral import compress
from onnx_spectral.analysis import ChannelGroup, analyze
from onnx_spectral.graph.model import attributes
from tests import graphs
from tests.graphs import CHANNELS, HEAD_SIZE

KEPT = math.ceil(0.5 * CHANNELS)  # 4 of 7
CALIB = 48
VERIFY = 16
#: Without the layer refit: these tests check the reconstruction folded into each sink.
FAST = {"provider": "cpu", "calib_samples": CALIB, "verify_samples": VERIFY, "batch_size": 32,
        "refit": False}

Shapes = Mapping[tuple[str, int], tuple[int, ...]]
"""(node name, input position) -> shape of that constant input after compression at 0.5."""


@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[], onnx.ModelProto]
    prunable: tuple[str, ...]
    """Producer nodes whose group must be prunable."""
    frozen: Mapping[str, str] = field(default_factory=dict)
    """Producer node -> text that one of its group's frozen reasons must contain."""
    shapes: Shapes = field(default_factory=dict)


def _sandwich_shapes(channels: int = CHANNELS, **extra: tuple[int, ...]) -> dict:
    """conv1 keeps ceil(C/2) rows, conv2 reads that many input channels."""
    kept = math.ceil(0.5 * channels)
    shapes = {("conv1", 1): (kept, 3, 3, 3), ("conv1", 2): (kept,), ("conv2", 1): (5, kept, 3, 3),
              ("conv2", 2): (5,)}
    for key, shape in extra.items():
        node, position = key.rsplit("_", 1)
        shapes[(node, int(position))] = shape
    return shapes


OUTPUT_FROZEN = {"conv2": "graph output"}


def _sandwich(case_id: str, middle: graphs.Middle | None, opset: int = 17,
              **extra: tuple[int, ...]) -> Case:
    return Case(case_id, lambda: graphs.conv_sandwich(middle, opset=opset), ("conv1",),
                OUTPUT_FROZEN, _sandwich_shapes(**extra))


def _pooled(op: str) -> Case:
    size = 4  # 8x8 pooled 2x2
    return Case(op, lambda: graphs.conv_sandwich(graphs.pool(op), out_size=size), ("conv1",),
                OUTPUT_FROZEN, _sandwich_shapes())


def _head(kind: str, features_per_channel: int = HEAD_SIZE * HEAD_SIZE,
          **extra: tuple[int, ...]) -> Case:
    shapes = {("conv1", 1): (KEPT, 3, 3, 3), ("conv1", 2): (KEPT,),
              ("fc", 1): (10, KEPT * features_per_channel), ("fc", 2): (10,)}
    for key, shape in extra.items():
        node, position = key.rsplit("_", 1)
        shapes[(node, int(position))] = shape
    return Case(f"head-{kind}", lambda: graphs.flatten_head(kind), ("conv1",),
                {"fc": "graph output"}, shapes)


HIDDEN = 9
KEPT_HIDDEN = math.ceil(0.5 * HIDDEN)  # 5 of 9

CASES = [
    _sandwich("conv-conv", None),
    _sandwich("Relu", graphs.unary("Relu")),
    _sandwich("LeakyRelu", graphs.unary("LeakyRelu", alpha=0.1)),
    _sandwich("Sigmoid", graphs.unary("Sigmoid")),
    _sandwich("HardSigmoid", graphs.unary("HardSigmoid", alpha=0.3, beta=0.4)),
    _sandwich("HardSwish", graphs.unary("HardSwish")),
    _sandwich("Tanh", graphs.unary("Tanh")),
    _sandwich("Elu", graphs.unary("Elu")),
    _sandwich("Softplus", graphs.unary("Softplus")),
    _sandwich("Erf", graphs.unary("Erf")),
    _sandwich("Gelu-opset20", graphs.unary("Gelu"), opset=20),
    _sandwich("Softmax-over-width", graphs.unary("Softmax", axis=-1)),
    _sandwich("LogSoftmax-over-height", graphs.unary("LogSoftmax", axis=2)),
    _sandwich("Softmax-opset11-from-height", graphs.unary("Softmax", axis=2), opset=11),
    _sandwich("Identity", graphs.unary("Identity")),
    _sandwich("Dropout", graphs.dropout),
    _sandwich("Clip-min-max", graphs.clip_min_max),
    _sandwich("PRelu-per-channel", graphs.prelu_per_channel, prelu_1=(KEPT, 1, 1)),
    _sandwich("BatchNorm", graphs.batchnorm, bn_1=(KEPT,), bn_2=(KEPT,), bn_3=(KEPT,),
              bn_4=(KEPT,)),
    _sandwich("Relu-BatchNorm", graphs.relu_batchnorm, bn_1=(KEPT,), bn_2=(KEPT,),
              bn_3=(KEPT,), bn_4=(KEPT,)),
    _sandwich("InstanceNorm", graphs.instancenorm, inorm_1=(KEPT,), inorm_2=(KEPT,)),
    _sandwich("Add-per-channel", graphs.arithmetic("Add", (CHANNELS, 1, 1)),
              arith_1=(KEPT, 1, 1)),
    _sandwich("Mul-per-channel", graphs.arithmetic("Mul", (CHANNELS, 1, 1)),
              arith_1=(KEPT, 1, 1)),
    _sandwich("Sub-per-channel-constant-first",
              graphs.arithmetic("Sub", (CHANNELS, 1, 1), constant_first=True),
              arith_0=(KEPT, 1, 1)),
    _sandwich("Div-per-channel", graphs.arithmetic("Div", (CHANNELS, 1, 1)),
              arith_1=(KEPT, 1, 1)),
    _sandwich("Add-scalar", graphs.arithmetic("Add", None), arith_1=()),
    _sandwich("Mul-scalar", graphs.arithmetic("Mul", None), arith_1=()),
    _sandwich("Sub-scalar", graphs.arithmetic("Sub", None), arith_1=()),
    _sandwich("Div-scalar", graphs.arithmetic("Div", None), arith_1=()),
    _sandwich("Pow-cube", graphs.pow_cube, arith_1=()),
    _sandwich("Mul-broadcast-[1,C,1,1]", graphs.arithmetic("Mul", (1, CHANNELS, 1, 1)),
              arith_1=(1, KEPT, 1, 1)),
    Case("bias-free-conv+Add", lambda: graphs.conv_sandwich(graphs.bias_add, conv1_bias=False),
         ("conv1",), OUTPUT_FROZEN,
         {("conv1", 1): (KEPT, 3, 3, 3), ("bias", 1): (KEPT, 1, 1), ("conv2", 1): (5, KEPT, 3, 3)}),
    _sandwich("depthwise-Conv", graphs.depthwise, dw_1=(KEPT, 1, 3, 3), dw_2=(KEPT,)),
    Case("Pad-spatial", lambda: graphs.conv_sandwich(graphs.pad_spatial, out_size=10),
         ("conv1",), OUTPUT_FROZEN, _sandwich_shapes(pad_1=(8,))),
    _pooled("MaxPool"),
    _pooled("AveragePool"),
    Case("Constant-node-weights",
         lambda: graphs.conv_sandwich(graphs.unary("Relu"), constant_nodes=True), ("conv1",),
         OUTPUT_FROZEN, _sandwich_shapes()),
    _head("flatten"),
    _head("reshape"),
    _head("transpose"),
    _head("dynamic"),
    _head("gap", features_per_channel=1),
    Case("Gemm-transB0", lambda: graphs.gemm_mlp(0), ("fc1",), {"fc2": "graph output"},
         {("fc1", 1): (12, KEPT_HIDDEN), ("fc1", 2): (KEPT_HIDDEN,),
          ("fc2", 1): (KEPT_HIDDEN, 4), ("fc2", 2): (4,)}),
    Case("Gemm-transB1", lambda: graphs.gemm_mlp(1), ("fc1",), {"fc2": "graph output"},
         {("fc1", 1): (KEPT_HIDDEN, 12), ("fc1", 2): (KEPT_HIDDEN,),
          ("fc2", 1): (4, KEPT_HIDDEN), ("fc2", 2): (4,)}),
    Case("MatMul-2d", lambda: graphs.matmul_mlp(2), ("mm1",), {"mm2": "graph output"},
         {("mm1", 1): (12, KEPT_HIDDEN), ("add1", 1): (KEPT_HIDDEN,),
          ("mm2", 1): (KEPT_HIDDEN, 4), ("add2", 1): (4,)}),
    Case("MatMul-3d", lambda: graphs.matmul_mlp(3), ("mm1",), {"mm2": "graph output"},
         {("mm1", 1): (12, KEPT_HIDDEN), ("add1", 1): (KEPT_HIDDEN,),
          ("mm2", 1): (KEPT_HIDDEN, 4), ("add2", 1): (4,)}),
    Case("residual-Add", graphs.residual_block, ("conv0", "conv1", "conv2"),
         {"conv3": "graph output"},
         {("conv0", 1): (3, 3, 3, 3), ("conv0", 2): (3,), ("conv1", 1): (3, 3, 3, 3),
          ("conv2", 1): (3, 3, 3, 3), ("conv2", 2): (3,), ("conv3", 1): (4, 3, 3, 3)}),
]


# ----------------------------------------------------------------------------------------------
# helpers


def _input_shape(model: onnx.ModelProto) -> tuple[str, tuple[int, ...]]:
    value = model.graph.input[0]
    dims = tuple(d.dim_value for d in value.type.tensor_type.shape.dim[1:])
    return value.name, dims


def _data(model: onnx.ModelProto, samples: int, seed: int) -> dict[str, np.ndarray]:
    name, dims = _input_shape(model)
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal((samples, *dims)).astype(np.float32)}


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


def _by_producer(groups: tuple[ChannelGroup, ...]) -> dict[str, ChannelGroup]:
    return {producer: group for group in groups for producer in group.producers}


def _node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    matches = [node for node in model.graph.node if node.name == name]
    names = [n.name for n in model.graph.node]
    assert len(matches) == 1, f"node '{name}' not found once in {names}"
    return matches[0]


def _constant(model: onnx.ModelProto, node_name: str, position: int) -> np.ndarray:
    tensor = _node(model, node_name).input[position]
    for init in model.graph.initializer:
        if init.name == tensor:
            return numpy_helper.to_array(init)
    for node in model.graph.node:
        if node.op_type == "Constant" and list(node.output) == [tensor]:
            return numpy_helper.to_array(node.attribute[0].t)
    raise AssertionError(f"input {position} '{tensor}' of '{node_name}' is not an initializer")


def _initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == name))


def _relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def _check_runs_like(original: onnx.ModelProto, compressed: onnx.ModelProto,
                     feeds: dict[str, np.ndarray]) -> tuple[dict, dict]:
    onnx.checker.check_model(compressed, full_check=True)
    want, got = _run(original, feeds), _run(compressed, feeds)
    assert list(got) == list(want) == [o.name for o in original.graph.output]
    assert [o.name for o in compressed.graph.output] == list(want)
    for name in want:
        assert got[name].shape == want[name].shape, name
        assert np.all(np.isfinite(got[name]))
    return want, got


# ----------------------------------------------------------------------------------------------
# every handler


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_handler_groups_and_compressed_sizes(case: Case) -> None:
    model = case.build()
    groups = _by_producer(analyze(model).groups)
    assert set(groups) == set(case.prunable) | set(case.frozen)
    for producer in case.prunable:
        assert groups[producer].prunable, (producer, groups[producer].frozen)
        assert groups[producer].taps, producer
    for producer, text in case.frozen.items():
        assert not groups[producer].prunable
        assert any(text in reason for reason in groups[producer].frozen), groups[producer].frozen

    compressed, report = compress(model, _data(model, CALIB + VERIFY, seed=1), ratio=0.5, **FAST)
    _check_runs_like(model, compressed, _data(model, 5, seed=2))
    for (node, position), shape in case.shapes.items():
        assert _constant(compressed, node, position).shape == shape, (node, position)
    kept = {group.producers[0]: group.kept for group in report.groups}
    for producer in case.prunable:
        group = groups[producer]
        assert kept[group.producers[0]] == math.ceil(0.5 * group.channels)
    for producer in case.frozen:
        assert kept[groups[producer].producers[0]] == groups[producer].channels
    assert report.cost_after.params < report.cost_before.params
    assert report.cost_after.macs < report.cost_before.macs


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_keeping_every_channel_reproduces_the_original(case: Case) -> None:
    model = case.build()
    compressed, report = compress(model, _data(model, CALIB + VERIFY, seed=1), ratio=1.0,
                                  ridge=1e-9, **FAST)
    assert report.cost_after.params == report.cost_before.params
    want, got = _check_runs_like(model, compressed, _data(model, 6, seed=3))
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4,
                                   atol=1e-4 * float(np.abs(want[name]).max()))


def _output_rows(model: onnx.ModelProto, producer: str) -> np.ndarray:
    """A producer's weight as one row per output channel."""
    node = _node(model, producer)
    weight = _constant(model, producer, 1)
    trans_b = any(a.name == "transB" and a.i == 1 for a in node.attribute)
    if node.op_type == "MatMul" or (node.op_type == "Gemm" and not trans_b):
        weight = weight.T
    return weight.reshape(weight.shape[0], -1)


def _kept_channels(model: onnx.ModelProto, compressed: onnx.ModelProto,
                   producer: str) -> np.ndarray:
    """Which original channels the compressed producer kept (its rows are original rows)."""
    original, kept_rows = _output_rows(model, producer), _output_rows(compressed, producer)
    kept = [int(np.flatnonzero(np.all(original == row, axis=1))[0]) for row in kept_rows]
    assert kept == sorted(set(kept))
    return np.array(kept)


def _with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    extended = onnx.ModelProto()
    extended.CopyFrom(model)
    extended.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names)
    return extended


SINGLE_GROUP = [case for case in CASES if len(case.prunable) == 1]


@pytest.mark.parametrize("case", SINGLE_GROUP, ids=[case.id for case in SINGLE_GROUP])
def test_sink_absorbs_the_ridge_reconstruction(case: Case) -> None:
    """The compressed model computes the original's layers after the tap on A_J t_J, with
    A_J = Sigma[:, J] (Sigma[J, J] + lambda I)^-1 from the calibration samples (SPEC 3, 4)."""
    model = case.build()
    (group,) = analyze(model).prunable
    (tap,) = group.taps
    calib = _data(model, CALIB + VERIFY, seed=1)
    compressed, _ = compress(model, calib, ratio=0.5, ridge=1e-2, **FAST)
    kept = _kept_channels(model, compressed, group.producers[0])
    assert kept.size == math.ceil(0.5 * group.channels)

    probe = _with_outputs(model, [tap.tensor])
    first = {name: array[:CALIB] for name, array in calib.items()}
    rows = np.moveaxis(_run(probe, first)[tap.tensor].astype(np.float64), tap.axis, -1)
    rows = rows.reshape(-1, group.channels)
    sigma = rows.T @ rows / rows.shape[0]
    ridge = 1e-2 * np.trace(sigma) / group.channels
    a = sigma[:, kept] @ np.linalg.inv(sigma[np.ix_(kept, kept)] + ridge * np.eye(kept.size))

    feeds = _data(model, 5, seed=2)
    activation = np.moveaxis(_run(probe, feeds)[tap.tensor].astype(np.float64), tap.axis, -1)
    rebuilt = np.moveaxis(activation[..., kept] @ a.T, -1, tap.axis).astype(np.float32)
    outputs = [o.name for o in model.graph.output]
    inferred = onnx.shape_inference.infer_shapes(model)
    tail = onnx.utils.Extractor(inferred).extract_model([tap.tensor], outputs)
    want = _run(tail, {tap.tensor: rebuilt})
    got = _run(compressed, feeds)
    for name in outputs:
        assert _relative_error(got[name], want[name]) < 1e-4, name
    # and the reconstruction is not the identity: dropping channels changed the outputs
    original = _run(model, feeds)
    assert min(_relative_error(got[n], original[n]) for n in outputs) > 1e-3


def test_compressed_model_does_not_touch_the_callers_model() -> None:
    model = graphs.conv_sandwich(graphs.unary("Relu"))
    before = model.SerializeToString()
    compress(model, _data(model, CALIB + VERIFY, seed=1), ratio=0.5, **FAST)
    assert model.SerializeToString() == before


# ----------------------------------------------------------------------------------------------
# specific semantics


def test_exact_linear_copies_compress_without_error() -> None:
    model = graphs.duplicate_channels()
    groups = _by_producer(analyze(model).groups)
    assert groups["conv1"].channels == 8 and groups["conv1"].prunable
    compressed, report = compress(model, _data(model, CALIB + VERIFY, seed=1), ratio=0.5,
                                  ridge=1e-9, **FAST)
    assert _constant(compressed, "conv1", 1).shape == (4, 3, 3, 3)
    assert _constant(compressed, "conv2", 1).shape == (5, 4, 3, 3)
    # one of each (channel, 2 * channel) pair stays: the kept rows span the original rows
    kept_rows = _constant(compressed, "conv1", 1).reshape(4, -1)
    half = graphs.duplicated_conv1_weight()[:4].reshape(4, -1)
    ratios = kept_rows @ np.linalg.pinv(half)
    assert np.allclose(np.sort(np.abs(ratios).max(axis=1)), np.sort(np.abs(ratios).sum(axis=1)))
    feeds = _data(model, 8, seed=4)
    want, got = _check_runs_like(model, compressed, feeds)
    assert _relative_error(got["conv2"], want["conv2"]) < 1e-4
    (output,) = report.verification.outputs
    assert output.relative_error < 1e-4
    (group,) = [g for g in report.groups if "conv1" in g.producers]
    assert group.kept == 4 and group.heldout_error < 1e-6


def test_residual_producers_share_one_kept_width() -> None:
    model = graphs.residual_block(channels=6)
    groups = _by_producer(analyze(model).groups)
    stream = groups["conv0"]
    assert groups["conv2"] is stream
    assert set(stream.producers) == {"conv0", "conv2"}
    assert {sink.node for tap in stream.taps for sink in tap.sinks} == {"conv1", "conv3"}
    assert groups["conv1"] is not stream and groups["conv1"].prunable
    compressed, _ = compress(model, _data(model, CALIB + VERIFY, seed=1), ratio=0.5, **FAST)
    conv0, conv2 = _constant(compressed, "conv0", 1), _constant(compressed, "conv2", 1)
    assert conv0.shape[0] == conv2.shape[0] == 3
    # the same channels stay in both producers: their rows are rows J of the originals
    original0 = _initializer(model, "conv0_w")
    rows0 = [int(np.flatnonzero(np.all(original0 == row, axis=(1, 2, 3)))[0]) for row in conv0]
    assert rows0 == sorted(rows0) and len(set(rows0)) == 3
    # conv2's input channels (conv1's group) are folded, so compare the bias rows instead
    original_bias0 = _initializer(model, "conv0_b")
    original_bias2 = _initializer(model, "conv2_b")
    np.testing.assert_array_equal(_constant(compressed, "conv0", 2), original_bias0[rows0])
    np.testing.assert_array_equal(_constant(compressed, "conv2", 2), original_bias2[rows0])


def test_exclude_freezes_the_named_producer() -> None:
    model = graphs.conv_sandwich(graphs.unary("Relu"))
    groups = _by_producer(analyze(model, exclude=("conv1",)).groups)
    assert any("excluded" in reason and "conv1" in reason for reason in groups["conv1"].frozen)
    compressed, report = compress(model, _data(model, CALIB + VERIFY, seed=1), ratio=0.5,
                                  exclude=("conv1",), **FAST)
    assert _constant(compressed, "conv1", 1).shape == (CHANNELS, 3, 3, 3)
    assert report.cost_after.params == report.cost_before.params


def test_reshape_target_is_rewritten_for_the_kept_channels() -> None:
    model = graphs.flatten_head("reshape")
    compressed, _ = compress(model, _data(model, CALIB + VERIFY, seed=1), ratio=0.5, **FAST)
    target = _constant(compressed, "reshape", 1)
    np.testing.assert_array_equal(target, [-1, KEPT * HEAD_SIZE * HEAD_SIZE])


def _reshape_to_1d_conv(middle: tuple[int, ...]) -> onnx.ModelProto:
    """x [N,3,6,'W'] -> Conv 'conv1' (C) -> Reshape 'flat' `middle` -> 1-D Conv 'conv2' (5,
    kernel 3) -> y [N, 5, L]."""
    b = graphs.GraphBuilder(0)
    t = b.conv("x", "conv1", 3, CHANNELS)
    flat = b.node("Reshape", [t, b.const("middle", np.array(middle, np.int64))], "flat")
    b.node("Conv", [flat, b.random("conv2_w", (5, CHANNELS, 3), fan_in=3 * CHANNELS)], "conv2",
           pads=[1, 1])
    return b.model([("x", ["N", 3, 6, "W"])], [("conv2", ["N", 5, None])])


def test_reshape_with_a_symbolic_width_is_followed_when_channels_stay_on_one_axis() -> None:
    """[N, C, 6, W] -> [N, C, 6*W] keeps the channels on axis 1 whatever W is: conv1 prunes
    without calibration data to tell W, and the compressed model runs at any width."""
    model = _reshape_to_1d_conv((0, CHANNELS, -1))
    assert not _by_producer(analyze(model).groups)["conv1"].frozen
    data = {"x": np.random.default_rng(1).standard_normal((CALIB + VERIFY, 3, 6, 5),
                                                          dtype=np.float32)}
    compressed, _ = compress(model, data, ratio=0.5, **FAST)
    assert _constant(compressed, "conv1", 1).shape[0] == KEPT
    np.testing.assert_array_equal(_constant(compressed, "flat", 1), [0, KEPT, -1])
    for width in (2, 9):
        x = np.ones((1, 3, 6, width), np.float32)
        assert _run(compressed, {"x": x})["conv2"].shape == (1, 5, 6 * width)


def test_reshape_with_a_symbolic_width_that_mixes_channels_with_it_freezes() -> None:
    """[N, C, 6, W] -> [N, C*W, 6]: where each channel's elements land depends on W."""
    groups = _by_producer(analyze(_reshape_to_1d_conv((0, -1, 6))).groups)
    assert any("Reshape 'flat'" in reason and "dynamic non-sample dimensions" in reason
               for reason in groups["conv1"].frozen)


def test_transposed_head_folds_the_strided_feature_blocks() -> None:
    """CREPE-like head, permute(0, 2, 1, 3).reshape(N, -1): channel c owns the strided features
    h*C*W + c*W + w. With the reconstruction switched off (L1 baseline), fc's weight must be the
    original restricted to the features of the kept channels, in the new layout's order."""
    model = graphs.flatten_head("transpose")
    compressed, _ = compress(model, _data(model, CALIB + VERIFY, seed=1), ratio=0.5,
                             selection="l1", reconstruct=False, **FAST)
    original_w = _initializer(model, "fc_w")
    original_conv = _initializer(model, "conv1_w")
    kept_conv = _constant(compressed, "conv1", 1)
    kept = [int(np.flatnonzero(np.all(original_conv == row, axis=(1, 2, 3)))[0])
            for row in kept_conv]
    # feature index of (h, c, w) after permute(0, 2, 1, 3).reshape(N, -1)
    h, c, w = np.meshgrid(np.arange(HEAD_SIZE), np.array(kept), np.arange(HEAD_SIZE),
                          indexing="ij")
    features = (h * CHANNELS * HEAD_SIZE + c * HEAD_SIZE + w).ravel()
    np.testing.assert_array_equal(_constant(compressed, "fc", 1), original_w[:, features])


# ----------------------------------------------------------------------------------------------
# barriers


BARRIERS = [
    ("Softmax-over-channels", lambda: graphs.conv_sandwich(graphs.softmax_channels),
     {"conv1": ["Softmax", "softmax"]}),
    ("Softmax-opset11-flattens-channels",
     lambda: graphs.conv_sandwich(graphs.unary("Softmax", axis=1), opset=11),
     {"conv1": ["Softmax", "'softmax'", "normalizes over the channel axis"]}),
    ("LRN", lambda: graphs.conv_sandwich(graphs.lrn),
     {"conv1": ["LRN", "'lrn'", "its 3 neighbouring channels"]}),
    ("Pad-on-channels", lambda: graphs.conv_sandwich(graphs.pad_channels),
     {"conv1": ["Pad pads the channel axis", "pad"]}),
    ("conv-output-is-graph-output", graphs.conv_output_is_graph_output,
     {"conv1": ["'conv1'", "graph output"]}),
    ("MatMul-of-activations", graphs.matmul_of_activations,
     {"q": ["MatMul", "scores"], "k": ["MatMul", "scores"]}),
]


def _top_per_lane(weight: np.ndarray, lanes: int, keep: int) -> np.ndarray:
    """The `keep` rows of largest L1 norm in each of `lanes` lanes of `weight`'s rows, sorted."""
    norms = np.abs(weight).reshape(len(weight), -1).sum(axis=1)
    size = len(weight) // lanes
    return np.sort(np.concatenate([
        start + np.argsort(-norms[start:start + size], kind="stable")[:keep]
        for start in range(0, len(weight), size)]))


def test_grouped_conv_channels_go_evenly_from_each_group() -> None:
    """conv1 (8) -> gconv (group 2: 6 outputs, 3 per group) -> conv2. What gconv reads is a
    group of 2 lanes of 4, reconstructed lane by lane; its outputs a group of 2 lanes of 3. At
    ratio 0.5 each lane keeps half (rounded up to whole lanes: 4 of 8, 4 of 6), gconv keeps
    group 2, and with every channel kept the model is unchanged."""
    model = graphs.conv_sandwich(graphs.grouped_conv, channels=8)
    groups = _by_producer(analyze(model).groups)
    assert groups["conv1"].prunable and groups["conv1"].lanes == 2
    assert groups["conv1"].lane_local
    assert groups["gconv"].prunable and groups["gconv"].lanes == 2
    assert not groups["gconv"].lane_local
    compressed, report = compress(model, _data(model, CALIB + VERIFY, seed=1), ratio=0.5,
                                  **FAST)
    onnx.checker.check_model(compressed, full_check=True)
    conv1 = _constant(compressed, "conv1", 1)
    original_conv1 = _constant(model, "conv1", 1)  # [8, 3, 3, 3]
    conv1_lanes = [int(np.flatnonzero(np.all(original_conv1 == row, axis=(1, 2, 3)))[0]) // 4
                   for row in conv1]
    assert conv1_lanes == [0, 0, 1, 1]
    kept_rows = _constant(compressed, "gconv", 1)
    assert kept_rows.shape == (4, 2, 3, 3)  # 4 outputs, 2 inputs per conv group
    assert attributes(_node(compressed, "gconv"))["group"] == 2
    assert _constant(compressed, "conv2", 1).shape == (5, 4, 3, 3)
    plain, _ = compress(model, _data(model, CALIB + VERIFY, seed=1), ratio=0.5,
                        selection="l1", reconstruct=False, **FAST)
    gconv = _constant(model, "gconv", 1)  # [6, 4, 3, 3]: rows 3g..3g+2 read inputs 4g..4g+3
    inputs = _top_per_lane(original_conv1, 2, 2)  # the L1 choice: 2 of 4 per lane
    outputs = _top_per_lane(gconv, 2, 2)  # 2 of 3 per lane
    expected = np.stack([gconv[o][inputs[2 * (o // 3): 2 * (o // 3) + 2] % 4] for o in outputs])
    np.testing.assert_array_equal(_constant(plain, "gconv", 1), expected)
    want, got = _check_runs_like(model, compressed, _data(model, 4, seed=2))
    whole, _ = compress(model, _data(model, CALIB + VERIFY, seed=1), ratio=1.0, ridge=1e-9,
                        **FAST)
    _, same = _check_runs_like(model, whole, _data(model, 4, seed=2))
    for name in want:
        np.testing.assert_allclose(same[name], want[name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("build, expected", [(b, e) for _, b, e in BARRIERS],
                         ids=[case_id for case_id, _, _ in BARRIERS])
def test_barrier_freezes_with_reason(build: Callable[[], onnx.ModelProto],
                                     expected: dict[str, list[str]]) -> None:
    model = build()
    analysis = analyze(model)
    groups = _by_producer(analysis.groups)
    for producer, words in expected.items():
        group = groups[producer]
        assert not group.prunable
        assert any(all(word in reason for word in words) for reason in group.frozen), (
            producer, group.frozen)
    assert analysis.prunable == ()
    # the model stays whole unless conv1 computes fewer outputs (tests/test_reconstruction_layers)
    compressed, report = compress(model, _data(model, CALIB + VERIFY, seed=1), ratio=0.5,
                                  reconstruction_layers="none", **FAST)
    assert report.cost_after.params == report.cost_before.params
    assert all(group.kept == group.channels for group in report.groups)
    assert any("no channel group is prunable" in warning for warning in report.warnings)
    feeds = _data(model, 4, seed=2)
    want, got = _check_runs_like(model, compressed, feeds)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6)
