"""The Triton kernels of :mod:`normswap.norms.triton_rows` (RMSNorm, BERT LayerNorm, and the plain
LayerNorm of Weight Standardization) and :mod:`normswap.norms.triton_channels` (``ChannelLayerNorm``),
defined at import: this module is imported only on first use, where Triton is installed (and after
``TRITON_INTERPRET`` is read).

The row kernels take the norm as ``KIND``: 0 RMSNorm (stats ``rstd``), 1 BERT LayerNorm, unbiased std and
eps outside the root (stats ``mean, 1 / (std + eps), std``), 2 LayerNorm, biased variance and eps inside
(stats ``mean, rstd``)."""

import triton
import triton.language as tl


@triton.jit
def row_forward_kernel(X, W, B, Y, S, stride_x, stride_y, n, eps, KIND: tl.constexpr, HAS_W: tl.constexpr,
                       HAS_B: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if KIND == 1:
        mean = tl.sum(x, axis=0) / n
        xc = tl.where(mask, x - mean, 0.0)
        std = tl.sqrt(tl.sum(xc * xc, axis=0) / (n - 1))
        inv = 1.0 / (std + eps)
        h = xc * inv
        tl.store(S + row * 3, mean)
        tl.store(S + row * 3 + 1, inv)
        tl.store(S + row * 3 + 2, std)
    elif KIND == 2:
        mean = tl.sum(x, axis=0) / n
        xc = tl.where(mask, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / n + eps)
        h = xc * rstd
        tl.store(S + row * 2, mean)
        tl.store(S + row * 2 + 1, rstd)
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
def row_backward_kernel(DY, X, W, S, DX, DW, DB, stride_dy, stride_x, stride_dx, rows, n, rows_per_program,
                        KIND: tl.constexpr, HAS_W: tl.constexpr, NEED_X: tl.constexpr, NEED_W: tl.constexpr,
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
        if KIND == 1:
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
        elif KIND == 2:
            mean = tl.load(S + r * 2)
            rstd = tl.load(S + r * 2 + 1)
            h = tl.where(mask, (x - mean) * rstd, 0.0)
            if NEED_X:
                dx = rstd * (g - tl.sum(g, axis=0) / n - h * (tl.sum(g * h, axis=0) / n))
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


@triton.jit
def channel_forward_kernel(X, W, B, Y, MEAN, RSTD, c, s, eps, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                           BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    pos = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    ch = tl.arange(0, BLOCK_C)
    mask = (ch[:, None] < c) & (pos[None, :] < s)
    offsets = n * c * s + ch[:, None] * s + pos[None, :]
    x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / c
    xc = tl.where(mask, x - mean[None, :], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / c + eps)
    h = xc * rstd[None, :]
    if HAS_W:
        h = h * tl.load(W + ch, mask=ch < c, other=0.0).to(tl.float32)[:, None]
    if HAS_B:
        h = h + tl.load(B + ch, mask=ch < c, other=0.0).to(tl.float32)[:, None]
    tl.store(Y + offsets, h.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + n * s + pos, mean, mask=pos < s)
    tl.store(RSTD + n * s + pos, rstd, mask=pos < s)

@triton.jit
def channel_backward_kernel(DY, X, MEAN, RSTD, W, DX, DW, DB, c, s, tiles_per_sample, HAS_W: tl.constexpr,
                            NEED_X: tl.constexpr, NEED_W: tl.constexpr, NEED_B: tl.constexpr, BLOCK_C: tl.constexpr,
                            BLOCK_S: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    pos = tile * BLOCK_S + tl.arange(0, BLOCK_S)
    ch = tl.arange(0, BLOCK_C)
    mask = (ch[:, None] < c) & (pos[None, :] < s)
    offsets = n * c * s + ch[:, None] * s + pos[None, :]
    dy = tl.load(DY + offsets, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(MEAN + n * s + pos, mask=pos < s, other=0.0)
    rstd = tl.load(RSTD + n * s + pos, mask=pos < s, other=0.0)
    h = tl.where(mask, (x - mean[None, :]) * rstd[None, :], 0.0)
    if NEED_X:
        if HAS_W:
            g = dy * tl.load(W + ch, mask=ch < c, other=0.0).to(tl.float32)[:, None]
        else:
            g = dy
        mean_g = tl.sum(g, axis=0) / c
        mean_gh = tl.sum(g * h, axis=0) / c
        dx = rstd[None, :] * (g - mean_g[None, :] - h * mean_gh[None, :])
        tl.store(DX + offsets, dx.to(DX.dtype.element_ty), mask=mask)
    row = n * tiles_per_sample + tile
    if NEED_W:
        tl.store(DW + row * c + ch, tl.sum(dy * h, axis=1), mask=ch < c)
    if NEED_B:
        tl.store(DB + row * c + ch, tl.sum(dy, axis=1), mask=ch < c)
