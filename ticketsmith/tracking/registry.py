"""Ticket candidates in the MLflow model registry, promoted or rejected by the gates.

Candidate per level: the ticket of replicate 0 (every replicate has its own mask; replicate 0
is the deterministic choice; the gates themselves use the mean over all replicates).
Aliases replace the deprecated stages: `champion` ≈ Production, `previous-champion` ≈ the
archived version kept for rollback. `legacy_stages=True` also moves stages.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterator

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.models import ModelSignature

from ticketsmith.engine.store import RunStore
from ticketsmith.gates import LevelVerdict, Promotion, champion_level, label  # noqa: F401
from ticketsmith.base.interrupts import interrupts_deferred
from ticketsmith.tracking.serving_tags import (CHECKED, FORMAT, lm_plan_tags,
                                               serving_description, serving_tags)
from ticketsmith.tracking.tracker import TAG, retry

CHAMPION, PREVIOUS = "champion", "previous-champion"
MODEL_CODE = str(Path(__file__).with_name("pyfunc_model.py"))
LM_MODEL_CODE = str(Path(__file__).with_name("lm_pyfunc.py"))


def model_name_for(experiment_name: str, exp_hash: str) -> str:
    """The registered model of one experiment: `NAME-HASH`. Tickets of different configs
    (another hash under a reused name) never compete for one model's aliases; a champion
    is only ever replaced by a ticket of the same experiment. MLflow refuses '/' and ':'
    in model names, so they become '_'."""
    return f"{experiment_name}-{exp_hash}".replace("/", "_").replace(":", "_")


def _find_version(client: MlflowClient, name: str, run_id: str):
    found = retry(lambda: client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'"),
                  "search model versions")
    return found[0] if found else None


def serving_signature(meta: dict) -> ModelSignature:
    """Outputs (class probabilities) and params (`output`, `format`, `input`). No input
    schema: an MLflow tensor spec fixes one dtype and rank, and would refuse the natural forms the model
    accepts (uint8 or 0..1 floats, flat or shaped) before the model sees them; the input
    example and the version's description show the input instead."""
    from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

    return ModelSignature(
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, int(meta["num_classes"])))]),
        params=ParamSchema([ParamSpec("output", "string", "probabilities"),
                            ParamSpec("format", "string", "serving"),
                            # "": as the model's config says (MLflow fills every
                            # param's default in, which would override model_config)
                            ParamSpec("input", "string", "")]))


def input_example(meta: dict) -> np.ndarray:
    """Two inputs as a user has them: uint8 images, or float features for non-image data."""
    from ticketsmith.serving.plan.inputs import input_spec

    spec = input_spec(meta)
    shape = spec["shape"][1:] if spec["mean"] is not None and spec["shape"][0] == 1 \
        else spec["shape"]
    dtype = np.uint8 if spec["mean"] is not None else np.float32
    return np.zeros((2, *shape), dtype=dtype)


def log_ticket_model(checkpoint: Path, serving: Path | None, *,
                     allow_factory: str | None = None, fmt: str = "serving"):
    """Log a ticket as a pyfunc model in the active run (`ModelInfo`): its serving plan (None:
    the masked dense network only) and its checkpoint, with signature and input example."""
    import safetensors
    import scipy
    import torch

    from ticketsmith.engine.checkpoint import load_checkpoint

    meta = load_checkpoint(checkpoint).meta
    artifacts = {"checkpoint": str(checkpoint)}
    if serving is not None:
        artifacts["serving"] = str(serving)
    # "threads": 0 serves at the plan's measured thread count (all cores for masked_dense);
    # present so that load_model(..., model_config={"threads": N}) can override it (MLflow
    # only overrides keys the logged config has).
    # "input": "pixels" is likewise there to be overridden ("normalized": see pyfunc_model).
    config = {"format": fmt, "threads": 0, "input": "pixels",
              **({"allow_factory": allow_factory} if allow_factory else {})}
    requirements = [f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}",
                    f"safetensors=={safetensors.__version__}", f"scipy=={scipy.__version__}",
                    f"mlflow=={mlflow.__version__}"]
    try:
        import onnxruntime

        requirements.append(f"onnxruntime=={onnxruntime.__version__}")
    except ImportError:  # the plan then serves its numpy route, and says so
        pass
    # The model carries its own code (ticketsmith/) and states its requirements, so MLflow
    # need not infer them by re-importing the model in a subprocess (~10 s per version).
    # The input example is saved as always (input_example.json, serving_input_example.json)
    # but not served once more: `verify` checked the plan against the masked model on real
    # inputs just before, and MLflow's own try loads the whole model again (the plan's ONNX
    # Runtime session, ~0.2 s of CPU per version) to run two zero images through it.
    with _requirements_from_this_interpreter():
        return mlflow.models.Model.log(
            artifact_path=None, name="model", flavor=_PYFUNC_UNVALIDATED, validate_serving_input=False,
            python_model=MODEL_CODE, artifacts=artifacts,
            input_example=input_example(meta), signature=serving_signature(meta),
            code_paths=[str(Path(__file__).parents[1])], model_config=config,
            pip_requirements=requirements)


def _save_pyfunc(*, validate_serving_input: bool = True, **kwargs):  # noqa: ARG001
    """`mlflow.pyfunc.save_model`, taking `Model.log`'s `validate_serving_input` switch, which
    Model.log also hands to the flavor and pyfunc's save_model refuses as unknown."""
    return mlflow.pyfunc.save_model(**kwargs)


# mlflow.pyfunc as the flavor `Model.log` saves with (its name is what MLflow records).
_PYFUNC_UNVALIDATED = SimpleNamespace(__name__="mlflow.pyfunc", save_model=_save_pyfunc)


@contextmanager
def _requirements_from_this_interpreter() -> Iterator[None]:
    """Without MLflow's check of the model's requirements against this interpreter's packages
    (when it saves the model, and again when it loads it to try the input example). The
    requirements are this interpreter's own versions, so the check cannot find a difference,
    and its first call scans the file list of every installed distribution (0.8 s of CPU
    here). Where MLflow names the check otherwise, it runs as before."""
    import mlflow.pyfunc
    import mlflow.utils.environment

    name = "warn_dependency_requirement_mismatches"
    modules = [m for m in (mlflow.utils.environment, mlflow.pyfunc) if hasattr(m, name)]
    saved = [getattr(m, name) for m in modules]
    for module in modules:
        setattr(module, name, lambda requirements: None)
    try:
        yield
    finally:
        for module, check in zip(modules, saved):
            setattr(module, name, check)


def lm_signature() -> ModelSignature:
    """Output: one continuation (string) per prompt; params with their defaults
    (`lm_backend.PARAMS`): max_new_tokens, temperature (0 = greedy), top_k (0 = every token),
    seed, stop (a list of strings). No input schema: MLflow would refuse a non-text input (an
    image batch) itself, in a message that repeats the whole input, before the model refuses
    it in one line; the input example and the version's description show the input."""
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    from ticketsmith.serving.lm_backend import PARAMS

    types = {"max_new_tokens": "long", "temperature": "double", "top_k": "long", "seed": "long"}
    return ModelSignature(
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema([*(ParamSpec(k, types[k], PARAMS[k]) for k in types),
                            ParamSpec("stop", "string", [], (-1,))]))


def log_language_model(checkpoint: Path, *, allow_factory: str | None = None,
                       fmt: str = "serving", tokenizer: Path | None = None,
                       plan: Path | None = None):
    """Log a language-model ticket as a pyfunc in the active run (`ModelInfo`): prompts
    (strings) in, generated text out (`lm_pyfunc`); the experiment's trained tokenizer
    (`tokenizer`, default the one of the checkpoint's run folder, if any) travels with it.
    fmt 'masked_dense' serves the masked model as trained (the dense baseline of a
    benchmark); 'serving' serves `plan` (the checked serving plan folder) when given, else
    compacts a structured ticket where exact."""
    import safetensors
    import torch

    artifacts = {"checkpoint": str(checkpoint), **({"plan": str(plan)} if plan else {})}
    if tokenizer is None:
        try:
            tokenizer = RunStore.tokenizer_next_to(checkpoint)
        except IndexError:  # a checkpoint outside a run folder (a downloaded one)
            tokenizer = None
    if tokenizer is not None and Path(tokenizer).is_dir():
        artifacts["tokenizer"] = str(tokenizer)
    # "threads": 0 (as the environment says) is there so that load_model(...,
    # model_config={"threads": N}) can override it (MLflow only overrides logged keys).
    config = {"format": fmt, "threads": 0,
              **({"allow_factory": allow_factory} if allow_factory else {})}
    requirements = [f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}",
                    f"safetensors=={safetensors.__version__}", f"mlflow=={mlflow.__version__}"]
    with _requirements_from_this_interpreter():
        return mlflow.pyfunc.log_model(
            name="model", python_model=LM_MODEL_CODE, artifacts=artifacts,
            # with a short request, which MLflow tries on the model when it logs it: the
            # default 64 new tokens would not fit a tiny model's context
            input_example=(["The "], {"max_new_tokens": 4}), signature=lm_signature(),
            code_paths=[str(Path(__file__).parents[1])], model_config=config,
            pip_requirements=requirements)


def register_ticket(client: MlflowClient, name: str, run_id: str, checkpoint: Path,
                    allow_factory: str | None = None, probe=None) -> str:
    """Log the ticket as a pyfunc model in its run and register it; idempotent per run.

    The serving plan next to the checkpoint (written by the benchmark; built unmeasured when
    there is none) is checked against the masked model on `probe` (model input; default a
    seeded batch) before it is logged; its figures become the version's `serving.*` tags.
    allow_factory: the model factory the experiment's config names; the pyfunc imports that
    one and no other (`checkpoint.factory_allowed`)."""
    return _register(client, name, run_id, checkpoint, allow_factory, probe).version


@dataclass(frozen=True)
class Prepared:
    """A ticket logged as a pyfunc model in its run, not registered yet."""
    model_uri: str
    model_id: str | None
    tags: dict[str, str]              # its `serving.*` tags


def prepare_ticket(client: MlflowClient, run_id: str, checkpoint: Path,
                   allow_factory: str | None = None, probe=None) -> Prepared:
    """Everything of `register_ticket` before the version: the serving plan built (when the
    benchmark wrote none) and checked, the model logged in its run. Touches no registry entry,
    so it may run as each level ends, before the gates (`pipeline.prepare_tickets_ahead`)."""
    from ticketsmith.engine.checkpoint import load_checkpoint

    mlflow.set_tracking_uri(client.tracking_uri)
    if load_checkpoint(checkpoint).meta.get("task") == "language_model":
        # Prompts in, text out, through the checked serving plan (built and measured here
        # when the benchmark wrote none for this checkpoint).
        from ticketsmith.serving.lm_plan import ensure_lm_plan, load_lm_plan

        plan = ensure_lm_plan(RunStore.serving_next_to(checkpoint), checkpoint, allow_factory)
        serving = {**lm_plan_tags(load_lm_plan(plan)), "task": "language_model"}
        with interrupts_deferred(), mlflow.start_run(run_id=run_id):
            info = log_language_model(Path(checkpoint), allow_factory=allow_factory, plan=plan)
    else:
        from ticketsmith.serving.plan.build import ensure_plan
        from ticketsmith.serving.plan.check import verify

        plan = ensure_plan(RunStore.serving_next_to(checkpoint), checkpoint, allow_factory)
        check = verify(plan, checkpoint, probe, allow_factory)
        # Ctrl-C waits for the model to be logged: MLflow's own store calls in here must not
        # be cut in half (see interrupts.py).
        with interrupts_deferred(), mlflow.start_run(run_id=run_id):
            info = log_ticket_model(Path(checkpoint), plan, allow_factory=allow_factory)
        serving = serving_tags(plan, check)
    # MLflow may close the run it reopened; keep the ticket run FINISHED as the engine left it.
    retry(lambda: client.set_terminated(run_id, "FINISHED"), "finish run")
    return Prepared(info.model_uri, info.model_id, serving)


def _register(client: MlflowClient, name: str, run_id: str, checkpoint: Path,
              allow_factory: str | None = None, probe=None, tags: dict[str, str] | None = None,
              prepared: Prepared | None = None):
    """`register_ticket`, returning the model version (with its tags); `tags` (e.g. the gate
    results) are written with the version in the same store call as its `serving.*` tags.
    prepared: the run's model, logged already (`prepare_ticket`)."""
    existing = _find_version(client, name, run_id)
    if existing is not None:
        return existing
    prepared = prepared or prepare_ticket(client, run_id, checkpoint, allow_factory, probe)
    try:
        retry(lambda: client.get_registered_model(name), "get registered model")
    except Exception:
        retry(lambda: client.create_registered_model(
            name, description="TicketSmith ticket candidates; `champion` is the sparsest ticket "
                              "passing every quality gate."), "create registered model")
    return retry(lambda: client.create_model_version(
        name, prepared.model_uri, run_id=run_id, model_id=prepared.model_id,
        tags={**prepared.tags, **(tags or {})}), "create model version")


def version_description(verdict: LevelVerdict, serving: str | None = None) -> str:
    """The version's description in the MLflow UI: the gate verdict with the numbers that
    decided it, then (`serving`) the deployed format and its measured speedup."""
    lines = [f"Level {verdict.level} ticket, {verdict.sparsity:.1%} sparse, mean test "
             f"{verdict.quality} over {verdict.replicates} replicate(s): quality gate "
             f"**{'PASSED' if verdict.passed else 'FAILED'}**."]
    lines += [f"- {g.name}: {label(g.passed)} "
              f"— {g.detail}" + (f" (threshold {g.threshold})" if g.threshold is not None else "")
              for g in verdict.gates]
    if serving:
        lines += ["", serving]
    return "\n".join(lines)


def gate_tags(verdict: LevelVerdict, run_id: str) -> dict[str, str]:
    """The gate results a version carries: level, sparsity, source run, verdict, each gate."""
    tags = {"level": str(verdict.level), "sparsity": f"{verdict.sparsity:.6f}",
            "source_run": run_id, "quality_gate": "passed" if verdict.passed else "rejected"}
    for g in verdict.gates:
        tags[f"gate.{g.name}"] = label(g.passed) + (f" {g.value:.4f}" if g.value is not None
                                                    else "")
    return tags


def promote(client: MlflowClient, name: str, ticket_runs: dict[int, tuple[str, Path]],
            verdicts: list[LevelVerdict], *, legacy_stages: bool = False,
            echo: Callable[[str], None] = print, allow_factory: str | None = None,
            register: bool = True, probe=None,
            prepared: dict[str, Prepared] | None = None) -> Promotion:
    """Register every level's candidate, tag gate results, move the aliases.

    register=False: re-gate only the versions already registered (`ticketsmith gate
    --update-registry`, which may run where the checkpoints are not); others are skipped.
    prepared: run id → its model, logged while later levels trained (`prepare_ticket`).
    """
    by_level = {v.level: v for v in verdicts}
    versions, rejected = {}, []
    for level, (run_id, checkpoint) in sorted(ticket_runs.items()):
        if level not in by_level:
            continue
        v = by_level[level]
        tags = gate_tags(v, run_id)
        if register:  # a new version gets its gate tags in the call that creates it
            mv = _register(client, name, run_id, checkpoint, allow_factory, probe, tags,
                           (prepared or {}).get(run_id))
        elif (found := _find_version(client, name, run_id)) is None:
            continue
        else:
            mv = found
        version = versions[level] = mv.version
        for k, val in tags.items():  # a version registered before: only what changed
            if mv.tags.get(k) != val:
                retry(lambda: client.set_model_version_tag(name, version, k, val), "tag version")
        serving = serving_description(name, version, {**mv.tags, **tags})
        retry(lambda: client.update_model_version(name, version,
                                                  version_description(v, serving or None)),
              "describe version")
        if not v.passed:
            rejected.append(version)
    current, previous = _move_aliases(client, name, verdicts, versions, rejected, echo)
    if legacy_stages and current is not None:
        retry(lambda: client.transition_model_version_stage(
            name, current, "Production", archive_existing_versions=True), "stage transition")
    return Promotion(name, versions, current, previous, rejected)


def _move_aliases(client: MlflowClient, name: str, verdicts: list[LevelVerdict],
                  versions: dict[int, str], rejected: list[str],
                  echo: Callable[[str], None]) -> tuple[str | None, str | None]:
    """Champion = the sparsest passing version; the one it replaces becomes previous-champion.
    A rejected version holds no alias: a rejected champion is dropped, not kept for rollback.
    Returns (champion, previous-champion) as they stand afterwards."""
    current, previous = _alias(client, name, CHAMPION), _alias(client, name, PREVIOUS)
    for version in rejected:
        _drop_aliases(client, name, version)
    if current in rejected:
        echo(f"registry: {name} v{current} no longer passes every gate; it is no longer "
             f"@{CHAMPION}")
        current = None
    previous = None if previous in rejected else previous
    best = champion_level([v for v in verdicts if v.level in versions])
    if best is None or _outranks(client, name, current, versions, best):
        if current is None:
            echo(f"registry: no ticket passes every gate; no version of {name} is @{CHAMPION}")
        return current, previous
    new = versions[best.level]
    if current == new:
        return current, previous
    if current is not None:
        retry(lambda: client.set_registered_model_alias(name, PREVIOUS, current),
              "set previous-champion")
        previous = current
    retry(lambda: client.set_registered_model_alias(name, CHAMPION, new), "set champion")
    if previous == new:  # promoted back from rollback: it cannot be its own rollback
        retry(lambda: client.delete_registered_model_alias(name, PREVIOUS), "drop previous")
        previous = None
    echo(f"registry: {name} v{new} (level {best.level}, {best.sparsity:.1%} sparse) is now "
         f"@{CHAMPION}" + (f"; v{previous} is @{PREVIOUS}" if previous else ""))
    return new, previous


def _outranks(client: MlflowClient, name: str, current: str | None, versions: dict[int, str],
              best: LevelVerdict) -> bool:
    """Whether a champion not gated in this call (a level beyond what this run asked for)
    is at least as sparse as `best`: it then keeps the alias."""
    if current is None or current in versions.values():
        return False
    mv = retry(lambda: client.get_model_version(name, current), "get model version")
    return float(mv.tags.get("sparsity", "0")) >= best.sparsity


def _alias(client: MlflowClient, name: str, alias: str) -> str | None:
    try:
        return client.get_model_version_by_alias(name, alias).version
    except mlflow.exceptions.MlflowException:
        return None


def _drop_aliases(client: MlflowClient, name: str, version: str) -> None:
    mv = retry(lambda: client.get_model_version(name, version), "get model version")
    for alias in mv.aliases:
        retry(lambda: client.delete_registered_model_alias(name, alias), "drop alias")


def ticket_runs(client: MlflowClient, experiment_id: str, exp_hash: str, run_root: Path,
                replicate: int = 0) -> dict[int, tuple[str, Path]]:
    """level → (child run id, local checkpoint) for the candidate replicate's tickets."""
    flt = (f"tags.`{TAG}hash` = '{exp_hash}' and tags.`{TAG}variant` = 'ticket' and "
           f"tags.`{TAG}replicate` = '{replicate}' and attributes.status = 'FINISHED'")
    runs = retry(lambda: client.search_runs([experiment_id], flt, max_results=1000), "search runs")
    out = {}
    for run in runs:
        level = int(run.data.tags[TAG + "level"])
        out[level] = (run.info.run_id,
                      RunStore(Path(run_root)).checkpoint_path(replicate, level, "ticket"))
    return out
