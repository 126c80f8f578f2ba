"""Coverage and fidelity of onnx-spectral on real graphs: the model-zoo tables and the corpus.

    python -m tools.bench_coverage [--models resnet50 vgg19 ... ppocr transformer]
        [--ratio 0.5] [--calib 32] [--verify 8] [--ridge 1e-3]
    python -m tools.bench_coverage --corpus [--models NAME ...] [--flops 0.5] [--calib 16]
        [--verify 4] [--test 16] [--timeout 300] [--onnxsim-timeout 150]
        [--results DIR [--render]] [--markdown FILE]

`--corpus`: every model of models/corpus.py (or `--models`), compressed by onnx-spectral and
pruned by onnxsim 0.8.1 at `--flops` of the MACs, each in its own process under `--timeout`
seconds; one table row per model (tools/corpus_coverage.py says what each column measures),
then a summary and the tracebacks of internal errors.

Every `light_*` model (ResNet-50, VGG-19, DenseNet-121, Inception v1/v2, SqueezeNet, ShuffleNet,
AlexNet, ZFNet-512) gets seeded random weights (models/zoo.py), is compressed at `--ratio` on
random images and checked (checker, ONNX Runtime, same output names and shapes). Per model it
prints: the share of producer output channels in prunable groups (all producers, and convs
without the first and last layer), parameters and MACs before -> after, the cosine similarity
and top-1 agreement of the logits (the Softmax input where the model ends in one: probabilities
of random models are nearly flat, so their cosine says little) on held-out random images, and
the frozen reasons by count. `ppocr` (the PP-OCR text-orientation classifier at ratio 0.75:
top-1 agreement on text-line crops) and `transformer` (a seeded BERT-like encoder, FFN widths
at 0.5: output cosine) get a second table.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from models.zoo import LIGHT_MODELS, light_batches, light_input_name, light_model
from onnx_spectral import compress
from onnx_spectral.analysis import Analysis, ChannelGroup, analyze
from onnx_spectral.cost import model_cost
from onnx_spectral.graph.model import normalize
from onnx_spectral.rewrite import check_interface
from tools.corpus_coverage import (
    CORPUS_HEADER,
    Settings,
    format_corpus_row,
    read_results,
    reason_kind,
    run_corpus,
    summary,
    tracebacks,
)

PRODUCERS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass(frozen=True)
class Row:
    model: str
    share_all: float
    share_inner_convs: float
    params: tuple[int, int]
    macs: tuple[int, int]
    logits: str
    cosine: float
    centered: float
    top1: float
    reasons: Counter[str]
    seconds: float


def prunable_channels(analysis: Analysis) -> dict[str, tuple[int, int]]:
    """Producer node -> (its output channels in prunable groups, its output channels)."""
    by_id = {group.id: group for group in analysis.groups}

    def pruned(group: ChannelGroup) -> int:
        if group.parts:  # a producer whose output is split: its pieces are selected
            return sum(size for part, _, size in group.parts
                       if part is not None and by_id[part].prunable)
        return group.channels if group.prunable else 0

    return {producer: (pruned(group), group.channels)
            for group in analysis.groups for producer in group.producers}


def shares(model: onnx.ModelProto, analysis: Analysis) -> tuple[float, float]:
    """(share over all producers, share over convs without the first and the last layer).

    Producers are the Conv, ConvTranspose, Gemm and MatMul nodes with a constant weight; a
    node's output channels count as prunable when its group (or its split pieces) is.
    """
    channels = prunable_channels(analysis)
    graph = analysis.graph
    ordered = [node for node in graph.nodes
               if node.op_type in PRODUCERS and graph.input_constant(node, 1) is not None]

    def pair(node: onnx.NodeProto) -> tuple[int, int]:
        if node.name in channels:
            return channels[node.name]
        dims = graph.static_shape(node.output[0], node.name)
        size = dims[1] if node.op_type in ("Conv", "ConvTranspose") else dims[-1]
        return 0, int(size or 0)

    total = [pair(node) for node in ordered]
    inner = [pair(node) for node in ordered[1:-1] if node.op_type == "Conv"]

    def share(pairs: list[tuple[int, int]]) -> float:
        return sum(p for p, _ in pairs) / max(1, sum(c for _, c in pairs))

    return share(total), share(inner)


def logits_tensor(model: onnx.ModelProto) -> str:
    """The Softmax input feeding the (single) graph output, else the output itself."""
    output = model.graph.output[0].name
    producer = next((node for node in model.graph.node if output in node.output), None)
    if producer is not None and producer.op_type == "Softmax":
        return producer.input[0]
    return output


def run_tensor(model: onnx.ModelProto, tensor: str,
               batches: Iterator[dict[str, np.ndarray]]) -> np.ndarray:
    """Values of `tensor` for every feed dict, concatenated on axis 0."""
    extended = onnx.ModelProto()
    extended.CopyFrom(model)
    if tensor not in [output.name for output in extended.graph.output]:
        extended.graph.output.extend([onnx.helper.make_empty_tensor_value_info(tensor)])
    session = ort.InferenceSession(extended.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    return np.concatenate([session.run([tensor], feeds)[0] for feeds in batches])


def agreement(original: np.ndarray, compressed: np.ndarray) -> tuple[float, float, float]:
    """(mean per-sample cosine, the same after subtracting the original's mean over samples
    from both, top-1 agreement) of [N, ...] arrays.

    Random-weight models put most of their output in a component common to every input; the
    centered cosine measures how well the input-dependent part is kept.
    """
    a = original.reshape(len(original), -1).astype(np.float64)
    b = compressed.reshape(len(compressed), -1).astype(np.float64)

    def cosine(x: np.ndarray, y: np.ndarray) -> float:
        values = np.sum(x * y, axis=1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))
        return float(values.mean())

    mean = a.mean(axis=0)
    return (cosine(a, b), cosine(a - mean, b - mean),
            float(np.mean(a.argmax(axis=1) == b.argmax(axis=1))))


def measure(name: str, ratio: float, calib: int, verify: int, seed: int = 0,
            ridge: float = 1e-3) -> Row:
    """Compress one light model and measure it (see the module docstring)."""
    model = onnx.load(str(light_model(name, seed)))
    analysis = analyze(model)
    share_all, share_inner = shares(model, analysis)
    start = time.perf_counter()
    compressed, report = compress(model, light_batches(name, calib + verify, seed=seed + 1),
                                  ratio=ratio, ridge=ridge, calib_samples=calib,
                                  verify_samples=verify, provider="cpu")
    seconds = time.perf_counter() - start
    onnx.checker.check_model(compressed, full_check=True)
    check_interface(model, compressed)
    tensor = logits_tensor(model)
    held_out = list(light_batches(name, 16, seed=seed + 1000))
    cosine, centered, top1 = agreement(run_tensor(model, tensor, iter(held_out)),
                             run_tensor(compressed, tensor, iter(held_out)))
    reasons = Counter(reason_kind(reason) for group in report.groups for reason in group.frozen)
    assert light_input_name(model)
    print(f"  {name}: stage seconds " + ", ".join(f"{stage} {value:.0f}" for stage, value
                                                in report.seconds.items()), flush=True)
    return Row(name, share_all, share_inner,
               (report.cost_before.params, report.cost_after.params),
               (report.cost_before.macs, report.cost_after.macs),
               "logits" if tensor != model.graph.output[0].name else "output",
               cosine, centered, top1, reasons, seconds)


def _millions(pair: tuple[int, int]) -> str:
    return f"{pair[0] / 1e6:.1f}M -> {pair[1] / 1e6:.1f}M ({pair[1] / pair[0]:.0%})"


def format_row(row: Row) -> str:
    reasons = "; ".join(f"{count} x {text}" for text, count in row.reasons.most_common())
    return (f"| {row.model} | {row.share_all:.1%} | {row.share_inner_convs:.1%} | "
            f"{_millions(row.params)} | {_millions(row.macs)} | {row.cosine:.3f} / "
            f"{row.centered:.3f} ({row.logits}) | {row.top1:.0%} | {reasons} | "
            f"{row.seconds:.0f} s |")


HEADER = ("| model | channels in prunable groups | inner convs | params | MACs | "
          "cosine / centered cosine | top-1 agreement | frozen reasons (count) | time |\n"
          "|---|---|---|---|---|---|---|---|---|")


def with_static_input(model: onnx.ModelProto, dims: dict[int, int]) -> onnx.ModelProto:
    """A copy whose first input has the given static dims (axis -> size), for counting MACs
    (normalize it to fold the shape subgraphs exporters leave)."""
    static = onnx.ModelProto()
    static.CopyFrom(model)
    for axis, size in dims.items():
        static.graph.input[0].type.tensor_type.shape.dim[axis].dim_value = size
    del static.graph.value_info[:]
    return static


def measure_ppocr(ratio: float = 0.75, calib: int = 500, test: int = 400) -> str:
    """PP-OCR text-orientation classifier: top-1 agreement with the original on held-out
    page-line crops (half turned by 180 degrees), calibrated on page lines and handwriting."""
    from models import ppocr
    from models.runtime import run_onnx

    model = onnx.load(str(ppocr.cls_model()))
    calib_x, _ = ppocr.crop_batch(calib + 100, seed=0)
    test_x, labels = ppocr.crop_batch(test, seed=1, sources=ppocr.PAGE)
    start = time.perf_counter()
    compressed, report = compress(model, {"x": calib_x}, ratio=ratio, calib_samples=calib,
                                  verify_samples=100, provider="cpu")
    seconds = time.perf_counter() - start
    original = run_onnx(model, test_x)
    before, after = original.argmax(1), run_onnx(compressed, test_x).argmax(1)
    agree = before == after
    sure = original.max(1) > 0.9
    size = {2: ppocr.HEIGHT, 3: ppocr.WIDTH}
    macs = (model_cost(normalize(with_static_input(model, size))).macs,
            model_cost(normalize(with_static_input(compressed, size))).macs)
    groups = [group for group in report.groups if group.producers]
    share = (sum(group.channels for group in groups if not group.frozen)
             / sum(group.channels for group in groups))
    return (f"| PP-OCR mobile cls (ratio {ratio}) | {share:.1%}"
            f" | {_millions((report.cost_before.params, report.cost_after.params))} | "
            f"{_millions(macs)} | top-1 agreement {agree.mean():.1%} on {test} page-line "
            f"crops ({agree[sure].mean():.1%} on the {sure.mean():.0%} the original gives "
            f"> 0.9); orientation accuracy {np.mean(before == labels):.1%} -> "
            f"{np.mean(after == labels):.1%} | {seconds:.0f} s |")


def measure_transformer(ratio: float = 0.5, calib: int = 256, test: int = 64) -> str:
    """BERT-like encoder: output cosine, and the cosine of each pruned FFN block's output."""
    from models import transformer

    model = onnx.load(str(transformer.encoder_onnx()))
    start = time.perf_counter()
    compressed, report = compress(model, {"tokens": transformer.token_batch(calib + 32, 1)},
                                  ratio=ratio, calib_samples=calib, verify_samples=32,
                                  provider="cpu")
    seconds = time.perf_counter() - start
    held_out = [{"tokens": transformer.token_batch(test, 99)}]
    output = model.graph.output[0].name
    cosine = agreement(run_tensor(model, output, iter(held_out)),
                       run_tensor(compressed, output, iter(held_out)))[0]
    blocks = sorted(node.output[0] for node in model.graph.node
                    if node.op_type == "Add" and "/ff2/" in node.name)
    block_cosines = [agreement(run_tensor(model, name, iter(held_out)),
                               run_tensor(compressed, name, iter(held_out)))[0]
                     for name in blocks]
    widths = [f"{group.channels}->{group.kept}" for group in report.groups
              if group.kept < group.channels]
    return (f"| BERT-like encoder (ratio {ratio}) | FFN widths {', '.join(widths)} | "
            f"{_millions((report.cost_before.params, report.cost_after.params))} | "
            f"{_millions((report.cost_before.macs, report.cost_after.macs))} | output cosine "
            f"{cosine:.5f}; FFN block outputs cosine "
            f"{', '.join(f'{value:.3f}' for value in block_cosines)} | {seconds:.0f} s |")


EXTRA = {"ppocr": measure_ppocr, "transformer": measure_transformer}


def corpus_table(names: list[str], settings: Settings, markdown: str | None,
                 results: str | None, render: bool) -> None:
    """Print the corpus table row by row, then the summary and the internal errors'
    tracebacks; with `markdown`, also write the table and summary to that file. `results`:
    the folder that keeps the workers' results (a temporary one when None); with `render`,
    nothing runs and the rows are read from there."""
    rows = []
    print(CORPUS_HEADER, flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_corpus_") as scratch:
        folder = Path(results or scratch)
        found = (read_results(names, folder) if render
                 else run_corpus(names, settings, folder))
        for row in found:
            rows.append(row)
            print(format_corpus_row(row), flush=True)
    text = summary(rows, settings.flops)
    print("\n" + text + "\n\n" + tracebacks(rows), flush=True)
    if markdown:
        table = "\n".join([CORPUS_HEADER, *(format_corpus_row(row) for row in rows)])
        Path(markdown).write_text(f"{table}\n\n```\n{text}\n```\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+",
                        help="zoo/ppocr/transformer names; with --corpus, corpus names")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--calib", type=int, default=None,
                        help="calibration samples (zoo 32, corpus 16)")
    parser.add_argument("--verify", type=int, default=None,
                        help="verification samples (zoo 8, corpus 4)")
    parser.add_argument("--ridge", type=float, default=1e-3)
    parser.add_argument("--corpus", action="store_true",
                        help="the corpus table (models/corpus.py) against onnxsim at --flops")
    parser.add_argument("--flops", type=float, default=0.5)
    parser.add_argument("--test", type=int, default=16, help="corpus held-out samples")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds per corpus model for onnx-spectral")
    parser.add_argument("--onnxsim-timeout", type=float, default=150.0,
                        help="seconds per corpus model for onnxsim")
    parser.add_argument("--markdown", help="write the corpus table to this file")
    parser.add_argument("--results", help="keep the corpus workers' results in this folder")
    parser.add_argument("--render", action="store_true",
                        help="with --results: print the table of an earlier run, run nothing")
    args = parser.parse_args()
    if args.corpus:
        from models.corpus import CORPUS

        settings = Settings(args.flops, args.calib or 16, args.verify or 4, args.test,
                            args.timeout, args.onnxsim_timeout)
        corpus_table(args.models or [entry.name for entry in CORPUS], settings, args.markdown,
                     args.results, args.render)
        return
    models = args.models or list(LIGHT_MODELS)
    calib, verify = args.calib or 32, args.verify or 8
    light = [name for name in models if name not in EXTRA]
    if light:
        print(HEADER, flush=True)
    for name in light:
        print(format_row(measure(name, args.ratio, calib, verify, ridge=args.ridge)),
              flush=True)
    extra = [name for name in models if name in EXTRA]
    if extra:
        print("| model | prunable | params | MACs | fidelity | time |\n|---|---|---|---|---|---|")
    for name in extra:
        print(EXTRA[name](), flush=True)


if __name__ == "__main__":
    main()
