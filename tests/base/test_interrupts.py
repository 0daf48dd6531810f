"""Ctrl-C on a real `ticketsmith prune` process: one line, exit 130, nothing left RUNNING.

Each interrupt is sent when the process reports a moment on stdout (no sleeping on time):
during start-up, training, the re-logging of finished runs on resume, and gating/registry.
Children and this process get the default SIGINT handling first, so the tests hold however
the suite was started (a background job of a shell starts with SIGINT ignored).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import load_benchmark, with_default_sigint
from ticketsmith.base import interrupts

REPO = Path(__file__).resolve().parents[2]
INTERRUPTED = "interrupted: finished levels are kept; run the same command again to resume"


chaos = load_benchmark("chaos")


def interrupt_at(cmd: list[str], cwd: Path, env: dict[str, str], prefix: str) -> list[str]:
    """Run `cmd`, send SIGINT as soon as a stdout line starts with `prefix`; the stderr lines
    written after the signal. Asserts exit code 130."""
    proc = subprocess.Popen(with_default_sigint(cmd), cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err: list[tuple[float, str]] = []
    reader = threading.Thread(target=lambda: err.extend((time.monotonic(), line)
                                                        for line in proc.stderr), daemon=True)
    reader.start()
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.lstrip().startswith(prefix):
            break
    else:
        pytest.fail(f"no stdout line starting with {prefix!r}: {seen}")
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    proc.stdout.read()
    assert proc.wait(timeout=120) == 130, "".join(line for _, line in err)
    reader.join(timeout=30)
    after = [line.rstrip("\n") for t, line in err if t >= sent]
    assert "Traceback" not in "".join(line for _, line in err)
    return after


def check_store(uri: str, name: str) -> chaos.Audit:
    found = chaos.audit(uri, name)
    assert found.running == 0
    assert found.duplicate_runs == 0 and found.duplicate_versions == 0
    return found


@pytest.fixture()
def prune(tmp_path: Path):
    """(command, env, uri, name) of the tiny experiment, two levels (one still to train or
    re-log after level 1), in its own SQLite store."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = chaos.prune_command(str(REPO / "configs" / "tiny.yaml"), tmp_path, "intr",
                              ["prune.levels=2"])
    return cmd, chaos.store_env(uri), uri, "intr"


@pytest.mark.slow
def test_interrupts_during_training_and_gating_exit_130_with_one_line(prune, tmp_path):
    cmd, env, uri, name = prune
    for moment in ("tracking:", "experiment ", "r0 level 1", "quality gates"):
        assert interrupt_at(cmd, tmp_path, env, moment) == [INTERRUPTED], moment
        check_store(uri, name)
    subprocess.run(cmd, cwd=tmp_path, env=env, check=True, capture_output=True, timeout=600)
    assert len(check_store(uri, name).finished) == 5  # dense + 2 levels x 2 variants


@pytest.mark.slow
def test_interrupts_while_finished_runs_are_relogged(prune, tmp_path):
    """Finished locally, not in the store: the resume re-logs every run, and is interrupted."""
    cmd, env, uri, name = prune
    untracked = subprocess.run([*cmd, "--no-tracking"], cwd=tmp_path, env=env,
                               capture_output=True, text=True, timeout=600)
    assert untracked.returncode == 0, untracked.stderr
    for moment in ("experiment ", "r0 level 0", "r0 level 1"):
        assert interrupt_at(cmd, tmp_path, env, moment) == [INTERRUPTED], moment
        check_store(uri, name)
    subprocess.run(cmd, cwd=tmp_path, env=env, check=True, capture_output=True, timeout=600)
    assert len(check_store(uri, name).finished) == 5


def test_an_interrupt_inside_a_deferred_block_acts_when_it_ends(default_sigint):
    done = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts.interrupts_deferred():
            with interrupts.interrupts_deferred():
                os.kill(os.getpid(), signal.SIGINT)
                done.append("inner")
            done.append("outer")  # the nested block's end does not act yet
    assert done == ["inner", "outer"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_ctrl_c_while_a_checkpoint_is_read_is_an_interrupt_not_a_bad_file(default_sigint, tmp_path,
                                                                         monkeypatch):
    """Found by the re-logging test: a SIGINT inside safetensors' reader surfaced as "not a
    safetensors checkpoint" (exit 2) for a good file. The read now finishes, then Ctrl-C acts."""
    import torch

    from ticketsmith.engine import checkpoint as ckpt

    path = ckpt.save_checkpoint(tmp_path / "c.safetensors", torch.nn.Linear(2, 2).state_dict())
    read, finished = ckpt.load_file, []

    def interrupted_read(name):  # Ctrl-C arrives while the file is read
        os.kill(os.getpid(), signal.SIGINT)
        tensors = read(name)
        finished.append(name)
        return tensors

    monkeypatch.setattr(ckpt, "load_file", interrupted_read)
    with pytest.raises(KeyboardInterrupt):
        ckpt.load_checkpoint(path)
    assert finished == [str(path)]


def test_retry_skips_its_back_off_when_interrupted(default_sigint):
    from ticketsmith.tracking.tracker import retry

    sleeps = []

    def down_and_interrupted():
        os.kill(os.getpid(), signal.SIGINT)
        raise ConnectionError("connection refused")

    with pytest.raises(KeyboardInterrupt):
        retry(down_and_interrupted, "log batch", sleep=sleeps.append)
    assert sleeps == []


def test_a_sigterm_inside_a_deferred_block_stops_when_it_ends():
    """After stop_on_sigterm (what the CLI does first), SIGTERM is held like Ctrl-C and then
    raised as Terminated (a KeyboardInterrupt: every Ctrl-C clean-up path runs for it)."""
    before = signal.getsignal(signal.SIGTERM)
    # Ctrl-C handling as this process started (ignored when the suite runs as a background job)
    sigint = signal.getsignal(signal.SIGINT)
    try:
        interrupts.stop_on_sigterm()
        done = []
        with pytest.raises(interrupts.Terminated):
            with interrupts.interrupts_deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                done.append("after the signal")
                assert interrupts.interrupt_pending()
        assert done == ["after the signal"]
        assert signal.getsignal(signal.SIGTERM) is interrupts._raise_terminated
        assert signal.getsignal(signal.SIGINT) is sigint  # put back as it was
    finally:
        signal.signal(signal.SIGTERM, before)


def test_a_program_that_did_not_ask_keeps_its_own_sigterm_handling():
    seen = []
    before = signal.signal(signal.SIGTERM, lambda s, f: seen.append(s))
    try:
        with interrupts.interrupts_deferred():
            os.kill(os.getpid(), signal.SIGTERM)
        assert seen == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, before)
