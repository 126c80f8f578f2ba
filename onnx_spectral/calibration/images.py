"""Image folders as calibration data: `Preprocess` and the image loader."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from onnx_spectral.calibration.inputs import InputSpec, SampleStream, show_shape
from onnx_spectral.errors import DataError, OptionsError

_LAYOUTS = ("nchw", "nhwc")
_COLORS = ("rgb", "bgr", "gray")
_PREPROCESS_FORMS = {
    "resize": "a positive integer (shorter side in pixels)",
    "crop": "H, HxW or H:W (positive integers)",
    "mean": "numbers separated by ':' (one, or one per channel)",
    "std": "non-zero numbers separated by ':' (one, or one per channel)",
    "scale": "a positive number such as 0.0039 or 1/255",
    "layout": " or ".join(_LAYOUTS),
    "color": " or ".join(_COLORS),
}


@dataclass(frozen=True)
class Preprocess:
    """How an image file becomes one sample of a rank-4 image input.

    Steps: decode and convert to `color`; resize (bilinear) so the shorter side is `resize`
    pixels, or, when `resize` is None, to the smallest size that covers `crop`; center-crop to
    `crop` (offsets floor((size - crop) / 2)); `value = (pixel * scale - mean[c]) / std[c]`;
    lay out as (C, H, W) for "nchw" or (H, W, C) for "nhwc"; cast to the input's dtype.

    Attributes:
        resize: target length of the shorter side, or None.
        crop: (H, W) of the center crop; None: the model input's H, W.
        mean: per-channel offsets (one value or one per channel); (): 0.
        std: per-channel divisors (one value or one per channel); (): 1.
        scale: pixel multiplier; None: 1/255 for a float input, 1 for an integer input.
        layout: "nchw" or "nhwc"; None: "nhwc" when the model's axis 3 (and not axis 1) has
            1 or 3 channels, else "nchw".
        color: "rgb", "bgr" or "gray"; None: "gray" for a 1-channel input, else "rgb".
    """

    resize: int | None = None
    crop: tuple[int, int] | None = None
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    scale: float | None = None
    layout: str | None = None
    color: str | None = None

    def __post_init__(self) -> None:
        faults = {
            "resize": self.resize is not None and self.resize < 1,
            "crop": self.crop is not None and (len(self.crop) != 2 or min(self.crop) < 1),
            "mean": not all(np.isfinite(self.mean)),
            "std": not all(np.isfinite(self.std)) or 0 in self.std,
            "scale": self.scale is not None and not (0 < self.scale < np.inf),
            "layout": self.layout not in (None, *_LAYOUTS),
            "color": self.color not in (None, *_COLORS),
        }
        for key, bad in faults.items():
            if bad:
                raise OptionsError(
                    f"preprocess {key}={getattr(self, key)!r} is invalid; expected "
                    f"{_PREPROCESS_FORMS[key]}"
                )

    @classmethod
    def parse(cls, text: str) -> Preprocess:
        """Read the CLI form, e.g. "resize=256,crop=224,mean=0.485:0.456:0.406,layout=nchw".

        Keys: resize, crop, mean, std, scale, layout, color; unnamed keys keep their default.
        """
        values: dict[str, Any] = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            key, sep, raw = (part.strip() for part in item.partition("="))
            if key not in _PREPROCESS_FORMS:
                raise OptionsError(
                    f"unknown preprocess key '{key}'; accepted keys: {', '.join(_PREPROCESS_FORMS)}"
                )
            if not sep:
                raise OptionsError(f"preprocess item '{item}' is not key=value")
            if key in values:
                raise OptionsError(f"preprocess key '{key}' is given twice")
            values[key] = _parse_value(key, raw)
        return cls(**values)


def _parse_value(key: str, raw: str) -> Any:
    try:
        if key == "resize":
            return int(raw)
        if key == "crop":
            sizes = tuple(int(size) for size in raw.lower().replace("x", ":").split(":"))
            return sizes * 2 if len(sizes) == 1 else sizes
        if key in ("mean", "std"):
            return tuple(float(Fraction(value)) for value in raw.split(":"))
        if key == "scale":
            return float(Fraction(raw))
        return raw.lower()
    except (ValueError, ZeroDivisionError) as exc:
        raise OptionsError(
            f"preprocess {key}='{raw}' cannot be read; expected {_PREPROCESS_FORMS[key]}"
        ) from exc


@dataclass(frozen=True)
class _ImagePlan:
    """A `Preprocess` resolved against one model input: every choice concrete."""

    resize: int | None
    crop: tuple[int, int]
    color: str
    layout: str
    scale: float
    mean: np.ndarray  # (C,)
    std: np.ndarray  # (C,)
    dtype: np.dtype


def _plan_images(spec: InputSpec, preprocess: Preprocess) -> _ImagePlan:
    where = f"image input '{spec.name}' (model shape {show_shape(spec.shape)})"
    if len(spec.shape) != 4 or spec.dtype.kind not in "fiu":
        raise DataError(f"{where}: image folders feed rank-4 numeric inputs (NCHW or NHWC) only")
    layout = preprocess.layout or _guess_layout(spec.shape)
    axes = (1, 2, 3) if layout == "nchw" else (3, 1, 2)
    channels, height, width = (spec.shape[axis] for axis in axes)
    color = preprocess.color or ("gray" if channels == 1 else "rgb")
    if channels is not None and channels != _channels(color):
        raise DataError(
            f"{where}: {channels} channels, but color '{color}' gives {_channels(color)}"
        )
    crop_height, crop_width = preprocess.crop or (height, width)
    if crop_height is None or crop_width is None:
        raise DataError(f"{where}: H and W are dynamic; give preprocess crop=HxW")
    if (height or crop_height, width or crop_width) != (crop_height, crop_width):
        raise DataError(f"{where}: crop ({crop_height}, {crop_width}) differs from the model's")
    floats = spec.dtype.kind == "f"
    if preprocess.scale is not None:
        scale = preprocess.scale
    else:
        scale = 1 / 255 if floats else 1.0
    if not floats and (scale, preprocess.mean, preprocess.std) != (1.0, (), ()):
        raise OptionsError(f"{where}: an integer input takes raw pixels; give no scale/mean/std")
    return _ImagePlan(
        resize=preprocess.resize,
        crop=(crop_height, crop_width),
        color=color,
        layout=layout,
        scale=scale,
        mean=_per_channel(preprocess.mean, 0.0, color, "mean"),
        std=_per_channel(preprocess.std, 1.0, color, "std"),
        dtype=spec.dtype,
    )


def _guess_layout(shape: tuple[int | None, ...]) -> str:
    return "nhwc" if shape[1] not in (1, 3) and shape[3] in (1, 3) else "nchw"


def _channels(color: str) -> int:
    return 1 if color == "gray" else 3


def _per_channel(values: tuple[float, ...], default: float, color: str, key: str) -> np.ndarray:
    channels = _channels(color)
    if len(values) not in (0, 1, channels):
        raise OptionsError(
            f"preprocess {key} has {len(values)} values; color '{color}' needs 1 or {channels}"
        )
    return np.broadcast_to(np.asarray(values or (default,), np.float64), (channels,))


def open_images(
    paths: Sequence[Path], inputs: Sequence[InputSpec], preprocess: Preprocess | None
) -> SampleStream:
    if len(inputs) != 1:
        raise DataError(
            f"image folder '{paths[0].parent}' can feed a single-input model only; this model's "
            f"inputs are {[spec.name for spec in inputs]}"
        )
    spec = inputs[0]
    plan = _plan_images(spec, preprocess or Preprocess())
    chunks = ({spec.name: _load_image(path, plan)[np.newaxis]} for path in paths)
    return SampleStream(chunks, inputs, len(paths))


def _load_image(path: Path, plan: _ImagePlan) -> np.ndarray:
    """One image as (C, H, W) or (H, W, C) per `plan.layout`, in `plan.dtype`."""
    try:
        with Image.open(path) as image:
            converted = image.convert("L" if plan.color == "gray" else "RGB")
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read image '{path}': {exc}") from exc
    cropped = _center_crop(_resize(converted, plan), plan.crop, path)
    pixels = np.asarray(cropped, dtype=np.float64).reshape(*plan.crop, -1)  # (H, W, C)
    if plan.color == "bgr":
        pixels = pixels[:, :, ::-1]
    values = (pixels * plan.scale - plan.mean) / plan.std
    return (values.transpose(2, 0, 1) if plan.layout == "nchw" else values).astype(plan.dtype)


def _resize(image: Image.Image, plan: _ImagePlan) -> Image.Image:
    width, height = image.size
    crop_height, crop_width = plan.crop
    if plan.resize is None:
        factor = max(crop_height / height, crop_width / width)
    else:
        factor = plan.resize / min(height, width)
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    return image if size == image.size else image.resize(size, Image.Resampling.BILINEAR)


def _center_crop(image: Image.Image, crop: tuple[int, int], path: Path) -> Image.Image:
    width, height = image.size
    crop_height, crop_width = crop
    if height < crop_height or width < crop_width:
        raise DataError(
            f"image '{path}' is (H, W) = ({height}, {width}) after resizing, smaller than the "
            f"crop {crop}; raise preprocess resize"
        )
    top, left = (height - crop_height) // 2, (width - crop_width) // 2
    return image.crop((left, top, left + crop_width, top + crop_height))
