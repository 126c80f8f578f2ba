"""Peak memory of compressing a wide MLP stored with external data, against its size.

Every size takes the path of models past 2 GiB (external_tensors.LARGE_BYTES is lowered below the
model's size): weights memory-mapped from the input's data file, sessions through hard links,
the output streamed to its data file. One fresh CLI process per size; peak RSS counts the
mapped file pages too. Prints one line per size and the ratio peak / model size.

    python tools/large_memory.py --wide 25000 60000 125000
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.test_large import compress_in_subprocess, wide_mlp  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wide", type=int, nargs="+", default=[25_000, 60_000, 125_000],
                        help="input features (model size about 4096 * WIDE bytes)")
    args = parser.parse_args()
    for wide in args.wide:
        with tempfile.TemporaryDirectory(prefix="onnx-spectral-memory-") as name:
            folder = Path(name)
            path = wide_mlp(folder, wide)
            model_gb = sum(p.stat().st_size for p in folder.glob("wide.*")) / 2**30
            out = folder / "out" / "wide_pruned.onnx"
            out.parent.mkdir()
            result, peak, seconds = compress_in_subprocess(path, out, 1 << 20)
            if result.returncode != 0:
                raise SystemExit(f"wide {wide}: exit {result.returncode}: {result.stderr}")
            print(f"wide {wide:>7}: model {model_gb:6.3f} GB, peak RSS {peak:6.3f} GB "
                  f"({peak / model_gb:4.2f}x), wall {seconds:5.1f} s", flush=True)


if __name__ == "__main__":
    main()
