"""Fused GPU kernels (Triton) for the row norms torch has no fused CUDA kernel for: RMSNorm (with bias too)
and the BERT LayerNorm (unbiased std, eps outside the root).

One program normalizes one row in a single read of it, statistics in float32 whatever the input dtype
(float32, bfloat16, float16), and writes the output in the input's dtype; the statistics of each row are
kept for the backward (RMSNorm: ``rstd``; BERT: ``mean, 1 / (std + eps), std``). The backward computes the
input gradient row by row and the weight and bias gradients as float32 partial sums over blocks of rows,
added up at the end. Without Triton or CUDA nothing here runs: the layers keep their CPU kernels and the
torch-ops path. Triton's interpreter runs the same kernels on CPU tensors for the tests: set
``TRITON_INTERPRET=1`` and ``NORMSWAP_TRITON=1`` before the first use.
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("NORMSWAP_TRITON") == "1"


@functools.cache
def _kernels():
    """The jitted kernels, or ``None`` where Triton cannot be imported (defined at first use, so that the
    interpreter switch is read then)."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def forward_kernel(X, W, B, Y, S, stride_x, stride_y, n, eps, BERT: tl.constexpr, HAS_W: tl.constexpr,
                       HAS_B: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        if BERT:
            mean = tl.sum(x, axis=0) / n
            xc = tl.where(mask, x - mean, 0.0)
            std = tl.sqrt(tl.sum(xc * xc, axis=0) / (n - 1))
            inv = 1.0 / (std + eps)
            h = xc * inv
            tl.store(S + row * 3, mean)
            tl.store(S + row * 3 + 1, inv)
            tl.store(S + row * 3 + 2, std)
        else:
            rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n + eps)
            h = x * rstd
            tl.store(S + row, rstd)
        if HAS_W:
            h = h * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_B:
            h = h + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + row * stride_y + cols, h.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def backward_kernel(DY, X, W, S, DX, DW, DB, stride_dy, stride_x, stride_dx, rows, n, rows_per_program,
                        BERT: tl.constexpr, HAS_W: tl.constexpr, NEED_X: tl.constexpr, NEED_W: tl.constexpr,
                        NEED_B: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n
        if HAS_W:
            w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        else:
            w = tl.where(mask, 1.0, 0.0)
        dw = tl.zeros([BLOCK], dtype=tl.float32)
        db = tl.zeros([BLOCK], dtype=tl.float32)
        start = pid.to(tl.int64) * rows_per_program  # int64 row offsets: no overflow past 2**31 elements
        end = tl.minimum(start + rows_per_program, rows)
        for r in range(start, end):
            dy = tl.load(DY + r * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
            x = tl.load(X + r * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
            g = dy * w
            if BERT:
                mean = tl.load(S + r * 3)
                inv = tl.load(S + r * 3 + 1)
                std = tl.load(S + r * 3 + 2)
                xc = tl.where(mask, x - mean, 0.0)
                h = xc * inv
                if NEED_X:
                    # d std / d x_i = xc_i / ((n - 1) std); a constant row (std = 0) has xc = 0 and dot = 0, so
                    # the floor on std only keeps 0 / 0 away
                    dot = tl.sum(g * xc, axis=0)
                    coef = inv * inv * dot / ((n - 1) * tl.maximum(std, 1e-30))
                    dx = inv * (g - tl.sum(g, axis=0) / n) - coef * xc
                    tl.store(DX + r * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
            else:
                rstd = tl.load(S + r)
                h = x * rstd
                if NEED_X:
                    dx = rstd * (g - h * (tl.sum(g * h, axis=0) / n))
                    tl.store(DX + r * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
            if NEED_W:
                dw += dy * h
            if NEED_B:
                db += dy
        if NEED_W:
            tl.store(DW + pid * n + cols, dw, mask=mask)
        if NEED_B:
            tl.store(DB + pid * n + cols, db, mask=mask)

    return triton, forward_kernel, backward_kernel


def usable(x: Tensor) -> bool:
    """Whether the Triton kernels run for ``x`` (``[rows, d]``): a CUDA tensor of float32/bfloat16/float16
    (or a CPU tensor under the interpreter, for the tests), Triton importable, ``NORMSWAP_TRITON`` not 0."""
    if os.environ.get("NORMSWAP_TRITON") == "0" or x.dtype not in _DTYPES or x.dim() != 2 or type(x) is not Tensor:
        return False
    if not (x.is_cuda or (x.device.type == "cpu" and _interpreting())):
        return False
    return x.shape[1] >= 2 and _kernels() is not None


def _rows_last_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(1) == 1 else t.contiguous()


def _block(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, bert: bool) -> tuple[Tensor, Tensor]:
    """``(y, stats)`` of the row norm over ``x`` ``[rows, d]``; ``y`` in ``x``'s dtype, ``stats`` float32
    ``[rows, 3]`` (BERT: mean, 1 / (std + eps), std) or ``[rows, 1]`` (RMSNorm: rstd)."""
    triton, forward_kernel, _ = _kernels()
    x = _rows_last_contiguous(x)
    rows, n = x.shape
    y = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    stats = torch.empty((rows, 3 if bert else 1), dtype=torch.float32, device=x.device)
    if rows:
        w = weight.reshape(-1).contiguous() if weight is not None else x
        b = bias.reshape(-1).contiguous() if bias is not None else x
        forward_kernel[(rows,)](x, w, b, y, stats, x.stride(0), y.stride(0), n, float(eps), BERT=bert,
                                HAS_W=weight is not None, HAS_B=bias is not None, BLOCK=_block(n))
    return y, stats


def backward(gy: Tensor, x: Tensor, stats: Tensor, weight: Tensor | None, bert: bool,
             need: tuple[bool, bool, bool]) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of :func:`forward`: the input's in its dtype, the weight's and bias's in float32 (``None``
    for what ``need`` does not ask)."""
    triton, _, backward_kernel = _kernels()
    need_x, need_w, need_b = need
    need_w = need_w and weight is not None
    x, gy = _rows_last_contiguous(x), _rows_last_contiguous(gy.reshape(x.shape))
    rows, n = x.shape
    gx = torch.empty_like(x) if need_x else None
    if rows == 0:
        zeros = x.new_zeros(n, dtype=torch.float32)
        return gx, zeros if need_w else None, zeros.clone() if need_b else None
    programs = min(rows, 4 * torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 8)
    per_program = triton.cdiv(rows, programs)
    programs = triton.cdiv(rows, per_program)
    dw = torch.empty((programs, n), dtype=torch.float32, device=x.device) if need_w else None
    db = torch.empty((programs, n), dtype=torch.float32, device=x.device) if need_b else None
    w = weight.reshape(-1).contiguous() if weight is not None else x
    backward_kernel[(programs,)](
        gy, x, w, stats.contiguous(), gx if gx is not None else x, dw if dw is not None else stats,
        db if db is not None else stats, gy.stride(0), x.stride(0), gx.stride(0) if gx is not None else 0, rows, n,
        per_program, BERT=bert, HAS_W=weight is not None, NEED_X=need_x, NEED_W=need_w, NEED_B=need_b,
        BLOCK=_block(n))
    return gx, dw.sum(0) if dw is not None else None, db.sum(0) if db is not None else None
