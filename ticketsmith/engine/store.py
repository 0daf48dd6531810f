"""The local run directory: where the engine keeps masks, checkpoints and metrics.

Layout (one experiment = one config hash):

    <root>/<hash>/config.yaml
    <root>/<hash>/replicate_<r>/init.safetensors          weights at iteration 0
    <root>/<hash>/replicate_<r>/rewind.safetensors        weights at the rewind iteration
    <root>/<hash>/replicate_<r>/level_<k>/<variant>/checkpoint.safetensors
    <root>/<hash>/replicate_<r>/level_<k>/<variant>/curve.json
    <root>/<hash>/replicate_<r>/level_<k>/<variant>/metrics.json   written last = done
    <root>/<hash>/replicate_<r>/level_<k>/<variant>/progress.pt    mid-level progress (until done)
    <root>/<hash>/replicate_<r>/level_<k>/<variant>/benchmark.json serving benchmark (optional)

Every path in a run folder is a method here; no other module spells one out.

Every file is written atomically, so a run killed mid-level leaves that level unfinished
(no metrics.json) and it is trained again on resume, from its progress checkpoint if one
was written.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ticketsmith.base.files import atomic_write_text

BENCHMARK_FILE = "benchmark.json"  # a checkpoint's serving benchmark, and its MLflow artifact


@dataclass(frozen=True)
class RunStore:
    root: Path  # <output_dir>/<hash>

    def replicate_dir(self, replicate: int) -> Path:
        return self.root / f"replicate_{replicate}"

    def run_dir(self, replicate: int, level: int, variant: str) -> Path:
        return self.replicate_dir(replicate) / f"level_{level}" / variant

    def init_path(self, replicate: int) -> Path:
        return self.replicate_dir(replicate) / "init.safetensors"

    def rewind_path(self, replicate: int) -> Path:
        return self.replicate_dir(replicate) / "rewind.safetensors"

    def checkpoint_path(self, replicate: int, level: int, variant: str) -> Path:
        return self.run_dir(replicate, level, variant) / "checkpoint.safetensors"

    def progress_path(self, replicate: int, level: int, variant: str) -> Path:
        """The progress checkpoint of a level in training (see progress.py); deleted once the
        level's final checkpoint is written."""
        return self.run_dir(replicate, level, variant) / "progress.pt"

    def metrics_path(self, replicate: int, level: int, variant: str) -> Path:
        return self.run_dir(replicate, level, variant) / "metrics.json"

    def curve_path(self, replicate: int, level: int, variant: str) -> Path:
        return self.run_dir(replicate, level, variant) / "curve.json"

    def samples_path(self, replicate: int, level: int, variant: str) -> Path:
        """Language models: continuations of fixed prompts, for a person to read."""
        return self.run_dir(replicate, level, variant) / "samples.txt"

    def benchmark_path(self, replicate: int, level: int, variant: str) -> Path:
        """The serving benchmark of a checkpoint, written next to it."""
        return self.run_dir(replicate, level, variant) / BENCHMARK_FILE

    def serving_path(self, replicate: int, level: int, variant: str) -> Path:
        """The deployable serving plan the benchmark chose (a folder), next to the checkpoint."""
        return self.serving_next_to(self.checkpoint_path(replicate, level, variant))

    @staticmethod
    def serving_next_to(checkpoint: Path) -> Path:
        """The serving plan folder of a checkpoint file in a run folder."""
        return Path(checkpoint).parent / "serving"

    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    @property
    def tokenizer_dir(self) -> Path:
        """Language models: the experiment's tokenizer, saved once (what a served model needs)."""
        return self.root / "tokenizer"

    @staticmethod
    def tokenizer_next_to(checkpoint: Path) -> Path:
        """The experiment's tokenizer folder, seen from a run's checkpoint file."""
        return RunStore(Path(checkpoint).parents[3]).tokenizer_dir

    def is_done(self, replicate: int, level: int, variant: str) -> bool:
        return (self.metrics_path(replicate, level, variant).is_file()
                and self.checkpoint_path(replicate, level, variant).is_file())

    def read_metrics(self, replicate: int, level: int, variant: str) -> dict[str, Any]:
        return json.loads(self.metrics_path(replicate, level, variant).read_text())

    def write_json(self, path: Path, payload: Any) -> None:
        atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True))

    def records(self) -> list[dict[str, Any]]:
        """Every finished (replicate, level, variant) record, in order."""
        found = [json.loads(p.read_text()) for p in self.root.glob("replicate_*/level_*/*/metrics.json")]
        return sorted(found, key=lambda r: (r["replicate"], r["level"], r["variant"]))
