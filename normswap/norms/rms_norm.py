"""Root-mean-square layer normalization (Zhang & Sennrich, 2019, "Root Mean Square Layer Normalization").

RMSNorm rescales each row by the inverse of its root mean square, without subtracting the mean:

    y = x / sqrt(mean(x ** 2) + eps) * weight (+ bias)

The forward and backward passes are a hand-written :class:`torch.autograd.Function`. On CPU this is faster
than both ``torch.nn.functional.rms_norm`` (which runs as many small autograd ops) and the fused
``nn.LayerNorm`` kernel (whose backward is comparatively slow): the backward below needs three full-size
elementwise passes and three cheap reductions, and reuses the normalized input saved by the forward.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from normswap.errors import NormSwapError, OptionError

__all__ = ["RMSNorm", "RMSNorm2d", "rms_norm"]

_HALF_DTYPES = (torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------------------
# Helpers shared with the other hand-written norms of this package.
# ----------------------------------------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the statistics are computed in: half types are too coarse for sums over hundreds of values."""
    return torch.float32 if dtype in _HALF_DTYPES else dtype


def _no_autocast(device_type: str) -> contextlib.AbstractContextManager:
    """Switch autocast off inside the hand-written kernels.

    Autocast would silently run ``matmul`` in bf16/fp16 and ruin the reductions that are computed through it;
    every dtype decision inside the kernels is made explicitly instead.
    """
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def _as_param(p: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if p is None else p.to(dtype)


def _check_shape(normalized_shape: int | Sequence[int], what: str = "normalized_shape") -> tuple[int, ...]:
    """Validate a user-given ``normalized_shape`` and return it as a tuple of positive ints."""
    if isinstance(normalized_shape, bool):
        raise OptionError(f"{what} must be an int or a sequence of ints, got {normalized_shape!r}.")
    if isinstance(normalized_shape, numbers.Integral):
        shape: tuple[int, ...] = (int(normalized_shape),)
    elif isinstance(normalized_shape, (Sequence, torch.Size)) and not isinstance(normalized_shape, str):
        shape = tuple(normalized_shape)
        if not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in shape):
            raise OptionError(f"{what} must contain only ints, got {normalized_shape!r}.")
        shape = tuple(int(s) for s in shape)
    else:
        raise OptionError(f"{what} must be an int or a sequence of ints, got {normalized_shape!r}.")
    if not shape:
        raise OptionError(f"{what} must name at least one dimension, got an empty shape.")
    if any(s < 1 for s in shape):
        raise OptionError(f"every entry of {what} must be >= 1, got {shape}.")
    return shape


def _check_eps(eps: float) -> float:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not math.isfinite(eps) or eps < 0:
        raise OptionError(f"eps must be a finite float >= 0, got {eps!r}.")
    return float(eps)


def _check_trailing(x: Tensor, shape: tuple[int, ...], name: str) -> None:
    k = len(shape)
    if x.dim() < k or tuple(x.shape[-k:]) != shape:
        raise NormSwapError(
            f"{name}: expected an input whose last {k} dim(s) are {list(shape)}, got shape {list(x.shape)}."
        )


def _check_param(p: Tensor | None, shape: tuple[int, ...], what: str, name: str) -> None:
    if p is not None and tuple(p.shape) != shape:
        raise NormSwapError(f"{name}: {what} must have shape {list(shape)}, got {list(p.shape)}.")


def _check_channels_first(x: Tensor, num_channels: int, name: str) -> None:
    if x.dim() < 2 or x.shape[1] != num_channels:
        raise NormSwapError(
            f"{name}: expected a channels-first input [N, {num_channels}, *], got shape {list(x.shape)}."
        )


def _as_rows_or_channels(x: Tensor, dims: int, channels_first: bool) -> Tensor:
    """View ``x`` as [R, D] (normalize the last ``dims`` dims) or [N, C, L] (normalize dim 1).

    Both layouts keep the reduced axis explicit so the kernels can use fast 2-D / batched-matmul reductions.
    ``reshape`` only copies when the trailing dims cannot be merged (e.g. a transposed input).
    """
    if channels_first:
        return x.reshape(x.shape[0], x.shape[1], -1)
    return x.reshape(-1, math.prod(x.shape[x.dim() - dims:]))


def _param_view(p: Tensor | None, channels_first: bool) -> Tensor | None:
    """Flatten a parameter to [D] (rows layout) or [C, 1] (channels layout) so it broadcasts over the view."""
    if p is None:
        return None
    return p.reshape(-1, 1) if channels_first else p.reshape(-1)


def _row_dot(t: Tensor, w: Tensor | None, channels_first: bool) -> Tensor:
    """Sum over the normalized axis of ``t * w`` (``w`` None means all ones), keeping that axis as size 1.

    A matrix product reads ``t`` once and writes nothing full-size, unlike ``(t * w).sum(...)``.
    """
    if channels_first:  # t: [N, C, L]
        v = t.new_ones(1, t.shape[1]) if w is None else w.reshape(1, -1)
        return torch.matmul(v, t)  # [N, 1, L]
    if w is None:
        return t.sum(-1, keepdim=True)
    return torch.mv(t, w).unsqueeze(-1)  # [R, 1]


def _param_reduce(t: Tensor, channels_first: bool) -> Tensor:
    """Sum a full-size tensor over everything but the normalized axis (the gradient of a weight or a bias)."""
    return t.sum((0, 2)) if channels_first else t.sum(0)


# ----------------------------------------------------------------------------------------------------------
# Kernel.
# ----------------------------------------------------------------------------------------------------------


class _RMSNormFunction(torch.autograd.Function):
    """RMSNorm on a [R, D] or [N, C, L] view; the normalized axis is 1 in both cases."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, channels_first: bool):
        cdt = _compute_dtype(x.dtype)
        with _no_autocast(x.device.type):
            xc = x.to(cdt)
            w = _as_param(weight, cdt)
            b = _as_param(bias, cdt)
            d = x.shape[1]
            # vector_norm is one fused read of x; squaring its result back is cheaper than a full x * x temp.
            ss = torch.linalg.vector_norm(xc, dim=1, keepdim=True)
            rstd = torch.rsqrt(ss.square_().div_(d).add_(eps))
            if xc is not x:
                xhat = xc.mul_(rstd)  # xc is already a fresh fp32 copy: normalize it in place
            else:
                xhat = xc * rstd
            if w is None:
                y = xhat if bias is None else xhat + b
            elif b is None:
                y = xhat * w
            else:
                y = torch.addcmul(b, xhat, w)
            y = y.to(x.dtype)
        ctx.save_for_backward(xhat, rstd, w)
        ctx.channels_first = channels_first
        ctx.dtypes = (
            x.dtype,
            None if weight is None else weight.dtype,
            None if bias is None else bias.dtype,
        )
        return y

    @staticmethod
    def backward(ctx, gy: Tensor):
        xhat, rstd, w = ctx.saved_tensors
        cf = ctx.channels_first
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gx = gw = gb = None
        with _no_autocast(gy.device.type):
            g = gy.to(xhat.dtype)
            d = xhat.shape[1]
            if w is not None and (need_x or need_w):
                # t = gy * xhat serves both the weight gradient and (through w) the row dot product.
                t = g * xhat
                if need_w:
                    gw = _param_reduce(t, cf).to(w_dtype)
                dot = _row_dot(t, w, cf) if need_x else None
                del t
            elif need_x:
                dot = _row_dot(g * xhat, None, cf)
            if need_x:
                # dL/dx = rstd * (g*w - xhat * mean(g*w*xhat))
                gx = g * w if w is not None else g.clone()
                gx.addcmul_(xhat, dot, value=-1.0 / d).mul_(rstd)
                gx = gx.to(x_dtype)
            if need_b and b_dtype is not None:
                gb = _param_reduce(g, cf).to(b_dtype)
        return gx, gw, gb, None, None


def _rms_norm_impl(
    x: Tensor, dims: int, weight: Tensor | None, bias: Tensor | None, eps: float, channels_first: bool
) -> Tensor:
    view = _as_rows_or_channels(x, dims, channels_first)
    y = _RMSNormFunction.apply(
        view, _param_view(weight, channels_first), _param_view(bias, channels_first), eps, channels_first
    )
    return y.reshape(x.shape)


# ----------------------------------------------------------------------------------------------------------
# Public API.
# ----------------------------------------------------------------------------------------------------------


def rms_norm(
    x: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-6,
) -> Tensor:
    """Root-mean-square normalization over the last ``len(normalized_shape)`` dims (Zhang & Sennrich, 2019).

    ``y = x / sqrt(mean(x**2) + eps) * weight + bias``. Half-precision inputs are normalized in float32 and
    returned in their own dtype; ``weight`` / ``bias`` may have another dtype than ``x``.

    Example:
        >>> x = torch.randn(4, 16)
        >>> rms_norm(x, 16, torch.ones(16)).shape
        torch.Size([4, 16])
    """
    shape = _check_shape(normalized_shape)
    _check_trailing(x, shape, "rms_norm")
    _check_param(weight, shape, "weight", "rms_norm")
    _check_param(bias, shape, "bias", "rms_norm")
    return _rms_norm_impl(x, len(shape), weight, bias, eps, channels_first=False)


class RMSNorm(nn.Module):
    """RMSNorm layer over the trailing ``normalized_shape`` dims (Zhang & Sennrich, 2019).

    Parameters are ``weight`` (ones) and, when ``bias=True``, ``bias`` (zeros); both are absent when
    ``elementwise_affine=False``.

    Example:
        >>> norm = RMSNorm(768)
        >>> norm(torch.randn(2, 10, 768)).shape
        torch.Size([2, 10, 768])
    """

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        eps: float = 1e-6,
        *,
        elementwise_affine: bool = True,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.normalized_shape: tuple[int, ...] = _check_shape(normalized_shape)
        self.eps = _check_eps(eps)
        self.elementwise_affine = bool(elementwise_affine)
        if self.elementwise_affine:
            self.weight = nn.Parameter(torch.empty(self.normalized_shape, **factory))
            if bias:
                self.bias = nn.Parameter(torch.empty(self.normalized_shape, **factory))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Set ``weight`` to ones and ``bias`` to zeros (the identity scale of the paper)."""
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        _check_trailing(x, self.normalized_shape, type(self).__name__)
        return _rms_norm_impl(x, len(self.normalized_shape), self.weight, self.bias, self.eps, False)

    def extra_repr(self) -> str:
        return (
            f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}, "
            f"bias={self.bias is not None}"
        )


class RMSNorm2d(RMSNorm):
    """Channels-first RMSNorm: normalizes dim 1 of an [N, C, *] input (e.g. conv feature maps).

    Same parameters as :class:`RMSNorm` with ``normalized_shape == (num_channels,)`` (Zhang & Sennrich, 2019).

    Example:
        >>> norm = RMSNorm2d(64)
        >>> norm(torch.randn(2, 64, 7, 7)).shape
        torch.Size([2, 64, 7, 7])
    """

    def __init__(
        self,
        num_channels: int,
        eps: float = 1e-6,
        *,
        elementwise_affine: bool = True,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if isinstance(num_channels, bool) or not isinstance(num_channels, numbers.Integral):
            raise OptionError(f"num_channels must be an int, got {num_channels!r}.")
        super().__init__(
            num_channels, eps, elementwise_affine=elementwise_affine, bias=bias, device=device, dtype=dtype
        )
        self.num_channels = int(num_channels)

    def forward(self, x: Tensor) -> Tensor:
        _check_channels_first(x, self.num_channels, type(self).__name__)
        return _rms_norm_impl(x, 1, self.weight, self.bias, self.eps, channels_first=True)

    def extra_repr(self) -> str:
        return (
            f"{self.num_channels}, eps={self.eps}, elementwise_affine={self.elementwise_affine}, "
            f"bias={self.bias is not None}"
        )
