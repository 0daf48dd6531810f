"""Typed, validated experiment config: YAML + `--set section.key=value` overrides + a hash.

One frozen pydantic model per section; unknown keys and out-of-range values are rejected
with a one-line error naming the full key path. The experiment hash covers only fields that
differ from their defaults (and only fields that change results), so adding an option with a
default keeps every old hash.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, field_validator,
                      model_validator)
from pydantic_core import InitErrorDetails
from ticketsmith.base.errors import ConfigError  # noqa: F401 (re-exported)
from ticketsmith.base.textfiles import content_digest

# Fields that name where things go or how they are shown, not what is computed.
_NOT_HASHED = {"json_schema_extra": {"hashed": False}}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# The same names as data.DATASETS and text.TEXT_DATASETS, kept here so loading a config does
# not import torch. "text" is a text file or folder of your own (data.path).
BUILTIN_DATASETS = ("mnist", "fashion_mnist", "cifar10", "synthetic")
TEXT_DATASETS = ("sotu", "shakespeare", "text")
# A text data set makes the experiment a language-modelling one (engine/tasks.py).
# Fields that only text data sets read, and the one only image data sets read.
_TEXT_ONLY = ("path", "holdout_every", "max_documents", "max_bytes", "chunk_bytes", "tokenizer",
              "vocab_size")


class DataConfig(_Section):
    name: str = Field("mnist", description="Data set: mnist, fashion_mnist, cifar10 or synthetic "
                      "(a tiny generated set for smoke tests); text: sotu (State of the Union "
                      "addresses), shakespeare (the plays) or text (your own, data.path); with "
                      "`factory`, only a label.")
    root: str = Field("data", description="Folder holding downloaded data sets.", **_NOT_HASHED)
    val_size: int = Field(5000, ge=0, description="Examples held out of the training set.")
    factory: str | None = Field(None, description="'pkg.module:function' returning your data.")
    options: dict[str, Any] = Field(default_factory=dict,
                                    description="Keyword arguments for the data set or factory.")
    # Text only. The path is where, not what: the experiment hash covers the content instead.
    path: str | None = Field(None, description="name 'text': a UTF-8 text file, a folder of .txt "
                             "files (one document each) or a file:// URI.", **_NOT_HASHED)
    holdout_every: int = Field(10, ge=3, le=10_000, description="Text: of every N documents in "
                               "name order, the second-last goes to validation and the last to test.")
    max_documents: int | None = Field(None, ge=3, description="Text: keep only the first N "
                                      "documents in name order (whole documents; quick runs).")
    max_bytes: int | None = Field(None, ge=1, description="Text: keep the first documents in name "
                                  "order whose UTF-8 bytes add up to at most this (quick runs).")
    chunk_bytes: int = Field(65_536, ge=256, le=1 << 30, description="Text: a single file is cut "
                             "into documents of about this many UTF-8 bytes, at line ends.")
    tokenizer: Literal["byte", "bpe"] = Field("byte", description="Text: 'byte' (256 ids, nothing "
                                              "to train) or 'bpe' (byte-level BPE trained on the "
                                              "training split).")
    vocab_size: int = Field(1024, ge=257, le=65_536, description="Text, tokenizer 'bpe': "
                            "vocabulary size (256 bytes + merges).")

    @model_validator(mode="after")
    def _known_name(self) -> "DataConfig":
        if self.factory is None and self.name not in BUILTIN_DATASETS + TEXT_DATASETS:
            # Raised with loc ("name",) so the message names `data.name`, like a Literal would.
            expected = ", ".join(repr(n) for n in BUILTIN_DATASETS + TEXT_DATASETS)
            raise ValidationError.from_exception_data(type(self).__name__, [InitErrorDetails(
                type="literal_error", loc=("name",), input=self.name,
                ctx={"expected": f"{expected} (or set data.factory)"})])
        return self

    @model_validator(mode="after")
    def _fields_fit_the_kind(self) -> "DataConfig":
        # Compared with the defaults, not with the keys given: a resolved config (every field
        # written out) must load again.
        changed = {f for f, info in type(self).model_fields.items()
                   if getattr(self, f) != info.get_default(call_default_factory=True)}
        text = self.factory is None and self.name in TEXT_DATASETS
        misplaced = [f for f in _TEXT_ONLY if f in changed and not text]
        if misplaced:
            raise _field_error(misplaced[0], getattr(self, misplaced[0]), "only for text data sets "
                               f"({', '.join(TEXT_DATASETS)})")
        if text and "val_size" in changed:
            raise _field_error("val_size", self.val_size, "not for text data sets (whole documents "
                               "are held out: data.holdout_every)")
        if text and (self.name == "text") != (self.path is not None):
            raise _field_error("path", self.path, "required for name 'text' (a UTF-8 text file or "
                               "folder)" if self.name == "text" else f"not for name {self.name!r}")
        if "vocab_size" in changed and self.tokenizer != "bpe":
            raise _field_error("vocab_size", self.vocab_size, "only with data.tokenizer 'bpe'")
        return self


def _field_error(field: str, value: Any, msg: str) -> ValidationError:
    # loc (field,) so the one-line message names `data.<field>`.
    return ValidationError.from_exception_data("DataConfig", [InitErrorDetails(
        type="value_error", loc=(field,), input=value, ctx={"error": ValueError(msg)})])


class ModelConfig(_Section):
    name: str = Field("lenet_300_100", description="Registered model name (see models.MODELS).")
    factory: str | None = Field(None, description="'pkg.module:function' building your model.")
    options: dict[str, Any] = Field(default_factory=dict, description="Builder keyword arguments.")
    exclude: list[str] = Field(default_factory=list,
                               description="Module names whose weights are never pruned.")
    # Empty by default, so every older config keeps its hash (defaults are left out of it).
    also_prune: list[Literal["embeddings", "norms", "biases"]] = Field(
        default_factory=list, description="Parameters pruned beside the Linear/Conv weights: "
        "'embeddings' (token and position tables; a tied output head shares the token table's "
        "mask), 'norms' (normalisation scales), 'biases' (every bias). Weight granularity only.")

    @field_validator("also_prune")
    @classmethod
    def _once_each(cls, kinds: list[str]) -> list[str]:
        if len(set(kinds)) != len(kinds):
            raise ValueError("must not repeat a kind")
        return kinds


class TrainConfig(_Section):
    optimizer: Literal["adam", "adamw", "sgd"] = Field("adam", description="Optimizer ('adamw': "
                                                       "decoupled weight decay, for transformers).")
    lr: float = Field(1.2e-3, gt=0, le=10, description="Learning rate.")
    momentum: float = Field(0.0, ge=0, lt=1, description="SGD momentum.")
    weight_decay: float = Field(0.0, ge=0, description="L2 weight decay.")
    batch_size: int = Field(60, ge=1, description="Examples (language models: windows of "
                            "`context` tokens) per optimizer step.")
    beta2: float = Field(0.999, gt=0, lt=1, description="Adam/AdamW second-moment decay "
                         "(nanoGPT uses 0.99 for small character-level models).")
    schedule: Literal["constant", "cosine"] = Field("constant", description="Learning rate over "
                                                    "the run: constant, or linear warm-up then "
                                                    "cosine decay to `min_lr_fraction` × lr.")
    warmup_iterations: int = Field(0, ge=0, description="Linear warm-up steps ('cosine').")
    min_lr_fraction: float = Field(0.1, ge=0, le=1, description="Final lr as a fraction of lr "
                                   "('cosine').")
    grad_clip: float | None = Field(None, gt=0, description="Clip the gradient's global L2 norm "
                                    "to this value; None: no clipping.")
    context: int = Field(64, ge=2, le=65536, description="Language models: tokens in a training "
                         "window (the model's positions); batches are seeded random windows of "
                         "context + 1 tokens of the training stream.")
    eval_tokens: int | None = Field(16384, ge=1, description="Language models: tokens of the "
                                    "validation and test splits evaluated (whole windows from "
                                    "each split's start); None: the whole split.")
    threads: int | None = Field(None, ge=1, le=1024, description="CPU threads for training; None "
                                "leaves torch's setting (set OMP_NUM_THREADS=1 on a shared "
                                "machine: two threads on two busy cores ran 30x slower).",
                                **_NOT_HASHED)
    epochs: float | None = Field(None, gt=0, description="Training length in epochs "
                                 "(exclusive with iterations).")
    iterations: int | None = Field(None, ge=1, description="Training length in optimizer steps.")
    eval_every: int = Field(100, ge=1, description="Iterations between validation evaluations.")
    eval_batch_size: int = Field(2048, ge=1, description="Batch size for evaluation only.",
                                 **_NOT_HASHED)
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="'auto' uses CUDA if present.",
                                                  **_NOT_HASHED)
    # How this host computes, not what: not hashed, but recorded with the run folder, and a
    # resume under another device or policy is refused (see execution.py).
    determinism: Literal["strict", "warn", "off"] = Field(
        "warn", description="GPU reproducibility: deterministic kernels, no cuDNN autotuning, no "
        "TF32. 'strict' fails on an op without a deterministic kernel, 'warn' warns and goes on, "
        "'off' keeps torch's fast defaults. CPU results are the same under every policy.",
        **_NOT_HASHED)
    allow_device_change: bool = Field(False, description="Resume a run folder trained on "
                                      "another device (or determinism policy), mixing both in "
                                      "one experiment.", **_NOT_HASHED)
    # Where a stopped level resumes from, not what it computes: a resumed level ends
    # bit-identical on CPU to an uninterrupted one (see engine/progress.py).
    checkpoint_every: int = Field(1000, ge=0, description="Iterations between progress "
                                  "checkpoints of a level (weights, optimizer, RNG states, data "
                                  "position) that a stopped level resumes from; 0: none, a "
                                  "stopped level starts again.", **_NOT_HASHED)
    upload_every_s: float = Field(300.0, ge=0, description="Seconds between uploads of the "
                                  "progress checkpoint to the artifact store (with tracking on), "
                                  "so another machine can resume; 0: every checkpoint. A SIGTERM "
                                  "always uploads.", **_NOT_HASHED)

    @model_validator(mode="after")
    def _one_length(self) -> "TrainConfig":
        if (self.epochs is None) == (self.iterations is None):
            raise ValueError("set exactly one of train.epochs or train.iterations")
        return self


class PruneConfig(_Section):
    # How much of an experiment to run (levels, replicates, variants) is not hashed: no
    # single (replicate, level, variant) result depends on it, so asking for more levels or
    # replicates later reuses everything already trained.
    levels: int = Field(5, ge=0, le=100, description="Pruning levels after the dense level 0.",
                        **_NOT_HASHED)
    fraction: float = Field(0.2, gt=0, lt=1, description="Fraction of *remaining* weights "
                            "pruned per level.")
    output_fraction: float | None = Field(None, gt=0, lt=1, description="Rate for the output "
                                          "layer; default half of `fraction` (layer-wise). With "
                                          "scope 'global', set: the output layer is pruned on "
                                          "its own at this rate while the others compete.")
    layer_fractions: dict[str, Annotated[float, Field(ge=0, lt=1)]] = Field(
        default_factory=dict, description="Per-layer rates by weight name or module-type "
        "prefix ('conv', 'linear'); a weight name wins over its type.")
    scope: Literal["layerwise", "global"] = Field("layerwise", description="Who competes.")
    schedule: Literal["iterative", "oneshot"] = Field("iterative", description="'oneshot' "
                                                     "prunes the dense net straight to each level's density.")
    rewind_iteration: int | None = Field(
        None, ge=0, description="Rewind survivors to weights at this iteration of the dense run "
        "(0 = original init). Unset: 0 for image classification, late rewinding to 5% of "
        "training for language models (transformer tickets need it).",
        json_schema_extra={"hash_default": 0})
    pattern: Literal["unstructured", "2:4"] = Field("unstructured", description="'2:4' adds "
                                                    "semi-structured sparsity for GPU serving.")
    granularity: Literal["weight", "neuron", "channel", "head", "head_neuron"] = Field(
        "weight", description="What a level removes: single weights; whole neurons (Linear rows, "
        "with their outgoing weights; in a transformer, MLP hidden units); whole channels (Conv "
        "filters) and hidden neurons; whole attention heads (transformers); or 'head_neuron', "
        "heads and MLP hidden units together, each at `fraction` per block. Structured "
        "tickets compact into smaller dense networks; the output layer keeps every unit.")
    unit_norm: Literal["l1", "l2"] = Field("l1", description="Structured granularities: a unit's "
                                           "score, the norm of its incoming weights.")

    @model_validator(mode="after")
    def _structured_alone(self) -> "PruneConfig":
        if self.granularity != "weight" and self.pattern != "unstructured":
            raise ValueError(f"granularity {self.granularity!r} cannot take pattern "
                             f"{self.pattern!r} (a weight pattern; use granularity 'weight')")
        return self


class ExperimentConfig(_Section):
    name: str = Field("imp", min_length=1, description="Human-readable experiment name.",
                      **_NOT_HASHED)
    seed: int = Field(0, ge=0, description="Base seed; replicate r uses seed + r.")
    replicates: int = Field(1, ge=1, le=100, description="Seeds to run.", **_NOT_HASHED)
    variants: list[Literal["ticket", "random_reinit", "random_prune"]] = Field(
        default_factory=lambda: ["ticket", "random_reinit"], description="What each level trains.",
        **_NOT_HASHED)
    output_dir: str = Field("runs", description="Local run directory root.", **_NOT_HASHED)
    benchmark: bool = Field(False, description="Benchmark every level's ticket at the end.",
                            **_NOT_HASHED)

    @field_validator("variants")
    @classmethod
    def _ticket_first(cls, variants: list[str]) -> list[str]:
        if "ticket" not in variants:
            raise ValueError("must include 'ticket' (it is what the next level prunes)")
        if len(set(variants)) != len(variants):
            raise ValueError("must not repeat a variant")
        return variants


class GateConfig(_Section):
    max_accuracy_drop: float = Field(2.0, ge=0, description="Accuracy points a ticket may lose "
                                     "vs dense (mean over replicates).", **_NOT_HASHED)
    max_loss_delta: float | None = Field(None, ge=0, description="Largest allowed rise in test "
                                         "loss vs dense; None disables.", **_NOT_HASHED)
    max_bpb_increase: float = Field(0.05, ge=0, description="Language models: bits per byte "
                                    "(validation and test, mean over replicates) a ticket may "
                                    "add over dense.", **_NOT_HASHED)
    require_beats_random: bool = Field(True, description="Ticket must beat random re-init at "
                                       "the same level.", **_NOT_HASHED)
    release_min_sparsity: float = Field(0.0, ge=0, le=1, description="Release check: the champion "
                                        "must reach at least this sparsity.", **_NOT_HASHED)


class TrackingConfig(_Section):
    system_metrics: bool = Field(False, description="Log CPU/GPU/memory on parent runs.",
                                 **_NOT_HASHED)
    register_model: bool = Field(True, description="Register ticket candidates in the model registry.",
                           **_NOT_HASHED)


class ServingConfig(_Section):
    """How `experiment.benchmark` times and prices a language model's levels (tokens per second,
    dollars per million generated tokens). Quick by default: seconds per level at width 128."""
    prompt_tokens: int = Field(32, ge=1, le=65_536, description="Language models: prefill prompt "
                               "length in tokens (cut to half the model's context).", **_NOT_HASHED)
    new_tokens: int = Field(32, ge=2, le=65_536, description="Language models: tokens decoded per "
                            "request (cut so prompt + new tokens fit the context).", **_NOT_HASHED)
    batch_sizes: list[Annotated[int, Field(ge=1, le=4096)]] = Field(
        default_factory=lambda: [1, 8], min_length=1, description="Language models: batch sizes "
        "timed (prompts per request).", **_NOT_HASHED)
    trials: int = Field(3, ge=1, le=1000, description="Language models: interleaved timing rounds "
                        "per level (dense and every format take a turn each round).", **_NOT_HASHED)
    threads: int | None = Field(None, ge=1, le=1024, description="Language models: torch "
                                "threads for dense and every format alike (None: all cores, as a "
                                "deployment would; 1 on a shared machine, where idle threads "
                                "wait on busy cores).", **_NOT_HASHED)
    node: Literal["cpu", "gpu"] = Field("cpu", description="Instance whose on-demand list price "
                                        "turns tokens/s into dollars: cpu = AWS c7i.large "
                                        "($0.08925/h), gpu = AWS g5.xlarge ($1.006/h); us-east-1 "
                                        "Linux prices of 2024-06, from memory.", **_NOT_HASHED)
    usd_per_hour: float | None = Field(None, gt=0, le=10_000, description="Instance price in US "
                                       "dollars per hour instead of the node's list price.",
                                       **_NOT_HASHED)


class Config(_Section):
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(epochs=1))
    prune: PruneConfig = Field(default_factory=PruneConfig)
    experiment: ExperimentConfig = Field(default_factory=ExperimentConfig)
    gate: GateConfig = Field(default_factory=GateConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    serving: ServingConfig = Field(default_factory=ServingConfig)

    @model_validator(mode="after")
    def _task_defaults(self) -> "Config":
        """Fill what the task decides when unset: the rewind point (late for transformers)."""
        if self.prune.rewind_iteration is not None:
            return self
        rewind = 0
        if self.data.name in TEXT_DATASETS and self.train.iterations is not None:
            rewind = max(1, self.train.iterations // 20)  # 5% of training (Frankle et al. 2020)
        # Frozen sections: the resolved value is set once, here, before anyone reads it.
        object.__setattr__(self, "prune", self.prune.model_copy(update={"rewind_iteration": rewind}))
        return self

    @property
    def task(self) -> str:
        """'language_model' for a text data set, else 'image_classification'."""
        return "language_model" if self.data.name in TEXT_DATASETS else "image_classification"

    def hash(self) -> str:
        """12 hex chars naming the experiment: sha256 of the hashed, non-default fields."""
        return hashlib.sha256(canonical_json(self).encode()).hexdigest()[:12]

    def flat(self) -> dict[str, Any]:
        """Resolved config flattened to `section.key` → value (for MLflow params)."""
        return _flatten(self.model_dump(mode="json"))


def _hashed_fields(model: BaseModel) -> dict[str, Any]:
    out = {}
    for name, info in type(model).model_fields.items():
        extra = info.json_schema_extra or {}
        if isinstance(extra, dict) and extra.get("hashed") is False:
            continue
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            sub = _hashed_fields(value)
            if sub:
                out[name] = sub
        elif value != _hash_default(info):
            out[name] = value
    return out


def _hash_default(info: Any) -> Any:
    """The value a field is left out of the hash at: its default, or for a field whose default
    the task resolves (None → a value), the value every older config had."""
    extra = info.json_schema_extra or {}
    if isinstance(extra, dict) and "hash_default" in extra:
        return extra["hash_default"]
    return info.get_default(call_default_factory=True)


def canonical_json(cfg: Config) -> str:
    # Compared field by field against defaults, so leaving `train` out and writing
    # `train: {epochs: 1}` (the section default) hash the same.
    fields = _hashed_fields(cfg)
    if cfg.data.name == "text" and cfg.data.factory is None:
        # Your own text is identified by its content, not by where it lies.
        fields.setdefault("data", {})["content_sha256"] = content_digest(cfg.data.path)
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and all(isinstance(x, str) for x in v):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _format_error(exc: ValidationError, source: str) -> str:
    err = exc.errors()[0]
    path = ".".join(str(p) for p in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    elif "input" in err and err["type"] not in ("missing",) and not isinstance(err["input"], dict):
        got = repr(err["input"])
        msg = f"{msg} (got {got if len(got) <= 200 else got[:200] + '...'})"
    more = f" (+{len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    where = f"{source}: " if source else ""
    # One line, whatever the keys hold (a YAML key may contain a line break).
    return " ".join(f"{where}{path or 'config'}: {msg}{more}".splitlines())


class _OverrideLoader(yaml.SafeLoader):
    """YAML 1.1 without base-60 numbers: `2:4` stays the string '2:4' (YAML 1.1 reads 124)."""


_NUMBER_TAGS = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
_OverrideLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in _NUMBER_TAGS]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
# PyYAML's own int and float patterns with their base-60 alternatives left out.
_OverrideLoader.add_implicit_resolver(_NUMBER_TAGS[0], re.compile(
    r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"))
_OverrideLoader.add_implicit_resolver(_NUMBER_TAGS[1], re.compile(
    r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?|\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?"
    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"), list("-+0123456789."))


def parse_override(item: str) -> tuple[list[str], Any]:
    """'train.lr=0.001' → (['train', 'lr'], 0.001); the value is parsed as a YAML scalar
    (without YAML 1.1's base-60 numbers, so `prune.pattern=2:4` needs no quotes)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected section.key=value")
    try:
        value = yaml.load(raw, Loader=_OverrideLoader) if raw.strip() else None
    except yaml.YAMLError:
        raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML") from None
    return key.strip().split("."), value


# Far beyond any real config; a YAML alias bomb ("billion laughs") expands past it at once.
MAX_VALUES, MAX_DEPTH = 100_000, 50


def check_size(value: Any, where: str) -> None:
    """Refuse a value with more than MAX_VALUES items or nested deeper than MAX_DEPTH, before
    anything copies, validates or hashes it (YAML aliases make a tiny file expand without
    bound)."""
    stack, seen = [(value, 0)], 0
    while stack:
        node, depth = stack.pop()
        seen += 1
        if seen > MAX_VALUES or depth > MAX_DEPTH:
            raise ConfigError(f"{where}: more than {MAX_VALUES} values or nested deeper than "
                              f"{MAX_DEPTH} (a YAML alias bomb?); not a config")
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for kv in node.items() for v in kv)
        elif isinstance(node, (list, tuple, set)):
            stack.extend((v, depth + 1) for v in node)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    # Deep copy, so the caller's dict is not modified; YAML dates and the like become text.
    raw = json.loads(json.dumps(raw, default=str))
    for item in overrides:
        try:
            path, value = parse_override(item)
        except RecursionError:
            raise ConfigError(f"--set {item.partition('=')[0].strip()}: value nested too "
                              "deeply") from None
        if not all(part.strip() for part in path):
            raise ConfigError(f"--set {'.'.join(path)!r}: empty key; expected section.key=value")
        check_size(value, f"--set {'.'.join(path)}")
        node = raw
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {'.'.join(path)}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or defaults when path is None), apply overrides, validate."""
    raw: dict[str, Any] = {}
    source = ""
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read config ({exc.strerror})") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not a YAML config (not UTF-8 text)") from None
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            line = getattr(getattr(exc, "problem_mark", None), "line", None)
            at = f" at line {line + 1}" if line is not None else ""
            raise ConfigError(f"{path}: not valid YAML{at}") from None
        except RecursionError:
            raise ConfigError(f"{path}: not a config (nested too deeply)") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
        check_size(raw, str(path))
    raw = apply_overrides(raw, overrides or [])
    return config_from_dict(raw, source)


def config_from_dict(raw: dict[str, Any], source: str = "") -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, source)) from None


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML (every field, defaults included)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
