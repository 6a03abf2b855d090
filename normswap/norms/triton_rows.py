"""Fused GPU kernels (Triton) for the row norms torch has no fused CUDA kernel for: RMSNorm (with bias too),
the BERT LayerNorm (unbiased std, eps outside the root), and the plain LayerNorm rows of Weight
Standardization (a conv weight as ``[out, fan_in]``, read and written in its own dtype).

One program normalizes one row in a single read of it, statistics in float32 whatever the input dtype
(float32, bfloat16, float16), and writes the output in the input's dtype; the statistics of each row are
kept for the backward (RMSNorm: ``rstd``; BERT: ``mean, 1 / (std + eps), std``; LayerNorm: ``mean, rstd``).
Rows of more than ``MAX_FUSED`` values (one program holds a whole row) are left to torch ops. The backward
computes the input gradient row by row and the weight and bias gradients as float32 partial sums over blocks
of rows, added up at the end. Without Triton or CUDA nothing here runs: the layers keep their CPU kernels and the
torch-ops path. Triton's interpreter runs the same kernels on CPU tensors for the tests: set
``TRITON_INTERPRET=1`` and ``NORMSWAP_TRITON=1`` before normswap is imported.
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

from normswap.norms.native import has_data

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
KINDS = {"rms": 0, "bert": 1, "layer": 2}  # the kernels' KIND, and the width of each kind's statistics below
_STATS = {"rms": 1, "bert": 3, "layer": 2}
MAX_FUSED = 65536  # values of one row a program holds in registers


# read once, at import (the interpreter switch must be set before the kernels are defined anyway)
_INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("NORMSWAP_TRITON") == "1"


def _interpreting() -> bool:
    """Whether the kernels run in Triton's interpreter on CPU tensors (the tests' switch, read at import)."""
    return _INTERPRETING


@functools.cache
def kernels():
    """The kernel module (:mod:`normswap.norms.triton_kernels`), or ``None`` where Triton cannot be imported;
    loaded at first use, so that the interpreter switch is read then."""
    try:
        from normswap.norms import triton_kernels
    except ImportError:
        return None
    return triton_kernels


@torch.compiler.assume_constant_result  # torch.compile takes the answer, without tracing into the cache
def available() -> bool:
    """Whether the Triton kernels can be loaded here (see :func:`kernels`)."""
    return kernels() is not None


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def runs_on(x: Tensor) -> bool:
    """Whether normswap's Triton kernels may run for ``x`` at all (each family adds its shape and layout
    conditions): a plain CUDA tensor (a CPU one under the interpreter, for the tests) of float32, bfloat16 or
    float16 with a data pointer, Triton importable, ``NORMSWAP_TRITON`` not 0. The device comes first: every
    call of a layer on a CPU asks."""
    if type(x) is not Tensor or not (x.is_cuda or (_interpreting() and x.device.type == "cpu")):
        return False
    return os.environ.get("NORMSWAP_TRITON") != "0" and x.dtype in _DTYPES and has_data(x) and available()


def usable(x: Tensor) -> bool:
    """Whether the row kernels run for ``x``: :func:`runs_on`, and ``[rows, d]`` with 2 <= d <= ``MAX_FUSED``."""
    return runs_on(x) and x.dim() == 2 and 2 <= x.shape[1] <= MAX_FUSED


def _rows_last_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(1) == 1 else t.contiguous()


def _block(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _warps(block: int) -> int:
    """Warps for a program holding one row of ``block`` values: about 256 values per warp up to 8 warps, 16
    for rows from 16384 on, so that long rows do not spill registers."""
    return 16 if block >= 16384 else min(max(block // 256, 1), 8)


def forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, kind: str) -> tuple[Tensor, Tensor]:
    """``(y, stats)`` of the row norm ``kind`` (a key of ``KINDS``) over ``x`` ``[rows, d]``; ``y`` in ``x``'s
    dtype, ``stats`` float32 ``[rows, k]`` (BERT: mean, 1 / (std + eps), std; RMSNorm: rstd; LayerNorm: mean,
    rstd)."""
    x = _rows_last_contiguous(x)
    rows, n = x.shape
    y = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    stats = torch.empty((rows, _STATS[kind]), dtype=torch.float32, device=x.device)
    if rows:
        w = weight.reshape(-1).contiguous() if weight is not None else x
        b = bias.reshape(-1).contiguous() if bias is not None else x
        block = _block(n)
        kernels().row_forward_kernel[(rows,)](x, w, b, y, stats, x.stride(0), y.stride(0), n, float(eps),
                                              KIND=KINDS[kind], HAS_W=weight is not None, HAS_B=bias is not None,
                                              BLOCK=block, num_warps=_warps(block))
    return y, stats


def backward(gy: Tensor, x: Tensor, stats: Tensor, weight: Tensor | None, kind: str,
             need: tuple[bool, bool, bool]) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of :func:`forward`: the input's in its dtype, the weight's and bias's in float32 (``None``
    for what ``need`` does not ask)."""
    need_x, need_w, need_b = need
    need_w = need_w and weight is not None
    x, gy = _rows_last_contiguous(x), _rows_last_contiguous(gy.reshape(x.shape))
    rows, n = x.shape
    gx = torch.empty_like(x) if need_x else None
    if rows == 0:
        zeros = x.new_zeros(n, dtype=torch.float32)
        return gx, zeros if need_w else None, zeros.clone() if need_b else None
    programs = min(rows, 4 * torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 8)
    per_program = _cdiv(rows, programs)
    programs = _cdiv(rows, per_program)
    dw = torch.empty((programs, n), dtype=torch.float32, device=x.device) if need_w else None
    db = torch.empty((programs, n), dtype=torch.float32, device=x.device) if need_b else None
    w = weight.reshape(-1).contiguous() if weight is not None else x
    kernels().row_backward_kernel[(programs,)](
        gy, x, w, stats.contiguous(), gx if gx is not None else x, dw if dw is not None else stats,
        db if db is not None else stats, gy.stride(0), x.stride(0), gx.stride(0) if gx is not None else 0, rows, n,
        per_program, KIND=KINDS[kind], HAS_W=weight is not None, NEED_X=need_x, NEED_W=need_w, NEED_B=need_b,
        BLOCK=_block(n), num_warps=_warps(_block(n)))
    return gx, dw.sum(0) if dw is not None else None, db.sum(0) if db is not None else None
