"""Decode tokens per second of a GPT ticket's ONNX export against torch, side by side.

A GPT with random weights (GPT-2's initialisation: the timing does not depend on what was
learned; width 384, 6 layers, 6 heads, byte vocabulary, context 256) is masked as a
structured ticket (half of every block's heads and MLP units, `lm_serving.structured`),
compacted, exported with its KV cache (`serving.lm_export`) and checked as the CLI checks it.
Then, in interleaved rounds that rotate which goes first, each runtime prefills a prompt and
decodes greedy tokens at batch 1 and 8:

- `torch dense`: the masked model with the KV cache (`engine.generate`), the baseline;
- `torch compacted`: the compacted GPT with the same cache code;
- `onnxruntime`: the exported graph, presents fed back as pasts.

    python benchmarks/lm_onnx.py [--width 384] [--trials 5] [--threads 1]
                                 [--prompt-tokens 128] [--new-tokens 128]

Prints, per runtime and batch, the median decode tokens/s and the median within-round speedup
over torch dense (min-max beside it), dense against itself as the noise floor, and the
environment.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime
import torch

from ticketsmith.engine.generate import Decoder
from ticketsmith.serving.compaction import compact_gpt
from ticketsmith.serving.lm_export import OnnxDecoder, check_lm, lm_onnx_bytes

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lm_serving import gpt, structured  # noqa: E402


@torch.inference_mode()
def torch_decode(model, prompts: torch.Tensor, new: int) -> float:
    """Seconds of `new - 1` greedy decode steps after the prefill (prefill not counted)."""
    dec = Decoder(model)
    tokens = dec.prefill(prompts.tolist(), new).argmax(-1)
    start = time.perf_counter()
    for _ in range(new - 1):
        tokens = dec.step(tokens).argmax(-1)
    return time.perf_counter() - start


def ort_decode(dec: OnnxDecoder, prompts: np.ndarray, new: int) -> float:
    """The same for the exported graph in ONNX Runtime (its prefill starts a fresh cache)."""
    tokens = dec.prefill(prompts)[:, -1].argmax(-1)
    start = time.perf_counter()
    for _ in range(new - 1):
        tokens = dec.step(tokens).argmax(-1)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    masked = structured(gpt(args.width))
    small, compaction = compact_gpt(masked)
    start = time.perf_counter()
    blob = lm_onnx_bytes(small)
    export_s = time.perf_counter() - start
    probe = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(0))
    check = check_lm(blob, masked, probe, 8)
    print(f"width {args.width}: {compaction}; export {export_s:.1f} s, {len(blob) / 1e6:.1f} MB; "
          f"check: prefill {check['prefill_max_abs_error']:.2g}, decode "
          f"{check['decode_max_abs_error']:.2g}, {check['greedy_tokens_identical']} tokens same")
    steps, onnx = args.new_tokens - 1, OnnxDecoder(blob, args.threads)
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        prompts = torch.randint(0, 256, (batch, args.prompt_tokens),
                                generator=torch.Generator().manual_seed(batch))
        runs = {"torch dense": lambda: torch_decode(masked, prompts, args.new_tokens),
                "torch dense (again)": lambda: torch_decode(masked, prompts, args.new_tokens),
                "torch compacted": lambda: torch_decode(small, prompts, args.new_tokens),
                "onnxruntime": lambda: ort_decode(onnx, prompts.numpy(), args.new_tokens)}
        names = list(runs)
        for name in names:  # warm-up
            runs[name]()
        seconds = {n: [] for n in names}
        for r in range(args.trials):
            for name in names[r % len(names):] + names[:r % len(names)]:
                seconds[name].append(runs[name]())
        for name in names:
            ratios = [d / s for d, s in zip(seconds["torch dense"], seconds[name])]
            rate = batch * steps / statistics.median(seconds[name])
            print(f"batch {batch} {name:20s} {rate:8.0f} tokens/s  "
                  f"x{statistics.median(ratios):.2f} of torch dense "
                  f"({min(ratios):.2f}-{max(ratios):.2f})")
    print(f"{args.trials} interleaved rounds of {steps} decode steps after a "
          f"{args.prompt_tokens}-token prompt; torch {torch.__version__}, onnxruntime "
          f"{onnxruntime.__version__}, {args.threads} thread(s), "
          f"{platform.processor() or platform.machine()}")


if __name__ == "__main__":
    main()
