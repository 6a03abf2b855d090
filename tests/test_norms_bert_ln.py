"""BertLayerNorm / BertLayerNorm2d / bert_layer_norm against the Annotated Transformer's python-ops formula."""

from __future__ import annotations

import pytest
import torch

from normswap.errors import NormSwapError
from normswap.norms.bert_layer_norm import BertLayerNorm, BertLayerNorm2d, bert_layer_norm

from norm_helpers import (AFFINE, affine, check_2d_against_permuted_reference, check_bf16_under_autocast,
                      check_functional_against_reference, check_gradcheck_float64, check_torch_compile_eager, grads,
                      randomize)

pytestmark = pytest.mark.usefixtures("one_thread", "native_path")


def reference(x, normalized_shape, weight=None, bias=None, eps=1e-6):
    """weight * (x - mean) / (std_unbiased + eps) + bias over the flattened trailing dims, in python ops."""
    flat = x.flatten(-len(normalized_shape))
    mean = flat.mean(-1, keepdim=True)
    std = flat.std(-1, keepdim=True)
    return affine(((flat - mean) / (std + eps)).view(x.shape), weight, bias)


@pytest.mark.parametrize("weight,bias", AFFINE)
@pytest.mark.parametrize("shape,normalized", [((4, 7, 32), (32,)), ((3, 5, 6, 4), (6, 4)), ((9, 16), (16,))])
def test_matches_python_formula_fp32(shape, normalized, weight, bias):
    x = (torch.randn(shape) * 2 + 0.5).requires_grad_()
    check_functional_against_reference(bert_layer_norm, reference, x, normalized, weight, bias)


def test_eps_is_added_to_the_unbiased_std():
    # Distinguishes the BERT formula from nn.LayerNorm: a large eps makes the difference visible.
    x = torch.randn(4, 10)
    y = bert_layer_norm(x, 10, eps=0.5)
    want = (x - x.mean(-1, keepdim=True)) / (x.std(-1, unbiased=True, keepdim=True) + 0.5)
    torch.testing.assert_close(y, want)
    assert not torch.allclose(y, torch.nn.functional.layer_norm(x, (10,), eps=0.5), atol=1e-3)


@pytest.mark.parametrize("weight,bias", AFFINE)
def test_gradcheck_float64(weight, bias):
    check_gradcheck_float64(bert_layer_norm, (2, 3, 5), 5, weight, bias)


def test_gradcheck_float64_several_dims_and_large_eps():
    check_gradcheck_float64(bert_layer_norm, (2, 3, 2, 4), (2, 4), True, True, eps=0.3)


def test_module_matches_reference_and_state_dict():
    m = randomize(BertLayerNorm(16, eps=1e-5))
    x = torch.randn(2, 3, 16)
    torch.testing.assert_close(m(x), reference(x, (16,), m.weight, m.bias, eps=1e-5))
    assert list(m.state_dict()) == ["weight", "bias"]
    assert list(BertLayerNorm(16, bias=False).state_dict()) == ["weight"]
    assert list(BertLayerNorm(16, elementwise_affine=False).state_dict()) == []


def test_fresh_module_and_reset_parameters():
    m = BertLayerNorm((3, 4))
    assert m.normalized_shape == (3, 4) and m.eps == 1e-6 and m.elementwise_affine
    with torch.no_grad():
        m.weight.fill_(2.0)
        m.bias.fill_(1.0)
    m.reset_parameters()
    torch.testing.assert_close(m.weight, torch.ones(3, 4))
    torch.testing.assert_close(m.bias, torch.zeros(3, 4))


def test_repr():
    assert repr(BertLayerNorm(8)) == "BertLayerNorm((8,), eps=1e-06, elementwise_affine=True, bias=True)"
    assert repr(BertLayerNorm2d(8, bias=False)) == "BertLayerNorm2d(8, eps=1e-06, elementwise_affine=True, bias=False)"


@pytest.mark.parametrize("channels_last", [False, True])
def test_2d_matches_permuted_reference(channels_last):
    check_2d_against_permuted_reference(BertLayerNorm2d(8), reference, channels_last)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_is_finite_and_close(dtype):
    x = (torch.randn(4, 10, 64) * 30 + 100).to(dtype).requires_grad_()
    w = torch.randn(64, requires_grad=True)  # fp32 parameters with a half input
    b = torch.randn(64, requires_grad=True)
    y = bert_layer_norm(x, 64, w, b)
    assert y.dtype == dtype
    ref = reference(x.detach().float(), (64,), w.detach(), b.detach())
    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=3e-2)
    y.float().square().sum().backward()
    assert x.grad.dtype == dtype and w.grad.dtype == torch.float32
    for g in (x.grad, w.grad, b.grad):
        assert torch.isfinite(g).all()


def test_bf16_under_autocast():
    check_bf16_under_autocast(BertLayerNorm(32))


@pytest.mark.parametrize("value", [0.0, 5.0, -3.25])
def test_constant_rows_match_the_formula_without_nan(value):
    # Exactly representable constants: the row mean is exact, so x - mean is exactly 0 in both.
    x = torch.full((3, 16), value)
    x[1] = torch.randn(16)
    x.requires_grad_()
    w = torch.randn(16, requires_grad=True)
    b = torch.randn(16, requires_grad=True)
    y = bert_layer_norm(x, 16, w, b)
    ref = reference(x, (16,), w, b)
    torch.testing.assert_close(y, ref)
    gy = torch.randn_like(y)
    for got, want in zip(grads(y, (x, w, b), gy), grads(ref, (x, w, b), gy)):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-2)  # the constant row's dx is ~1e6 large


def test_inexact_constant_row_stays_finite():
    x = torch.full((2, 16), 0.1, requires_grad=True)
    y = bert_layer_norm(x, 16, eps=1e-12)
    y.backward(torch.randn_like(y))
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()


def test_bad_arguments_raise_value_errors():
    with pytest.raises(ValueError, match="at least 2"):
        BertLayerNorm(1)
    with pytest.raises(ValueError, match="at least 2"):
        bert_layer_norm(torch.randn(3, 1), 1)
    with pytest.raises(ValueError, match="eps"):
        BertLayerNorm(16, eps=float("nan"))
    with pytest.raises(NormSwapError, match="last 1 dim"):
        BertLayerNorm(16)(torch.randn(2, 8))
    with pytest.raises(NormSwapError, match="floating-point"):
        BertLayerNorm(4)(torch.ones(2, 4, dtype=torch.long))


def test_torch_compile_eager_backend():
    check_torch_compile_eager(BertLayerNorm(16))
