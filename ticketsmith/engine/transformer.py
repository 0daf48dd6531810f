"""A small decoder-only transformer (GPT): pre-LayerNorm blocks, causal self-attention through
`scaled_dot_product_attention`, GELU MLP, tied input/output embeddings.

Heads and MLP hidden units may differ per block (`heads`, `mlp_hidden` as lists), so that a
structured ticket compacts into a smaller model of this same class (serving/compaction.py).
Prunable weights are the Linear layers of the blocks (attention projections, MLP); the
embeddings and the tied output head are not Linear modules and stay dense.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """Causal multi-head self-attention; `qkv` rows are [q heads | k heads | v heads]."""

    def __init__(self, width: int, heads: int, head_dim: int, bias: bool, dropout: float):
        super().__init__()
        self.heads, self.head_dim, self.dropout = heads, head_dim, dropout
        self.qkv = nn.Linear(width, 3 * heads * head_dim, bias=bias)
        self.proj = nn.Linear(heads * head_dim, width, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int, bias: bool):
        super().__init__()
        self.fc = nn.Linear(width, hidden, bias=bias)
        self.proj = nn.Linear(hidden, width, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, head_dim: int, hidden: int, bias: bool,
                 dropout: float):
        super().__init__()
        self.ln1 = nn.LayerNorm(width, bias=bias)
        self.attn = Attention(width, heads, head_dim, bias, dropout)
        self.ln2 = nn.LayerNorm(width, bias=bias)
        self.mlp = MLP(width, hidden, bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.mlp(self.ln2(x)))


def _per_block(value: int | list[int], layers: int, what: str) -> list[int]:
    values = [value] * layers if isinstance(value, int) else list(value)
    if len(values) != layers or any(v < 1 for v in values):
        raise ValueError(f"model.options.{what}: expected a positive int or {layers} of them, "
                         f"got {value!r}")
    return values


class GPT(nn.Module):
    """Token ids (batch, time) → next-token logits (batch, time, vocab)."""

    def __init__(self, vocab: int, context: int, layers: int = 4, heads: int | list[int] = 4,
                 width: int = 128, head_dim: int | None = None,
                 mlp_hidden: int | list[int] | None = None, dropout: float = 0.0,
                 bias: bool = True):
        super().__init__()
        heads_per = _per_block(heads, layers, "heads")
        head_dim = head_dim or width // heads_per[0]
        hidden_per = _per_block(mlp_hidden or 4 * width, layers, "mlp_hidden")
        self.vocab, self.context, self.width = vocab, context, width
        self.wte = nn.Embedding(vocab, width)
        self.wpe = nn.Embedding(context, width)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(width, h, head_dim, m, bias, dropout)
                                    for h, m in zip(heads_per, hidden_per))
        self.ln_f = nn.LayerNorm(width, bias=bias)
        self._init_weights(layers)

    def _init_weights(self, layers: int) -> None:
        # GPT-2's scheme: N(0, 0.02), residual projections scaled by 1/sqrt(2 * layers).
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        if t > self.context:
            raise ValueError(f"sequence of {t} tokens is longer than the model's context "
                             f"({self.context})")
        pos = torch.arange(t, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.blocks:
            x = block(x)
        return F.linear(self.ln_f(x), self.wte.weight)  # tied output head


def build_gpt(shape: tuple[int, ...], n: int, layers: int = 4, heads: int | list[int] = 4,
              width: int = 128, head_dim: int | None = None,
              mlp_hidden: int | list[int] | None = None, dropout: float = 0.0,
              bias: bool = True) -> GPT:
    """The registry's builder: input shape (context,), `n` = vocabulary size."""
    return GPT(n, shape[0], layers, heads, width, head_dim, mlp_hidden, dropout, bias)
