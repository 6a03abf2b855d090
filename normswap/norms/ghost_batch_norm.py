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

import torch
from torch import Tensor, nn

from normswap.errors import OptionError
from normswap.norms import native

__all__ = ["GhostBatchNorm1d", "GhostBatchNorm2d", "GhostBatchNorm3d"]

_bn_forward_out = torch.ops.aten.native_batch_norm.out
_bn_backward_out = torch.ops.aten.native_batch_norm_backward.out
_bn_backward = torch.ops.aten.native_batch_norm_backward.default


def _chunk_sizes(batch: int, values_per_sample: int, virtual_batch_size: int) -> tuple[int, ...]:
    """Sizes of the virtual batches along dim 0.

    A chunk holding a single value per channel cannot be normalized (its variance is undefined): a trailing
    one joins the chunk before it, and ``virtual_batch_size=1`` on inputs without spatial dims acts as 2.
    """
    size = virtual_batch_size if virtual_batch_size * values_per_sample > 1 else 2
    sizes = [size] * (batch // size)
    rest = batch - size * len(sizes)
    if rest:
        if rest * values_per_sample == 1 and sizes:
            sizes[-1] += rest
        else:
            sizes.append(rest)
    return tuple(sizes)


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


class _GhostBatchNormFunction(torch.autograd.Function):
    """Per-chunk training-mode batch norm written into one output; also returns per-chunk statistics."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, sizes: tuple[int, ...],
                eps: float, stats_dtype: torch.dtype | None):
        k, c = len(sizes), x.shape[1]
        if _native_ok(x, weight, x) and (bias is None or bias.dtype == torch.float32):
            y, save_mean, save_invstd, chunk_var = native.ghost_bn_forward(x, weight, bias, sizes, eps,
                                                                          stats_dtype is not None)
            ctx.save_for_backward(x, weight, save_mean, save_invstd)
            ctx.sizes, ctx.eps = sizes, eps
            if stats_dtype is None:
                return y
            chunk_mean, chunk_var = save_mean.to(stats_dtype), chunk_var.to(stats_dtype)
            ctx.mark_non_differentiable(chunk_mean, chunk_var)
            return y, chunk_mean, chunk_var
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
        ctx.save_for_backward(x, weight, save_mean, save_invstd)
        ctx.sizes = sizes
        ctx.eps = eps
        if chunk_mean is None:
            return y
        ctx.mark_non_differentiable(chunk_mean, chunk_var)
        return y, chunk_mean, chunk_var

    @staticmethod
    def backward(ctx, gy: Tensor, *unused: Tensor):
        x, weight, save_mean, save_invstd = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if _native_ok(x, weight, save_mean):
            gx, gws, gbs = native.ghost_bn_backward(gy, x, save_mean, save_invstd, weight, ctx.sizes, need_x)
        else:
            gx, gws, gbs = _backward_torch(gy, x, weight, save_mean, save_invstd, ctx.sizes, ctx.eps, need_x)
        gw = gws.sum(0).to(weight.dtype) if need_w else None
        gb = gbs.sum(0).to(weight.dtype) if need_b else None
        return gx, gw, gb, None, None, None


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
        self._check_input_dim(x)
        # Same rule as nn.BatchNorm: batch statistics in training mode, or whenever there are no running ones.
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        if not use_batch_stats:
            return super().forward(x)
        values_per_sample = math.prod(x.shape[2:])
        if x.shape[0] * values_per_sample == 1:
            # The exact error (type and message) nn.BatchNorm raises for this input.
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.size()}")
        sizes = _chunk_sizes(x.shape[0], values_per_sample, self.virtual_batch_size)
        if len(sizes) <= 1:
            return super().forward(x)  # one virtual batch: plain BatchNorm, running stats and all

        update = self.training and self.track_running_stats and self.running_mean is not None
        stats_dtype = self.running_mean.dtype if update else None
        out = _GhostBatchNormFunction.apply(x, self.weight, self.bias, sizes, self.eps, stats_dtype)
        if not update:
            return out
        y, chunk_mean, chunk_var = out
        self._update_running_stats(chunk_mean, chunk_var, sizes, values_per_sample)
        return y

    @torch.no_grad()
    def _update_running_stats(
        self, chunk_mean: Tensor, chunk_var: Tensor, sizes: tuple[int, ...], values_per_sample: int
    ) -> None:
        """Fold the per-chunk statistics into one whole-batch update, as ``nn.BatchNorm`` would do it."""
        # nn.BatchNorm's bookkeeping, including momentum=None (cumulative average over the batches seen).
        factor = 0.0 if self.momentum is None else self.momentum
        if self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum

        # Law of total variance on [chunks, C] tensors, in float64 to keep the merge itself exact.
        counts = torch.tensor(sizes, dtype=torch.float64, device=chunk_mean.device).mul_(values_per_sample)
        counts = counts.unsqueeze(1)
        total = float(sum(sizes) * values_per_sample)
        means = chunk_mean.double()
        mean = (counts * means).sum(0).div_(total)
        m2 = ((counts - 1) * chunk_var.double() + counts * (means - mean).square_()).sum(0)
        var = m2.div_(total - 1)

        # Same update expression as the batch-norm kernel: momentum * batch + (1 - momentum) * running.
        rm, rv = self.running_mean, self.running_var
        rm.copy_(mean.mul_(factor).add_(rm.double(), alpha=1.0 - factor))
        rv.copy_(var.mul_(factor).add_(rv.double(), alpha=1.0 - factor))


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
