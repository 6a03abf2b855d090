"""GroupNorm that keeps a channels_last input channels_last, fused on GPU.

Wu & He 2018, "Group Normalization": statistics over each group of channels of one sample, so the result does
not depend on the batch. :class:`GroupNorm` is ``nn.GroupNorm`` (same constructor, parameters and state-dict
keys) whose forward runs :func:`group_norm`: on a channels_last CUDA tensor the Triton kernels of
:mod:`normswap.norms.triton_groups` (torch's own GroupNorm makes that input contiguous and returns a
contiguous output; under CUDA autocast both compute and return float32), everywhere else ``F.group_norm``,
which is also what ``torch.compile``, ``torch.export`` and ``torch.jit.script`` see, so that the compilers
fuse it with its neighbours.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import triton_groups
from .eager import differentiable, route
from .native import has_data
from .op_grads import fake_grads, norm_grads

_HALF = (torch.float16, torch.bfloat16)


def _sizes(x: Tensor) -> tuple[int, int, int]:
    n, c = x.shape[:2]
    return n, c, x.numel() // (n * c) if n * c else 0


def _like(x: Tensor, t: Tensor) -> Tensor:
    """``t`` (a fresh result of torch's GroupNorm) in ``x``'s dtype and layout: itself when it already is."""
    return t if t.dtype == x.dtype and t.stride() == x.stride() else torch.empty_like(x).copy_(t)


def _forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, groups: int,
             eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(y, mean, rstd)``: ``y`` in ``x``'s layout and dtype, the statistics ``[N, G]`` (float32 for half
    inputs), on the Triton kernels where they apply, else on torch's GroupNorm."""
    if triton_groups.usable(x):
        return triton_groups.forward(x, weight, bias, groups, eps)
    cdt = torch.float32 if x.dtype in _HALF else x.dtype
    n, c, s = _sizes(x)
    y, mean, rstd = torch.native_group_norm(x.to(cdt), None if weight is None else weight.to(cdt),
                                            None if bias is None else bias.to(cdt), n, c, s, groups, eps)
    return _like(x, y), mean, rstd


def _backward(grad: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor | None, bias: Tensor | None,
              groups: int, need_x: bool, need_weight: bool, need_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    need = (need_x, need_weight and weight is not None, need_bias and bias is not None)
    if triton_groups.usable(x):
        gx, gw, gb = triton_groups.backward(grad, x, mean, rstd, weight, groups, need)
    else:
        cdt = mean.dtype
        n, c, s = _sizes(x)
        gx, gw, gb = torch.ops.aten.native_group_norm_backward(
            grad.to(cdt), x.to(cdt), mean, rstd, None if weight is None else weight.to(cdt), n, c, s, groups,
            list(need))
        if gx is not None:
            gx = _like(x, gx)
    # each gradient not asked for is its own empty tensor: outputs of a custom op must not alias each other
    return (gx if need[0] else x.new_empty(0), gw.to(weight.dtype) if need[1] else x.new_empty(0),
            gb.to(bias.dtype) if need[2] else x.new_empty(0))


group_norm_op = torch.library.custom_op(
    "normswap::group_norm", _forward, mutates_args=(),
    schema="(Tensor x, Tensor? weight, Tensor? bias, int groups, float eps) -> (Tensor, Tensor, Tensor)")
_group_norm_backward = torch.library.custom_op(
    "normswap::group_norm_backward", _backward, mutates_args=(),
    schema="(Tensor grad, Tensor x, Tensor mean, Tensor rstd, Tensor? weight, Tensor? bias, int groups, "
           "bool need_x, bool need_weight, bool need_bias) -> (Tensor, Tensor, Tensor)")


@group_norm_op.register_fake
def _(x, weight, bias, groups, eps):
    stat = {"dtype": torch.float32 if x.dtype in _HALF else x.dtype}
    return torch.empty_like(x), x.new_empty((x.shape[0], groups), **stat), x.new_empty((x.shape[0], groups), **stat)


@_group_norm_backward.register_fake
def _(grad, x, mean, rstd, weight, bias, groups, need_x, need_weight, need_bias):
    return fake_grads(x, weight, bias, need_x, need_weight, need_bias)


def _save(ctx, x, weight, bias, mean, rstd, groups, eps) -> None:
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.groups, ctx.eps = groups, eps


def _grads(ctx, gy, backward_fn) -> tuple:
    """The autograd gradients of (x, weight, bias, groups, eps) from ``backward_fn`` (the operator or its body)."""
    x, weight, bias, mean, rstd = ctx.saved_tensors
    need = ctx.needs_input_grad[:3]
    cdt = mean.dtype

    def formula(x: Tensor, w: Tensor | None, b: Tensor | None) -> Tensor:
        return F.group_norm(x.to(cdt), ctx.groups, None if w is None else w.to(cdt),
                            None if b is None else b.to(cdt), ctx.eps).to(x.dtype)

    return norm_grads(need, formula, x, weight, bias, gy,
                      lambda: backward_fn(gy, x, mean, rstd, weight, bias, ctx.groups, *need), 2)


def _setup_context(ctx, inputs, output):
    x, weight, bias, groups, eps = inputs
    _save(ctx, x, weight, bias, output[1], output[2], groups, eps)
    ctx.mark_non_differentiable(output[1], output[2])


def _autograd_backward(ctx, gy, _gmean, _grstd):
    return _grads(ctx, gy, _group_norm_backward)


group_norm_op.register_autograd(_autograd_backward, setup_context=_setup_context)
# CUDA autocast runs torch's group_norm in float32 (half inputs give a float32 output): the operator too
group_norm_op.register_autocast("cuda", torch.float32)


class _Eager(torch.autograd.Function):
    """The operator's forward and backward without its dispatch (tens of microseconds a call), for plain
    tensors in eager mode; tracing, compiling and tensor subclasses get the operator."""

    @staticmethod
    def forward(ctx, x, weight, bias, groups, eps):
        y, mean, rstd = _forward(x, weight, bias, groups, eps)
        _save(ctx, x, weight, bias, mean, rstd, groups, eps)
        return y

    @staticmethod
    def backward(ctx, gy):
        # a gradient without data (vmapped: autograd.grad(..., is_grads_batched=True)) goes to the backward
        # operator, which torch runs per sample
        return _grads(ctx, gy, _backward if has_data(gy) else _group_norm_backward)


def _autocast_inputs(*tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """What CUDA autocast gives the operator (registered above): half tensors as float32."""
    return tuple(t.float() if t is not None and t.dtype in _HALF else t for t in tensors)


def _valid(x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None) -> bool:
    """The arguments F.group_norm would accept (anything else goes there, for torch's own error)."""
    c = x.shape[1]
    return (num_groups > 0 and c % num_groups == 0
            and all(p is None or (p.shape == (c,) and p.device == x.device) for p in (weight, bias)))


def group_norm(x: Tensor, num_groups: int, weight: Tensor | None = None, bias: Tensor | None = None,
               eps: float = 1e-5) -> Tensor:
    """``F.group_norm``, on the fused kernels for a channels_last CUDA input (output channels_last too).

    Example:
        >>> x = torch.randn(2, 8, 4, 4).to(memory_format=torch.channels_last)
        >>> bool(torch.allclose(group_norm(x, 2), F.group_norm(x, 2), atol=1e-6))
        True
    """
    if not torch.compiler.is_compiling() and triton_groups.usable(x) and _valid(x, num_groups, weight, bias):
        way = route(x, weight, bias)
        if way == "operator":
            return group_norm_op(x, weight, bias, num_groups, eps)[0]
        if way != "transform":  # torch.func wrappers, forward-mode tangents: torch's GroupNorm handles them
            if x.is_cuda and torch.is_autocast_enabled("cuda"):
                x, weight, bias = _autocast_inputs(x, weight, bias)
            if differentiable(x, weight, bias):
                return _Eager.apply(x, weight, bias, num_groups, eps)
            return _forward(x, weight, bias, num_groups, eps)[0]  # inference: no Function needed
    return F.group_norm(x, num_groups, weight, bias, eps)  # torch's checks and errors for anything else


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` (same arguments and keys) that runs :func:`group_norm`.

    Example:
        >>> gn = GroupNorm(2, 8)
        >>> y = gn(torch.randn(3, 8, 5, 5))
        >>> bool(torch.allclose(y.reshape(3, 2, -1).mean(-1), torch.zeros(3, 2), atol=1e-5))
        True
    """

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():  # a static branch: TorchScript compiles only this side
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
