"""Serving formats on tiny real models: compaction is exact, CSR matches masked dense, quantized
and CUDA formats are checked, and formats that cannot run say why."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ticketsmith.serving.compaction import Select, as_chain, compact
from ticketsmith.engine.masks import Mask, apply_mask_, prune_magnitude, prune_n_m
from ticketsmith.engine.models import MLP, ConvNet, LeNet5, count_params, prunable_weights
from ticketsmith.serving.formats import (CSR_MIN_WEIGHTS, BuildContext, CSRLinear, FormatUnavailable,
                                         build_format, default_formats, is_2_4, weight_bytes)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def masked(model: nn.Module, fraction: float, seed: int = 0) -> tuple[nn.Module, Mask]:
    """`model` with `fraction` of each layer's weights pruned by magnitude (masks baked in)."""
    torch.manual_seed(seed)
    weights = prunable_weights(model)
    mask = prune_magnitude(weights, Mask.ones_like(weights), dict.fromkeys(weights, fraction))
    apply_mask_(weights, mask)
    return model.eval(), mask


def params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def with_dead_units(seed: int = 0) -> MLP:
    """An MLP with every kind of dead unit, and positive biases so folding matters."""
    torch.manual_seed(seed)
    model = MLP(20, [16, 12], 5).eval()
    with torch.no_grad():
        h0, h1 = model.hidden
        for layer in (h0, h1, model.out):
            layer.bias.uniform_(0.1, 0.5)
        h0.weight[:, [3, 7]] = 0       # two input features nobody reads
        h0.weight[[1, 4, 9]] = 0       # dead-in: outputs relu(bias) > 0, must be folded
        h1.weight[:, [2, 5]] = 0       # dead-out: nobody reads hidden.0 units 2 and 5
        h1.weight[[0, 6]] = 0          # dead-in in the second hidden layer
        model.out.weight[:, [3]] = 0   # dead-out of hidden.1 unit 3
    return model


def test_compaction_is_exact_and_smaller():
    model = with_dead_units()
    compacted, summary = compact(as_chain(model))
    x = torch.randn(64, 20)
    with torch.no_grad():
        torch.testing.assert_close(compacted(x), model(x), rtol=1e-5, atol=1e-5)
    assert params(compacted) < params(model)
    assert any(isinstance(m, Select) for m in compacted.layers)
    linears = [m for m in compacted.layers if isinstance(m, nn.Linear)]
    # inputs 20-2, hidden.0 16-3 dead-in-2 dead-out, hidden.1 12-2 dead-in-1 dead-out
    assert [tuple(m.weight.shape) for m in linears] == [(11, 18), (9, 11), (5, 9)]
    assert summary == "inputs 20->18, hidden.0 16->11, hidden.1 12->9, out 5->5"


def test_dead_in_units_carry_a_constant_that_compaction_keeps():
    """Dropping dead-in units without folding relu(bias) forward would change the outputs,
    so the exactness above depends on the fold."""
    model = with_dead_units()
    naive = copy.deepcopy(model)
    with torch.no_grad():
        naive.hidden[0].bias[[1, 4, 9]] = 0
        naive.hidden[1].bias[[0, 6]] = 0
        x = torch.randn(64, 20)
        assert not torch.allclose(naive(x), model(x), atol=1e-3)


def test_compaction_without_dead_units_changes_nothing():
    torch.manual_seed(0)
    model = MLP(20, [16, 12], 5).eval()
    compacted, summary = compact(as_chain(model))
    x = torch.randn(8, 20)
    with torch.no_grad():
        torch.testing.assert_close(compacted(x), model(x), rtol=1e-6, atol=1e-6)
    assert params(compacted) == params(model)
    assert not any(isinstance(m, Select) for m in compacted.layers)
    assert summary == "inputs 20->20, hidden.0 16->16, hidden.1 12->12, out 5->5"


def test_compaction_of_a_real_ticket_is_exact():
    model, mask = masked(MLP(64, [48, 32], 4), 0.9)
    compacted, _ = compact(as_chain(model))
    x = torch.randn(32, 64)
    with torch.no_grad():
        torch.testing.assert_close(compacted(x), model(x), rtol=1e-5, atol=1e-5)
    assert params(compacted) < params(model)


def test_lenet5_dead_channels_fold_through_an_unpadded_conv():
    torch.manual_seed(0)
    model = LeNet5((1, 28, 28), 10).eval()
    with torch.no_grad():
        model.conv1.weight[2] = 0               # constant channel; conv2 has no padding: fold
        model.conv1.bias[2] = 0.7
        model.conv2.weight[:, 4] = 0            # conv1 channel 4: nobody reads it
        model.fc1.weight[:, 5 * 25:6 * 25] = 0  # conv2 channel 5: nobody reads it
    compacted, summary = compact(as_chain(model))
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(compacted(x), model(x), rtol=1e-5, atol=1e-5)
    convs = [m for m in compacted.layers if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [4, 15]
    assert "conv1 6->4" in summary and "conv2 16->15" in summary


def test_padded_conv_keeps_a_constant_channel_unless_it_is_zero():
    torch.manual_seed(0)
    model = ConvNet((3, 8, 8), 10, [8]).eval()
    first = model.features[0]
    with torch.no_grad():
        first.weight[[1, 2]] = 0
        first.bias[1] = 0.5    # relu(0.5) meets zero padding in the next conv: not foldable
        first.bias[2] = -0.5   # relu(-0.5) = 0 everywhere: removable
    compacted, _ = compact(as_chain(model))
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(compacted(x), model(x), rtol=1e-5, atol=1e-5)
    assert [m for m in compacted.layers if isinstance(m, nn.Conv2d)][0].out_channels == 7


def test_csr_linear_matches_dense_with_int32_indices():
    torch.manual_seed(0)
    w = torch.randn(30, 50) * (torch.rand(30, 50) < 0.1)
    b = torch.randn(30)
    layer = CSRLinear(w, b)
    assert layer.weight.crow_indices().dtype == torch.int32
    assert layer.weight.col_indices().dtype == torch.int32
    for x in (torch.randn(1, 50), torch.randn(7, 50), torch.randn(2, 3, 50)):
        torch.testing.assert_close(layer(x), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    nnz = int((w != 0).sum())
    assert weight_bytes(layer) == nnz * 4 * 2 + 31 * 4 + 30 * 4


def test_csr_format_matches_masked_dense_and_only_where_it_pays():
    model, mask = masked(MLP(400, [300], 10), 0.95)
    assert model.hidden[0].weight.numel() >= CSR_MIN_WEIGHTS > model.out.weight.numel()
    served = build_format("csr", model, mask, BuildContext())
    assert served.layers == {"hidden.0": "csr", "out": "dense"}
    assert isinstance(served.module.hidden[0], CSRLinear)
    assert isinstance(model.hidden[0], nn.Linear)  # the source model is left alone
    x = torch.randn(16, 400)
    with torch.no_grad():
        torch.testing.assert_close(served.module(x), model(x), rtol=1e-5, atol=1e-5)
    assert weight_bytes(served.module) < weight_bytes(model)


def test_dense_layers_stay_dense_in_csr():
    model, mask = masked(MLP(400, [300], 10), 0.5)
    served = build_format("csr", model, mask, BuildContext())
    assert set(served.layers.values()) == {"dense"} and "no Linear layer" in served.note


def fake_timer(calls):
    """Deterministic 'timings' so the plan's choice is testable: CSR looks fastest."""
    return {n: {"csr": 1.0, "csr_full_input": 0.5}.get(n, 2.0) for n in calls}


def test_auto_plan_is_exact_and_reports_a_format_per_layer():
    model, mask = masked(with_dead_units(), 0.5)
    x = {1: torch.randn(1, 20), 8: torch.randn(8, 20)}
    served = build_format("auto", model, mask, BuildContext(example=x, timer=fake_timer))
    assert served.exact
    assert served.layers == {"hidden.0": "compacted+csr_full_input", "hidden.1": "compacted+csr",
                             "out": "compacted+csr"}
    with torch.no_grad():
        torch.testing.assert_close(served.module(x[8]), model(x[8]), rtol=1e-5, atol=1e-5)


def test_auto_drops_int8_layers_that_fail_the_accuracy_gate():
    model, mask = masked(with_dead_units(), 0.5)
    x = {4: torch.randn(4, 20)}
    timer = lambda calls: {n: 0.1 if n == "int8" else 1.0 for n in calls}  # noqa: E731
    accuracy = lambda m: 0.5 if "Quantized" in repr(m) else 0.9  # noqa: E731
    ctx = BuildContext(example=x, timer=timer, accuracy=accuracy, max_accuracy_drop=1.0)
    served = build_format("auto", model, mask, ctx)
    assert served.exact and "int8" not in "".join(served.layers.values())
    assert "int8 layers dropped" in served.note
    ok = BuildContext(example=x, timer=timer, accuracy=lambda m: 0.9)
    assert not build_format("auto", model, mask, ok).exact


def test_compacted_int8_is_close_and_smaller():
    model, mask = masked(MLP(64, [48, 32], 4), 0.8)
    served = build_format("compacted_int8", model, mask, BuildContext())
    assert not served.exact and set(served.layers.values()) == {"compacted+int8"}
    x = torch.randn(64, 64)
    with torch.no_grad():
        ref, out = model(x), served.module(x)
    assert float((out - ref).norm() / ref.norm()) < served.tolerance
    assert weight_bytes(served.module) < weight_bytes(model) / 3


def test_non_chain_models_cannot_be_compacted_but_csr_still_works():
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2)).eval()
    with pytest.raises(FormatUnavailable, match="not a chain"):
        build_format("compacted", model, None, BuildContext())
    assert build_format("csr", model, None, BuildContext()).module is not model


def test_cuda_formats_say_they_need_cuda_on_cpu():
    model, mask = masked(MLP(16, [8], 2), 0.5)
    for name in ("fp16", "bf16", "semi_structured_2:4"):
        with pytest.raises(FormatUnavailable, match="CUDA"):
            build_format(name, model, mask, BuildContext())
    assert "fp16" not in default_formats("cpu") and "compacted_int8" in default_formats("cpu")
    assert "semi_structured_2:4" in default_formats("cuda")
    assert "compacted_int8" not in default_formats("cuda")
    with pytest.raises(FormatUnavailable, match="unknown serving format"):
        build_format("nope", model, mask, BuildContext())


def test_is_2_4_recognises_n_m_masks():
    torch.manual_seed(0)
    model = MLP(64, [32], 8)
    weights = prunable_weights(model)
    mask = prune_n_m(weights, Mask.ones_like(weights))
    apply_mask_(weights, mask)
    assert is_2_4(model.hidden[0].weight) and is_2_4(model.out.weight)
    assert not is_2_4(torch.ones(4, 8))


@pytest.mark.gpu
@cuda
def test_half_formats_on_cuda():
    model, mask = masked(MLP(64, [128], 10), 0.5)
    model = model.cuda()
    ctx = BuildContext(device=torch.device("cuda"))
    x = torch.randn(32, 64, device="cuda")
    for name in ("fp16", "bf16"):
        served = build_format(name, model, mask, ctx)
        with torch.no_grad():
            ref, out = model(x), served.module(x)
        assert out.dtype == torch.float32
        assert float((out - ref).norm() / ref.norm()) < served.tolerance


@pytest.mark.gpu
@cuda
def test_semi_structured_2_4_on_cuda():
    torch.manual_seed(0)
    model = MLP(256, [256], 128).cuda().eval()
    weights = prunable_weights(model)
    apply_mask_(weights, prune_n_m(weights, Mask.ones_like(weights)))
    served = build_format("semi_structured_2:4", model, None,
                          BuildContext(device=torch.device("cuda")))
    assert "2:4" in served.layers.values()
    x = torch.randn(64, 256, device="cuda")
    with torch.no_grad():
        ref, out = model(x), served.module(x)
    assert float((out - ref).norm() / ref.norm()) < served.tolerance
    assert weight_bytes(served.module) < count_params(model) * 2  # fp16 and half the values
