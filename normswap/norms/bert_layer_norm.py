"""The "BERT LayerNorm" of the Annotated Transformer (Rush, 2018) used by early BERT ports (Devlin et al., 2019).

It differs from ``nn.LayerNorm`` in two ways: the standard deviation is the *unbiased* one, and ``eps`` is
added to the standard deviation instead of the variance:

    y = weight * (x - mean) / (x.std(-1, unbiased=True) + eps) + bias

Implementation notes (measured on a 2-core CPU, fp32): the python-ops formula above runs as ~8 autograd ops,
each allocating a full-size tensor. Here the layer is one ``torch.library`` operator (forward and backward). On CPU in float32
(and half inputs, computed in float32) it runs the fused kernels of :mod:`normswap.norms.native`: one pass
over memory forward, one backward. Elsewhere (CUDA, float64, or no C compiler) it is built on torch's fused
layer-norm kernels:

* Forward: the fused LayerNorm forward (with a negligible variance epsilon) returns the row mean, the exact
  biased variance (through its ``rstd``) and ``(x - mean) * rstd * weight`` in one pass; rescaling each row
  by ``(1 / (std_unbiased + eps)) / rstd`` turns that into the BERT output.
* Backward: with ``u = alpha * (x - mean)`` as its input, ``mean = 0`` and ``rstd = 1 / (std_unbiased + eps)``,
  the fused LayerNorm backward computes exactly the BERT input gradient when
  ``alpha**2 = D * (std + eps) / ((D - 1) * std)``: the kernel's ``x``-coefficient ``-sum(dy*w*u) * rstd**3 / D``
  then equals the BERT one, ``-sum(dy*w*(x-mean)) * rstd**2 / ((D-1) * std)``. Feeding the kernel the centred
  input (rather than ``x`` and ``mean``) also avoids the cancellation ``sum(dy*w*x) - mean*sum(dy*w)``, which
  this layer would amplify by ``1 / std``. A second, input-gradient-free call of the kernel with the real
  ``x`` and ``mean`` returns the weight and bias gradients.
* Constant rows: the kernel's variance epsilon (~1e-29 in float32) keeps every statistic finite, so ``std``
  is never exactly 0 and nothing is divided by zero; ``x - mean`` is 0 there, so their input gradient is
  ``rstd * (dy*w - mean(dy*w))``, as autograd of the python formula gives (it masks ``std``'s backward at 0).
* Cost: forward = the fused LayerNorm forward + one in-place pass; backward = two fused LayerNorm backward
  calls + building ``u`` (one subtraction, one in-place scaling).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from normswap.errors import OptionError
from normswap.norms import native
from normswap.norms.scripted import bert_layer_norm_ops
from normswap.norms.row_norm import (
    ChannelsFirstRowNorm, RowImpl, RowNorm, apply_row_norm, define_row_op, flat_param, layer_norm_backward,
)

__all__ = ["BertLayerNorm", "BertLayerNorm2d", "bert_layer_norm"]

_TINY_VAR_EPS = {dt: float(torch.finfo(dt).tiny) ** 0.75 for dt in (torch.float32, torch.float64)}


def _forward_torch(
    xc: Tensor, fresh: bool, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """BERT LayerNorm of the rows of ``xc`` with torch's fused LayerNorm: ``(y, mean, rstd, std)``, the
    statistics laid out as the fused CPU and Triton kernels lay them out (``rstd = 1 / (std + eps)``).

    ``fresh`` is unused: the fused kernel writes a new output anyway."""
    cdt, d = xc.dtype, xc.shape[1]
    # A variance epsilon for the fused kernel that only keeps its rstd finite on constant rows: far below
    # any variance that matters, yet 1/sqrt of it times a row value stays finite (float32 and float64).
    var_eps = _TINY_VAR_EPS.get(cdt, 1e-30)
    # The fused kernel is markedly faster with a weight than without one.
    w = flat_param(weight, cdt) if weight is not None else xc.new_ones(d)
    y, mean, rstd_b = torch.native_layer_norm(xc, (d,), w, None, var_eps)
    # rstd_b = 1 / sqrt(var_biased + var_eps); var_eps is negligible next to eps, so the unbiased std
    # is sqrt(d / (d - 1)) / rstd_b (it stays > 0, which keeps the backward free of 0 / 0).
    std = rstd_b.reciprocal().mul_(math.sqrt(d / (d - 1)))
    rstd = torch.add(std, eps).reciprocal_()
    scale = rstd / rstd_b
    if bias is None:
        y.mul_(scale)
    else:  # y * scale + bias in one pass
        torch.addcmul(flat_param(bias, cdt), y, scale, out=y)
    return y, mean, rstd, std


def _backward_torch(
    g: Tensor, xc: Tensor, weight: Tensor | None, stats: Sequence[Tensor], eps: float, need: tuple[bool, bool, bool]
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of :func:`_forward_torch` in the compute dtype, through torch's fused LayerNorm backward."""
    mean, rstd, std = stats
    need_x, need_w, need_b = need
    gx = gw = gb = None
    d = xc.shape[1]
    w = flat_param(weight, xc.dtype) if weight is not None else g.new_ones(d)
    if need_x:
        # alpha**2 = d (std + eps) / ((d - 1) std); a constant row's std is 0 where the fused kernels computed
        # it (the floor keeps alpha finite: x - mean is 0 there, and so is u)
        c = d / (d - 1)
        floor = math.sqrt(_TINY_VAR_EPS.get(xc.dtype, 1e-30))
        alpha = torch.clamp_min(std, floor).reciprocal_().mul_(c * eps).add_(c).sqrt_()
        u = torch.sub(xc, mean).mul_(alpha)
        gx = layer_norm_backward(g, u, (d,), torch.zeros_like(rstd), rstd, w, None, [True, False, False])[0]
        del u
    if need_w or need_b:
        b = g.new_zeros(d) if need_b else None
        _, gw, gb = layer_norm_backward(g, xc, (d,), mean, rstd, w, b, [False, need_w, need_b])
    return gx, gw, gb


_IMPL = RowImpl(native.bert_forward, native.bert_backward, _forward_torch, _backward_torch, "bert")


bert_layer_norm_rows = define_row_op("bert_layer_norm_rows", _IMPL, 3)


def _check_size(shape: tuple[int, ...], name: str) -> None:
    if math.prod(shape) < 2:
        raise OptionError(
            f"{name}: the unbiased standard deviation needs at least 2 normalized values, got shape {shape}."
        )


def bert_layer_norm(x: Tensor, normalized_shape: int | Sequence[int], weight: Tensor | None = None,
                    bias: Tensor | None = None, eps: float = 1e-6) -> Tensor:
    """BERT-style LayerNorm over the last ``len(normalized_shape)`` dims (Annotated Transformer / Devlin et al.).

    ``y = weight * (x - mean) / (std_unbiased + eps) + bias``, with the statistics taken over all normalized
    dims together. Half-precision inputs are normalized in float32 and returned in their own dtype.

    Example:
        >>> x = torch.randn(4, 16)
        >>> y = bert_layer_norm(x, 16)
        >>> torch.allclose(y, (x - x.mean(-1, keepdim=True)) / (x.std(-1, keepdim=True) + 1e-6), atol=1e-5)
        True
    """
    return apply_row_norm(
        bert_layer_norm_rows, x, normalized_shape, weight, bias, eps, "bert_layer_norm", check_size=_check_size
    )


class BertLayerNorm(RowNorm):
    """BERT-style LayerNorm layer: unbiased std, ``eps`` added to the std (Annotated Transformer / Devlin et al.).

    Parameters are ``weight`` (ones) and ``bias`` (zeros, when ``bias=True``); both are absent when
    ``elementwise_affine=False``.

    Example:
        >>> norm = BertLayerNorm(768)
        >>> norm(torch.randn(2, 10, 768)).shape
        torch.Size([2, 10, 768])
    """

    _check_size = staticmethod(_check_size)
    _kernel = bert_layer_norm_rows
    _default_bias = True

    def _ops(self, x: Tensor, ndims: int) -> Tensor:
        return bert_layer_norm_ops(x, ndims, self.weight, self.bias, self.eps)


class BertLayerNorm2d(ChannelsFirstRowNorm, BertLayerNorm):
    """Channels-first BERT LayerNorm: normalizes dim 1 of an [N, C, *] input (Annotated Transformer / Devlin et al.).

    Same parameters as :class:`BertLayerNorm` with ``normalized_shape == (num_channels,)``; the output uses
    channels-last memory layout (free for channels_last inputs).

    Example:
        >>> norm = BertLayerNorm2d(64)
        >>> norm(torch.randn(2, 64, 7, 7)).shape
        torch.Size([2, 64, 7, 7])
    """
