"""LayerNorm over the channel dim (dim 1) of an ``[N, C, *]`` tensor.

Ba et al. 2016, "Layer Normalization", applied per position over channels as ConvNeXt does (timm
``LayerNorm2d``), for any number of spatial dims, so it can stand in for BatchNorm1d/2d/3d.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import native


class _ChannelLayerNormFunction(torch.autograd.Function):
    """The fused CPU kernels (float32, contiguous): no transposes, each tensor read or written once."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float):
        y, mean, rstd = native.channel_ln_forward(x, weight, bias, eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, gy: torch.Tensor):
        x, weight, mean, rstd = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gx, gw, gb = native.channel_ln_backward(gy, x, mean, rstd, weight, need_x, need_w, need_b)
        if gw is not None:
            gw = gw.to(weight.dtype)
        return gx, gw, gb, None


def _fused_ok(x: torch.Tensor, *params: torch.Tensor | None) -> bool:
    return (x.dim() >= 3 and native.usable(x) and x.is_contiguous()
            and all(p is None or (p.dtype == torch.float32 and type(p.data) is torch.Tensor) for p in params))


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
        if x.dim() <= 2:
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        if _fused_ok(x, self.weight, self.bias):
            return _ChannelLayerNormFunction.apply(x, self.weight, self.bias, self.eps)
        y = F.layer_norm(x.movedim(1, -1), self.normalized_shape, self.weight, self.bias, self.eps)
        return y.movedim(-1, 1)
