"""The PP-OCR mobile text-orientation classifier shipped in ``rapidocr-onnxruntime`` 1.4.4, and
text-line crops from real page images to run it on.

The classifier (``ch_ppocr_mobile_v2.0_cls_infer.onnx``, a MobileNetV3-style network exported
from PaddlePaddle: depthwise convs, unfused BatchNormalization, HardSigmoid, squeeze-excitation
gates, weights in ``Constant`` nodes) maps ``x`` float32 [N, 3, 48, W] to the probabilities of
the labels ``0`` and ``180`` degrees. Crops come from the scanned page and the text photo of
scikit-image's sample data, half of them turned by 180 degrees, and are preprocessed exactly as
rapidocr's ``TextClassifier.resize_norm_img`` does.

The classifier is sure of the page's lines (orientation accuracy 95%, 90% of crops above 0.9
probability) but guesses on the handwriting (a photo of scribbled formulas: accuracy 64.5%,
8.5% of crops above 0.9), so agreement with the original is measured on ``PAGE`` crops only,
while calibration uses both sources (more diverse statistics generalize better to the page).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

from models.cache import fetch_package

PACKAGE = ("rapidocr-onnxruntime", "1.4.4")
MODEL_FILE = "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx"
HEIGHT = 48
WIDTH = 192
LABELS = ("0", "180")
TILE = 36
"""Height of the bands cut from the handwriting photo, about one line of it."""
PAGE = ("page",)
"""Crops the classifier is sure of: the text lines of the scanned page."""
BOTH = ("page", "text")
"""Page lines and handwriting bands, with equal odds."""
_MIN_INK = 0.04
"""Least share of ink pixels in a crop: blank paper is not a text line."""


def cls_model() -> Path:
    """The shipped classifier ``.onnx`` file (downloaded from PyPI on first use)."""
    return fetch_package(*PACKAGE) / MODEL_FILE


def page_images() -> list[np.ndarray]:
    """skimage's ``page`` (a scanned book page) and ``text`` (a photo of slanted handwriting,
    turned so that its lines run horizontally), as uint8 grey [H, W] arrays."""
    from skimage import data  # the `models` extra

    return [data.page(), _deskewed(data.text())]


def _ink(gray: np.ndarray) -> np.ndarray:
    """Boolean [H, W]: pixels darker than their neighbourhood (Sauvola threshold)."""
    from skimage import filters

    return gray < filters.threshold_sauvola(gray, window_size=25)


def _deskewed(gray: np.ndarray) -> np.ndarray:
    """``gray`` turned by the angle (whole degrees in -30..30) at which its rows of ink are
    most distinct (largest variance of the row profile), cropped to the original size."""
    from skimage import transform

    background = float(np.median(gray))

    def turned(angle: float) -> np.ndarray:
        return transform.rotate(gray, angle, preserve_range=True, cval=background,
                                order=1).astype(np.uint8)

    ink = _ink(gray)
    best = max(range(-30, 31), key=lambda angle: float(np.var(
        transform.rotate(ink.astype(float), angle, order=0).mean(axis=1))))
    return turned(best)


def _line_bands(gray: np.ndarray) -> list[tuple[int, int]]:
    """(top, bottom) row ranges of the text lines: runs of at least 6 rows whose ink share
    exceeds 40% of the largest row's."""
    share = _ink(gray).mean(axis=1)
    rows = share > 0.4 * share.max()
    bands, start = [], None
    for index, on in enumerate([*rows, False]):
        if on and start is None:
            start = index
        elif not on and start is not None:
            if index - start >= 6:
                bands.append((start, index))
            start = None
    return bands


def text_crops(count: int, seed: int, sources: tuple[str, ...] = BOTH
               ) -> tuple[list[np.ndarray], np.ndarray]:
    """``count`` text-line crops (uint8 RGB [h, w, 3]) and their labels ([count] int64, 1 for
    crops turned by 180 degrees, alternately 0 and 1).

    Each crop comes from one of ``sources`` ("page", "text") with equal odds: one text line of
    the page (found by its row profile of ink), or one band of 36 rows of the handwriting (its
    ruled paper defeats the profile); with a seeded random margin above and below, a random
    start and a width of 2 to 10 line heights; and it holds ink (at least 4% of its pixels
    darker than their surroundings). Raises ValueError for sources other than "page" and "text".
    """
    unknown = sorted(set(sources) - set(BOTH))
    if unknown or not sources:
        raise ValueError(f"crop sources {list(sources)}: accepted: a non-empty subset of "
                         f"{list(BOTH)}")
    rng = np.random.default_rng(seed)
    page, handwriting = page_images()
    tiles = [(top, top + TILE) for top in range(0, handwriting.shape[0] - TILE + 1, 12)]
    named = {"page": (page, _line_bands(page)), "text": (handwriting, tiles)}
    pool = [named[name] for name in BOTH if name in sources]
    ink = {id(page): _ink(page), id(handwriting): _ink(handwriting)}
    crops: list[np.ndarray] = []
    while len(crops) < count:
        image, bands = pool[int(rng.integers(len(pool)))]
        top, bottom = bands[int(rng.integers(len(bands)))]
        height = bottom - top
        top = max(0, top - int(rng.uniform(0.1, 0.4) * height))
        bottom = min(image.shape[0], bottom + int(rng.uniform(0.1, 0.4) * height))
        width = min(int((bottom - top) * rng.uniform(2.0, 10.0)), image.shape[1])
        left = int(rng.integers(0, image.shape[1] - width + 1))
        crop = image[top:bottom, left : left + width]
        if ink[id(image)][top:bottom, left : left + width].mean() < _MIN_INK:
            continue
        crop = np.repeat(crop[:, :, None], 3, axis=2)
        crops.append(np.ascontiguousarray(crop[::-1, ::-1] if len(crops) % 2 else crop))
    return crops, np.arange(count, dtype=np.int64) % 2


def preprocess(crop: np.ndarray) -> np.ndarray:
    """rapidocr's classifier preprocessing of one uint8 RGB crop [h, w, 3]: resize to height 48
    keeping the aspect ratio (width at most 192, bilinear), (x / 255 - 0.5) / 0.5, zeros
    padded on the right. Returns float32 [3, 48, 192]."""
    height, width = crop.shape[:2]
    resized_width = min(WIDTH, math.ceil(HEIGHT * width / float(height)))
    resized = Image.fromarray(crop).resize((resized_width, HEIGHT), Image.Resampling.BILINEAR)
    values = np.asarray(resized, dtype=np.float32).transpose(2, 0, 1) / 255.0
    padded = np.zeros((3, HEIGHT, WIDTH), dtype=np.float32)
    padded[:, :, :resized_width] = (values - 0.5) / 0.5
    return padded


def crop_batch(count: int, seed: int, sources: tuple[str, ...] = BOTH
               ) -> tuple[np.ndarray, np.ndarray]:
    """Preprocessed crops float32 [count, 3, 48, 192] and their labels [count] (see
    :func:`text_crops`)."""
    crops, labels = text_crops(count, seed, sources)
    return np.stack([preprocess(crop) for crop in crops]), labels
