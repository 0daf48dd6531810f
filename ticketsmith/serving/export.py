"""ONNX: the compacted ticket as a portable dense network, checked with ONNX Runtime.

A ticket's compacted network (`compaction.compact`) is dense and smaller than the original,
so any ONNX runtime runs it at its compacted size. The export uses torch's TorchScript-based
exporter (`dynamo=False`): it needs only the `onnx` package, and the graphs here (Linear,
Conv2d, ReLU, MaxPool2d, Flatten, Gather for the input select) are all it must handle.

`ticketsmith export` (`checkpoint_export`) and the serving plan both build on these. Only
`onnx_bytes` needs torch, and imports it when called: a serving host runs a plan's ONNX graph
with ONNX Runtime and numpy alone.
"""
from __future__ import annotations

import io
import threading
import warnings
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

import numpy as np

from ticketsmith.base.errors import ExportError  # noqa: F401 (re-exported)
from ticketsmith.serving import agreement

if TYPE_CHECKING:
    from torch import nn

OPSET = 17
_EXPORTING = threading.Lock()  # see _without_onnx_package


def onnx_bytes(module: nn.Module, input_shape: tuple[int, ...]) -> bytes:
    """`module` as an ONNX model with input `x` (batch, *input_shape) float32 and output `y`;
    the batch dimension is dynamic."""
    import torch

    buf = io.BytesIO()
    example = torch.zeros(1, *input_shape)
    with warnings.catch_warnings(), _without_onnx_package():
        # TorchScript-exporter deprecation and tracer notes: known, the graph is checked after.
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(module.cpu().eval(), (example,), buf, input_names=["x"],
                              output_names=["y"], opset_version=OPSET, dynamo=False,
                              dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
        except Exception as exc:  # the exporter raises many types; all mean "cannot export"
            raise ExportError(f"ONNX export failed: {str(exc).splitlines()[0]}") from None
    return buf.getvalue()


@contextmanager
def _without_onnx_package() -> Iterator[None]:
    """The TorchScript exporter without its last step's `import onnx` (0.7 s of CPU per
    process here, nearly all of it `ml_dtypes` registering its numpy casts one by one).

    torch serialises the graph itself; that step (`_add_onnxscript_fn`) only parses the bytes
    again to append the onnxscript functions of custom-domain operators, which need custom
    opsets. Asked with none, as here (standard operators only), it returns the bytes as they
    were, so they are handed on unchanged. Where torch names the step otherwise, the export
    runs as it is."""
    try:
        from torch.onnx._internal.torchscript_exporter import onnx_proto_utils as proto
    except ImportError:
        yield
        return
    with _EXPORTING:  # read and swap under one lock: never another export's swapped step
        step = getattr(proto, "_add_onnxscript_fn", None)
        if step is None:
            yield
            return

        def unchanged(model_bytes: bytes, custom_opsets) -> bytes:
            return step(model_bytes, custom_opsets) if custom_opsets else model_bytes

        proto._add_onnxscript_fn = unchanged
        try:
            yield
        finally:
            proto._add_onnxscript_fn = step


def ort_session(model: bytes | str, threads: int):
    """An ONNX Runtime CPU session using `threads` intra-op threads (one inter-op thread)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # warnings about unused initialisers etc. are not news
    # Idle pool threads sleep instead of spinning: a spinning pool takes the cores that the
    # next request's threads (or another runtime's, side by side in one process) need.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


def check_outputs(got: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """{'max_abs_error', 'argmax_agreement', 'tolerance'} of `got` against reference logits
    (`agreement.exact`); ExportError when they do not agree to float rounding."""
    record, why = agreement.exact(got, ref)
    if why is not None:
        raise ExportError(why)
    return record


def run_onnx(model: bytes | str, x: np.ndarray) -> np.ndarray:
    """Output `y` of an exported model on `x` with ONNX Runtime (one thread); ExportError when
    the runtime refuses the model or the input."""
    try:
        return ort_session(model, threads=1).run(["y"], {"x": x})[0]
    except Exception as exc:  # onnxruntime's own error types; all mean "does not run"
        raise ExportError(f"ONNX Runtime cannot run the export: {str(exc).splitlines()[0]}") \
            from None


def onnx_weights(model: bytes) -> int:
    """Float weights (elements of float initializers) an ONNX model stores; index tensors
    such as the compacted input select are not weights."""
    import onnx

    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
              onnx.TensorProto.DOUBLE}
    return sum(int(np.prod(t.dims)) for t in onnx.load_from_string(model).graph.initializer
               if t.data_type in floats)
