"""Weight Standardization for convolutions, keeping the conv's ``weight`` key.

Qiao et al. 2019, "Micro-Batch Training with Batch-Channel Normalization and Weight Standardization",
and Kolesnikov et al. 2020, "Big Transfer (BiT)". Each output channel's weight is standardized to zero
mean and unit variance before the convolution. Two eps forms exist in real checkpoints:

- ``"inside"`` (timm ``StdConv2d``, BiT): ``(w - mean) / sqrt(var + eps)`` with the biased variance;
- ``"outside"`` (the paper's code): ``(w - mean) / (std + eps)`` with the unbiased std.

A standardized conv is the original conv switched to a subclass (``nn.Conv2d`` -> :class:`StdConv2d`),
so its parameters, hooks and identity stay and ``weight`` stays ``weight`` in the state dict. On CUDA
(Triton installed) the standardization is one fused kernel forward and one backward over the weight as
``[out, fan_in]`` rows (:mod:`normswap.norms.triton_rows`), reading it in its own dtype with float32
statistics; elsewhere, and inside ``torch.compile`` (whose compiler fuses the torch ops itself), torch ops.
In eval mode, with no gradient wanted for the weight, the standardized weight is cached and recomputed only when
the weight changes (a new tensor, an in-place update, a new device or dtype), so inference costs what a
plain conv costs. Writes through ``weight.data`` bypass torch's version counter: call
:func:`clear_ws_cache` after them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import triton_rows
from .bert_layer_norm import bert_layer_norm_rows
from .layer_rows import layer_norm_rows
from .scripted import pad_same_ops

WS_EPS_MODES = ("inside", "outside")


def standardize_weight(weight: torch.Tensor, eps: float = 1e-6, mode: str = "inside") -> torch.Tensor:
    """Standardize a conv weight per output channel (dim 0) over all other dims.

    Example:
        >>> w = standardize_weight(torch.randn(8, 4, 3, 3), eps=1e-10)
        >>> bool(torch.allclose(w.flatten(1).mean(1), torch.zeros(8), atol=1e-5))
        True
    """
    half = weight.dtype == torch.float16 or weight.dtype == torch.bfloat16  # (a form TorchScript compiles too)
    compute = weight.float() if half else weight
    flat = compute.reshape(compute.shape[0], -1)
    if mode == "inside":
        # batch_norm over a [1, out, fan_in] view: the same math in one fused kernel, forward and backward
        out = F.batch_norm(flat.unsqueeze(0), None, None, training=True, momentum=0.0, eps=eps).squeeze(0)
    elif mode == "outside":
        std, mean = torch.std_mean(flat, dim=1, correction=1, keepdim=True)
        out = (flat - mean) / (std + eps)
    else:
        raise ValueError(f"ws eps mode '{mode}' is not one of ('inside', 'outside')")  # TorchScript: no globals
    return out.reshape(weight.shape).to(weight.dtype)


def standardize_weight_fused(weight: torch.Tensor, eps: float = 1e-6, mode: str = "inside") -> torch.Tensor:
    """:func:`standardize_weight` on the fused Triton row kernels where they run (CUDA, eager mode), else
    :func:`standardize_weight` itself: ``"inside"`` is a plain LayerNorm of each ``[fan_in]`` row, ``"outside"``
    the BERT LayerNorm (unbiased std, eps outside). What a standardized conv calls.

    Example:
        >>> w = torch.randn(8, 4, 3, 3)
        >>> torch.equal(standardize_weight_fused(w), standardize_weight(w))  # on the CPU: the same function
        True
    """
    flat = weight.reshape(weight.shape[0], -1)
    if mode in WS_EPS_MODES and not torch.compiler.is_compiling() and triton_rows.usable(flat):
        op = layer_norm_rows if mode == "inside" else bert_layer_norm_rows
        return op(flat, None, None, eps)[0].view(weight.shape)
    return standardize_weight(weight, eps, mode)


class StandardizedConv:
    """Mixin for conv classes: ``standardized_weight()`` with an eval-mode cache; the instance holds
    ``ws_eps`` (float) and ``ws_eps_mode`` (str)."""

    def standardized_weight(self) -> torch.Tensor:
        if torch.jit.is_scripting():  # a static branch: TorchScript compiles only this side (no cache)
            return standardize_weight(self.weight, self.ws_eps, self.ws_eps_mode)
        return self._cached_standardized_weight()

    def _cached_standardized_weight(self) -> torch.Tensor:
        w = self.weight  # type: ignore[attr-defined]
        if (
            self.training  # type: ignore[attr-defined]
            or torch.compiler.is_compiling()
            or (torch.is_grad_enabled() and w.requires_grad)
            # only a weight held as this conv's own parameter is cached: a parametrized or computed weight is a
            # new tensor at every access, whose id and address a later one may reuse
            or self._parameters.get("weight") is not w  # type: ignore[attr-defined]
        ):
            self.__dict__.pop("_ws_cache", None)
            return standardize_weight_fused(w, self.ws_eps, self.ws_eps_mode)
        # the cache holds the weight itself (its identity cannot be reused while cached); every write torch
        # tracks bumps _version, and a new tensor or storage changes the address, dtype or device
        key = (w._version, w.data_ptr(), w.dtype, w.device, torch.is_inference_mode_enabled(), self.ws_eps,
               self.ws_eps_mode)
        cached = self.__dict__.get("_ws_cache")
        if cached is None or cached[0] is not w or cached[1] != key:
            with torch.no_grad():
                cached = (w, key, standardize_weight_fused(w, self.ws_eps, self.ws_eps_mode))
            self.__dict__["_ws_cache"] = cached
        return cached[2]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ws_eps={self.ws_eps}, ws_eps_mode={self.ws_eps_mode!r}"  # type: ignore[misc]


class StdConv1d(StandardizedConv, nn.Conv1d):
    """``nn.Conv1d`` with Weight Standardization (Qiao et al. 2019). Example: see :func:`standardize_conv`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.standardized_weight(), self.bias)


class StdConv2d(StandardizedConv, nn.Conv2d):
    """``nn.Conv2d`` with Weight Standardization (Qiao et al. 2019). Example: see :func:`standardize_conv`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.standardized_weight(), self.bias)


class StdConv3d(StandardizedConv, nn.Conv3d):
    """``nn.Conv3d`` with Weight Standardization (Qiao et al. 2019). Example: see :func:`standardize_conv`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.standardized_weight(), self.bias)


class StdConv2dSame(StandardizedConv, nn.Conv2d):
    """timm ``Conv2dSame`` (TF "SAME" padding) with Weight Standardization."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(pad_same_ops(x, self.kernel_size, self.stride, self.dilation), self.standardized_weight(),
                        self.bias, self.stride, (0, 0), self.dilation, self.groups)


_STD_CLASSES: dict[type, type] = {nn.Conv1d: StdConv1d, nn.Conv2d: StdConv2d, nn.Conv3d: StdConv3d}
_SAME_NAMES = {"timm.layers.conv2d_same.Conv2dSame"}
_CONV_BASES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def ws_skip_reason(conv: nn.Module) -> str | None:
    """Why ``conv`` cannot take Weight Standardization, or ``None`` when it can."""
    if isinstance(conv, StandardizedConv):
        return "already weight-standardized by normswap"
    name = type(conv).__name__
    if "StdConv" in name or "WSConv" in name:
        return f"{name} already standardizes its weight"
    if not isinstance(conv, _CONV_BASES):
        return f"{name} is not an nn.Conv1d/2d/3d (transposed and custom convs are left as they are)"
    if conv.weight[0].numel() <= 1:
        return "fan-in of 1 per output channel: a standardized weight would be all zeros"
    cls = type(conv)
    if cls not in _STD_CLASSES and _qualname(cls) not in _SAME_NAMES:
        base = next(b for b in _CONV_BASES if isinstance(conv, b))
        if cls.forward is not base.forward:
            return f"{name} overrides forward in a way normswap does not know; register it or exclude it"
    return None


def _std_class(cls: type) -> type:
    if cls in _STD_CLASSES:
        return _STD_CLASSES[cls]
    if _qualname(cls) in _SAME_NAMES:
        return StdConv2dSame
    # a subclass that keeps nn.ConvNd's forward: standardize through the matching base class
    base = next(b for b in _CONV_BASES if issubclass(cls, b))
    std = type(f"Std{cls.__name__}", (_STD_CLASSES[base], cls), {"forward": _STD_CLASSES[base].forward})
    _STD_CLASSES[cls] = std
    return std


def standardize_conv(conv: nn.Module, eps: float = 1e-6, mode: str = "inside") -> nn.Module:
    """Turn ``conv`` into its weight-standardized class in place and return it.

    Example:
        >>> conv = standardize_conv(nn.Conv2d(4, 8, 3), eps=1e-6)
        >>> type(conv).__name__, list(conv.state_dict())
        ('StdConv2d', ['weight', 'bias'])
    """
    reason = ws_skip_reason(conv)
    if reason is not None:
        raise ValueError(f"cannot standardize {type(conv).__name__}: {reason}")
    if mode not in WS_EPS_MODES:
        raise ValueError(f"ws eps mode '{mode}' is not one of {WS_EPS_MODES}")
    conv.__class__ = _std_class(type(conv))
    conv.ws_eps = float(eps)
    conv.ws_eps_mode = mode
    return conv


def clear_ws_cache(model: nn.Module) -> None:
    """Drop every cached standardized weight under ``model`` (needed only after writes via ``.data``).

    Example:
        >>> clear_ws_cache(nn.Sequential(standardize_conv(nn.Conv2d(2, 2, 3))))
    """
    for module in model.modules():
        module.__dict__.pop("_ws_cache", None)
