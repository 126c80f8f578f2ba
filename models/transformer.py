"""A small BERT-like transformer encoder with seeded weights, exported to ONNX.

No pretrained transformer ships its weights in a PyPI package that fits here, so this builds
one in PyTorch: token and position embeddings, ``LAYERS`` post-norm encoder layers (multi-head
self-attention, then a feed-forward block Linear ``HIDDEN`` -> ``FFN`` -> GELU -> Linear), each
with a residual connection and LayerNorm, as in BERT. Weights are drawn with ``seed`` (BERT's
N(0, 0.02) for linear layers and embeddings). The graph maps ``tokens`` int64 [N, SEQ] to
``hidden`` float32 [N, SEQ, HIDDEN]; torch's TorchScript exporter (``dynamo=False``, opset 17)
writes GELU as its Erf formulation and the FFN as MatMul + Add on the 3-D layout.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from models.cache import cache_dir

VOCAB = 1000
SEQ = 32
HIDDEN = 64
HEADS = 4
FFN = 256
LAYERS = 2


def _build(seed: int):  # -> torch.nn.Module; torch is imported lazily (the `models` extra)
    import torch
    from torch import nn

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv = nn.Linear(HIDDEN, 3 * HIDDEN)
            self.out = nn.Linear(HIDDEN, HIDDEN)
            self.norm1 = nn.LayerNorm(HIDDEN)
            self.ff1 = nn.Linear(HIDDEN, FFN)
            self.ff2 = nn.Linear(FFN, HIDDEN)
            self.norm2 = nn.LayerNorm(HIDDEN)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            batch, seq, _ = x.shape
            q, k, v = self.qkv(x).view(batch, seq, 3, HEADS, HIDDEN // HEADS).permute(
                2, 0, 3, 1, 4).unbind(0)
            scores = q @ k.transpose(-1, -2) / math.sqrt(HIDDEN // HEADS)
            context = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, seq, HIDDEN)
            x = self.norm1(x + self.out(context))
            return self.norm2(x + self.ff2(nn.functional.gelu(self.ff1(x))))

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tokens = nn.Embedding(VOCAB, HIDDEN)
            self.positions = nn.Parameter(torch.zeros(1, SEQ, HIDDEN))
            self.norm = nn.LayerNorm(HIDDEN)
            self.layers = nn.ModuleList(Layer() for _ in range(LAYERS))

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            x = self.norm(self.tokens(tokens) + self.positions)
            for layer in self.layers:
                x = layer(x)
            return x

    torch.manual_seed(seed)
    model = Encoder()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                nn.init.normal_(module.bias, std=0.02)
        nn.init.normal_(model.tokens.weight, std=0.02)
        nn.init.normal_(model.positions, std=0.02)
    return model.eval()


def token_batch(count: int, seed: int) -> np.ndarray:
    """Seeded random token ids: int64 [count, SEQ]."""
    return np.random.default_rng(seed).integers(0, VOCAB, size=(count, SEQ), dtype=np.int64)


def encoder_onnx(seed: int = 0) -> Path:
    """The cached ONNX export of the encoder with weights drawn from ``seed``."""
    path = cache_dir() / "onnx" / f"bert_like_encoder_seed{seed}.onnx"
    if path.is_file():
        return path
    from models.export import export_onnx

    return export_onnx(_build(seed), path, input_name="tokens", output_name="hidden",
                       check_inputs=token_batch(6, seed + 1),
                       source="models/transformer.py (seeded BERT-like encoder)")
