"""Handler of `ticketsmith data`: fetch, verify and describe a text data set."""
from __future__ import annotations

import argparse
import time

from ticketsmith.cli.args import load


def cmd_data(args: argparse.Namespace) -> int:
    """Fetch and verify a config's text data set; print documents, bytes and tokens per split.

    A missing or damaged corpus file is one line naming it (exit 2). The second run reads the
    tokenised splits from the cache under data.root.
    """
    from ticketsmith.base.errors import DataError
    from ticketsmith.engine.text import TEXT_DATASETS, load_text

    cfg = load(args)
    if cfg.data.name == "text":  # a remote source (runs:/, a bucket) is downloaded first
        from ticketsmith.tracking.text_source import resolve_text_source

        cfg = resolve_text_source(cfg)
    if cfg.data.name not in TEXT_DATASETS or cfg.data.factory is not None:
        raise DataError(f"data.name={cfg.data.name!r}: `ticketsmith data` describes text data sets "
                        f"({', '.join(TEXT_DATASETS)})")
    start = time.perf_counter()
    data = load_text(cfg.data)
    seconds = time.perf_counter() - start
    tok = data.tokenizer
    print(f"{data.name} from {data.source}: {tok.name} tokenizer, vocabulary {tok.vocab_size}, "
          f"digest {data.digest[:12]}, loaded in {seconds:.2f} s")
    for split in ("train", "val", "test"):
        n_bytes, n_tokens = data.split_bytes[split], len(getattr(data, split))
        print(f"  {split:5s} {len(data.documents[split]):4d} documents {n_bytes:>11,d} bytes "
              f"{n_tokens:>11,d} tokens ({n_bytes / max(n_tokens, 1):.2f} bytes/token)")
    return 0
