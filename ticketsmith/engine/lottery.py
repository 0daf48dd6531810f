"""Iterative Magnitude Pruning: levels x variants x replicates, rewinding, resume.

Level 0 trains the dense network. Level k>0 prunes the previous level's trained ticket
(iterative) or the dense network straight to the level's density (one-shot), then trains
each variant from its starting point under its mask. Finished (level, variant) runs are
found in the run directory and skipped, so a killed experiment resumes where it stopped.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ticketsmith.engine import checkpoint as ckpt
from ticketsmith.base.config import Config, ConfigError, dump_config
from ticketsmith.engine.data import Dataset
from ticketsmith.engine.execution import (check_resume, determinism, execution_facts,
                                         freeze_long_lived)
from ticketsmith.engine.masks import (Mask, describe_plan, fraction_after, prune_magnitude, prune_n_m,
                                      random_mask_like, semi_structured_plan)
from ticketsmith.engine.models import build_model, count_params, output_layer, prunable_for
from ticketsmith.engine.events import NullTracker, Tracker
from ticketsmith.engine.progress import Progress
from ticketsmith.base.interrupts import interrupts_deferred
from ticketsmith.base.secrets import redact
from ticketsmith.engine.structured import check_structured, prune_units, random_units_like
from ticketsmith.engine.store import RunStore
from ticketsmith.engine.transformer_units import (UnitGroup, prune_transformer_units,
                                                  random_transformer_units, transformer_layout)
from ticketsmith.engine.selection import VARIANT_NAMES, Selection  # noqa: F401 (re-exported)
from ticketsmith.engine.tasks import task_for
from ticketsmith.engine.train import TrainResult, resolve_device, total_iterations
from ticketsmith.base.errors import LotteryError  # noqa: F401 (re-exported)

def derive_seed(*parts: object) -> int:
    """A stable 63-bit seed from any parts (same on every machine and Python run)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def replicate_seeds(seed: int, replicate: int) -> tuple[int, int]:
    """(initial-weights seed, data-order seed) of replicate `replicate` of an experiment with
    base seed `seed`. Both are recorded on every run of the replicate (`seed`, `data_seed`),
    so its init and batch order can be rebuilt from the run alone."""
    return seed + replicate, derive_seed(seed, replicate, "data-order")


def layer_fractions(cfg: Config, weights: dict[str, torch.Tensor], out_name: str) -> dict[str, float]:
    """Per-layer pruning rate: `fraction`, output layer at half rate (layer-wise) unless set,
    overridden by `layer_fractions` keyed by weight name or by 'conv' / 'linear'."""
    p = cfg.prune
    unknown = sorted(set(p.layer_fractions) - {"conv", "linear"} - set(weights))
    if unknown:  # a typo would otherwise silently prune that layer at the default rate
        raise ConfigError(f"prune.layer_fractions.{unknown[0]}: not 'conv', 'linear' or a "
                          f"prunable weight of this model ({', '.join(weights)})")
    rates = {}
    for name, w in weights.items():
        rate = p.fraction
        if name == out_name and p.output_fraction is not None:
            rate = p.output_fraction
        elif name == out_name and p.scope == "layerwise":
            rate = p.fraction / 2
        kind = "conv" if w.dim() > 2 else "linear"
        rate = p.layer_fractions.get(kind, rate)
        rates[name] = p.layer_fractions.get(name, rate)
    return rates


def pruning_targets(cfg: Config, model: nn.Module, meta: dict[str, Any]):
    """(prunable weights, per-layer rates) of `model` under `cfg`: what every level prunes,
    checked once up front (check_model) and used by each replicate."""
    weights = prunable_for(model, meta)
    return weights, layer_fractions(cfg, dict(weights),
                                    output_layer(model, cfg.task == "language_model"))


def _prune(weights: dict[str, torch.Tensor], mask: Mask, rates: dict[str, float], scope: str,
           shared_rate: float) -> Mask:
    """Layer-wise, or global for the layers at `shared_rate` with any layer given a rate of
    its own (e.g. the output layer) pruned by itself at that rate."""
    if scope == "layerwise":
        return prune_magnitude(weights, mask, rates, "layerwise")
    shared = {n: (r if r == shared_rate else 0.0) for n, r in rates.items()}
    own = {n: (0.0 if r == shared_rate else r) for n, r in rates.items()}
    competing = prune_magnitude(weights, mask, shared, "global")
    alone = prune_magnitude(weights, mask, own, "layerwise")
    return Mask({n: competing[n] if rates[n] == shared_rate else alone[n] for n in rates})


@dataclass(frozen=True)
class LevelStart:
    """What a level prunes, by the schedule. Iterative: the previous ticket's weights and
    mask, at each layer's rate. One-shot: the dense weights, all kept, at the rate that
    reaches the level's density in one step (fraction_after)."""
    weights: dict[str, torch.Tensor]
    mask: Mask
    rates: dict[str, float]       # per layer
    shared_rate: float            # the rate the layers compete at (global) / heads and units


def level_start(prune, level: int, prev_weights: dict[str, torch.Tensor], prev_mask: Mask,
                dense_weights: dict[str, torch.Tensor], rates: dict[str, float]) -> LevelStart:
    if prune.schedule == "oneshot":
        return LevelStart(dense_weights, Mask.ones_like(dense_weights),
                          {n: fraction_after(r, level) for n, r in rates.items()},
                          fraction_after(prune.fraction, level))
    return LevelStart(prev_weights, prev_mask, dict(rates), prune.fraction)


def level_mask(cfg: Config, level: int, prev_weights: dict[str, torch.Tensor], prev_mask: Mask,
               dense_weights: dict[str, torch.Tensor], rates: dict[str, float],
               layout: list[UnitGroup] | None = None) -> Mask:
    """The mask of `level` (>0): pure function of trained weights and the schedule.
    layout: a transformer's heads and MLP units (transformer_units.py), for 'head'/'neuron'/
    'head_neuron'."""
    p = cfg.prune
    start = level_start(p, level, prev_weights, prev_mask, dense_weights, rates)
    if p.granularity != "weight" and layout:  # whole heads / MLP hidden units
        return prune_transformer_units(start.weights, start.mask, layout, p.granularity,
                                       start.shared_rate, p.scope)
    if p.granularity != "weight":  # whole neurons / channels (see structured.py)
        return prune_units(start.weights, start.mask, start.rates, granularity=p.granularity,
                           norm=p.unit_norm, scope=p.scope, shared_rate=start.shared_rate)
    mask = _prune(start.weights, start.mask, start.rates, p.scope, start.shared_rate)
    if p.pattern == "2:4":
        # Only where a 2:4 kernel can serve it; other layers stay unstructured (see the plan).
        runnable = [n for n, why in semi_structured_plan(start.weights).items() if why is None]
        mask = prune_n_m(start.weights, mask, 2, 4, layers=runnable)
    return mask


# --- variants: what is trained at a level, as (starting weights, mask) ---------------------

@dataclass
class LevelContext:
    cfg: Config
    replicate: int
    level: int
    mask: Mask                        # the IMP mask of this level
    rewind_state: dict[str, torch.Tensor]
    build: Callable[[], nn.Module]    # fresh model with the global RNG as it stands
    layout: list[UnitGroup] = field(default_factory=list)  # a transformer's heads and units


def _ticket(ctx: LevelContext) -> tuple[dict[str, torch.Tensor], Mask]:
    return ctx.rewind_state, ctx.mask


def _random_reinit(ctx: LevelContext) -> tuple[dict[str, torch.Tensor], Mask]:
    seed = derive_seed(ctx.cfg.experiment.seed, ctx.replicate, ctx.level, "random_reinit")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        state = ctx.build().state_dict()
    return state, ctx.mask


def _random_prune(ctx: LevelContext) -> tuple[dict[str, torch.Tensor], Mask]:
    gen = torch.Generator().manual_seed(
        derive_seed(ctx.cfg.experiment.seed, ctx.replicate, ctx.level, "random_prune"))
    granularity, mask = ctx.cfg.prune.granularity, ctx.mask.to("cpu")
    if granularity != "weight" and ctx.layout:
        return ctx.rewind_state, random_transformer_units(mask, ctx.layout, granularity, gen)
    if granularity != "weight":  # the same number of units per layer, chosen at random
        return ctx.rewind_state, random_units_like(mask, gen, granularity)
    return ctx.rewind_state, random_mask_like(mask, gen)


VARIANTS: dict[str, Callable[[LevelContext], tuple[dict[str, torch.Tensor], Mask]]] = {
    "ticket": _ticket,
    "random_reinit": _random_reinit,
    "random_prune": _random_prune,
}


@dataclass
class ExperimentResult:
    exp_hash: str
    run_root: Path
    records: list[dict[str, Any]] = field(default_factory=list)
    trained: list[tuple[int, int, str]] = field(default_factory=list)  # what this call trained
    data: Dataset | None = None          # the data it ran on (for benchmarks and figures)
    device: torch.device | None = None


def model_meta(cfg: Config, data: Dataset) -> dict[str, Any]:
    """What `checkpoint` metadata needs to rebuild the model without the experiment config."""
    meta = {"model": cfg.model.name, "factory": cfg.model.factory, "options": cfg.model.options,
            "exclude": cfg.model.exclude, "input_shape": list(data.input_shape),
            "num_classes": data.num_classes, "dataset": data.name}
    if cfg.model.also_prune:  # absent otherwise: older checkpoints' metadata stays as it was
        meta["also_prune"] = list(cfg.model.also_prune)
    if cfg.task != "image_classification":  # image checkpoints keep their metadata as it was
        meta.update(task=cfg.task, tokenizer=data.tokenizer.name)
    return meta


def experiment_data(cfg: Config, device: torch.device | str) -> Dataset:
    """The experiment's data on `device`, as its task loads them (images: the validation
    split is seeded by experiment.seed; text: token streams of whole held-out documents)."""
    return task_for(cfg).load(cfg, device)


def seeded_model(cfg: Config, data: Dataset, seed: int) -> nn.Module:
    """A fresh model whose initial weights depend on `seed` alone (global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(cfg.model.name, data.input_shape, data.num_classes,
                           cfg.model.factory, cfg.model.options)


def check_model(cfg: Config, data: Dataset) -> None:
    """Build the model once and check everything the config says about it against the data:
    unknown model or factory, an exclude or layer rate naming no layer, a rewind point after
    the end of training. Called before anything is written or tracked, so a config error
    leaves no run folder and no run behind."""
    task_for(cfg).check(cfg, data)
    model = seeded_model(cfg, data, cfg.experiment.seed)
    weights, _ = pruning_targets(cfg, model, model_meta(cfg, data))
    check_granularity(cfg, model, weights)
    rewind_at = cfg.prune.rewind_iteration
    if rewind_at > (total := total_iterations(cfg.train, len(data.train_x))):
        raise ConfigError(f"prune.rewind_iteration: {rewind_at} is after the end of training "
                          f"({total} iterations)")


def check_granularity(cfg: Config, model: nn.Module, weights) -> None:
    """Transformers prune whole heads or MLP units; other nets neurons or channels."""
    granularity = cfg.prune.granularity
    if granularity == "weight":
        return
    if cfg.model.also_prune:  # a unit's layout covers its weight matrices only
        raise ConfigError(f"model.also_prune: {cfg.model.also_prune} takes prune.granularity "
                          f"'weight', not {granularity!r}")
    if transformer_layout(model):
        if granularity not in ("head", "neuron", "head_neuron"):
            raise ConfigError(f"prune.granularity: {granularity!r} does not apply to a "
                              "transformer; use 'head', 'neuron' (MLP hidden units), "
                              "'head_neuron' (both) or 'weight'")
    elif granularity in ("head", "head_neuron"):
        raise ConfigError(f"prune.granularity: {granularity!r} needs a transformer "
                          f"({type(model).__name__} has no attention heads)")
    else:
        check_structured(model, weights, granularity)


def prepare_experiment(cfg: Config) -> Dataset:
    """The experiment's data, with the model checked against it (see `check_model`)."""
    data = experiment_data(cfg, resolve_device(cfg.train.device))
    check_model(cfg, data)
    return data


def train_dense(cfg: Config, *, progress: bool = True) -> tuple[TrainResult, Dataset, torch.device]:
    """Train one dense model exactly as level 0 of replicate 0 would (same init, same data
    order), without a run directory or tracking."""
    device = resolve_device(cfg.train.device)
    data = experiment_data(cfg, device)
    init_seed, data_seed = replicate_seeds(cfg.experiment.seed, 0)
    model = seeded_model(cfg, data, init_seed).to(device)
    with determinism(cfg.train.determinism, device):
        res = task_for(cfg).train(model, data, cfg.train, seed=data_seed, progress=progress,
                                  desc="dense")
    return res, data, device


def run_experiment(cfg: Config, *, tracker: Tracker | None = None, progress: bool = True,
                   echo: Callable[[str], None] = print, data: Dataset | None = None,
                   selection: Selection = Selection()) -> ExperimentResult:
    """Run (or resume) the experiment described by `cfg`, or the `selection` of it."""
    tracker = tracker or NullTracker()
    if cfg.train.threads is not None:  # a process-wide torch setting, chosen by the config
        torch.set_num_threads(cfg.train.threads)
    exp_hash = cfg.hash()
    device = resolve_device(cfg.train.device)
    if data is None:
        data = experiment_data(cfg, device)
    check_model(cfg, data)  # every config error before the run folder and tracking exist
    freeze_long_lived()  # modules and data stay to the end: full collections skip them
    store = RunStore(Path(cfg.experiment.output_dir) / exp_hash)
    store.root.mkdir(parents=True, exist_ok=True)
    # The resolved config, with any credential in its values masked (e.g. a signed data URL).
    ckpt.atomic_write_text(store.config_path, redact(dump_config(cfg)))
    tokenizer = getattr(data, "tokenizer", None)
    if hasattr(tokenizer, "save") and not store.tokenizer_dir.is_dir():
        tokenizer.save(store.tokenizer_dir)  # a trained tokenizer ships with the model
    result = ExperimentResult(exp_hash, store.root, data=data, device=device)
    tracker.experiment_started(cfg, exp_hash, store.root, data)
    echo(f"experiment {cfg.experiment.name} [{exp_hash}] on {device}: {len(data.train_x)} train / "
         f"{len(data.val_x)} val / {len(data.test_x)} test, {cfg.prune.levels} levels, "
         f"variants {cfg.experiment.variants}, {cfg.experiment.replicates} replicate(s)")
    try:
        check_resume(store.records(), execution_facts(device, cfg.train.determinism),
                     cfg.train.allow_device_change, str(store.root))
        for replicate in range(cfg.experiment.replicates):
            tracker.replicate_started(replicate)
            with determinism(cfg.train.determinism, device):
                records = _run_replicate(cfg, replicate, data, store, tracker, result, progress,
                                         echo, device, selection)
            tracker.replicate_finished(replicate, records)
            result.records.extend(records)
    except BaseException as exc:  # Ctrl-C too: let the tracker close its open runs
        tracker.experiment_failed(exc)
        raise
    tracker.experiment_finished(result.records)
    return result


@dataclass
class _Replicate:
    """One replicate's fixed facts, and where its work goes (store, tracker, result)."""
    cfg: Config
    replicate: int
    data: Dataset
    store: RunStore
    tracker: Tracker
    result: ExperimentResult
    selection: Selection
    device: torch.device
    progress: bool
    seed: int
    data_seed: int
    meta: dict[str, Any]
    model: nn.Module
    init_state: dict[str, torch.Tensor]
    names: list[str]                  # prunable weights
    layout: list[UnitGroup]           # a transformer's heads and MLP units ([] otherwise)
    rates: dict[str, float]           # per-layer pruning fractions
    total_params: int

    def build(self) -> nn.Module:
        cfg = self.cfg
        return build_model(cfg.model.name, self.data.input_shape, self.data.num_classes,
                           cfg.model.factory, cfg.model.options)

    def weights(self) -> dict[str, torch.Tensor]:
        return prunable_for(self.model, self.meta)


def _start_replicate(cfg: Config, replicate: int, data: Dataset, store: RunStore,
                     tracker: Tracker, result: ExperimentResult, progress: bool, echo, device,
                     selection: Selection) -> _Replicate:
    """The replicate's model at its initial weights: stored ones on resume (whatever the RNG
    says now), else fresh ones, saved."""
    seed, data_seed = replicate_seeds(cfg.experiment.seed, replicate)
    meta = model_meta(cfg, data)
    model = seeded_model(cfg, data, seed).to(device)
    init_path = store.init_path(replicate)
    if init_path.is_file():
        model.load_state_dict(ckpt.load_checkpoint(init_path, device).state)
    else:
        ckpt.save_checkpoint(init_path, model.state_dict(), meta=meta)
    weights, rates = pruning_targets(cfg, model, meta)
    if cfg.prune.pattern == "2:4" and replicate == 0:
        echo("  " + describe_plan(semi_structured_plan(weights)))
    return _Replicate(cfg, replicate, data, store, tracker, result, selection, device, progress,
                      seed, data_seed, meta, model,
                      {k: v.detach().clone() for k, v in model.state_dict().items()},
                      list(weights), transformer_layout(model), rates, count_params(model))


def _already_done(rep: _Replicate, level: int, variant: str):
    """(record, final weights) of a finished run, reported to the tracker as reused."""
    store, key = rep.store, (rep.replicate, level, variant)
    loaded = ckpt.load_checkpoint(store.checkpoint_path(*key), rep.device)
    record = store.read_metrics(*key)
    rep.tracker.run_reused(record, store.run_dir(*key))
    return record, loaded.state


def _train_one(rep: _Replicate, level: int, variant: str, start: dict[str, torch.Tensor],
               mask: Mask, save_at: int | None) -> TrainResult:
    """Train (level, variant) from `start` under `mask`, or resume it from its progress
    checkpoint; the tracker sees every evaluation."""
    keeper = level_progress(rep, level, variant)
    rep.tracker.run_started(rep.replicate, level, variant)
    rep.model.load_state_dict(start)

    def on_eval(step: int, row: dict[str, float]) -> None:
        rep.tracker.log_metrics({k: v for k, v in row.items() if k != "iteration"}, step)

    # SIGTERM and Ctrl-C wait for the end of the step, so the progress checkpoint holds it.
    with interrupts_deferred():
        res = task_for(rep.cfg).train(
            rep.model, rep.data, rep.cfg.train, seed=rep.data_seed, masked=rep.weights(),
            mask=mask.to(rep.device), save_state_at=save_at, on_eval=on_eval,
            progress=rep.progress, desc=f"r{rep.replicate} L{level} {variant}",
            checkpoints=keeper)
    if save_at is not None and save_at > 0:
        ckpt.save_checkpoint(rep.store.rewind_path(rep.replicate), res.saved_state, meta=rep.meta)
    return res


def level_progress(rep: _Replicate, level: int, variant: str) -> Progress:
    """The progress checkpoint of (level, variant): in the run folder, or fetched through the
    tracker from the artifact store when a new machine resumes the level."""
    key, tcfg = (rep.replicate, level, variant), rep.cfg.train
    path = rep.store.progress_path(*key)
    if not path.is_file():
        rep.tracker.fetch_progress(*key, path)
    identity = {"hash": rep.store.root.name, "replicate": rep.replicate, "level": level,
                "variant": variant, "data_seed": rep.data_seed,
                "iterations": total_iterations(tcfg, len(rep.data.train_x))}
    return Progress(path, identity, tcfg.checkpoint_every, upload=rep.tracker.progress_saved,
                    upload_every_s=tcfg.upload_every_s)


def _record(rep: _Replicate, level: int, variant: str, mask: Mask, res: TrainResult):
    """Write the run's checkpoint, curve and metrics (the done marker, last) and tell the
    tracker. Returns (record, final weights)."""
    store, key, kept = rep.store, (rep.replicate, level, variant), mask.kept()
    record = {
        "replicate": rep.replicate, "level": level, "variant": variant, "seed": rep.seed,
        "data_seed": rep.data_seed,
        "test_accuracy": res.test_accuracy, "test_loss": res.test_loss,
        "best_val_accuracy": res.best_val_accuracy,
        "early_stop_iteration": res.early_stop_iteration,
        "density": mask.density(), "sparsity": mask.sparsity(),
        "nonzero_params": rep.total_params - (mask.size() - kept), "prunable_params": mask.size(),
        "total_params": rep.total_params, "iterations": res.iterations,
        "wall_time_s": res.wall_time_s, "layer_density": mask.layer_density(),
        **res.metrics, **execution_facts(rep.device, rep.cfg.train.determinism),
    }
    state = {k: v.detach().clone() for k, v in rep.model.state_dict().items()}
    run_meta = {**rep.meta, "level": level, "variant": variant, "replicate": rep.replicate,
                "hash": store.root.name, "density": record["density"]}
    ckpt.save_checkpoint(store.checkpoint_path(*key), state, mask, run_meta)
    store.progress_path(*key).unlink(missing_ok=True)  # the final checkpoint supersedes it
    store.write_json(store.curve_path(*key), res.curve)
    task = task_for(rep.cfg)
    if task.samples is not None:  # for a person to read; uploaded with the run folder
        seed = derive_seed(rep.cfg.experiment.seed, rep.replicate, "samples")
        ckpt.atomic_write_text(store.samples_path(*key), task.samples(rep.model, rep.data, seed))
    store.write_json(store.metrics_path(*key), record)  # the done marker
    rep.result.trained.append(key)
    rep.tracker.run_finished(record, store.run_dir(*key))
    return record, state


def _run_one(rep: _Replicate, level: int, variant: str, start: dict[str, torch.Tensor],
             mask: Mask, save_at: int | None = None):
    """Reuse (level, variant) if it is done, else train it and record it."""
    if rep.store.is_done(rep.replicate, level, variant):
        return _already_done(rep, level, variant)
    if not rep.selection.allows(level, variant):
        raise LotteryError(f"level {level} {variant} of replicate {rep.replicate} is not "
                           "finished and is outside --levels/--variants; train it first")
    return _record(rep, level, variant, mask, _train_one(rep, level, variant, start, mask, save_at))


def _level_mask(rep: _Replicate, level: int, prev_weights, prev_mask: Mask, dense_weights) -> Mask:
    """This level's IMP mask: the stored ticket's on resume, else pruned from the last one."""
    if rep.store.is_done(rep.replicate, level, "ticket"):
        path = rep.store.checkpoint_path(rep.replicate, level, "ticket")
        return ckpt.load_checkpoint(path, rep.device).mask
    return level_mask(rep.cfg, level, prev_weights, prev_mask, dense_weights, rep.rates, rep.layout)


def _variants_to_run(rep: _Replicate, level: int, last: int) -> list[str]:
    """The variants of `level` to reuse or train: the selection's, the tickets later levels
    prune from, and whatever is done already."""
    def wanted(variant: str) -> bool:
        needed_later = variant == "ticket" and level < last
        return (rep.selection.allows(level, variant) or needed_later
                or rep.store.is_done(rep.replicate, level, variant))
    return [v for v in rep.cfg.experiment.variants if wanted(v)]


def _run_replicate(cfg: Config, replicate: int, data: Dataset, store: RunStore, tracker: Tracker,
                   result: ExperimentResult, progress: bool, echo, device,
                   selection: Selection) -> list[dict[str, Any]]:
    """Dense first, then each level: its mask, then every variant — each reused if done,
    else trained and recorded."""
    rep = _start_replicate(cfg, replicate, data, store, tracker, result, progress, echo, device,
                           selection)
    dense_mask = Mask.ones_like(rep.weights())
    rewind_at = cfg.prune.rewind_iteration  # checked against the training length up front
    dense, dense_state = _run_one(rep, 0, "dense", rep.init_state, dense_mask,
                                  save_at=rewind_at or None)
    records = [dense]
    summary = task_for(cfg).summary
    echo(f"  r{replicate} level 0  density 100.00%  dense {summary(dense)}")
    rewind_state = rep.init_state
    if rewind_at:
        rewind_state = ckpt.load_checkpoint(store.rewind_path(replicate), device).state
    dense_weights = {n: dense_state[n] for n in rep.names}
    prev_weights, prev_mask = dense_weights, dense_mask
    last = cfg.prune.levels if selection.last_level is None else min(selection.last_level,
                                                                      cfg.prune.levels)
    for level in range(1, last + 1):
        mask = _level_mask(rep, level, prev_weights, prev_mask, dense_weights)
        ctx = LevelContext(cfg, replicate, level, mask, rewind_state, rep.build, rep.layout)
        line = [f"  r{replicate} level {level:<2} density {mask.density():7.2%}"]
        for variant in _variants_to_run(rep, level, last):
            start, vmask = VARIANTS[variant](ctx)
            record, state = _run_one(rep, level, variant, start, vmask)
            records.append(record)
            line.append(f"{variant} {summary(record)}")
            if variant == "ticket":
                prev_weights, prev_mask = {n: state[n] for n in rep.names}, mask
        echo("  ".join(line))
    return records
