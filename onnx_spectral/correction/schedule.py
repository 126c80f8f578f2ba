"""The order of sequential compensation: passes of groups whose upstream groups are pruned.

A group joins a pass once every prunable group upstream of its taps lies in an earlier pass, so
groups that do not depend on each other share a pass.
"""

from __future__ import annotations

from onnx_spectral.analysis import Analysis, ChannelGroup


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
