"""Element-wise ops: activations, arithmetic with constants, and couplings of activations.

Unary activations carry channel c to channel c and have nothing to slice. Arithmetic with a
constant (bias Add after a bias-free conv, Mul by a per-channel scale, PRelu slopes) slices the
constant when it varies along the channel axis. Arithmetic between two grouped activations
(residual Add, gates `x * sigmoid(...)`) couples their groups: they must keep the same channels.
An operand of attention scores with one slice per head keeps the kept heads' slices
(`attention.keep_heads_of_operand`).
"""

from __future__ import annotations

import numpy as np
import onnx

from onnx_spectral.ops.attention import keep_heads_of_operand
from onnx_spectral.ops.base import (
    AnalysisContext,
    ChannelState,
    Editor,
    Mapped,
    Member,
    NoWeights,
    Plain,
    Role,
    freeze_inputs,
)


class UnaryHandler(NoWeights):
    """Activations and casts: output channel c depends only on input channel c."""

    op_types: tuple[str, ...] = (
        "Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu",
        "Celu", "Softplus", "Softsign", "Gelu", "Erf", "Mish", "ThresholdedRelu", "Dropout",
        "Identity", "Cast", "Abs", "Neg", "Exp", "Log", "Sqrt", "Reciprocal", "Clip",
    )

    def analyze(self, node: onnx.NodeProto, ctx: AnalysisContext) -> None:
        state = ctx.state(node.input[0])
        if state is None:
            return
        if any(name and ctx.graph.constant(name) is None for name in node.input[1:]):
            freeze_inputs(node, ctx, f"{node.op_type} with a non-constant parameter")
            return
        ctx.set_state(node.output[0], state)

    def slice(self, node: onnx.NodeProto, member: Member, kept: np.ndarray, channels: int,
              editor: Editor) -> None:
        raise TypeError(f"{node.op_type} node '{node.name}' has no channel parameters")


def _channel_dim(value: np.ndarray, axis_from_end: int) -> int:
    """Size of a broadcast constant along the channel axis (1 when it does not reach it)."""
    aligned = value.ndim + axis_from_end
    return int(value.shape[aligned]) if aligned >= 0 else 1


class ArithmeticHandler(NoWeights):
    """Add, Sub, Mul, Div, Pow, PRelu, Max, Min, Sum, Mean over constants and activations (Pow
    with a constant exponent: the cube in GELU's tanh approximation)."""

    op_types: tuple[str, ...] = ("Add", "Sub", "Mul", "Div", "Pow", "PRelu", "Max", "Min", "Sum",
                                 "Mean")

    def analyze(self, node: onnx.NodeProto, ctx: AnalysisContext) -> None:
        graph = ctx.graph
        states = [ctx.state(name) for name in node.input]
        grouped = [state for state in states if state is not None]
        if not grouped:
            return
        untracked = [name for name, state in zip(node.input, states, strict=True)
                     if state is None and graph.constant(name) is None]
        if untracked:
            freeze_inputs(node, ctx, f"combined with tensor '{untracked[0]}' that carries no "
                                     "channel group")
            return
        constants = [value for name in node.input
                     if (value := graph.constant(name)) is not None]
        if len(grouped) == 1 and isinstance(grouped[0], Mapped):
            if all(value.size == 1 for value in constants):
                ctx.set_state(node.output[0], grouped[0])
            else:
                freeze_inputs(node, ctx, "arithmetic with a non-scalar constant on scattered "
                                         "channels")
            return
        plain = self._coupled(node, grouped, ctx)
        if plain is None:
            return
        sliced = self._check_constants(node, plain, constants, ctx)
        if sliced is None:
            return
        if sliced:
            ctx.add_member(plain.group, Member(node.name, Role.CHANNELWISE,
                                               plain.axis - plain.rank))
        ctx.set_state(node.output[0], plain)

    @staticmethod
    def _coupled(node: onnx.NodeProto, grouped: list[ChannelState],
                 ctx: AnalysisContext) -> Plain | None:
        """Union the groups of all grouped inputs; None (and frozen) if they do not line up."""
        first = grouped[0]
        if not all(isinstance(state, Plain) for state in grouped):
            freeze_inputs(node, ctx, "coupling of scattered channels")
            return None
        plains = [state for state in grouped if isinstance(state, Plain)]
        sizes = {ctx.graph.static_shape(name, node.name)[state.axis]
                 for name in node.input if isinstance(state := ctx.state(name), Plain)}
        lined_up = all(
            state.axis - state.rank == plains[0].axis - plains[0].rank for state in plains
        )
        if not lined_up or len(sizes) != 1 or None in sizes:
            freeze_inputs(node, ctx, "couples activations whose channel axes or counts differ")
            return None
        assert isinstance(first, Plain)
        group = first.group
        for state in plains[1:]:
            group = ctx.union(group, state.group, node.output[0])
        rank = ctx.graph.rank(node.output[0]) or first.rank
        return Plain(group, rank + first.axis - first.rank, rank)

    @staticmethod
    def _check_constants(node: onnx.NodeProto, plain: Plain, constants: list[np.ndarray],
                         ctx: AnalysisContext) -> bool | None:
        """Whether some constant must be sliced; None (and frozen) if one cannot be."""
        axis_from_end = plain.axis - plain.rank
        channels = ctx.graph.static_shape(node.output[0], node.name)[plain.axis]
        sliced = False
        for value in constants:
            size = _channel_dim(value, axis_from_end)
            if value.ndim > plain.rank or size not in (1, channels):
                freeze_inputs(node, ctx, f"constant of shape {value.shape} does not broadcast "
                                         "per channel")
                return None
            sliced = sliced or size > 1
        return sliced

    def slice(self, node: onnx.NodeProto, member: Member, kept: np.ndarray, channels: int,
              editor: Editor) -> None:
        if member.role is Role.HEAD_OPERAND:
            keep_heads_of_operand(node, member.axis, kept, channels, editor)
            return
        for position in range(len(node.input)):
            value = editor.input_value(node, position)
            if value is None or _channel_dim(value, member.axis) != channels:
                continue
            editor.set_input_value(node, position,
                                   np.take(value, kept, axis=value.ndim + member.axis))
