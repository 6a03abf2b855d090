"""Helpers shared by the tests of the norm layers (``tests/test_norms_*.py``): random affine parameters,
plain-autograd references, and the checks every row norm goes through."""

import torch

AFFINE = [(True, True), (True, False), (False, False), (False, True)]


def affine_params(shape, dtype, weight, bias):
    """Random ``weight`` / ``bias`` tensors that require grad, or ``None`` where the flag is off."""
    w = torch.randn(shape, dtype=dtype).requires_grad_() if weight else None
    b = torch.randn(shape, dtype=dtype).requires_grad_() if bias else None
    return w, b


def affine(y, weight, bias):
    """``y * weight + bias`` in plain autograd ops, each part left out where it is ``None``."""
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def grads(y, inputs, gy):
    """Gradients of ``y`` (with output gradient ``gy``) for the ``inputs`` that are not ``None``."""
    return torch.autograd.grad(y, [t for t in inputs if t is not None], gy)


def assert_grads_close(y, ref, inputs):
    """``y`` and ``ref`` give the same gradients to ``inputs`` for one random output gradient."""
    gy = torch.randn_like(ref)
    for got, want in zip(grads(y, inputs, gy), grads(ref, inputs, gy)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def randomize(m):
    """Draw a norm layer's affine parameters from N(0, 1) (the layer unchanged when it has none)."""
    with torch.no_grad():
        if m.weight is not None:
            m.weight.normal_()
            m.bias.normal_()
    return m


def check_gradcheck_float64(fn, x_shape, normalized, weight, bias, **kwargs):
    """``torch.autograd.gradcheck`` of ``fn(x, normalized, w, b, **kwargs)`` in float64."""
    x = torch.randn(x_shape, dtype=torch.float64, requires_grad=True)
    w, b = affine_params(normalized, torch.float64, weight, bias)
    assert torch.autograd.gradcheck(lambda x, w, b: fn(x, normalized, w, b, **kwargs), (x, w, b))


def check_functional_against_reference(fn, reference, x, normalized, weight, bias):
    """``fn(x, normalized, w, b, eps=1e-5)`` matches ``reference`` in output and gradients, fp32."""
    w, b = affine_params(normalized, torch.float32, weight, bias)
    y = fn(x, normalized, w, b, eps=1e-5)
    ref = reference(x, normalized, w, b, eps=1e-5)
    torch.testing.assert_close(y, ref)
    assert_grads_close(y, ref, (x, w, b))


def check_2d_against_permuted_reference(m, reference, channels_last):
    """A channels-first norm ``m`` over 8 channels equals ``reference`` on the channels-last permuted input."""
    randomize(m)
    x = torch.randn(2, 8, 5, 3)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    y = m(x)
    ref = reference(x.permute(0, 2, 3, 1), (8,), m.weight, m.bias).permute(0, 3, 1, 2)
    torch.testing.assert_close(y, ref)
    assert_grads_close(y, ref, (x, m.weight, m.bias))
    assert list(m.state_dict()) == ["weight", "bias"]


def check_bf16_under_autocast(m):
    """A norm over 32 features gives bf16 outputs and finite gradients under CPU autocast."""
    x = torch.randn(5, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(m.weight.grad).all()


def check_torch_compile_eager(m):
    """``torch.compile(m, backend="eager", fullgraph=True)`` (16 features) runs, matches ``m`` and backprops."""
    x = torch.randn(4, 16, requires_grad=True)
    compiled = torch.compile(m, backend="eager", fullgraph=True)
    y = compiled(x)
    torch.testing.assert_close(y, m(x))
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
