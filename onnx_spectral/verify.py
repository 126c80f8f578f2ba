"""Original vs compressed on held-out data: per-output agreement and per-tap reconstruction.

Nothing here changes a model; these are the figures the report shows the user.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort

from onnx_spectral.calibration.collect import TapStatistics, calibrate
from onnx_spectral.calibration.instrument import Instrumented
from onnx_spectral.calibration.sources import FeedDict
from onnx_spectral.errors import ModelError, ResourceError, RewriteError
from onnx_spectral.graph.executor import (
    Batch,
    Executor,
    LocalExecutor,
    Sums,
    WorkerCache,
    total_samples,
)
from onnx_spectral.graph.sessions import Provider, is_out_of_memory, open_session
from onnx_spectral.selection.plan import GroupPlan


@dataclass(frozen=True)
class OutputAgreement:
    """How one model output of the compressed model agrees with the original's.

    `relative_error`: ||y' - y|| / ||y|| over all held-out samples. `cosine`: mean over samples
    of the cosine similarity of the flattened outputs. `top1_agreement`: share of samples whose
    argmax over the last axis is the same (None for outputs with a last axis of size 1).
    Outputs that are not numbers (booleans, labels as strings) compare by equality: the error is the
    share of differing elements, the cosine the share of equal ones.
    """

    name: str
    relative_error: float
    cosine: float
    top1_agreement: float | None


@dataclass(frozen=True)
class Verification:
    samples: int
    outputs: tuple[OutputAgreement, ...]


QUANTIZATION_LOSS = 0.05
"""Loss of held-out cosine or top-1 agreement, from the float to the quantized model, past
which the report warns."""


def quantization_warning(written: Verification | None, floating: Verification | None,
                         quantize: str) -> str | None:
    """A warning when the quantized model written agrees with the original clearly less than
    the float model before quantization did (None otherwise, or without both figures)."""
    if written is None or floating is None:
        return None
    for quantized, plain in zip(written.outputs, floating.outputs, strict=True):
        pairs = [("cosine", quantized.cosine, plain.cosine)]
        if quantized.top1_agreement is not None and plain.top1_agreement is not None:
            pairs.append(("top-1 agreement", quantized.top1_agreement, plain.top1_agreement))
        for what, after, before in pairs:
            if before - after > QUANTIZATION_LOSS:
                return (f"quantizing the pruned model ({quantize}) lowers the {what} of output "
                        f"'{quantized.name}' from {before:.4g} to {after:.4g} on held-out "
                        "samples; --quantize none writes the float model")
    return None


def _open(model: onnx.ModelProto, provider: Provider, role: str) -> ort.InferenceSession:
    try:
        return open_session(model, provider)
    except Exception as exc:
        raise _failure(exc, role) from exc


def check_input_runs(model: onnx.ModelProto, feeds: FeedDict, provider: Provider,
                     where: str) -> None:
    """Raise ModelError when ONNX Runtime cannot run the input `model` on `feeds` (`where`
    names them, e.g. "calibration samples 0..7")."""
    try:
        session = open_session(model, provider)
        session.run(None, dict(feeds))
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidArgument types
        if is_out_of_memory(exc):
            return
        raise ModelError(f"ONNX Runtime cannot run the input model on {where}: {exc}") from exc


def _failure(exc: Exception, role: str) -> Exception:
    """The error of running the `role` ("input", "compressed") model on held-out batches."""
    if is_out_of_memory(exc):
        return ResourceError(f"out of memory running the {role} model on held-out batches: "
                             f"{exc}; lower --batch-size")
    kind = ModelError if role == "input" else RewriteError
    return kind(f"ONNX Runtime cannot run the {role} model on held-out samples: {exc}")


AgreementSums = dict[int, list[float]]
"""Per output (by position): [squared error, squared reference, summed cosines, rows, top-1
matches, top-1 rows, 1 per batch] for numbers; for other outputs [differing elements, elements,
equal elements, 1 per batch, 0, 0, 0]. Key -1: [samples]."""


@dataclass(frozen=True)
class _AgreementPass(Sums[AgreementSums]):
    """Both models on the same batches, their outputs compared (a `PassTask`)."""

    original: onnx.ModelProto
    compressed: onnx.ModelProto
    provider: Provider

    def start(self, cache: WorkerCache) -> _AgreementAccumulator:
        return _AgreementAccumulator(_open(self.original, self.provider, "input"),
                                     _open(self.compressed, self.provider, "compressed"))


class _AgreementAccumulator:
    def __init__(self, original: ort.InferenceSession, compressed: ort.InferenceSession
                 ) -> None:
        self.sessions = ((original, "input"), (compressed, "compressed"))
        self.names = [output.name for output in original.get_outputs()]
        self.sums: AgreementSums = {}
        self.samples = 0

    def add(self, batch: Batch) -> None:
        reference, candidate = (self._run(session, role, batch.feeds)
                                for session, role in self.sessions)
        for index, (ref, new) in enumerate(zip(reference, candidate, strict=True)):
            sums = _agreement_sums(np.atleast_1d(np.asarray(ref)), np.atleast_1d(np.asarray(new)))
            entry = self.sums.setdefault(index, [0.0] * len(sums))
            for position, value in enumerate(sums):
                entry[position] += value
        self.samples += batch.samples

    def _run(self, session: ort.InferenceSession, role: str, feeds: FeedDict
             ) -> list[np.ndarray]:
        try:
            return list(session.run(self.names, dict(feeds)))
        except Exception as exc:
            raise _failure(exc, role) from exc

    def result(self) -> AgreementSums:
        return {**self.sums, -1: [float(self.samples)]}


def _agreement_sums(original: np.ndarray, compressed: np.ndarray) -> list[float]:
    """The `AgreementSums` entry of one output over one batch (a scalar output counts as one
    row per batch)."""
    if original.dtype == np.bool_ or not np.issubdtype(original.dtype, np.number):
        equal = (float(np.sum(original == compressed)) if original.shape == compressed.shape
                 else 0.0)
        return [original.size - equal, float(original.size), equal, 1.0, 0.0, 0.0, 0.0]
    reference = original.astype(np.float64)
    candidate = compressed.astype(np.float64)
    flat_ref = reference.reshape(len(reference), -1)
    flat_new = candidate.reshape(len(candidate), -1)
    norms = np.linalg.norm(flat_ref, axis=1) * np.linalg.norm(flat_new, axis=1)
    cosines = np.sum(flat_ref * flat_new, axis=1) / np.maximum(norms, np.finfo(np.float64).tiny)
    matches = rows = 0.0
    if reference.ndim >= 2 and reference.shape[-1] > 1:
        same = reference.argmax(-1) == candidate.argmax(-1)
        matches, rows = float(np.sum(same)), float(same.size)
    return [float(np.sum((candidate - reference) ** 2)), float(np.sum(reference ** 2)),
            float(np.sum(cosines)), float(len(reference)), matches, rows, 1.0]


def _agreement(name: str, sums: list[float]) -> OutputAgreement:
    if not sums[6]:  # not numbers: booleans, strings
        differing, elements, equal = sums[:3]
        return OutputAgreement(name, differing / max(elements, 1.0), equal / max(elements, 1.0),
                               None)
    squared_error, squared_reference, cosines, rows, matches, top1_rows, _ = sums
    error = float(np.sqrt(squared_error) / max(float(np.sqrt(squared_reference)),
                                               np.finfo(np.float64).tiny))
    return OutputAgreement(name, error, cosines / max(rows, 1.0),
                           matches / top1_rows if top1_rows else None)


def compare_models(original: onnx.ModelProto, compressed: onnx.ModelProto,
                   batches: Sequence[FeedDict], provider: Provider,
                   executor: Executor | None = None) -> Verification:
    """Run both models on the same held-out batches (on the workers of `executor`, default
    this process) and compare every output."""
    executor = executor or LocalExecutor()
    sums = executor.fold(_AgreementPass(original, compressed, provider), batches,
                         desc="verifying", total=total_samples(batches))
    if -1 not in sums:
        return Verification(0, ())
    outputs = tuple(_agreement(value.name, sums[index])
                    for index, value in enumerate(original.graph.output))
    return Verification(int(sums[-1][0]), outputs)


def reconstruction_error(statistics: TapStatistics, kept: np.ndarray,
                         reconstruction: np.ndarray) -> float:
    """Relative error E||t - A t_J||^2 / E||t||^2 of a tap under its statistics.

    `kept`: [k] channel indices; `reconstruction`: A, [m, k]. Computed from the Gram matrix
    alone: tr(S) - 2 tr(A S[J, :]) + tr(A S[J, J] A^T), with S the second moment.
    """
    sigma = statistics.sigma
    total = float(np.trace(sigma))
    if total <= 0.0:
        return 0.0
    cross = float(np.einsum("fj,jf->", reconstruction, sigma[kept, :]))
    kept_part = float(np.einsum("fj,jk,fk->", reconstruction, sigma[np.ix_(kept, kept)],
                                reconstruction))
    return max(total - 2.0 * cross + kept_part, 0.0) / total


@dataclass(frozen=True)
class Verified:
    """Held-out agreement of the outputs (None without held-out data) and each pruned group's
    mean relative reconstruction error over its taps, by group id; `float_verification`: the
    float model's agreement when the model written is quantized."""

    verification: Verification | None
    group_errors: dict[int, float]
    float_verification: Verification | None = None


def verify_on_held_out(original: onnx.ModelProto, compressed: onnx.ModelProto,
                       instrumented: Instrumented, held_out: Sequence[FeedDict],
                       plans: Sequence[GroupPlan], provider: Provider, executor: Executor,
                       float_model: onnx.ModelProto | None = None) -> Verified:
    """Output agreement of `compressed` with `original` (and of `float_model`, the model before
    quantization, when given), and each pruned group's reconstruction error from the
    `instrumented` original's statistics, on the `held_out` batches."""
    if not held_out:
        return Verified(None, {})
    verification = compare_models(original, compressed, held_out, provider, executor)
    floating = (None if float_model is None
                else compare_models(original, float_model, held_out, provider, executor))
    if not plans:
        return Verified(verification, {}, floating)
    statistics = calibrate(instrumented, held_out, provider, executor=executor,
                           desc="held-out statistics")
    errors = {}
    for plan in plans:
        per_tap = [reconstruction_error(statistics[tap.tensor], plan.kept,
                                        plan.reconstructions[tap.tensor])
                   for tap in plan.group.taps]
        if per_tap:  # a group read only through concatenations has no tap of its own
            errors[plan.group.id] = float(np.mean(per_tap))
    return Verified(verification, errors, floating)
