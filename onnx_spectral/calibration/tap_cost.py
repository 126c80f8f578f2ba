"""What the taps' Gram matrices cost against the model, and the position strides that bound it.

A tap with m channels and P positions per sample costs about `g = m^2 P (b + 1) / (2 b)`
multiply-adds per sample for its Gram matrix (b upper block rows, see `instrument`); the sinks
that read it cost `c` MACs. Behind a 3x3 conv the Gram is cheap (m^2 P vs 9 m m_out P); behind a
1x1 conv that narrows the channels (ResNet bottlenecks read their 4x wider residual stream so)
it costs several times the conv itself, and calibration then costs several inferences.

`gram_strides` keeps every position while the taps' Gram matrices together cost at most
`budget` times the model's MACs (or `GRAM_FLOOR`, for small models). Above that, tap t gets
the stride `s_t = ceil(g_t / (a c_t))`, with the largest `a` that meets the budget: only the
taps dearest against their own sinks are subsampled, as little as needed. A stride is capped at
P, and so that the calibration samples still give each channel `MIN_ROWS_PER_CHANNEL` rows.
`instrument` turns a stride s into a grid of positions (every s_h-th row and s_w-th column,
s_h s_w >= s) for an [N, C, H, W] tap, else into every s-th position of the flattened
(batch x positions) axis: a subsample with a fixed pattern as its only bias (border positions
may be over- or under-represented). `tests/test_tap_cost.py` measures the effect on selection.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from onnx_spectral.analysis import Tap
from onnx_spectral.calibration.instrument import gram_blocks
from onnx_spectral.cost import ModelCost, model_cost
from onnx_spectral.graph.model import GraphIndex

_BISECTION_STEPS = 60
#: Gram multiply-adds per sample always allowed: below this a model is calibrated exactly (1,000
#: samples then cost at most 1e11 multiply-adds of Gram, seconds on one core).
GRAM_FLOOR = 10**8
#: Rows (samples x kept positions) per channel a subsampled tap keeps at least: a Gram matrix
#: estimated from fewer is too noisy to select from.
MIN_ROWS_PER_CHANNEL = 8


def positions_per_sample(graph: GraphIndex, tap: Tap) -> int | None:
    """Positions of one sample in the tap tensor (all axes but the channel axis and the batch).

    None when a non-batch dimension is not static.
    """
    dims = graph.shapes.get(tap.tensor)
    if dims is None:
        return None
    positions = 1
    for axis, size in enumerate(dims):
        if axis == tap.axis or (axis == 0 and size in (None, 1)):
            continue
        if size is None:
            return None
        positions *= size
    return positions


def gram_macs(channels: int, positions: int) -> int:
    """Multiply-adds of the blocked Gram matrix of `channels` x `positions`."""
    return sum((stop - start) * (channels - start)
               for start, stop in gram_blocks(channels)) * positions


def _strides(costs: Sequence[tuple[str, int, int, int, int]], share: float) -> dict[str, int]:
    """Stride per tap for the share `share` = a of sink MACs a tap's Gram may cost."""
    return {tensor: min(cap, max(1, math.ceil(gram / (share * sinks))))
            for tensor, gram, sinks, _, cap in costs}


def _largest_stride(positions: int, channels: int, samples: int | None) -> int:
    """The stride that still leaves `MIN_ROWS_PER_CHANNEL` rows per channel over `samples`
    samples (at most `positions`; `positions` when the sample count is not known)."""
    if samples is None:
        return positions
    return max(1, min(positions, positions * samples // (MIN_ROWS_PER_CHANNEL * channels)))


def gram_strides(graph: GraphIndex, taps: Sequence[Tap], budget: float,
                 samples: int | None = None, cost: ModelCost | None = None
                 ) -> Mapping[str, int]:
    """Position stride per tap tensor (only those above 1) for `budget`, as described above.

    `budget` <= 0 turns subsampling off. With the number of calibration `samples`, no tap is
    left fewer than `MIN_ROWS_PER_CHANNEL` rows (samples x kept positions) per channel, even if
    the budget is then exceeded. `cost`: the model's `model_cost` at the shape it runs at
    (default: at its declared shapes).
    """
    if budget <= 0.0 or not taps:
        return {}
    cost = cost if cost is not None else model_cost(graph.model)
    fixed = 0  # Gram MACs of taps that cannot be strided
    costs = []
    for tap in taps:
        positions = positions_per_sample(graph, tap)
        sinks = sum(cost.macs_by_node.get(sink.node, 0) for sink in tap.sinks)
        if positions is None or sinks <= 0:
            fixed += gram_macs(tap.channels, positions or 1)
        else:
            costs.append((tap.tensor, gram_macs(tap.channels, positions), sinks, positions,
                          _largest_stride(positions, tap.channels, samples)))
    allowed = max(budget * cost.macs, GRAM_FLOOR) - fixed
    if sum(gram for _, gram, _, _, _ in costs) <= allowed:
        return {}

    def spent(share: float) -> float:
        strides = _strides(costs, share)
        return sum(gram / strides[tensor] for tensor, gram, _, _, _ in costs)

    low, high = 1e-9, max(gram / sinks for _, gram, sinks, _, _ in costs)  # high: all stride 1
    for _ in range(_BISECTION_STEPS):
        middle = math.sqrt(low * high)
        low, high = (middle, high) if spent(middle) <= allowed else (low, middle)
    return {tensor: stride for tensor, stride in _strides(costs, low).items() if stride > 1}
