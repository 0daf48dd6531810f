"""Progress checkpoints in the training loop, trained for real: a level stopped by a real
SIGTERM mid-epoch, at an epoch's end or at its last step resumes bit-identical on CPU, and a
corrupt or foreign progress file is refused with one line naming it."""
from __future__ import annotations

import io
import logging
import os
import signal

import pytest
import torch

from ticketsmith.base import interrupts
from ticketsmith.base.config import TrainConfig
from ticketsmith.engine.data import load_dataset
from ticketsmith.engine.masks import prune_to_density
from ticketsmith.engine.models import build_model, prunable_weights
from ticketsmith.engine.progress import Progress, read_progress
from ticketsmith.engine.train import train

# 800 train examples - 200 validation = 600, batch 64: 10 batches per epoch, 60 iterations.
CFG = TrainConfig(optimizer="adam", lr=0.01, batch_size=64, iterations=60, eval_every=15,
                  device="cpu")
IDENTITY = {"hash": "abc", "replicate": 0, "level": 1, "variant": "ticket", "data_seed": 1,
            "iterations": 60}


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", val_size=200, split_seed=0,
                        options={"n_train": 800, "n_test": 400, "image_size": 8, "num_classes": 4})


@pytest.fixture()
def sigterm_stops():
    """SIGTERM raises Terminated, as in the CLI; the test process's handler comes back after."""
    before = signal.getsignal(signal.SIGTERM)
    interrupts.stop_on_sigterm()
    yield
    signal.signal(signal.SIGTERM, before)


def level(data, progress: Progress | None, stop_at: int | None = None):
    """(result, final weights) of one masked level; SIGTERM sent to this process after
    iteration `stop_at`, inside the deferred block the engine trains in."""
    torch.manual_seed(0)
    model = build_model("mlp", data.input_shape, data.num_classes, options={"hidden": [32]})
    weights = prunable_weights(model)
    mask = prune_to_density(weights, {n: 0.5 for n in weights})

    def on_step(step, row):
        if step == stop_at:
            os.kill(os.getpid(), signal.SIGTERM)

    with interrupts.interrupts_deferred():
        res = train(model, data, CFG, seed=1, masked=weights, mask=mask, progress=False,
                    save_state_at=25, on_eval=on_step, checkpoints=progress)
    return res, model.state_dict()


@pytest.fixture(scope="module")
def uninterrupted(data):
    return level(data, None)


def same(a, b) -> None:
    (ra, wa), (rb, wb) = a, b
    assert (ra.test_accuracy, ra.test_loss, ra.early_stop_iteration, ra.curve) == \
        (rb.test_accuracy, rb.test_loss, rb.early_stop_iteration, rb.curve)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert all(torch.equal(ra.saved_state[k], rb.saved_state[k]) for k in ra.saved_state)


# 10 batches per epoch; the rewind weights are taken at 25, after the stop at 15.
@pytest.mark.parametrize("stop_at", [15, 30, 60], ids=["mid-epoch", "epoch-end", "last-step"])
def test_a_level_stopped_by_sigterm_resumes_bit_identical(data, uninterrupted, tmp_path,
                                                           sigterm_stops, stop_at):
    path = tmp_path / "progress.pt"
    with pytest.raises(interrupts.Terminated):
        level(data, Progress(path, IDENTITY, every=1000), stop_at)
    assert read_progress(path, IDENTITY)["step"] == stop_at  # saved at the stop, not before
    resumed = Progress(path, IDENTITY, every=1000)
    same(level(data, resumed), uninterrupted)
    assert resumed.resumed_from == stop_at


def test_mid_epoch_checkpoints_resume_bit_identical(data, uninterrupted, tmp_path):
    """A kill right after a periodic checkpoint (at 21 or 23, mid-epoch): the data order is
    drawn again for the epoch in progress and the batches already done are skipped."""
    path = tmp_path / "progress.pt"
    for every in (7, 23):
        path.unlink(missing_ok=True)

        class Killed(Exception):
            pass

        def kill_after(progress: Progress, at: int) -> Progress:
            save = progress.save

            def save_then_die(step, *args):  # as a SIGKILL right after this checkpoint
                save(step, *args)
                if step >= at:
                    raise Killed
            progress.save = save_then_die
            return progress

        with pytest.raises(Killed):
            level(data, kill_after(Progress(path, IDENTITY, every=every), 20))
        assert read_progress(path, IDENTITY)["step"] == every * -(-20 // every)
        same(level(data, Progress(path, IDENTITY, every=every)), uninterrupted)


@pytest.mark.parametrize("spoil", ["corrupt", "tampered", "foreign"])
def test_a_corrupt_or_foreign_progress_file_is_refused_and_the_level_starts_again(
        data, uninterrupted, tmp_path, sigterm_stops, caplog, spoil):
    path = tmp_path / "progress.pt"
    with pytest.raises(interrupts.Terminated):
        level(data, Progress(path, IDENTITY, every=1000), 30)
    if spoil == "corrupt":
        raw = bytearray(path.read_bytes())
        raw[-100] ^= 0xFF
        path.write_bytes(bytes(raw))
        identity = IDENTITY
    elif spoil == "tampered":  # a whole, loadable payload behind the old checksum line
        payload = read_progress(path, IDENTITY)
        payload["step"] = 10
        buf = io.BytesIO()
        torch.save(payload, buf)
        path.write_bytes(path.read_bytes().partition(b"\n")[0] + b"\n" + buf.getvalue())
        identity = IDENTITY
    else:  # the same file, asked for by another variant
        identity = {**IDENTITY, "variant": "random_reinit"}
    resumed = Progress(path, identity, every=1000)
    with caplog.at_level(logging.INFO, logger="ticketsmith.progress"):
        got = level(data, resumed)
    refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(refused) == 1 and str(path) in refused[0] and "\n" not in refused[0], refused
    assert resumed.resumed_from == 0
    same(got, uninterrupted)  # trained from the level's beginning


def test_uploads_are_spaced_in_time_and_a_stop_always_uploads(data, tmp_path, sigterm_stops):
    now = [0.0]
    sent: list[int] = []
    path = tmp_path / "progress.pt"
    progress = Progress(path, IDENTITY, every=5, upload_every_s=100, clock=lambda: now[0],
                        upload=lambda p: sent.append(read_progress(p, IDENTITY)["step"]))
    save = progress.save

    def tick(step, *args):  # 25 s of training per checkpoint
        save(step, *args)
        now[0] += 25
    progress.save = tick
    with pytest.raises(interrupts.Terminated):
        level(data, progress, stop_at=45)
    # checkpoints at 5, 10, ... end at 25, 50, 75 ... s: an upload once 100 s have passed,
    # and the stop's at once
    assert sent == [20, 40, 45]
