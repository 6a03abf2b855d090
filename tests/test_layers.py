"""The layers the BatchNorm specs build, against references computed here (fwd, bwd, bf16)."""

import pytest
import torch
from torch import nn

import normswap
from normswap.norms.act import act_class, attach_act
from normswap.norms.channel_layer_norm import ChannelLayerNorm


def _convert_one(spec, c=64, **options):
    model = nn.Sequential(nn.BatchNorm2d(c))
    with torch.no_grad():
        model[0].weight.uniform_(0.5, 1.5)
        model[0].bias.normal_()
    return normswap.convert(model, spec, **options)[0]


def test_group_norm_statistics_per_group():
    gn = _convert_one("gn", c=64, groups=8)
    x = torch.randn(3, 64, 5, 5) * 4 + 2
    y = gn(x)
    # undo the affine, then each (sample, group) must have mean 0 and variance 1
    z = ((y - gn.bias.view(1, -1, 1, 1)) / gn.weight.view(1, -1, 1, 1)).reshape(3, 8, -1)
    torch.testing.assert_close(z.mean(-1), torch.zeros(3, 8), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.var(-1, unbiased=False), torch.ones(3, 8), atol=1e-3, rtol=0)


def test_group_norm_backward_matches_reference():
    gn = _convert_one("gn", c=16, groups=4)
    x = torch.randn(2, 16, 3, 3, requires_grad=True)
    xr = x.detach().clone().requires_grad_(True)
    w = gn.weight.detach().clone().requires_grad_(True)
    g = xr.reshape(2, 4, -1)
    ref = ((g - g.mean(-1, keepdim=True)) / torch.sqrt(g.var(-1, unbiased=False, keepdim=True) + gn.eps))
    ref = ref.reshape_as(xr) * w.view(1, -1, 1, 1) + gn.bias.detach().view(1, -1, 1, 1)
    grad = torch.randn_like(ref)
    ref.backward(grad)
    out = gn(x)
    out.backward(grad)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(gn.weight.grad, w.grad)


def test_instance_norm_statistics_per_channel():
    inorm = _convert_one("in", c=8)
    assert isinstance(inorm, nn.InstanceNorm2d) and inorm.affine
    y = inorm(torch.randn(2, 8, 6, 6) * 3 + 1)
    z = (y - inorm.bias.view(1, -1, 1, 1)) / inorm.weight.view(1, -1, 1, 1)
    torch.testing.assert_close(z.mean((2, 3)), torch.zeros(2, 8), atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", [(2, 8), (2, 8, 5), (2, 8, 4, 4), (2, 8, 2, 3, 3)])
def test_channel_layer_norm_matches_reference(shape):
    ln = ChannelLayerNorm(8)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.normal_()
    x = torch.randn(shape, requires_grad=True)
    xr = x.detach().clone().requires_grad_(True)
    mean = xr.mean(1, keepdim=True)
    var = xr.var(1, unbiased=False, keepdim=True)
    view = (1, 8) + (1,) * (len(shape) - 2)
    ref = (xr - mean) / torch.sqrt(var + ln.eps) * ln.weight.detach().view(view) + ln.bias.detach().view(view)
    g = torch.randn_like(ref)
    ref.backward(g)
    out = ln(x)
    out.backward(g)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(x.grad, xr.grad)


@pytest.mark.parametrize("spec", ["gn", "gn_ws", "in", "ln"])
def test_bf16_forward_backward_finite(spec):
    layer = _convert_one(spec, c=32).to(torch.bfloat16)
    x = torch.randn(2, 32, 4, 4, dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    y.float().square().sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()


def test_attach_act_keeps_keys_and_order():
    gn = nn.GroupNorm(2, 4)
    keys = set(gn.state_dict())
    attach_act(gn, nn.PReLU(), nn.Dropout(0.0))
    assert type(gn) is act_class(nn.GroupNorm) and isinstance(gn, nn.GroupNorm)
    assert set(gn.state_dict()) == keys | {"act.weight"}
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(gn(x), gn.act(nn.functional.group_norm(x, 2, gn.weight, gn.bias, gn.eps)))
