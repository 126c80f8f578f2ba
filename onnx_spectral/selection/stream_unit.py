"""The unit the greedy allocation measures a group's loss in.

A group's loss curve (`spectral.GreedyPath.losses`, per calibration row of its tap) is the
energy its sinks' outputs lose. When every group writes into a residual stream (`streams`: a
transformer's heads and feed-forward widths), all their errors reach the model's output through
the stream, so their losses are compared as they are, over one common constant: the mean energy
per row of the stream tensors their outputs are added to. Otherwise (a CNN whose bottlenecks
end on a residual Add but whose other groups feed convs) each group is compared relative to its
own sinks' output energy (`losses[0]`, the loss with every channel dropped), since nothing
relates the unit of a group outside the stream to the stream's.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from onnx_spectral.analysis import Analysis
from onnx_spectral.calibration.collect import Statistics
from onnx_spectral.ops import require_handler
from onnx_spectral.streams import stream_writes


def stream_energy(analysis: Analysis, statistics: Statistics) -> float | None:
    """Mean energy per row (squared norm of one position's channels) of the residual stream
    tensors the groups' outputs are added to, from their energy taps (or, for a stream tensor
    that is a group's tap, its Gram trace); None without streams or without their statistics
    (saved before energy taps existed)."""
    graph = analysis.graph
    tapped = {tap.tensor for tap in analysis.taps}
    writes = stream_writes(analysis)
    widths = {}  # stream tensor -> its channels (its writer's sink outputs)
    for group in analysis.base_groups:
        if group.id in writes and group.taps:
            sink = graph.nodes_by_name[group.taps[0].sinks[0].node]
            for stream in writes[group.id]:
                widths[stream] = require_handler(sink).output_rows(sink, graph).shape[0]
    energies = []
    for stream, width in sorted(widths.items()):
        measured = statistics.taps.get(stream)
        if measured is None or measured.count == 0:
            return None
        if stream in tapped:
            energies.append(float(np.trace(measured.gram)) / measured.count)
        else:
            energies.append(float(measured.gram[0, 0]) / measured.count * width)
    return float(np.mean(energies)) if energies else None


def loss_units(analysis: Analysis, statistics: Statistics,
               own: Mapping[int, float]) -> dict[int, float]:
    """Base group id -> what its losses are divided by: the common stream energy when every
    group writes into a residual stream (and it was measured), else `own[group id]` (its
    losses[0])."""
    writes = stream_writes(analysis)
    everywhere = bool(writes) and all(group.id in writes for group in analysis.base_groups)
    common = stream_energy(analysis, statistics) if everywhere else None
    tiny = np.finfo(np.float64).tiny
    return {group.id: max(common if common is not None else own[group.id], tiny)
            for group in analysis.base_groups}
