"""The baselines' choice of channels: filter L1 norm (Li et al. 2017) or random channels,
with the same structure as the spectral choice (whole heads, balanced lanes)."""

from __future__ import annotations

from typing import Literal

import numpy as np

from onnx_spectral.analysis import Analysis, ChannelGroup
from onnx_spectral.errors import OptionsError
from onnx_spectral.ops import require_handler

Selection = Literal["spectral", "l1", "random"]


def l1_norm_order(weight_rows: np.ndarray) -> np.ndarray:
    """Channels by decreasing L1 norm of the producer's output rows (Li et al. baseline).

    Args:
        weight_rows: ``[m, ...]`` producer weight, one row (of any shape) per output channel.

    Returns:
        int64 ``[m]`` channel indices, largest L1 norm first, lowest index first on ties.

    Raises:
        OptionsError: ``weight_rows`` is 0-D or holds NaN/inf.
    """
    rows = np.asarray(weight_rows, dtype=np.float64)
    if rows.ndim == 0:
        raise OptionsError("weight_rows must have a leading channel axis, got a scalar")
    if not np.all(np.isfinite(rows)):
        raise OptionsError("weight_rows holds NaN or infinite values")
    norms = np.abs(rows.reshape(rows.shape[0], -1)).sum(axis=1)
    return np.argsort(-norms, kind="stable").astype(np.int64)


def l1_norms(analysis: Analysis, group: ChannelGroup) -> np.ndarray:
    """[m] the producers' L1 norm of each output channel."""
    graph = analysis.graph
    norms = np.zeros(group.channels)
    for producer in group.producers:
        node = graph.nodes_by_name[producer]
        rows = require_handler(node).output_rows(node, graph).astype(np.float64)
        norms += np.abs(rows.reshape(rows.shape[0], -1)).sum(axis=1)
    return norms


def baseline_kept(analysis: Analysis, group: ChannelGroup, width: int,
                  selection: Selection) -> np.ndarray:
    """L1-norm channels (or heads), or random ones (seeded by the group id) for the random
    baseline; `width / lanes` from each lane of a group with lanes."""
    if group.lanes > 1:
        size = group.channels // group.lanes
        rng = np.random.default_rng(group.id)
        norms = l1_norms(analysis, group) if selection != "random" else None
        return np.concatenate([
            start + (rng.permutation(size) if norms is None
                     else l1_norm_order(norms[start:start + size]))[: width // group.lanes]
            for start in range(0, group.channels, size)])
    blocks = group.channels // group.block
    if selection == "random":
        order = np.random.default_rng(group.id).permutation(blocks)
    else:
        order = l1_norm_order(l1_norms(analysis, group).reshape(-1, group.block))
    chosen = order[: width // group.block]
    return (chosen[:, None] * group.block + np.arange(group.block)).reshape(-1)
