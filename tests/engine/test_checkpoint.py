"""Checkpoints: atomic safetensors with a checksum over tensors and metadata; never unpickled."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ticketsmith.engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ticketsmith.engine.masks import Mask


def saved(tmp_path):
    state = {"w": torch.randn(4, 3), "b": torch.zeros(4)}
    mask = Mask({"w": torch.rand(4, 3) > 0.5})
    path = save_checkpoint(tmp_path / "ck.safetensors", state, mask, {"model": "mlp", "level": 2})
    return path, state, mask


def test_round_trip(tmp_path):
    path, state, mask = saved(tmp_path)
    ck = load_checkpoint(path)
    assert torch.equal(ck.state["w"], state["w"]) and torch.equal(ck.mask["w"], mask["w"])
    assert ck.meta == {"model": "mlp", "level": 2}
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write left no temp file


def test_batchnorm_state_round_trips(tmp_path):
    # BatchNorm keeps a 0-d int64 counter (num_batches_tracked) beside its weights
    state = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2)).state_dict()
    assert any(t.dim() == 0 for t in state.values())
    ck = load_checkpoint(save_checkpoint(tmp_path / "bn.safetensors", state, None, {}))
    assert all(torch.equal(ck.state[k], v) for k, v in state.items())


def test_edited_metadata_is_detected(tmp_path):
    path, _, _ = saved(tmp_path)
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    meta = json.loads(metadata["meta"])
    meta["factory"] = "os:system"  # would make a loader import arbitrary code
    save_file(tensors, str(path), metadata={**metadata, "meta": json.dumps(meta)})
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_checkpoint(path)


def test_flipped_tensor_byte_is_detected(tmp_path):
    path, _, _ = saved(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF  # inside the last tensor's data
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="checksum mismatch|not a safetensors"):
        load_checkpoint(path)


class _Bomb:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"x": _Bomb(marker)}, path)
    with pytest.raises(CheckpointError, match="not a safetensors checkpoint"):
        load_checkpoint(path)
    assert not marker.exists()


def test_foreign_safetensors_and_missing_file(tmp_path):
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="not a TicketSmith checkpoint"):
        load_checkpoint(tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.safetensors")


def test_written_files_are_readable_not_private(tmp_path):
    path, _, _ = saved(tmp_path)
    assert path.stat().st_mode & 0o777 == 0o644
