"""Sequential compensation (SPEC section 5): reconstruct toward the ORIGINAL model's activations.

Groups are pruned in passes. A group joins a pass once every group upstream of its taps is
pruned, so groups that do not depend on each other share a pass. For a pass, the original
(normalized) model and the partially pruned model are merged into one ONNX model: the pruned
copy's tensors are renamed, graph inputs are shared, and each tap of the pass's groups gets, in
the graph,

    C = sum t_orig t_pruned^T   ([m, m], Gemm with transA=1)
    S = sum t_pruned t_pruned^T ([m, m])
    sum t_orig, sum t_pruned    ([m] each, for the affine variant)

over all samples (batch x positions). Only the nodes these outputs need are kept. The
reconstruction of a group is then A = C[:, J] (S[J, J] + lambda I)^-1: from the kept channels
of the pruned model to the original's whole activation (`moments.py`). The first pass (groups
with nothing pruned upstream) needs no extra run: there S = C = Sigma.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnx_spectral.analysis import Analysis, ChannelGroup, Tap
from onnx_spectral.calibration.collect import Statistics
from onnx_spectral.calibration.sources import FeedDict
from onnx_spectral.errors import StatisticsError
from onnx_spectral.graph.model import opset_version
from onnx_spectral.graph.sessions import Provider, open_session
from onnx_spectral.graph.submodel import needed_nodes
from onnx_spectral.rewrite import rewrite
from onnx_spectral.selection.group_cost import GroupCosts
from onnx_spectral.selection.moments import CrossMoments
from onnx_spectral.selection.plan import PlannedGroup, PlanOptions, allocate_widths, plan_group

_PRUNED = "onnx_spectral_pruned/"
_TAP = "onnx_spectral_cross"


@dataclass(frozen=True)
class _CrossOutputs:
    tensor: str
    cross: str
    second: str
    shape: str
    sum_original: str
    sum_pruned: str

    @property
    def names(self) -> tuple[str, ...]:
        return (self.cross, self.second, self.shape, self.sum_original, self.sum_pruned)


def upstream_groups(analysis: Analysis) -> dict[int, frozenset[int]]:
    """For each prunable group, the other prunable groups its tap tensors depend on."""
    groups = analysis.prunable
    owner: dict[str, int] = {}
    for bit, group in enumerate(groups):
        for tensor in group.tensors:
            owner.setdefault(tensor, bit)
    masks: dict[str, int] = {}
    for node in analysis.graph.nodes:
        mask = 0
        for name in node.input:
            mask |= masks.get(name, 0)
        for name in node.output:
            masks[name] = mask | (1 << owner[name] if name in owner else 0)
    result = {}
    for bit, group in enumerate(groups):
        mask = 0
        for tap in group.taps:
            mask |= masks.get(tap.tensor, 0)
        mask &= ~(1 << bit)
        result[group.id] = frozenset(groups[i].id for i in range(len(groups)) if mask >> i & 1)
    return result


def schedule(analysis: Analysis) -> list[list[ChannelGroup]]:
    """Passes: each a list of groups whose upstream groups all lie in earlier passes.

    Groups that depend on each other both ways (a residual stream and a branch that reads and
    feeds it) are broken in graph order: the earliest remaining group goes alone, compensated
    against the groups pruned so far.
    """
    upstream = upstream_groups(analysis)
    remaining = list(analysis.prunable)
    done: set[int] = set()
    passes = []
    while remaining:
        ready = [group for group in remaining if upstream[group.id] <= done] or remaining[:1]
        passes.append(ready)
        done.update(group.id for group in ready)
        remaining = [group for group in remaining if group.id not in done]
    return passes


def _renamed_copy(pruned: onnx.ModelProto) -> tuple[list[onnx.NodeProto],
                                                   list[onnx.TensorProto]]:
    """Nodes and initializers of `pruned` with every non-input tensor name prefixed."""
    inputs = {value.name for value in pruned.graph.input}
    initializers = {init.name for init in pruned.graph.initializer}

    def rename(name: str) -> str:
        return name if not name or (name in inputs and name not in initializers) \
            else _PRUNED + name

    nodes = []
    for node in pruned.graph.node:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.name = _PRUNED + node.name
        copy.input[:] = [rename(name) for name in node.input]
        copy.output[:] = [rename(name) for name in node.output]
        nodes.append(copy)
    tensors = []
    for init in pruned.graph.initializer:
        copy = onnx.TensorProto()
        copy.CopyFrom(init)
        copy.name = _PRUNED + init.name
        tensors.append(copy)
    return nodes, tensors


def _rows(tensor: str, axis: int, rank: int, channels: int, prefix: str
          ) -> tuple[list[onnx.NodeProto], onnx.TensorProto, str]:
    """Nodes turning `tensor` into float rows [samples, channels]."""
    nodes = [helper.make_node("Cast", [tensor], [prefix + "float"], to=TensorProto.FLOAT)]
    current = prefix + "float"
    if axis != rank - 1:
        perm = [i for i in range(rank) if i != axis] + [axis]
        nodes.append(helper.make_node("Transpose", [current], [prefix + "last"], perm=perm))
        current = prefix + "last"
    shape = numpy_helper.from_array(np.array([-1, channels], dtype=np.int64), prefix + "shape")
    nodes.append(helper.make_node("Reshape", [current, shape.name], [prefix + "rows"]))
    return nodes, shape, prefix + "rows"


def merged_model(analysis: Analysis, pruned: onnx.ModelProto, taps: Sequence[Tap],
                 cached: bool = False) -> tuple[onnx.ModelProto, tuple[_CrossOutputs, ...]]:
    """One model running the original and `pruned` side by side, returning cross statistics.

    `pruned` must keep the original's tensor names and graph inputs (as `rewrite` does). With
    `cached`, the original is not run: its tap tensors become extra graph inputs (fed from
    `original_activations`).
    """
    original = analysis.graph.model
    nodes, initializers = _renamed_copy(pruned)
    all_nodes = ([] if cached else list(original.graph.node)) + nodes
    extra: list[onnx.TensorProto] = []
    outputs = []
    value_infos = []
    for index, tap in enumerate(taps):
        rank = analysis.graph.rank(tap.tensor)
        assert rank is not None
        prefix = f"{_TAP}{index}_"
        left, shape_o, rows_o = _rows(tap.tensor, tap.axis, rank, tap.channels, prefix + "o_")
        right, shape_p, rows_p = _rows(_PRUNED + tap.tensor, tap.axis, rank, tap.channels,
                                       prefix + "p_")
        names = _CrossOutputs(tap.tensor, prefix + "cross", prefix + "second", prefix + "count",
                              prefix + "sum_o", prefix + "sum_p")
        bias = []
        if opset_version(original) < 11:  # Gemm's C is optional from opset 11 on
            zero = numpy_helper.from_array(np.zeros((), dtype=np.float32), prefix + "zero")
            extra.append(zero)
            bias = [zero.name]
        all_nodes += left + right + [
            helper.make_node("Gemm", [rows_o, rows_p, *bias], [names.cross], transA=1),
            helper.make_node("Gemm", [rows_p, rows_p, *bias], [names.second], transA=1),
            helper.make_node("Shape", [rows_p], [names.shape]),
        ]
        for rows, total in ((rows_o, names.sum_original), (rows_p, names.sum_pruned)):
            all_nodes.append(_column_sums(rows, total, prefix, extra, opset_version(original)))
        extra += [shape_o, shape_p]
        value_infos += [
            helper.make_tensor_value_info(names.cross, TensorProto.FLOAT,
                                          [tap.channels, tap.channels]),
            helper.make_tensor_value_info(names.second, TensorProto.FLOAT,
                                          [tap.channels, tap.channels]),
            helper.make_tensor_value_info(names.shape, TensorProto.INT64, [2]),
            helper.make_tensor_value_info(names.sum_original, TensorProto.FLOAT, [tap.channels]),
            helper.make_tensor_value_info(names.sum_pruned, TensorProto.FLOAT, [tap.channels]),
        ]
        outputs.append(names)
    kept = needed_nodes(all_nodes, [name for out in outputs for name in out.names])
    used = {name for node in kept for name in node.input}
    inputs = list(original.graph.input)
    if cached:
        inputs += [helper.make_tensor_value_info(tap.tensor, TensorProto.FLOAT, None)
                   for tap in taps]
    graph = helper.make_graph(
        kept, "onnx_spectral_compensation", inputs, value_infos,
        [init for init in (*original.graph.initializer, *initializers, *extra)
         if init.name in used])
    model = helper.make_model(graph, opset_imports=list(original.opset_import))
    model.ir_version = original.ir_version
    return model, tuple(outputs)


def cross_statistics(model: onnx.ModelProto, outputs: Sequence[_CrossOutputs],
                     batches: Iterable[FeedDict], provider: Provider
                     ) -> dict[str, CrossMoments]:
    """Per tap tensor, its cross moments (float64) over all samples of `batches`."""
    session = open_session(model, provider)
    names = [name for out in outputs for name in out.names]
    width = len(outputs[0].names) if outputs else 0
    sums: dict[str, list[np.ndarray]] = {}
    counts: dict[str, int] = {}
    wanted = {value.name for value in session.get_inputs()}
    for feeds in batches:
        results = session.run(names, {key: value for key, value in feeds.items()
                                      if key in wanted})
        for index, out in enumerate(outputs):
            cross, second, shape, sum_o, sum_p = results[width * index: width * (index + 1)]
            values = [np.asarray(value, dtype=np.float64) for value in (second, cross, sum_p,
                                                                          sum_o)]
            entry = sums.setdefault(out.tensor, [np.zeros_like(value) for value in values])
            for total, value in zip(entry, values, strict=True):
                total += value
            counts[out.tensor] = counts.get(out.tensor, 0) + int(shape[0])
    if not counts:
        raise StatisticsError("compensation received no samples: the data source is empty")
    return {tensor: CrossMoments(*(value / max(counts[tensor], 1) for value in totals))
            for tensor, totals in sums.items()}


def _column_sums(rows: str, output: str, prefix: str, initializers: list[onnx.TensorProto],
                 opset: int) -> onnx.NodeProto:
    """ReduceSum of `rows` ([samples, m]) over the samples into `output` ([m])."""
    if opset < 13:
        return helper.make_node("ReduceSum", [rows], [output], axes=[0], keepdims=0)
    axes = prefix + "axes0"
    if all(init.name != axes for init in initializers):
        initializers.append(numpy_helper.from_array(np.array([0], dtype=np.int64), axes))
    return helper.make_node("ReduceSum", [rows, axes], [output], keepdims=0)


def original_activations(analysis: Analysis, taps: Sequence[Tap],
                         batches: Sequence[FeedDict], provider: Provider,
                         limit_bytes: int) -> list[FeedDict] | None:
    """Per batch, the original model's tap tensors as float32 (None when over `limit_bytes`)."""
    names = [tap.tensor for tap in taps]
    model = onnx.ModelProto()
    model.CopyFrom(analysis.graph.model)
    del model.graph.output[:]
    model.graph.output.extend([helper.make_tensor_value_info(name, _elem_type(analysis, name),
                                                             None) for name in names])
    session = open_session(model, provider)
    cached: list[FeedDict] = []
    total = 0
    for feeds in batches:
        values = [np.asarray(value, dtype=np.float32) for value in session.run(names, feeds)]
        total += sum(value.nbytes for value in values)
        if total > limit_bytes:
            return None
        cached.append({**feeds, **dict(zip(names, values, strict=True))})
    return cached


def _elem_type(analysis: Analysis, tensor: str) -> int:
    for value in (*analysis.graph.model.graph.value_info, *analysis.graph.model.graph.input):
        if value.name == tensor:
            return int(value.type.tensor_type.elem_type)
    return TensorProto.FLOAT


def compensated_plans(analysis: Analysis, statistics: Statistics, options: PlanOptions,
                      batches: Callable[[], Iterable[FeedDict]], provider: Provider,
                      costs: GroupCosts | None = None, cache_bytes: int = 1 << 30
                      ) -> tuple[PlannedGroup, ...]:
    """Plans with sequential compensation; widths and kept channels as `plan_groups` chooses.

    `batches()` yields the calibration batches again for each pass after the first. The
    original model's tap activations are computed once and kept in memory when they fit in
    `cache_bytes`; each pass then runs only the pruned model up to its taps. Otherwise every
    pass runs both models.
    """
    widths, paths = allocate_widths(analysis, statistics, options, costs)
    width_of = {group.id: int(width) for group, width in zip(analysis.prunable, widths,
                                                              strict=True)}
    passes = schedule(analysis)
    later = [tap for groups in passes[1:] for group in groups for tap in group.taps]
    cache = (original_activations(analysis, later, list(batches()), provider, cache_bytes)
             if later and options.reconstruct else None)
    planned: dict[int, PlannedGroup] = {}
    for number, groups in enumerate(passes):
        compensation = None
        pruned_so_far = any(item.plan.kept.size < item.plan.group.channels
                            for item in planned.values())
        if number > 0 and options.reconstruct and pruned_so_far:
            pruned = rewrite(analysis, [item.plan for item in planned.values()])
            model, outputs = merged_model(analysis, pruned,
                                          [tap for group in groups for tap in group.taps],
                                          cached=cache is not None)
            compensation = cross_statistics(model, outputs,
                                            batches() if cache is None else cache, provider)
        for group in groups:
            planned[group.id] = plan_group(analysis, group, statistics, options,
                                           width_of[group.id], paths.get(group.id),
                                           compensation)
    return tuple(planned[group.id] for group in analysis.prunable)
