"""A real sentence encoder compressed at a MAC budget: time and retrieval agreement on
held-out text.

    python -m tools.bench_transformer [--model minilm|mpnet] [--flops 0.6]
                                      [--allocation greedy|uniform|dof]
                                      [--graph plain|fused] [--calib 512] [--onnxsim]
                                      [--reconstruction-layers auto|all|none] [--latency]
                                      [--prune both|heads|ffn]

`--model`: all-MiniLM-L6-v2 (models/sentence_encoder.py, the default) or all-mpnet-base-v2
(models/mpnet.py). Calibrates on `--calib` sentences of the Python reference documentation
(64 more for the tool's own verification) and compares the compressed model with the original
on 256 other sentences (`models.sentence_encoder.embedding_agreement`): mean embedding cosine,
top-1 nearest-neighbour agreement and top-10 overlap. `--graph fused` uses MiniLM's export
after ONNX Runtime's transformer optimizer. `--onnxsim` also prunes the same graph with
onnxsim 0.8.1's recipe (tools/onnxsim_baseline.py: attention-head Wanda, structured Wanda, its
refit) at the same budget, on the same calibration sentences in batches of 32, and compares
both on the same held-out sentences, with MACs counted for both by
`tools.onnxsim_baseline.count_macs` at one sentence of 64 tokens. `--prune heads` (or `ffn`)
excludes every other group (every head group) from pruning. `--latency` also times the
original and the compressed model side by side in ONNX Runtime on the CPU at 128 tokens
(median of 20 runs at batch 1, of 5 at batch 32) and divides the speedup by the MAC reduction
at that length.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx

from models import mpnet
from models import sentence_encoder as encoder
from onnx_spectral import compress

Feeds = dict[str, np.ndarray]
MODELS: dict[str, tuple[str, Callable[[], Path], Callable[[list[str], int], Feeds]]] = {
    "minilm": ("all-MiniLM-L6-v2", encoder.encoder_onnx, encoder.tokenize),
    "mpnet": ("all-mpnet-base-v2", mpnet.encoder_onnx, mpnet.mpnet_tokenize),
}


def batches(feeds: Feeds, size: int) -> list[Feeds]:
    """`feeds` ([N, ...] arrays) cut into batches of `size` rows."""
    count = len(next(iter(feeds.values())))
    return [{name: value[start:start + size] for name, value in feeds.items()}
            for start in range(0, count, size)]


def onnxsim_line(path: str, calibration: Feeds, held_out: Feeds, reference: np.ndarray,
                 flops: float, ours: onnx.ModelProto) -> str:
    """onnxsim 0.8.1 at `flops` beside onnx-spectral's model `ours`: the MACs each keeps by
    onnxsim's counter, and onnxsim's embedding agreement with the original's embeddings
    `reference` ([N, 384]) of `held_out`."""
    from tools.onnxsim_baseline import count_macs, onnxsim_prune

    original = onnx.load(path)
    result = onnxsim_prune(original, batches(calibration, 32), flops, timeout=3600)
    one = {name: value[:1] for name, value in calibration.items()}
    ours_text = (f"onnx-spectral {count_macs(ours, one) / count_macs(original, one):.3f} of "
                 f"the MACs by the same counter")
    if result.model is None or not result.valid:
        return f"{ours_text}; onnxsim 0.8.1 failed: {result.reason}"
    agreement = encoder.embedding_agreement(reference, encoder.embeddings(result.model,
                                                                          held_out))
    return (f"{ours_text}; onnxsim 0.8.1 ({' + '.join(result.steps)}, sparsity "
            f"{result.sparsity:.3f}): {result.macs_kept:.3f} of the MACs, {result.seconds:.0f} s;"
            f" cosine {agreement.cosine:.4f}, top-1 neighbour agreement {agreement.top1:.1%}, "
            f"top-10 overlap {agreement.top10:.1%}" + (f" ({result.reason})" if result.reason
                                                        else ""))


def latency_line(original: Path, compressed: onnx.ModelProto, feeds: Feeds) -> str:
    """ONNX Runtime CPU latency of `compressed` against `original` on `feeds` ([n, 128] token
    arrays, n >= 32), side by side: speedup and speedup over MAC reduction at batch 1 and 32."""
    import onnxruntime as ort

    from onnx_spectral.cost import model_cost
    from tools.bench_speed import latencies

    models = {"original": onnx.load(original), "compressed": compressed}
    shapes = {name: (1, value.shape[1]) for name, value in feeds.items()}
    macs = {label: model_cost(model, {name: shape for name, shape in shapes.items()
                                      if name in {i.name for i in model.graph.input}}).macs
            for label, model in models.items()}
    reduction = macs["original"] / macs["compressed"]
    sessions = {label: ort.InferenceSession(model.SerializeToString(),
                                            providers=["CPUExecutionProvider"])
                for label, model in models.items()}
    parts = []
    for batch, repeats in ((1, 20), (32, 5)):
        wanted = {i.name for i in sessions["original"].get_inputs()}
        chunk = {name: value[:batch] for name, value in feeds.items() if name in wanted}
        times = latencies(sessions, chunk, repeats)
        speedup = times["original"] / times["compressed"]
        parts.append(f"batch {batch}: {1e3 * times['original']:.0f} ms -> "
                     f"{1e3 * times['compressed']:.0f} ms, {speedup:.2f}x faster, "
                     f"{speedup / reduction:.2f} of the MAC reduction")
    return (f"latency at {next(iter(shapes.values()))[1]} tokens, ORT CPU ({reduction:.2f}x "
            f"fewer MACs): " + "; ".join(parts))


def excluded_for(path: Path, feeds: Feeds, prune: str) -> list[str]:
    """Producers to exclude so that only the heads (`prune` "heads") or only the other
    channel groups, the feed-forward widths ("ffn"), are pruned; none for "both"."""
    from onnx_spectral.analysis import analyze

    if prune == "both":
        return []
    analysis = analyze(onnx.load(path), shape_feeds={k: v[:2] for k, v in feeds.items()})
    return sorted(producer for group in analysis.prunable
                  if (group.heads is not None) == (prune == "ffn")
                  for producer in group.producers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm", choices=sorted(MODELS))
    parser.add_argument("--flops", type=float, default=0.6)
    parser.add_argument("--allocation", default=None, choices=["greedy", "uniform", "dof"])
    parser.add_argument("--graph", default="plain", choices=["plain", "fused"])
    parser.add_argument("--calib", type=int, default=512)
    parser.add_argument("--reconstruction-layers", default=None, choices=["auto", "all", "none"])
    parser.add_argument("--prune", default="both", choices=["both", "heads", "ffn"],
                        help="prune attention heads only, the other groups only, or both")
    parser.add_argument("--latency", action="store_true",
                        help="also time both models in ONNX Runtime at 128 tokens")
    parser.add_argument("--onnxsim", action="store_true",
                        help="also prune with onnxsim 0.8.1 at the same budget")
    args = parser.parse_args()
    if args.graph == "fused" and args.model != "minilm":
        parser.error("--graph fused exists for --model minilm only")
    title, export, tokenize = MODELS[args.model]
    path = export() if args.graph == "plain" else encoder.fused_encoder_onnx()
    calibration, held_out = encoder.sentences(calibration=args.calib + 64)
    options = {key: value for key, value in (("allocation", args.allocation),
                                              ("reconstruction_layers",
                                               args.reconstruction_layers))
               if value is not None}
    start = time.perf_counter()
    calibration_feeds = tokenize(calibration)
    exclude = excluded_for(path, calibration_feeds, args.prune)
    model, report = compress(str(path), calibration_feeds, flops=args.flops,
                             calib_samples=args.calib, verify_samples=64, exclude=exclude,
                             **options)
    seconds = time.perf_counter() - start
    print(report.format())
    feeds = tokenize(held_out)
    reference = encoder.embeddings(path, feeds)
    agreement = encoder.embedding_agreement(reference, encoder.embeddings(model, feeds))
    kept = report.cost_after.macs / report.cost_before.macs
    print(f"\n{title} ({args.graph}), pruning {args.prune}, --flops {args.flops}, allocation "
          f"{args.allocation or 'default'}, reconstruction layers "
          f"{args.reconstruction_layers or 'default'}: {kept:.3f} of the MACs kept, "
          f"{seconds:.0f} s end to end; on {len(held_out)} held-out sentences: cosine "
          f"{agreement.cosine:.4f}, top-1 neighbour agreement {agreement.top1:.1%}, "
          f"top-10 overlap {agreement.top10:.1%}")
    if args.latency:
        print(latency_line(path, model, tokenize(held_out, 128)))
    if args.onnxsim:
        used = {name: value[:args.calib] for name, value in calibration_feeds.items()}
        print(onnxsim_line(str(path), used, feeds, reference, args.flops, model))


if __name__ == "__main__":
    main()
