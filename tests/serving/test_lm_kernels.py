"""The sparse decode kernel and how kernels are chosen: scipy's private matrix-vector loop and
the public product give the masked Linear's numbers at every input shape a GPT feeds them,
and every kernel's timed call comes after the decode traffic it would follow in a real step
(CPU clock), so a layer is never judged with its weights hot in the cache."""
from __future__ import annotations

import pytest
import torch

from ticketsmith.engine.transformer import GPT
from ticketsmith.serving import lm_kernels
from ticketsmith.serving.lm_kernels import ColdClock, ScipyCSRLinear, choose_kernels


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


def _sparse_gpt() -> GPT:
    torch.manual_seed(0)
    model = GPT(256, 16, layers=2, heads=2, width=16).eval().requires_grad_(False)
    for p in model.parameters():
        if p.dim() == 2:
            p.mul_(torch.rand(p.shape) > 0.9)
    return model


def test_decode_traffic_runs_every_block_linear_once_on_one_row():
    model = _sparse_gpt()
    seen = []
    for i, block in enumerate(model.blocks):
        for path in lm_kernels.LINEARS:
            lm_kernels.get_linear(block, path).register_forward_hook(
                lambda m, inp, out, name=f"{i}.{path}": seen.append((name, inp[0].shape[0])))
    lm_kernels.decode_traffic(model)()
    assert seen == [(f"{i}.{p}", 1) for i in range(2) for p in lm_kernels.LINEARS]


def test_every_timed_kernel_call_follows_the_decode_traffic(monkeypatch):
    """Only the warm-up calls (2 per kernel, untimed) run without the traffic before them;
    `choose_kernels` times every exact kernel of every layer that way by default."""
    log: list[str] = []
    monkeypatch.setattr(lm_kernels, "decode_traffic", lambda model: lambda: log.append("evict"))
    real = lm_kernels.time_side_by_side

    def spying(calls, **kw):
        return real({n: (lambda f=f: (log.append("call"), f())) for n, f in calls.items()}, **kw)

    monkeypatch.setattr(lm_kernels, "time_side_by_side", spying)
    chosen = choose_kernels(_sparse_gpt(), rows=1, trials=2)
    assert set(chosen) == {f"blocks.{i}.{p}" for i in range(2) for p in lm_kernels.LINEARS}
    calls = [i for i, e in enumerate(log) if e == "call"]
    cold = [i for i in calls if i > 0 and log[i - 1] == "evict"]
    kernels = 3 * 8  # dense, scipy_csr, torch_csr for each of the 8 Linears
    assert len(calls) - len(cold) == 2 * kernels and len(cold) >= 2 * 3 * kernels


def test_the_cold_clock_leaves_the_eviction_out_of_the_time():
    """A call that does nothing takes less CPU time than the eviction before it."""
    burn = []
    clock = ColdClock(lambda: burn.append(sum(i * i for i in range(200_000))))
    started = clock.start()
    took = clock.stop(started)
    assert burn and took >= 0.0
    evict_started = ColdClock(lambda: None).start()
    sum(i * i for i in range(200_000))
    eviction = ColdClock(lambda: None).stop(evict_started)
    assert took < eviction / 2
