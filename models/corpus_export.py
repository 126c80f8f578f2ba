"""Corpus models this project builds from package-shipped weights or from other corpus models.

Each function returns the cached ``.onnx`` path under ``<cache>/onnx/corpus/`` and builds it on
first use (publishing atomically through :func:`models.cache.staged`). Exports are checked:
ONNX Runtime must reproduce the torch (or scikit-learn) outputs before the file is published.

- TorchScript exporter (``dynamo=False``): Resemblyzer's 3-layer LSTM speaker encoder, its
  scripted time loop (an ONNX ``Loop``), MTCNN's RNet and ONet (``facenet-pytorch``), the MNIST
  CNN with float16 weights.
- Dynamo exporter (``dynamo=True``, needs ``onnxscript``): the MNIST CNN at opset 21, MTCNN's
  fully convolutional PNet with dynamic height and width.
- skl2onnx: an MLP trained on scikit-learn's 8x8 digits.
- ONNX Runtime: the MNIST CNN saved after ``ORT_ENABLE_EXTENDED`` optimizations (``FusedConv``,
  ``FusedGemm`` in ``com.microsoft``) and quantized to QDQ by ``quantize_static``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from models.cache import cache_dir, fetch_package, staged
from onnx_spectral.errors import DataError

RESEMBLYZER = ("resemblyzer", "0.1.4")
FACENET = ("facenet-pytorch", "2.6.0")
ATOL = 1e-3
"""Largest absolute difference allowed between torch and ONNX Runtime outputs."""


def corpus_path(name: str) -> Path:
    """Where the corpus model ``name`` built by this project is cached."""
    return cache_dir() / "onnx" / "corpus" / f"{name}.onnx"


def session(path: Path | str, **options: Any) -> ort.InferenceSession:
    """An ONNX Runtime CPU session of ``path`` with warnings silenced."""
    settings = ort.SessionOptions()
    settings.log_severity_level = 3
    for key, value in options.items():
        setattr(settings, key, value)
    return ort.InferenceSession(str(path), settings, providers=["CPUExecutionProvider"])


def _check(path: Path, feeds: dict[str, np.ndarray], expected: Sequence[np.ndarray],
           source: str, atol: float = ATOL) -> None:
    """Raise DataError unless the model at ``path`` gives ``expected`` on ``feeds``."""
    actual = session(path).run(None, feeds)
    for index, (got, want) in enumerate(zip(actual, expected, strict=True)):
        if got.shape != want.shape or not np.allclose(got.astype(np.float64),
                                                      want.astype(np.float64), atol=atol, rtol=0):
            error = (np.abs(got.astype(np.float64) - want).max() if got.shape == want.shape
                     else f"shapes {got.shape} vs {want.shape}")
            raise DataError(f"{source}: ONNX output {index} differs from the original: {error}")


def _torch_export(module: Any, path: Path, example: Sequence[np.ndarray],
                  check: Sequence[np.ndarray], *, input_names: list[str],
                  output_names: list[str], dynamic: dict[str, dict[int, str]], opset: int,
                  dynamo: bool, source: str, atol: float = ATOL) -> Path:
    """Export a torch module with either exporter as one file and check it on ``check``."""
    import torch

    tensors = tuple(torch.from_numpy(value) for value in example)
    with torch.no_grad():
        expected = module(*(torch.from_numpy(value) for value in check))
    expected = expected if isinstance(expected, tuple) else (expected,)
    with staged(path) as staging:
        if dynamo:
            shapes = tuple({axis: torch.export.Dim(f"{name}_{axis}", min=1)
                            for axis in dynamic.get(name, {})} for name in input_names)
            program = torch.onnx.export(module, tensors, dynamo=True, opset_version=opset,
                                        input_names=input_names, output_names=output_names,
                                        dynamic_shapes=shapes)
            if program is None:
                raise DataError(f"{source}: the dynamo exporter returned no program")
            program.save(str(staging), external_data=False)
        else:
            torch.onnx.export(module, tensors, str(staging), input_names=input_names,
                              output_names=output_names, dynamic_axes=dynamic,
                              opset_version=opset, dynamo=False, external_data=False)
        feeds = dict(zip(input_names, check, strict=True))
        _check(staging, feeds, [value.numpy() for value in expected], source, atol)
    return path


# --- the MNIST CNN: dynamo, float16, ORT-optimized, QDQ ----------------------------------------


def _digit_module() -> Any:
    import torch

    from models.export import load_source_module
    from models.mnist import DIGIT_PACKAGE

    package = fetch_package(*DIGIT_PACKAGE) / "digit_recognizer"
    module = load_source_module(package / "model.py", "digit_recognizer_model").CNN()
    weights = torch.load(package / "models" / "handwriting_model.pth", map_location="cpu",
                         weights_only=True)
    module.load_state_dict(weights)
    return module.eval()


def _mnist_inputs(count: int, offset: int = 0) -> np.ndarray:
    from models.mnist import mnist_images, preprocess

    images, _ = mnist_images("test")
    return preprocess(images[offset : offset + count])


def digit_cnn_dynamo() -> Path:
    """The MNIST CNN exported by the dynamo exporter at opset 21: ``input`` float32
    [N, 1, 28, 28] -> ``logits`` [N, 10], N dynamic."""
    path = corpus_path("mnist_cnn_dynamo_op21")
    if path.is_file():
        return path
    return _torch_export(_digit_module(), path, [_mnist_inputs(2)], [_mnist_inputs(5, 2)],
                         input_names=["input"], output_names=["logits"],
                         dynamic={"input": {0: "N"}}, opset=21, dynamo=True,
                         source="digit-recognizer-py (dynamo)")


def digit_cnn_fp16() -> Path:
    """The MNIST CNN in float16 (weights, input and output), TorchScript exporter, opset 17:
    ``input`` float16 [N, 1, 28, 28] -> ``logits`` float16 [N, 10]."""
    path = corpus_path("mnist_cnn_fp16")
    if path.is_file():
        return path
    module = _digit_module().half()
    return _torch_export(module, path, [_mnist_inputs(2).astype(np.float16)],
                         [_mnist_inputs(5, 2).astype(np.float16)], input_names=["input"],
                         output_names=["logits"], dynamic={"input": {0: "N"}, "logits": {0: "N"}},
                         opset=17, dynamo=False, source="digit-recognizer-py (float16)",
                         atol=0.05)


def ort_extended(name: str, source: Callable[[], Path]) -> Path:
    """``source()`` as ONNX Runtime saves it after its extended graph optimizations
    (``ORT_ENABLE_EXTENDED``: constant folding, Conv/Gemm + activation fusion into
    ``com.microsoft`` ``FusedConv``/``FusedGemm``, ...), cached as ``name``."""
    path = corpus_path(name)
    if path.is_file():
        return path
    original = source()
    with staged(path) as staging:
        session(original, graph_optimization_level=ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                optimized_model_filepath=str(staging))
        model = onnx.load(str(staging))
        if not any(node.domain == "com.microsoft" for node in model.graph.node):
            raise DataError(f"{original}: ORT's extended optimizations added no com.microsoft op")
    return path


def qdq_static(name: str, source: Callable[[], Path],
               calibration: Callable[[], list[dict[str, np.ndarray]]]) -> Path:
    """``source()`` quantized by ``onnxruntime.quantization.quantize_static`` to the QDQ format
    (uint8 activations, int8 per-channel weights, MinMax calibration on ``calibration()``),
    after ORT's quantization pre-processing (shape inference)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    path = corpus_path(name)
    if path.is_file():
        return path

    class Reader(CalibrationDataReader):
        def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
            self.feeds = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.feeds, None)

    with staged(path) as staging:
        prepared = staging.parent / "prepared.onnx"
        quant_pre_process(str(source()), str(prepared), skip_optimization=False)
        quantize_static(str(prepared), str(staging), Reader(calibration()),
                        quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, per_channel=True)
    return path


# --- Resemblyzer: LSTM and Loop --------------------------------------------------------------


def _resemblyzer_state() -> dict[str, Any]:
    import torch

    weights = fetch_package(*RESEMBLYZER) / "resemblyzer" / "pretrained.pt"
    state = torch.load(weights, map_location="cpu", weights_only=True)["model_state"]
    return {key: value for key, value in state.items() if key.startswith(("lstm.", "linear."))}


def _resemblyzer_lstm() -> Any:
    import torch
    from torch import nn

    class VoiceEncoder(nn.Module):
        """Resemblyzer's ``VoiceEncoder.forward`` (voice_encoder.py), without its loader."""

        def __init__(self) -> None:
            super().__init__()
            self.lstm = nn.LSTM(40, 256, 3, batch_first=True)
            self.linear = nn.Linear(256, 256)
            self.relu = nn.ReLU()

        def forward(self, mels: torch.Tensor) -> torch.Tensor:
            _, (hidden, _) = self.lstm(mels)
            embeds = self.relu(self.linear(hidden[-1]))
            return embeds / torch.norm(embeds, dim=1, keepdim=True)

    module = VoiceEncoder()
    module.load_state_dict(_resemblyzer_state())
    return module.eval()


def _resemblyzer_loop() -> Any:
    import torch
    from torch import nn

    class LoopEncoder(nn.Module):
        """The same network with its three LSTM layers written as cell equations inside one
        loop over time (``torch.jit.script``: exported as an ONNX ``Loop`` whose body reads
        the weights from the outer graph)."""

        def __init__(self, state: dict[str, torch.Tensor]) -> None:
            super().__init__()
            self.w_ih = nn.ParameterList(
                [nn.Parameter(state[f"lstm.weight_ih_l{k}"].t().contiguous()) for k in range(3)])
            self.w_hh = nn.ParameterList(
                [nn.Parameter(state[f"lstm.weight_hh_l{k}"].t().contiguous()) for k in range(3)])
            self.bias = nn.ParameterList([nn.Parameter(
                state[f"lstm.bias_ih_l{k}"] + state[f"lstm.bias_hh_l{k}"]) for k in range(3)])
            self.linear = nn.Linear(256, 256)
            self.linear.load_state_dict({"weight": state["linear.weight"],
                                         "bias": state["linear.bias"]})

        def forward(self, mels: torch.Tensor) -> torch.Tensor:
            batch = mels.shape[0]
            h0 = torch.zeros(batch, 256, dtype=mels.dtype)
            h1, h2, c0, c1, c2 = h0, h0, h0, h0, h0
            for t in range(mels.shape[1]):
                h0, c0 = self._cell(mels[:, t], h0, c0, self.w_ih[0], self.w_hh[0], self.bias[0])
                h1, c1 = self._cell(h0, h1, c1, self.w_ih[1], self.w_hh[1], self.bias[1])
                h2, c2 = self._cell(h1, h2, c2, self.w_ih[2], self.w_hh[2], self.bias[2])
            embeds = torch.relu(self.linear(h2))
            return embeds / torch.norm(embeds, dim=1, keepdim=True)

        def _cell(self, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor, w_ih: torch.Tensor,
                  w_hh: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            gates = torch.matmul(x, w_ih) + torch.matmul(h, w_hh) + bias
            i, f, g, o = gates.chunk(4, 1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            return torch.sigmoid(o) * torch.tanh(c), c

    return torch.jit.script(LoopEncoder(_resemblyzer_state()).eval())


def _mels(count: int, seed: int) -> np.ndarray:
    from models.corpus_data import resemblyzer_mels

    return resemblyzer_mels(count, seed)


def resemblyzer_lstm() -> Path:
    """Resemblyzer's speaker encoder (``resemblyzer`` 0.1.4's ``pretrained.pt``), TorchScript
    exporter, opset 17: ``mels`` float32 [N, T, 40] -> ``embedding`` [N, 256], N and T
    dynamic; the 3-layer LSTM is one ONNX ``LSTM`` node per layer."""
    path = corpus_path("resemblyzer_lstm")
    if path.is_file():
        return path
    return _torch_export(_resemblyzer_lstm(), path, [_mels(2, 0)], [_mels(3, 1)[:, :120]],
                         input_names=["mels"], output_names=["embedding"],
                         dynamic={"mels": {0: "N", 1: "T"}, "embedding": {0: "N"}}, opset=17,
                         dynamo=False, source="resemblyzer (LSTM)")


def resemblyzer_loop() -> Path:
    """Resemblyzer's speaker encoder as a scripted loop over time (an ONNX ``Loop``),
    TorchScript exporter, opset 17; same input and output as :func:`resemblyzer_lstm`."""
    path = corpus_path("resemblyzer_loop")
    if path.is_file():
        return path
    return _torch_export(_resemblyzer_loop(), path, [_mels(2, 0)], [_mels(3, 1)[:, :120]],
                         input_names=["mels"], output_names=["embedding"],
                         dynamic={"mels": {0: "N", 1: "T"}, "embedding": {0: "N"}}, opset=17,
                         dynamo=False, source="resemblyzer (Loop)")


# --- MTCNN of facenet-pytorch ----------------------------------------------------------------


def _mtcnn_source() -> ModuleType:
    """facenet_pytorch/models/mtcnn.py without its relative import of the detection helpers."""
    package = fetch_package(*FACENET) / "facenet_pytorch"
    text = (package / "models" / "mtcnn.py").read_text()
    text = re.sub(r"^from \.utils\.detect_face import .*$", "", text, flags=re.M)
    module = ModuleType("facenet_pytorch_mtcnn")
    exec(compile(text, str(package / "models" / "mtcnn.py"), "exec"), module.__dict__)  # noqa: S102
    return module


def _mtcnn_net(name: str) -> Any:
    import torch

    net = getattr(_mtcnn_source(), name)(pretrained=False)
    weights = fetch_package(*FACENET) / "facenet_pytorch" / "data" / f"{name.lower()}.pt"
    net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return net.eval()


def _faces(count: int, seed: int, height: int, width: int | None = None) -> np.ndarray:
    from models.corpus_data import mtcnn_inputs

    return mtcnn_inputs(count, seed, height, width or height)


def mtcnn_pnet() -> Path:
    """MTCNN's PNet, dynamo exporter, opset 18: ``image`` float32 [N, 3, H, W] (pixels as
    ``(x - 127.5) / 128``) -> ``boxes`` [N, 4, h, w], ``probabilities`` [N, 2, h, w]; N, H, W
    dynamic."""
    path = corpus_path("mtcnn_pnet_dynamo")
    if path.is_file():
        return path
    return _torch_export(_mtcnn_net("PNet"), path, [_faces(2, 4, 120, 160)],
                         [_faces(3, 5, 150, 170)],
                         input_names=["image"], output_names=["boxes", "probabilities"],
                         dynamic={"image": {0: "N", 2: "H", 3: "W"}}, opset=18, dynamo=True,
                         source="facenet-pytorch PNet (dynamo)")


def mtcnn_fixed(name: str) -> Path:
    """MTCNN's ``RNet`` (24x24 crops) or ``ONet`` (48x48), TorchScript exporter, opset 17:
    ``image`` float32 [N, 3, S, S] -> ``boxes`` [N, 4], ``probabilities`` [N, 2] (ONet also
    ``landmarks`` [N, 10]); N dynamic."""
    size = {"RNet": 24, "ONet": 48}[name]
    path = corpus_path(f"mtcnn_{name.lower()}")
    if path.is_file():
        return path
    outputs = ["boxes", "landmarks", "probabilities"] if name == "ONet" else ["boxes",
                                                                             "probabilities"]
    return _torch_export(_mtcnn_net(name), path, [_faces(2, 0, size)], [_faces(5, 1, size)],
                         input_names=["image"], output_names=outputs,
                         dynamic={"image": {0: "N"}, **{out: {0: "N"} for out in outputs}},
                         opset=17, dynamo=False, source=f"facenet-pytorch {name}")


# --- skl2onnx --------------------------------------------------------------------------------

SKLEARN_TRAIN = 1500
"""Digits (of 1797) the MLP trains on; the rest are held out."""


def sklearn_digits_mlp() -> Path:
    """An ``MLPClassifier`` (64 -> 128 -> 64 -> 10, ReLU, seed 0) trained on the first 1500 of
    scikit-learn's 8x8 digits (pixels / 16), converted by skl2onnx (``zipmap=False``):
    ``pixels`` float32 [N, 64] -> ``label`` int64 [N], ``probabilities`` float32 [N, 10]."""
    path = corpus_path("sklearn_digits_mlp")
    if path.is_file():
        return path
    from skl2onnx import to_onnx
    from sklearn.datasets import load_digits
    from sklearn.neural_network import MLPClassifier

    digits = load_digits()
    pixels = (digits.data / 16.0).astype(np.float32)
    classifier = MLPClassifier((128, 64), random_state=0, max_iter=300)
    classifier.fit(pixels[:SKLEARN_TRAIN], digits.target[:SKLEARN_TRAIN])
    model = to_onnx(classifier, pixels[:2], options={"zipmap": False},
                    final_types=None, target_opset=None)
    model.graph.input[0].name = "pixels"
    for node in model.graph.node:
        node.input[:] = ["pixels" if name == "X" else name for name in node.input]
    held_out = pixels[SKLEARN_TRAIN:]
    with staged(path) as staging:
        onnx.save(model, str(staging))
        _check(staging, {"pixels": held_out}, [classifier.predict(held_out),
               classifier.predict_proba(held_out)], "skl2onnx MLP", atol=1e-4)
    return path
