"""Multi-head attention written out in plain ops: whole heads as one channel group.

Exporters (torch.onnx, Hugging Face Optimum) write self-attention as three projections Q, K and
V (``[..., C]``, C = H * D), each reshaped to ``[b, s, H, D]`` and transposed to heads first,
then ``softmax(Q K^T * scale + mask) V``, transposed back and reshaped to ``[b, s, C]`` before
the output projection. Channel ``h * D + d`` of Q, K, V and of the merged context all belong to
head ``h``. Removing whole heads (the same heads from Q, K and V) keeps every step valid: the
reshapes split off ``k`` heads instead of ``H``, the per-head score matrices of the removed
heads are simply not computed, and the output projection reads ``k * D`` context channels, on
which it absorbs a reconstruction like any sink.

Operands added to the scores may vary over the heads: a relative-position bias
``[b, H, s, s]`` (MPNet, T5, DeBERTa-style) computed once and added in every layer. Such an
operand is a member of the head group (`Role.HEAD_OPERAND`): a constant keeps the kept heads'
slices, a computed one is read through a Gather of the kept heads on its head axis.

`find_attention` recognizes that pattern node by node and returns one `AttentionBlock` per
match; anything that does not match exactly is left to the ordinary handlers (which keep such
channels whole, with their reason). The analysis then couples the Q, K and V groups into one
group with blocks of D channels (`AnalysisContext.set_block`), whose layout members are the
four reshapes (their head count or width entry scales with the heads kept).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from onnx_spectral.graph.model import GraphIndex, attributes
from onnx_spectral.ops.base import AnalysisContext, Editor, Member, Plain, Role
from onnx_spectral.ops.layout import shape_entries

_SCORE_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Where", "Cast"})
"""Ops allowed between the score MatMul and the Softmax (scaling, masks, biases), provided
their other operands do not vary over the head axis, or (`_HEAD_OPERAND_OPS`) hold one slice
per head on it."""
_HEAD_OPERAND_OPS = frozenset({"Add", "Sub", "Mul", "Div"})
_SCALE_OPS = frozenset({"Mul", "Div"})
"""Ops allowed on Q or K before the score MatMul, by a constant scalar."""
_HEADS_FIRST = (0, 2, 1, 3)
_KEYS_TRANSPOSED = (0, 2, 3, 1)


@dataclass(frozen=True)
class AttentionBlock:
    """One self-attention core between the Q/K/V projections and the output projection.

    `query`, `key`, `value`: the rank-3 tensors ``[b, s, C]`` the head reshapes read.
    `splits`: the three head Reshape nodes (Q, K, V order); `merge`: the Reshape back to C.
    `matmuls`: the score and context MatMuls, whose MACs scale with the heads kept.
    `heads`: H; `head_size`: D (C = H * D).
    `head_operands`: (node, input position) of each score operand with one slice per head on
    its axis -3.
    """

    query: str
    key: str
    value: str
    splits: tuple[str, str, str]
    merge: str
    matmuls: tuple[str, str]
    heads: int
    head_size: int
    head_operands: tuple[tuple[str, int], ...] = ()

    @property
    def channels(self) -> int:
        return self.heads * self.head_size


class _NoMatch(Exception):
    """The subgraph is not the attention pattern (internal to the matcher)."""


def find_attention(graph: GraphIndex) -> tuple[AttentionBlock, ...]:
    """Every attention core of `graph` that matches the pattern exactly."""
    blocks = []
    for node in graph.nodes:
        if node.op_type == "Softmax":
            try:
                blocks.append(_match(graph, node))
            except _NoMatch:
                continue
    return tuple(blocks)


def _only_consumer(graph: GraphIndex, tensor: str, leading: int = 0) -> onnx.NodeProto:
    """The single node reading `tensor`, which must not be a graph output; besides it, Shape
    nodes may read the first `leading` dimensions (the batch and sequence sizes)."""
    readers = [node for node, _ in graph.consumers.get(tensor, [])
               if not _reads_leading_dims(graph, node, leading)]
    if len(readers) != 1 or tensor in graph.graph_outputs:
        raise _NoMatch
    return readers[0]


def _reads_leading_dims(graph: GraphIndex, node: onnx.NodeProto, leading: int) -> bool:
    """Whether `node` is a Shape whose every use picks one of the first `leading` dims."""
    if node.op_type != "Shape" or leading == 0 or attributes(node).get("start", 0):
        return False
    end = attributes(node).get("end")
    if end is not None and 0 <= int(end) <= leading:  # type: ignore[call-overload]
        return True
    for reader, position in graph.consumers.get(node.output[0], []):
        indices = graph.input_constant(reader, 1)
        if (reader.op_type != "Gather" or position != 0 or indices is None
                or np.any((indices < 0) | (indices >= leading))):
            return False
    return True


def _producer(graph: GraphIndex, tensor: str, *op_types: str) -> onnx.NodeProto:
    node = graph.producers.get(tensor)
    if node is None or node.op_type not in op_types or node.domain not in ("", "ai.onnx"):
        raise _NoMatch
    _only_consumer(graph, tensor)
    return node


def _perm(node: onnx.NodeProto) -> tuple[int, ...]:
    perm = attributes(node).get("perm")
    return () if perm is None else tuple(int(p) for p in perm)  # type: ignore[attr-defined]


def _is_scalar_constant(graph: GraphIndex, tensor: str) -> bool:
    value = graph.constant(tensor)
    return value is not None and value.size == 1


def _skip_scaling(graph: GraphIndex, tensor: str) -> str:
    """Walk back over Mul/Div by a constant scalar; the tensor before them."""
    while True:
        node = graph.producers.get(tensor)
        if node is None or node.op_type not in _SCALE_OPS:
            return tensor
        operand = node.input[0]
        if not _is_scalar_constant(graph, node.input[1]):
            if node.op_type == "Div" or not _is_scalar_constant(graph, node.input[0]):
                return tensor
            operand = node.input[1]
        _only_consumer(graph, tensor)
        tensor = operand


def _head_split(graph: GraphIndex, tensor: str, perm: tuple[int, ...]
                ) -> tuple[onnx.NodeProto, int, int]:
    """Follow `tensor` back through Transposes composing to `perm` (one Transpose, or e.g.
    heads first then the last two swapped for K) to a head Reshape of a rank-3 tensor; the
    Reshape node, H and D."""
    composed: tuple[int, ...] = (0, 1, 2, 3)
    while True:
        node = graph.producers.get(tensor)
        if node is None:
            raise _NoMatch
        if node.op_type != "Transpose":
            break
        _only_consumer(graph, tensor)
        step = _perm(node)
        if len(step) != 4:
            raise _NoMatch
        composed = tuple(step[axis] for axis in composed)
        tensor = node.input[0]
    if composed != perm:
        raise _NoMatch
    reshape = _producer(graph, tensor, "Reshape")
    entries = shape_entries(graph, reshape)
    source = graph.shapes.get(reshape.input[0])
    if entries is None or len(entries) != 4 or source is None or len(source) != 3:
        raise _NoMatch
    heads, head_size = entries[2], entries[3]
    if heads is None or head_size is None or heads < 1 or head_size < 1:
        raise _NoMatch
    if source[2] is not None and source[2] != heads * head_size:
        raise _NoMatch
    return reshape, heads, head_size


def _score_chain(graph: GraphIndex, tensor: str
                 ) -> tuple[str, list[tuple[onnx.NodeProto, int]]]:
    """Walk back from the Softmax input over score ops; the score MatMul's output and the
    (node, input position) of the operands that vary over the head axis."""
    varying: list[tuple[onnx.NodeProto, int]] = []
    while True:
        node = graph.producers.get(tensor)
        if node is None:
            raise _NoMatch
        if node.op_type == "MatMul":
            return tensor, varying
        if node.op_type not in _SCORE_OPS:
            raise _NoMatch
        _only_consumer(graph, tensor)
        onward = [name for name in node.input
                  if graph.constant(name) is None and _reaches_matmul(graph, name)]
        if len(onward) != 1:
            raise _NoMatch
        for position, name in enumerate(node.input):
            if name == onward[0] or _head_invariant(graph, name):
                continue
            if node.op_type not in _HEAD_OPERAND_OPS:
                raise _NoMatch
            varying.append((node, position))
        tensor = onward[0]


def _reaches_matmul(graph: GraphIndex, tensor: str) -> bool:
    """Whether `tensor` comes from the score MatMul through score ops only."""
    node = graph.producers.get(tensor)
    while node is not None and node.op_type in _SCORE_OPS:
        inputs = [name for name in node.input if graph.constant(name) is None]
        if not inputs:
            return False
        node = graph.producers.get(inputs[-1] if node.op_type == "Where" else inputs[0])
    return node is not None and node.op_type == "MatMul" and all(
        graph.constant(name) is None for name in node.input)


def _head_axis_size(graph: GraphIndex, tensor: str) -> int | None:
    """The size of axis -3 (the heads) of an operand of the rank-4 scores: 1 when its rank is
    below 3, None when unknown."""
    value = graph.constant(tensor)
    shape = graph.shapes.get(tensor) if value is None else value.shape
    if shape is None:
        return None
    return 1 if len(shape) < 3 else shape[-3]


def _head_invariant(graph: GraphIndex, tensor: str) -> bool:
    """Whether a tensor added to (or masking) the rank-4 scores is the same for every head."""
    return _head_axis_size(graph, tensor) == 1


def _match(graph: GraphIndex, softmax: onnx.NodeProto) -> AttentionBlock:
    scores = graph.shapes.get(softmax.output[0])
    axis = int(attributes(softmax).get("axis", -1))  # type: ignore[call-overload]
    if scores is None or len(scores) != 4 or axis not in (-1, 3):
        raise _NoMatch
    score_out, varying = _score_chain(graph, softmax.input[0])
    score = _producer(graph, score_out, "MatMul")
    context = _only_consumer(graph, softmax.output[0])
    if context.op_type != "MatMul" or context.input[0] != softmax.output[0]:
        raise _NoMatch
    query, heads, head_size = _head_split(graph, _skip_scaling(graph, score.input[0]),
                                          _HEADS_FIRST)
    key, key_heads, key_size = _head_split(graph, _skip_scaling(graph, score.input[1]),
                                           _KEYS_TRANSPOSED)
    value, value_heads, value_size = _head_split(graph, context.input[1], _HEADS_FIRST)
    if (key_heads, key_size, value_heads, value_size) != (heads, head_size) * 2:
        raise _NoMatch
    if any(_head_axis_size(graph, node.input[position]) != heads
           for node, position in varying):
        raise _NoMatch
    back = _only_consumer(graph, context.output[0])
    if back.op_type != "Transpose" or _perm(back) != _HEADS_FIRST:
        raise _NoMatch
    merge = _only_consumer(graph, back.output[0], leading=2)
    entries = shape_entries(graph, merge) if merge.op_type == "Reshape" else None
    if entries is None or len(entries) != 3 or entries[2] != heads * head_size:
        raise _NoMatch
    inputs = (query.input[0], key.input[0], value.input[0])
    if len(set(inputs)) != 3:
        raise _NoMatch
    return AttentionBlock(*inputs, (query.name, key.name, value.name), merge.name,
                          (score.name, context.name), heads, head_size,
                          tuple((node.name, position) for node, position in varying))


def merge_heads(block: AttentionBlock, ctx: AnalysisContext) -> None:
    """At the merge Reshape: couple Q, K and V into one group of whole heads, or keep them
    whole with the reason."""
    states = [ctx.state(name) for name in (block.query, block.key, block.value)]
    present = [state for state in states if state is not None]
    if not present:
        return
    problem = None
    if len(present) < 3:
        problem = "Q, K and V must each come from a linear layer whose channels can be pruned"
    elif any(not isinstance(state, Plain) or state.axis != state.rank - 1 for state in present):
        problem = "Q, K or V does not carry its channels on its last axis"
    if problem is None:
        group = ctx.union(present[0].group, present[1].group, block.merge)
        group = ctx.union(group, present[2].group, block.merge)
        if ctx.channels(group) != block.channels:
            problem = (f"the projections have {ctx.channels(group)} channels, not "
                       f"{block.heads} heads x {block.head_size}")
    if problem is not None:
        for state in present:
            ctx.freeze(state.group, f"attention heads at Reshape '{block.merge}': {problem}")
        return
    ctx.set_block(group, block.head_size)
    for reshape in (*block.splits, block.merge):
        ctx.add_member(group, Member(reshape, Role.LAYOUT, 2))
    for node, position in block.head_operands:
        ctx.add_member(group, Member(node, Role.HEAD_OPERAND, position))
    ctx.add_scaled(group, block.matmuls)
    merge = ctx.graph.nodes_by_name[block.merge]
    ctx.set_state(merge.output[0], Plain(group, 2, 3))


def keep_heads_of_operand(node: onnx.NodeProto, position: int, kept: np.ndarray, channels: int,
                          editor: Editor) -> None:
    """Restrict the score operand at input `position` of `node` ([..., H, s, s]) to the heads
    of the kept channels `kept` ([k] of `channels` = H * D): a constant is sliced, a computed
    operand is read through a Gather on its head axis."""
    value = editor.input_value(node, position)
    shape = value.shape if value is not None else editor.graph.shapes[node.input[position]]
    heads_total = shape[-3]
    assert heads_total is not None and channels % heads_total == 0
    heads = np.unique(kept // (channels // heads_total))
    if value is not None:
        editor.set_input_value(node, position, np.take(value, heads, axis=value.ndim - 3))
    else:
        editor.gather_input(node, position, heads, len(shape) - 3)
