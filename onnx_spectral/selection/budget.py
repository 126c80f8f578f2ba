"""Whole-model budgets (`flops`, `params`): can they be met, and were they."""

from __future__ import annotations

import onnx

from onnx_spectral.analysis import Analysis
from onnx_spectral.cost import ModelCost
from onnx_spectral.errors import OptionsError, UnsupportedGraphError
from onnx_spectral.selection.group_cost import GroupCosts, group_costs
from onnx_spectral.selection.plan import PlanOptions
from onnx_spectral.selection.widths import check_budget

_INTEGER_LINEAR_OPS = frozenset({"ConvInteger", "MatMulInteger", "QLinearConv", "QLinearMatMul",
                                 "DynamicQuantizeLSTM", "DynamicQuantizeMatMul",
                                 "MatMulIntegerToFloat", "QGemm"})
"""Quantized linear ops: their weights are integers, so no MAC or float weight is counted."""

BUDGET_TOLERANCE = 0.005
"""Share of the full cost by which a compressed model may exceed its flops/params budget."""


def nothing_prunable(analysis: Analysis,
                     remedy: str = "--allow-unchanged writes the model anyway") -> str:
    """Why no group can be pruned, for an error: the frozen reasons (or why linear layers
    start no group), and `remedy`."""
    reasons = (sorted({reason for group in analysis.groups for reason in group.frozen})
               or list(analysis.kept_layers))
    shown = "; ".join(reasons[:3]) + ("; ..." if len(reasons) > 3 else "")
    return (f"no channel group of the model can be pruned ({len(analysis.groups)} groups, all "
            f"frozen: {shown or 'the model has no Conv/Gemm/MatMul producer'}); "
            f"`onnx-spectral analyze` lists why, {remedy}")


def budget_costs(analysis: Analysis, cost: ModelCost, plan_options: PlanOptions,
                 require_prunable: bool, reference: ModelCost | None = None
                 ) -> GroupCosts | None:
    """The cost model of the group widths under a flops/params budget (None without one),
    once it is known that the budget can be met: before any calibration. `cost`: the analyzed
    model's; `reference`: the cost budgets are fractions of, when not `cost` (`group_costs`).

    Raises:
        OptionsError: the MACs (under `flops`) are not known at the shape the model runs at,
            or even the narrowest widths allowed keep more than the budget.
        UnsupportedGraphError: no channel group is prunable, so no budget below 1 can be met.
    """
    if not plan_options.budgeted:
        return None
    flops = plan_options.flops is not None
    name, what = ("--flops", "MACs") if flops else ("--params", "parameters")
    fraction = plan_options.flops if flops else plan_options.params
    assert fraction is not None
    if flops and not cost.complete:
        raise OptionsError(f"{name} {fraction}: the MACs are not known at the shape the model "
                           f"runs at: {cost.missing_shape_text()}")
    if (cost.macs if flops else cost.params) <= 0:
        integer = [f"{node.op_type} '{node.name}'" for node in analysis.graph.nodes
                   if node.op_type in _INTEGER_LINEAR_OPS]
        if integer:
            raise UnsupportedGraphError(
                f"{name} {fraction} cannot be met: the model's linear layers are integer "
                f"(quantized) ops, kept whole: {', '.join(integer[:3])}"
                f"{' ...' if len(integer) > 3 else ''}; prune the float model, then quantize")
        nested = [f"{node.op_type} node '{node.name}'" for node in analysis.graph.nodes
                  if any(attribute.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                         for attribute in node.attribute)]
        where = (f"; the layers are inside the subgraphs of {', '.join(nested[:3])}, which "
                 "onnx-spectral neither counts nor prunes" if nested else "")
        raise UnsupportedGraphError(
            f"{name} {fraction} cannot be met: the model has no {what} to keep a share of (no "
            f"Conv/Gemm/MatMul layer or floating-point weight of the main graph is counted)"
            f"{where}")
    if not analysis.prunable and fraction == 1.0 and require_prunable:
        raise UnsupportedGraphError(nothing_prunable(analysis))
    if not analysis.prunable and fraction < 1.0:
        raise UnsupportedGraphError(
            f"{name} {fraction} cannot be met: the model keeps 100% of its {what}; "
            + nothing_prunable(analysis, "--ratio 1 with --allow-unchanged writes "
                                "it unchanged"))
    costs = group_costs(analysis, cost, reference)
    check_budget(costs.macs if flops else costs.params, fraction, plan_options.round_to,
                 plan_options.min_keep, name)
    return costs


def check_budget_met(before: ModelCost, after: ModelCost, flops: float | None,
                     params: float | None) -> None:
    """Raise OptionsError when the compressed model keeps more than its flops/params budget
    (beyond `BUDGET_TOLERANCE`), with the figures."""
    checks = (("--flops", flops, before.macs, after.macs,
               f"MACs at {before.shape_text()}"),
              ("--params", params, before.params, after.params, "parameters"))
    for name, fraction, full, kept, what in checks:
        if fraction is not None and full > 0 and kept / full > fraction + BUDGET_TOLERANCE:
            raise OptionsError(
                f"{name} {fraction} was not met: the compressed model keeps {kept / full:.4f} "
                f"({kept:,} of {full:,} {what}); the width allocation's cost model disagrees "
                "with the rewritten model (please report this)")
