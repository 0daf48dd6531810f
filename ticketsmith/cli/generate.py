"""`ticketsmith generate`: continue a prompt with a language-model checkpoint. Parses arguments
and calls `ticketsmith.engine.generate` through `ticketsmith.serving.lm_load`."""
from __future__ import annotations

import argparse


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint.safetensors path, runs:/<run id>/<path>, "
                        "models:/<name>@<alias> or any MLflow artifact URI")
    p.add_argument("--prompt", required=True, help="text to continue (not empty)")
    p.add_argument("--max-new-tokens", type=int, default=64,
                   help="tokens to generate (default 64); prompt + these must fit the context")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0 = greedy (default); above 0 samples, seeded by --seed")
    p.add_argument("--top-k", type=int, default=None, help="sample only the k likeliest tokens")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="end the continuation before this text (repeatable)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument("--allow-factory", action="store_true",
                   help="import the model factory named in the checkpoint's metadata")


def cmd_generate(args: argparse.Namespace) -> int:
    """Print a language-model checkpoint's continuation of a prompt (KV-cache decoding)."""
    from ticketsmith.base.errors import ConfigError

    for flag, value, low in (("--max-new-tokens", args.max_new_tokens, 0),
                             ("--temperature", args.temperature, 0),
                             ("--top-k", args.top_k, 1)):
        if value is not None and value < low:
            raise ConfigError(f"{flag}: expected >= {low}, got {value}")
    if not args.prompt:
        raise ConfigError("--prompt: empty; give some text to continue")
    from ticketsmith.engine.generate import Sampling, generate_text
    from ticketsmith.engine.train import resolve_device
    from ticketsmith.serving.lm_load import load_lm
    from ticketsmith.tracking.benchmarks import resolve_checkpoint

    model, tokenizer, _, _ = load_lm(resolve_checkpoint(args.checkpoint),
                                     resolve_device(args.device), args.allow_factory)
    text = generate_text(model, tokenizer, [args.prompt], args.max_new_tokens,
                         Sampling(args.temperature, args.top_k, args.seed), tuple(args.stop))
    print(args.prompt + text[0])
    return 0
