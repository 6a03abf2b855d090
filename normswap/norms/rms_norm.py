"""Root-mean-square layer normalization (Zhang & Sennrich, 2019, "Root Mean Square Layer Normalization").

RMSNorm rescales each row by the inverse of its root mean square, without subtracting the mean:

    y = x / sqrt(mean(x ** 2) + eps) * weight (+ bias)

Implementation notes (measured on a 2-core CPU, fp32):

* ``torch.nn.functional.rms_norm`` runs as a chain of small autograd ops and its fwd+bwd is ~4x slower than
  ``nn.LayerNorm``; here the layer is one :class:`torch.autograd.Function`.
* Every fresh full-size tensor costs page faults and cache misses, so the forward allocates only the output
  and saves the *input* (which the caller keeps alive anyway) plus one scalar per row.
* The backward reuses torch's fused layer-norm backward kernel: with ``mean = 0`` and our ``rstd`` that kernel
  sees exactly the RMS-normalized input, and returns the RMSNorm weight gradient as is. Its input gradient
  has one extra term, ``-rstd * mean(dy * weight)`` per row (the derivative of the mean LayerNorm subtracts);
  adding it back costs one matrix-vector product and one in-place row update.
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
_layer_norm_backward = torch.ops.aten.native_layer_norm_backward


# ----------------------------------------------------------------------------------------------------------
# Helpers, shared with normswap.norms.bert_layer_norm.
# ----------------------------------------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are computed in: half types are too coarse for sums over hundreds of values."""
    return torch.float32 if dtype in _HALF_DTYPES else dtype


def _no_autocast(device_type: str) -> contextlib.AbstractContextManager:
    """Switch autocast off inside the hand-written kernels.

    CUDA autocast runs ``mv`` in fp16, which would ruin the row reductions; the kernels pick every dtype
    explicitly instead. The check keeps the common (autocast off) path free of a context switch.
    """
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def _check_shape(normalized_shape: int | Sequence[int], what: str = "normalized_shape") -> tuple[int, ...]:
    """Validate a user-given ``normalized_shape`` and return it as a tuple of positive ints."""
    if isinstance(normalized_shape, bool):
        raise OptionError(f"{what} must be an int or a sequence of ints, got {normalized_shape!r}.")
    if isinstance(normalized_shape, numbers.Integral):
        shape: tuple[int, ...] = (int(normalized_shape),)
    elif isinstance(normalized_shape, Sequence) and not isinstance(normalized_shape, str):
        if not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in normalized_shape):
            raise OptionError(f"{what} must contain only ints, got {normalized_shape!r}.")
        shape = tuple(int(s) for s in normalized_shape)
    else:
        raise OptionError(f"{what} must be an int or a sequence of ints, got {normalized_shape!r}.")
    if not shape:
        raise OptionError(f"{what} must name at least one dimension, got an empty shape.")
    if any(s < 1 for s in shape):
        raise OptionError(f"every entry of {what} must be >= 1, got {shape}.")
    return shape


def _check_channels(num_channels: int) -> int:
    if isinstance(num_channels, bool) or not isinstance(num_channels, numbers.Integral) or num_channels < 1:
        raise OptionError(f"num_channels must be an int >= 1, got {num_channels!r}.")
    return int(num_channels)


def _check_eps(eps: float) -> float:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not math.isfinite(eps) or eps < 0:
        raise OptionError(f"eps must be a finite number >= 0, got {eps!r}.")
    return float(eps)


def _check_input(x: Tensor, shape: tuple[int, ...], name: str) -> None:
    if not isinstance(x, Tensor):
        raise NormSwapError(f"{name}: expected a tensor, got {type(x).__name__}.")
    if not x.is_floating_point():
        raise NormSwapError(f"{name}: expected a floating-point input, got dtype {x.dtype}.")
    k = len(shape)
    if x.dim() < k or tuple(x.shape[x.dim() - k :]) != shape:
        raise NormSwapError(
            f"{name}: expected an input whose last {k} dim(s) are {list(shape)}, got shape {list(x.shape)}."
        )


def _check_param(p: Tensor | None, shape: tuple[int, ...], what: str, name: str) -> None:
    if p is not None and tuple(p.shape) != shape:
        raise NormSwapError(f"{name}: {what} must have shape {list(shape)}, got {list(p.shape)}.")


def _check_channels_first(x: Tensor, num_channels: int, name: str) -> None:
    if not isinstance(x, Tensor) or x.dim() < 2 or x.shape[1] != num_channels:
        shape = list(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise NormSwapError(f"{name}: expected a channels-first input [N, {num_channels}, *], got {shape}.")
    if not x.is_floating_point():
        raise NormSwapError(f"{name}: expected a floating-point input, got dtype {x.dtype}.")


def _flat(p: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A parameter as a 1-D tensor of the compute dtype (no copy when it already is one)."""
    if p is None:
        return None
    p = p.reshape(-1)
    return p if p.dtype == dtype else p.to(dtype)


def _apply_rows(fn, x: Tensor, dims: int, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """Run a row kernel over the last ``dims`` dims of ``x``, flattened into one row per leading index.

    The reshapes happen here, outside the kernel, so the kernel's output is not a view made inside an
    autograd Function: an in-place op after the norm (``ReLU(inplace=True)``) must be allowed on it.
    """
    d = math.prod(x.shape[x.dim() - dims :])
    return fn(x.reshape(-1, d), weight, bias, eps, d).view(x.shape)


def _apply_channels_first(fn, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """Run a row kernel over dim 1 of an [N, C, *] input.

    The channels are moved last as a view; for a channels_last input that view is already contiguous rows,
    otherwise the reshape copies once (as timm's ``LayerNorm2d`` does through ``permute``). The result is
    returned in channels-last memory layout, viewed back as [N, C, *].
    """
    moved = x.permute(0, *range(2, x.dim()), 1)
    y = fn(moved.reshape(-1, x.shape[1]), weight, bias, eps, x.shape[1]).view(moved.shape)
    return y.permute(0, x.dim() - 1, *range(1, x.dim() - 1))


# ----------------------------------------------------------------------------------------------------------
# Kernel.
# ----------------------------------------------------------------------------------------------------------


class _RMSNormRows(torch.autograd.Function):
    """RMSNorm over the trailing ``d`` elements of each row of ``x`` (any shape whose numel divides by d)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, d: int) -> Tensor:
        cdt = _compute_dtype(x.dtype)
        with _no_autocast(x.device.type):
            x2 = x.reshape(-1, d)
            xc = x2 if x2.dtype == cdt else x2.to(cdt)
            w = _flat(weight, cdt)
            # One fused read of x for the row statistics; the square of the norm is the sum of squares.
            rstd = torch.linalg.vector_norm(xc, dim=1, keepdim=True)
            rstd = rstd.square_().mul_(1.0 / d).add_(eps).rsqrt_()
            # One fresh tensor for the output, then in-place passes over it while it is still in cache.
            b = _flat(bias, cdt)
            fresh = xc is not x2  # an upcast copy of a half input can be overwritten
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
            if y.dtype != x.dtype:
                y = y.to(x.dtype)
        # The input, not the normalized input, is saved: it is alive anyway, so this costs no memory.
        ctx.save_for_backward(x2, rstd, weight)
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.shapes = (x.shape, None if bias is None else bias.shape)
        return y  # x arrives as [rows, d]; a view made here would forbid in-place ops on the output

    @staticmethod
    def backward(ctx, gy: Tensor):
        x, rstd, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        x_shape, b_shape = ctx.shapes
        gx = gw = gb = None
        cdt = rstd.dtype
        d = x.shape[1]
        with _no_autocast(gy.device.type):
            g = gy.reshape(-1, d)
            if g.dtype != cdt:
                g = g.to(cdt)
            if need_x or need_w:
                xc = x if x.dtype == cdt else x.to(cdt)
                # The fused kernel is markedly faster with a weight than without one.
                w = _flat(weight, cdt) if weight is not None else g.new_ones(d)
                gx, gw, _ = _layer_norm_backward(
                    g, xc, (d,), torch.zeros_like(rstd), rstd, w, None, [need_x, need_w, False]
                )
                if need_x:
                    # Undo the kernel's mean-subtraction term: + rstd * mean(dy * w) per row.
                    row = torch.mv(g, w) if weight is not None else g.sum(1)
                    gx.add_(row.unsqueeze(1).mul_(rstd).mul_(1.0 / d))
                    gx = gx.to(x.dtype).view(x_shape)
                if need_w:
                    gw = gw.to(weight.dtype).view(weight.shape)
            if need_b:
                gb = g.sum(0).to(ctx.bias_dtype).view(b_shape)
        return gx, gw, gb, None, None


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
    _check_input(x, shape, "rms_norm")
    _check_param(weight, shape, "weight", "rms_norm")
    _check_param(bias, shape, "bias", "rms_norm")
    return _apply_rows(_RMSNormRows.apply, x, len(shape), weight, bias, _check_eps(eps))


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
        """Set ``weight`` to ones and ``bias`` to zeros, so a fresh layer is a plain RMS normalization."""
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        _check_input(x, self.normalized_shape, type(self).__name__)
        return _apply_rows(_RMSNormRows.apply, x, len(self.normalized_shape), self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return (
            f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}, "
            f"bias={self.bias is not None}"
        )


class RMSNorm2d(RMSNorm):
    """Channels-first RMSNorm: normalizes dim 1 of an [N, C, *] input, e.g. conv feature maps.

    Same parameters as :class:`RMSNorm` with ``normalized_shape == (num_channels,)`` (Zhang & Sennrich, 2019).
    The output uses channels-last memory layout (free for channels_last inputs).

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
        num_channels = _check_channels(num_channels)
        super().__init__(
            num_channels, eps, elementwise_affine=elementwise_affine, bias=bias, device=device, dtype=dtype
        )
        self.num_channels = num_channels

    def forward(self, x: Tensor) -> Tensor:
        _check_channels_first(x, self.num_channels, type(self).__name__)
        return _apply_channels_first(_RMSNormRows.apply, x, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return (
            f"{self.num_channels}, eps={self.eps}, elementwise_affine={self.elementwise_affine}, "
            f"bias={self.bias is not None}"
        )
