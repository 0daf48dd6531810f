"""Tracking in a second process, beside training.

`ticketsmith prune` on a CPU trains in its own process and hands each engine event to a
tracking process it starts first thing: there MLflow is imported, and each level's runs,
metrics, figures and ticket model are logged while the next level trains on another core; the
gates, registry, release check and report follow there too. What tracking adds to the
experiment's wall-clock time is then mostly what is left after the last level: that level's
logging, the gates, the registry and the report (`benchmarks/tracking_overhead.py`). The
training process never imports MLflow.

The engine's contract is unchanged (`engine/events.py`): events arrive in order, and the calls
whose answer the engine waits for wait here too: `experiment_started` (it may fill the run
folder from the artifact store), `fetch_progress` (for a level with an unfinished run in the
store) and `progress_saved` (so a stop's checkpoint is uploaded before the stop goes on).
A failure in the tracking process closes its open runs FAILED and raises the same error in
the engine at its next event, so the command fails with the same line and exit code.

Signals. The tracking process leads a session and process group of its own, so Ctrl-C at a
terminal reaches the training process alone, which decides:
  - an interrupt or error during training `abort`s: the events before it are logged, then the
    open runs are closed, KILLED or FAILED, as in one process;
  - an interrupt while it waits (for the gates, registry and report, or for an abort) is passed
    on as the same signal, which the tracking process handles as one process would
    (`base/interrupts.py`); then the training process raises it.
If the training process dies (SIGKILL, out of memory), the kernel ends the tracking process too
(PR_SET_PDEATHSIG), as the end of a pod would: what was not logged yet is in the run folder,
and the next run logs it (`MlflowTracker.run_reused`).

Not used, tracking in the training process instead (`pipeline.run_prune`): `--inline-tracking`,
a CUDA device (the tracking process would hold a second CUDA context), the per-level serving
benchmark (its timings would be taken beside training), language models (their plans are
measured when built), and library callers of `run_prune` (sweeps, tests).
"""
from __future__ import annotations

import ctypes
import dataclasses
import os
import pickle
import queue
import signal
import socket
import subprocess
import sys
import threading
import traceback
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Callable

from ticketsmith.base import errors
from ticketsmith.base.errors import TrackingError
from ticketsmith.base.interrupts import Terminated, stop_on_sigterm
from ticketsmith.base.secrets import redact
from ticketsmith.engine.selection import Selection

PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # the folder holding `ticketsmith/`


def applies(cfg: Any) -> bool:
    """Whether `prune` may track beside training (see the module's docstring). A device of
    'auto' is settled once torch is imported (`run_prune_beside`)."""
    return (cfg.task != "language_model" and not cfg.experiment.benchmark
            and cfg.train.device != "cuda")


def run_prune_beside(cfg: Any, *, progress: bool = True, legacy_stages: bool = False,
                     selection: Selection = Selection(), report_dir: str | Path | None = None,
                     echo: Callable[[str], None] = print):
    """`pipeline.run_prune(cfg, ...)`, with the tracking in a process beside training where
    it applies; the same `PipelineResult`."""
    if not applies(cfg):
        return _inline(cfg, progress, legacy_stages, selection, report_dir, echo)
    tracking = TrackingProcess(cfg, report_dir=report_dir, legacy_stages=legacy_stages,
                               echo=echo)  # first: its imports overlap ours and the data's
    try:
        from ticketsmith.engine.lottery import prepare_experiment, run_experiment
        from ticketsmith.engine.train import resolve_device

        if resolve_device(cfg.train.device).type != "cpu":
            tracking.close()  # told nothing yet: it ends without having touched the store
            return _inline(cfg, progress, legacy_stages, selection, report_dir, echo)
        data = prepare_experiment(cfg)  # config errors first, as in one process
        result = run_experiment(cfg, tracker=tracking, progress=progress, echo=echo,
                                selection=selection, data=data)
        verdicts, promotion, ok, reason = tracking.finish(result.records, result.trained)
    except BaseException as error:
        tracking.abort(error)
        raise
    finally:
        tracking.close()
    from ticketsmith.gates import PipelineResult

    return PipelineResult(result, verdicts, promotion, ok, reason)


def _inline(cfg, progress, legacy_stages, selection, report_dir, echo):
    from ticketsmith.pipeline import run_prune

    return run_prune(cfg, progress=progress, legacy_stages=legacy_stages, echo=echo,
                     selection=selection, report_dir=report_dir)


def shipped(data: Any) -> Any:
    """What the tracking process needs of the data: the first test examples (the plan check's
    probe, the figures' sample grid), on the CPU; the other splits empty. A few MB: sent
    while the other end may still be importing, so it must not fill the connection."""
    from ticketsmith.serving.plan.check import PROBE_EXAMPLES

    def cpu(t, n=0):
        return t[:n].detach().cpu().clone()

    return dataclasses.replace(data, train_x=cpu(data.train_x), train_y=cpu(data.train_y),
                               val_x=cpu(data.val_x), val_y=cpu(data.val_y),
                               test_x=cpu(data.test_x, PROBE_EXAMPLES),
                               test_y=cpu(data.test_y, PROBE_EXAMPLES))


def _send(conn: Connection, lock: threading.Lock, *msg: Any) -> None:
    with lock:
        conn.send_bytes(pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL))


def _receive(conn: Connection, inbox: queue.SimpleQueue) -> None:
    """Every message into `inbox` as it arrives, still pickled (the sender never waits on a
    busy reader, and unpickling may import); None once the other end is gone."""
    while True:
        try:
            inbox.put(conn.recv_bytes())
        except (EOFError, OSError):
            inbox.put(None)
            return


def rebuilt(name: str, text: str) -> BaseException:
    """The tracking process's error, as the training process raises it: TicketSmith's own
    errors as themselves, so the CLI's message and exit code are the same; anything else as a
    TrackingError naming it (its traceback went to stderr)."""
    found = getattr(errors, name, None)
    if isinstance(found, type) and issubclass(found, Exception):
        return found(text)
    return TrackingError(f"the tracking process failed: {name}: {redact(text)}")


# --- the training process's end ---------------------------------------------------------------

class TrackingProcess:
    """The engine's Tracker in the training process: each event is handed to the tracking
    process; the calls the engine needs answered wait for the answer."""

    def __init__(self, cfg: Any, *, report_dir: str | Path | None, legacy_stages: bool,
                 echo: Callable[[str], None] = print) -> None:
        self.echo = echo
        ours, theirs = socket.socketpair()
        # One torch thread there: its work is small, and the cores are training's.
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        if PACKAGE_ROOT.name not in ("site-packages", "dist-packages"):  # a source checkout
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PACKAGE_ROOT),
                                                              os.environ.get("PYTHONPATH")]))
        if "mlflow" in sys.modules:  # a store chosen in this process, not by the environment
            env["MLFLOW_TRACKING_URI"] = sys.modules["mlflow"].get_tracking_uri()
        with theirs:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ticketsmith.sidecar", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), env=env, start_new_session=True)
        self.conn = Connection(ours.detach())
        self._lock = threading.Lock()
        self.replies: queue.SimpleQueue = queue.SimpleQueue()
        self._reader = threading.Thread(target=self._read, name="ticketsmith-tracking",
                                        daemon=True)
        self._reader.start()
        self.unfinished: set[tuple[int, int, str]] = set()
        self._started = False  # experiment_started sent: the store may hold its runs
        self._ended = False  # told to abort or finish, or gone: nothing more to send
        _send(self.conn, self._lock, "start", cfg,
              {"report_dir": report_dir, "legacy_stages": legacy_stages})

    def _read(self) -> None:
        """Its lines are printed as they come; answers and errors wait in `replies`."""
        while True:
            try:
                msg = pickle.loads(self.conn.recv_bytes())
            except (EOFError, OSError):
                self.replies.put(("gone",))
                return
            if msg[0] == "echo":
                self.echo(msg[1])
            else:
                self.replies.put(msg)

    def _answer(self) -> Any:
        """The next answer; an error the tracking process met is raised here."""
        msg = self.replies.get()
        if msg[0] == "reply":
            return msg[1]
        self._ended = True  # an error ends its work; "gone": it is not there any more
        if msg[0] == "error":
            raise rebuilt(*msg[1:])
        raise TrackingError(f"the tracking process ended unexpectedly (exit code "
                            f"{self.proc.wait()}); rerun the same command to resume")

    def _event(self, name: str, *args: Any) -> None:
        if not self.replies.empty():  # a failure met since the last event stops the engine now
            self._answer()
        if self._ended:
            raise TrackingError("the tracking process has stopped; rerun to resume")
        self._post("event", name, args)

    def _call(self, name: str, *args: Any) -> Any:
        """The event, and its answer (or the error it met)."""
        self._event(name, *args)
        self._post("call")
        return self._answer()

    def _post(self, *msg: Any) -> None:
        try:
            _send(self.conn, self._lock, *msg)
        except OSError:  # it died: say so with its exit code
            self._ended = True
            self.replies.put(("gone",))
            self._answer()

    # the engine's Tracker (engine/events.py)
    def experiment_started(self, cfg: Any, exp_hash: str, run_root: Path, data: Any) -> None:
        self._started = True
        # The data pickled apart: unpickling tensors needs torch, which the answer does not.
        data = pickle.dumps(shipped(data), protocol=pickle.HIGHEST_PROTOCOL)
        self.unfinished = set(self._call("experiment_started", cfg, exp_hash, run_root, data))

    def replicate_started(self, replicate: int) -> None:
        self._event("replicate_started", replicate)

    def run_started(self, replicate: int, level: int, variant: str) -> None:
        self._event("run_started", replicate, level, variant)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._event("log_metrics", metrics, step)

    def fetch_progress(self, replicate: int, level: int, variant: str, dest: Path) -> None:
        if (replicate, level, variant) in self.unfinished:  # else there is nothing to fetch
            self._call("fetch_progress", replicate, level, variant, dest)

    def progress_saved(self, path: Path) -> None:
        self._call("progress_saved", path)  # the file may change once this returns

    def run_finished(self, record: dict[str, Any], run_dir: Path) -> None:
        self._event("run_finished", record, run_dir)

    def run_reused(self, record: dict[str, Any], run_dir: Path) -> None:
        self._event("run_reused", record, run_dir)

    def replicate_finished(self, replicate: int, records: list[dict[str, Any]]) -> None:
        self._event("replicate_finished", replicate, records)

    def experiment_finished(self, records: list[dict[str, Any]]) -> None:
        self._event("experiment_finished", records)

    def experiment_failed(self, error: BaseException) -> None:
        self.abort(error)

    # the ends of the run
    def finish(self, records: list[dict[str, Any]], trained: list) -> tuple:
        """The gates, registry, release check and report, there: (verdicts, promotion,
        release ok, reason)."""
        self._event("finish", records, trained)
        self._post("call")
        self._ended = True
        return self._waiting(self._answer)

    def abort(self, error: BaseException) -> None:
        """Training stopped with `error`: log what came before it, then close the open runs
        (KILLED for an interrupt, FAILED for an error). Once; a no-op after `finish`."""
        if self._ended:
            return
        self._ended = True
        if not self._started:  # it has touched no store: nothing to close, no need to wait
            self.proc.kill()
            return
        try:
            _send(self.conn, self._lock, "abort", not isinstance(error, Exception))
        except OSError:
            return
        self._waiting(self._answer_quietly)

    def _answer_quietly(self) -> None:
        try:
            self._answer()
        except Exception:  # noqa: BLE001 - the error that stopped training is what is raised
            pass

    def _waiting(self, wait: Callable[[], Any]) -> Any:
        """wait(); a Ctrl-C or SIGTERM meanwhile goes on to the tracking process, which
        stops as one process would; then it is raised here."""
        try:
            return wait()
        except KeyboardInterrupt as stop:
            self._pass_on(stop)
            raise

    def _pass_on(self, stop: KeyboardInterrupt) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM if isinstance(stop, Terminated)
                                  else signal.SIGINT)
            self.proc.wait()

    def close(self) -> None:
        """Let the tracking process end (it has answered, or stopped, or was told nothing)
        and reap it. The connection is shut for writing, not closed, while the reader reads:
        the other end sees its end, and the reader sees the other's once it has exited."""
        if self.conn.closed:
            return
        if not self._started and self.proc.poll() is None:
            self.proc.kill()  # still importing, perhaps: it has touched no store
        try:
            with socket.socket(fileno=os.dup(self.conn.fileno())) as sock:
                sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        try:
            self.proc.wait()
        except KeyboardInterrupt as stop:
            self._pass_on(stop)
            raise
        self._reader.join()
        self.conn.close()


# --- the tracking process ---------------------------------------------------------------------

def die_with_parent(parent: int) -> None:
    """SIGKILL this process when its parent ends (Linux); elsewhere, EOF on the connection
    still ends it after the events it has."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it ended before the line above
        os._exit(1)


class TrackingServer:
    """Replays the engine's events on an `MlflowTracker`, then runs `pipeline.finish_prune`."""

    def __init__(self, conn: Connection) -> None:
        self.conn, self._lock = conn, threading.Lock()
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=_receive, args=(conn, self.inbox), daemon=True).start()
        self.tracker = None
        self.prepared: dict | None = None  # tickets logged as their levels end (pipeline)
        self.failed: tuple | None = None   # the error sent, answered again to every call
        self.training = True               # events still coming: an interrupt closes runs
        self.finishing = False             # told to finish: done once it has answered
        self.answer: Any = None            # of the last event, for a call after it
        self.done = False
        self._warming = False

    def echo(self, line: str) -> None:
        _send(self.conn, self._lock, "echo", line)

    def serve(self) -> int:
        try:
            start = self.inbox.get()
            if start is None:
                return 0  # told nothing
            _, self.cfg, self.options = pickle.loads(start)
            self._import_store()
            while not self.done:
                self._handle(self.inbox.get())
            return 0
        except KeyboardInterrupt as stop:  # passed on by the training process
            if self.training and self.tracker is not None:
                self.tracker.experiment_failed(stop)
            return 143 if isinstance(stop, Terminated) else 130

    @staticmethod
    def _import_store() -> None:
        """What `experiment_started` needs, since the engine waits for its answer: MLflow,
        the store's modules and the tracker (no torch)."""
        from ticketsmith.tracking.sqlite_store import import_store_modules

        import_store_modules()
        import ticketsmith.tracking.tracker  # noqa: F401

    @staticmethod
    def _warm_up() -> None:
        """The rest, on a thread while the events are handled: torch, matplotlib, MLflow's
        pyfunc, the plan builder; a module the handler needs first it imports itself."""
        import ticketsmith.engine.data  # noqa: F401  (torch)
        import ticketsmith.pipeline as pipeline

        pipeline.import_tracking_modules(None)
        import ticketsmith.engine.checkpoint  # noqa: F401
        import ticketsmith.serving.plan.build  # noqa: F401
        import ticketsmith.serving.plan.check  # noqa: F401
        from ticketsmith.engine.execution import freeze_long_lived

        freeze_long_lived()

    def _handle(self, raw: bytes | None) -> None:
        msg = None if raw is None else pickle.loads(raw)
        if msg is None:  # the training process closed its end without a word
            if self.training and self.tracker is not None and self.failed is None:
                self.tracker.close_open_runs("FAILED")
            self.done = True
            return
        kind = msg[0]
        if kind == "event":
            _, name, args = msg
            if self.failed is None:
                try:
                    self._dispatch(name, args)
                except Exception as error:  # noqa: BLE001 - sent to the engine, runs closed
                    self._fail(error)
        elif kind == "call":
            if self.failed is not None:
                _send(self.conn, self._lock, "error", *self.failed)
            else:
                _send(self.conn, self._lock, "reply", self.answer)
            if not self._warming:  # after the engine's first wait, not beside it (the GIL)
                self._warming = True
                threading.Thread(target=self._warm_up, name="ticketsmith-imports",
                                 daemon=True).start()
            self.done = self.done or self.finishing  # the last answer has gone
        elif kind == "abort":
            if self.failed is None and self.tracker is not None:
                interrupted = msg[1]
                self.tracker.experiment_failed(KeyboardInterrupt() if interrupted
                                               else RuntimeError("training failed"))
            self.training = False
            _send(self.conn, self._lock, "reply", None)
            self.done = True

    def _fail(self, error: Exception) -> None:
        """Send the error; close the open runs FAILED if events were still coming."""
        if not isinstance(error, (errors.TrackingError, *errors.USER_ERRORS)):
            traceback.print_exc()  # a bug: its traceback, as one process would show it
        self.failed = (type(error).__name__, str(error))
        _send(self.conn, self._lock, "error", *self.failed)
        if self.training and self.tracker is not None:
            self.tracker.experiment_failed(error)
        self.training = False

    def _dispatch(self, name: str, args: tuple) -> None:
        self.answer = None
        self.finishing = self.finishing or name == "finish"
        if name == "experiment_started":
            self._start(*args)
            return
        if self.prepared is None:  # after the answer to `experiment_started`, not before it
            from ticketsmith.pipeline import prepare_tickets_ahead

            self.data = self.tracker.data = pickle.loads(self.data)
            self.prepared = prepare_tickets_ahead(self.cfg, self.client, self.tracker, self.data)
        if name == "finish":
            self._finish(*args)
        else:
            getattr(self.tracker, name)(*args)

    def _start(self, cfg: Any, exp_hash: str, run_root: Path, data: Any) -> None:
        from mlflow import MlflowClient

        from ticketsmith.tracking.tracker import MlflowTracker, prepare_store

        prepare_store(None)  # here, not at start-up: a config error leaves no store behind
        self.client = MlflowClient()
        self.tracker = MlflowTracker(self.client, echo=self.echo)
        self.tracker.experiment_started(cfg, exp_hash, run_root, None)
        self.data = data  # pickled: unpickled with the next event
        self.answer = [key for key, run in self.tracker.children.items()
                       if run.info.status != "FINISHED"]

    def _finish(self, records: list, trained: list) -> None:
        import torch

        from ticketsmith.engine.lottery import ExperimentResult
        from ticketsmith.pipeline import finish_prune

        self.tracker.experiment_finished(records)
        self.training = False  # the runs are closed; what follows opens none
        t = self.tracker
        result = ExperimentResult(t.hash, t.run_root, records, trained, data=self.data,
                                  device=torch.device("cpu"))
        out = finish_prune(self.cfg, self.client, t, result, self.prepared,
                           legacy_stages=self.options["legacy_stages"], echo=self.echo,
                           report_dir=self.options["report_dir"])
        self.answer = (out.verdicts, out.promotion, out.release_ok, out.release_reason)


def main(argv: list[str]) -> int:
    """`python -m ticketsmith.sidecar FD`, started by `TrackingProcess` with its end of the
    connection as file descriptor FD."""
    from ticketsmith.base.output import quiet_libraries

    die_with_parent(os.getppid())
    stop_on_sigterm()
    quiet_libraries()
    conn = Connection(int(argv[0]))
    try:
        return TrackingServer(conn).serve()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


if __name__ == "__main__":
    code = main(sys.argv[1:])
    # Everything is written and flushed; the training process waits on this exit, and the
    # interpreter's own teardown (unloading MLflow, SQLAlchemy, torch) took a quarter second.
    os._exit(code)
