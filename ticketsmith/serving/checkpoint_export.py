"""`ticketsmith export`: a ticket checkpoint as a portable ONNX file, checked before it is written.

Checkpoint (a local file; the CLI resolves MLflow URIs) → the masked model → its exact
compaction (`compaction`) → ONNX (`export.onnx_bytes`) → ONNX Runtime's outputs on a probe
batch against the masked model's (`agreement.exact`) → the file and a small JSON beside it
saying what input the network expects. Kept apart from `export`, whose ONNX primitives the serving plan uses, so
that those need nothing from the benchmark (which uses the plan).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ticketsmith.engine.checkpoint import model_from_checkpoint
from ticketsmith.engine.data import DATASETS, normalisation
from ticketsmith.engine.models import count_params
from ticketsmith.base.errors import DataError
from ticketsmith.base.files import atomic_write, atomic_write_text
from ticketsmith.base.secrets import redact
# _load_data: how the benchmark finds a checkpoint's test data; one rule for both.
from ticketsmith.serving.benchmark import _load_data, format_bytes
from ticketsmith.serving.compaction import CompactionError, as_chain, compact
from ticketsmith.serving.export import (OPSET, check_outputs, onnx_bytes, onnx_weights,
                                        run_onnx)
from ticketsmith.serving.formats import weight_bytes

PROBE_SIZE = 1000  # examples in the batch the export is checked on


def compacted(model: nn.Module) -> tuple[nn.Module, str, bool]:
    """(network to export, what compaction did, whether it compacted): the exact compaction
    where the model is a chain; the masked model itself, and why, where it is not."""
    chain = as_chain(model)
    if chain is None:
        return model, f"not compacted: {type(model).__name__} is not a straight chain of " \
                      "Linear/Conv2d layers; exported as the masked dense model", False
    try:
        small, summary = compact(chain)
    except CompactionError as exc:
        return model, f"not compacted: {exc}; exported as the masked dense model", False
    return small, summary, True


def probe_batch(meta: dict, data_root: str | Path | None,
                size: int = PROBE_SIZE) -> tuple[torch.Tensor, str]:
    """(inputs, what they are): the first `size` test images of the checkpoint's data set
    where it is found under `data_root` and fits the model (as the benchmark finds them),
    else `size` inputs of seeded noise."""
    name, data = meta.get("dataset"), None
    if data_root is not None and name in DATASETS:
        try:
            data = _load_data(meta, data_root, torch.device("cpu"))
        except DataError:
            pass
    if data is not None:
        x = data.test_x[:size]
        return x, f"the first {len(x):,} {name} test images"
    why = "no data root given" if data_root is None else (
        f"no {name} test data under {data_root} that fit the model" if name in DATASETS
        else f"{name!r} is not a built-in data set")
    g = torch.Generator().manual_seed(0)
    shape = tuple(meta["input_shape"])
    return torch.randn(size, *shape, generator=g), f"{size:,} inputs of seeded noise ({why})"


def default_output(path_or_uri: str | Path) -> Path:
    """`<checkpoint stem>.onnx`, or `<registered model name>.onnx` for a models:/ URI, in the
    current directory."""
    text = str(path_or_uri).rstrip("/")
    if text.startswith("models:/"):
        return Path(f"{text[len('models:/'):].split('@')[0].split('/')[0]}.onnx")
    return Path(f"{Path(text.split('://')[-1]).stem or 'model'}.onnx")


def input_spec(meta: dict) -> dict[str, Any]:
    """What the exported network expects: input `x`, its shape and dtype, and the data set's
    normalisation (None where the data are not normalised here)."""
    norm = normalisation(meta.get("dataset") or "")
    return {"input": {"name": "x", "shape": ["batch", *meta["input_shape"]], "dtype": "float32",
                      "normalisation": None if norm is None else {
                          "dataset": meta["dataset"], "mean": list(norm[0]), "std": list(norm[1]),
                          "applies_to": "pixels scaled to [0, 1], per channel: (x - mean) / std"}},
            "output": {"name": "y", "shape": ["batch", meta["num_classes"]], "is": "logits"}}


def export_checkpoint(path: str | Path, output: str | Path | None = None, *,
                      data_root: str | Path | None = "data",
                      allow_factory: bool | str | None = False,
                      source: str | None = None) -> dict[str, Any]:
    """Export a ticket checkpoint (a local file) as ONNX: its compacted network, checked
    with ONNX Runtime against the masked model on `probe_batch` before it is written.
    source: what the checkpoint was named by (an MLflow URI it was downloaded from; default
    `path`), recorded and used for the default output name.

    Writes `output` (default `default_output`) and `<output>.json` (`input_spec`, the check)
    atomically; returns the summary. ExportError when the export fails or does not match."""
    source = str(source or path)
    model, _, meta = model_from_checkpoint(path, "cpu", allow_factory)
    network, compaction, done = compacted(model)
    blob = onnx_bytes(network, tuple(meta["input_shape"]))
    x, probe = probe_batch(meta, data_root)
    with torch.inference_mode():
        ref = model(x).float().numpy()
    check = check_outputs(run_onnx(blob, x.numpy()), ref)
    out = Path(output) if output is not None else default_output(source)
    summary = {"checkpoint": redact(source), "model": meta["model"], "format": "onnx",
               "opset": OPSET, "compacted": done, "compaction": compaction,
               "onnx_weights": onnx_weights(blob), "dense_weights": count_params(model),
               "onnx_bytes": len(blob), "dense_bytes": weight_bytes(model),
               "probe": probe, **check, **input_spec(meta),
               "path": str(out), "sidecar": f"{out}.json"}
    atomic_write(out, lambda p: p.write_bytes(blob))
    atomic_write_text(Path(f"{out}.json"), json.dumps(
        {k: v for k, v in summary.items() if k not in ("path", "sidecar")}, indent=2))
    return summary


def format_summary(s: dict[str, Any]) -> str:
    """The export in four lines: compaction, size, check, where it went."""
    x = s["input"]
    norm = x["normalisation"]
    expects = f"input x ({', '.join(map(str, x['shape']))}) float32" + (
        f", {norm['dataset']} normalisation mean {norm['mean']} std {norm['std']}" if norm else "")
    return "\n".join([
        f"{s['model']}: {s['compaction']}",
        f"weights: {s['onnx_weights']:,} in the ONNX file vs {s['dense_weights']:,} dense "
        f"({s['onnx_weights'] / s['dense_weights']:.1%}); {format_bytes(s['onnx_bytes'])} "
        f"file vs {format_bytes(s['dense_bytes'])} of dense weights",
        f"checked with ONNX Runtime on {s['probe']}: max |difference| {s['max_abs_error']:.2g} "
        f"(tolerance {s['tolerance']:.2g}), argmax agreement {s['argmax_agreement']:.2%}",
        f"wrote {s['path']} (ONNX opset {s['opset']}; {expects}) and {s['sidecar']}"])
