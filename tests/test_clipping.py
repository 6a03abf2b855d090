"""clip_gradients: norm, value and adaptive clipping against references; non-finite gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from normswap.errors import OptionError
from normswap.regularizers import NonFiniteGradientWarning, clip_gradients, grad_norm


def net_with_grads(scale: float = 10.0) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential()
    net.add_module("body", nn.Linear(6, 8))
    net.add_module("act", nn.ReLU())
    net.add_module("fc", nn.Linear(8, 3))  # the head (a top-level "fc")
    (net(torch.randn(16, 6)) * scale).pow(2).sum().backward()
    return net


def grads(net: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in net.parameters()]


def test_norm_mode_matches_torch():
    ours, ref = net_with_grads(), net_with_grads()
    total = clip_gradients(ours, "norm", max_norm=1.0)
    want = torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
    torch.testing.assert_close(total, want)
    for a, b in zip(grads(ours), grads(ref)):
        torch.testing.assert_close(a, b)
    assert grad_norm(ours).item() == pytest.approx(1.0, rel=1e-4)


def test_norm_mode_leaves_small_gradients_alone_and_inf_norm():
    net = net_with_grads(scale=1e-3)
    before = grads(net)
    clip_gradients(net, "norm", max_norm=1e6)
    for a, b in zip(grads(net), before):
        torch.testing.assert_close(a, b)
    total = clip_gradients(net, "norm", max_norm=1e6, norm_type=float("inf"))
    assert total.item() == pytest.approx(max(g.abs().max().item() for g in before))


def test_value_mode_matches_clamp():
    net = net_with_grads()
    before = grads(net)
    total = clip_gradients(net.parameters(), "value", value=0.5)
    assert total.item() == pytest.approx(torch.linalg.vector_norm(torch.cat([g.flatten() for g in before])).item(),
                                         rel=1e-5)
    for a, b in zip(grads(net), before):
        torch.testing.assert_close(a, b.clamp(-0.5, 0.5))


def agc_reference(param: torch.Tensor, grad: torch.Tensor, clip_factor: float, eps: float) -> torch.Tensor:
    """NFNet's rule per unit, written out: rows of a matrix, the whole tensor for a vector."""
    if param.dim() <= 1:
        p_norm, g_norm = param.norm().clamp(min=eps), grad.norm()
        return grad if g_norm <= clip_factor * p_norm else grad * (clip_factor * p_norm / g_norm)
    out = grad.clone()
    for i in range(param.shape[0]):
        p_norm, g_norm = param[i].norm().clamp(min=eps), grad[i].norm()
        if g_norm > clip_factor * p_norm:
            out[i] = grad[i] * (clip_factor * p_norm / g_norm)
    return out


def test_agc_matches_the_per_unit_rule_and_spares_the_head():
    net = net_with_grads()
    with torch.no_grad():
        net.body.bias.zero_()  # a zero-initialized parameter: the eps floor must let it move
    before = {n: p.grad.clone() for n, p in net.named_parameters()}
    clip_gradients(net, "agc", clip_factor=0.01, eps=1e-3)
    for name, p in net.named_parameters():
        if name.startswith("fc."):
            torch.testing.assert_close(p.grad, before[name])  # head excluded
        else:
            torch.testing.assert_close(p.grad, agc_reference(p.detach(), before[name], 0.01, 1e-3))
    assert 0 < net.body.bias.grad.norm().item() <= 0.01 * 1e-3 * (1 + 1e-5)


def test_agc_can_clip_the_head_too():
    net = net_with_grads()
    before = net.fc.weight.grad.clone()
    clip_gradients(net, "agc", exclude_head=False)
    torch.testing.assert_close(net.fc.weight.grad, agc_reference(net.fc.weight.detach(), before, 0.01, 1e-3))


@pytest.mark.parametrize("mode,kwargs", [("norm", {"max_norm": 1.0}), ("value", {"value": 1.0}), ("agc", {})])
def test_non_finite_gradients_are_reported_and_skipped(mode, kwargs):
    net = net_with_grads()
    net.body.weight.grad[0, 0] = float("nan")
    keep = grads(net)
    with pytest.warns(NonFiniteGradientWarning, match=r"1 parameter\(s\), first: body.weight \(nothing clipped\)"):
        total = clip_gradients(net, mode, **kwargs)
    assert not torch.isfinite(total)
    for a, b in zip(grads(net), keep):  # nothing spread: the finite gradients are as they were
        torch.testing.assert_close(a, b, equal_nan=True)

    weights = copy.deepcopy([p.detach() for p in net.parameters()])
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    with pytest.warns(NonFiniteGradientWarning, match="set to None"):
        clip_gradients(net, mode, skip_nonfinite=True, **kwargs)
    assert all(p.grad is None for p in net.parameters())
    opt.step()
    for p, w in zip(net.parameters(), weights):
        assert torch.equal(p.detach(), w)  # no NaN reached the weights, nothing moved


def test_bad_arguments():
    net = net_with_grads()
    with pytest.raises(OptionError, match="Did you mean 'agc'"):
        clip_gradients(net, "agd")
    with pytest.raises(OptionError, match="needs max_norm"):
        clip_gradients(net, "norm")
    with pytest.raises(OptionError, match="value must be a finite number > 0"):
        clip_gradients(net, "value", value=-1.0)
    with pytest.raises(OptionError, match="clip_factor"):
        clip_gradients(net, "agc", clip_factor=0)
    with pytest.raises(OptionError, match="iterable of parameters"):
        clip_gradients(42, "norm", max_norm=1.0)
    with pytest.raises(OptionError, match="param groups"):
        clip_gradients([{"params": []}], "norm", max_norm=1.0)
    assert clip_gradients(nn.Linear(2, 2), "norm", max_norm=1.0).item() == 0.0  # no gradients yet
