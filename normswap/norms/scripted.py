"""The norms' formulas in plain torch ops, in the subset of python TorchScript compiles.

The layers run operators and fused kernels that TorchScript cannot see (python implementations behind
``torch.library``, ``ctypes`` calls); under ``torch.jit.script`` each layer's ``forward`` takes its
``if torch.jit.is_scripting():`` branch instead, which calls one of these functions (a static branch:
TorchScript compiles only that side). They compute what the layers compute, half inputs in float32, and
are written without ``from __future__ import annotations`` because TorchScript reads the annotations.
"""

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


def _trailing(x: Tensor, ndims: int) -> List[int]:
    return list(range(x.dim() - ndims, x.dim()))


def _compute(x: Tensor) -> Tensor:
    return x.float() if x.dtype == torch.float16 or x.dtype == torch.bfloat16 else x


def _affine(y: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], dtype: torch.dtype) -> Tensor:
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y.to(dtype)


def rms_norm_ops(x: Tensor, ndims: int, weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> Tensor:
    """RMSNorm over the last ``ndims`` dims: ``x / sqrt(mean(x**2) + eps) * weight + bias``.

    Example:
        >>> y = rms_norm_ops(torch.randn(2, 8), 1, None, None, 1e-6)
        >>> bool(torch.allclose(y.pow(2).mean(-1), torch.ones(2), atol=1e-4))
        True
    """
    h = _compute(x)
    y = h * torch.rsqrt(h.pow(2).mean(_trailing(h, ndims), keepdim=True) + eps)
    return _affine(y, weight, bias, x.dtype)


def bert_layer_norm_ops(x: Tensor, ndims: int, weight: Optional[Tensor], bias: Optional[Tensor],
                        eps: float) -> Tensor:
    """The BERT LayerNorm over the last ``ndims`` dims: ``(x - mean) / (std_unbiased + eps) * weight + bias``.

    Example:
        >>> y = bert_layer_norm_ops(torch.randn(2, 8), 1, None, None, 1e-6)
        >>> bool(torch.allclose(y.std(-1), torch.ones(2), atol=1e-4))
        True
    """
    h = _compute(x)
    std, mean = torch.std_mean(h, _trailing(h, ndims), correction=1, keepdim=True)
    return _affine((h - mean) / (std + eps), weight, bias, x.dtype)


def layer_norm_ops(x: Tensor, ndims: int, weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> Tensor:
    """LayerNorm over the last ``ndims`` dims, through ``F.layer_norm``.

    Example:
        >>> layer_norm_ops(torch.randn(2, 3, 8), 1, None, None, 1e-5).shape
        torch.Size([2, 3, 8])
    """
    return F.layer_norm(x, x.shape[x.dim() - ndims:], weight, bias, eps)


def channels_first(kind: str, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> Tensor:
    """The row norm ``kind`` (``"rms"``, ``"bert"`` or ``"layer"``) over dim 1 of an ``[N, C, *]`` input.

    Example:
        >>> channels_first("rms", torch.randn(2, 4, 3, 3), None, None, 1e-6).shape
        torch.Size([2, 4, 3, 3])
    """
    return rows(kind, x.movedim(1, -1), 1, weight, bias, eps).movedim(-1, 1)


def rows(kind: str, x: Tensor, ndims: int, weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> Tensor:
    """The row norm ``kind`` (``"rms"``, ``"bert"`` or ``"layer"``) over the last ``ndims`` dims.

    Example:
        >>> rows("bert", torch.randn(2, 8), 1, None, None, 1e-6).shape
        torch.Size([2, 8])
    """
    if kind == "rms":
        return rms_norm_ops(x, ndims, weight, bias, eps)
    if kind == "bert":
        return bert_layer_norm_ops(x, ndims, weight, bias, eps)
    return layer_norm_ops(x, ndims, weight, bias, eps)


def chunk_sizes(batch: int, values_per_sample: int, virtual_batch_size: int) -> List[int]:
    """Sizes of the virtual batches along dim 0 (Ghost BatchNorm, Hoffer et al. 2017).

    A chunk holding a single value per channel cannot be normalized (its variance is undefined): a trailing
    one joins the chunk before it, and ``virtual_batch_size=1`` on inputs without spatial dims acts as 2.

    Example:
        >>> chunk_sizes(10, 1, 4)
        [4, 4, 2]
    """
    size = virtual_batch_size if virtual_batch_size * values_per_sample > 1 else 2
    sizes = [size] * (batch // size)
    rest = batch - size * len(sizes)
    if rest > 0:
        if rest * values_per_sample == 1 and len(sizes) > 0:
            sizes[-1] += rest
        else:
            sizes.append(rest)
    return sizes


def merged_batch_stats(chunk_mean: Tensor, chunk_var: Tensor, sizes: List[int],
                       values_per_sample: int) -> Tuple[Tensor, Tensor]:
    """The whole batch's mean and unbiased variance from per-chunk ``[chunks, C]`` means and unbiased
    variances (the law of total variance, in float64 so the merge itself is exact).

    Example:
        >>> x = torch.randn(6, 3)
        >>> var, mean = torch.var_mean(x.view(2, 3, 3), 1)
        >>> m, v = merged_batch_stats(mean, var, [3, 3], 1)
        >>> bool(torch.allclose(v.float(), x.var(0)))
        True
    """
    counts = torch.tensor(sizes, dtype=torch.float64, device=chunk_mean.device).mul_(values_per_sample)
    counts = counts.unsqueeze(1)
    total = float(sum(sizes) * values_per_sample)
    means = chunk_mean.double()
    mean = (counts * means).sum(0).div_(total)
    m2 = ((counts - 1) * chunk_var.double() + counts * (means - mean).square()).sum(0)
    return mean, m2.div_(total - 1)


def ghost_batch_norm_train(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], sizes: List[int],
                           eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    """Batch-normalize each virtual batch of ``x`` (``[N, C, *]``) with its own statistics: ``(y, chunk
    means, chunk unbiased variances)``, the statistics ``[chunks, C]`` in float32 (float64 for float64 input).

    Example:
        >>> y, m, v = ghost_batch_norm_train(torch.randn(8, 3, 2, 2), None, None, [4, 4], 1e-5)
        >>> y.shape, m.shape
        (torch.Size([8, 3, 2, 2]), torch.Size([2, 3]))
    """
    h = _compute(x)
    dims = [0] + list(range(2, x.dim()))
    outs: List[Tensor] = []
    means: List[Tensor] = []
    variances: List[Tensor] = []
    for chunk in h.split(sizes):
        var, mean = torch.var_mean(chunk, dims, correction=0, keepdim=True)
        outs.append((chunk - mean) * torch.rsqrt(var + eps))
        n = chunk.numel() // chunk.shape[1]
        means.append(mean.flatten())
        variances.append(var.flatten() * (n / (n - 1)))
    shape = [1, -1] + [1] * (x.dim() - 2)
    y = torch.cat(outs)
    if weight is not None:
        y = y * weight.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y.to(x.dtype), torch.stack(means), torch.stack(variances)


def _same_total(size: int, kernel: int, stride: int, dilation: int) -> int:
    return max((-(-size // stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)


def pad_same_ops(x: Tensor, kernel_size: Tuple[int, int], stride: Tuple[int, int], dilation: Tuple[int, int]) -> Tensor:
    """TF "SAME" padding of an ``[N, C, H, W]`` input for a 2-d conv, computed from the input size (timm's
    ``Conv2dSame``).

    Example:
        >>> pad_same_ops(torch.randn(1, 1, 5, 5), (3, 3), (2, 2), (1, 1)).shape
        torch.Size([1, 1, 7, 7])
    """
    pad_h = _same_total(x.size(-2), kernel_size[0], stride[0], dilation[0])
    pad_w = _same_total(x.size(-1), kernel_size[1], stride[1], dilation[1])
    pads = [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2]  # F.pad takes the last dim first
    return F.pad(x, pads)
