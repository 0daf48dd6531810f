"""`ticketsmith export`: a ticket as a portable model file, checked before it is written.
Parses arguments and calls `ticketsmith.serving.checkpoint_export` (image models) or
`ticketsmith.serving.lm_export` (language models, with the KV cache)."""
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
                   help="image models: the export is checked on the first 1,000 test images "
                        "of the checkpoint's data set when found in this folder, else on seeded "
                        "noise (a language model is checked on seeded random tokens)")
    p.add_argument("--prompt-tokens", type=int, default=None,
                   help="language models only: tokens per prompt the export is checked on "
                        "(default 16, or half the context when shorter)")
    p.add_argument("--decode-steps", type=int, default=None,
                   help="language models only: greedy decode steps checked after the prompt "
                        "(default 8, cut to fit the context)")
    p.add_argument("--allow-factory", action="store_true",
                   help="import the model factory named in the checkpoint's metadata")


def cmd_export(args: argparse.Namespace) -> int:
    """Export a ticket's compacted network as ONNX (a language model with its KV cache),
    checked with ONNX Runtime against the masked model's outputs before it is written."""
    from ticketsmith.base.errors import ConfigError
    from ticketsmith.serving.lm_load import is_checkpoint_of_lm
    from ticketsmith.tracking.benchmarks import resolve_checkpoint

    path = resolve_checkpoint(args.checkpoint)
    if is_checkpoint_of_lm(path):
        from ticketsmith.serving.lm_export import export_lm_checkpoint, format_lm_summary

        print(format_lm_summary(export_lm_checkpoint(
            path, args.output, prompt_tokens=args.prompt_tokens, decode_steps=args.decode_steps,
            allow_factory=args.allow_factory, source=args.checkpoint)))
        return 0
    for flag, value in (("--prompt-tokens", args.prompt_tokens),
                        ("--decode-steps", args.decode_steps)):
        if value is not None:
            raise ConfigError(f"{flag}: only for language-model checkpoints; {args.checkpoint} "
                              "holds an image model")
    from ticketsmith.serving.checkpoint_export import export_checkpoint, format_summary

    print(format_summary(export_checkpoint(path, args.output, data_root=args.data_root,
                                           allow_factory=args.allow_factory,
                                           source=args.checkpoint)))
    return 0
