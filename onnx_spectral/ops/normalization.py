"""Per-channel normalizations: BatchNormalization and InstanceNormalization (axis 1)."""

from __future__ import annotations

import numpy as np
import onnx

from onnx_spectral.ops.base import (
    AnalysisContext,
    Editor,
    Member,
    NoWeights,
    Plain,
    Role,
    freeze_inputs,
)


class NormalizationHandler(NoWeights):
    """Their scale, bias (and BN's mean and variance) inputs are sliced to the kept channels."""

    op_types = ("BatchNormalization", "InstanceNormalization")

    def analyze(self, node: onnx.NodeProto, ctx: AnalysisContext) -> None:
        state = ctx.state(node.input[0])
        if state is None:
            return
        if not isinstance(state, Plain) or state.axis != 1:
            freeze_inputs(node, ctx, f"{node.op_type} normalizes an axis other than channels")
            return
        if any(ctx.graph.constant(name) is None for name in node.input[1:]):
            freeze_inputs(node, ctx, f"{node.op_type} with non-constant parameters")
            return
        if any(ctx.graph.consumers.get(name) for name in node.output[1:] if name):
            freeze_inputs(node, ctx, f"{node.op_type} in training mode (running statistics "
                                     "are read)")
            return
        ctx.add_member(state.group, Member(node.name, Role.CHANNELWISE, 1))
        ctx.set_state(node.output[0], state)

    def slice(self, node: onnx.NodeProto, member: Member, kept: np.ndarray, channels: int,
              editor: Editor) -> None:
        for position in range(1, len(node.input)):
            value = editor.input_value(node, position)
            assert value is not None
            editor.set_input_value(node, position, value[kept])
