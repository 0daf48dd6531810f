"""Checkpoints: safetensors files with a content checksum, written atomically.

A checkpoint holds a model's state dict (keys prefixed `model.`), optionally its mask
(`mask.`), and JSON metadata (how to rebuild the model, level, variant, config hash).
Loading never unpickles: safetensors stores raw tensors only.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from safetensors import safe_open

from ticketsmith.engine.masks import Mask, MaskError, apply_mask_
from ticketsmith.base.files import atomic_write, atomic_write_text  # noqa: F401 (re-exported)
from ticketsmith.base.interrupts import interrupts_deferred
from ticketsmith.base.errors import CheckpointError  # noqa: F401 (re-exported)

FORMAT = "ticketsmith-checkpoint/1"


@dataclass(frozen=True)
class Checkpoint:
    state: dict[str, torch.Tensor]
    mask: Mask | None
    meta: dict[str, Any] = field(default_factory=dict)


def _digest(tensors: dict[str, torch.Tensor], meta_json: str) -> str:
    """sha256 over every tensor (name, dtype, shape, bytes) and the metadata JSON."""
    h = hashlib.sha256(meta_json.encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        # reshape first: a 0-d tensor (BatchNorm's num_batches_tracked) cannot be viewed as bytes
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_checkpoint(path: str | Path, state: dict[str, torch.Tensor], mask: Mask | None = None,
                    meta: dict[str, Any] | None = None) -> Path:
    tensors, seen = {}, set()
    for k, v in state.items():
        t = v.detach().cpu().contiguous()
        # Tied weights (a language model's output head is its token embedding) share storage,
        # which safetensors refuses: the second name gets its own copy of the same values.
        tensors[f"model.{k}"] = t.clone() if t.data_ptr() in seen and t.numel() else t
        seen.add(t.data_ptr())
    if mask is not None:
        tensors.update(mask.state())
    meta_json = json.dumps(meta or {}, sort_keys=True)
    metadata = {"format": FORMAT, "sha256": _digest(tensors, meta_json), "meta": meta_json}
    atomic_write(Path(path), lambda p: save_file(tensors, str(p), metadata=metadata))
    return Path(path)


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """Load and verify a checkpoint; any problem is one CheckpointError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        # Ctrl-C inside safetensors' reader comes out as a reader error (its Rust layer drops
        # the KeyboardInterrupt), which would call a good file corrupt and exit 2: the signal
        # waits for the read to end (milliseconds for a ticket) and then acts.
        with interrupts_deferred():
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
            tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: not a safetensors checkpoint ({exc})") from None
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a TicketSmith checkpoint (format "
                              f"{metadata.get('format')!r}, expected {FORMAT!r})")
    if _digest(tensors, metadata.get("meta", "{}")) != metadata.get("sha256"):
        raise CheckpointError(f"{path}: checksum mismatch; the file was modified or is corrupt")
    state = {k[len("model."):]: v.to(device) for k, v in tensors.items() if k.startswith("model.")}
    mask_state = {k: v.to(device) for k, v in tensors.items() if k.startswith("mask.")}
    return Checkpoint(state=state, mask=Mask.from_state(mask_state) if mask_state else None,
                      meta=json.loads(metadata.get("meta", "{}")))


def factory_allowed(factory: str | None, allow_factory: bool | str | None) -> bool:
    """The one factory policy: a checkpoint's checksum is not a signature, so a factory named
    only in its metadata is imported only when a flag allows any (`True`) or the config names
    that same factory (a string)."""
    return not factory or allow_factory is True or (
        isinstance(allow_factory, str) and allow_factory == factory)


def model_from_checkpoint(path: str | Path, device: str | torch.device = "cpu",
                          allow_factory: bool | str | None = None):
    """(model with its mask applied, mask or None, metadata) rebuilt from a checkpoint.

    Every loader that rebuilds a model calls this. Registry models are always rebuilt; a
    factory only as `factory_allowed` says. Any problem is one CheckpointError naming the file.
    """
    from ticketsmith.engine.models import ModelError, build_model, prunable_for

    ck = load_checkpoint(path)
    meta = ck.meta
    missing = [k for k in ("model", "input_shape", "num_classes") if k not in meta]
    if missing:
        raise CheckpointError(f"{path}: metadata lacks {missing}; cannot rebuild the model")
    if not factory_allowed(meta.get("factory"), allow_factory):
        raise CheckpointError(f"{path}: model comes from factory {meta['factory']!r}, named only "
                              "in the checkpoint; set model.factory to it in the config or pass "
                              "--allow-factory (allow_factory=True) to import it")
    try:
        model = build_model(meta["model"], tuple(meta["input_shape"]), meta["num_classes"],
                            meta.get("factory"), meta.get("options"))
        model.load_state_dict(ck.state)
        if ck.mask is not None:
            weights = prunable_for(model, meta)
            ck.mask.check_fits(weights)
            apply_mask_(weights, ck.mask)
    except (ModelError, MaskError) as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit model {meta['model']!r} "
                              f"({str(exc).splitlines()[0]})") from None
    return model.requires_grad_(False).eval().to(device), ck.mask, meta
