"""LayerNorm over the channel dim (dim 1) of an ``[N, C, *]`` tensor.

Ba et al. 2016, "Layer Normalization", applied per position over channels as ConvNeXt does (timm
``LayerNorm2d``), for any number of spatial dims, so it can stand in for BatchNorm1d/2d/3d.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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
        y = F.layer_norm(x.movedim(1, -1), self.normalized_shape, self.weight, self.bias, self.eps)
        return y.movedim(-1, 1)
