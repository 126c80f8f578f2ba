"""End-to-end compression time over one plain inference pass, per stage; and the Ray path.

    python tools/bench_e2e.py [--models crepe-full resnet50 minilm] [--ray-workers 1 2 4]
                              [--calib-samples N]

For each model, in one process, side by side with the same ONNX Runtime threads:
  plain   one ONNX Runtime inference pass of the original model over the calibration samples,
          in the batches compression uses (session opened outside the timing)
  e2e     `compress` with default options at --ratio (default 0.5), seconds per stage, and the
          ratio total / plain (target <= 4)
  ray     the same compression with --ray on a local Ray instance with 1, 2 and 4 workers
          (--ray-workers; one ONNX Runtime thread each), its time over the in-process run, and
          whether it kept the same channels

Models: crepe-full (2,000 generated tones + 200 held out, models/crepe.py), resnet50 (the onnx
package's light zoo graph with seeded weights, 1,024 images + 200 held out, models/zoo.py),
minilm (all-MiniLM-L6-v2, 512 Python-documentation sentences of up to 64 tokens + 256 held
out, models/sentence_encoder.py).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from onnx_spectral import compress  # noqa: E402
from onnx_spectral.calibration.sources import fixed_batch_size, model_input_specs  # noqa: E402
from onnx_spectral.graph.model import load_model  # noqa: E402

Feeds = dict[str, np.ndarray]


def model_and_data(name: str) -> tuple[Path, Feeds, int]:
    """The model file, its calibration + held-out data (samples on axis 0) and how many
    samples calibrate."""
    if name == "crepe-full":
        from models import crepe

        return crepe.crepe_onnx("full"), {"frames": crepe.make_tones(2200, seed=11)[0]}, 2000
    if name == "resnet50":
        from models import zoo

        path = zoo.light_model("resnet50")
        return path, {zoo.light_input_name(path): zoo.light_inputs(1224, seed=1)}, 1024
    if name == "minilm":
        from models import sentence_encoder as encoder

        calibration, held_out = encoder.sentences(512, 256)
        return encoder.encoder_onnx(), encoder.tokenize(calibration + held_out), 512
    raise SystemExit(f"unknown model {name!r}: crepe-full, resnet50 or minilm")


def plain_pass(path: Path, data: Feeds, samples: int, batch: int) -> float:
    """Seconds of one inference pass of the model over the first `samples` samples."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = {value.name for value in session.get_inputs()}
    start = time.perf_counter()
    for first in range(0, samples, batch):
        session.run(None, {key: value[first:first + batch] for key, value in data.items()
                           if key in names})
    return time.perf_counter() - start


def timed_compress(path: Path, data: Feeds, samples: int, ratio: float,
                   **options: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    _, report = compress(str(path), data, ratio=ratio, calib_samples=samples,
                         verify_samples=len(next(iter(data.values()))) - samples,
                         provider="cpu", **options)
    return time.perf_counter() - start, report


def _stages(report: Any) -> str:
    return ", ".join(f"{stage} {seconds:.1f}" for stage, seconds in report.seconds.items())


def _kept(report: Any) -> list[int]:
    return [group.kept for group in report.groups]


def bench(name: str, ratio: float, workers: list[int], calibration: int | None) -> None:
    path, data, samples = model_and_data(name)
    if calibration is not None:  # fewer calibration samples, the same held-out ones
        held_out = {key: value[samples:] for key, value in data.items()}
        data = {key: np.concatenate([value[:calibration], held_out[key]])
                for key, value in data.items()}
        samples = calibration
    batch = fixed_batch_size(model_input_specs(load_model(str(path)))) or 32
    plain = plain_pass(path, data, samples, batch)
    total, report = timed_compress(path, data, samples, ratio)
    print(f"\n== {name}: {samples} calibration samples, batches of {batch}, --ratio {ratio} ==")
    print(f"  plain inference pass {plain:.1f} s; end to end {total:.1f} s = "
          f"{total / plain:.2f}x (target <= 4x)")
    print(f"  stages (s): {_stages(report)}")
    fidelity = report.verification.outputs[0] if report.verification else None
    if fidelity is not None:
        print(f"  held-out output cosine {fidelity.cosine:.4f}, relative error "
              f"{fidelity.relative_error:.4f}")
    if workers:
        import ray

        if not ray.is_initialized():  # after the in-process run, which Ray's daemons would slow
            ray.init(num_cpus=max(workers), include_dashboard=False, log_to_driver=False)
    for count in workers:
        ray_total, ray_report = timed_compress(path, data, samples, ratio, ray="local",
                                               ray_workers=count)
        same = "same kept widths" if _kept(ray_report) == _kept(report) else "DIFFERENT widths"
        print(f"  --ray local, {count} worker{'s' if count > 1 else ''}: {ray_total:.1f} s = "
              f"{ray_total / total:.2f}x the in-process run ({same}); stages: "
              f"{_stages(ray_report)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["crepe-full", "resnet50", "minilm"])
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--ray-workers", type=int, nargs="*", default=[1, 2, 4])
    parser.add_argument("--calib-samples", type=int,
                        help="calibrate on this many samples instead of the model's default")
    args = parser.parse_args()
    print(f"onnxruntime {ort.__version__}; {len(os.sched_getaffinity(0))} CPUs")
    for name in args.models:
        bench(name, args.ratio, args.ray_workers, args.calib_samples)


if __name__ == "__main__":
    main()
