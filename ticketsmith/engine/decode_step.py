"""The decode step of our GPT without nn.Module calls: one new token per row after a filled
KV cache (engine/generate.py's `Cache`), the same arithmetic as `generate.gpt_step` at t = 1.

At batch 1 on the serving-sized GPT (width 384) a decoded token's block Linears take about
0.7 ms of CPU and everything else (embeddings, norms, cache writes, attention, the head) took
about 0.5 ms more, as ~45 small torch calls plus nn.Module dispatch: a cost pruning cannot
remove, so it diluted every speedup. Here each block's weights and sizes are looked up once
per model (`StepPlan`), a plain nn.Linear runs as one `torch.addmm` on its stored transpose
(`F.linear` dispatches `t` and `addmm`), a kernel module (sparse, int8) runs its own
`forward`, the hidden state stays (batch, width) and residual adds are in place. A padded
batch adds a -inf bias over its padding keys (`Cache.bias`), so its rows decode as alone.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

Linear = Callable[[torch.Tensor], torch.Tensor]


def linear_call(m: nn.Module) -> Linear:
    """`m(x)` for 2-D x without nn.Module's `__call__`: `torch.addmm` on the transposed weight
    (a view: later in-place edits of the weight are seen) for a plain nn.Linear, the module's
    own `forward` for anything else (a sparse or int8 kernel, a timing wrapper); the module
    itself where a forward hook watches it (hooks run only through `__call__`)."""
    if _hooked(m):
        return m
    if type(m) is nn.Linear:
        wt, b = m.weight.t(), m.bias
        if b is None:
            return lambda x: torch.mm(x, wt)
        return lambda x: torch.addmm(b, x, wt)
    return m.forward


def _hooked(m: nn.Module) -> bool:
    from torch.nn.modules import module as mod

    return bool(m._forward_hooks or m._forward_pre_hooks or mod._global_forward_hooks
                or mod._global_forward_pre_hooks)


class BlockCalls(NamedTuple):
    """One block's tensors and calls, looked up once (a module attribute costs ~1 us)."""
    ln1: tuple
    qkv: Linear
    proj: Linear
    ln2: tuple
    fc: Linear
    mlp_proj: Linear
    heads: int
    head_dim: int


def _ln(ln: nn.LayerNorm) -> tuple:
    return (ln.normalized_shape, ln.weight, ln.bias, ln.eps, False)


class StepPlan:
    """A GPT's decode step as flat calls; build one per model (cheap: no weight is copied)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.wte, self.wpe, self.head = model.wte.weight, model.wpe.weight, model.wte.weight.t()
        self.ln_f = _ln(model.ln_f)
        self.blocks = [BlockCalls(_ln(b.ln1), linear_call(b.attn.qkv), linear_call(b.attn.proj),
                                  _ln(b.ln2), linear_call(b.mlp.fc), linear_call(b.mlp.proj),
                                  b.attn.heads, b.attn.head_dim) for b in model.blocks]

    def __call__(self, tokens: torch.Tensor, pos: int | torch.Tensor, cache) -> torch.Tensor:
        """tokens (batch,) at position `pos` (an int shared by every row, or one per row, a
        (batch,) tensor) after `cache.filled` cached ones; returns logits (batch, vocab)."""
        start = cache.filled
        n = start + 1
        wpe = self.wpe[pos] if isinstance(pos, int) else self.wpe.index_select(0, pos)
        x = self.wte.index_select(0, tokens).add_(wpe)
        # (batch, 1, 1, keys): 0 on real keys, -inf on padding; None when nothing is padded
        bias = cache.bias[:, None, None, :n] if cache.padded else None
        b = x.shape[0]
        for i, blk in enumerate(self.blocks):
            hd = blk.heads * blk.head_dim
            qkv = blk.qkv(torch.layer_norm(x, *blk.ln1))
            k, v = cache.k[i], cache.v[i]
            k.select(2, start).copy_(qkv[:, hd:2 * hd].reshape(b, blk.heads, blk.head_dim))
            v.select(2, start).copy_(qkv[:, 2 * hd:].reshape(b, blk.heads, blk.head_dim))
            q = qkv[:, :hd].reshape(b, blk.heads, 1, blk.head_dim)
            y = F.scaled_dot_product_attention(q, k[:, :, :n], v[:, :, :n], attn_mask=bias)
            x.add_(blk.proj(y.reshape(b, hd)))
            x.add_(blk.mlp_proj(F.gelu(blk.fc(torch.layer_norm(x, *blk.ln2)))))
        cache.filled = n
        return torch.mm(torch.layer_norm(x, *self.ln_f), self.head)
