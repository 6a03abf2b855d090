"""RMSNorm / RMSNorm2d / rms_norm against the textbook formula (Zhang & Sennrich, 2019)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from normswap.errors import NormSwapError
from normswap.norms.rms_norm import RMSNorm, RMSNorm2d, rms_norm

from norm_helpers import (AFFINE, affine, check_2d_against_permuted_reference, check_bf16_under_autocast,
                      check_functional_against_reference, check_gradcheck_float64, check_torch_compile_eager, randomize)

pytestmark = pytest.mark.usefixtures("one_thread", "native_path")


def reference(x, normalized_shape, weight=None, bias=None, eps=1e-6):
    """y = x / sqrt(mean(x^2) + eps) * weight + bias, written with plain autograd ops."""
    dims = tuple(range(-len(normalized_shape), 0))
    return affine(x / torch.sqrt(x.pow(2).mean(dims, keepdim=True) + eps), weight, bias)


@pytest.mark.parametrize("weight,bias", AFFINE)
@pytest.mark.parametrize("shape,normalized", [((4, 7, 32), (32,)), ((3, 5, 6, 4), (6, 4)), ((9, 16), (16,))])
def test_matches_reference_fp32(shape, normalized, weight, bias):
    x = torch.randn(shape).requires_grad_()
    check_functional_against_reference(rms_norm, reference, x, normalized, weight, bias)


@pytest.mark.parametrize("weight,bias", AFFINE)
def test_gradcheck_float64(weight, bias):
    check_gradcheck_float64(rms_norm, (2, 3, 5), 5, weight, bias)


def test_gradcheck_float64_several_dims():
    check_gradcheck_float64(rms_norm, (2, 3, 2, 4), (2, 4), True, True)


def test_module_matches_reference_and_state_dict():
    m = randomize(RMSNorm(16, eps=1e-5, bias=True))
    x = torch.randn(2, 3, 16)
    torch.testing.assert_close(m(x), reference(x, (16,), m.weight, m.bias, eps=1e-5))
    assert list(m.state_dict()) == ["weight", "bias"]
    assert list(RMSNorm(16).state_dict()) == ["weight"]
    assert list(RMSNorm(16, elementwise_affine=False).state_dict()) == []
    assert RMSNorm(16).bias is None


def test_repr():
    assert repr(RMSNorm(8)) == "RMSNorm((8,), eps=1e-06, elementwise_affine=True, bias=False)"
    assert repr(RMSNorm2d(8, bias=True)) == "RMSNorm2d(8, eps=1e-06, elementwise_affine=True, bias=True)"


def test_fresh_module_is_plain_rms_and_reset_parameters():
    m = RMSNorm((3, 4), bias=True)
    assert m.normalized_shape == (3, 4) and m.eps == 1e-6 and m.elementwise_affine
    torch.testing.assert_close(m.weight, torch.ones(3, 4))
    torch.testing.assert_close(m.bias, torch.zeros(3, 4))
    with torch.no_grad():
        m.weight.fill_(3.0)
    m.reset_parameters()
    torch.testing.assert_close(m.weight, torch.ones(3, 4))


@pytest.mark.parametrize("channels_last", [False, True])
def test_2d_matches_permuted_reference(channels_last):
    check_2d_against_permuted_reference(RMSNorm2d(8, bias=True), reference, channels_last)


def test_2d_handles_1d_and_3d_spatial():
    m = RMSNorm2d(4)
    for shape in [(2, 4), (2, 4, 7), (2, 4, 3, 3, 3)]:
        x = torch.randn(shape)
        ref = reference(x.movedim(1, -1), (4,)).movedim(-1, 1)
        torch.testing.assert_close(m(x), ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_is_finite_and_close(dtype):
    x = (torch.randn(4, 10, 64) * 30).to(dtype).requires_grad_()
    w = torch.randn(64, requires_grad=True)  # fp32 parameters with a half input
    y = rms_norm(x, 64, w)
    assert y.dtype == dtype
    ref = reference(x.detach().float(), (64,), w.detach())
    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2)
    y.float().square().sum().backward()
    assert x.grad.dtype == dtype and w.grad.dtype == torch.float32
    assert torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()


def test_bf16_under_autocast():
    check_bf16_under_autocast(RMSNorm(32))


@pytest.mark.parametrize("value", [0.0, 5.0, 0.1])
def test_constant_rows_stay_finite(value):
    x = torch.full((3, 16), value)
    x[1] = torch.randn(16)
    x.requires_grad_()
    w = torch.randn(16, requires_grad=True)
    y = rms_norm(x, 16, w)
    y.backward(torch.randn_like(y))
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()
    torch.testing.assert_close(y, reference(x, (16,), w))


def test_non_contiguous_input():
    x = torch.randn(16, 6, 5).transpose(0, 2)  # [5, 6, 16], not contiguous
    w = torch.randn(16)
    torch.testing.assert_close(rms_norm(x, 16, w), reference(x, (16,), w))


def test_works_under_no_grad_and_with_frozen_params():
    m = RMSNorm(8).requires_grad_(False)
    x = torch.randn(3, 8, requires_grad=True)
    y = m(x)
    (g,) = torch.autograd.grad(y.sum(), x)
    (want,) = torch.autograd.grad(reference(x, (8,), m.weight).sum(), x)
    torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(m(x), reference(x, (8,), m.weight))


def test_bad_arguments_raise_value_errors():
    with pytest.raises(ValueError, match="normalized_shape"):
        RMSNorm(0)
    with pytest.raises(ValueError, match="normalized_shape"):
        RMSNorm("16")
    with pytest.raises(ValueError, match="eps"):
        RMSNorm(16, eps=-1.0)
    with pytest.raises(ValueError, match="num_channels"):
        RMSNorm2d(2.5)
    with pytest.raises(NormSwapError, match="last 1 dim"):
        RMSNorm(16)(torch.randn(2, 8))
    with pytest.raises(NormSwapError, match="channels-first"):
        RMSNorm2d(16)(torch.randn(2, 8, 4, 4))
    with pytest.raises(NormSwapError, match="weight"):
        rms_norm(torch.randn(2, 8), 8, torch.ones(4))


def test_torch_compile_eager_backend():
    check_torch_compile_eager(RMSNorm(16, bias=True))


def test_is_a_module_swap_for_layer_norm_shapes():
    # Same constructor arguments as nn.LayerNorm for the common case.
    ln = nn.LayerNorm(24)
    m = RMSNorm(ln.normalized_shape, eps=ln.eps)
    assert m.normalized_shape == ln.normalized_shape
    assert m(torch.randn(2, 24)).shape == (2, 24)


def test_output_allows_in_place_ops_after_the_norm():
    """A fused ReLU(inplace=True) after the norm (timm's norm-act layers) must work and keep gradients right."""
    from normswap.norms.bert_layer_norm import BertLayerNorm, BertLayerNorm2d
    from normswap.norms.rms_norm import RMSNorm2d

    cases = [(RMSNorm(8), (3, 5, 8)), (RMSNorm2d(8), (2, 8, 3, 3)), (BertLayerNorm(8), (3, 5, 8)),
             (BertLayerNorm2d(8), (2, 8, 3, 3))]
    for layer, shape in cases:
        x = torch.randn(shape, requires_grad=True)
        y = torch.relu_(layer(x))
        y.sum().backward()
        ref_x = x.detach().clone().requires_grad_(True)
        torch.relu(layer(ref_x)).sum().backward()
        torch.testing.assert_close(x.grad, ref_x.grad)
