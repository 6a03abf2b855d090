"""Shared machinery of the row-wise norm layers (:mod:`normswap.norms.rms_norm`, :mod:`normswap.norms.bert_layer_norm`).

A *row kernel* is a ``torch.library`` operator made by :func:`define_row_op`, called as ``kernel(x, weight,
bias, eps)`` on a 2-D ``[rows, d]`` input; it normalizes each row and returns ``(y, stats)``, ``y`` a tensor of
its own (never a view of the input, so that an in-place op after the norm, such as ``ReLU(inplace=True)``, is
allowed). Under ``torch.jit.script`` the layers run their formula in torch ops instead
(:mod:`normswap.norms.scripted`). This file holds what the layers built on such kernels share:

* the argument checks (``_check_shape``, ``_check_channels``, ``_check_eps``, ``_check_input``,
  ``_check_param``, ``_check_channels_first``);
* the dtype / autocast helpers the kernels use (``_compute_dtype``, ``_no_autocast``, ``flat_param``);
* ``row_forward`` / ``row_backward``, the body every row kernel shares: pick the fused CPU kernels or the
  torch-ops implementation (a :class:`RowImpl`), handle dtypes, save and restore what the backward needs;
* ``_apply_rows`` and ``_apply_channels_first``, which run a row kernel over the trailing dims or over the
  channel dim (dim 1) of an input, and ``apply_row_norm``, the checked functional form (``rms_norm`` ...);
* :class:`RowNorm`, the layer base (parameters, checks, ``reset_parameters``, ``forward``, ``extra_repr``), and
  :class:`ChannelsFirstRowNorm`, the base of its ``[N, C, *]`` variants. A concrete layer only names its row
  kernel (``_kernel``), its default ``bias`` (``_default_bias``) and, if it needs one, an extra check of the
  normalized size (``_check_size``).
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from normswap.errors import NormSwapError, OptionError
from normswap.norms import native, scripted, triton_rows
from normswap.norms.eager import route
from normswap.norms.op_grads import fake_grads, norm_grads

_HALF_DTYPES = (torch.float16, torch.bfloat16)
layer_norm_backward = torch.ops.aten.native_layer_norm_backward


# ----------------------------------------------------------------------------------------------------------
# Helpers.
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


def _as_rows(t: Tensor, d: int, dtype: torch.dtype) -> Tensor:
    """``t`` as ``[rows, d]`` in the compute dtype (no copy when it already is)."""
    t = t.reshape(-1, d)
    return t if t.dtype == dtype else t.to(dtype)


def _restore(t: Tensor | None, dtype: torch.dtype | None, shape: torch.Size | None) -> Tensor | None:
    """A gradient back in its input's dtype and shape (no op when it already is: the common case)."""
    if t is None:
        return None
    if t.dtype != dtype:
        t = t.to(dtype)
    return t if t.shape == shape else t.view(shape)


@dataclass(frozen=True)
class RowImpl:
    """The two implementations of one row norm, which :func:`row_forward` / :func:`row_backward` choose from.

    * ``native_forward(xc, weight, bias, eps) -> (y, stats)`` and
      ``native_backward(g, xc, stats, weight, need) -> (gx, gw, gb)``: the fused CPU kernels
      (:mod:`normswap.norms.native`), one statistics tensor; ``None`` for a norm that has none;
    * ``torch_forward(xc, fresh, weight, bias, eps) -> (y, *stats)`` and
      ``torch_backward(g, xc, weight, stats, eps, need) -> (gx, gw, gb)``: torch ops, the same statistics
      as the fused kernels, one column each (RMSNorm ``rstd``; BERT ``mean, 1 / (std + eps), std``;
      LayerNorm ``mean, rstd``);
      ``fresh`` says ``xc`` is a private upcast copy the forward may overwrite.

    ``xc`` / ``g`` are ``[rows, d]`` in the compute dtype; ``need`` is (input, weight, bias) gradients wanted.
    ``kind`` (``"rms"``, ``"bert"``, ``"layer"``: a key of ``triton_rows.KINDS``) names the norm's formula: the
    Triton kernels of :mod:`normswap.norms.triton_rows` that run on CUDA tensors where Triton is installed, and
    its forward-mode derivative (:func:`row_tangent`).
    """

    native_forward: Callable | None
    native_backward: Callable | None
    torch_forward: Callable
    torch_backward: Callable
    kind: str


def row_forward(impl: RowImpl, x: Tensor, weight: Tensor | None, bias: Tensor | None,
                eps: float) -> tuple[Tensor, Tensor]:
    """The forward of a row norm on ``x`` ``[rows, d]``: ``(y in x's dtype, stats)``, the statistics in the
    compute dtype as one ``[rows, k]`` tensor, on the fused kernels where they apply, else on torch ops."""
    if impl.native_forward is not None and native.usable(x):  # float32 on a CPU: autocast cannot touch it
        return impl.native_forward(x, weight, bias, eps)
    if triton_rows.usable(x):  # reads x in its own dtype: no upcast copy
        return triton_rows.forward(x, weight, bias, eps, impl.kind)
    cdt = _compute_dtype(x.dtype)
    with _no_autocast(x.device.type):
        xc = x if x.dtype == cdt else x.to(cdt)
        if impl.native_forward is not None and native.usable(xc):
            y, stats = impl.native_forward(xc, weight, bias, eps)
        else:
            y, *parts = impl.torch_forward(xc, xc is not x, weight, bias, eps)
            stats = parts[0] if len(parts) == 1 else torch.cat(parts, 1)
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
    return y, stats


def row_backward(impl: RowImpl, gy: Tensor, x: Tensor, stats: Tensor, weight: Tensor | None, bias: Tensor | None,
                 eps: float, need: tuple[bool, bool, bool]) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The gradients of :func:`row_forward`, each in its input's dtype: on the implementation the forward used
    where the gradient is a plain tensor too, else on torch ops (every implementation of a norm lays out its
    statistics alike, so any backward reads any forward's)."""
    if triton_rows.usable(x) and triton_rows.usable(gy.reshape(x.shape)):
        gx, gw, gb = triton_rows.backward(gy, x, stats, weight, impl.kind, need)
    else:
        cdt = stats.dtype
        with _no_autocast(gy.device.type):
            g = _as_rows(gy, x.shape[1], cdt)
            xc = x if x.dtype == cdt else x.to(cdt)
            if impl.native_backward is not None and native.usable(xc) and native.usable(g):
                gx, gw, gb = impl.native_backward(g, xc, stats, weight, need)
            else:
                parts = tuple(p.contiguous() for p in stats.split(1, dim=1)) if stats.shape[1] > 1 else (stats,)
                gx, gw, gb = impl.torch_backward(g, xc, weight, parts, eps, need)
    gx = _restore(gx, x.dtype, x.shape)
    gw = None if weight is None else _restore(gw, weight.dtype, weight.shape)
    gb = None if bias is None else _restore(gb, bias.dtype, bias.shape)
    return gx, gw, gb


def row_tangent(kind: str, x: Tensor, weight: Tensor | None, stats: Tensor, x_t: Tensor | None,
                w_t: Tensor | None, b_t: Tensor | None) -> Tensor:
    """The forward-mode derivative (tangent of ``y``) of the row norm ``kind`` at ``x`` ``[rows, d]`` with the
    statistics its forward wrote, given the tangents of ``x``, ``weight`` and ``bias`` (``None``: no tangent).

    Every row norm is ``y = w * (x - m) * r + b``; with ``xc = x - m``, ``u = x_t - mean(x_t)`` (``x_t`` for
    RMSNorm, whose ``m`` is 0) and ``q = sum(xc * u)``: ``r_t = -r^3 q / d`` (RMSNorm, LayerNorm), ``-r^2 q /
    ((d - 1) s)`` (BERT, its unbiased ``s``; 0 where ``s`` is), and ``y_t = w (u r + xc r_t) + w_t xc r + b_t``.
    Computed in the statistics' dtype (float32 for half inputs), returned in ``x``'s.

    Example:
        >>> x, t = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
        >>> rstd = x.pow(2).mean(1, keepdim=True).add(1e-6).rsqrt()
        >>> f = lambda x: x * x.pow(2).mean(1, keepdim=True).add(1e-6).rsqrt()
        >>> tangent = row_tangent("rms", x, None, rstd, t, None, None)
        >>> bool(torch.allclose(tangent, torch.func.jvp(f, (x,), (t,))[1]))
        True
    """
    cdt, d = stats.dtype, x.shape[1]
    xf = x.to(cdt)
    r = stats[:, 1:2] if kind != "rms" else stats[:, :1]
    xc = xf - stats[:, :1] if kind != "rms" else xf
    y_t = torch.zeros_like(xf)
    if x_t is not None:
        u = x_t.to(cdt)
        if kind != "rms":
            u = u - u.mean(1, keepdim=True)
        q = (xc * u).sum(1, keepdim=True)
        if kind == "bert":
            s = stats[:, 2:3]
            r_t = torch.where(s > 0, -r * r * q / ((d - 1) * s.clamp_min(torch.finfo(cdt).tiny)), 0.0)
        else:
            r_t = -(r * r * r) * q / d
        y_t = u * r + xc * r_t
        if weight is not None:
            y_t = y_t * weight.reshape(-1).to(cdt)
    if w_t is not None:
        y_t = y_t + xc * r * w_t.reshape(-1).to(cdt)
    if b_t is not None:
        y_t = y_t + b_t.reshape(-1).to(cdt)
    return y_t.to(x.dtype)


class RowKernel:
    """A row norm as a callable ``kernel(x [rows, d], weight, bias, eps) -> (y, stats)`` (see
    :func:`define_row_op`); ``op`` is its ``torch.library`` operator, for ``opcheck`` and direct use."""

    def __init__(self, op, impl: RowImpl, eager: type[torch.autograd.Function],
                 transformed: type[torch.autograd.Function]) -> None:
        self.op, self._impl, self._eager, self._transformed = op, impl, eager, transformed

    def __call__(self, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> tuple[Tensor, Tensor]:
        way = route(x, weight, bias)
        if way == "forward":  # inference: no Function needed
            return row_forward(self._impl, x, weight, bias, eps)
        if way == "function":
            return self._eager.apply(x, weight, bias, eps)
        if way == "transform":
            return self._transformed.apply(x, weight, bias, eps)
        return self.op(x, weight, bias, eps)


def define_row_op(name: str, impl: RowImpl, stats_width: int) -> RowKernel:
    """Register the row norm ``impl`` as the torch operators ``normswap::<name>(x, weight, bias, eps) ->
    (y, stats)`` (``x`` ``[rows, d]``) and ``normswap::<name>_backward``, each with a fake (meta) kernel and
    the forward with its autograd formula; returns it as a :class:`RowKernel`.

    torch.compile and torch.export see one opaque operator (no graph break, the fused CPU kernels run inside
    compiled graphs too); ``torch.library.opcheck`` checks each registration. In plain eager mode the kernel
    runs the same two functions through an ``autograd.Function`` instead, which skips the dispatcher's
    per-call cost (see :mod:`normswap.norms.eager`: tracing and subclasses get the operator; a call autograd
    need not see runs the forward alone). Under ``torch.func`` transforms another ``autograd.Function`` runs
    them, in the form the transforms require (forward-mode AD too: :func:`row_tangent`): ``grad``, ``jacrev``,
    ``jvp``, ``jacfwd`` and ``vmap`` work (one call over every sample's rows where the parameters are shared,
    else the operator per sample), ``vmap(grad(...))`` too, for per-sample gradients. The output is a fresh tensor,
    never a view of the input, so an in-place op after the norm (``ReLU(inplace=True)``) is allowed.
    """
    empty = lambda t: t.new_empty(0)  # noqa: E731 - a gradient not asked for: operators return tensors, not None

    def forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> tuple[Tensor, Tensor]:
        return row_forward(impl, x, weight, bias, eps)

    def backward(grad: Tensor, x: Tensor, stats: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
                 need_x: bool, need_weight: bool, need_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
        gx, gw, gb = row_backward(impl, grad, x, stats, weight, bias, eps, (need_x, need_weight, need_bias))
        return (gx if gx is not None else empty(x), gw if gw is not None else empty(x),
                gb if gb is not None else empty(x))

    fwd = torch.library.custom_op(f"normswap::{name}", forward, mutates_args=(),
                                  schema="(Tensor x, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor)")
    bwd = torch.library.custom_op(
        f"normswap::{name}_backward", backward, mutates_args=(),
        schema="(Tensor grad, Tensor x, Tensor stats, Tensor? weight, Tensor? bias, float eps, bool need_x, "
               "bool need_weight, bool need_bias) -> (Tensor, Tensor, Tensor)")

    @fwd.register_fake
    def _(x, weight, bias, eps):
        return torch.empty_like(x), x.new_empty((x.shape[0], stats_width), dtype=_compute_dtype(x.dtype))

    @bwd.register_fake
    def _(grad, x, stats, weight, bias, eps, need_x, need_weight, need_bias):
        return fake_grads(x, weight, bias, need_x, need_weight, need_bias)

    def save(ctx, inputs, output):
        x, weight, bias, eps = inputs
        ctx.save_for_backward(x, weight, bias, output[1])  # the input is alive anyway: no extra memory
        ctx.eps = eps
        ctx.mark_non_differentiable(output[1])

    def formula(x, weight, bias, eps):
        return scripted.rows(impl.kind, x, 1, None if weight is None else weight.reshape(-1),
                             None if bias is None else bias.reshape(-1), eps)

    def grads(ctx, gy, backward_fn, recorded=False):
        x, weight, bias, stats = ctx.saved_tensors
        need = ctx.needs_input_grad[:3]
        return norm_grads(need, lambda *t: formula(*t, ctx.eps), x, weight, bias, gy,
                          lambda: backward_fn(gy, x, stats, weight, bias, ctx.eps, *need), 1, recorded)

    fwd.register_autograd(lambda ctx, gy, _gstats: grads(ctx, gy, bwd), setup_context=save)

    class Eager(torch.autograd.Function):
        # forward(ctx, ...) rather than a separate setup_context: apply then costs ~50 us less (no argument
        # binding for torch.func, whose tensors go to Transformed)
        @staticmethod
        def forward(ctx, x, weight, bias, eps):
            output = row_forward(impl, x, weight, bias, eps)
            save(ctx, (x, weight, bias, eps), output)
            return output

        @staticmethod
        def backward(ctx, gy, _gstats):
            return grads(ctx, gy, backward)

    class Transformed(torch.autograd.Function):
        # torch.func runs forward on the unwrapped tensors (the fused kernels where they are plain) and
        # backward on its wrappers, which have no data pointer: torch ops there, reading the fused kernels'
        # statistics (one layout for every implementation)
        @staticmethod
        def forward(x, weight, bias, eps):
            return row_forward(impl, x, weight, bias, eps)

        @staticmethod
        def setup_context(ctx, inputs, output):
            save(ctx, inputs, output)
            ctx.save_for_forward(inputs[0], inputs[1], output[1])

        @staticmethod
        def backward(ctx, gy, _gstats):
            # torch ops a further transform can see through (forward-over-reverse: torch.func.hessian)
            return grads(ctx, gy, backward, recorded=True)

        @staticmethod
        def jvp(ctx, x_t, w_t, b_t, _eps_t):
            # forward-mode AD (torch.func.jvp / jacfwd, torch.autograd.forward_ad): torch ops on the tangents
            x, weight, stats = ctx.saved_tensors
            return row_tangent(impl.kind, x, weight, stats, x_t, w_t, b_t), None

        @staticmethod
        def vmap(info, in_dims, x, weight, bias, eps):
            if in_dims[0] is not None and in_dims[1] is None and in_dims[2] is None:
                # shared parameters (per-sample gradients): the samples' rows are rows too, one call for all
                batched = x.movedim(in_dims[0], 0)
                y, stats = fwd(batched.reshape(-1, batched.shape[-1]), weight, bias, eps)
                return (y.view(batched.shape), stats.view(*batched.shape[:2], -1)), (0, 0)

            def sample(t, dim, i):
                return t if t is None or dim is None else t.select(dim, i)

            parts = [fwd(sample(x, in_dims[0], i), sample(weight, in_dims[1], i), sample(bias, in_dims[2], i), eps)
                     for i in range(info.batch_size)]
            return (torch.stack([y for y, _ in parts]), torch.stack([s for _, s in parts])), (0, 0)

    Eager.__name__ = Eager.__qualname__ = f"{name}_eager"
    Transformed.__name__ = Transformed.__qualname__ = f"{name}_transformed"
    return RowKernel(fwd, impl, Eager, Transformed)


def flat_param(p: Tensor | None, dtype: torch.dtype) -> Tensor | None:
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
    d = x.shape[-1] if dims == 1 else math.prod(x.shape[x.dim() - dims :])
    if x.dim() == 2 and dims == 1:
        return fn(x, weight, bias, eps)[0]
    # view_as: much cheaper than view(torch.Size) per call, which matters for small inputs.
    return fn(x.reshape(-1, d), weight, bias, eps)[0].view_as(x)


def _apply_channels_first(fn, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """Run a row kernel over dim 1 of an [N, C, *] input.

    The channels are moved last as a view; for a channels_last input that view is already contiguous rows,
    otherwise the reshape copies once (as timm's ``LayerNorm2d`` does through ``permute``). The result is
    returned in channels-last memory layout, viewed back as [N, C, *].
    """
    moved = x.permute(0, *range(2, x.dim()), 1)
    y = fn(moved.reshape(-1, x.shape[1]), weight, bias, eps)[0].view_as(moved)
    return y.permute(0, x.dim() - 1, *range(1, x.dim() - 1))


def apply_row_norm(
    fn,
    x: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    name: str,
    check_size: Callable[[tuple[int, ...], str], None] | None = None,
) -> Tensor:
    """The functional form of a row norm: check the arguments (errors name ``name``), then run ``fn``."""
    shape = _check_shape(normalized_shape)
    if check_size is not None:
        check_size(shape, name)
    _check_input(x, shape, name)
    _check_param(weight, shape, "weight", name)
    _check_param(bias, shape, "bias", name)
    return _apply_rows(fn, x, len(shape), weight, bias, _check_eps(eps))


# ----------------------------------------------------------------------------------------------------------
# Layer bases.
# ----------------------------------------------------------------------------------------------------------


class RowNorm(nn.Module):
    """Base of the layers that normalize the trailing ``normalized_shape`` dims with one row kernel.

    Parameters are ``weight`` (ones) and, when ``bias=True``, ``bias`` (zeros); both are absent when
    ``elementwise_affine=False``. A subclass sets:

    * ``_kernel``: its row kernel (see the module docstring);
    * ``_default_bias``: what ``bias=None`` (the constructor's default) means for this layer;
    * ``_check_size`` (optional): an extra check of the normalized shape, raising :class:`OptionError`.
    """

    _kernel: ClassVar[Callable]  # its operator (define_row_op): (x [rows, d], weight, bias, eps) -> (y, stats)
    _default_bias: ClassVar[bool] = False

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        eps: float = 1e-6,
        *,
        elementwise_affine: bool = True,
        bias: bool | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        bias = self._default_bias if bias is None else bias
        factory = {"device": device, "dtype": dtype}
        self.normalized_shape: tuple[int, ...] = _check_shape(normalized_shape)
        self._check_size(self.normalized_shape, type(self).__name__)
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

    @staticmethod
    def _check_size(shape: tuple[int, ...], name: str) -> None:
        """Extra check of the normalized shape a subclass may need; none here."""

    def reset_parameters(self) -> None:
        """Set ``weight`` to ones and ``bias`` to zeros, so a fresh layer only normalizes."""
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self._normalize(x)

    def _normalize(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():  # a static branch: TorchScript compiles only this side
            return self._ops(x, len(self.normalized_shape))
        _check_input(x, self.normalized_shape, type(self).__name__)
        return _apply_rows(type(self)._kernel, x, len(self.normalized_shape), self.weight, self.bias, self.eps)

    def _ops(self, x: Tensor, ndims: int) -> Tensor:
        """This layer's formula over the last ``ndims`` dims in torch ops (:mod:`normswap.norms.scripted`),
        what ``torch.jit.script`` compiles; each layer defines it."""
        raise NotImplementedError(f"{type(self).__name__} defines no torch-ops formula for TorchScript")

    def _describe(self, size: object) -> str:
        return f"{size}, eps={self.eps}, elementwise_affine={self.elementwise_affine}, bias={self.bias is not None}"

    def extra_repr(self) -> str:
        return self._describe(self.normalized_shape)


class ChannelsFirstRowNorm(RowNorm):
    """Base of the channels-first variants: normalizes dim 1 of an [N, C, *] input, e.g. conv feature maps.

    Put it first among the bases, before the row layer it varies (``class XNorm2d(ChannelsFirstRowNorm,
    XNorm)``), which gives the kernel, the default ``bias`` and the checks. ``normalized_shape`` is
    ``(num_channels,)``; the output uses channels-last memory layout (free for channels_last inputs).
    """

    def __init__(
        self,
        num_channels: int,
        eps: float = 1e-6,
        *,
        elementwise_affine: bool = True,
        bias: bool | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        num_channels = _check_channels(num_channels)
        super().__init__(
            num_channels, eps, elementwise_affine=elementwise_affine, bias=bias, device=device, dtype=dtype
        )
        self.num_channels = num_channels

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            return self._ops(x.movedim(1, -1), 1).movedim(-1, 1)
        _check_channels_first(x, self.num_channels, type(self).__name__)
        return _apply_channels_first(type(self)._kernel, x, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return self._describe(self.num_channels)
