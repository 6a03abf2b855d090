"""Root-mean-square layer normalization (Zhang & Sennrich, 2019, "Root Mean Square Layer Normalization").

RMSNorm rescales each row by the inverse of its root mean square, without subtracting the mean:

    y = x / sqrt(mean(x ** 2) + eps) * weight (+ bias)

Implementation notes (measured on a 2-core CPU, fp32):

* ``torch.nn.functional.rms_norm`` runs as a chain of small autograd ops and its fwd+bwd is ~4x slower than
  ``nn.LayerNorm``; here the layer is one ``torch.library`` operator (forward and backward).
* On CPU in float32 (and half inputs, computed in float32) it runs the fused kernels of
  :mod:`normswap.norms.native`: one pass over memory forward, one backward.
* Elsewhere (CUDA, float64, or no C compiler) it runs torch ops. The forward allocates only the output and
  saves the *input* (alive anyway) plus one scalar per row. The backward reuses torch's fused layer-norm
  backward kernel: with ``mean = 0`` and our ``rstd`` that kernel sees exactly the RMS-normalized input, and
  returns the RMSNorm weight gradient as is. Its input gradient has one extra term, ``-rstd * mean(dy *
  weight)`` per row (the derivative of the mean LayerNorm subtracts); adding it back costs one
  matrix-vector product and one in-place row update.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from normswap.norms import native
from normswap.norms.scripted import rms_norm_ops
from normswap.norms.row_norm import (
    ChannelsFirstRowNorm, RowImpl, RowNorm, apply_row_norm, define_row_op, flat_param, layer_norm_backward,
)

__all__ = ["CenteredRMSNorm", "RMSNorm", "RMSNorm2d", "rms_norm"]


# ----------------------------------------------------------------------------------------------------------
# Kernel.
# ----------------------------------------------------------------------------------------------------------


def _forward_torch(
    xc: Tensor, fresh: bool, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor]:
    """RMSNorm of the rows of ``xc`` with torch ops: ``(y, rstd)``; ``fresh``: ``xc`` may be overwritten."""
    cdt, d = xc.dtype, xc.shape[1]
    w = flat_param(weight, cdt)
    # One fused read of x for the row statistics; the square of the norm is the sum of squares.
    rstd = torch.linalg.vector_norm(xc, dim=1, keepdim=True)
    rstd = rstd.square_().mul_(1.0 / d).add_(eps).rsqrt_()
    # One fresh tensor for the output, then in-place passes over it while it is still in cache.
    b = flat_param(bias, cdt)
    if w is None:
        y = xc.mul_(rstd) if fresh else xc * rstd
        if b is not None:
            y.add_(b)
    else:
        y = xc.mul_(w) if fresh else xc * w
        if b is None:
            y.mul_(rstd)
        else:  # y * rstd + bias in one pass
            torch.addcmul(b, y, rstd, out=y)
    return y, rstd


def _backward_torch(
    g: Tensor, xc: Tensor, weight: Tensor | None, stats: Sequence[Tensor], eps: float, need: tuple[bool, bool, bool]
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of :func:`_forward_torch` in the compute dtype, through torch's fused LayerNorm backward."""
    (rstd,) = stats
    need_x, need_w, need_b = need
    gx = gw = None
    d = xc.shape[1]
    if need_x or need_w:
        # The fused kernel is markedly faster with a weight than without one.
        w = flat_param(weight, xc.dtype) if weight is not None else g.new_ones(d)
        gx, gw, _ = layer_norm_backward(g, xc, (d,), torch.zeros_like(rstd), rstd, w, None, [need_x, need_w, False])
        if need_x:
            # Undo the kernel's mean-subtraction term: + rstd * mean(dy * w) per row.
            row = torch.mv(g, w) if weight is not None else g.sum(1)
            gx.add_(row.unsqueeze(1).mul_(rstd).mul_(1.0 / d))
    return gx, gw, g.sum(0) if need_b else None


_IMPL = RowImpl(native.rms_forward, native.rms_backward, _forward_torch, _backward_torch, "rms")


rms_norm_rows = define_row_op("rms_norm_rows", _IMPL, 1)


# ----------------------------------------------------------------------------------------------------------
# Public API.
# ----------------------------------------------------------------------------------------------------------


def rms_norm(x: Tensor, normalized_shape: int | Sequence[int], weight: Tensor | None = None,
             bias: Tensor | None = None, eps: float = 1e-6) -> Tensor:
    """Root-mean-square normalization over the last ``len(normalized_shape)`` dims (Zhang & Sennrich, 2019).

    ``y = x / sqrt(mean(x**2) + eps) * weight + bias``. Half-precision inputs are normalized in float32 and
    returned in their own dtype; ``weight`` / ``bias`` may have another dtype than ``x``.

    Example:
        >>> x = torch.randn(4, 16)
        >>> rms_norm(x, 16, torch.ones(16)).shape
        torch.Size([4, 16])
    """
    return apply_row_norm(rms_norm_rows, x, normalized_shape, weight, bias, eps, "rms_norm")


class RMSNorm(RowNorm):
    """RMSNorm layer over the trailing ``normalized_shape`` dims (Zhang & Sennrich, 2019).

    Parameters are ``weight`` (ones) and, when ``bias=True``, ``bias`` (zeros); both are absent when
    ``elementwise_affine=False``.

    Example:
        >>> norm = RMSNorm(768)
        >>> norm(torch.randn(2, 10, 768)).shape
        torch.Size([2, 10, 768])
    """

    _kernel = rms_norm_rows
    _default_bias = False

    def _ops(self, x: Tensor, ndims: int) -> Tensor:
        return rms_norm_ops(x, ndims, self.weight, self.bias, self.eps)


class CenteredRMSNorm(RMSNorm):
    """RMSNorm whose output rows are shifted to zero mean: ``y - mean(y)`` over the normalized dims.

    What ``convert(model, "rms", exact=True)`` makes of a LayerNorm that *heads* a residual stream (CLIP's
    ``pre_layrnorm``, BLOOM's ``word_embeddings_layernorm``): its input is centered, so the RMSNorm computes
    what the LayerNorm did, and its output is centered so that the stream it starts stays zero-mean.
    Same parameters and keys as :class:`RMSNorm`.

    Example:
        >>> y = CenteredRMSNorm(8)(torch.randn(3, 8))
        >>> bool(y.mean(-1).abs().max() < 1e-6)
        True
    """

    def forward(self, x: Tensor) -> Tensor:
        y = self._normalize(x)
        dims = list(range(-len(self.normalized_shape), 0))
        return y - y.mean(dims, keepdim=True)


class RMSNorm2d(ChannelsFirstRowNorm, RMSNorm):
    """Channels-first RMSNorm: normalizes dim 1 of an [N, C, *] input, e.g. conv feature maps.

    Same parameters as :class:`RMSNorm` with ``normalized_shape == (num_channels,)`` (Zhang & Sennrich, 2019).
    The output uses channels-last memory layout (free for channels_last inputs).

    Example:
        >>> norm = RMSNorm2d(64)
        >>> norm(torch.randn(2, 64, 7, 7)).shape
        torch.Size([2, 64, 7, 7])
    """
