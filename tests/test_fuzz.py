"""Property-based fuzzer: random CNN graphs (tests/fuzz_graphs.py) through `compress`.

For every generated graph and budget (`ratio`, or `flops`/`params` on a graph with a Concat or
Split on the channel axis):

- no internal error: `compress` returns, or raises an onnx_spectral error (`SpectralError`)
  that names a node or tensor of the model, or says that a budget cannot be met;
- each channel group is pruned (to ceil(ratio * channels) under `ratio`, summed over its parts
  when a Concat or Split cuts it; to at least one channel under a budget) or frozen with a
  reason; a Conv producing a group alone has as many filters as the report says it kept; no
  cost (parameters, MACs) grows;
- under a budget, the MACs (`flops`) or parameters (`params`) of the compressed model, as
  `Report.cost_after` counts them, are at most the budget times `Report.cost_before` (plus
  rounding); MACs that cannot be counted are warned about;
- the same graph stored otherwise (IR 3, Constant nodes, float16: its `canonical` form) or with
  its spatial dims unknown instead of named (`unnamed`) is accepted or refused alike and gives
  the same groups (and, under `ratio` in float32, the same widths);
- the output passes the full ONNX checker and runs in ONNX Runtime with the original inputs,
  output names and shapes;
- a graph with inputs that share no sample axis (a scalar gain, a recurrent initial state with
  the batch on axis 1) is calibrated as a user would feed it: one feed dict per sample (a run);
- with every channel kept (ratio 1, ridge 1e-9) it reproduces the original outputs (to 1e-3 in
  float32, 2e-2 in float16) and its report's held-out relative errors are at most 10x that.

CI runs 200 examples (a fixed, derandomized sequence). The long run:

    ONNX_SPECTRAL_FUZZ_EXAMPLES=5000 python -m pytest -q tests/test_fuzz.py

To see every distinct failure of a run at once (hypothesis stops at the first), with the
smallest graph of each saved: `python -m tests.fuzz_survey --help`.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, currently_in_test_context, given, note, settings
from hypothesis import event as hypothesis_event
from hypothesis import strategies as st
from onnx import helper

from onnx_spectral import compress
from onnx_spectral.calibration.sources import batching_problem, model_input_specs
from onnx_spectral.errors import GraphError, SpectralError
from onnx_spectral.report import Report
from onnx_spectral.selection.widths import ALLOCATIONS
from tests.fuzz_graphs import canonical, cnn_graphs, unnamed
from tests.fuzz_regressions import REGRESSIONS, Regression

EXAMPLES = int(os.environ.get("ONNX_SPECTRAL_FUZZ_EXAMPLES", "200"))
FAST: dict[str, Any] = {"provider": "cpu", "calib_samples": 16, "verify_samples": 4,
                        "batch_size": 8}
FRACTIONS = st.sampled_from([0.25, 0.5, 0.75])
BUDGETS = st.sampled_from([0.25, 0.5, 0.75, 0.9])
"""Budget fractions: small graphs often cannot go below 0.5 (frozen groups), hence 0.9."""


def event(name: str) -> None:
    """A hypothesis event (statistics), when run by hypothesis."""
    if currently_in_test_context():
        hypothesis_event(name)


def _half(model: onnx.ModelProto) -> bool:
    """Whether the model computes in float16 (float16 weights or a Cast to float16)."""
    half = onnx.TensorProto.FLOAT16
    return (any(tensor.data_type == half for tensor in model.graph.initializer)
            or any(attribute.t.data_type == half or attribute.i == half
                   for node in model.graph.node if node.op_type in ("Constant", "Cast")
                   for attribute in node.attribute))


@st.composite
def cases(draw: st.DrawFn) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """A graph and the budget options: `ratio`, or `flops`/`params` with an allocation."""
    budget = draw(st.sampled_from(["ratio", "flops", "params"]))
    model = draw(cnn_graphs(channel_cut=budget != "ratio"))
    if budget == "ratio":
        return model, {"ratio": draw(FRACTIONS)}
    return model, {budget: draw(BUDGETS), "allocation": draw(st.sampled_from(ALLOCATIONS))}


def _inputs(model: onnx.ModelProto, samples: int, seed: int) -> dict[str, np.ndarray]:
    """Random data for every graph input that is not an initializer, in its dtype: the batch
    'N' holds `samples`, other symbolic or unknown dims get size 5."""
    rng = np.random.default_rng(seed)
    constants = {tensor.name for tensor in model.graph.initializer}
    feeds = {}
    for value in model.graph.input:
        if value.name in constants:
            continue
        dims = [samples if d.dim_param == "N" else d.dim_value or 5
                for d in value.type.tensor_type.shape.dim]
        dtype = helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
        feeds[value.name] = rng.standard_normal(dims).astype(dtype)
    return feeds


def _calibration(model: onnx.ModelProto, samples: int, seed: int
                 ) -> dict[str, np.ndarray] | list[dict[str, np.ndarray]]:
    """`_inputs` as a user gives them: one batch, or one feed dict per sample (a run) when the
    inputs share no sample axis (a scalar, a state with the batch on axis 1)."""
    feeds = _inputs(model, samples, seed)
    if batching_problem(model_input_specs(model)) is None:
        return feeds
    axes = {value.name: next((axis for axis, d in enumerate(value.type.tensor_type.shape.dim)
                              if d.dim_param == "N"), None)
            for value in model.graph.input if value.name in feeds}
    return [{name: array if axes[name] is None
             else np.take(array, [index], axis=axes[name]) for name, array in feeds.items()}
            for index in range(samples)]


def _run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(names, feed), strict=True))


def _values(values: Any, skip: frozenset[str] = frozenset()
            ) -> list[tuple[str, int, list[str | int]]]:
    """(name, elem type, dims) of graph inputs or outputs, leaving out the names in `skip`."""
    return [(value.name, value.type.tensor_type.elem_type,
             [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim])
            for value in values if value.name not in skip]


def _interface(model: onnx.ModelProto) -> tuple[list[Any], list[Any]]:
    """The data inputs (not initializers) and the outputs, with types and shapes."""
    constants = frozenset(tensor.name for tensor in model.graph.initializer)
    return _values(model.graph.input, constants), _values(model.graph.output)


def _names(model: onnx.ModelProto) -> set[str]:
    nodes = {node.name for node in model.graph.node}
    tensors = {name for node in model.graph.node for name in [*node.input, *node.output]}
    return (nodes | tensors | {value.name for value in model.graph.input}) - {""}


def _check_refusal(model: onnx.ModelProto, error: SpectralError, options: dict[str, Any]
                   ) -> None:
    """A refusal must name a node or tensor of the model, or say that the budget is not met."""
    message = str(error)
    event(f"refused: {type(error).__name__}")
    if isinstance(error, GraphError) and (error.node or error.tensor):
        return
    if re.search(r"budget|cannot be met", message) and ("flops" in options or "params" in options):
        return
    quoted = set(re.findall(r"'([^']+)'", message))
    assert quoted & _names(model), f"the refusal names no node or tensor: {message}"


Outcome = tuple[onnx.ModelProto, Report] | SpectralError
"""What `compress` returned, or the clear onnx_spectral error it refused with."""


def _compress(model: onnx.ModelProto,
              calibration: dict[str, np.ndarray] | list[dict[str, np.ndarray]], **options: Any
              ) -> Outcome:
    try:
        return compress(model, calibration, **options, **FAST)
    except SpectralError as error:
        _check_refusal(model, error, options)
        return error


def _check_groups(report: Report, options: dict[str, Any]) -> None:
    """Each group pruned to its width or frozen with a reason; no cost grows."""
    assert report.cost_after.params <= report.cost_before.params, report.cost_after
    assert report.cost_after.macs <= report.cost_before.macs, report.cost_after
    pruned = sum(not group.frozen for group in report.groups)
    event(f"groups pruned: {min(pruned, 3)}{'+' if pruned >= 3 else ''}")
    event(f"groups frozen: {min(len(report.groups) - pruned, 3)}")
    for group in report.groups:
        if group.frozen:
            assert group.kept == group.channels and all(group.frozen), group
        elif "ratio" in options:  # ceil(ratio * m), or per part when a Concat/Split cuts it
            assert math.ceil(options["ratio"] * group.channels) <= group.kept, group
        assert 1 <= group.kept <= group.channels, group


def _check_widths(compressed: onnx.ModelProto, report: Report) -> None:
    """Each Conv that alone produces a group has as many filters as the report says it kept."""
    nodes = {node.name: node for node in compressed.graph.node}
    weights = {tensor.name: tensor for tensor in compressed.graph.initializer}
    for group in report.groups:
        node = nodes.get(group.producers[0]) if len(group.producers) == 1 else None
        if node is not None and node.op_type == "Conv" and node.input[1] in weights:
            assert weights[node.input[1]].dims[0] == group.kept, (
                f"Conv '{node.name}' has {weights[node.input[1]].dims[0]} filters, the report "
                f"says {group.kept} kept")


def _check_budget(report: Report, options: dict[str, Any]) -> None:
    """Cost after <= fraction * cost before, when something was pruned; else a warning."""
    kind = "flops" if "flops" in options else "params"
    before, after = ((report.cost_before.macs, report.cost_after.macs) if kind == "flops"
                     else (report.cost_before.params, report.cost_after.params))
    event(f"{kind} budget: {'met' if after <= options[kind] * before else 'over'}")
    pruned = any(not group.frozen for group in report.groups)
    if kind == "flops" and report.cost_before.uncounted and pruned:
        assert any("MAC" in warning or "budget" in warning for warning in report.warnings), (
            f"--flops on a model whose MACs are not all counted (uncounted nodes "
            f"{report.cost_before.uncounted}) gave no warning\nwarnings: {report.warnings}")
    if pruned:
        assert after <= options[kind] * before + 1e-6 * before + 1, (
            f"{kind}: kept {after} of {before} ({after / max(before, 1):.4f}), budget "
            f"{options[kind]}")
    elif after > options[kind] * before:
        assert any("budget" in warning or "prunable" in warning
                   for warning in report.warnings), report.warnings


def _groups(report: Report, widths: bool) -> list[tuple[Any, ...]]:
    return [(group.producers, group.channels, bool(group.frozen))
            + ((group.kept,) if widths else ()) for group in report.groups]


def _check_same_groups(result: Outcome, model: onnx.ModelProto, options: dict[str, Any]
                       ) -> None:
    """The IR-3 convention, Constant nodes, float16 and naming the spatial dims change no group
    (nor, under `ratio`, its width): `result` for `model` is what its `canonical` form and its
    `unnamed` form (spatial dims unknown) give."""
    for form, other in (("canonical (float32, initializers, current IR)", canonical(model)),
                        ("unnamed (spatial dims unknown)", unnamed(model))):
        if other.SerializeToString() == model.SerializeToString():
            continue
        expected = _compress(other, _calibration(other, 20, seed=1), **options)
        variant = model.doc_string.split(";")[0]
        assert isinstance(result, SpectralError) == isinstance(expected, SpectralError), (
            f"{_outcome(result)}, while its {form} form is {_outcome(expected)}\n{variant}")
        if not isinstance(result, SpectralError) and not isinstance(expected, SpectralError):
            widths = "ratio" in options and not _half(model)
            assert _groups(result[1], widths) == _groups(expected[1], widths), (
                f"the groups differ from its {form} form's\n{variant}\n"
                f"{_groups(result[1], widths)}\n{_groups(expected[1], widths)}")


def _outcome(outcome: Outcome) -> str:
    if isinstance(outcome, SpectralError):
        return f"refused ({type(outcome).__name__}: {outcome})"
    return "accepted"


def _spatial(match: re.Match[str]) -> str:
    symbolic = sum(not dim.isdigit() for dim in match.groups())
    return f"spatial: {['static', 'one symbolic', 'symbolic'][symbolic]}"


def check_case(model: onnx.ModelProto, options: dict[str, Any]) -> None:
    """Every property of the module docstring, for one graph and budget options."""
    calibration = _calibration(model, 20, seed=1)
    fresh = _inputs(model, 3, seed=2)
    want = _run(model, fresh)
    half = _half(model)

    result = _compress(model, calibration, **options)
    _check_same_groups(result, model, options)
    if not isinstance(result, SpectralError):
        compressed, report = result
        _check_groups(report, options)
        _check_widths(compressed, report)
        if "ratio" not in options:
            _check_budget(report, options)
        onnx.checker.check_model(compressed, full_check=True)
        assert _interface(compressed) == _interface(model), (
            f"declared inputs/outputs changed\n{_interface(model)}\n{_interface(compressed)}")
        got = _run(compressed, fresh)
        assert list(got) == list(want)
        for name in want:
            assert got[name].shape == want[name].shape, name
            assert np.isfinite(got[name]).all(), name

    result = _compress(model, calibration, ratio=1.0, ridge=1e-9)
    if isinstance(result, SpectralError):
        return
    whole, report = result
    assert all(group.kept == group.channels for group in report.groups)
    got = _run(whole, fresh)
    tolerance = 2e-2 if half else 1e-3
    for output in report.verification.outputs if report.verification else ():
        assert output.relative_error <= 10 * tolerance, (  # False for NaN
            f"held-out relative error {output.relative_error} with every channel kept", output)
    for name in want:
        scale = float(np.abs(want[name].astype(np.float64)).max())
        np.testing.assert_allclose(got[name].astype(np.float64), want[name], rtol=tolerance,
                                   atol=tolerance * scale, err_msg=name)


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=cases())
def test_random_graphs(case: tuple[onnx.ModelProto, dict[str, Any]]) -> None:
    model, options = case
    note(f"{model.doc_string}; options {options}")
    variant, spatial, _, head, extra = model.doc_string.split("; ")
    for kind in [*variant[len("Variant("):-1].split(", "), spatial, head.split(" ->")[0], extra]:
        event(re.sub(r"input \[N, \d+, (\w+), (\w+)\]", _spatial, kind))
    check_case(model, options)


@pytest.mark.parametrize("regression", [
    pytest.param(item, id=item.name, marks=[] if item.failure is None
                 else [pytest.mark.xfail(reason=item.failure, strict=False)])
    for item in REGRESSIONS])
def test_regression(regression: Regression) -> None:
    """The smallest graphs of the failures the fuzzer found (tests/fuzz_regressions.py)."""
    model = regression.build()
    check_case(model, regression.options)
    if regression.same_groups_as is not None:
        other = regression.same_groups_as()
        got, want = (_compress(graph, _calibration(graph, 20, seed=1), **regression.options)
                     for graph in (model, other))
        assert not isinstance(got, SpectralError) and not isinstance(want, SpectralError)
        assert _groups(got[1], widths=True) == _groups(want[1], widths=True)
