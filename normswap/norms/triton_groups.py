"""Fused GPU kernels (Triton) for GroupNorm on channels-last inputs.

torch's CUDA GroupNorm copies a channels_last input to the contiguous layout first and returns a contiguous
output, so a channels_last network pays two copies per norm and its next conv gets the other layout. These
kernels read the ``[N, C, *]`` input where it lies, as ``[N, S, C]`` rows of channels, and write the output in
the same layout:

* forward: per-channel partial statistics over blocks of positions (one pass over the input, mean and sum of
  squared deviations merged tile by tile), a small kernel that merges them per (sample, group) into
  ``mean, rstd`` (float32 ``[N, G]``, the layout of ``torch.native_group_norm``), then one pass that writes
  ``(x - mean) * rstd * w + b``;
* backward: per-channel partial sums of ``dy`` and ``dy * xhat``, merged per (sample, group) into the two
  means the input gradient needs (and per-channel sums for the weight and bias gradients), then one pass
  for the input gradient.

Statistics are float32 whatever the input dtype (float32, bfloat16, float16); the output and the input
gradient are in the input's dtype. Same switches as :mod:`normswap.norms.triton_rows` (``NORMSWAP_TRITON=0``
turns them off; ``TRITON_INTERPRET=1`` with ``NORMSWAP_TRITON=1`` runs them on CPU tensors for the tests).
"""

from __future__ import annotations


import torch
from torch import Tensor

from normswap.norms.triton_rows import _block, _cdiv, kernels, runs_on

_TILE = 4096  # elements one program holds per step: positions x channels
_MAX_BLOCK_C = 256  # channels per program: 512 contiguous bytes of a bf16 row
_MIN_ROWS = 64  # positions per partial statistic at least: the partials stay a few % of the input's bytes
_MAX_PROGRAMS = 2048  # beyond that, a program takes more positions


def channels_last_dense(x: Tensor) -> bool:
    """Whether ``x`` ``[N, C, *]`` lies in memory as ``[N, *, C]`` rows (channels_last / channels_last_3d, or a
    channels-first view of a contiguous channels-last tensor) and not also in the contiguous layout."""
    return x.dim() >= 3 and x.movedim(1, -1).is_contiguous() and not x.is_contiguous()


def usable(x: Tensor) -> bool:
    """Whether the Triton kernels run for ``x``: :func:`~normswap.norms.triton_rows.runs_on`, and a
    non-empty channels-last ``[N, C, *]`` tensor."""
    return runs_on(x) and channels_last_dense(x) and x.numel() > 0


def _layout(x: Tensor) -> tuple[int, int, int, int, int, int]:
    """``(n, s, c, block_s, block_c, rows_per_program)`` of ``x`` for the kernels."""
    n, c = x.shape[:2]
    s = x.numel() // (n * c)
    block_c = min(_block(c), _MAX_BLOCK_C)
    block_s = max(1, min(_TILE // block_c, _block(s)))
    rows = _cdiv(max(_MIN_ROWS, block_s), block_s) * block_s
    while rows < s and n * _cdiv(s, rows) * _cdiv(c, block_c) > _MAX_PROGRAMS:
        rows *= 2
    return n, s, c, block_s, block_c, rows


def _finalize_blocks(tiles: int, cpg: int) -> tuple[int, int]:
    block_k = min(_block(cpg), 256)
    return max(1, min(_block(tiles), 4096 // block_k)), block_k


def forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, groups: int,
            eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(y, mean, rstd)``: ``y`` in ``x``'s layout and dtype, the statistics float32 ``[N, G]``."""
    n, s, c, block_s, block_c, rows = _layout(x)
    cpg = c // groups
    tiles = _cdiv(s, rows)
    f32 = {"dtype": torch.float32, "device": x.device}
    part_mean, part_m2 = torch.empty((n, tiles, c), **f32), torch.empty((n, tiles, c), **f32)
    mean, rstd = torch.empty((n, groups), **f32), torch.empty((n, groups), **f32)
    y = torch.empty_like(x)
    k = kernels()
    k.group_stats_kernel[(n, tiles, _cdiv(c, block_c))](x, part_mean, part_m2, s, c, rows,
                                                          BLOCK_S=block_s, BLOCK_C=block_c)
    block_t, block_k = _finalize_blocks(tiles, cpg)
    k.group_finalize_kernel[(n * groups,)](part_mean, part_m2, mean, rstd, s, c, cpg, groups, tiles, rows, float(eps),
                                         BLOCK_T=block_t, BLOCK_K=block_k)
    w = weight.contiguous() if weight is not None else mean
    b = bias.contiguous() if bias is not None else mean
    tiles_s = _cdiv(s, block_s)
    k.group_apply_kernel[(n * tiles_s, _cdiv(c, block_c))](
        x, w, b, mean, rstd, y, s, c, cpg, groups, tiles_s, HAS_W=weight is not None, HAS_B=bias is not None,
        BLOCK_S=block_s, BLOCK_C=block_c)
    return y, mean, rstd


def backward(gy: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor | None, groups: int,
             need: tuple[bool, bool, bool]) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of :func:`forward`: the input's in its dtype and layout, the weight's and bias's float32
    (``None`` for what ``need`` does not ask)."""
    need_x, need_w, need_b = need
    gy = gy if gy.stride() == x.stride() else torch.empty_like(x).copy_(gy)
    n, s, c, block_s, block_c, rows = _layout(x)
    cpg = c // groups
    tiles = _cdiv(s, rows)
    f32 = {"dtype": torch.float32, "device": x.device}
    mean, rstd = mean.contiguous(), rstd.contiguous()
    part_dy, part_dyh = torch.empty((n, tiles, c), **f32), torch.empty((n, tiles, c), **f32)
    sum_dy, sum_dyh = torch.empty((n, c), **f32), torch.empty((n, c), **f32)
    coef_g, coef_gh = torch.empty((n, groups), **f32), torch.empty((n, groups), **f32)
    k = kernels()
    k.group_grad_sums_kernel[(n, tiles, _cdiv(c, block_c))](gy, x, mean, rstd, part_dy, part_dyh, s, c, cpg, groups,
                                                              rows, BLOCK_S=block_s, BLOCK_C=block_c)
    block_t, block_k = _finalize_blocks(tiles, cpg)
    w = weight.contiguous() if weight is not None else mean
    k.group_grad_finalize_kernel[(n * groups,)](part_dy, part_dyh, w, sum_dy, sum_dyh, coef_g, coef_gh, s, c, cpg,
                                                groups, tiles, HAS_W=weight is not None, BLOCK_T=block_t,
                                                BLOCK_K=block_k)
    gx = None
    if need_x:
        gx = torch.empty_like(x)
        tiles_s = _cdiv(s, block_s)
        k.group_dx_kernel[(n * tiles_s, _cdiv(c, block_c))](
            gy, x, w, mean, rstd, coef_g, coef_gh, gx, s, c, cpg, groups, tiles_s, HAS_W=weight is not None,
            BLOCK_S=block_s, BLOCK_C=block_c)
    return gx, sum_dyh.sum(0) if need_w else None, sum_dy.sum(0) if need_b else None
