"""Acceptance of issue 3 on real graphs: the onnx package's model-zoo topologies with seeded
random weights, the PP-OCR text-orientation classifier, a seeded BERT-like encoder, and a few
cheap models of the corpus (models/corpus.py) either compressed into valid models or refused
with an error that names the node or tensor.

Kept cheap for a 2-core CPU: few calibration samples (the statistics of a 224x224 image hold
thousands of positions per layer). The full table comes from tools/bench_coverage.py.
"""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest

from models import ppocr, transformer
from models.corpus import corpus_entry
from models.runtime import run_onnx
from models.zoo import light_batches, light_model
from onnx_spectral import compress
from onnx_spectral.analysis import analyze
from onnx_spectral.errors import SpectralError
from onnx_spectral.rewrite import check_interface
from tools.bench_coverage import agreement, logits_tensor, run_tensor, shares
from tools.corpus_coverage import run_output

pytestmark = pytest.mark.real


@pytest.mark.parametrize("name", ["resnet50", "vgg19"])
def test_resnet50_and_vgg19_inner_conv_channels_are_prunable(name: str) -> None:
    model = onnx.load(str(light_model(name)))
    _, inner = shares(model, analyze(model))
    assert inner >= 0.9


@pytest.mark.parametrize("name, max_params", [("resnet50", 0.35), ("squeezenet", 0.45),
                                              ("inception_v1", 0.4)])
def test_light_model_compresses_at_half_width(name: str, max_params: float) -> None:
    model = onnx.load(str(light_model(name)))
    compressed, report = compress(model, light_batches(name, 10, seed=1), ratio=0.5,
                                  calib_samples=8, verify_samples=2, provider="cpu")
    onnx.checker.check_model(compressed, full_check=True)
    check_interface(model, compressed)
    assert report.cost_after.params < max_params * report.cost_before.params
    assert report.cost_after.macs < 0.5 * report.cost_before.macs
    held_out = list(light_batches(name, 3, seed=77))
    tensor = logits_tensor(model)
    got = run_tensor(compressed, tensor, iter(held_out))
    want = run_tensor(model, tensor, iter(held_out))
    assert got.shape == want.shape and np.all(np.isfinite(got))
    cosine, _, _ = agreement(want, got)
    assert cosine > 0.5


def test_ppocr_classifier_at_three_quarters() -> None:
    """Measured 95.0% top-1 agreement on page-line crops with the default sequential
    compensation (the original is 94.2% accurate on them; 82.5% without compensation); asserted
    with one point of margin for other CPUs' rounding. Keeping every channel reproduces the
    original exactly."""
    model = onnx.load(str(ppocr.cls_model()))
    calib_x, _ = ppocr.crop_batch(600, seed=0)
    test_x, _ = ppocr.crop_batch(400, seed=1, sources=ppocr.PAGE)
    before = run_onnx(model, test_x)
    compressed, report = compress(model, {"x": calib_x}, ratio=0.75, calib_samples=500,
                                  verify_samples=100, provider="cpu")
    check_interface(model, compressed)
    assert report.cost_after.params < 0.7 * report.cost_before.params
    agreement = np.mean(before.argmax(1) == run_onnx(compressed, test_x).argmax(1))
    print(f"PP-OCR ratio 0.75: top-1 agreement {agreement:.4f}")
    assert agreement >= 0.94
    whole, _ = compress(model, {"x": calib_x}, ratio=1.0, calib_samples=500,
                        verify_samples=100, provider="cpu")
    np.testing.assert_allclose(run_onnx(whole, test_x), before, atol=1e-5)


def test_transformer_ffn_widths_halved() -> None:
    model = onnx.load(str(transformer.encoder_onnx()))
    compressed, report = compress(model, {"tokens": transformer.token_batch(288, 1)},
                                  ratio=0.5, calib_samples=256, verify_samples=32,
                                  provider="cpu", reconstruction_layers="none")
    pruned = sorted((group.channels, group.kept) for group in report.groups
                    if group.kept < group.channels)
    assert pruned == [(transformer.FFN, transformer.FFN // 2)] * transformer.LAYERS
    tokens = [{"tokens": transformer.token_batch(32, 99)}]
    output = model.graph.output[0].name
    cosine, _, _ = agreement(run_tensor(model, output, iter(tokens)),
                             run_tensor(compressed, output, iter(tokens)))
    assert cosine > 0.999


CHEAP_CORPUS = ("mnist_cnn", "sklearn_digits_mlp", "mnist_cnn_qdq", "silero_vad", "oww_hey_jarvis",
                "mtcnn_rnet", "silero_vad_16k_op15", "silero_vad_v6", "silero_vad_op18_ifless")
"""Corpus models that compress (or are refused) in seconds each on a 2-core CPU; the Silero
VAD models are fed runs (a scalar sample rate; a state with its batch on axis 1), two of them
hold all their layers in one If."""


@pytest.mark.parametrize("name", CHEAP_CORPUS)
def test_cheap_corpus_model_is_compressed_validly_or_refused_by_name(name: str) -> None:
    """No internal error at --flops 0.5: either a model that passes the full checker, runs in
    ONNX Runtime and keeps the output names and shapes on held-out samples, or an
    onnx-spectral error that names a node or tensor."""
    entry = corpus_entry(name)
    model = onnx.load(str(entry.path()))
    try:
        compressed, report = compress(str(entry.path()), entry.data(12, 0), flops=0.5,
                                      provider="cpu", calib_samples=8, verify_samples=4)
    except SpectralError as error:
        assert re.search(r"(node|tensor|input|output) '[^']+'", str(error)), str(error)
        return
    onnx.checker.check_model(compressed, full_check=True)
    check_interface(model, compressed)
    assert report.cost_after.macs <= report.cost_before.macs
    held_out = entry.data(2, 1)
    names = [output.name for output in model.graph.output]
    assert [output.name for output in compressed.graph.output] == names
    for output in names:
        want = run_output(model, output, held_out)
        got = run_output(compressed, output, held_out)
        assert [value.shape for value in got] == [value.shape for value in want]
        assert all(np.all(np.isfinite(value)) for value in got if value.dtype.kind == "f")


@pytest.mark.parametrize("name, kept_op", [("mnist_cnn_qdq", "DequantizeLinear"),
                                           ("ddddocr_ocr_quantized", "ConvInteger"),
                                           ("silero_vad", "If"),
                                           ("silero_vad_op18_ifless", "If")])
def test_quantized_and_if_only_models_lose_half_their_macs(name: str, kept_op: str) -> None:
    """A quantized model (QDQ; dynamic, with ConvInteger and DynamicQuantizeLSTM) comes back
    pruned and quantized as it was; a model whose layers all sit in one If comes back pruned
    in the branch its data takes, still inside its If."""
    entry = corpus_entry(name)
    compressed, report = compress(str(entry.path()), entry.data(12, 0), flops=0.5,
                                  provider="cpu", calib_samples=8, verify_samples=4)
    assert report.cost_after.macs <= 0.5 * report.cost_before.macs + 1
    assert kept_op in {node.op_type for node in compressed.graph.node}
    assert report.verification is not None
