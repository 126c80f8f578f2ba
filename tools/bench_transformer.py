"""all-MiniLM-L6-v2 compressed at a MAC budget: time and retrieval agreement on held-out text.

    python -m tools.bench_transformer [--flops 0.6] [--allocation greedy|uniform|dof]
                                      [--graph plain|fused] [--calib 512]

Calibrates on `--calib` sentences of the Python reference documentation (64 more for the
tool's own verification) and compares the compressed model with the original on 256 other
sentences (`models.sentence_encoder.embedding_agreement`): mean embedding cosine, top-1
nearest-neighbour agreement and top-10 overlap. `--graph fused` uses the export after ONNX
Runtime's transformer optimizer.
"""

from __future__ import annotations

import argparse
import time

from models import sentence_encoder as encoder
from onnx_spectral import compress


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flops", type=float, default=0.6)
    parser.add_argument("--allocation", default=None, choices=["greedy", "uniform", "dof"])
    parser.add_argument("--graph", default="plain", choices=["plain", "fused"])
    parser.add_argument("--calib", type=int, default=512)
    args = parser.parse_args()
    path = encoder.encoder_onnx() if args.graph == "plain" else encoder.fused_encoder_onnx()
    calibration, held_out = encoder.sentences(calibration=args.calib + 64)
    options = {} if args.allocation is None else {"allocation": args.allocation}
    start = time.perf_counter()
    model, report = compress(str(path), encoder.tokenize(calibration), flops=args.flops,
                             calib_samples=args.calib, verify_samples=64, **options)
    seconds = time.perf_counter() - start
    print(report.format())
    feeds = encoder.tokenize(held_out)
    agreement = encoder.embedding_agreement(encoder.embeddings(path, feeds),
                                            encoder.embeddings(model, feeds))
    kept = report.cost_after.macs / report.cost_before.macs
    print(f"\nall-MiniLM-L6-v2 ({args.graph}), --flops {args.flops}, allocation "
          f"{args.allocation or 'default'}: {kept:.3f} of the MACs kept, {seconds:.0f} s end to "
          f"end; on {len(held_out)} held-out sentences: cosine {agreement.cosine:.4f}, top-1 "
          f"neighbour agreement {agreement.top1:.1%}, top-10 overlap {agreement.top10:.1%}")


if __name__ == "__main__":
    main()
