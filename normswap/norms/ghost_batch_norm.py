"""Ghost Batch Normalization (Hoffer, Hubara & Soudry, 2017, "Train longer, generalize better").

In training mode the batch is cut along dim 0 into *virtual* batches of ``virtual_batch_size`` samples and
each one is normalized with its own mean and variance, which keeps the regularizing noise of small batches
while training with large ones. The running statistics are still those of the whole batch, updated exactly
as one ``nn.BatchNorm`` call on the whole batch would update them, and eval mode is plain BatchNorm, so a
GhostBatchNorm and a BatchNorm with the same state dict are interchangeable at inference.

Implementation notes (measured on a 2-core CPU, fp32, e.g. x = [64, 64, 56, 56]):

* ``split`` + ``F.batch_norm`` + ``cat`` costs two extra full copies (the ``cat`` forward and the ``split``
  backward) and a reshape into [chunks, chunk, C, *] is slower still (strided). Here one
  :class:`torch.autograd.Function` runs torch's fused batch-norm kernel per chunk and writes each result
  straight into its slice of one preallocated output (``native_batch_norm.out``). torch's backward has no
  such form (its ``out=`` variant computes elsewhere and copies: ~40% of the backward at this size), so on
  CPU in float32 the backward runs the fused kernel of :mod:`normswap.norms.native`, which writes each
  virtual batch's input gradient in place; elsewhere it calls ``native_batch_norm_backward.out`` per chunk.
* The whole-batch statistics for the running buffers come for free: each chunk's kernel call is handed a
  temporary running buffer with ``momentum=1``, so it writes that chunk's mean and *unbiased* variance
  (accumulated in the kernel's own precision); they are merged with the law of total variance.
"""

from __future__ import annotations

import math
import numbers
from typing import List

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normswap.errors import OptionError
from normswap.norms import native
from normswap.norms.eager import route
from normswap.norms.native import has_data
from normswap.norms.op_grads import norm_grads
from normswap.norms.scripted import chunk_sizes, ghost_batch_norm_train, merged_batch_stats

__all__ = ["GhostBatchNorm1d", "GhostBatchNorm2d", "GhostBatchNorm3d"]

_bn_forward_out = torch.ops.aten.native_batch_norm.out
_bn_backward_out = torch.ops.aten.native_batch_norm_backward.out
_bn_backward = torch.ops.aten.native_batch_norm_backward.default


def _native_ok(x: Tensor, weight: Tensor | None, save_mean: Tensor) -> bool:
    """Whether the backward can run on the fused CPU kernel (channels-first contiguous float32)."""
    return (
        native.usable(x) and x.is_contiguous() and save_mean.dtype == torch.float32
        and (weight is None or weight.dtype == torch.float32)
    )


def _backward_torch(
    gy: Tensor, x: Tensor, weight: Tensor | None, save_mean: Tensor, save_invstd: Tensor, sizes: tuple[int, ...],
    eps: float, need_x: bool,
) -> tuple[Tensor | None, Tensor, Tensor]:
    """Per-chunk backward with torch's batch-norm kernel: ``dx`` and the per-chunk weight / bias sums."""
    k, c = save_mean.shape
    # The out= kernel insists on computing every output it is given, so parameter gradients are always
    # requested (they cost no extra pass); a missing weight is the identity, i.e. ones.
    w = weight if weight is not None else save_mean.new_ones(c)
    gx = torch.empty_like(x) if need_x else None
    gws = save_mean.new_empty((k, c))
    gbs = save_mean.new_empty((k, c))
    start = 0
    for i, n in enumerate(sizes):
        args = (gy.narrow(0, start, n), x.narrow(0, start, n), w, None, None, save_mean[i], save_invstd[i], True, eps)
        if need_x:
            _bn_backward_out(*args, [True, True, True], out0=gx.narrow(0, start, n), out1=gws[i], out2=gbs[i])
        else:
            _, gws[i], gbs[i] = _bn_backward(*args, [False, True, True])
        start += n
    return gx, gws, gbs


def _forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, sizes: list[int], eps: float,
             stats_dtype: torch.dtype | None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per-chunk training-mode batch norm written into one output: ``(y, save_mean, save_invstd, chunk_mean,
    chunk_var)``, the last two (each chunk's mean and unbiased variance, in ``stats_dtype``) empty when
    ``stats_dtype`` is None."""
    k, c = len(sizes), x.shape[1]
    if _native_ok(x, weight, x) and (bias is None or bias.dtype == torch.float32):
        y, save_mean, save_invstd, chunk_var = native.ghost_bn_forward(x, weight, bias, tuple(sizes), eps,
                                                                      stats_dtype is not None)
        if stats_dtype is None:
            return y, save_mean, save_invstd, x.new_empty(0), x.new_empty(0)
        return y, save_mean, save_invstd, save_mean.to(stats_dtype, copy=True), chunk_var.to(stats_dtype, copy=True)
    y = torch.empty_like(x)
    # save_mean / save_invstd follow the kernel's choice of dtype: that of the parameters if any.
    param_dtype = weight.dtype if weight is not None else (stats_dtype or x.dtype)
    save_mean = x.new_empty((k, c), dtype=param_dtype)
    save_invstd = x.new_empty((k, c), dtype=param_dtype)
    if stats_dtype is not None:
        # momentum=1 turns the "running" buffers into plain outputs: mean and unbiased variance per chunk;
        # zeros, not empty, because the kernel still multiplies the old value by 0 (NaN * 0 = NaN).
        chunk_mean = x.new_zeros((k, c), dtype=stats_dtype)
        chunk_var = x.new_zeros((k, c), dtype=stats_dtype)
    else:
        chunk_mean = chunk_var = None
    start = 0
    for i, n in enumerate(sizes):
        _bn_forward_out(
            x.narrow(0, start, n), weight, bias,
            None if chunk_mean is None else chunk_mean[i], None if chunk_var is None else chunk_var[i],
            True, 1.0, eps,
            out=y.narrow(0, start, n), save_mean=save_mean[i], save_invstd=save_invstd[i],
        )
        start += n
    if chunk_mean is None:
        return y, save_mean, save_invstd, x.new_empty(0), x.new_empty(0)
    return y, save_mean, save_invstd, chunk_mean, chunk_var


def _backward(gy: Tensor, x: Tensor, weight: Tensor | None, save_mean: Tensor, save_invstd: Tensor,
              sizes: list[int], eps: float, need_x: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx or empty, per-chunk weight gradients, per-chunk bias gradients)``."""
    if _native_ok(x, weight, save_mean):
        gx, gws, gbs = native.ghost_bn_backward(gy, x, save_mean, save_invstd, weight, tuple(sizes), need_x)
    else:
        gx, gws, gbs = _backward_torch(gy, x, weight, save_mean, save_invstd, tuple(sizes), eps, need_x)
    return gx if gx is not None else x.new_empty(0), gws, gbs


ghost_batch_norm = torch.library.custom_op(
    "normswap::ghost_batch_norm", _forward, mutates_args=(),
    schema="(Tensor x, Tensor? weight, Tensor? bias, int[] sizes, float eps, ScalarType? stats_dtype) "
           "-> (Tensor, Tensor, Tensor, Tensor, Tensor)")
_ghost_batch_norm_backward = torch.library.custom_op(
    "normswap::ghost_batch_norm_backward", _backward, mutates_args=(),
    schema="(Tensor gy, Tensor x, Tensor? weight, Tensor save_mean, Tensor save_invstd, int[] sizes, float eps, "
           "bool need_x) -> (Tensor, Tensor, Tensor)")


@ghost_batch_norm.register_fake
def _(x, weight, bias, sizes, eps, stats_dtype):
    k, c = len(sizes), x.shape[1]
    # the dtype the real kernel gives its saved statistics: float32 from the fused CPU kernels, else the
    # parameters' (or the statistics', or the input's)
    fused = (native.available() and x.device.type == "cpu" and x.dtype == torch.float32 and x.is_contiguous()
             and (weight is None or weight.dtype == torch.float32) and (bias is None or bias.dtype == torch.float32))
    param_dtype = torch.float32 if fused else (weight.dtype if weight is not None else (stats_dtype or x.dtype))
    stats = [x.new_empty((k, c), dtype=stats_dtype), x.new_empty((k, c), dtype=stats_dtype)] if stats_dtype \
        else [x.new_empty(0), x.new_empty(0)]
    return (torch.empty_like(x), x.new_empty((k, c), dtype=param_dtype), x.new_empty((k, c), dtype=param_dtype),
            *stats)


@_ghost_batch_norm_backward.register_fake
def _(gy, x, weight, save_mean, save_invstd, sizes, eps, need_x):
    k, c = save_mean.shape
    return (torch.empty_like(x) if need_x else x.new_empty(0), save_mean.new_empty((k, c)),
            save_mean.new_empty((k, c)))


def _setup_context(ctx, inputs, output):
    x, weight, bias, sizes, eps, _stats_dtype = inputs
    ctx.save_for_backward(x, weight, bias, output[1], output[2])
    ctx.sizes, ctx.eps = list(sizes), eps
    ctx.mark_non_differentiable(output[1], output[2], output[3], output[4])


def _grads(ctx, gy, backward_fn) -> tuple:
    """The autograd gradients of (x, weight, bias, sizes, eps, stats_dtype) from ``backward_fn`` (the backward
    operator or its body)."""
    x, weight, bias, save_mean, save_invstd = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]

    def fused() -> tuple[Tensor, Tensor | None, Tensor | None]:  # the per-chunk parameter gradients summed
        gx, gws, gbs = backward_fn(gy, x, weight, save_mean, save_invstd, ctx.sizes, ctx.eps, need_x)
        return gx, gws.sum(0).to(weight.dtype) if need_w else None, gbs.sum(0).to(weight.dtype) if need_b else None

    return norm_grads((need_x, need_w, need_b), lambda x, w, b: ghost_batch_norm_train(x, w, b, ctx.sizes, ctx.eps)[0],
                      x, weight, bias, gy, fused, 3)


def _autograd_backward(ctx, gy, *_unused):
    return _grads(ctx, gy, _ghost_batch_norm_backward)


ghost_batch_norm.register_autograd(_autograd_backward, setup_context=_setup_context)


class _Eager(torch.autograd.Function):
    """The operator's forward and backward without its dispatch (tens of microseconds a call each way), for
    plain tensors in eager mode (:mod:`normswap.norms.eager`)."""

    @staticmethod
    def forward(ctx, x, weight, bias, sizes, eps, stats_dtype):
        output = _forward(x, weight, bias, sizes, eps, stats_dtype)
        _setup_context(ctx, (x, weight, bias, sizes, eps, stats_dtype), output)
        return output

    @staticmethod
    def backward(ctx, gy, *_unused):
        # a gradient without data (vmapped: autograd.grad(..., is_grads_batched=True)) goes to the backward
        # operator, which torch runs per sample
        return _grads(ctx, gy, _backward if has_data(gy) else _ghost_batch_norm_backward)


def _train_forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, sizes: list[int], eps: float,
                   stats_dtype: torch.dtype | None, way: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:func:`_forward` the ``way`` :func:`normswap.norms.eager.route` said: alone (inference), through an
    ``autograd.Function`` (plain eager calls autograd must see) or through the operator (the rest)."""
    if way == "forward":
        return _forward(x, weight, bias, sizes, eps, stats_dtype)
    if way == "function":
        return _Eager.apply(x, weight, bias, sizes, eps, stats_dtype)
    return ghost_batch_norm(x, weight, bias, sizes, eps, stats_dtype)


class _GhostBatchNormBase:
    """Shared implementation of :class:`GhostBatchNorm1d` / ``2d`` / ``3d`` (Hoffer et al., 2017): a mixin
    placed before ``nn.BatchNormNd``, whose buffers, checks and eval-mode forward it uses."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        virtual_batch_size: int = 32,
    ) -> None:
        if (
            isinstance(virtual_batch_size, bool)
            or not isinstance(virtual_batch_size, numbers.Integral)
            or virtual_batch_size < 1
        ):
            raise OptionError(f"virtual_batch_size must be an int >= 1, got {virtual_batch_size!r}.")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.virtual_batch_size = int(virtual_batch_size)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, virtual_batch_size={self.virtual_batch_size}"

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            return self._forward_ops(x)
        self._check_input_dim(x)
        # Same rule as nn.BatchNorm: batch statistics in training mode, or whenever there are no running ones.
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        if not use_batch_stats:
            return self._batch_norm(x)
        values_per_sample = math.prod(x.shape[2:])
        if x.shape[0] * values_per_sample == 1:
            # The exact error (type and message) nn.BatchNorm raises for this input.
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.size()}")
        sizes = tuple(chunk_sizes(x.shape[0], values_per_sample, self.virtual_batch_size))
        if len(sizes) <= 1:
            return self._batch_norm(x)  # one virtual batch: plain BatchNorm, running stats and all

        update = self.training and self.track_running_stats and self.running_mean is not None
        stats_dtype = self.running_mean.dtype if update else None
        way = route(x, self.weight, self.bias)
        if way == "transform":  # torch.func wrappers or forward-mode tangents: torch ops, which handle them
            y, chunk_mean, chunk_var = ghost_batch_norm_train(x, self.weight, self.bias, list(sizes), self.eps)
        else:
            y, _, _, chunk_mean, chunk_var = _train_forward(x, self.weight, self.bias, list(sizes), self.eps,
                                                            stats_dtype, way)
        if not update:
            return y
        with torch.no_grad():
            self._update_running_stats(chunk_mean, chunk_var, list(sizes), values_per_sample)
        return y

    def _forward_ops(self, x: Tensor) -> Tensor:
        """The same layer in torch ops, which TorchScript compiles (the eager path runs a fused function)."""
        self._check_input_dim(x)
        running_mean, running_var = self.running_mean, self.running_var
        if not self.training and running_mean is not None and running_var is not None:
            return self._batch_norm(x)
        values_per_sample = 1
        for size in x.shape[2:]:
            values_per_sample *= size
        sizes = chunk_sizes(x.shape[0], values_per_sample, self.virtual_batch_size)
        if len(sizes) <= 1:
            return self._batch_norm(x)
        y, chunk_mean, chunk_var = ghost_batch_norm_train(x, self.weight, self.bias, sizes, self.eps)
        if self.training and self.track_running_stats and running_mean is not None:
            with torch.no_grad():
                self._update_running_stats(chunk_mean, chunk_var, sizes, values_per_sample)
        return y

    def _batch_norm(self, x: Tensor) -> Tensor:
        """``nn.BatchNorm``'s forward (one virtual batch, or eval with running statistics), in its own words
        because TorchScript compiles no ``super()`` call."""
        momentum = self.momentum
        factor = 0.0 if momentum is None else momentum
        if self.training and self.track_running_stats:
            num_batches_tracked = self.num_batches_tracked
            if num_batches_tracked is not None:
                num_batches_tracked.add_(1)
                factor = 1.0 / float(num_batches_tracked) if momentum is None else momentum
        batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        keep = not self.training or self.track_running_stats
        return F.batch_norm(x, self.running_mean if keep else None, self.running_var if keep else None,
                            self.weight, self.bias, batch_stats, factor, self.eps)

    def _update_running_stats(self, chunk_mean: Tensor, chunk_var: Tensor, sizes: List[int],
                              values_per_sample: int) -> None:
        """Fold the per-chunk statistics into one whole-batch update, as ``nn.BatchNorm`` would do it
        (called under ``no_grad``)."""
        running_mean, running_var = self.running_mean, self.running_var
        if running_mean is None or running_var is None:
            return
        # nn.BatchNorm's bookkeeping, including momentum=None (cumulative average over the batches seen).
        momentum = self.momentum
        factor = 0.0 if momentum is None else momentum
        num_batches_tracked = self.num_batches_tracked
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
            factor = 1.0 / float(num_batches_tracked) if momentum is None else momentum
        # detached: a forward-mode tangent of the batch statistics stays out of the buffers, as in nn.BatchNorm
        mean, var = merged_batch_stats(chunk_mean.detach(), chunk_var.detach(), sizes, values_per_sample)
        # Same update expression as the batch-norm kernel: momentum * batch + (1 - momentum) * running.
        running_mean.copy_(mean.mul_(factor).add_(running_mean.double(), alpha=1.0 - factor))
        running_var.copy_(var.mul_(factor).add_(running_var.double(), alpha=1.0 - factor))


class GhostBatchNorm1d(_GhostBatchNormBase, nn.BatchNorm1d):
    """Ghost BatchNorm over [N, C] or [N, C, L] inputs (Hoffer et al., 2017).

    A drop-in :class:`torch.nn.BatchNorm1d` (same arguments, same state-dict keys) whose training-mode
    statistics are computed per virtual batch of ``virtual_batch_size`` samples.

    Example:
        >>> bn = GhostBatchNorm1d(16, virtual_batch_size=8)
        >>> bn(torch.randn(32, 16)).shape
        torch.Size([32, 16])
    """


class GhostBatchNorm2d(_GhostBatchNormBase, nn.BatchNorm2d):
    """Ghost BatchNorm over [N, C, H, W] inputs (Hoffer et al., 2017).

    A drop-in :class:`torch.nn.BatchNorm2d` (same arguments, same state-dict keys) whose training-mode
    statistics are computed per virtual batch of ``virtual_batch_size`` samples.

    Example:
        >>> bn = GhostBatchNorm2d(8, virtual_batch_size=4)
        >>> bn(torch.randn(16, 8, 5, 5)).shape
        torch.Size([16, 8, 5, 5])
    """


class GhostBatchNorm3d(_GhostBatchNormBase, nn.BatchNorm3d):
    """Ghost BatchNorm over [N, C, D, H, W] inputs (Hoffer et al., 2017).

    A drop-in :class:`torch.nn.BatchNorm3d` (same arguments, same state-dict keys) whose training-mode
    statistics are computed per virtual batch of ``virtual_batch_size`` samples.

    Example:
        >>> bn = GhostBatchNorm3d(4, virtual_batch_size=2)
        >>> bn(torch.randn(6, 4, 3, 3, 3)).shape
        torch.Size([6, 4, 3, 3, 3])
    """
