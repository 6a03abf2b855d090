"""Identify a norm no adapter knows by what it computes.

A module whose class is unknown but looks like a norm (its class name says so, or it holds a per-feature
``weight``/``bias``) is run on random inputs, as a stand-in built from its class with fresh random
parameters on the CPU: the user's module, its values and its hooks are never touched, and a module on
the ``meta`` device probes like any other. Its output is fitted against the formulas normswap can
replace:

- LayerNorm ``(x - mean) / sqrt(var + eps) * w + b`` and RMSNorm ``x / sqrt(mean(x**2) + eps) * w + b``,
  over the last dim or over dim 1 of ``[N, C, *]`` (channels first), with ``w``, ``1 + w`` or no weight,
  with or without the bias;
- frozen BatchNorm ``(x - running_mean) / sqrt(running_var + eps) * w + b`` per channel.

Each candidate is fitted row by row: the affine part is undone, the scale each row was divided by is
measured, and ``eps`` is read off the rows whose variance is far below it (the inputs span nine decades
of scale, so ``eps`` from 0 to 1e-2 is resolved). A candidate is accepted only when every row matches
to 1e-4 relative; the candidates differ from each other by order one on these inputs (rows have a mean
as large as their spread, weights and biases are random), so one cannot pass for another.

What looks like a norm but cannot be identified (a gated norm, extra inputs, a tuple output, a formula
normswap does not know) is reported with the reason; what does not normalize at all (an elementwise
scale such as MobileBERT's ``NoNorm``) is not a norm and is left out.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import math
import re
import types
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .base import NormInfo

# class names that announce a norm, and the family each one names
_NORM_NAME = re.compile(r"(?i)norm(\d+d)?(fp32|act\w*|gated|1p)?$|frozenbn\d*d?$")
_FAMILY_NAMES = (("rms", re.compile(r"(?i)rms|t5layernorm")), ("batch", re.compile(r"(?i)batch|bn")),
                 ("group", re.compile(r"(?i)group")), ("instance", re.compile(r"(?i)instance")),
                 ("layer", re.compile(r"(?i)layer|ln")))
_AFFINE = ("weight", "bias")
_STATS = ("running_mean", "running_var")
_KNOWN_TENSORS = (*_AFFINE, *_STATS, "num_batches_tracked")
_SIZE_ATTRS = ("normalized_shape", "hidden_size", "num_features", "num_channels", "dim", "d_model")
MATCH_TOL = 1e-4  # relative error a candidate formula must stay under on every row
_SCALES = torch.logspace(1, -8, 10, dtype=torch.float64)  # row spreads: eps-free rows down to eps-dominated ones


@dataclass(frozen=True)
class Formula:
    """What probing found a module to compute."""

    kind: str  # "layer", "rms" or "batch"
    channels_first: bool
    eps: float
    weight: str  # "w", "1+w" or "none"
    bias: bool
    frozen: bool = False
    any_size: bool = False  # uses no tensor of its own and normalizes whatever size comes in

    def describe(self) -> str:
        name = {"layer": "LayerNorm", "rms": "RMSNorm", "batch": "BatchNorm with fixed statistics" if self.frozen
                else "BatchNorm (batch statistics in train mode, running ones in eval)"}[self.kind]
        where = "over dim 1 (channels first)" if self.channels_first and self.kind != "batch" else (
            "per channel" if self.kind == "batch" else "over the last dim")
        affine = {"w": "weight", "1+w": "1 + weight", "none": "no weight"}[self.weight]
        return f"{name} {where}, eps={self.eps:g}, {affine}{', bias' if self.bias else ''}"


class NotANorm(Exception):
    """The module does not normalize: it is not a norm at all."""


class Unidentified(Exception):
    """The module looks like a norm but cannot be read; the message is the reason."""


def name_family(cls: type) -> str | None:
    """The norm family a class name announces (``"rms"``, ``"batch"``, ...), or ``None``."""
    name = cls.__name__
    if not _NORM_NAME.search(name):
        return None
    return next((family for family, pattern in _FAMILY_NAMES if pattern.search(name)), None)


def _own_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    out = {n: t for n, t in module._parameters.items() if t is not None}
    out.update((n, t) for n, t in module._buffers.items() if t is not None)
    return out


def _children_have_state(module: nn.Module) -> bool:
    return any(True for c in module.children() for _ in (*c.parameters(), *c.buffers()))


_NORM_FUNCTIONS = frozenset({"layer_norm", "group_norm", "batch_norm", "instance_norm", "rms_norm"})


def _code_names(code: types.CodeType) -> Iterator[str]:
    yield from code.co_names
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _code_names(const)


@functools.lru_cache(maxsize=None)
def calls_norm_function(cls: type) -> bool:
    """Whether a class's own code (torch's classes aside) names a functional norm (``F.layer_norm``, ...):
    a module with no children is traced only then, since nothing else in it can be a norm.

    Example:
        >>> class Scaled(nn.Module):
        ...     def forward(self, x):
        ...         return 2 * torch.nn.functional.layer_norm(x, x.shape[-1:])
        >>> calls_norm_function(Scaled), calls_norm_function(nn.Linear)
        (True, False)
    """
    for klass in cls.__mro__:
        if klass.__module__.startswith("torch.") or klass is object:
            continue
        for value in vars(klass).values():
            fn = getattr(value, "__func__", value)
            code = getattr(fn, "__code__", None)
            if isinstance(code, types.CodeType) and _NORM_FUNCTIONS.intersection(_code_names(code)):
                return True
    return False


def looks_like_norm(module: nn.Module) -> bool:
    """Whether ``module`` is worth probing: an unknown class (not torch's own) whose name says norm, or
    that holds a one-dimensional ``weight``/``bias`` of one size and nothing else with state."""
    cls = type(module)
    if cls.__module__.startswith("torch."):
        return False
    if _NORM_NAME.search(cls.__name__):
        return True
    if _children_have_state(module):
        return False
    tensors = _own_tensors(module)
    affine = [tensors[n] for n in _AFFINE if n in tensors]
    return (bool(affine) and set(tensors) <= set(_KNOWN_TENSORS) and all(t.dim() == 1 for t in affine)
            and len({t.shape for t in affine}) == 1)


def _feature_size(module: nn.Module, tensors: dict[str, torch.Tensor]) -> int | None:
    for name in (*_AFFINE, *_STATS):
        t = tensors.get(name)
        if t is not None:
            if t.dim() != 1:
                raise Unidentified(f"its {name} has shape {tuple(t.shape)}; normswap replaces norms with "
                                   "one-dimensional affine parameters")
            return t.shape[0]
    for attr in _SIZE_ATTRS:
        value = getattr(module, attr, None)
        if isinstance(value, (tuple, list)) and len(value) == 1:
            value = value[0]
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _check_signature(module: nn.Module) -> None:
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return
    extra = [p.name for p in params[1:]]
    if not params or params[0].kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
        raise Unidentified("its forward takes no single input tensor")
    if extra:
        raise Unidentified(f"its forward takes more than the input ({', '.join(extra)}): a gated norm or one with "
                           "extra inputs, which normswap's replacements cannot take")


def _stand_in(module: nn.Module, gen: torch.Generator, dtype: torch.dtype) -> nn.Module:
    """A copy of ``module`` made from its class, with fresh random ``dtype`` tensors on the CPU and no hooks
    (containers among its attributes are copied, so a forward that writes to them leaves the module alone)."""
    cls = type(module)
    shell = cls.__new__(cls)
    state = {k: copy.copy(v) if isinstance(v, (list, dict, set)) else v for k, v in module.__dict__.items()}
    for hooks in [k for k, v in state.items() if k.endswith("hooks") and isinstance(v, dict)]:
        state[hooks] = type(state[hooks])()
    state["_parameters"], state["_buffers"] = {}, {}
    state["_modules"] = {n: None if c is None else copy.deepcopy(c) for n, c in module._modules.items()}
    shell.__dict__.update(state)
    for name, t in module._parameters.items():
        shell._parameters[name] = None if t is None else nn.Parameter(_random(name, t, gen, dtype),
                                                                      requires_grad=False)
    for name, t in module._buffers.items():
        shell._buffers[name] = None if t is None else _random(name, t, gen, dtype)
    return shell


def _random(name: str, t: torch.Tensor, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    shape = tuple(t.shape)
    if not t.is_floating_point():
        return torch.zeros(shape, dtype=t.dtype)
    if name == "weight":
        value = torch.rand(shape, generator=gen, dtype=torch.float64) + 0.5
    elif name == "running_var":  # spread over many decades so eps can be read off the smallest ones
        value = torch.logspace(0, -12, max(shape[0], 1), dtype=torch.float64)[: shape[0]].reshape(shape)
    elif name in ("bias", "running_mean"):
        value = torch.randn(shape, generator=gen, dtype=torch.float64)
    else:
        value = torch.zeros(shape, dtype=torch.float64)
    return value.to(dtype)


def _rows_input(rows: int, features: int, gen: torch.Generator) -> torch.Tensor:
    """``[rows, features]`` with each row's spread from ``_SCALES`` and a mean as large as its spread."""
    scale = _SCALES.repeat(math.ceil(rows / len(_SCALES)))[:rows].unsqueeze(1)
    z = torch.randn(rows, features, generator=gen, dtype=torch.float64)
    offset = torch.randn(rows, 1, generator=gen, dtype=torch.float64) + 1.5
    return (z + offset) * scale


def _layouts(size: int, gen: torch.Generator) -> Iterator[tuple[bool, torch.Tensor, torch.Tensor]]:
    """``(channels_first, input, the same input as [rows, features])`` for the layouts a norm may use."""
    rows = _rows_input(20, size, gen)
    yield False, rows.reshape(2, 10, size), rows
    h, w = (3 if size != 3 else 4), (5 if size != 5 else 6)
    rows = _rows_input(2 * h * w, size, gen)
    yield True, rows.reshape(2, h, w, size).permute(0, 3, 1, 2).contiguous(), rows


def _as_rows(y: torch.Tensor, channels_first: bool) -> torch.Tensor:
    return (y.movedim(1, -1) if channels_first else y).reshape(-1, y.shape[1] if channels_first else y.shape[-1])


def _fit_rows(u: torch.Tensor, centered: torch.Tensor, second_moment: torch.Tensor) -> float | None:
    """Rows of ``u`` should be ``centered / sqrt(second_moment + eps)``: the eps that fits, or ``None``."""
    denom = (centered * centered).sum(1)
    scale = (u * centered).sum(1) / denom
    if not bool(torch.isfinite(scale).all()) or bool((scale <= 0).any()):
        return None
    residual = (u - scale.unsqueeze(1) * centered).norm(dim=1) / u.norm(dim=1).clamp_min(1e-300)
    if float(residual.max()) > MATCH_TOL:
        return None
    eps_rows = 1 / scale.square() - second_moment
    smallest = int(second_moment.argmin())
    measured = float(eps_rows[smallest])
    # below a thousandth of the smallest row's second moment, eps is lost in the module's own rounding
    candidates = [0.0] if measured < 1e-3 * float(second_moment[smallest]) else _written_eps(measured)
    for eps in candidates:
        predicted = 1 / (second_moment + eps).sqrt()
        if float(((predicted - scale).abs() / scale).max()) <= MATCH_TOL:
            return eps
    return None


def _written_eps(eps: float) -> list[float]:
    """The values a module may have been written with, most likely first, for a measured ``eps`` (it carries
    the module's own rounding, often float32's): a dtype's machine epsilon close to it, three significant
    digits, the measured value itself. The caller keeps the first that fits every row (0.00781 is near
    bfloat16's epsilon but is not it)."""
    near = [torch.finfo(d).eps for d in (torch.float32, torch.bfloat16, torch.float16, torch.float64)
            if abs(eps - torch.finfo(d).eps) <= 1e-3 * torch.finfo(d).eps]
    return near[:1] + [float(f"{eps:.3g}"), eps]


def _affine_variants(tensors: dict[str, torch.Tensor], width: int) -> list[tuple[str, bool]]:
    """The ways the module may apply its ``weight``/``bias`` to rows of ``width`` features."""
    fits = {n: n in tensors and tensors[n].numel() == width for n in _AFFINE}
    weights = ["w", "1+w", "none"] if fits["weight"] else ["none"]
    biases = [True, False] if fits["bias"] else [False]
    return [(w, b) for w in weights for b in biases]


def _undo_affine(y: torch.Tensor, tensors: dict[str, torch.Tensor], weight: str, bias: bool) -> torch.Tensor:
    if bias:
        y = y - tensors["bias"]
    if weight == "w":
        y = y / tensors["weight"]
    elif weight == "1+w":
        y = y / (1 + tensors["weight"])
    return y


def _match_row_norm(x_rows: torch.Tensor, y_rows: torch.Tensor, tensors: dict[str, torch.Tensor],
                    channels_first: bool) -> Formula | None:
    mean = x_rows.mean(1, keepdim=True)
    for weight, bias in _affine_variants(tensors, x_rows.shape[1]):
        u = _undo_affine(y_rows, tensors, weight, bias)
        for kind in ("layer", "rms"):
            centered = x_rows - mean if kind == "layer" else x_rows
            eps = _fit_rows(u, centered, centered.square().mean(1))
            if eps is not None:
                return Formula(kind, channels_first, eps, weight, bias)
    return None


def _match_frozen_batch(x_rows: torch.Tensor, y_rows: torch.Tensor, tensors: dict[str, torch.Tensor]) -> Formula | None:
    """Per channel (the columns of the rows): ``(x - running_mean) / sqrt(running_var + eps) * w + b``."""
    if not all(n in tensors and tensors[n].numel() == x_rows.shape[1] for n in _STATS):
        return None
    centered = (x_rows - tensors["running_mean"]).t()
    for weight, bias in _affine_variants(tensors, x_rows.shape[1]):
        if weight == "1+w":
            continue
        u = _undo_affine(y_rows, tensors, weight, bias).t()
        eps = _fit_rows(u, centered, tensors["running_var"])
        if eps is not None:
            return Formula("batch", True, eps, weight, bias, frozen=True)
    return None


def _run(stand_in: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        y = stand_in.forward(x.clone())  # a forward that works in place must not change the probe input
    if not isinstance(y, torch.Tensor):
        raise Unidentified(f"it returns a {type(y).__name__}, not one tensor (a quantized norm, or one with extra "
                           "outputs)")
    if y.shape != x.shape:
        raise _WrongLayout(f"its output has shape {tuple(y.shape)} for an input of shape {tuple(x.shape)}")
    return y.to(torch.float64)


class _WrongLayout(Exception):
    """The module ran on a probe input, but not as a norm over that layout."""


def _normalizes(stand_in: nn.Module, x: torch.Tensor, gen: torch.Generator) -> bool:
    """A norm's output does not change when its input is scaled up: unit-spread rows (eps at most 1e-2 of
    their variance) and the same rows ten times larger give the same output to 1%."""
    z = torch.randn(x.shape, generator=gen, dtype=x.dtype) + 1.5
    try:
        a, b = _run(stand_in, z), _run(stand_in, z * 10)
    except Exception:  # noqa: BLE001 - a module that fails on this layout says nothing about normalizing
        return False
    return float((a - b).norm() / a.norm().clamp_min(1e-300)) < 1e-2


def _identify(module: nn.Module, size: int) -> Formula:
    """Probe in float64; a module that runs in no layout in float64 (a kernel without double support) is
    probed again in float32, where the formulas still differ by far more than the match tolerance."""
    errors: list[str] = []
    for dtype in (torch.float64, torch.float32):
        found = _identify_in(module, size, dtype, errors)
        if found is not None:
            return found
    raise Unidentified(f"it did not run on a [N, T, {size}] or [N, {size}, H, W] input ({errors[0]})")


def _identify_in(module: nn.Module, size: int, dtype: torch.dtype, errors: list[str]) -> Formula | None:
    gen = torch.Generator().manual_seed(0)
    stand_in = _stand_in(module, gen, dtype).eval()
    fresh = {n: t.to(torch.float64) for n, t in _own_tensors(stand_in).items()}
    ran, normalizes = False, False
    for channels_first, x, x_rows in _layouts(size, gen):
        x, x_rows = x.to(dtype), x_rows.to(dtype).to(torch.float64)
        try:
            y = _run(stand_in, x)
        except Unidentified:
            raise
        except Exception as exc:  # noqa: BLE001 - this layout does not fit the module; try the next
            errors.append(f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}")
            continue
        ran = True
        y_rows = _as_rows(y, channels_first)
        found = (_match_frozen_batch(x_rows, y_rows, fresh) if channels_first else None) or \
            _match_row_norm(x_rows, y_rows, fresh, channels_first)
        if found is not None:
            return _check_train_mode(stand_in, x, y, found, fresh)
        normalizes = normalizes or _normalizes(stand_in, x, gen)
    if not ran:
        return None
    if normalizes:
        raise Unidentified("it normalizes, but its output matches no formula normswap can replace (LayerNorm, "
                           "RMSNorm, frozen BatchNorm)")
    if all(n in fresh for n in _STATS):
        raise Unidentified("it holds running statistics but computes no BatchNorm formula normswap knows")
    raise NotANorm


def _check_train_mode(stand_in: nn.Module, x: torch.Tensor, y_eval: torch.Tensor, found: Formula,
                      tensors: dict[str, torch.Tensor]) -> Formula:
    """The formula holds in train mode too (a frozen norm); or, for a BatchNorm with running statistics,
    train mode normalizes with the batch's own statistics (a trainable BatchNorm of another class)."""
    stand_in.train()
    try:
        y_train = _run(stand_in, x)
    finally:
        stand_in.eval()
    scale = float(y_eval.abs().max()) or 1.0
    if float((y_train - y_eval).abs().max()) / scale <= MATCH_TOL:
        return found
    if found.kind == "batch":
        x64 = x.to(torch.float64)
        dims = [0, *range(2, x.dim())]
        mean, var = x64.mean(dims, keepdim=True), x64.var(dims, keepdim=True, correction=0)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        expected = (x64 - mean) / torch.sqrt(var + found.eps)
        if found.weight == "w":
            expected = expected * tensors["weight"].reshape(shape)
        if found.bias:
            expected = expected + tensors["bias"].reshape(shape)
        if float((y_train - expected).abs().max()) / (float(expected.abs().max()) or 1.0) <= MATCH_TOL:
            return Formula("batch", True, found.eps, found.weight, found.bias, frozen=False)
    raise Unidentified(f"in eval mode it computes {found.describe()}, but its train-mode output differs "
                       "(batch statistics or dropout normswap cannot read)")


def _unsized(module: nn.Module) -> Formula:
    """A norm with no parameter and no size: it must compute the same formula whatever the size."""
    found = {_identify(module, size) for size in (8, 12)}
    if len(found) != 1:
        raise Unidentified("it computes different things for inputs of different sizes")
    return dataclasses.replace(found.pop(), any_size=True)


def _size_free(module: nn.Module, size: int, found: Formula) -> Formula:
    """A norm that uses none of its tensors (FalconMamba's weightless RMSNorm keeps a dummy ``weight`` of
    another size than its input) may normalize any size: then its replacement must too."""
    try:
        other = _identify(module, size + 5)
    except (Unidentified, NotANorm):
        return found
    return dataclasses.replace(found, any_size=True) if other == found else found


_CACHE: dict[tuple, Formula | Unidentified | NotANorm] = {}


def _cache_key(module: nn.Module, tensors: dict[str, torch.Tensor]) -> tuple | None:
    attrs = []
    for k, v in sorted(vars(module).items()):
        if k.startswith("_") or k == "training":
            continue
        if isinstance(v, (bool, int, float, str, type(None))) or (
                isinstance(v, tuple) and all(isinstance(e, (bool, int, float, str)) for e in v)):
            attrs.append((k, v))
    try:
        hash(tuple(attrs))
    except TypeError:
        return None
    shapes = tuple((n, tuple(t.shape), t.is_floating_point()) for n, t in sorted(tensors.items()))
    return type(module), shapes, tuple(attrs), tuple(module._modules)


def identify(module: nn.Module) -> Formula:
    """What ``module`` computes, found by running a random stand-in of it.

    Raises :class:`Unidentified` (with the reason) for a norm normswap cannot read and :class:`NotANorm`
    for a module that does not normalize.

    Example:
        >>> class MyLayerNorm(nn.Module):
        ...     def __init__(self, d):
        ...         super().__init__()
        ...         self.weight = nn.Parameter(torch.ones(d))
        ...     def forward(self, x):
        ...         x = x - x.mean(-1, keepdim=True)
        ...         return self.weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        >>> identify(MyLayerNorm(16)).describe()
        'LayerNorm over the last dim, eps=1e-06, weight'
    """
    tensors = _own_tensors(module)
    key = _cache_key(module, tensors)
    cached = _CACHE.get(key) if key is not None else None
    if cached is None:
        try:
            _check_signature(module)
            if _children_have_state(module):
                raise Unidentified("it holds submodules with parameters or buffers, which a replacement would drop")
            extra = sorted(n for n, t in tensors.items() if n not in _KNOWN_TENSORS and t.is_floating_point())
            if extra and name_family(type(module)) is not None:
                raise Unidentified(f"it holds tensors normswap cannot map to a norm's ({', '.join(extra)})")
            size = _feature_size(module, tensors)
            cached = _identify(module, size) if size is not None else _unsized(module)
            if size is not None and cached.kind != "batch" and cached.weight == "none" and not cached.bias:
                cached = _size_free(module, size, cached)
        except (Unidentified, NotANorm) as exc:
            cached = exc
        if key is not None:
            _CACHE[key] = cached
    if isinstance(cached, Exception):
        raise cached
    return cached


def probed_info(module: nn.Module, found: Formula) -> NormInfo:
    """A :class:`NormInfo` for ``module`` from what probing found (its own tensors, not the stand-in's)."""
    tensors = _own_tensors(module)
    size = _feature_size(module, tensors)
    weight = tensors.get("weight") if found.weight != "none" else None
    bias = tensors.get("bias") if found.bias else None
    if found.kind == "batch":
        momentum = getattr(module, "momentum", 0.1) if not found.frozen else None
        return NormInfo(kind="batch", num_features=size, eps=found.eps, channels_first=True, normalized_shape=(size,),
                        weight=weight, bias=bias, running_mean=tensors["running_mean"],
                        running_var=tensors["running_var"],
                        momentum=momentum if isinstance(momentum, float) or momentum is None else 0.1,
                        track_running_stats=True, frozen=found.frozen, spatial_dims=2,
                        variant="frozen" if found.frozen else "", identified=found.describe())
    shape = (size,) if size is not None and not found.any_size else ()
    return NormInfo(kind=found.kind, num_features=shape[0] if shape else 0, eps=found.eps, channels_first=found.channels_first,
                    normalized_shape=shape, weight=weight, bias=bias,
                    weight_offset=1.0 if found.weight == "1+w" else 0.0, identified=found.describe())
