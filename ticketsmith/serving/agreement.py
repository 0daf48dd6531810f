"""Whether a format's outputs agree with the masked model's: the one check and its bounds.

The benchmark (every format, before it is timed), the serving plan (every route, before it
ships and again at registration) and `ticketsmith export` (before the file is written) all
judge outputs here. Numpy only: the serving plan's check runs where torch may be absent.

    exact    max |output - masked output| <= EXACT_RTOL x max(1, max |masked output|)
    inexact  relative L2 error <= rtol (INEXACT_RTOL for int8 weights) and, where asked,
             argmax agreement >= INEXACT_AGREEMENT on the probe
    language model, inexact (int8)  bits per byte on fixed text at most LM_BPB_DELTA above
             the masked model's, and its greedy next token the masked model's on at least
             LM_GREEDY_AGREEMENT of the positions of the masked model's greedy continuations
"""
from __future__ import annotations

import numpy as np

EXACT_RTOL = 1e-4  # float rounding of a different summation order, relative to the logits
# An int8 route must agree with the masked model's labels on this share of the probe and
# stay within this relative L2 error of its outputs (the benchmark also gates its accuracy).
INEXACT_AGREEMENT, INEXACT_RTOL = 0.98, 0.1
# A language model's int8 route: bits per byte may rise by this much (bits/byte; under half
# the gates' default `max_bpb_increase` of 0.05, so quantization leaves most of the quality
# budget to pruning) and its greedy token must match on this share of positions
# (teacher-forced on the masked model's continuations).
LM_BPB_DELTA, LM_GREEDY_AGREEMENT = 0.02, 0.9


def _comparable(got: np.ndarray, ref: np.ndarray) -> str | None:
    if got.shape != ref.shape:
        return f"output shape {got.shape} differs from the masked model's {ref.shape}"
    if not np.isfinite(got).all():
        return "outputs are not finite"
    return None


def argmax_agreement(got: np.ndarray, ref: np.ndarray) -> float:
    """Share of samples whose predicted class is the masked model's (0 when shapes differ)."""
    return float((got.argmax(1) == ref.argmax(1)).mean()) if got.shape == ref.shape else 0.0


def exact(got: np.ndarray, ref: np.ndarray, rtol: float = EXACT_RTOL
          ) -> tuple[dict[str, float], str | None]:
    """({'max_abs_error', 'argmax_agreement', 'tolerance'}, None when they agree to float
    rounding, else why not in one phrase)."""
    tol = rtol * max(1.0, float(np.abs(ref).max(initial=0)))
    record = {"max_abs_error": float("inf"), "argmax_agreement": argmax_agreement(got, ref),
              "tolerance": tol}
    if (why := _comparable(got, ref)) is not None:
        return record, why
    record["max_abs_error"] = err = float(np.abs(got.astype(np.float64) - ref).max(initial=0))
    if err > tol:
        return record, (f"max |output difference| {err:.3g} exceeds the tolerance {tol:.3g} "
                        f"(argmax agreement {record['argmax_agreement']:.2%})")
    return record, None


def inexact(got: np.ndarray, ref: np.ndarray, rtol: float = INEXACT_RTOL,
            min_agreement: float = INEXACT_AGREEMENT) -> tuple[dict[str, float], str | None]:
    """({'relative_error', 'argmax_agreement', 'max_abs_error'}, None when within `rtol`
    relative L2 error and at least `min_agreement` argmax agreement, else why not)."""
    record = {"relative_error": float("inf"), "argmax_agreement": argmax_agreement(got, ref),
              "max_abs_error": float("inf")}
    if (why := _comparable(got, ref)) is not None:
        return record, why
    diff = got.astype(np.float64) - ref
    record["max_abs_error"] = float(np.abs(diff).max(initial=0))
    record["relative_error"] = rel = float(np.linalg.norm(diff)
                                           / max(float(np.linalg.norm(ref)), 1e-12))
    if rel > rtol or record["argmax_agreement"] < min_agreement:
        return record, (f"relative error {rel:.3g} (tolerance {rtol:.3g}), argmax agreement "
                        f"{record['argmax_agreement']:.2%} (at least {min_agreement:.0%})")
    return record, None


def language_model(bpb: float, ref_bpb: float, greedy_agreement: float,
                   max_delta: float = LM_BPB_DELTA, min_agreement: float = LM_GREEDY_AGREEMENT
                   ) -> tuple[dict[str, float], str | None]:
    """({'bits_per_byte', 'masked_bits_per_byte', 'bpb_delta', 'greedy_agreement'}, None when
    the bits-per-byte rise is within `max_delta` and greedy agreement at least
    `min_agreement`, else why not)."""
    delta = bpb - ref_bpb
    record = {"bits_per_byte": bpb, "masked_bits_per_byte": ref_bpb, "bpb_delta": delta,
              "greedy_agreement": greedy_agreement}
    if not np.isfinite(bpb) or delta > max_delta or greedy_agreement < min_agreement:
        return record, (f"bits per byte {bpb:.4f} vs masked {ref_bpb:.4f} (+{delta:.4f}, at "
                        f"most +{max_delta}), greedy agreement {greedy_agreement:.2%} (at least "
                        f"{min_agreement:.0%})")
    return record, None
