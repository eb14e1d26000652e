"""The benchmark's models: a small GPT with a tied head, a model of many small vectors, the size
presets the side-by-side run sweeps, and the square MLP of the peak-memory table."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn


class Block(nn.Module):
    """A pre-norm transformer block: causal self-attention, then a 4x MLP."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        mask = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool, device=x.device).triu(1)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """A small decoder-only transformer with a tied head."""

    def __init__(self, vocab: int, d: int, layers: int, seq: int, heads: int = 4):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.blocks = nn.Sequential(*(Block(d, heads) for _ in range(layers)))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.tok.weight
        nn.init.normal_(self.tok.weight, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        return self.head(self.ln(self.blocks(self.tok(idx) + self.pos(pos))))


class ManySmall(nn.Module):
    """A token model whose parameters are thousands of small vectors (``tensors`` of ``width``
    elements) besides a tied embedding: the shape of a model full of biases and norms, which
    stresses per-tensor overheads (hooks, launches, per-parameter collectives), not FLOPs.
    The vectors are stacked into one matrix for a cheap mixing layer, so every one of them
    gets its own gradient through its own AccumulateGrad node."""

    def __init__(self, vocab: int, width: int, tensors: int):
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.vecs = nn.ParameterList(
            nn.Parameter(torch.randn(width) / math.sqrt(width)) for _ in range(tensors)
        )

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        w = torch.stack(list(self.vecs))
        h = self.tok(idx)
        h = h + torch.tanh(h @ w.t()) @ w / math.sqrt(len(self.vecs))
        return h @ self.tok.weight.t()


@dataclass(frozen=True)
class Size:
    """A model preset: GPT dimensions, or ``tensors`` small vectors for ``ManySmall``."""

    vocab: int
    d_model: int
    layers: int = 0
    tensors: int = 0

    def build(self, seq_len: int) -> nn.Module:
        if self.tensors:
            return ManySmall(self.vocab, self.d_model, self.tensors)
        return GPT(self.vocab, self.d_model, self.layers, seq_len)


SIZES = {  # 0.67M, 4.2M and 23M parameters: the default sweep spans 35x
    "tiny": Size(vocab=128, d_model=32, layers=1),
    "small": Size(vocab=2048, d_model=128, layers=2),
    "medium": Size(vocab=4096, d_model=256, layers=4),
    "large": Size(vocab=8192, d_model=512, layers=6),
}
MANY_SMALL = Size(vocab=64, d_model=64, tensors=2000)
MANY_SMALL_QUICK = Size(vocab=64, d_model=64, tensors=200)


def mlp(width: int = 2048, layers: int = 12) -> nn.Module:
    """The peak-memory model: ``layers`` square ``Linear`` layers (50.4M parameters at the
    defaults), so that optimizer and gradient memory dwarf activations."""
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
