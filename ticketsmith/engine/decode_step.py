"""The KV cache of our GPT and its decode step without nn.Module calls: one new token per row
after a filled cache, the same arithmetic as `generate.gpt_step` at t = 1.

At batch 1 on the serving-sized GPT (width 384) a decoded token's block Linears take about
0.7 ms of CPU and everything else (embeddings, norms, cache writes, attention, the head) took
about 0.5 ms more, as ~45 small torch calls plus nn.Module dispatch: a cost pruning cannot
remove, so it diluted every speedup. Between two block Linears, which stream megabytes of
weights through the caches, even a tiny torch call costs 3-5 us, so the step makes few:
each block's weights and sizes are looked up once per model (`StepPlan`), a plain nn.Linear
runs as one `torch.addmm` on its stored transpose (`F.linear` dispatches `t` and `addmm`), a
kernel module (sparse, int8) runs its own `forward`, the hidden state stays (batch, width),
residual adds are in place, each Linear writes into an output kept from step to step, and
the qkv projection is written straight into the cache (`Cache.qkv`), so storing this
token's keys and values costs no copy. A padded batch adds a
-inf bias over its padding keys (`Cache.bias`), so its rows decode as alone.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

Linear = Callable[[torch.Tensor], torch.Tensor]
LinearInto = Callable[[torch.Tensor, torch.Tensor], object]


class Cache:
    """Queries, keys and values per block as one buffer, `qkv[i]` (batch, length, 3, heads,
    head_dim), preallocated to `length` positions and filled up to `filled`: one position's
    row is the layout of the qkv projection's output, so a decode step writes it there
    directly. `k[i]`, `v[i]` (and `q[i]`) are views of it, (batch, heads, length, head_dim).
    `valid` (batch, length) marks real (unpadded) keys; `bias` (batch, length), set by `pad`,
    is its additive form for the decode step (0 on real and future keys, -inf on padding)."""

    def __init__(self, model: nn.Module, batch: int, length: int, device, dtype):
        self.qkv: list[torch.Tensor] = []
        self.q: list[torch.Tensor] = []
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        for b in model.blocks:
            self._set(len(self.qkv), torch.zeros(batch, length, 3, b.attn.heads,
                                                 b.attn.head_dim, device=device, dtype=dtype))
        self.valid = torch.zeros(batch, length, dtype=torch.bool, device=device)
        self.padded = False
        self.bias: torch.Tensor | None = None
        self.filled = 0

    def _set(self, i: int, buf: torch.Tensor) -> None:
        views = [buf[:, :, j].transpose(1, 2) for j in range(3)]
        if i == len(self.qkv):
            for store, item in zip((self.qkv, self.q, self.k, self.v), (buf, *views)):
                store.append(item)
        else:
            self.qkv[i], (self.q[i], self.k[i], self.v[i]) = buf, views

    def pad(self, valid: torch.Tensor) -> None:
        """Mark the prompt's keys, `valid` (batch, width): False where a row is left-padded."""
        width = valid.shape[1]
        self.valid[:, :width] = valid
        self.padded = not bool(valid.all())
        if self.padded:
            self.bias = torch.zeros(self.valid.shape, dtype=self.qkv[0].dtype,
                                    device=valid.device)
            self.bias[:, :width].masked_fill_(~valid, -math.inf)

    def select_heads(self, i: int, keep: torch.Tensor, heads: int | None = None) -> None:
        """Block `i` keeps only the heads `keep` (`heads` None), or its heads are spread to
        positions `keep` among `heads` heads, the others zero: a plan carrying the cache
        between a compacted model and the dense one."""
        buf = self.qkv[i]
        if heads is None:
            self._set(i, buf[:, :, :, keep].contiguous())
        else:
            wide = buf.new_zeros(*buf.shape[:3], heads, buf.shape[4])
            wide[:, :, :, keep] = buf
            self._set(i, wide)

    def nbytes(self) -> int:
        """Bytes of the keys and values in use (what a decode step reads)."""
        return sum(k[:, :, :self.filled].numel() * k.element_size() * 2 for k in self.k)


def _hooked(m: nn.Module) -> bool:
    from torch.nn.modules import module as mod

    return bool(m._forward_hooks or m._forward_pre_hooks or mod._global_forward_hooks
                or mod._global_forward_pre_hooks)


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


def linear_to(m: nn.Module) -> LinearInto:
    """`m(x)` for 2-D x, written into `out` (rows, out features) where the kernel can: a plain
    nn.Linear (`addmm(out=)`) and a kernel module with a `forward_into(x, out)` method (which
    returns `out`, or a new tensor where it cannot write there); else a new tensor. A decode
    step so reuses one output per layer instead of allocating one per token."""
    if _hooked(m):
        return lambda x, out: m(x)
    if hasattr(m, "forward_into"):
        return m.forward_into
    if type(m) is nn.Linear:
        wt, b = m.weight.t(), m.bias
        if b is None:
            return lambda x, out: torch.mm(x, wt, out=out)
        return lambda x, out: torch.addmm(b, x, wt, out=out)
    call = m.forward
    return lambda x, out: call(x)


def linear_into(m: nn.Module) -> LinearInto:
    """`out[:] = m(x)`: `linear_to`, and a copy where the kernel gave a new tensor."""
    to = linear_to(m)

    def into(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        y = to(x, out)
        return out if y is out else out.copy_(y)
    return into


def out_features(m: nn.Module, width: int | None = None) -> int:
    """How many features `m` maps a row to: its `out_features` or weight rows, else (given
    the row's `width`) measured on one zero row."""
    n = getattr(m, "out_features", None)
    if isinstance(n, int):
        return n
    w = getattr(m, "weight", None)
    if isinstance(w, torch.Tensor) and w.dim() == 2:
        return w.shape[0]
    if width is None:
        raise ValueError(f"{type(m).__name__}: no out_features or weight, and no width given")
    with torch.inference_mode():
        return linear_call(m)(torch.zeros(1, width)).shape[-1]


class BlockCalls(NamedTuple):
    """One block's tensors and calls, looked up once (a module attribute costs ~1 us)."""
    ln1: tuple
    qkv: LinearInto
    proj: LinearInto
    ln2: tuple
    fc: LinearInto
    mlp_proj: LinearInto
    width: int  # heads x head_dim: the attention's output features
    hidden: int  # the MLP's hidden units


def _ln(ln: nn.LayerNorm) -> tuple:
    """`torch.layer_norm`'s arguments after the input (the last: cudnn off, CPU or not)."""
    return (ln.normalized_shape, ln.weight, ln.bias, ln.eps, False)


class StepPlan:
    """A GPT's decode step as flat calls; build one per model (cheap: no weight is copied)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.wte, self.wpe, self.head = model.wte.weight, model.wpe.weight, model.wte.weight.t()
        self.ln_f = _ln(model.ln_f)
        self.blocks = [BlockCalls(_ln(b.ln1), linear_into(b.attn.qkv), linear_to(b.attn.proj),
                                  _ln(b.ln2), linear_to(b.mlp.fc), linear_to(b.mlp.proj),
                                  b.attn.heads * b.attn.head_dim,
                                  out_features(b.mlp.fc, model.width)) for b in model.blocks]
        self._outputs: dict[int, list[tuple[torch.Tensor, ...]]] = {}

    def outputs(self, x: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
        """Per block, where its attention projection, MLP hidden layer and MLP projection
        write at x's number of rows (made once per batch size; each is read before the
        next token's step writes it again)."""
        rows = x.shape[0]
        if rows not in self._outputs:
            self._outputs[rows] = [tuple(x.new_empty(rows, n) for n in (x.shape[1], b.hidden,
                                                                         x.shape[1]))
                                   for b in self.blocks]
        return self._outputs[rows]

    def __call__(self, tokens: torch.Tensor, pos: int | torch.Tensor, cache: Cache
                 ) -> torch.Tensor:
        """tokens (batch,) at position `pos` (an int shared by every row, or one per row, a
        (batch,) tensor) after `cache.filled` cached ones; returns logits (batch, vocab).
        Runs in inference mode (the qkv projection's `out=` refuses autograd)."""
        if not torch.is_inference_mode_enabled():
            with torch.inference_mode():
                return self(tokens, pos, cache)
        start = cache.filled
        wpe = self.wpe[pos] if isinstance(pos, int) else self.wpe.index_select(0, pos)
        x = self.wte.index_select(0, tokens).add_(wpe)
        rows = x.shape[0]
        # (batch, 1, 1, keys): 0 on real keys, -inf on padding; None when nothing is padded
        bias = cache.bias[:, None, None, :start + 1] if cache.padded else None
        for i, (blk, (proj, hidden, mlp)) in enumerate(zip(self.blocks, self.outputs(x))):
            blk.qkv(torch.layer_norm(x, *blk.ln1),
                    cache.qkv[i].select(1, start).view(rows, 3 * blk.width))
            y = F.scaled_dot_product_attention(cache.q[i].narrow(2, start, 1),
                                               cache.k[i].narrow(2, 0, start + 1),
                                               cache.v[i].narrow(2, 0, start + 1),
                                               attn_mask=bias)
            x.add_(blk.proj(y.reshape(rows, blk.width), proj))
            x.add_(blk.mlp_proj(F.gelu(blk.fc(torch.layer_norm(x, *blk.ln2), hidden)), mlp))
        cache.filled = start + 1
        return torch.mm(torch.layer_norm(x, *self.ln_f), self.head)
