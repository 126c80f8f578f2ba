"""Greedy selection of whole blocks of channels: the attention heads of a head group.

A head group's channels are H consecutive blocks of D (head ``h`` owns channels
``h*D .. h*D+D-1`` of Q, K, V and of the context the output projection reads), and only whole
heads can go. The loss of a kept set is the group's spectral loss (`information_loss`: the
weighted residual of the ridge reconstruction of all channels from the kept ones); greedy adds,
step by step, the head whose channels lower it most. With H heads that is H (H + 1) / 2 loss
evaluations, each one ridge solve of at most H*D channels.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from onnx_spectral.errors import OptionsError
from onnx_spectral.selection.spectral import GreedyPath, TapProblem, information_loss


def greedy_select_blocks(problems: Sequence[TapProblem], block: int, k: int) -> GreedyPath:
    """Greedy forward selection of ``k`` channels in whole blocks of ``block``.

    Args:
        problems: the taps of the group, all of the same ``m`` (a multiple of ``block``).
        block: channels per block (D).
        k: channels to choose, a multiple of ``block`` in ``0..m``.

    Returns:
        The path: ``order`` int64 ``[k]`` lists the chosen blocks' channels, block by block in
        the order greedy took them; ``losses`` float64 ``[k + 1]`` holds the exact loss at every
        multiple of ``block`` and the linear interpolation between them.

    Raises:
        OptionsError: ``m`` or ``k`` is not a multiple of ``block``.
    """
    m = problems[0].sigma.shape[0]
    if block < 1 or m % block or k % block or not 0 <= k <= m:
        raise OptionsError(f"blocks of {block} need m ({m}) and k ({k}) to be multiples of it "
                           f"with k <= m")
    blocks = np.arange(m).reshape(-1, block)
    chosen: list[int] = []
    boundary = [information_loss(problems, [])]
    for _ in range(k // block):
        kept = blocks[chosen].reshape(-1)
        candidates = [b for b in range(len(blocks)) if b not in chosen]
        losses = [information_loss(problems, np.concatenate([kept, blocks[b]]))
                  for b in candidates]
        best = int(np.argmin(losses))
        chosen.append(candidates[best])
        boundary.append(max(min(losses[best], boundary[-1]), 0.0))
    steps = np.arange(k + 1)
    curve = np.interp(steps, steps[::block], np.asarray(boundary))
    order = blocks[chosen].reshape(-1).astype(np.int64)
    return GreedyPath(order=order, losses=curve)
