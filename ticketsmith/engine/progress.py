"""Progress checkpoints: a level stopped mid-way resumes where it was, bit-identical on CPU.

Every `train.checkpoint_every` iterations, and at once when a SIGTERM or Ctrl-C is pending,
`Progress.after_step` writes the loop's whole state atomically to the run folder: weights,
optimizer state, the torch CPU and CUDA generators, the data-order generator as it stood when
the current epoch's permutation was drawn, the iteration (the position in that permutation is
iteration mod batches per epoch), the evaluation curve so far, the running train-loss window
and the rewind weights if already taken. `restore` puts all of it back, so the rest of the
level computes exactly what an uninterrupted run computes. Nothing else draws random numbers
in training (no Python or numpy RNG), so nothing else is saved.

File: one line `ticketsmith-progress/1 <sha256 of the rest>`, then a `torch.save` payload that
is loaded with `weights_only=True` (tensors and plain containers only, never code). A file
that is corrupt, or belongs to another experiment, replicate, level or variant, is refused
with one line naming it, and the level starts again from its beginning.
"""
from __future__ import annotations

import hashlib
import io
import logging
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ticketsmith.base.errors import CheckpointError
from ticketsmith.base.files import atomic_write
from ticketsmith.base.interrupts import interrupt_pending, raise_if_interrupted

log = logging.getLogger("ticketsmith.progress")
FORMAT = "ticketsmith-progress/1"

# What train() hands over at a step, read only when a checkpoint is due:
# (curve, window_loss, window_steps, saved_state, epoch_order_state).
LoopState = Callable[[], tuple[list, torch.Tensor, int, Any, torch.Tensor]]


def write_progress(path: Path, payload: dict[str, Any]) -> None:
    """Atomically write `payload` behind its checksum line."""
    buf = io.BytesIO()
    torch.save(payload, buf)
    body = buf.getvalue()
    head = f"{FORMAT} {hashlib.sha256(body).hexdigest()}\n".encode()
    atomic_write(path, lambda p: p.write_bytes(head + body))


def read_progress(path: Path, identity: dict[str, Any]) -> dict[str, Any]:
    """The payload of a progress file that is whole and belongs to `identity`; otherwise
    one CheckpointError naming the file."""
    raw = path.read_bytes()
    head, _, body = raw.partition(b"\n")
    fmt, _, digest = head.decode("ascii", "replace").partition(" ")
    if fmt != FORMAT:
        raise CheckpointError(f"{path}: not a TicketSmith progress checkpoint (expected {FORMAT})")
    if hashlib.sha256(body).hexdigest() != digest:
        raise CheckpointError(f"{path}: checksum mismatch; the file was modified or is corrupt")
    try:
        payload = torch.load(io.BytesIO(body), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable payload is one refusal
        raise CheckpointError(f"{path}: unreadable progress checkpoint ({exc})") from None
    found = payload.get("identity") if isinstance(payload, dict) else None
    if found != identity:
        raise CheckpointError(f"{path}: progress checkpoint of {found}, not of {identity}")
    return payload


class Progress:
    """The progress checkpoint of one level's training: what train() calls."""

    def __init__(self, path: Path, identity: dict[str, Any], every: int,
                 upload: Callable[[Path], None] | None = None, upload_every_s: float = 300.0,
                 clock: Callable[[], float] = time.monotonic):
        """identity: what the file must belong to (hash, replicate, level, variant, length).
        upload: sends the file to the artifact store, at most every `upload_every_s` seconds
        (and always when a stop is pending); None without tracking."""
        self.path, self.identity, self.every = Path(path), identity, every
        self.upload, self.upload_every_s, self.clock = upload, upload_every_s, clock
        self.uploaded_at = clock()  # the first upload is due upload_every_s from now
        self.resumed_from = 0  # iteration the level continued from (0: its beginning)

    def restore(self, model: nn.Module, opt: torch.optim.Optimizer, order: torch.Generator,
                window_loss: torch.Tensor) -> tuple[int, list, int, Any] | None:
        """Load the progress file into model, optimizer and generators, if there is a good
        one: (step, curve, window_steps, saved_state); None to start from the beginning."""
        if not self.path.is_file():
            return None
        try:
            p = read_progress(self.path, self.identity)
        except CheckpointError as exc:
            log.warning(f"refused: {exc}; the level starts again from its beginning")
            return None
        device = window_loss.device
        model.load_state_dict(p["model"])
        opt.load_state_dict(p["optimizer"])
        order.set_state(p["order"])
        torch.set_rng_state(p["torch_rng"])
        if p["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(p["cuda_rng"])
        window_loss.copy_(p["window_loss"].to(device))
        saved = None if p["saved"] is None else {k: v.to(device) for k, v in p["saved"].items()}
        self.resumed_from = p["step"]
        log.info(f"resumed from the progress checkpoint at iteration {p['step']} "
                 f"of {self.identity['iterations']} ({self.path})")
        self._upload(force=True)  # the new run holds it too, before the next upload is due
        return p["step"], p["curve"], p["window_steps"], saved

    def after_step(self, step: int, model: nn.Module, opt: torch.optim.Optimizer,
                   order: torch.Generator, per_epoch: int, state: LoopState) -> None:
        """A safe point: write the checkpoint if one is due or a stop is pending, then act on
        the stop (raise Terminated / KeyboardInterrupt)."""
        stopping = interrupt_pending()
        due = self.every and step % self.every == 0
        # The last step too: a stop during the final test evaluation loses nothing.
        if stopping or due or step == self.identity["iterations"]:
            self.save(step, model, opt, order, per_epoch, state)
            if stopping or due:
                self._upload(force=stopping)
        raise_if_interrupted()

    def save(self, step: int, model: nn.Module, opt: torch.optim.Optimizer,
             order: torch.Generator, per_epoch: int, state: LoopState) -> None:
        curve, window_loss, window_steps, saved, epoch_order = state()
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []
        write_progress(self.path, {
            "identity": self.identity, "step": step,
            "model": model.state_dict(), "optimizer": opt.state_dict(),
            # At an epoch's end the next epoch's permutation is still to be drawn.
            "order": order.get_state() if step % per_epoch == 0 else epoch_order,
            "torch_rng": torch.get_rng_state(), "cuda_rng": cuda,
            "curve": curve, "window_loss": window_loss.detach().cpu(),
            "window_steps": window_steps, "saved": saved})

    def _upload(self, force: bool) -> None:
        now = self.clock()
        if self.upload is None or not self.path.is_file():
            return
        if force or now - self.uploaded_at >= self.upload_every_s:
            self.upload(self.path)
            self.uploaded_at = now
