"""onnxsim 0.8.1's structured pruning as a baseline, at a whole-model MAC budget.

    from tools.onnxsim_baseline import onnxsim_prune
    result = onnxsim_prune(model, calibration, flops=0.5)   # model: onnx.ModelProto
    if result.model is not None and result.valid:
        onnx.save(result.model, "pruned.onnx")
    print(result.summary())

    python -m tools.onnxsim_baseline MODEL.onnx [--flops 0.5] [--engine python|public]
        (calibrates on random normal inputs of the model's input shapes, dynamic dims = 1)

onnxsim (PyPI ``onnxsim``, pip install onnxsim==0.8.1, the ``bench`` extra) has no MAC target:
every pruning pass takes ``sparsity``, the fraction of each matched producer's output channels
(or attention heads) removed, with at least one kept per chain. Chains it does not match are
left whole, so the MACs kept depend on the model. Its recipe, as run here:

1. ``onnxsim.simplify`` (constant folding, BatchNorm into Conv, Pad into Conv): without it the
   PP-OCR classifier, whose weights sit in ``Constant`` nodes behind unfused BatchNorms, has no
   chain onnxsim can match. Skipped with ``simplify=False`` or when it fails.
2. ``apply_attention_head_wanda_pruning`` (heads ranked by ``||W||_F * ||X||_2``), only when
   the data-free ``apply_attention_head_pruning`` changes the graph (it has attention).
3. Structured Wanda (channels ranked by ``||W_row||_2 * ||X||_2`` at the consumer input):
   ``engine="public"`` calls ``onnxsim.apply_structured_wanda_pruning``, which in 0.8.1 is an
   alias of its C++ port; that port does not walk through ``MaxPool`` (so on the MNIST CNN only
   the classifier is pruned), while onnxsim's pure-Python chain finders, which its public
   ``apply_structured_pruning`` still uses, do. ``engine="python"`` (default) runs those same
   pure-Python finders and slicing with onnxsim's own Wanda statistics helper (the one its
   ``analyze_pruning_sensitivity`` uses): the retired pure-Python Wanda pass, rebuilt from
   onnxsim's private functions.
4. ``apply_pruning_finetune``: a ridge refit of every MatMul/Gemm pruned on at most one axis
   against the unpruned model's activations (no Conv refit).

``sparsity`` is found by bisection so that the MACs kept, counted by this file's own counter
(Conv, ConvTranspose, Gemm, MatMul at the first calibration batch's shapes; not onnx-spectral's
cost model), are at most ``flops`` of the original, or within ``tolerance`` (relative) of it.
In the default per-chain mode the channel counts depend on ``sparsity`` only, not on the
ranking, so the search runs the data-free passes and only the final model is calibrated.

Measured at ``flops=0.5`` (2-core CPU; seconds inside the worker; default engine unless said):
MNIST CNN 49.3% of the MACs, 98.40% on 2,000 test images (original 98.75%; 98.35% without the
refit), 2 s; the public engine reaches only 96.2% (at sparsity 0.99). CREPE tiny: nothing
matched by either engine (``Conv -> Relu -> BatchNorm -> MaxPool``: BatchNorm is no hop of
onnxsim's Conv walk), 100% of the MACs kept. PP-OCR classifier 50.0%, top-1 agreement 51.25%
on 400 page-line crops (public engine 48.75%), 4 s. PP-OCRv4 det (dynamic H, W): at most 68.4%
of the MACs reachable; the pruned model stays valid at other input sizes.

With ``isolate=True`` (default) onnxsim runs in a child interpreter (``python -m
tools.onnxsim_baseline --worker``, arguments and result pickled through a temporary folder), so
that a crash in its C++ core is reported in ``reason`` like any exception instead of ending the
caller; ``seconds`` is measured inside it and leaves out its start-up (about 3 s).
"""

from __future__ import annotations

import argparse
import os
import pickle
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import onnxruntime as ort

Feeds = dict[str, np.ndarray]
Engine = Literal["python", "public"]

_BISECTION_STEPS = 14
_MAX_SPARSITY = 0.99
_MAC_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_STDERR_TAIL = 2000


@dataclass
class OnnxsimResult:
    """What `onnxsim_prune` made of one model at one budget.

    Attributes:
        model: the pruned (and refit) model; None when onnxsim failed.
        macs_before: MACs of the input model at the first calibration batch's shapes.
        macs_after: MACs of `model` at the same shapes (0 when `model` is None).
        sparsity: onnxsim's per-chain channel (and head) sparsity that was used.
        valid: onnx.checker passes, ONNX Runtime loads and runs `model`, and its output names
            and shapes on the first calibration batch equal the input model's.
        within_tolerance: the MACs kept are within `tolerance` of the requested fraction.
        reason: why the model is missing, invalid or off budget; None when all is well.
        seconds: wall time of onnxsim's work (simplify, search, pruning, refit), not checks.
        timings: those seconds per stage.
        steps: the onnxsim passes that were applied, in order.
        notes: things that went wrong without stopping the run (e.g. refit skipped).
    """

    model: onnx.ModelProto | None
    macs_before: int
    macs_after: int
    sparsity: float
    valid: bool
    within_tolerance: bool
    reason: str | None
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)
    steps: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def macs_kept(self) -> float:
        """Fraction of the input model's MACs that the pruned model keeps."""
        return self.macs_after / self.macs_before if self.macs_before else float("nan")

    def summary(self) -> str:
        """One line: MACs kept, sparsity, validity, seconds and any reason."""
        text = (f"MACs {self.macs_before:,} -> {self.macs_after:,} ({100 * self.macs_kept:.1f}%), "
                f"sparsity {self.sparsity:.4f}, valid {self.valid}, {self.seconds:.1f} s, "
                f"steps {'+'.join(self.steps) or '-'}")
        return text + (f"; {self.reason}" if self.reason else "")


# --- MAC counter -------------------------------------------------------------------------


def _concrete(model: onnx.ModelProto, feeds: Feeds) -> onnx.ModelProto:
    """A copy of `model` whose graph inputs have the shapes of `feeds`, with no stale shapes."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    initializers = {init.name for init in out.graph.initializer}
    for value in out.graph.input:
        if value.name in initializers or value.name not in feeds:
            continue
        shape = value.type.tensor_type.shape
        shape.Clear()
        for size in feeds[value.name].shape:
            shape.dim.add().dim_value = int(size)
    del out.graph.value_info[:]
    for value in out.graph.output:
        value.type.tensor_type.ClearField("shape")
    return out


def _static_shape(value: onnx.ValueInfoProto) -> tuple[int, ...] | None:
    tensor = value.type.tensor_type
    if not tensor.HasField("shape"):
        return None
    dims = [dim.dim_value if dim.HasField("dim_value") else -1 for dim in tensor.shape.dim]
    return None if any(size < 0 for size in dims) else tuple(dims)


def tensor_shapes(model: onnx.ModelProto, feeds: Feeds, names: set[str]) -> dict[str, tuple]:
    """Static shapes of `names` (top-level graph tensors) when `model` runs on `feeds`.

    ONNX shape inference (with data propagation) at the shapes of `feeds` first; the tensors it
    leaves unknown are read from one ONNX Runtime run of `feeds` with them as extra outputs.
    """
    concrete = _concrete(model, feeds)
    shapes: dict[str, tuple] = {init.name: tuple(init.dims) for init in model.graph.initializer}
    shapes.update({name: tuple(array.shape) for name, array in feeds.items()})
    try:
        inferred = onnx.shape_inference.infer_shapes(concrete, data_prop=True)
        for value in [*inferred.graph.value_info, *inferred.graph.output]:
            shape = _static_shape(value)
            if shape is not None:
                shapes.setdefault(value.name, shape)
        for node in inferred.graph.node:
            if node.op_type == "Constant":
                for attribute in node.attribute:
                    if attribute.name == "value":
                        shapes.setdefault(node.output[0], tuple(attribute.t.dims))
    except Exception:  # fall back to running the model
        inferred = concrete
    missing = sorted(names - set(shapes))
    if missing:
        known = {value.name: value for value in inferred.graph.value_info}
        probe = onnx.ModelProto()
        probe.CopyFrom(concrete)
        for name in missing:
            value = onnx.ValueInfoProto()
            value.name = name
            if name in known:
                value.type.tensor_type.elem_type = known[name].type.tensor_type.elem_type
            probe.graph.output.append(value)
        session = ort.InferenceSession(probe.SerializeToString(),
                                       providers=["CPUExecutionProvider"])
        for name, array in zip(missing, session.run(missing, feeds), strict=True):
            shapes[name] = tuple(np.asarray(array).shape)
    return shapes


def _int_attribute(node: onnx.NodeProto, name: str, default: int) -> int:
    for attribute in node.attribute:
        if attribute.name == name:
            return int(attribute.i)
    return default


def count_macs(model: onnx.ModelProto, feeds: Feeds) -> int:
    """Multiply-accumulates of the linear nodes of the top-level graph of `model` when it runs
    on `feeds` (whole batch): Conv, ConvTranspose, Gemm and MatMul, their integer forms
    (ConvInteger, MatMulInteger), ONNX Runtime's fusions of them (com.microsoft FusedConv,
    FusedGemm, FusedMatMul) and its fused self-attention (com.microsoft Attention: the QKV
    projection b*s*hidden*3C plus scores and context 2*b*s*s*C); other ops count zero. A model
    whose layers all sit in one If (`onnx_spectral.graph.if_branch`) counts the branch `feeds`
    take."""
    from onnx_spectral.graph.if_branch import take_branch

    model = take_branch(model, lambda: feeds)[0]
    nodes = [node for node in model.graph.node if _mac_kind(node) is not None]
    names = {name for node in nodes for name in (*node.input[:2], node.output[0])}
    shapes = tensor_shapes(model, feeds, names)
    total = 0
    for node in nodes:
        kind = _mac_kind(node)
        x, w, y = shapes[node.input[0]], shapes[node.input[1]], shapes[node.output[0]]
        if kind == "Conv":
            total += int(np.prod(y)) * int(np.prod(w[1:]))
        elif kind == "ConvTranspose":
            total += int(np.prod(x)) * int(np.prod(w[1:]))
        elif kind == "Gemm":
            reduced = x[0] if _int_attribute(node, "transA", 0) else x[1]
            total += int(np.prod(y)) * int(reduced)
        elif kind == "Attention":
            batch, sequence, hidden = x
            channels = int(w[1]) // 3
            total += batch * sequence * (hidden * 3 * channels + 2 * sequence * channels)
        else:
            total += int(np.prod(y)) * int(x[-2] if _int_attribute(node, "transA", 0) else x[-1])
    return total


_MICROSOFT_MAC_OPS = {"FusedConv": "Conv", "FusedGemm": "Gemm", "FusedMatMul": "MatMul",
                      "Attention": "Attention"}


def _mac_kind(node: onnx.NodeProto) -> str | None:
    """How `node`'s MACs are counted (an op type of _MAC_OPS or "Attention"), None if not."""
    if node.domain in ("", "ai.onnx"):
        op = node.op_type.removesuffix("Integer")
        return op if op in _MAC_OPS else None
    if node.domain == "com.microsoft":
        return _MICROSOFT_MAC_OPS.get(node.op_type)
    return None


# --- validity ----------------------------------------------------------------------------


def _run(model: onnx.ModelProto, feeds: Feeds) -> tuple[list[str], list[np.ndarray]]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [meta.name for meta in session.get_outputs()]
    return names, session.run(names, feeds)


def check_valid(original: onnx.ModelProto, pruned: onnx.ModelProto, feeds: Feeds) -> str | None:
    """None when `pruned` passes onnx.checker, runs in ONNX Runtime on `feeds` and has the
    output names and shapes of `original` there; else what is wrong."""
    try:
        onnx.checker.check_model(pruned)
    except Exception as error:
        return f"onnx.checker: {error}"
    try:
        names, outputs = _run(pruned, feeds)
    except Exception as error:
        return f"onnxruntime: {error}"
    reference_names, reference = _run(original, feeds)
    if names != reference_names:
        return f"output names {names} != {reference_names}"
    shapes = [np.shape(array) for array in outputs]
    reference_shapes = [np.shape(array) for array in reference]
    if shapes != reference_shapes:
        return f"output shapes {shapes} != {reference_shapes}"
    return None


# --- onnxsim passes ----------------------------------------------------------------------


def _initializer_shapes(model: onnx.ModelProto) -> dict[str, tuple]:
    return {init.name: tuple(init.dims) for init in model.graph.initializer}


def _python_structured(model: onnx.ModelProto, sparsity: float,
                       calibration: Sequence[Feeds] | None, epsilon: float = 1e-8
                       ) -> onnx.ModelProto:
    """onnxsim's pure-Python structured pruning (the body of its `apply_structured_pruning`);
    with `calibration`, channels are ranked by its Wanda metric ``||W_row|| * ||X||`` using
    its `_wanda_structured_calibration_stats`, as its retired pure-Python
    `apply_structured_wanda_pruning` and its `analyze_pruning_sensitivity` do."""
    from onnxsim import pruning as p

    def finders(graph: onnx.GraphProto) -> tuple[list[Any], list[Any], list[Any]]:
        chains = (p._find_chains(graph) + p._find_gated_chains(graph)
                  + p._find_conv_chains(graph) + p._find_conv_residual_chains(graph)
                  + p._find_conv_se_gate_chains(graph) + p._find_conv_gc_context_chains(graph)
                  + p._find_conv_cbam_channel_gate_chains(graph)
                  + p._find_conv_sk_attention_chains(graph)
                  + p._find_matmul_residual_chains(graph))
        concat = p._find_matmul_concat_chains(graph) + p._find_conv_concat_chains(graph)
        return chains, concat, p._find_split_gated_chains(graph)

    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    act_norm: dict[str, np.ndarray] = {}
    if calibration is not None:
        chains, concat, _ = finders(out.graph)
    if calibration is not None and (chains or concat):
        act_norm = p._wanda_structured_calibration_stats(out, chains, concat, calibration, None)

    def scaled(base: np.ndarray, probe: str) -> np.ndarray:
        norm = act_norm.get(probe)
        if norm is None or norm.shape[0] != base.shape[0]:
            return base
        return base * np.maximum(norm, epsilon)

    def chain_importance(chain: Any, w_nk: list[np.ndarray]) -> np.ndarray:
        return scaled(p._plain_structured_importance(chain, w_nk, "l2"),
                      chain.consumer_node.input[0])

    def branch_importance(operand: str, w_nk: list[np.ndarray]) -> np.ndarray:
        return scaled(p._plain_branch_importance(w_nk, "l2"), operand)

    for graph in p._iter_subgraphs(out.graph):
        chains, concat, split = finders(graph)
        touched = p._TouchedState()
        if chains:
            p._apply_chains(graph, chains, sparsity, chain_importance, touched)
        if concat:
            p._apply_concat_chains(graph, concat, sparsity, branch_importance, touched)
        if split:  # onnxsim ranks split-gated FFNs by weights only, Wanda or not
            p._apply_split_gated_chains(
                graph, split, sparsity, lambda _chain, w_nk: p._plain_branch_importance(w_nk),
                touched)
        if touched.stale_value_info:
            kept = [value for value in graph.value_info
                    if value.name not in touched.stale_value_info]
            del graph.value_info[:]
            graph.value_info.extend(kept)
    return out


def _prune_at(base: onnx.ModelProto, sparsity: float, calibration: Sequence[Feeds] | None,
              engine: Engine, attention: bool) -> onnx.ModelProto:
    """onnxsim's attention-head (when `attention`) then structured pruning of `base` at
    `sparsity`; calibrated (Wanda) with `calibration`, data-free without."""
    import onnxsim

    model = base
    if attention:
        model = (onnxsim.apply_attention_head_pruning(model, sparsity=sparsity)
                 if calibration is None else
                 onnxsim.apply_attention_head_wanda_pruning(
                     model, calibration_data=list(calibration), sparsity=sparsity))
    if engine == "python":
        return _python_structured(model, sparsity, calibration)
    if calibration is None:
        return onnxsim.apply_structured_pruning_cpp(model, sparsity=sparsity)
    return onnxsim.apply_structured_wanda_pruning(model, calibration_data=list(calibration),
                                                  sparsity=sparsity)


def _has_attention(base: onnx.ModelProto) -> bool:
    """Whether onnxsim's attention-head pruning finds heads to remove in `base`."""
    import onnxsim

    pruned = onnxsim.apply_attention_head_pruning(base, sparsity=0.5)
    return (_initializer_shapes(pruned) != _initializer_shapes(base)
            or len(pruned.graph.node) != len(base.graph.node))


def _search(kept_at: Callable[[float], float], flops: float, tolerance: float
            ) -> tuple[float, float, str | None]:
    """Bisect the sparsity whose MACs kept (`kept_at`, non-increasing) meet `flops`: the
    sparsity, its MACs kept and, when the budget is missed, why."""
    top = kept_at(_MAX_SPARSITY)
    if top > flops * (1 + tolerance):
        return _MAX_SPARSITY, top, (f"onnxsim cannot reach {flops:.3f} of the MACs: at sparsity "
                                    f"{_MAX_SPARSITY} it keeps {top:.3f}")
    low, high = 0.0, _MAX_SPARSITY
    low_kept, high_kept = kept_at(low), top
    if low_kept <= flops:
        return low, low_kept, None
    for _ in range(_BISECTION_STEPS):
        middle = 0.5 * (low + high)
        kept = kept_at(middle)
        if kept <= flops:
            high, high_kept = middle, kept
        else:
            low, low_kept = middle, kept
        if flops * (1 - tolerance) <= high_kept <= flops:
            break
    candidates = [(high, high_kept), (low, low_kept)]  # at or below the budget first
    within = [item for item in candidates if abs(item[1] - flops) <= tolerance * flops]
    best, best_kept = within[0] if within else min(candidates, key=lambda c: abs(c[1] - flops))
    if not within:
        return best, best_kept, (f"no sparsity keeps {flops:.3f} of the MACs within "
                                 f"{tolerance:.0%}: closest {best_kept:.4f}")
    return best, best_kept, None


def _prune_inprocess(model: onnx.ModelProto, calibration: list[Feeds], flops: float,
                     engine: Engine, simplify: bool, finetune: bool, tolerance: float
                     ) -> OnnxsimResult:
    feeds = calibration[0]
    timings: dict[str, float] = {}
    steps: list[str] = []
    notes: list[str] = []
    macs_before = count_macs(model, feeds)

    def failed(stage: str, error: BaseException, sparsity: float = float("nan")) -> OnnxsimResult:
        return OnnxsimResult(None, macs_before, 0, sparsity, False, False,
                             f"onnxsim failed in {stage}: {type(error).__name__}: {error}",
                             sum(timings.values()), timings, steps, notes)

    try:
        import onnxsim
    except Exception as error:
        return failed("import", error)
    base = model
    if simplify:
        start = time.perf_counter()
        try:
            simplified, ok = onnxsim.simplify(model)
            if ok:
                base = simplified
                steps.append("simplify")
            else:
                notes.append("onnxsim.simplify could not validate its result; not used")
        except Exception as error:
            notes.append(f"onnxsim.simplify failed, not used: {type(error).__name__}: {error}")
        timings["simplify"] = time.perf_counter() - start

    start = time.perf_counter()
    try:
        attention = _has_attention(base)
    except Exception as error:
        attention = False
        notes.append(f"attention-head pruning failed, skipped: {type(error).__name__}: {error}")
    cache: dict[float, float] = {}

    def kept_at(sparsity: float) -> float:
        if sparsity not in cache:
            cache[sparsity] = count_macs(_prune_at(base, sparsity, None, engine, attention),
                                         feeds) / macs_before
        return cache[sparsity]

    try:
        sparsity, searched, off_budget = _search(kept_at, flops, tolerance)
    except Exception as error:
        timings["search"] = time.perf_counter() - start
        return failed("the sparsity search (data-free passes)", error)
    timings["search"] = time.perf_counter() - start

    start = time.perf_counter()
    try:
        pruned = _prune_at(base, sparsity, calibration, engine, attention)
    except Exception as error:
        timings["prune"] = time.perf_counter() - start
        return failed("calibrated pruning", error, sparsity)
    timings["prune"] = time.perf_counter() - start
    if attention:
        steps.append("attention_head_wanda")
    steps.append("structured_wanda" + ("" if engine == "python" else "_public"))

    if finetune:
        start = time.perf_counter()
        try:
            pruned = onnxsim.apply_pruning_finetune(base, pruned, calibration_data=calibration)
            steps.append("finetune")
        except Exception as error:
            notes.append(f"apply_pruning_finetune failed, model left unrefit: "
                         f"{type(error).__name__}: {error}")
        timings["finetune"] = time.perf_counter() - start

    seconds = sum(timings.values())
    try:
        macs_after = count_macs(pruned, feeds)
    except Exception as error:
        macs_after = 0
        notes.append(f"MACs of the pruned model not counted: {type(error).__name__}: {error}")
    if macs_after and abs(macs_after / macs_before - searched) > 1e-9:
        notes.append(f"calibrated pruning kept {macs_after / macs_before:.4f} of the MACs, the "
                     f"data-free search {searched:.4f}")
    invalid = check_valid(model, pruned, feeds)
    kept = macs_after / macs_before if macs_before else float("nan")
    within = abs(kept - flops) <= tolerance * flops
    reason = "; ".join(text for text in (invalid, off_budget) if text) or None
    if reason is None and not within:
        reason = f"MACs kept {kept:.4f}, target {flops:.3f}"
    return OnnxsimResult(pruned, macs_before, macs_after, sparsity, invalid is None, within,
                         reason, seconds, timings, steps, notes)


def onnxsim_prune(model: onnx.ModelProto, calibration: list[dict[str, np.ndarray]],
                  flops: float, *, engine: Engine = "python", simplify: bool = True,
                  finetune: bool = True, tolerance: float = 0.02, isolate: bool = True,
                  timeout: float | None = None) -> OnnxsimResult:
    """Prune `model` with onnxsim 0.8.1 to about `flops` of its MACs (see the module docstring).

    Args:
        model: the model to prune (not modified).
        calibration: input batches ``{input name: array}``, onnxsim's calibration format; the
            first batch also fixes the shapes at which MACs are counted and validity checked.
        flops: fraction of the MACs to keep, in (0, 1].
        engine: "python" (onnxsim's pure-Python chain finders with its Wanda metric) or
            "public" (``onnxsim.apply_structured_wanda_pruning``, its C++ port).
        simplify: run ``onnxsim.simplify`` first.
        finetune: run ``onnxsim.apply_pruning_finetune`` last.
        tolerance: relative tolerance of the MACs kept around `flops`.
        isolate: run onnxsim in a child interpreter, so that a crash is reported, not fatal.
        timeout: seconds before the child interpreter is given up on (with `isolate`).

    Returns:
        The pruned model (None on failure), MACs before and after, validity, seconds, and the
        reason for any failure. Never raises for a failure inside onnxsim.
    """
    if not calibration:
        raise ValueError("onnxsim_prune needs at least one calibration batch")
    if not 0.0 < flops <= 1.0:
        raise ValueError(f"flops must be in (0, 1], got {flops}")
    arguments = (model, list(calibration), flops, engine, simplify, finetune, tolerance)
    if not isolate:
        try:
            return _prune_inprocess(*arguments)
        except Exception as error:
            return OnnxsimResult(None, 0, 0, float("nan"), False, False,
                                 f"{type(error).__name__}: {error}", 0.0)
    return _in_child(arguments, timeout)


def _in_child(arguments: tuple[Any, ...], timeout: float | None) -> OnnxsimResult:
    """`_prune_inprocess(*arguments)` in a fresh interpreter (``python -m
    tools.onnxsim_baseline --worker``), arguments and result passed as pickles."""
    with tempfile.TemporaryDirectory(prefix="onnxsim_baseline_") as scratch:
        request, reply = Path(scratch) / "request.pkl", Path(scratch) / "reply.pkl"
        request.write_bytes(pickle.dumps(arguments))
        root = str(Path(__file__).resolve().parent.parent)
        path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
        command = [sys.executable, "-m", "tools.onnxsim_baseline", "--worker", str(request),
                   str(reply)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                                  cwd=root, env={**os.environ, "PYTHONPATH": path}, check=False)
        except subprocess.TimeoutExpired:
            reason = f"onnxsim took more than {timeout} s"
        else:
            if done.returncode == 0 and reply.is_file():
                result: OnnxsimResult = pickle.loads(reply.read_bytes())
                return result
            reason = (f"the onnxsim process ended with exit code {done.returncode} (a crash in "
                      f"onnxsim's C++ core?): {done.stderr[-_STDERR_TAIL:].strip()}")
    return OnnxsimResult(None, 0, 0, float("nan"), False, False, reason, 0.0)


def _worker(request: str, reply: str) -> None:
    # Imported by name, not used from __main__, so that the result unpickles in the parent.
    from tools.onnxsim_baseline import OnnxsimResult, _prune_inprocess

    arguments = pickle.loads(Path(request).read_bytes())
    try:
        result = _prune_inprocess(*arguments)
    except Exception as error:
        result = OnnxsimResult(None, 0, 0, float("nan"), False, False,
                               f"{type(error).__name__}: {error}", 0.0)
    Path(reply).write_bytes(pickle.dumps(result))


def _random_calibration(model: onnx.ModelProto, batches: int, seed: int) -> list[Feeds]:
    rng = np.random.default_rng(seed)
    initializers = {init.name for init in model.graph.initializer}
    inputs = [value for value in model.graph.input if value.name not in initializers]
    feeds = []
    for _ in range(batches):
        batch = {}
        for value in inputs:
            tensor = value.type.tensor_type
            shape = [dim.dim_value if dim.HasField("dim_value") else 1 for dim in tensor.shape.dim]
            dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)
            batch[value.name] = rng.standard_normal(shape).astype(dtype)
        feeds.append(batch)
    return feeds


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:
        _worker(sys.argv[2], sys.argv[3])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--flops", type=float, default=0.5)
    parser.add_argument("--engine", choices=("python", "public"), default="python")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--output", help="where to save the pruned model")
    args = parser.parse_args()
    model = onnx.load(args.model)
    result = onnxsim_prune(model, _random_calibration(model, args.batches, seed=0), args.flops,
                           engine=args.engine)
    print(result.summary())
    for note in result.notes:
        print("note:", note)
    if args.output and result.model is not None:
        onnx.save(result.model, args.output)


if __name__ == "__main__":
    main()
