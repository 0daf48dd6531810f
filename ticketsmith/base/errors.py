"""Every error a user can cause or meet, in one place, so that the CLI maps them to exit codes
without importing torch or MLflow. Each module raises its own from here and re-exports it
(`ticketsmith.engine.masks.MaskError` is this `MaskError`).

Exit codes (`ticketsmith.cli.main`): bad input 2, tracking failure or a sweep that cannot go
on 1, interrupted 130 (Ctrl-C) or 143 (SIGTERM).
"""


class ConfigError(ValueError):
    """One-line description of a bad config: file or key path, and what is expected."""


class DataError(Exception):
    """A dataset cannot be loaded; the message names the file/field and what is expected."""


class ModelError(ValueError):
    """Unknown model name, bad factory path, an exclude naming no module, or nothing to prune."""


class MaskError(ValueError):
    """A mask that does not fit its model, or an impossible pruning request."""


class CheckpointError(ValueError):
    """A checkpoint that is missing, foreign, tampered with or does not fit."""


class LotteryError(ValueError):
    """Work that cannot be done as asked (e.g. a level range whose prerequisites are missing)."""


class GateError(ValueError):
    """The records cannot be gated (e.g. no dense baseline)."""


class BenchmarkError(ValueError):
    """A benchmark that cannot run: bad batch sizes, formats or data."""


class ExportError(ValueError):
    """A model that cannot be exported, or an export whose outputs do not match the model's."""


class TrackingError(RuntimeError):
    """A tracker could not record (store unreachable after retries, or a refused write)."""


class UnknownExperiment(TrackingError, ValueError):
    """An experiment reference (NAME, HASH or NAME/HASH) that names nothing, or is ambiguous."""


class SweepError(RuntimeError):
    """A sweep that cannot go on (e.g. every trial fails)."""


# Bad input: one line, no traceback, exit code 2.
USER_ERRORS = (ConfigError, DataError, ModelError, MaskError, CheckpointError, GateError,
               LotteryError, BenchmarkError, ExportError, UnknownExperiment)
