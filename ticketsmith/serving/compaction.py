"""Exact compaction: remove the units a ticket has killed, keeping outputs unchanged.

IMP leaves hidden units with no incoming weights (they output the constant relu(bias)), units
with no outgoing weights (nobody reads them) and input features no weight reads. Removing them
shrinks dense layers, which is a speedup on any hardware. Works on a `Chain`: a straight
pipeline of Linear / Conv2d layers with ReLU, MaxPool2d, Flatten, Identity or Dropout between;
`compact_gpt` removes a transformer ticket's dead attention heads and MLP hidden units, and
`compact_hf_gpt2` does the same for a Hugging Face GPT-2 (transformers is not imported here).
"""
from __future__ import annotations

import copy

import torch
from torch import nn
import torch.nn.functional as F

from ticketsmith.engine.models import MLP, ConvNet, LeNet5
from ticketsmith.engine.transformer import GPT

_PASS_THROUGH = (nn.ReLU, nn.MaxPool2d, nn.Flatten, nn.Identity, nn.Dropout)


class CompactionError(ValueError):
    """The model cannot be compacted exactly by these rules; the message says why."""


class Select(nn.Module):
    """Keep the input features (dim 1) that some weight still reads."""

    def __init__(self, index: torch.Tensor, full: int):
        super().__init__()
        self.register_buffer("index", index)
        self.full = full

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.index_select(1, self.index)


class Chain(nn.Module):
    """A straight pipeline of modules; `names[i]` is the source model's name of weighted layer i."""

    def __init__(self, layers: list[nn.Module], names: list[str | None]):
        super().__init__()
        self.layers, self.names = nn.ModuleList(layers), list(names)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Linear, shape and activation steps run as plain functions: at batch 1 a module
        # call's own overhead (~1-2 us, far more on a loaded machine) is a visible share of a
        # small (e.g. compacted structured) model's latency.
        for layer in self.layers:
            kind = type(layer)
            # A hooked Linear (the auto plan captures layer inputs by hook) is called as a module.
            if kind is nn.Linear and not (layer._forward_hooks or layer._forward_pre_hooks):
                x = F.linear(x, layer.weight, layer.bias)
            elif kind is nn.ReLU:
                x = torch.relu(x)
            elif kind is nn.Flatten:
                x = x.flatten(layer.start_dim, layer.end_dim)
            elif kind is not nn.Identity:
                x = layer(x)
        return x


def as_chain(model: nn.Module) -> Chain | None:
    """The registry's MLP / LeNet5 / ConvNet (or a plain Sequential) as a Chain; None otherwise."""
    relu, pool = nn.ReLU, lambda: nn.MaxPool2d(2)
    if isinstance(model, MLP):
        mods, names = [nn.Flatten()], [None]
        for i, layer in enumerate(model.hidden):
            mods += [layer, relu()]
            names += [f"hidden.{i}", None]
        return Chain(mods + [model.out], names + ["out"])
    if isinstance(model, LeNet5):
        mods = [model.conv1, relu(), pool(), model.conv2, relu(), pool(), nn.Flatten(),
                model.fc1, relu(), model.fc2, relu(), model.out]
        return Chain(mods, ["conv1", None, None, "conv2", None, None, None,
                            "fc1", None, "fc2", None, "out"])
    if isinstance(model, ConvNet):
        feats = list(model.features)
        names = [f"features.{i}" if isinstance(m, nn.Conv2d) else None for i, m in enumerate(feats)]
        mods = feats + [nn.Flatten(), model.fc1, relu(), model.fc2, relu(), model.out]
        return Chain(mods, names + [None, "fc1", None, "fc2", None, "out"])
    if isinstance(model, nn.Sequential) and all(
            isinstance(m, (nn.Linear, nn.Conv2d, *_PASS_THROUGH)) for m in model):
        return Chain(list(model), [str(i) if isinstance(m, (nn.Linear, nn.Conv2d)) else None
                                   for i, m in enumerate(model)])
    return None


def _folds_exactly(layer: nn.Module) -> bool:
    """A constant input channel adds a constant to every output only without zero padding."""
    if isinstance(layer, nn.Linear):
        return True
    pad = layer.padding
    return pad == "valid" or (not isinstance(pad, str) and all(p == 0 for p in pad))


def compact(chain: Chain) -> tuple[Chain, str]:
    """Remove dead units exactly; returns the new chain and a summary like 'hidden.0 300->134'.

    A unit (Linear row / Conv output channel) whose incoming weights are all zero outputs the
    constant relu(bias): that constant times its outgoing weights is folded into the next
    layer's bias (for a next Conv only without padding, else only when the constant is 0).
    A unit whose outgoing weights are all zero is removed. First-layer inputs that no weight
    reads are dropped by an index-select. Repeated until nothing changes.
    """
    idx = [i for i, m in enumerate(chain.layers) if isinstance(m, (nn.Linear, nn.Conv2d))]
    layers = [chain.layers[i] for i in idx]
    if any(isinstance(m, nn.Conv2d) and m.groups != 1 for m in layers):
        raise CompactionError("compaction of grouped convolutions is not implemented")
    W = [m.weight.detach().clone() for m in layers]
    b = [m.bias.detach().clone() if m.bias is not None else m.weight.new_zeros(len(m.weight))
         for m in layers]
    relu = [any(isinstance(chain.layers[j], nn.ReLU) for j in range(i + 1, k))
            for i, k in zip(idx, idx[1:])]
    sizes = [len(w) for w in W]
    keep_in = torch.arange(W[0].shape[1], device=W[0].device)
    changed = True
    while changed:
        live = (W[0] != 0).transpose(0, 1).reshape(W[0].shape[1], -1).any(1)
        live[0] |= not live.any()  # keep one input so every layer has one
        changed = not live.all()
        W[0], keep_in = W[0][:, live], keep_in[live]
        for k in range(len(W) - 1):
            units = len(W[k])
            if W[k + 1].shape[1] % units:
                raise CompactionError(f"{chain.names[idx[k + 1]]}: input size does not follow "
                                        f"{chain.names[idx[k]]}'s {units} units")
            nxt = W[k + 1].reshape(len(W[k + 1]), units, -1)  # (out, unit, kernel or pixels)
            dead_out = ~(nxt != 0).any(2).any(0)
            dead_in = ~(W[k] != 0).reshape(units, -1).any(1)
            const = b[k].clamp(min=0) if relu[k] else b[k]
            remove = dead_out | (dead_in & (_folds_exactly(layers[k + 1]) | (const == 0)))
            remove[0] &= not remove.all()
            if not remove.any():
                continue
            fold = remove & ~dead_out
            b[k + 1] = b[k + 1] + (nxt[:, fold].sum(2) * const[fold]).sum(1)
            keep = ~remove
            W[k], b[k] = W[k][keep], b[k][keep]
            W[k + 1] = nxt[:, keep].reshape(len(nxt), -1, *W[k + 1].shape[2:])
            changed = True
    mods: list[nn.Module] = []
    names: list[str | None] = []
    for j, m in enumerate(chain.layers):
        if j == idx[0] and len(keep_in) < layers[0].weight.shape[1]:
            mods.append(Select(keep_in, layers[0].weight.shape[1]))
            names.append(None)
        mods.append(_rebuild(m, W[idx.index(j)], b[idx.index(j)]) if j in idx else m)
        names.append(chain.names[j])
    summary = [f"inputs {layers[0].weight.shape[1]}->{len(keep_in)}"]
    summary += [f"{chain.names[i]} {n}->{len(w)}" for i, n, w in zip(idx, sizes, W)]
    return Chain(mods, names), ", ".join(summary)


def _rebuild(old: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> nn.Module:
    if isinstance(old, nn.Linear):
        new = nn.Linear(weight.shape[1], weight.shape[0], device=weight.device, dtype=weight.dtype)
    else:
        new = nn.Conv2d(weight.shape[1], weight.shape[0], old.kernel_size, old.stride, old.padding,
                        old.dilation, padding_mode=old.padding_mode, device=weight.device,
                        dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        new.bias.copy_(bias)
    return new.requires_grad_(False).eval()


def compact_gpt(model: GPT) -> tuple[GPT, str]:
    """A smaller GPT without the heads and MLP hidden units whose output columns are all zero
    (a structured ticket's removed units): their contribution to the residual stream is exactly
    zero, so the outputs are the masked model's. Every block keeps at least one head and unit."""
    heads, hidden, state = [], [], {}
    for i, block in enumerate(model.blocks):
        a, m, p = block.attn, block.mlp, f"blocks.{i}."
        keep_h = kept_heads(block)
        rows = torch.arange(a.heads * a.head_dim).reshape(a.heads, a.head_dim)[keep_h].flatten()
        qkv_rows = torch.cat([rows + j * a.heads * a.head_dim for j in range(3)])
        keep_n = _at_least_one(m.proj.weight.ne(0).any(0))
        heads.append(int(keep_h.sum()))
        hidden.append(int(keep_n.sum()))
        for name, t in block.state_dict().items():
            state[p + name] = t
        state[p + "attn.qkv.weight"] = a.qkv.weight[qkv_rows]
        state[p + "attn.proj.weight"] = a.proj.weight[:, rows]
        state[p + "mlp.fc.weight"] = m.fc.weight[keep_n]
        state[p + "mlp.proj.weight"] = m.proj.weight[:, keep_n]
        if a.qkv.bias is not None:
            state[p + "attn.qkv.bias"] = a.qkv.bias[qkv_rows]
            state[p + "mlp.fc.bias"] = m.fc.bias[keep_n]
    for name, t in model.state_dict().items():
        state.setdefault(name, t)
    bias = model.blocks[0].attn.qkv.bias is not None
    small = GPT(model.vocab, model.context, len(model.blocks), heads, model.width,
                model.blocks[0].attn.head_dim, hidden, bias=bias)
    small.load_state_dict(state)
    before = sum(b.attn.heads for b in model.blocks), sum(b.mlp.fc.out_features for b in model.blocks)
    return small.eval(), (f"heads {before[0]} -> {sum(heads)}, MLP hidden units {before[1]} -> "
                          f"{sum(hidden)}")


def kept_heads(block: nn.Module) -> torch.Tensor:
    """Bool per head of a GPT block: whether its output columns hold a nonzero weight (at
    least one head is kept)."""
    a = block.attn
    cols = a.proj.weight.reshape(a.proj.weight.shape[0], a.heads, a.head_dim)
    return _at_least_one(cols.ne(0).any(0).any(1))


def _at_least_one(keep: torch.Tensor) -> torch.Tensor:
    if not keep.any():
        keep = keep.clone()
        keep[0] = True
    return keep


def compact_hf_gpt2(model: nn.Module) -> tuple[nn.Module, str]:
    """A smaller copy of a Hugging Face GPT-2 (`GPT2LMHeadModel` or `GPT2Model`) without the
    heads and MLP hidden units whose output weights are all zero, as `compact_gpt` does.

    Its `Conv1D` layers store weights (in, out): a head's output weights are its `head_dim`
    rows of `attn.c_proj`, its q, k and v weights columns of `attn.c_attn` (q | k | v, each
    heads × head_dim wide); an MLP unit is a column of `mlp.c_fc` and a row of `mlp.c_proj`.
    GPT-2 splits q, k, v by `split_size` and heads by `head_dim`, so each block keeps its own
    head count. Every block keeps at least one head and unit."""
    small = copy.deepcopy(model).eval()
    body = getattr(small, "transformer", small)
    if not hasattr(body, "h") or any(hasattr(b.attn, "q_attn") for b in body.h):
        raise CompactionError(f"{type(model).__name__}: not a decoder-only GPT-2 (expected "
                              "transformer.h blocks without cross-attention)")
    before, after = [0, 0], [0, 0]
    for block in body.h:
        a, m = block.attn, block.mlp
        n, d = a.num_heads, a.head_dim
        keep_h = _at_least_one(a.c_proj.weight.reshape(n, d, -1).ne(0).any(2).any(1))
        rows = torch.arange(n * d).reshape(n, d)[keep_h].flatten()
        a.c_attn = _conv1d(a.c_attn, torch.cat([rows + j * n * d for j in range(3)]), outputs=True)
        a.c_proj = _conv1d(a.c_proj, rows, outputs=False)
        a.num_heads, a.split_size = int(keep_h.sum()), int(keep_h.sum()) * d
        units = _at_least_one(m.c_proj.weight.ne(0).any(1)).nonzero().flatten()
        before[0], before[1] = before[0] + n, before[1] + m.c_proj.weight.shape[0]
        m.c_fc = _conv1d(m.c_fc, units, outputs=True)
        m.c_proj = _conv1d(m.c_proj, units, outputs=False)
        after[0], after[1] = after[0] + a.num_heads, after[1] + len(units)
    return small, (f"heads {before[0]} -> {after[0]}, MLP hidden units {before[1]} -> "
                   f"{after[1]}")


def _conv1d(old: nn.Module, index: torch.Tensor, outputs: bool) -> nn.Module:
    """A GPT-2 `Conv1D` (weight (in, out)) keeping output columns `index` (and their biases),
    or input rows `index` (the bias stays: it belongs to the outputs)."""
    index = index.to(old.weight.device)
    weight = old.weight[:, index] if outputs else old.weight[index]
    bias = old.bias[index] if outputs else old.bias
    new = type(old)(weight.shape[1], weight.shape[0])  # Conv1D(nf = out, nx = in)
    new = new.to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        new.bias.copy_(bias)
    return new.requires_grad_(False)
