"""What every converted zoo model is checked for, beyond finite forward/backward (``zoo_checks.py``):

- every module of the spec's source family has a plan row (nothing left behind silently);
- each converted module computes its spec's formula, recomputed here in float64 from its own input;
- every conv whose output reaches a converted norm is Weight Standardized (a per-channel rescale and
  shift of its raw weight leaves its output unchanged) or named in that norm's plan row.

The references are written out here with torch ops, independently of normswap's layers.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

import normswap
from norm_helpers import affine
from normswap.adapters import calls_norm_function, read_norm

SOURCES = {"gn_ws": ("batch",), "gn": ("batch",), "in": ("batch",), "ghost_bn": ("batch",), "ln": ("batch", "rms"),
           "rms": ("layer",), "bert_ln": ("layer",)}
BATCH_INDEPENDENT = ("gn_ws", "gn", "in", "ln")  # specs whose output must not depend on the batch
# class names of norms, by family, written independently of normswap's own probing patterns
_SUFFIX = r"(\d+d|Act\d*d?|Fp32|2d)?$"  # BatchNorm2d, BatchNormAct2d, LayerNormFp32, ...: a norm, not a block
_NAMES = (("rms", re.compile(r"(RMSNorm|RmsNorm|T5LayerNorm)" + _SUFFIX)),
          ("batch", re.compile(r"(BatchNorm|FrozenBN)" + _SUFFIX)), ("layer", re.compile(r"LayerNorm" + _SUFFIX)))
_TORCH = ((nn.modules.batchnorm._BatchNorm, "batch"), (nn.LayerNorm, "layer"), (nn.RMSNorm, "rms"))


def _family_by_oracle(module: nn.Module) -> str | None:
    for cls, family in _TORCH:
        if isinstance(module, cls):
            return family
    name = type(module).__name__
    return next((family for family, pattern in _NAMES if pattern.search(name)), None)


def unplanned_norms(model: nn.Module, plan: normswap.Plan, spec: str) -> list[str]:
    """Paths of ``model``'s modules of ``spec``'s source family with no plan row, and norm-looking modules
    normswap did not read at all (neither as a norm nor with a reason)."""
    rows = {p for c in plan.changes for p in (c.path, *c.also_at)}
    out = []
    for path, module in model.named_modules(remove_duplicate=False):
        oracle = _family_by_oracle(module)
        info, reason = read_norm(module)
        if oracle is not None and info is None and reason is None:
            # a norm-named module normswap does not read whole must be one whose functional norm calls it rewrites
            # (transformers' WavTokenizerAdaLayerNorm: F.layer_norm, then a scale and shift looked up by id)
            if not calls_norm_function(type(module)):
                out.append(f"{path} ({type(module).__name__}: not read)")
            elif oracle in SOURCES[spec] and path not in rows:
                out.append(f"{path} ({type(module).__name__}: no plan row for its functional norm call)")
            continue
        family = info.kind if info is not None else (normswap.adapters.norm_family(module) if reason else None)
        if (info is not None or reason) and (family is None or family in SOURCES[spec]) and path not in rows:
            out.append(f"{path} ({type(module).__name__}: no plan row)")
    return out


# ------------------------------------------------------------------------------------------- formulas


def _f64(t):
    return None if t is None else t.detach().double()


def _layer(x, shape, w, b, eps):
    dims = tuple(range(-len(shape), 0))
    mean = x.mean(dims, keepdim=True)
    var = (x - mean).square().mean(dims, keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps)
    return affine(y, w, b)


def _rms(x, shape, w, b, eps):
    dims = tuple(range(-len(shape), 0))
    y = x / torch.sqrt(x.square().mean(dims, keepdim=True) + eps)
    return affine(y, w, b)


def _bert(x, shape, w, b, eps):
    dims = tuple(range(-len(shape), 0))
    mean = x.mean(dims, keepdim=True)
    std = x.std(dims, keepdim=True, correction=1)
    return affine((x - mean) / (std + eps), w, b)


def _channels_first(fn, x, w, b, eps):
    return fn(x.movedim(1, -1), (x.shape[1],), w, b, eps).movedim(-1, 1)


def _standardized(w: torch.Tensor, eps: float, mode: str) -> torch.Tensor:
    flat = w.reshape(w.shape[0], -1)
    mean = flat.mean(1, keepdim=True)
    if mode == "inside":
        out = (flat - mean) / torch.sqrt(flat.var(1, keepdim=True, correction=0) + eps)
    else:
        out = (flat - mean) / (flat.std(1, keepdim=True, correction=1) + eps)
    return out.reshape(w.shape)


def _conv(module: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``module``'s convolution of ``x`` with ``weight`` (padding modes and 'same' padding included)."""
    plain = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[weight.dim() - 2]
    if hasattr(module, "forward") and "Same" in type(module).__name__:
        from timm.layers.padding import pad_same

        x = pad_same(x, module.kernel_size, module.stride, module.dilation)
        padding = 0
    else:
        padding = module.padding
    if module.padding_mode != "zeros":
        return plain._conv_forward(module, x, weight, bias)
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[weight.dim() - 2]
    return fn(x, weight, bias, module.stride, padding, module.dilation, module.groups)


def reference(module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """What the converted ``module`` must compute on ``x``, in float64; ``None`` for a module type this file
    has no reference for (then the check fails: every type a spec makes has one)."""
    from normswap.norms.bert_layer_norm import BertLayerNorm, BertLayerNorm2d
    from normswap.norms.channel_layer_norm import ChannelLayerNorm
    from normswap.norms.rms_norm import CenteredRMSNorm, RMSNorm, RMSNorm2d
    from normswap.norms.std_conv import StandardizedConv
    from normswap.norms.unsized import UnsizedNorm

    x = x.detach().double()
    w, b = _f64(getattr(module, "weight", None)), _f64(getattr(module, "bias", None))
    eps = getattr(module, "eps", None)
    if isinstance(module, StandardizedConv):
        return _conv(module, x, _standardized(w, module.ws_eps, module.ws_eps_mode), b)
    if isinstance(module, nn.GroupNorm):
        y = F.group_norm(x, module.num_groups, w, b, eps)
    elif isinstance(module, nn.modules.instancenorm._InstanceNorm):
        y = F.instance_norm(x, weight=w, bias=b, eps=eps)
    elif isinstance(module, nn.modules.batchnorm._BatchNorm) and not module.training:
        y = F.batch_norm(x, _f64(module.running_mean), _f64(module.running_var), w, b, False, 0.0, eps)
    elif isinstance(module, ChannelLayerNorm):
        y = _channels_first(_layer, x, w, b, eps) if x.dim() > 2 else _layer(x, (x.shape[-1],), w, b, eps)
    elif isinstance(module, BertLayerNorm2d):
        y = _channels_first(_bert, x, w, b, eps)
    elif isinstance(module, BertLayerNorm):
        y = _bert(x, module.normalized_shape, w, b, eps)
    elif isinstance(module, RMSNorm2d):
        y = _channels_first(_rms, x, w, b, eps)
    elif isinstance(module, CenteredRMSNorm):  # heads a residual stream (exact=True): its output is centered
        y = _rms(x, module.normalized_shape, w, b, eps)
        dims = tuple(range(-len(module.normalized_shape), 0))
        y = y - y.mean(dims, keepdim=True)
    elif isinstance(module, RMSNorm):
        y = _rms(x, module.normalized_shape, w, b, eps)
    elif isinstance(module, nn.LayerNorm):
        y = _layer(x, module.normalized_shape, w, b, eps)
    elif isinstance(module, UnsizedNorm):
        fn = {"layer": _layer, "rms": _rms, "bert": _bert}[module.kind]
        y = _channels_first(fn, x, None, None, eps) if module.channels_first else fn(x, (x.shape[-1],), None, None, eps)
    else:
        return None
    if getattr(module, "act", None) is not None:  # a fused act (timm norm-act); eval mode: drop is identity
        y = module.act(y.float()).double()
    return y


def _capture(model: nn.Module, paths: list[str], inputs: dict, run) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = []
    for path in paths:
        def hook(m, args, out, path=path):
            if args and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor):
                seen.setdefault(path, (args[0].detach().clone(), out.detach().clone()))
        hooks.append(model.get_submodule(path).register_forward_hook(hook))
    try:
        with torch.no_grad():
            run(model, inputs)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _cancellation(x: torch.Tensor, groups: int | None = None) -> float:
    """How many times larger than its spread a set of values ``x`` is normalized over gets (rows over the last
    dim and over dim 1, and each group of a GroupNorm): a norm of such a set loses that factor of precision in
    any float implementation."""
    flats = [x.double().movedim(dim, -1).reshape(-1, x.shape[dim]) for dim in {x.dim() - 1, min(1, x.dim() - 1)}]
    if groups and x.dim() >= 2 and x.shape[1] % groups == 0:
        flats.append(x.double().reshape(x.shape[0] * groups, -1))
    out = 1.0
    for flat in flats:
        if flat.shape[1] > 1:
            spread = flat.std(1, correction=0).clamp_min(1e-30)
            out = max(out, float((flat.abs().amax(1) / spread).max()))
    return out


def _norm_tolerance(x: torch.Tensor, dtype: torch.dtype, groups: int | None = None) -> float:
    """64 ulp of ``dtype`` relative to the output's scale, times the input's cancellation."""
    return 64 * torch.finfo(dtype).eps * min(_cancellation(x, groups), 1e4)


def _conv_bound(module: nn.Module, x: torch.Tensor, raw: torch.Tensor, weight: torch.Tensor,
                dtype: torch.dtype) -> torch.Tensor:
    """Elementwise rounding bound of a standardized ``dtype`` convolution: ``16 sqrt(fan_in)`` ulp of
    ``conv(|x|, |w|)`` for the convolution, plus the standardized weight's own error (8 ulp times how far
    above its spread a raw filter's largest value lies: ``w - mean`` cancels that much) carried through."""
    eps = torch.finfo(dtype).eps
    flat = raw.reshape(raw.shape[0], -1)
    cancel = flat.abs().amax(1) / flat.std(1, correction=0).clamp_min(1e-30)
    weight_error = (8 * eps * cancel).reshape(-1, *[1] * (raw.dim() - 1)).expand_as(raw)
    with torch.no_grad():
        absconv = _conv(module, x.abs(), weight.abs(), None)
        carried = _conv(module, x.abs(), weight_error.contiguous(), None)
    floor = 64 * torch.finfo(dtype).tiny * eps  # 64 subnormal steps, for activations that vanished
    return 16 * eps * weight[0].numel() ** 0.5 * absconv + carried + floor


def formula_errors(model: nn.Module, plan: normswap.Plan, inputs: dict, run) -> list[str]:
    """Converted modules (norms and standardized convs of ``plan``) whose eval output is not their formula."""
    model.eval()
    paths = [c.path for c in plan.changes if c.action in ("replace", "standardize")]
    paths += [p for c in plan.changes for p in c.convs_standardized]
    paths = [p for p in dict.fromkeys(paths) if p != "<root>"]
    seen = _capture(model, paths, inputs, run)
    bad = []
    for path, (x, out) in seen.items():
        if not x.is_floating_point() or x.numel() == 0:
            continue
        ref = reference(model.get_submodule(path), x)
        if ref is None:
            bad.append(f"{path}: no reference for {type(model.get_submodule(path)).__name__}")
            continue
        module = model.get_submodule(path)
        diff = (out.double() - ref).abs()
        if hasattr(module, "ws_eps"):  # a standardized conv: elementwise rounding bound of the convolution
            raw = _f64(module.weight)
            bound = _conv_bound(module, x.double(), raw, _standardized(raw, module.ws_eps, module.ws_eps_mode),
                                out.dtype)
            worst = float((diff / bound).max())
            if not worst <= 1.0:
                bad.append(f"{path} ({type(module).__name__}): {worst:.3g}x its rounding bound off its formula")
            continue
        scale = float(ref.abs().max()) or 1.0
        # an absolute floor of 64 subnormal steps: activations of a random network can vanish into denormals
        floor = 64 * torch.finfo(out.dtype).tiny * torch.finfo(out.dtype).eps
        err = float(diff.max()) / scale
        tol = _norm_tolerance(x, out.dtype, getattr(module, "num_groups", None)) + floor / scale
        if not err <= tol:
            bad.append(f"{path} ({type(module).__name__}): {err:.3g} off its formula (tol {tol:.2g})")
    return bad


# ------------------------------------------------------------------------------------------- conv feeds


def unstandardized_feeds(model: nn.Module, plan: normswap.Plan, inputs: dict, run) -> list[str]:
    """Convs whose output is, value for value, the input of a norm the plan replaced, and that are neither
    standardized (checked by rescaling their raw weight) nor named in that norm's plan row."""
    from normswap.norms.std_conv import StandardizedConv

    model.eval()
    convs = [p for p, m in model.named_modules() if isinstance(m, nn.modules.conv._ConvNd)]
    norms = {p: c for c in plan.replaced for p in (c.path, *c.also_at)}
    seen = _capture(model, convs + list(norms), inputs, run)
    outs: dict[tuple, list[str]] = {}
    for p in convs:
        if p in seen:
            outs.setdefault(tuple(seen[p][1].shape), []).append(p)
    bad = []
    for norm_path, change in norms.items():
        if norm_path not in seen:
            continue
        x = seen[norm_path][0]
        for conv_path in outs.get(tuple(x.shape), []):
            if not torch.equal(seen[conv_path][1], x):
                continue
            conv = model.get_submodule(conv_path)
            named = any(conv_path in w for w in change.warnings)
            if isinstance(conv, StandardizedConv):
                if not _rescale_invariant(conv, seen[conv_path][0]):
                    bad.append(f"{conv_path}: standardized, but its output changes when its weight is rescaled")
            elif not named:
                bad.append(f"{conv_path} feeds {norm_path} but is neither standardized nor named in its row")
    return bad


def _rescale_invariant(conv: nn.Module, x: torch.Tensor) -> bool:
    """Weight Standardization makes a conv blind to a per-output-channel scale and shift of its raw weight
    (up to the eps, which the scale keeps small against the weight's spread)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        before = conv(x)
        saved = conv.weight.detach().clone()
        # eps shifts a standardized channel by eps / (2 var) relative; a scale in [0.5, 1.5] moves that by < 4x
        var = float(saved.reshape(saved.shape[0], -1).double().var(1, correction=0).min())
        tol = 4 * conv.ws_eps / max(var, 1e-30) + 64 * torch.finfo(saved.dtype).eps * saved[0].numel() ** 0.5
        shape = (-1,) + (1,) * (saved.dim() - 1)
        scale = (torch.rand(saved.shape[0], generator=g) + 0.5).reshape(shape)
        shift = torch.randn(saved.shape[0], generator=g).reshape(shape) * saved.std()
        try:
            conv.weight.copy_(saved * scale + shift)
            after = conv(x)
        finally:
            conv.weight.copy_(saved)
    scale_out = float(before.abs().max()) or 1.0
    return float((after - before).abs().max()) / scale_out <= tol
