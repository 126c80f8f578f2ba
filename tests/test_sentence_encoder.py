"""all-MiniLM-L6-v2 from PyPI: the export, the text sets, the retrieval metric."""

from __future__ import annotations

import numpy as np
import pytest

from models import sentence_encoder as encoder

pytestmark = pytest.mark.real


def test_the_sets_are_disjoint_real_sentences() -> None:
    calibration, held_out = encoder.sentences(calibration=64, held_out=32)
    assert len(calibration) == 64 and len(held_out) == 32
    assert not set(calibration) & set(held_out)
    assert all(6 <= len(sentence.split()) <= 40 for sentence in calibration + held_out)


def test_the_export_embeds_paraphrases_together() -> None:
    feeds = encoder.tokenize(["The sky is blue today.", "Today the sky is blue.",
                              "Python lists are mutable sequences."])
    values = encoder.embeddings(encoder.encoder_onnx(), feeds)
    similarity = values @ values.T
    assert similarity[0, 1] > 0.9 and abs(similarity[0, 2]) < 0.3


def test_the_agreement_of_a_model_with_itself_is_total_and_noise_lowers_it() -> None:
    _, held_out = encoder.sentences(calibration=16, held_out=48)
    values = encoder.embeddings(encoder.encoder_onnx(), encoder.tokenize(held_out))
    same = encoder.embedding_agreement(values, values)
    assert (same.cosine, same.top1, same.top10) == pytest.approx((1.0, 1.0, 1.0))
    noisy = values + 0.2 * np.random.default_rng(0).standard_normal(values.shape)
    noisy /= np.linalg.norm(noisy, axis=1, keepdims=True)
    worse = encoder.embedding_agreement(values, noisy)
    assert worse.cosine < 0.99 and worse.top10 < 1.0
