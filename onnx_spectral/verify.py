"""Original vs compressed on held-out data: per-output agreement and per-tap reconstruction.

Nothing here changes a model; these are the figures the report shows the user.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from onnx_spectral.calibration.collect import TapStatistics
from onnx_spectral.calibration.sources import FeedDict
from onnx_spectral.errors import ModelError, ResourceError, RewriteError
from onnx_spectral.graph.sessions import Provider, is_out_of_memory, open_session


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


def _run_all(model: onnx.ModelProto, batches: Sequence[FeedDict], provider: Provider,
             role: str) -> list[np.ndarray]:
    """Outputs of `model` over all batches; `role` ("input", "compressed") picks the error."""
    try:
        session = open_session(model, provider)
        names = [output.name for output in session.get_outputs()]
        per_batch = [session.run(names, feeds) for feeds in batches]
    except Exception as exc:
        if is_out_of_memory(exc):
            raise ResourceError(f"out of memory running the {role} model on held-out batches: "
                                f"{exc}; lower --batch-size") from exc
        kind = ModelError if role == "input" else RewriteError
        raise kind(f"ONNX Runtime cannot run the {role} model on held-out samples: {exc}"
                   ) from exc
    return [np.concatenate([np.atleast_1d(np.asarray(result[i])) for result in per_batch])
            for i in range(len(names))]  # a scalar output gives one value per batch


def _agreement(name: str, original: np.ndarray, compressed: np.ndarray) -> OutputAgreement:
    if original.dtype == np.bool_ or not np.issubdtype(original.dtype, np.number):
        equal = float(np.mean(original == compressed)) if original.shape == compressed.shape \
            else 0.0
        return OutputAgreement(name, 1.0 - equal, equal, None)
    reference = original.astype(np.float64)
    candidate = compressed.astype(np.float64)
    error = float(np.linalg.norm(candidate - reference) /
                  max(float(np.linalg.norm(reference)), np.finfo(np.float64).tiny))
    flat_ref = reference.reshape(len(reference), -1)
    flat_new = candidate.reshape(len(candidate), -1)
    norms = np.linalg.norm(flat_ref, axis=1) * np.linalg.norm(flat_new, axis=1)
    cosine = float(np.mean(np.sum(flat_ref * flat_new, axis=1) /
                           np.maximum(norms, np.finfo(np.float64).tiny)))
    top1 = None
    if reference.ndim >= 2 and reference.shape[-1] > 1:
        top1 = float(np.mean(reference.argmax(-1) == candidate.argmax(-1)))
    return OutputAgreement(name, error, cosine, top1)


def compare_models(original: onnx.ModelProto, compressed: onnx.ModelProto,
                   batches: Sequence[FeedDict], provider: Provider) -> Verification:
    """Run both models on the same held-out batches and compare every output."""
    reference = _run_all(original, batches, provider, "input")
    candidate = _run_all(compressed, batches, provider, "compressed")
    names = [output.name for output in original.graph.output]
    outputs = tuple(_agreement(name, ref, new)
                    for name, ref, new in zip(names, reference, candidate, strict=True))
    samples = sum(len(next(iter(feeds.values()))) for feeds in batches)
    return Verification(samples, outputs)


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
