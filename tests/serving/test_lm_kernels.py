"""The sparse decode kernel and how kernels are chosen: scipy's private matrix-vector loop and
the public product give the masked Linear's numbers at every input shape a GPT feeds them,
and every kernel is timed inside whole passes of a model that runs it in every layer (CPU
clock), so a layer is never judged alone with its weights hot in the cache."""
from __future__ import annotations

import pytest
import torch

from ticketsmith.engine.decode_step import linear_into
from ticketsmith.engine.generate import Decoder, gpt_step
from ticketsmith.engine.transformer import GPT
from ticketsmith.serving import lm_kernels
from ticketsmith.serving.lm_kernels import LINEARS, ScipyCSRLinear, choose_kernels, with_kernels


def _masked_linear(n_in: int, n_out: int, bias: bool, seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    layer = torch.nn.Linear(n_in, n_out, bias=bias).requires_grad_(False)
    layer.weight.mul_(torch.rand(layer.weight.shape) > 0.9)  # 90% sparse
    if bias:
        layer.bias.normal_()
    return layer


# decode at batch 1 (3-D, flat and a non-contiguous row), batch 8, a short prefill
SHAPES = [(1, 1, 48), (1, 48), "strided", (8, 1, 48), (2, 5, 48)]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_private_and_public_scipy_paths_give_the_masked_linears_numbers(shape, bias):
    layer = _masked_linear(48, 40, bias)
    x = torch.randn(1, 1, 96)[..., ::2] if shape == "strided" else torch.randn(*shape)
    with torch.inference_mode():
        fast = ScipyCSRLinear(layer.weight, layer.bias)
        public = ScipyCSRLinear(layer.weight, layer.bias, fast=False)
        assert fast._fast, "scipy's csr_matvec was not found: the fast path is untested"
        ref, a, b = layer(x), fast(x), public(x)
    assert a.shape == b.shape == ref.shape and a.dtype == torch.float32
    torch.testing.assert_close(a, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b, ref, rtol=1e-5, atol=1e-6)


def test_each_call_gets_its_own_output():
    """The output is a fresh copy of the bias, never a buffer a later call overwrites."""
    layer = _masked_linear(48, 40, True)
    fast = ScipyCSRLinear(layer.weight, layer.bias)
    with torch.inference_mode():
        x1, x2 = torch.randn(1, 1, 48), torch.randn(1, 1, 48)
        y1 = fast(x1)
        first = y1.clone()
        fast(x2)
    torch.testing.assert_close(y1, first, rtol=0, atol=0)
    torch.testing.assert_close(fast.bias, layer.bias, rtol=0, atol=0)


def test_a_scipy_without_the_private_loop_takes_the_public_product(monkeypatch):
    monkeypatch.setattr(lm_kernels, "_csr_matvec", None)
    layer = _masked_linear(48, 40, True)
    kernel = ScipyCSRLinear(layer.weight, layer.bias)
    x = torch.randn(1, 1, 48)
    with torch.inference_mode():
        assert not kernel._fast
        torch.testing.assert_close(kernel(x), layer(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("target", ["contiguous", "row of a cache"])
def test_writing_into_an_output_gives_the_forward_numbers(rows, target):
    """`forward_into` (a decode step's outputs and KV cache): at one row scipy's loop writes
    into the output and returns it; otherwise a new tensor comes back, which `linear_into`
    copies there. Nothing outside the output is written."""
    layer = _masked_linear(48, 40, True)
    kernel = ScipyCSRLinear(layer.weight, layer.bias)
    x = torch.randn(rows, 48)
    buf = torch.full((rows, 3, 40), 7.0)  # (rows, positions, features): position 1 written
    out = buf[:, 1] if target == "row of a cache" else torch.full((rows, 40), 7.0)
    with torch.inference_mode():
        y = kernel.forward_into(x, out)
        assert (y is out) == (rows == 1)
        torch.testing.assert_close(y, layer(x), rtol=1e-5, atol=1e-6)
        linear_into(kernel)(x, out)
        torch.testing.assert_close(out, layer(x), rtol=1e-5, atol=1e-6)
    assert (buf[:, 0] == 7).all() and (buf[:, 2] == 7).all()
    torch.testing.assert_close(kernel.bias, layer.bias, rtol=0, atol=0)


@pytest.mark.parametrize("lengths", [[9], [9, 4]], ids=["batch 1", "padded batch"])
def test_a_model_on_sparse_kernels_decodes_like_the_general_step(lengths):
    """Every block Linear on scipy's CSR (the qkv projection writing into the KV cache): the
    decode fast path gives `gpt_step`'s logits, and the masked model's."""
    masked = _sparse_gpt()
    model = with_kernels(masked, {f"blocks.{i}.{p}": "scipy_csr" for i in range(2)
                                  for p in LINEARS})
    assert isinstance(model.blocks[0].attn.qkv, ScipyCSRLinear)
    prompts = [list(range(30, 30 + n)) for n in lengths]
    fast, general, ref = Decoder(model), Decoder(model), Decoder(masked)
    with torch.inference_mode():
        a, b, c = (d.prefill(prompts, 6) for d in (fast, general, ref))
        pos, cache = general.next_pos[:, None], general.cache
        for _ in range(6):
            tokens = c.argmax(-1)
            a, c = fast.step(tokens), ref.step(tokens)
            cache.valid[:, cache.filled] = True
            b, pos = gpt_step(model, tokens[:, None], pos, cache), pos + 1
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
            torch.testing.assert_close(a, c, rtol=0, atol=1e-5)


def _sparse_gpt() -> GPT:
    torch.manual_seed(0)
    model = GPT(256, 16, layers=2, heads=2, width=16).eval().requires_grad_(False)
    for p in model.parameters():
        if p.dim() == 2:
            p.mul_(torch.rand(p.shape) > 0.9)
    return model


def test_every_kernel_is_timed_inside_whole_passes_of_a_model_running_it(monkeypatch):
    """In-model timing: each timed call of a layer's kernel happens inside a forward pass of
    the whole model, every one of whose layers runs that same kernel (the traffic between
    two calls of one layer is the model's own, as in decode), at the asked row count."""
    log: list[tuple[str, int]] = []
    real = lm_kernels._Timed.forward

    def spying(self, x):
        log.append((type(self.inner).__name__, x.shape[0] * x.shape[1]))
        return real(self, x)

    monkeypatch.setattr(lm_kernels._Timed, "forward", spying)
    model = _sparse_gpt()
    why: dict[str, str] = {}
    chosen = choose_kernels(model, rows=3, trials=2, why=why)
    names = {f"blocks.{i}.{p}" for i in range(2) for p in lm_kernels.LINEARS}
    assert set(chosen) == set(why) == names
    assert all(w.count(" us") == 3 for w in why.values())  # dense, scipy_csr, torch_csr
    # passes of 8 calls (2 blocks x 4 Linears), each pass one kernel throughout, 3 rows
    assert len(log) % 8 == 0 and {rows for _, rows in log} == {3}
    passes = [log[i:i + 8] for i in range(0, len(log), 8)]
    assert all(len({kind for kind, _ in p}) == 1 for p in passes)
    assert {p[0][0] for p in passes} == {"Linear", "ScipyCSRLinear", "CSRLinear"}


def test_a_kernel_that_is_not_exact_is_never_timed_or_chosen(monkeypatch):
    """A kernel whose output is off is left out of the in-model passes for that layer."""
    real = ScipyCSRLinear.forward
    monkeypatch.setattr(ScipyCSRLinear, "forward", lambda self, x: real(self, x) + 1.0)
    why: dict[str, str] = {}
    chosen = choose_kernels(_sparse_gpt(), rows=1, trials=1, why=why)
    assert "scipy_csr" not in set(chosen.values()) and all("scipy" not in w for w in why.values())
