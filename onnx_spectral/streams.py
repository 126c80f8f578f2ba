"""Residual streams: where the prunable groups' sinks write, and the taps that measure them.

A sink (the linear layer that absorbs a group's reconstruction) whose output, after a bias or a
scale, is added to another activation of its shape (`ops.residual.stream_partner`) writes into
a residual stream: the attention output and the feed-forward down-projection of every
transformer layer (plain, or summed inside a fused SkipLayerNormalization), the last conv of a
ResNet bottleneck. The error of such a group reaches the rest of the model through the stream;
when every group writes into one, the greedy allocation compares them in the stream's unit
(`selection.stream_unit`) rather than each relative to its own sink's output.

The stream is measured where a group writes into it, on the tensor its output is added to (a
post-norm transformer's LayerNorm output). Each such tensor that is not a group's tap already
gets an energy tap at calibration: a tap of one channel that reads the whole tensor as one row,
whose 1 x 1 Gram matrix is the sum of its squared values over the calibration samples.
"""

from __future__ import annotations

from onnx_spectral.analysis import Analysis, Tap
from onnx_spectral.ops.residual import stream_partner


def stream_writes(analysis: Analysis) -> dict[int, tuple[str, ...]]:
    """Base group id -> the residual stream tensors its sinks' outputs are added to, for the
    groups whose every sink writes into one."""
    graph = analysis.graph
    writes = {}
    for group in analysis.base_groups:
        sinks = {sink.node for tap in group.taps for sink in tap.sinks}
        streams = [stream_partner(graph, graph.nodes_by_name[sink].output[0])
                   for sink in sorted(sinks)]
        if streams and all(stream is not None for stream in streams):
            writes[group.id] = tuple(sorted({s for s in streams if s is not None}))
    return writes


def energy_taps(analysis: Analysis) -> tuple[Tap, ...]:
    """One energy tap (one channel over the whole tensor, no sinks) per stream tensor that is
    not a group's tap already (whose Gram matrix's trace is its energy)."""
    tapped = {tap.tensor for tap in analysis.taps}
    streams = sorted({stream for tensors in stream_writes(analysis).values()
                      for stream in tensors} - tapped)
    return tuple(Tap(stream, 0, 1, ()) for stream in streams)
