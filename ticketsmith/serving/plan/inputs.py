"""Natural input → model input, and logits → what the caller asked for: torch-free.

The input contract of an image plan (a spec with the data set's mean and std), per request:

    pixels (default)  uint8 or integer pixels 0..255, or floats 0..1 or 0..255 (a sample with
                      any value above 1 is read as 0..255); the normalisation is applied here
    normalized        floats already normalised with the data set's mean and std, as a
                      torchvision pipeline's `Normalize(mean, std)` writes them; taken as is

Pixels outside that range (negative, above 255, not finite) are refused with one line: a
normalised batch read as pixels would be answered, wrongly and silently (a sample with a
value above 1 would be read as 0..255). Input that is not images is taken as float features.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from ticketsmith.serving.plan.layout import PlanError

INPUT_FORMS = ("pixels", "normalized")
_PIXELS = "pixels 0..255 (integers or floats) or 0..1 (floats)"


def to_model_input(data: Any, spec: dict[str, Any], feature_major: bool = False,
                   form: str = "pixels") -> np.ndarray:
    """What a user has → the float32 (N, *shape) the network was trained on.

    Images (a spec with mean/std): `form` "pixels" or "normalized" (the module's contract);
    flat (N, C*H*W), shaped (N, H, W) for one channel, (N, C, H, W) or channels-last
    (N, H, W, C). Other inputs are taken as float features, flat or shaped.
    feature_major: return (C*H*W, N) in C order instead, written in the normalising pass.
    PlanError (one line) for input outside the contract.
    """
    if form not in INPUT_FORMS:
        raise PlanError(f"input: expected {' or '.join(INPUT_FORMS)}, got {form!r}")
    shape = tuple(spec["shape"])
    flat, n = _batch(data, shape)
    if spec.get("mean") is None or form == "normalized":
        _check_finite(flat)
        if feature_major:
            return _transposed_f32(flat)
        return flat.astype(np.float32).reshape(n, *shape)
    factor = _pixel_factor(flat)
    scale, shift = _affine(shape, tuple(spec["mean"]), tuple(spec["std"]))
    if factor is not None:
        scale = scale * 255.0  # the scale maps 0..255 pixels; the factor gives 0..1
    if feature_major:
        out = _transposed_f32(flat)
        if factor is not None:
            out *= factor
        out *= scale[:, None]
        out += shift[:, None]
        return out
    out = flat.astype(np.float32)
    if factor is not None:
        out *= factor[:, None]
    out *= scale
    out += shift
    return out.reshape(n, *shape)


def _batch(data: Any, shape: tuple[int, ...]) -> tuple[np.ndarray, int]:
    """(N, features) of natural input, flat or shaped, one sample or a batch."""
    a = np.asarray(getattr(data, "values", data))  # a pandas DataFrame arrives via .values
    size = math.prod(shape)
    if a.dtype == object or not (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
        raise PlanError(f"input: expected numbers (images of shape {list(shape)}), got {a.dtype}")
    if a.ndim == 1 and a.size == size:
        a = a[None]
    if a.ndim < 2 or math.prod(a.shape[1:]) != size:
        raise PlanError(f"input: expected a batch of {size} values per sample (shape "
                        f"{list(shape)}, flat or shaped), got an array of shape {list(a.shape)}")
    if len(shape) == 3 and shape[0] > 1 and a.shape[1:] == (shape[1], shape[2], shape[0]):
        a = a.transpose(0, 3, 1, 2)  # channels-last images
    return a.reshape(len(a), size), len(a)


def _check_finite(flat: np.ndarray) -> None:
    if flat.size and np.issubdtype(flat.dtype, np.floating) and not (
            np.isfinite(flat.min()) and np.isfinite(flat.max())):  # NaN propagates to both
        raise PlanError("input: expected finite numbers, got NaN or infinity")


def _pixel_factor(flat: np.ndarray) -> np.ndarray | None:
    """Per sample, the factor that brings its pixels to 0..1 (float32): 1/255 for 0..255 floats
    (any value above 1), 1 for 0..1 floats; None for integers (0..255 by type, folded into the
    scale). PlanError for pixels outside 0..255: negative (normalised input), above 255, NaN
    or infinite."""
    if flat.dtype == np.uint8 or flat.dtype == bool:
        return None  # no pixel can fall outside 0..255
    top = flat.max(1, initial=0)
    lo, hi = flat.min(initial=0), top.max(initial=0)
    if not (lo >= 0 and hi <= 255):  # NaN fails both comparisons
        got = ("NaN or infinity" if not (np.isfinite(lo) and np.isfinite(hi))
               else f"values from {lo:.4g} to {hi:.4g}")
        raise PlanError(f"input: expected {_PIXELS}, got {got}; for input already normalised "
                        "with the data set's mean and std pass params={\"input\": "
                        "\"normalized\"}")
    if np.issubdtype(flat.dtype, np.integer):
        return None
    return np.where(top > 1.0, 1 / 255.0, 1.0).astype(np.float32)


def _transposed_f32(flat: np.ndarray) -> np.ndarray:
    """(N, F) -> float32 (F, N) in C order (the numpy route's kernels read rows; torch would
    copy an F-ordered input). Narrow input is transposed before the cast: fewer bytes move."""
    if flat.dtype.itemsize <= 4:
        return np.ascontiguousarray(flat.T).astype(np.float32)  # a copy: normalised in place
    return np.ascontiguousarray(flat.astype(np.float32).T)


_AFFINE: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}


def _affine(shape: tuple[int, ...], mean: tuple[float, ...], std: tuple[float, ...]
            ) -> tuple[np.ndarray, np.ndarray]:
    """Per feature (channel-major), float32: pixel 0..255 -> (pixel / 255 - mean) / std as
    pixel * scale + shift. Cached: a request pays two multiply-adds, not their set-up."""
    key = (shape, mean, std)
    if key not in _AFFINE:
        per = math.prod(shape) // len(std)
        scale = np.repeat(1.0 / (255.0 * np.asarray(std, np.float64)), per)
        shift = np.repeat(-np.asarray(mean, np.float64) / np.asarray(std, np.float64), per)
        _AFFINE[key] = (scale.astype(np.float32), shift.astype(np.float32))
    return _AFFINE[key]


def input_spec(meta: dict[str, Any]) -> dict[str, Any]:
    """The natural-input spec of a checkpoint: its input shape and its data set's
    normalisation (None for data that are not images)."""
    from ticketsmith.engine.data import normalisation

    norm = normalisation(meta.get("dataset", ""))
    return {"shape": [int(s) for s in meta["input_shape"]],
            "mean": list(norm[0]) if norm else None, "std": list(norm[1]) if norm else None,
            "dtype": "float32"}


def finish(logits: np.ndarray, output: str) -> np.ndarray:
    """Logits → what the caller asked for: probabilities (default), labels or logits."""
    if output == "labels":
        return logits.argmax(1)
    if output == "logits":
        return logits
    if output != "probabilities":
        raise PlanError(f"output: expected probabilities, labels or logits, got {output!r}")
    return softmax(logits)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(1, keepdims=True)
    return z
