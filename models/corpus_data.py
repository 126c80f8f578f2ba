"""Real inputs for the corpus models (:mod:`models.corpus`): photos, text lines, sounds, files.

Everything here is seeded: the same ``(count, seed)`` gives the same arrays. Calibration uses
seed 0 and held-out data seed 1 by convention; different seeds draw different crops/clips.

- Photos: the colour and grey sample images that ship in scikit-image (``skimage.data``),
  scikit-learn (``china.jpg``, ``flower.jpg``) and matplotlib (``grace_hopper.jpg``), cut into
  seeded random square-ish crops (50-100% of the shorter side, random mirror) and resized.
- Text lines: the crops of :func:`models.ppocr.text_crops` (scanned page and handwriting).
- Sounds: seeded 16 kHz clips, one of four kinds in turn: a vowel-like voice (a glottal pulse
  train with a gliding f0 of 90-260 Hz through three formant resonators, syllable-rate
  envelope), harmonic tones (as CREPE's), band-limited noise bursts, near-silence. There is no
  recorded speech on PyPI that fits, so voice-activity and wake-word models see speech-like
  signals, not speech.
- Files: bytes of real files of known type found in the installed Python and its packages, as
  Magika reads them.
"""

from __future__ import annotations

import sys
import sysconfig
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image

SAMPLE_RATE = 16000
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


# --- photos -----------------------------------------------------------------------------------


@cache
def photos() -> tuple[np.ndarray, ...]:
    """The sample photos as uint8 RGB [H, W, 3] arrays (grey ones repeated to 3 channels)."""
    import matplotlib.cbook
    from skimage import data
    from sklearn.datasets import load_sample_images

    colour = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(),
              data.hubble_deep_field(), data.immunohistochemistry(), data.retina()]
    grey = [data.camera(), data.page(), data.text(), data.coins(), data.moon(), data.clock()]
    colour += list(load_sample_images().images)
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as file:
        colour.append(np.asarray(Image.open(file).convert("RGB")))
    images = [np.ascontiguousarray(image[:, :, :3]) for image in colour]
    images += [np.repeat(image[:, :, None], 3, axis=2) for image in grey]
    return tuple(images)


def photo_crops(count: int, seed: int, height: int, width: int | None = None) -> np.ndarray:
    """``count`` seeded random crops of :func:`photos` resized to uint8 RGB [count, h, w, 3].

    Crop ``i`` comes from photo ``(seed + i) % len(photos())``; its box covers 50-100% of the
    shorter side with the aspect ratio of ``height`` x ``width`` (square when ``width`` is
    None), at a random place, mirrored with probability 1/2; bilinear resize.
    """
    width = height if width is None else width
    rng = np.random.default_rng(seed)
    pool = photos()
    crops = []
    for index in range(count):
        image = pool[(seed + index) % len(pool)]
        rows, cols = image.shape[:2]
        scale = rng.uniform(0.5, 1.0) * min(rows / height, cols / width)
        box_h, box_w = max(1, int(height * scale)), max(1, int(width * scale))
        top = int(rng.integers(0, rows - box_h + 1))
        left = int(rng.integers(0, cols - box_w + 1))
        crop = image[top : top + box_h, left : left + box_w]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        resized = Image.fromarray(np.ascontiguousarray(crop)).resize(
            (width, height), Image.Resampling.BILINEAR)
        crops.append(np.asarray(resized))
    return np.stack(crops)


def to_nchw(images: np.ndarray, *, scale: float = 1 / 255, mean: np.ndarray | float = 0.0,
            std: np.ndarray | float = 1.0, bgr: bool = False) -> np.ndarray:
    """uint8 [N, H, W, 3] -> float32 [N, 3, H, W]: ``(x * scale - mean) / std`` per channel."""
    values = images[..., ::-1] if bgr else images
    values = (values.astype(np.float32) * np.float32(scale) - mean) / std
    return np.ascontiguousarray(values.transpose(0, 3, 1, 2)).astype(np.float32)


def letterbox(images: np.ndarray, size: int, fill: int = 114) -> np.ndarray:
    """Fit uint8 [N, H, W, 3] into [N, size, size, 3] keeping the aspect ratio, top-left, padded
    with ``fill`` (YOLO-style letterboxing as nudenet and ddddocr's detector do)."""
    out = np.full((len(images), size, size, 3), fill, dtype=np.uint8)
    for index, image in enumerate(images):
        ratio = size / max(image.shape[:2])
        h, w = max(1, round(image.shape[0] * ratio)), max(1, round(image.shape[1] * ratio))
        out[index, :h, :w] = np.asarray(Image.fromarray(image).resize(
            (w, h), Image.Resampling.BILINEAR))
    return out


def photo_frames(count: int, seed: int, aspect: float) -> list[np.ndarray]:
    """Seeded crops of various sizes (aspect ``width / height`` about ``aspect``), uint8 RGB,
    for the letterboxing detectors: the longer side between 300 and 900 pixels."""
    rng = np.random.default_rng(seed)
    frames = []
    for index in range(count):
        height = int(rng.integers(300, 700))
        width = int(np.clip(height * aspect * rng.uniform(0.7, 1.4), 200, 900))
        frames.append(photo_crops(1, seed * 1000 + index, height, width)[0])
    return frames


# --- text lines -------------------------------------------------------------------------------


def text_lines(count: int, seed: int, height: int, width: int, grey: bool = False) -> np.ndarray:
    """``count`` text-line crops of :func:`models.ppocr.text_crops` (page lines only, upright),
    resized to ``height`` keeping the aspect ratio and padded on the right with white to
    ``width``. Returns uint8 [count, height, width] when ``grey``, else [count, height, width, 3].
    """
    from models.ppocr import PAGE, text_crops

    crops, _ = text_crops(2 * count, seed, PAGE)
    lines = []
    for crop in crops[::2]:  # even crops are upright
        resized_w = min(width, max(8, round(height * crop.shape[1] / crop.shape[0])))
        canvas = np.full((height, width, 3), 255, dtype=np.uint8)
        canvas[:, :resized_w] = np.asarray(Image.fromarray(crop).resize(
            (resized_w, height), Image.Resampling.BILINEAR))
        lines.append(canvas[:, :, 0] if grey else canvas)
    return np.stack(lines)


# --- sounds -----------------------------------------------------------------------------------

_VOWELS = ((730, 1090, 2440), (270, 2290, 3010), (300, 870, 2240), (530, 1840, 2480),
           (570, 840, 2410), (440, 1020, 2240), (660, 1720, 2410))
"""Formants F1-F3 in Hz of English vowels (Peterson and Barney)."""


def _resonate(signal: np.ndarray, frequency: float, bandwidth: float) -> np.ndarray:
    """A second-order resonator (formant filter) at ``frequency`` Hz."""
    from scipy.signal import lfilter

    radius = np.exp(-np.pi * bandwidth / SAMPLE_RATE)
    theta = 2 * np.pi * frequency / SAMPLE_RATE
    denominator = [1.0, -2 * radius * np.cos(theta), radius**2]
    return lfilter([1.0 - radius], denominator, signal)


def _voice(samples: int, rng: np.random.Generator) -> np.ndarray:
    """A vowel-like voice: gliding-f0 pulse train through formants, syllable envelope."""
    time = np.arange(samples) / SAMPLE_RATE
    f0 = rng.uniform(90, 260) * (1 + 0.15 * np.sin(2 * np.pi * rng.uniform(0.5, 3) * time))
    phase = np.cumsum(f0) / SAMPLE_RATE
    pulses = np.diff(np.floor(phase), prepend=0.0)
    signal = pulses + 0.02 * rng.standard_normal(samples)
    formants = _VOWELS[int(rng.integers(len(_VOWELS)))]
    signal = sum(_resonate(signal, f, 80 + 40 * i) / (i + 1) for i, f in enumerate(formants))
    syllables = 0.5 - 0.5 * np.cos(2 * np.pi * rng.uniform(2.5, 5.0) * time)
    return np.asarray(signal * (0.2 + 0.8 * syllables))


def _tones(samples: int, rng: np.random.Generator) -> np.ndarray:
    time = np.arange(samples) / SAMPLE_RATE
    f0 = np.exp(rng.uniform(np.log(80), np.log(1000)))
    harmonics = np.arange(1, 5)
    return np.sum(rng.uniform(0.3, 1.0, 4)[:, None] / harmonics[:, None]
                  * np.sin(2 * np.pi * f0 * harmonics[:, None] * time), axis=0)


def _noise(samples: int, rng: np.random.Generator) -> np.ndarray:
    noise = _resonate(rng.standard_normal(samples), rng.uniform(300, 4000), 1500)
    bursts = (np.sin(2 * np.pi * rng.uniform(1, 4) * np.arange(samples) / SAMPLE_RATE) > 0)
    return np.asarray(noise * (0.1 + bursts))


def audio_clips(count: int, seed: int, samples: int) -> np.ndarray:
    """``count`` seeded clips float32 [count, samples] at 16 kHz, peak in 0.1..0.9.

    Clip ``i`` is a voice, tones, noise or near-silence for ``(seed + i) % 4`` = 0, 1, 2, 3.
    """
    rng = np.random.default_rng(seed)
    kinds = (_voice, _tones, _noise)
    clips = []
    for index in range(count):
        kind = (seed + index) % 4
        if kind == 3:
            clip = 0.01 * rng.standard_normal(samples)
        else:
            clip = kinds[kind](samples, rng)
        clip = clip / max(float(np.abs(clip).max()), 1e-9) * rng.uniform(0.1, 0.9)
        clips.append(clip)
    return np.stack(clips).astype(np.float32)


def mel_power(audio: np.ndarray, channels: int = 40, window_ms: int = 25,
            hop_ms: int = 10) -> np.ndarray:
    """Mel power spectrogram [frames, channels] of 16 kHz ``audio`` as Resemblyzer computes it
    (librosa's Slaney mel filters, Hann window, centered frames), without log."""
    n_fft = SAMPLE_RATE * window_ms // 1000
    hop = SAMPLE_RATE * hop_ms // 1000
    padded = np.pad(audio, n_fft // 2, mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(padded, n_fft)[::hop]
    power = np.abs(np.fft.rfft(frames * np.hanning(n_fft + 1)[:-1], axis=1)) ** 2
    return (power @ _mel_filters(n_fft, channels).T).astype(np.float32)


def _mel_filters(n_fft: int, channels: int) -> np.ndarray:
    """Slaney-style mel filterbank [channels, n_fft // 2 + 1] (librosa's default)."""

    def hz_to_mel(hz: np.ndarray) -> np.ndarray:
        hz = np.asarray(hz, dtype=np.float64)
        linear = hz / (200.0 / 3)
        log = 15.0 + np.log(np.maximum(hz, 1e-10) / 1000.0) / (np.log(6.4) / 27.0)
        return np.where(hz >= 1000.0, log, linear)

    def mel_to_hz(mel: np.ndarray) -> np.ndarray:
        linear = mel * (200.0 / 3)
        log = 1000.0 * np.exp((np.log(6.4) / 27.0) * (mel - 15.0))
        return np.where(mel >= 15.0, log, linear)

    bins = np.linspace(0, SAMPLE_RATE / 2, n_fft // 2 + 1)
    edges = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(SAMPLE_RATE / 2.0), channels + 2))
    lower = (bins[None, :] - edges[:-2, None]) / np.diff(edges)[:-1, None]
    upper = (edges[2:, None] - bins[None, :]) / np.diff(edges)[1:, None]
    weights = np.maximum(0, np.minimum(lower, upper))
    return weights * (2.0 / (edges[2:] - edges[:-2]))[:, None]


# --- files ------------------------------------------------------------------------------------

MAGIKA_TYPES = {
    ".py": "python", ".json": "json", ".html": "html", ".css": "css", ".js": "javascript",
    ".md": "markdown", ".c": "c", ".h": "c", ".csv": "csv", ".xml": "xml", ".txt": "txt",
    ".png": "png", ".so": "elf", ".pyc": "pythonbytecode", ".toml": "toml", ".ini": "ini",
    ".sh": "shell", ".pyi": "python", ".rst": "rst", ".svg": "svg", ".jpg": "jpeg",
}
"""File name endings and the Magika label of such files."""
MAGIKA_BEG = 1024
MAGIKA_END = 1024
MAGIKA_BLOCK = 4096
MAGIKA_PADDING = 256


@cache
def typed_files() -> tuple[tuple[Path, str], ...]:
    """(path, Magika label) of files of at least 2 KiB under this Python's library folders,
    at most 40 per ending, sorted (so the same environment gives the same list)."""
    roots = {Path(sysconfig.get_paths()["purelib"]), Path(sysconfig.get_paths()["stdlib"]),
             Path(sys.prefix)}
    found: dict[str, list[Path]] = {suffix: [] for suffix in MAGIKA_TYPES}
    for root in sorted(roots):
        for path in sorted(root.rglob("*")):
            suffix = path.suffix
            if suffix in found and len(found[suffix]) < 40 and path.is_file():
                if path.stat().st_size >= 2048:
                    found[suffix].append(path)
    return tuple((path, MAGIKA_TYPES[suffix]) for suffix in sorted(found)
                 for path in sorted(set(found[suffix])))


def magika_features(path: Path) -> np.ndarray:
    """Magika's model input for one file: int32 [2048], the first 1024 bytes after leading
    whitespace and the last 1024 bytes before trailing whitespace, padded with 256 (as
    ``magika`` 1.0's ``standard_v3_3`` config says: ``beg_size``/``end_size`` 1024 of
    ``block_size`` 4096)."""
    data = path.read_bytes()
    begin = data[:MAGIKA_BLOCK].lstrip()[:MAGIKA_BEG]
    end = data[-MAGIKA_BLOCK:].rstrip()[-MAGIKA_END:]
    features = np.full(MAGIKA_BEG + MAGIKA_END, MAGIKA_PADDING, dtype=np.int32)
    features[: len(begin)] = np.frombuffer(begin, dtype=np.uint8)
    if end:
        features[MAGIKA_BEG + MAGIKA_END - len(end) :] = np.frombuffer(end, dtype=np.uint8)
    return features


def resemblyzer_mels(count: int, seed: int, frames: int = 160) -> np.ndarray:
    """Resemblyzer's input for ``count`` clips of :func:`audio_clips`: each clip normalized to
    -30 dBFS as ``resemblyzer.preprocess_wav`` does, then its 40-channel mel power spectrogram
    (25 ms windows, 10 ms hop), ``frames`` frames (a 1.6 s partial utterance): float32
    [count, frames, 40]."""
    samples = (frames - 1) * SAMPLE_RATE // 100
    clips = audio_clips(count, seed, samples).astype(np.float64)
    rms = np.sqrt(np.mean(clips**2, axis=1, keepdims=True))
    clips *= 10 ** (-30 / 20) / np.maximum(rms, 1e-9)
    return np.stack([mel_power(clip)[:frames] for clip in clips]).astype(np.float32)


def mtcnn_inputs(count: int, seed: int, height: int, width: int) -> np.ndarray:
    """Photo crops as MTCNN takes them: float32 [count, 3, height, width], ``(x - 127.5) / 128``
    (facenet-pytorch's ``detect_face``)."""
    return to_nchw(photo_crops(count, seed, height, width), scale=1.0, mean=127.5, std=128.0)
