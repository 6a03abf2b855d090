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


# ----------------------------------------------------------------------------------------------------------
# GroupNorm on a channels-last [N, S, C] layout (normswap.norms.triton_groups): every load reads whole rows
# of channels, which are contiguous; a group's channels are gathered by index (c // CPG), never transposed.
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def group_stats_kernel(X, PMEAN, PM2, s, c, rows_per_program, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per channel, over one program's rows of one sample: mean and sum of squared deviations, merged tile
    by tile (Chan et al.), written to PMEAN / PM2 ``[N, T, C]``."""
    n = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1)
    ch = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = ch < c
    start = t * rows_per_program
    end = tl.minimum(start + rows_per_program, s)
    count = 0.0
    mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for p0 in range(start, end, BLOCK_S):
        pos = p0 + tl.arange(0, BLOCK_S)
        mask = (pos[:, None] < end) & cmask[None, :]
        x = tl.load(X + n * s * c + pos[:, None].to(tl.int64) * c + ch[None, :], mask=mask, other=0.0).to(tl.float32)
        k = tl.minimum(end - p0, BLOCK_S).to(tl.float32)
        tile_mean = tl.sum(x, axis=0) / k
        d = tl.where(mask, x - tile_mean[None, :], 0.0)
        delta = tile_mean - mean
        total = count + k
        mean += delta * (k / total)
        m2 += tl.sum(d * d, axis=0) + delta * delta * (count * k / total)
        count = total
    out = (n * tl.num_programs(1) + t) * c + ch
    tl.store(PMEAN + out, mean, mask=cmask)
    tl.store(PM2 + out, m2, mask=cmask)


@triton.jit
def _group_block(n, g, t0, k0, s, c, cpg, tiles, rows_per_program, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    """Offsets into an ``[N, T, C]`` partials tensor of a ``[BLOCK_T, BLOCK_K]`` block of group ``g`` of sample
    ``n`` (programs ``t0...``, the group's channels ``k0...``), its mask, and the positions each program saw."""
    t = t0 + tl.arange(0, BLOCK_T)
    k = k0 + tl.arange(0, BLOCK_K)
    mask = (t[:, None] < tiles) & (k[None, :] < cpg)
    rows = tl.minimum(s - t * rows_per_program, rows_per_program).to(tl.float32)
    return (n * tiles + t[:, None]) * c + g * cpg + k[None, :], mask, rows[:, None]


@triton.jit
def group_finalize_kernel(PMEAN, PM2, MEAN, RSTD, s, c, cpg, groups, tiles, rows_per_program, eps,
                          BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    """Per (sample, group): the partial statistics of its channels merged into its mean and ``rstd``."""
    n = (tl.program_id(0) // groups).to(tl.int64)
    g = tl.program_id(0) % groups
    size = (s * 1.0) * cpg  # in float: s * cpg may pass 2**31 (no .to(): an argument equal to 1 is a constexpr)
    total = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
    for t0 in range(0, tiles, BLOCK_T):
        for k0 in range(0, cpg, BLOCK_K):
            at, mask, rows = _group_block(n, g, t0, k0, s, c, cpg, tiles, rows_per_program, BLOCK_T, BLOCK_K)
            total += tl.where(mask, rows * tl.load(PMEAN + at, mask=mask, other=0.0), 0.0)
    mean = tl.sum(tl.sum(total, axis=1), axis=0) / size
    spread = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
    for t0 in range(0, tiles, BLOCK_T):
        for k0 in range(0, cpg, BLOCK_K):
            at, mask, rows = _group_block(n, g, t0, k0, s, c, cpg, tiles, rows_per_program, BLOCK_T, BLOCK_K)
            d = tl.load(PMEAN + at, mask=mask, other=0.0) - mean
            spread += tl.where(mask, tl.load(PM2 + at, mask=mask, other=0.0) + rows * d * d, 0.0)
    var = tl.sum(tl.sum(spread, axis=1), axis=0) / size
    tl.store(MEAN + n * groups + g, mean)
    tl.store(RSTD + n * groups + g, 1.0 / tl.sqrt(var + eps))


@triton.jit
def _group_tile(s, c, cpg, groups, tiles_s, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """The ``[BLOCK_S, BLOCK_C]`` tile of ``[N, S, C]`` an elementwise program covers (axis 0: sample and
    position tile, axis 1: channel block): offsets, mask, channels, their mask, and their ``[N, G]`` index."""
    n = (tl.program_id(0) // tiles_s).to(tl.int64)
    pos = (tl.program_id(0) % tiles_s) * BLOCK_S + tl.arange(0, BLOCK_S)
    ch = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = ch < c
    mask = (pos[:, None] < s) & cmask[None, :]
    return n * s * c + pos[:, None].to(tl.int64) * c + ch[None, :], mask, ch, cmask, n * groups + ch // cpg


@triton.jit
def group_apply_kernel(X, W, B, MEAN, RSTD, Y, s, c, cpg, groups, tiles_s, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                       BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    offsets, mask, ch, cmask, group = _group_tile(s, c, cpg, groups, tiles_s, BLOCK_S, BLOCK_C)
    x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(MEAN + group, mask=cmask, other=0.0)
    scale = tl.load(RSTD + group, mask=cmask, other=0.0)
    if HAS_W:
        scale = scale * tl.load(W + ch, mask=cmask, other=0.0).to(tl.float32)
    shift = -mean * scale
    if HAS_B:
        shift += tl.load(B + ch, mask=cmask, other=0.0).to(tl.float32)
    tl.store(Y + offsets, (x * scale[None, :] + shift[None, :]).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def group_grad_sums_kernel(DY, X, MEAN, RSTD, PDY, PDYH, s, c, cpg, groups, rows_per_program, BLOCK_S: tl.constexpr,
                           BLOCK_C: tl.constexpr):
    """Per channel, over one program's rows of one sample: the sums of ``dy`` and ``dy * xhat``."""
    n = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1)
    ch = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = ch < c
    group = n * groups + ch // cpg
    mean = tl.load(MEAN + group, mask=cmask, other=0.0)
    rstd = tl.load(RSTD + group, mask=cmask, other=0.0)
    start = t * rows_per_program
    end = tl.minimum(start + rows_per_program, s)
    sum_dy = tl.zeros([BLOCK_C], dtype=tl.float32)
    sum_dyh = tl.zeros([BLOCK_C], dtype=tl.float32)
    for p0 in range(start, end, BLOCK_S):
        pos = p0 + tl.arange(0, BLOCK_S)
        mask = (pos[:, None] < end) & cmask[None, :]
        offsets = n * s * c + pos[:, None].to(tl.int64) * c + ch[None, :]
        dy = tl.load(DY + offsets, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
        sum_dy += tl.sum(dy, axis=0)
        sum_dyh += tl.sum(dy * (x - mean[None, :]), axis=0) * rstd
    out = (n * tl.num_programs(1) + t) * c + ch
    tl.store(PDY + out, sum_dy, mask=cmask)
    tl.store(PDYH + out, sum_dyh, mask=cmask)


@triton.jit
def group_grad_finalize_kernel(PDY, PDYH, W, SDY, SDYH, COEF_G, COEF_GH, s, c, cpg, groups, tiles, HAS_W: tl.constexpr,
                               BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    """Per (sample, group): each channel's sums over the whole sample (``SDY`` / ``SDYH`` ``[N, C]``, for the
    weight and bias gradients) and the group's means of ``g = dy * w`` and ``g * xhat`` (the input gradient's
    two coefficients)."""
    n = (tl.program_id(0) // groups).to(tl.int64)
    g = tl.program_id(0) % groups
    mean_g = tl.zeros([BLOCK_K], dtype=tl.float32)
    mean_gh = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, cpg, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        kmask = k < cpg
        dy = tl.zeros([BLOCK_K], dtype=tl.float32)
        dyh = tl.zeros([BLOCK_K], dtype=tl.float32)
        for t0 in range(0, tiles, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            mask = (t[:, None] < tiles) & kmask[None, :]
            at = (n * tiles + t[:, None]) * c + g * cpg + k[None, :]
            dy += tl.sum(tl.load(PDY + at, mask=mask, other=0.0), axis=0)
            dyh += tl.sum(tl.load(PDYH + at, mask=mask, other=0.0), axis=0)
        tl.store(SDY + n * c + g * cpg + k, dy, mask=kmask)
        tl.store(SDYH + n * c + g * cpg + k, dyh, mask=kmask)
        if HAS_W:
            w = tl.load(W + g * cpg + k, mask=kmask, other=0.0).to(tl.float32)
            dy = dy * w
            dyh = dyh * w
        mean_g += dy
        mean_gh += dyh
    size = (s * 1.0) * cpg  # in float: s * cpg may pass 2**31 (no .to(): an argument equal to 1 is a constexpr)
    tl.store(COEF_G + n * groups + g, tl.sum(mean_g, axis=0) / size)
    tl.store(COEF_GH + n * groups + g, tl.sum(mean_gh, axis=0) / size)


@triton.jit
def group_dx_kernel(DY, X, W, MEAN, RSTD, COEF_G, COEF_GH, DX, s, c, cpg, groups, tiles_s, HAS_W: tl.constexpr,
                    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """``dx = rstd * (w * dy - mean(g) - xhat * mean(g * xhat))``, ``g = w * dy``, means over the group."""
    offsets, mask, ch, cmask, group = _group_tile(s, c, cpg, groups, tiles_s, BLOCK_S, BLOCK_C)
    dy = tl.load(DY + offsets, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(MEAN + group, mask=cmask, other=0.0)
    rstd = tl.load(RSTD + group, mask=cmask, other=0.0)
    coef_g = tl.load(COEF_G + group, mask=cmask, other=0.0)
    coef_gh = tl.load(COEF_GH + group, mask=cmask, other=0.0)
    if HAS_W:
        dy = dy * tl.load(W + ch, mask=cmask, other=0.0).to(tl.float32)[None, :]
    h = (x - mean[None, :]) * rstd[None, :]
    dx = rstd[None, :] * (dy - coef_g[None, :] - h * coef_gh[None, :])
    tl.store(DX + offsets, dx.to(DX.dtype.element_ty), mask=mask)
