"""Weight Standardization: numbers against references computed here, keys, the eval-mode cache."""

import pytest
import torch
from torch import nn

from normswap.norms.std_conv import StdConv2d, clear_ws_cache, standardize_conv, standardize_weight, ws_skip_reason


def test_inside_form_zero_mean_unit_variance_per_output_channel():
    w = torch.randn(16, 8, 3, 3) * 3 + 1
    s = standardize_weight(w, eps=1e-10, mode="inside").flatten(1)
    torch.testing.assert_close(s.mean(1), torch.zeros(16), atol=1e-5, rtol=0)
    torch.testing.assert_close(s.var(1, unbiased=False), torch.ones(16), atol=1e-4, rtol=0)


def test_outside_form_matches_paper_code():
    w = torch.randn(16, 8, 3, 3)
    flat = w.view(16, -1)
    mean = flat.mean(1, keepdim=True)
    ref = (flat - mean) / (flat.std(1, keepdim=True) + 1e-5)
    torch.testing.assert_close(standardize_weight(w, 1e-5, "outside"), ref.view_as(w))


def test_inside_form_matches_timm_std_conv():
    from timm.layers import StdConv2d as TimmStdConv2d

    timm_conv = TimmStdConv2d(4, 8, 3, eps=1e-6)
    ours = standardize_conv(nn.Conv2d(4, 8, 3, padding=1, bias=False), eps=1e-6)
    ours.weight = timm_conv.weight
    x = torch.randn(2, 4, 9, 9)
    torch.testing.assert_close(ours(x), timm_conv(x))


def test_conv_keeps_weight_key_and_identity():
    conv = nn.Conv2d(4, 8, 3)
    weight = conv.weight
    out = standardize_conv(conv)
    assert out is conv and isinstance(out, StdConv2d) and isinstance(out, nn.Conv2d)
    assert out.weight is weight and list(out.state_dict()) == ["weight", "bias"]


def test_forward_and_backward_match_functional_reference():
    conv = standardize_conv(nn.Conv2d(4, 8, 3, bias=False), eps=1e-6)
    x = torch.randn(2, 4, 7, 7, requires_grad=True)
    w = conv.weight.detach().clone().requires_grad_(True)
    flat = w.flatten(1)
    ref_w = ((flat - flat.mean(1, keepdim=True)) / torch.sqrt(flat.var(1, unbiased=False, keepdim=True) + 1e-6))
    ref = torch.nn.functional.conv2d(x, ref_w.view_as(w))
    g = torch.randn_like(ref)
    ref.backward(g)
    x2 = x.detach().clone().requires_grad_(True)
    out = conv(x2)
    out.backward(g)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(conv.weight.grad, w.grad)
    torch.testing.assert_close(x2.grad, x.grad)


def test_eval_cache_reused_and_invalidated_on_change():
    conv = standardize_conv(nn.Conv2d(4, 8, 3)).eval()
    x = torch.randn(1, 4, 5, 5)
    with torch.no_grad():
        y1 = conv(x)
        cached = conv._ws_cache[2]
        conv(x)
        assert conv._ws_cache[2] is cached  # not recomputed
        conv.weight.mul_(2)  # an optimizer-style in-place update bumps the version counter
        conv.weight.add_(torch.randn_like(conv.weight))
        y2 = conv(x)
        assert conv._ws_cache[2] is not cached
    fresh = standardize_weight(conv.weight.detach())
    torch.testing.assert_close(conv._ws_cache[2], fresh)
    assert not torch.allclose(y1, y2)
    conv.load_state_dict({"weight": torch.randn(8, 4, 3, 3), "bias": torch.zeros(8)})
    with torch.no_grad():
        torch.testing.assert_close(conv(x), torch.nn.functional.conv2d(x, standardize_weight(conv.weight)))
    with torch.no_grad():
        conv.weight.data.copy_(torch.randn(8, 4, 3, 3))  # bypasses the version counter
        clear_ws_cache(conv)
        torch.testing.assert_close(conv(x), torch.nn.functional.conv2d(x, standardize_weight(conv.weight)))


def test_no_cache_when_training_or_grad_wanted():
    conv = standardize_conv(nn.Conv2d(4, 8, 3))
    conv(torch.randn(1, 4, 5, 5))
    assert "_ws_cache" not in conv.__dict__
    conv.eval()
    conv(torch.randn(1, 4, 5, 5)).sum().backward()  # eval mode, grad enabled: gradients must flow
    assert conv.weight.grad is not None and "_ws_cache" not in conv.__dict__


def test_skip_reasons():
    assert "fan-in of 1" in ws_skip_reason(nn.Conv2d(8, 8, 1, groups=8))
    assert "not an nn.Conv" in ws_skip_reason(nn.ConvTranspose2d(4, 4, 3))
    assert ws_skip_reason(nn.Conv2d(8, 8, 3, groups=8)) is None
    with pytest.raises(ValueError, match="fan-in"):
        standardize_conv(nn.Conv2d(8, 8, 1, groups=8))


def test_timm_conv2d_same_keeps_same_padding():
    from timm.layers import Conv2dSame

    conv = Conv2dSame(4, 8, 3, stride=2)
    x = torch.randn(1, 4, 11, 11)
    w = standardize_weight(conv.weight.detach())
    ref = Conv2dSame(4, 8, 3, stride=2)
    with torch.no_grad():
        ref.weight.copy_(w)
        ref.bias.copy_(conv.bias)
    std = standardize_conv(conv)
    torch.testing.assert_close(std(x), ref(x))


def test_bf16_finite():
    conv = standardize_conv(nn.Conv2d(4, 8, 3)).to(torch.bfloat16)
    x = torch.randn(2, 4, 7, 7, dtype=torch.bfloat16, requires_grad=True)
    y = conv(x)
    y.float().sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(conv.weight.grad).all()


def test_no_stale_weight_from_a_parametrized_conv():
    """A parametrized weight is a new tensor at every access; the old cache keyed on (id, version, address)
    of such a tensor collided (4 stale outputs in 1000). Writes into the parametrization's original, in eval
    mode, must show in every output."""
    from torch.nn.utils import parametrize

    class Scale(nn.Module):
        def forward(self, w):
            return w * 2

    conv = standardize_conv(nn.Conv2d(3, 4, 3, bias=False)).eval()
    parametrize.register_parametrization(conv, "weight", Scale())
    x = torch.randn(1, 3, 5, 5)
    g = torch.Generator().manual_seed(0)
    originals, outputs = [], []
    with torch.no_grad():
        for _ in range(1000):
            originals.append(torch.randn(4, 3, 3, 3, generator=g))
            conv.parametrizations.weight.original.copy_(originals[-1])
            outputs.append(conv(x))
    stale = [i for i, (w, y) in enumerate(zip(originals, outputs))
             if not torch.equal(y, torch.nn.functional.conv2d(x, standardize_weight(w * 2)))]
    assert stale == []
