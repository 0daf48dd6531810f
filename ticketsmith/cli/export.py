"""`ticketsmith export`: a ticket as a portable model file, checked before it is written.
Parses arguments and calls `ticketsmith.serving.checkpoint_export`."""
from __future__ import annotations

import argparse


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint.safetensors path, runs:/<run id>/<path>, "
                        "models:/<name>@<alias> or any MLflow artifact URI")
    p.add_argument("--format", default="onnx", choices=["onnx"],
                   help="file format (default onnx: the compacted network, dense and smaller)")
    p.add_argument("--output", default=None,
                   help="file to write (default: <checkpoint stem or registered model name>.onnx "
                        "here); <output>.json beside it says what input the model expects")
    p.add_argument("--data-root", default="data",
                   help="data folder: the export is checked on the first 1,000 test images of "
                        "the checkpoint's data set when found here, else on seeded noise")
    p.add_argument("--allow-factory", action="store_true",
                   help="import the model factory named in the checkpoint's metadata")


def cmd_export(args: argparse.Namespace) -> int:
    """Export a ticket's compacted network as ONNX, checked with ONNX Runtime against the
    masked model's outputs before it is written."""
    from ticketsmith.serving.checkpoint_export import export_checkpoint, format_summary
    from ticketsmith.tracking.benchmarks import resolve_checkpoint

    summary = export_checkpoint(resolve_checkpoint(args.checkpoint), args.output,
                                data_root=args.data_root, allow_factory=args.allow_factory,
                                source=args.checkpoint)
    print(format_summary(summary))
    return 0
