"""``python -m models fetch`` fetches every asset; ``python -m models demo`` prunes the digit CNN.

The demo writes ``DIR/digit_cnn.onnx`` and ``DIR/mnist_calib.npz`` (1000 preprocessed training
images under the key ``input``), runs the ``onnx-spectral`` CLI on them at ratio 0.5, and prints
the MNIST test accuracy of the original and the pruned model.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from models import crepe, mnist
from models.runtime import run_onnx

CALIB_IMAGES = 1000
HELD_OUT_IMAGES = 200
PRUNE_RATIO = "0.5"


def fetch() -> None:
    """Fetch and export every model and data set into the cache, printing where they are."""
    print(f"MNIST CNN: {mnist.digit_cnn_onnx()}")
    for split in ("train", "test"):
        images, _ = mnist.mnist_images(split)
        print(f"MNIST {split}: {images.shape[0]} images")
    for capacity in ("tiny", "full"):
        print(f"CREPE {capacity}: {crepe.crepe_onnx(capacity)}")


def demo(out: Path) -> int:
    """Prune the digit CNN with the onnx-spectral CLI into ``out``; return the exit status."""
    out.mkdir(parents=True, exist_ok=True)
    original = out / "digit_cnn.onnx"
    pruned = out / "digit_cnn_pruned.onnx"
    calib = out / "mnist_calib.npz"
    shutil.copyfile(mnist.digit_cnn_onnx(), original)
    train_images, _ = mnist.mnist_images("train")
    np.savez(calib, input=mnist.preprocess(train_images[:CALIB_IMAGES + HELD_OUT_IMAGES]))
    command = [_cli(), str(original), str(pruned), "--calib", str(calib)]
    command += ["--ratio", PRUNE_RATIO, "--calib-samples", str(CALIB_IMAGES),
                "--verify-samples", str(HELD_OUT_IMAGES), "--report", str(out / "report.json")]
    pruned.unlink(missing_ok=True)
    status = _run(command)

    test_images, test_labels = mnist.mnist_images("test")
    inputs = mnist.preprocess(test_images)
    for label, model in (("original", original), ("pruned", pruned)):
        if model.is_file():
            score = mnist.accuracy(run_onnx(model, inputs), test_labels)
            print(f"{label}: {model} test accuracy {score:.4f}")
    if status != 0:
        print(f"onnx-spectral exited with status {status}", file=sys.stderr)
    return status


def _run(command: list[str]) -> int:
    """Run ``command``; return its exit status, 127 when the executable is missing."""
    try:
        return subprocess.run(command, check=False).returncode
    except FileNotFoundError:
        print(f"{command[0]}: not found; install the project (pip install -e .)", file=sys.stderr)
        return 127


def _cli() -> str:
    """The ``onnx-spectral`` executable, preferring the one next to this interpreter."""
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return shutil.which("onnx-spectral", path=search) or "onnx-spectral"


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the chosen command; return the exit status."""
    parser = argparse.ArgumentParser(prog="python -m models", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("fetch", help="fetch the MNIST CNN and data, CREPE tiny and full")
    demo_parser = commands.add_parser("demo", help="prune the MNIST CNN and compare accuracy")
    demo_parser.add_argument("--out", type=Path, default=Path("out"), help="output folder")
    args = parser.parse_args(argv)
    if args.command == "fetch":
        fetch()
        return 0
    return demo(args.out)


if __name__ == "__main__":
    sys.exit(main())
