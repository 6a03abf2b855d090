"""Fused GPU kernels (Triton) for ``ChannelLayerNorm``: LayerNorm over dim 1 of a contiguous ``[N, C, *]``
tensor with no transposes (torch has only a last-dim LayerNorm, so a channels-first input costs two
copies there).

A program holds a ``[C, positions]`` tile of one sample (every channel of a few positions), reduces over the
channels in float32 and writes the output in the input's dtype, keeping each position's mean and ``rstd``
(``[N, S]``) for the backward, which computes the input gradient tile by tile and the weight and bias
gradients as float32 partial sums per tile, added up at the end. Same switches as
:mod:`normswap.norms.triton_rows` (``NORMSWAP_TRITON=0``; ``TRITON_INTERPRET=1`` and ``NORMSWAP_TRITON=1``
for the interpreter on CPU tensors).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .triton_rows import _block, _cdiv, kernels, runs_on

_TILE = 4096  # elements of one program's tile: channels x positions


def usable(x: Tensor) -> bool:
    """Whether the Triton kernels run for ``x``: :func:`~normswap.norms.triton_rows.runs_on`, and a contiguous
    ``[N, C, *]`` tensor whose channels fit one tile."""
    return runs_on(x) and x.dim() >= 3 and x.is_contiguous() and _block(x.shape[1]) <= _TILE


def _tiles(c: int, s: int) -> tuple[int, int]:
    block_c = _block(c)
    block_s = max(1, min(_TILE // block_c, _block(s)))
    return block_c, block_s


def forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(y, mean, rstd)``: ``y`` in ``x``'s layout and dtype, the statistics float32 ``[N, S]``."""
    n, c = x.shape[:2]
    s = x.numel() // max(n * c, 1)
    y = torch.empty_like(x)
    mean = torch.empty((n, s), dtype=torch.float32, device=x.device)
    rstd = torch.empty((n, s), dtype=torch.float32, device=x.device)
    if x.numel():
        block_c, block_s = _tiles(c, s)
        w = weight.contiguous() if weight is not None else x
        b = bias.contiguous() if bias is not None else x
        kernels().channel_forward_kernel[(n, _cdiv(s, block_s))](x, w, b, y, mean, rstd, c, s, float(eps),
                                                     HAS_W=weight is not None, HAS_B=bias is not None,
                                                     BLOCK_C=block_c, BLOCK_S=block_s)
    return y, mean, rstd


def backward(gy: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor | None, need_x: bool,
             need_w: bool, need_b: bool) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of :func:`forward`: ``dx`` in ``x``'s dtype, ``dweight`` and ``dbias`` float32."""
    n, c = x.shape[:2]
    s = x.numel() // max(n * c, 1)
    gy = gy.contiguous()
    gx = torch.empty_like(x) if need_x else None
    need_w = need_w and weight is not None
    block_c, block_s = _tiles(c, s)
    tiles = _cdiv(s, block_s) if s else 0
    dw = torch.zeros((max(n * tiles, 1), c), dtype=torch.float32, device=x.device) if need_w else None
    db = torch.zeros((max(n * tiles, 1), c), dtype=torch.float32, device=x.device) if need_b else None
    if x.numel():
        w = weight.contiguous() if weight is not None else x
        kernels().channel_backward_kernel[(n, tiles)](gy, x, mean.contiguous(), rstd.contiguous(), w, gx if gx is not None else x,
                                    dw if dw is not None else mean, db if db is not None else mean, c, s, tiles,
                                    HAS_W=weight is not None, NEED_X=need_x, NEED_W=need_w, NEED_B=need_b,
                                    BLOCK_C=block_c, BLOCK_S=block_s)
    return gx, dw.sum(0) if dw is not None else None, db.sum(0) if db is not None else None
