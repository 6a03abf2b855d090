"""The Triton kernels (``normswap/norms/triton_rows.py``, ``triton_channels.py``, ``triton_groups.py``) against
float64 references, forward and backward, float32/bfloat16/float16, odd sizes, non-contiguous inputs, with and
without weight and bias: RMSNorm, BERT LayerNorm, the plain LayerNorm rows, ChannelLayerNorm, Weight
Standardization of conv weights (both eps forms, through a standardized conv) and GroupNorm on channels-last
inputs; and every kernel variant compiled for a CUDA target.

On this CPU-only machine they run in Triton's interpreter (``TRITON_INTERPRET=1``, CPU tensors) in a
child process (the interpreter switch is read when Triton defines the kernels); under the ``gpu`` marker
the same checks run natively on CUDA tensors.
"""

import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("triton")

CHECK = textwrap.dedent('''
    import itertools, sys, warnings
    import torch
    from normswap.norms import triton_rows
    from normswap.norms.bert_layer_norm import bert_layer_norm
    from normswap.norms.rms_norm import rms_norm
    from normswap.norms.layer_rows import layer_norm_rows

    device, full = sys.argv[1], sys.argv[2] == "full"
    DTYPES = [torch.float32, torch.bfloat16, torch.float16] if full else [torch.float32, torch.bfloat16]

    def reference(kind, x, w, b, eps):
        if kind == "rms":
            y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        elif kind == "layer":
            var, mean = torch.var_mean(x, -1, correction=0, keepdim=True)
            y = (x - mean) / torch.sqrt(var + eps)
        else:
            std, mean = torch.std_mean(x, -1, correction=1, keepdim=True)
            y = (x - mean) / (std + eps)
        return y * (w if w is not None else 1) + (b if b is not None else 0)

    def close(got, exp, approx, dtype):
        """(ok, diff, tol): within 4x the float32 formula's own error of float64, plus a rounding of dtype."""
        rounding = 0.0 if dtype == torch.float32 else torch.finfo(dtype).eps
        diff = float((got.double() - exp.double()).abs().max())
        tol = 4 * float((approx.double() - exp.double()).abs().max()) + rounding * float(exp.abs().max()) + 1e-6
        return diff <= tol, diff, tol

    def run(kind, x, w, b, eps, gy):
        leaves = [t for t in (x, w, b) if t is not None]
        for t in leaves:
            t.grad = None
        if kind == "layer":
            d = x.shape[-1]
            y = layer_norm_rows(x.reshape(-1, d), w, b, eps)[0].view(x.shape)
        else:
            y = (rms_norm if kind == "rms" else bert_layer_norm)(x, x.shape[-1], w, b, eps)
        y.backward(gy)
        return y.detach(), [t.grad for t in leaves]

    failures = 0
    torch.manual_seed(0)
    cases = itertools.product(["rms", "bert", "layer"], DTYPES, [(7, 33), (3, 5, 96), (1, 2)] if full else [(7, 33), (3, 5, 96)],
                              [(True, True), (True, False), (False, False)] if full else [(True, True), (False, False)],
                              [False, True])
    for kind, dtype, shape, (has_w, has_b), strided in cases:
        d = shape[-1]
        base = torch.randn(*shape[:-1], 2 * d, device=device) * 2 + 0.5
        x = (base[..., ::2] if strided else base[..., :d]).to(dtype).requires_grad_(True)
        if not strided:
            x = x.detach().contiguous().requires_grad_(True)
        w = (torch.rand(d, device=device) + 0.5).requires_grad_(True) if has_w else None
        b = (torch.randn(d, device=device)).requires_grad_(True) if has_b else None
        gy = torch.randn(shape, device=device).to(dtype)
        rows = x.detach().reshape(-1, d)
        assert triton_rows.usable(rows.contiguous()), "the Triton kernels do not run"
        y, grads = run(kind, x, w, b, 1e-6, gy)
        # float64 reference and the formula's own float32 error on the same (rounded) values
        refs = []
        for cdt in (torch.float64, torch.float32):
            leaves = [t.detach().to(cdt).requires_grad_(True) if t is not None else None for t in (x, w, b)]
            out = reference(kind, *leaves, 1e-6)
            out.backward(gy.to(cdt))
            refs.append((out.detach(), [t.grad for t in leaves if t is not None]))
        (ref, ref_grads), (f32, f32_grads) = refs
        checks = [("y", *close(y, ref, f32, dtype))]
        names = ["dx"] + (["dw"] if has_w else []) + (["db"] if has_b else [])
        for name, got, exp, approx in zip(names, grads, ref_grads, f32_grads):
            checks.append((name, *close(got, exp, approx, dtype)))
        for name, ok, diff, tol in checks:
            if not ok:
                failures += 1
                print("FAIL", kind, dtype, shape, has_w, has_b, strided, name, diff, tol)
    # ChannelLayerNorm: LayerNorm over dim 1 of a contiguous [N, C, *] input, no transposes
    from normswap.norms import triton_channels
    from normswap.norms.channel_layer_norm import ChannelLayerNorm
    shapes = [(2, 16, 5, 7), (3, 33, 10), (2, 8, 3, 4, 5), (1, 600, 3)] if full else [(2, 16, 5, 7), (1, 600, 3)]
    for dtype, shape, affine in itertools.product(DTYPES, shapes, [True, False]):
        layer = ChannelLayerNorm(shape[1], affine=affine).to(device)
        if affine:
            with torch.no_grad():
                layer.weight.uniform_(0.5, 1.5)
                layer.bias.uniform_(-0.5, 0.5)
        x = (torch.randn(shape, device=device) * 2 + 0.5).to(dtype).requires_grad_(True)
        assert triton_channels.usable(x.detach()), "the Triton kernels do not run"
        gy = torch.randn(shape, device=device).to(dtype)
        y = layer(x)
        y.backward(gy)
        got = [y.detach(), x.grad] + ([layer.weight.grad, layer.bias.grad] if affine else [])
        refs = []
        for cdt in (torch.float64, torch.float32):
            xr = x.detach().to(cdt).movedim(1, -1).requires_grad_(True)
            params = [p.detach().to(cdt).requires_grad_(True) for p in (layer.weight, layer.bias)] if affine else [None, None]
            out = torch.nn.functional.layer_norm(xr, (shape[1],), params[0], params[1], layer.eps)
            out.backward(gy.to(cdt).movedim(1, -1))
            refs.append([out.detach().movedim(-1, 1), xr.grad.movedim(-1, 1)] + ([p.grad for p in params] if affine else []))
        for name, g, exp, approx in zip(["y", "dx", "dw", "db"], got, refs[0], refs[1]):
            ok, diff, tol = close(g, exp, approx, dtype)
            if not ok:
                failures += 1
                print("FAIL channel", dtype, shape, affine, name, diff, tol)

    # Weight Standardization through a standardized conv (train mode: no cache), both eps forms; odd fan-ins
    from normswap.norms import std_conv
    shapes = [(8, 3, 3, 3), (5, 7, 1, 1), (4, 2, 5)] if full else [(8, 3, 3, 3), (4, 2, 5)]
    for dtype, shape, mode in itertools.product(DTYPES, shapes, ["inside", "outside"]):
        conv = (torch.nn.Conv1d if len(shape) == 3 else torch.nn.Conv2d)(shape[1], shape[0], shape[2:], bias=False)
        conv = std_conv.standardize_conv(conv.to(device=device, dtype=dtype), eps=1e-6, mode=mode)
        with torch.no_grad():
            conv.weight.copy_(torch.randn(shape) * 0.1 + 0.02)
            if shape[0] > 4 and dtype != torch.float16:
                conv.weight[1] = 0.25  # a constant row: std 0 (its gradient, ~1 / eps, is past float16's range)
        assert triton_rows.usable(conv.weight.detach().reshape(shape[0], -1)), "the Triton kernels do not run"
        gw = torch.randn(shape, device=device).to(dtype)
        conv.weight.grad = None
        got = conv.standardized_weight()
        got.backward(gw)
        refs = []
        for cdt in (torch.float64, torch.float32):
            leaf = conv.weight.detach().to(cdt).requires_grad_(True)
            out = std_conv.standardize_weight(leaf, 1e-6, mode)
            out.backward(gw.to(cdt))
            refs.append((out.detach(), leaf.grad))
        for name, g, exp, approx in (("w", got.detach(), refs[0][0], refs[1][0]),
                                     ("dw", conv.weight.grad, refs[0][1], refs[1][1])):
            ok, diff, tol = close(g, exp, approx, dtype)
            if not (g.dtype == dtype and ok):
                failures += 1
                print("FAIL ws", dtype, shape, mode, name, g.dtype, diff, tol)

    # GroupNorm on channels-last inputs (4-D, 5-D, and [N, C, L] views of [N, L, C]): odd channel and group
    # counts, more than one channel block (320) and several position tiles per sample; then a constant group
    from normswap.norms import triton_groups
    from normswap.norms.group_norm import GroupNorm
    # torch.func over the parameters (functional_call): grad on the whole batch and per-sample gradients
    # (vmap(grad)); torch's GroupNorm handles the transforms' wrappers.
    # Each within float32's error of the float64 gradient (close(): the float32 torch formula's error, 4x)
    fresh = GroupNorm(4, 12).to(device)
    params = {k: v.detach() for k, v in fresh.named_parameters()}
    loss = lambda p, s: torch.func.functional_call(fresh, p, (s,)).pow(2).sum()
    def weight_grads(dtype, batch):
        p = {k: v.to(dtype).requires_grad_(True) for k, v in params.items()}
        out = torch.nn.functional.group_norm(batch.to(dtype), 4, p["weight"], p["bias"], fresh.eps)
        return torch.autograd.grad(out.pow(2).sum(), p["weight"])[0]
    xd = torch.randn(2, 12, 5, 6, device=device).to(memory_format=torch.channels_last)
    # (the input captured, not an argument: a plain tensor beside the transform's wrapped parameters)
    cases = [("grad", torch.func.grad(lambda p: loss(p, xd))(params)["weight"], xd)]
    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, xd.unsqueeze(1))["weight"]
    cases += [(f"per-sample {i}", per_sample[i], xd[i:i + 1]) for i in range(xd.shape[0])]
    for name, got, batch in cases:
        ok, diff, tol = close(got, weight_grads(torch.float64, batch), weight_grads(torch.float32, batch),
                              torch.float32)
        if not ok:
            failures += 1
            print("FAIL group torch.func", name, diff, tol)
    # a gradient penalty (double backward) through the Triton path: autograd records the gradient's formula
    def penalty(dtype, norm):
        xp = xd.to(dtype).requires_grad_(True)
        p = {k: v.to(dtype).requires_grad_(True) for k, v in params.items()}
        (g,) = torch.autograd.grad(norm(xp, p).pow(3).sum(), xp, create_graph=True)
        return torch.autograd.grad(g.pow(2).sum(), [xp, p["weight"], p["bias"]])
    torch_gn = lambda xp, p: torch.nn.functional.group_norm(xp, 4, p["weight"], p["bias"], fresh.eps)
    ours = penalty(torch.float32, lambda xp, p: torch.func.functional_call(fresh, p, (xp,)))
    for name, g, exp, approx in zip(["x", "w", "b"], ours, penalty(torch.float64, torch_gn),
                                    penalty(torch.float32, torch_gn)):
        ok, diff, tol = close(g, exp, approx, torch.float32)
        if not ok:
            failures += 1
            print("FAIL group double backward", name, diff, tol)
    shapes = [((2, 16, 5, 7), 4), ((3, 33, 9, 13), 11), ((2, 6, 3, 4, 5), 3), ((2, 320, 150), 32), ((1, 8, 97), 8)]
    if not full:
        shapes = [shapes[1], shapes[3]]
    cases = [(dtype, shape, affine, False) for dtype, shape, affine in itertools.product(DTYPES, shapes, [True, False])]
    for dtype, (shape, groups), affine, constant in cases + [(torch.float32, ((2, 12, 6, 5), 3), True, True)]:
        layer = GroupNorm(groups, shape[1], affine=affine).to(device)
        if affine:
            with torch.no_grad():
                layer.weight.uniform_(0.5, 1.5)
                layer.bias.uniform_(-0.5, 0.5)
        base = torch.randn(shape[0], *shape[2:], shape[1], device=device) * 2 + 0.5
        if constant:  # sample 0, group 0: variance 0 (its rstd 1 / sqrt(eps) scales its input gradient up)
            base[0, ..., :shape[1] // groups] = 0.75
        x = base.movedim(-1, 1).to(dtype).requires_grad_(True)
        assert triton_groups.usable(x.detach()), "the Triton kernels do not run"
        gy = torch.randn(shape, device=device).to(dtype)
        y = layer(x)
        y.backward(gy)
        got = [y.detach(), x.grad] + ([layer.weight.grad, layer.bias.grad] if affine else [])
        if y.stride() != x.stride() or x.grad.stride() != x.stride():
            failures += 1
            print("FAIL group layout", shape, y.stride(), x.grad.stride(), x.stride())
        refs = []
        for cdt in (torch.float64, torch.float32):
            xr = x.detach().to(cdt).contiguous().requires_grad_(True)
            params = ([p.detach().to(cdt).requires_grad_(True) for p in (layer.weight, layer.bias)] if affine
                      else [None, None])
            out = torch.nn.functional.group_norm(xr, groups, params[0], params[1], layer.eps)
            out.backward(gy.to(cdt))
            refs.append([out.detach(), xr.grad] + ([p.grad for p in params] if affine else []))
        for name, g, exp, approx in zip(["y", "dx", "dw", "db"], got, refs[0], refs[1]):
            ok, diff, tol = close(g, exp, approx, dtype)
            if not ok:
                failures += 1
                print("FAIL group", dtype, shape, groups, affine, constant, name, diff, tol)

    # the GroupNorm operator on its Triton path passes opcheck (fake kernel, autograd, AOT dispatch)
    from normswap.norms.group_norm import group_norm_op
    x = torch.randn(2, 12, 5, 6, device=device).to(memory_format=torch.channels_last).requires_grad_(True)
    w, b = torch.rand(12, device=device).requires_grad_(True), torch.randn(12, device=device).requires_grad_(True)
    torch.library.opcheck(group_norm_op, (x, w, b, 4, 1e-5))
    # plain eager calls skip the operator's dispatch; a traced call records the operator
    layer = GroupNorm(4, 12).to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(layer, x.detach())
    if "normswap::group_norm" not in str(traced.graph) or not torch.equal(traced(x.detach()), layer(x.detach())):
        failures += 1
        print("FAIL group trace", traced.graph)
    # a call autograd need not see (no_grad) runs the forward alone: the same output, layout kept
    with torch.no_grad():
        inferred = layer(x.detach())
    if not torch.equal(inferred, layer(x.detach()).detach()) or inferred.stride() != x.stride():
        failures += 1
        print("FAIL group no_grad", inferred.stride(), x.stride())

    # constant rows: BERT's std is 0 there; the output is the bias and the gradient finite (no 0 / 0)
    x = torch.full((4, 16), 3.0, device=device).requires_grad_(True)
    w = torch.rand(16, device=device).requires_grad_(True)
    b = torch.randn(16, device=device).requires_grad_(True)
    y, grads = run("bert", x, w, b, 1e-6, torch.randn(4, 16, device=device))
    if not (torch.allclose(y, b.detach().expand(4, 16)) and all(bool(torch.isfinite(g).all()) for g in grads)):
        failures += 1
        print("FAIL constant rows", y, grads)
    print("failures", failures)
    sys.exit(1 if failures else 0)
''')


COMPILE = textwrap.dedent('''
    import itertools
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from normswap.norms import triton_kernels as k

    def build(fn, pointers, scalars, constexprs, warps=4):
        signature = {**{p: "*" + t for p, t in pointers.items()}, **scalars, **{c: "constexpr" for c in constexprs}}
        triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": warps})

    for dt, kind, has_w, has_b in itertools.product(["fp32", "bf16"], [0, 1, 2], [True, False], [True, False]):
        build(k.row_forward_kernel, {"X": dt, "W": "fp32", "B": "fp32", "Y": dt, "S": "fp32"},
              {"stride_x": "i32", "stride_y": "i32", "n": "i32", "eps": "fp32"},
              {"KIND": kind, "HAS_W": has_w, "HAS_B": has_b, "BLOCK": 128})
        build(k.row_backward_kernel, {"DY": dt, "X": dt, "W": "fp32", "S": "fp32", "DX": dt, "DW": "fp32", "DB": "fp32"},
              {"stride_dy": "i32", "stride_x": "i32", "stride_dx": "i32", "rows": "i32", "n": "i32", "rows_per_program": "i32"},
              {"KIND": kind, "HAS_W": has_w, "NEED_X": True, "NEED_W": has_w, "NEED_B": has_b, "BLOCK": 128})
    for kind in (0, 1, 2):  # a long row (a wide conv's fan-in) with the most warps
        build(k.row_forward_kernel, {"X": "bf16", "W": "fp32", "B": "fp32", "Y": "bf16", "S": "fp32"},
              {"stride_x": "i32", "stride_y": "i32", "n": "i32", "eps": "fp32"},
              {"KIND": kind, "HAS_W": False, "HAS_B": False, "BLOCK": 32768}, warps=16)
    for dt, has_w, has_b in itertools.product(["fp32", "bf16"], [True, False], [True, False]):
        build(k.channel_forward_kernel, {"X": dt, "W": "fp32", "B": "fp32", "Y": dt, "MEAN": "fp32", "RSTD": "fp32"},
              {"c": "i32", "s": "i32", "eps": "fp32"}, {"HAS_W": has_w, "HAS_B": has_b, "BLOCK_C": 64, "BLOCK_S": 64})
        build(k.channel_backward_kernel, {"DY": dt, "X": dt, "MEAN": "fp32", "RSTD": "fp32", "W": "fp32", "DX": dt,
                                          "DW": "fp32", "DB": "fp32"},
              {"c": "i32", "s": "i32", "tiles_per_sample": "i32"},
              {"HAS_W": has_w, "NEED_X": True, "NEED_W": has_w, "NEED_B": has_b, "BLOCK_C": 64, "BLOCK_S": 64})
        build(k.group_apply_kernel, {"X": dt, "W": "fp32", "B": "fp32", "MEAN": "fp32", "RSTD": "fp32", "Y": dt},
              {"s": "i32", "c": "i32", "cpg": "i32", "groups": "i32", "tiles_s": "i32"},
              {"HAS_W": has_w, "HAS_B": has_b, "BLOCK_S": 16, "BLOCK_C": 256})
        build(k.group_dx_kernel, {"DY": dt, "X": dt, "W": "fp32", "MEAN": "fp32", "RSTD": "fp32", "COEF_G": "fp32",
                                  "COEF_GH": "fp32", "DX": dt},
              {"s": "i32", "c": "i32", "cpg": "i32", "groups": "i32", "tiles_s": "i32"},
              {"HAS_W": has_w, "BLOCK_S": 16, "BLOCK_C": 256})
    for dt in ("fp32", "bf16"):
        build(k.group_stats_kernel, {"X": dt, "PMEAN": "fp32", "PM2": "fp32"},
              {"s": "i32", "c": "i32", "rows_per_program": "i32"}, {"BLOCK_S": 16, "BLOCK_C": 256})
        build(k.group_grad_sums_kernel, {"DY": dt, "X": dt, "MEAN": "fp32", "RSTD": "fp32", "PDY": "fp32",
                                         "PDYH": "fp32"},
              {"s": "i32", "c": "i32", "cpg": "i32", "groups": "i32", "rows_per_program": "i32"},
              {"BLOCK_S": 16, "BLOCK_C": 256})
    build(k.group_finalize_kernel, {"PMEAN": "fp32", "PM2": "fp32", "MEAN": "fp32", "RSTD": "fp32"},
          {"s": "i32", "c": "i32", "cpg": "i32", "groups": "i32", "tiles": "i32", "rows_per_program": "i32",
           "eps": "fp32"},
          {"BLOCK_T": 64, "BLOCK_K": 8})
    for has_w in (True, False):
        build(k.group_grad_finalize_kernel, {"PDY": "fp32", "PDYH": "fp32", "W": "fp32", "SDY": "fp32", "SDYH": "fp32",
                                             "COEF_G": "fp32", "COEF_GH": "fp32"},
              {"s": "i32", "c": "i32", "cpg": "i32", "groups": "i32", "tiles": "i32"},
              {"HAS_W": has_w, "BLOCK_T": 64, "BLOCK_K": 8})
    # Triton compiles an integer argument equal to 1 as a constant: every count that can be 1 compiled so
    # (GroupNorm(1, C), instance norm's one channel per group, one tile; one row per program; one position)
    ones = {"groups": 1, "cpg": 1, "tiles": 1, "tiles_s": 1, "rows_per_program": 1, "s": 1, "tiles_per_sample": 1}
    for fn, pointers, scalars, constexprs in [
        (k.row_backward_kernel, {"DY": "bf16", "X": "bf16", "W": "fp32", "S": "fp32", "DX": "bf16", "DW": "fp32",
                                 "DB": "fp32"},
         {"stride_dy": "i32", "stride_x": "i32", "stride_dx": "i32", "rows": "i32", "n": "i32"},
         {"KIND": 1, "HAS_W": True, "NEED_X": True, "NEED_W": True, "NEED_B": True, "BLOCK": 128}),
        (k.channel_forward_kernel, {"X": "bf16", "W": "fp32", "B": "fp32", "Y": "bf16", "MEAN": "fp32", "RSTD": "fp32"},
         {"c": "i32", "eps": "fp32"}, {"HAS_W": True, "HAS_B": True, "BLOCK_C": 64, "BLOCK_S": 1}),
        (k.channel_backward_kernel, {"DY": "bf16", "X": "bf16", "MEAN": "fp32", "RSTD": "fp32", "W": "fp32",
                                     "DX": "bf16", "DW": "fp32", "DB": "fp32"}, {"c": "i32"},
         {"HAS_W": True, "NEED_X": True, "NEED_W": True, "NEED_B": True, "BLOCK_C": 64, "BLOCK_S": 1}),
        (k.group_apply_kernel, {"X": "bf16", "W": "fp32", "B": "fp32", "MEAN": "fp32", "RSTD": "fp32", "Y": "bf16"},
         {"s": "i32", "c": "i32"}, {"HAS_W": True, "HAS_B": True, "BLOCK_S": 16, "BLOCK_C": 256}),
        (k.group_dx_kernel, {"DY": "bf16", "X": "bf16", "W": "fp32", "MEAN": "fp32", "RSTD": "fp32", "COEF_G": "fp32",
                             "COEF_GH": "fp32", "DX": "bf16"}, {"s": "i32", "c": "i32"},
         {"HAS_W": True, "BLOCK_S": 16, "BLOCK_C": 256}),
        (k.group_grad_sums_kernel, {"DY": "bf16", "X": "bf16", "MEAN": "fp32", "RSTD": "fp32", "PDY": "fp32",
                                    "PDYH": "fp32"}, {"s": "i32", "c": "i32", "rows_per_program": "i32"},
         {"BLOCK_S": 16, "BLOCK_C": 256}),
        (k.group_finalize_kernel, {"PMEAN": "fp32", "PM2": "fp32", "MEAN": "fp32", "RSTD": "fp32"},
         {"s": "i32", "c": "i32", "rows_per_program": "i32", "eps": "fp32"}, {"BLOCK_T": 64, "BLOCK_K": 8}),
        (k.group_grad_finalize_kernel, {"PDY": "fp32", "PDYH": "fp32", "W": "fp32", "SDY": "fp32", "SDYH": "fp32",
                                        "COEF_G": "fp32", "COEF_GH": "fp32"}, {"s": "i32", "c": "i32"},
         {"HAS_W": True, "BLOCK_T": 64, "BLOCK_K": 8}),
    ]:
        fixed = {a: v for a, v in ones.items() if a in fn.arg_names and a not in scalars}
        build(fn, pointers, scalars, {**fixed, **constexprs})
    print("compiled")
''')


def _run(script, *args, env=None):
    return subprocess.run([sys.executable, "-c", script, *args], env=env or dict(os.environ), capture_output=True,
                          text=True, timeout=900)


INTERPRET = {**os.environ, "TRITON_INTERPRET": "1", "NORMSWAP_TRITON": "1", "OMP_NUM_THREADS": "1"}


@pytest.mark.parametrize("profile", ["quick", pytest.param("full", marks=pytest.mark.long)])
def test_triton_kernels_in_the_interpreter_match_float64_references(profile):
    result = _run(CHECK, "cpu", profile, env=INTERPRET)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "failures 0" in result.stdout


@pytest.mark.long
def test_triton_kernels_compile_for_a_cuda_target():
    """Every kernel variant compiles to sm_90 machine code (no GPU needed): what the interpreter cannot see,
    such as types the compiler would refuse, shows up here."""
    result = _run(COMPILE)
    assert result.returncode == 0 and "compiled" in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_kernels_on_cuda_match_float64_references():
    result = _run(CHECK, "cuda", "full")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.long
def test_the_gpu_tests_pass_as_a_dry_run_on_cpu():
    """tests/test_gpu.py on CPU tensors, the Triton kernels in the interpreter (CUDA-only tests skip): a GPU
    has never run that file, so its own mistakes must show here first (about 2 minutes)."""
    env = {**INTERPRET, "NORMSWAP_GPU_TESTS_ON": "cpu"}
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-o", "addopts=", "-p", "no:cacheprovider",
               str(pathlib.Path(__file__).with_name("test_gpu.py"))]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0 and " passed" in result.stdout, result.stdout[-4000:] + result.stderr[-2000:]
