"""all-mpnet-base-v2 from PyPI's five part packages: the export and its embeddings."""

from __future__ import annotations

import onnx
import pytest

from models import mpnet
from models import sentence_encoder as encoder

pytestmark = pytest.mark.real


def test_the_export_has_dynamic_batch_and_sequence_and_no_token_types() -> None:
    model = onnx.load(mpnet.encoder_onnx(), load_external_data=False)
    inputs = {value.name: [d.dim_param or d.dim_value
                           for d in value.type.tensor_type.shape.dim]
              for value in model.graph.input}
    assert inputs == {name: ["batch_size", "sequence_length"] for name in mpnet.INPUTS}


def test_the_export_embeds_paraphrases_together() -> None:
    feeds = mpnet.mpnet_tokenize(["The sky is blue today.", "Today the sky is blue.",
                                  "Python lists are mutable sequences.",
                                  "A list in Python can be changed in place."])
    assert feeds["input_ids"][0, -1] == 1  # MPNet pads with <pad> = 1, not BERT's 0
    values = encoder.embeddings(mpnet.encoder_onnx(), feeds)
    similarity = values @ values.T
    assert similarity[0, 1] > 0.9 and similarity[2, 3] > 0.6
    assert max(abs(similarity[0, 2]), abs(similarity[1, 3])) < 0.2
