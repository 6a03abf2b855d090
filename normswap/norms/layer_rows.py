"""Plain LayerNorm over the rows of a 2-D tensor as a row kernel (:func:`~normswap.norms.row_norm.define_row_op`):
``y = (x - mean) / sqrt(var + eps) * weight + bias``, the biased variance. What Weight Standardization's
``"inside"`` form computes on a conv weight viewed as ``[out, fan_in]``
(:func:`normswap.norms.std_conv.standardize_weight_fused`).

On CUDA it is one Triton kernel forward and one backward that read the weight in its own dtype (bfloat16
too) with float32 statistics; elsewhere torch's fused LayerNorm kernels (no CPU kernel of its own: torch's
is one already).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from normswap.norms.row_norm import RowImpl, define_row_op, flat_param, layer_norm_backward

__all__ = ["layer_norm_rows"]


def _forward_torch(xc: Tensor, fresh: bool, weight: Tensor | None, bias: Tensor | None,
                   eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(y, mean, rstd)`` of the rows of ``xc`` with torch's fused LayerNorm (``fresh`` is unused)."""
    d = xc.shape[1]
    return torch.native_layer_norm(xc, (d,), flat_param(weight, xc.dtype), flat_param(bias, xc.dtype), eps)


def _backward_torch(g: Tensor, xc: Tensor, weight: Tensor | None, stats: Sequence[Tensor], eps: float,
                    need: tuple[bool, bool, bool]) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of :func:`_forward_torch` through torch's fused LayerNorm backward."""
    mean, rstd = stats
    need_x, need_w, need_b = need
    w = flat_param(weight, xc.dtype)
    b = g.new_zeros(xc.shape[1]) if need_b else None  # the kernel reads only whether a bias exists
    return layer_norm_backward(g, xc, (xc.shape[1],), mean, rstd, w, b, [need_x, need_w and w is not None, need_b])


layer_norm_rows = define_row_op("layer_norm_rows", RowImpl(None, None, _forward_torch, _backward_torch, "layer"), 2)
