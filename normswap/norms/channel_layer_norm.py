"""LayerNorm over the channel dim (dim 1) of an ``[N, C, *]`` tensor.

Ba et al. 2016, "Layer Normalization", applied per position over channels as ConvNeXt does (timm
``LayerNorm2d``), for any number of spatial dims, so it can stand in for BatchNorm1d/2d/3d.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import native, triton_channels
from .eager import route
from .native import has_data
from .op_grads import fake_grads, norm_grads
from .scripted import channels_first


def _native_ok(x: torch.Tensor, *params: torch.Tensor | None) -> bool:
    """The fused kernels apply: float32 CPU, contiguous, float32 parameters."""
    return (x.dim() >= 3 and native.usable(x) and x.is_contiguous()
            and all(p is None or (p.dtype == torch.float32 and type(p.data) is torch.Tensor) for p in params))


def _moved(x: torch.Tensor) -> torch.Tensor:
    """``[N, C, *]`` as ``[N, *, C]`` rows (a copy unless x is channels-last already)."""
    return x.movedim(1, -1).contiguous()


def _forward(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
             eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y, mean, rstd)``: y in x's memory layout, the statistics ``[N, S]`` (S the positions)."""
    n, c = x.shape[:2]
    if triton_channels.usable(x):
        return triton_channels.forward(x, weight, bias, eps)
    if _native_ok(x, weight, bias):
        return native.channel_ln_forward(x, weight, bias, eps)
    y, mean, rstd = torch.native_layer_norm(_moved(x), (c,), weight, bias, eps)
    out = torch.empty_like(x)
    out.copy_(y.movedim(-1, 1))
    return out, mean.reshape(n, -1), rstd.reshape(n, -1)


def _backward(grad: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
              weight: torch.Tensor | None, bias: torch.Tensor | None, need_x: bool, need_weight: bool,
              need_bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    c = x.shape[1]
    if triton_channels.usable(x):
        gx, gw, gb = triton_channels.backward(grad, x, mean, rstd, weight, need_x, need_weight, need_bias)
        gw = gw.to(weight.dtype) if gw is not None else None
        gb = gb.to(bias.dtype) if gb is not None and bias is not None else None
    elif _native_ok(x, weight, bias):
        gx, gw, gb = native.channel_ln_backward(grad, x, mean, rstd, weight, need_x, need_weight, need_bias)
        gw = gw.to(weight.dtype) if gw is not None else None
    else:
        moved = _moved(x)
        stat_shape = (*moved.shape[:-1], 1)
        gx, gw, gb = torch.ops.aten.native_layer_norm_backward(
            _moved(grad), moved, (c,), mean.reshape(stat_shape), rstd.reshape(stat_shape), weight, bias,
            [need_x, need_weight and weight is not None, need_bias and bias is not None])
        if gx is not None:
            gx = torch.empty_like(x).copy_(gx.movedim(-1, 1))
    # each unneeded gradient is its own empty tensor: outputs of a custom op must not alias each other
    return (gx if need_x and gx is not None else x.new_empty(0),
            gw if need_weight and gw is not None else x.new_empty(0),
            gb if need_bias and gb is not None else x.new_empty(0))


channel_layer_norm = torch.library.custom_op(
    "normswap::channel_layer_norm", _forward, mutates_args=(),
    schema="(Tensor x, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor, Tensor)")
_channel_layer_norm_backward = torch.library.custom_op(
    "normswap::channel_layer_norm_backward", _backward, mutates_args=(),
    schema="(Tensor grad, Tensor x, Tensor mean, Tensor rstd, Tensor? weight, Tensor? bias, bool need_x, "
           "bool need_weight, bool need_bias) -> (Tensor, Tensor, Tensor)")


@channel_layer_norm.register_fake
def _(x, weight, bias, eps):
    n = x.shape[0]
    s = x.numel() // max(n * x.shape[1], 1) if n * x.shape[1] else 0
    stat_dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    return torch.empty_like(x), x.new_empty((n, s), dtype=stat_dtype), x.new_empty((n, s), dtype=stat_dtype)


@_channel_layer_norm_backward.register_fake
def _(grad, x, mean, rstd, weight, bias, need_x, need_weight, need_bias):
    return fake_grads(x, weight, bias, need_x, need_weight, need_bias)


def _setup_context(ctx, inputs, output):
    x, weight, bias, eps = inputs
    ctx.save_for_backward(x, weight, bias, output[1], output[2])
    ctx.eps = eps


def _grads(ctx, gy, backward_fn) -> tuple:
    """The autograd gradients of (x, weight, bias, eps) from ``backward_fn`` (the operator or its body)."""
    x, weight, bias, mean, rstd = ctx.saved_tensors
    need = ctx.needs_input_grad[:3]
    return norm_grads(need, lambda x, w, b: channels_first("layer", x, w, b, ctx.eps), x, weight, bias, gy,
                      lambda: backward_fn(gy, x, mean, rstd, weight, bias, *need), 1)


def _autograd_backward(ctx, gy, _gmean, _grstd):
    return _grads(ctx, gy, _channel_layer_norm_backward)


channel_layer_norm.register_autograd(_autograd_backward, setup_context=_setup_context)


class _Eager(torch.autograd.Function):
    """The operator's forward and backward without its dispatch (tens of microseconds a call, as much as the
    norm on a small input), for plain tensors in eager mode (:mod:`normswap.norms.eager`)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        y, mean, rstd = _forward(x, weight, bias, eps)
        _setup_context(ctx, (x, weight, bias, eps), (y, mean, rstd))
        return y

    @staticmethod
    def backward(ctx, gy):
        # a gradient without data (vmapped: autograd.grad(..., is_grads_batched=True)) goes to the backward
        # operator, which torch runs per sample
        return _grads(ctx, gy, _backward if has_data(gy) else _channel_layer_norm_backward)


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over dim 1 of an ``[N, C, *]`` input; keys ``weight``/``bias`` as ``nn.LayerNorm``.

    Example:
        >>> y = ChannelLayerNorm(8)(torch.randn(2, 8, 5, 5))
        >>> bool(torch.allclose(y.mean(1), torch.zeros(2, 5, 5), atol=1e-5))
        True
    """

    def __init__(self, num_channels: int, eps: float = 1e-5, affine: bool = True, *, bias: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__(num_channels, eps=eps, elementwise_affine=affine, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # a static branch: TorchScript compiles only this side
            return channels_first("layer", x, self.weight, self.bias, self.eps)
        if x.dim() <= 2:
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        mixed = x.dtype in (torch.float16, torch.bfloat16) or x.dtype != (self.weight.dtype if self.weight is not None
                                                                          else x.dtype)
        if mixed and not triton_channels.usable(x):
            # half inputs, or parameters of another dtype (autocast): torch's layer norm does the casting
            return channels_first("layer", x, self.weight, self.bias, self.eps)
        way = route(x, self.weight, self.bias)
        if way == "forward":  # inference: no Function needed
            return _forward(x, self.weight, self.bias, self.eps)[0]
        if way == "function":
            return _Eager.apply(x, self.weight, self.bias, self.eps)
        if way == "transform":  # torch.func wrappers or forward-mode tangents: torch ops, which handle them
            return channels_first("layer", x, self.weight, self.bias, self.eps)
        return channel_layer_norm(x, self.weight, self.bias, self.eps)[0]
