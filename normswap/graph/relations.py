"""What the module tree does not show: which conv feeds which norm, and functional norm calls.

Read from the graphs of :mod:`normswap.graph.tracing`. A norm that no traced graph calls (it sits in a
module that does not trace, or inside a leaf module) falls back to module order: the conv registered
just before it in the same parent, with as many output channels as the norm has features. Every
fallback is recorded so the report can say so.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from .tracing import TraceResult, trace_regions

# functional norm calls, by the name of the norm they compute
FUNCTIONAL_NORMS: dict[object, str] = {
    F.layer_norm: "layer_norm", torch.layer_norm: "layer_norm",
    F.group_norm: "group_norm", torch.group_norm: "group_norm",
    F.batch_norm: "batch_norm", torch.batch_norm: "batch_norm",
    F.instance_norm: "instance_norm", torch.instance_norm: "instance_norm",
}
for _fn in (getattr(F, "rms_norm", None), getattr(torch, "rms_norm", None)):
    if _fn is not None:
        FUNCTIONAL_NORMS[_fn] = "rms_norm"
# the norm family each functional norm belongs to (the ``kind`` of a NormInfo)
FUNCTIONAL_FAMILY = {"layer_norm": "layer", "rms_norm": "rms", "batch_norm": "batch", "group_norm": "group",
                     "instance_norm": "instance"}

# ops a conv's output may pass through on its way to a norm without changing which conv it is
_PASS_MODULES = (nn.Identity, nn.Dropout, nn.Dropout2d, nn.Dropout3d, nn.ZeroPad2d, nn.ConstantPad2d)
_PASS_METHODS = {"contiguous", "float", "to", "type_as", "clone"}


@dataclass
class FunctionalCall:
    """A functional norm call found in a traced module's graph."""

    region: str
    node: str
    norm: str
    specialized: bool
    module_path: str  # the innermost module whose forward makes the call
    shape: tuple[int, ...] | None = None  # a layer / rms norm's normalized_shape, when the graph holds it as constants


@dataclass
class Relations:
    """Conv -> norm feeds (module paths), functional calls, and what could not be traced."""

    feeds: dict[str, list[str]] = field(default_factory=dict)  # norm path -> conv paths feeding it
    by_module_order: set[str] = field(default_factory=set)  # norm paths whose feed came from module order
    unresolved: set[str] = field(default_factory=set)  # norm paths no graph calls and module order did not place
    # norm paths whose input the graph shows to hold one position per channel: a global pool's output, through
    # ops that keep that size (squeeze-excite gates: [N, C, 1, 1])
    pooled: set[str] = field(default_factory=set)
    functional: list[FunctionalCall] = field(default_factory=list)
    trace: TraceResult = field(default_factory=TraceResult)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def _producer_conv(node: torch.fx.Node, modules: dict[str, nn.Module], depth: int = 4) -> str | None:
    """The call_module conv whose output reaches ``node`` through pass-through ops only."""
    for _ in range(depth):
        if node.op == "call_module":
            mod = modules.get(node.target)
            if isinstance(mod, nn.modules.conv._ConvNd):
                return node.target
            if not isinstance(mod, _PASS_MODULES):
                return None
        elif node.op == "call_method" and node.target in _PASS_METHODS:
            pass
        elif node.op == "call_function" and node.target is F.pad:
            pass
        else:
            return None
        if not node.args or not isinstance(node.args[0], torch.fx.Node):
            return None
        node = node.args[0]
    return None


def find_relations(model: nn.Module, norms: dict[str, nn.Module], convs: dict[str, nn.Module]) -> Relations:
    """Find conv -> norm feeds and functional norm calls in ``model``.

    ``norms`` and ``convs`` map every module path (aliases included) to the module.

    Example:
        >>> m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
        >>> find_relations(m, {"1": m[1]}, {"0": m[0]}).feeds
        {'1': ['0']}
    """
    rel = Relations(trace=trace_regions(model, list(norms.values())))
    norm_ids = {id(m) for m in norms.values()}
    is_norm = lambda m: id(rel.trace.module_of(m)) in norm_ids  # noqa: E731
    seen: set[int] = set()
    for region in rel.trace.regions:
        modules = dict(region.module.named_modules(remove_duplicate=False))
        for node in region.graph.nodes:
            called = rel.trace.module_of(modules.get(node.target)) if node.op == "call_module" else None
            if called is not None and id(called) in norm_ids:
                seen.add(id(called))
                arg = node.args[0] if node.args else None
                conv = _producer_conv(arg, modules) if isinstance(arg, torch.fx.Node) else None
                norm_path = _join(region.path, node.target)
                if conv is not None:
                    rel.feeds.setdefault(norm_path, []).append(_join(region.path, conv))
                if isinstance(arg, torch.fx.Node) and _globally_pooled(arg, modules, is_norm, _spatial_dims(called)):
                    rel.pooled.add(norm_path)
            elif node.op == "call_function" and node.target in FUNCTIONAL_NORMS:
                stack = node.meta.get("nn_module_stack") or {}
                inner = list(stack.values())[-1][0] if stack else ""
                norm = FUNCTIONAL_NORMS[node.target]
                rel.functional.append(FunctionalCall(region.path, node.name, norm, region.specialized,
                                                     _join(region.path, inner), _constant_shape(node, norm)))
    _module_order_fallback(model, norms, norm_ids - seen, rel)
    return rel


# reductions that, over every spatial dim with keepdim, leave one position per channel
_POOL_METHODS = {"mean", "amax", "amin", "sum"}
_POOL_FUNCTIONS = {torch.mean, torch.amax, torch.amin, torch.sum}
_ADAPTIVE_POOLS = {F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
                   F.adaptive_max_pool2d, F.adaptive_max_pool3d}
# elementwise ops a pooled tensor may pass through on its way to a norm: unary, and binary ones whose tensor
# operands are all pooled (timm's avg+max pools: 0.5 * (avg + max))
_ELEMENTWISE_FUNCTIONS = {F.relu, F.relu6, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid, F.leaky_relu, F.elu,
                          F.sigmoid, F.tanh, torch.relu, torch.sigmoid, torch.tanh}
_ELEMENTWISE_METHODS = _PASS_METHODS | {"relu", "sigmoid", "tanh"}
_BINARY = {operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul, torch.div,
           torch.maximum, torch.minimum}


def _spatial_dims(module: nn.Module | None) -> int | None:
    """The spatial dims of a norm's input: by torch's BatchNorm classes, else by a class name ending in 1d/2d/3d
    (timm's FrozenBatchNorm2d, BatchNormAct2d); ``None`` when neither says."""
    for cls, dims in ((nn.BatchNorm1d, 1), (nn.BatchNorm2d, 2), (nn.BatchNorm3d, 3)):
        if isinstance(module, cls):
            return dims
    found = re.search(r"([123])[dD]$", type(module).__name__)
    return int(found.group(1)) if found else None


def _all_spatial(dims: object, spatial: int) -> bool:
    """Whether reduction ``dims`` of a tensor with ``spatial`` spatial dims cover every one of them."""
    dims = (dims,) if isinstance(dims, int) else dims
    if not isinstance(dims, (tuple, list)) or not all(isinstance(d, int) for d in dims):
        return False
    rank = spatial + 2
    return {d % rank for d in dims} == set(range(2, rank))


def _ones(size: object) -> bool:
    return all(s == 1 for s in (size if isinstance(size, (tuple, list)) else (size,)))


def _is_global_pool(node: torch.fx.Node, modules: dict[str, nn.Module], spatial: int) -> bool:
    if node.op == "call_module":
        mod = modules.get(node.target)
        pools = (nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd)
        return isinstance(mod, pools) and _ones(mod.output_size)
    if node.op == "call_function" and node.target in _ADAPTIVE_POOLS:
        return _ones(node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size"))
    if node.op == "call_method" and node.target in _POOL_METHODS or (
            node.op == "call_function" and node.target in _POOL_FUNCTIONS):
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        return keepdim is True and _all_spatial(dims, spatial)
    return False


def _keeps_one_position(mod: nn.Module) -> bool:
    """Whether ``mod``, given one position per channel, outputs one position per channel."""
    if isinstance(mod, nn.modules.conv._ConvNd):
        if mod.padding == "same" or type(mod).__name__.endswith("Same"):  # timm's Conv2dSame pads at run time
            return True
        padding = (0,) * len(mod.kernel_size) if mod.padding == "valid" else mod.padding
        # output extent of a size-1 input: floor((2 p - d (k - 1)) / s) + 1
        return all(0 <= 2 * p - d * (k - 1) < s for p, d, k, s in
                   zip(padding, mod.dilation, mod.kernel_size, mod.stride))
    # activation modules: torch's, timm's (timm.layers.activations*), transformers' (transformers.activations)
    return isinstance(mod, _PASS_MODULES) or type(mod).__module__.rsplit(".", 1)[-1].startswith("activation")


def _position_inputs(node: torch.fx.Node, modules: dict[str, nn.Module], is_norm: Callable[[nn.Module], bool],
                     spatial: int) -> list[torch.fx.Node] | None:
    """The tensor inputs of ``node`` when it keeps one position per channel given one in each of them; ``None``
    for any other op."""
    args = [a for a in node.args if isinstance(a, torch.fx.Node)]
    if node.op == "call_module":
        mod = modules.get(node.target)
        keeps = mod is not None and (is_norm(mod) or _keeps_one_position(mod))
        return args[:1] if keeps else None
    if node.op == "call_function" and node.target in _ELEMENTWISE_FUNCTIONS or (
            node.op == "call_method" and node.target in _ELEMENTWISE_METHODS):
        return args[:1]
    if node.op == "call_function" and node.target in _BINARY:
        return args
    if node.op == "call_function" and node.target is torch.cat and node.args:
        parts, dim = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        if isinstance(dim, int) and dim % (spatial + 2) in (0, 1) and isinstance(parts, (tuple, list)):
            return [p for p in parts if isinstance(p, torch.fx.Node)]
    return None


def _globally_pooled(node: torch.fx.Node, modules: dict[str, nn.Module], is_norm: Callable[[nn.Module], bool],
                     spatial: int | None, depth: int = 8) -> bool:
    """Whether ``node`` (a norm's input) is a global pool's output, reached through ops that keep one
    position per channel (1x1 convs, activations, norms, dropout, sums of pooled tensors); ``spatial``: the
    norm's spatial dims."""
    if not spatial or spatial < 2 or depth == 0:
        return False
    if _is_global_pool(node, modules, spatial):
        return True
    inputs = _position_inputs(node, modules, is_norm, spatial)
    return bool(inputs) and all(_globally_pooled(i, modules, is_norm, spatial, depth - 1) for i in inputs)


def _constant_shape(node: torch.fx.Node, norm: str) -> tuple[int, ...] | None:
    """The ``normalized_shape`` of a layer / rms norm call when it is written as constants (not computed)."""
    if norm not in ("layer_norm", "rms_norm"):
        return None
    shape = node.args[1] if len(node.args) > 1 else node.kwargs.get("normalized_shape")
    if isinstance(shape, int) and not isinstance(shape, bool):
        return (shape,)
    if isinstance(shape, (tuple, list)) and all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        return tuple(shape)
    return None


def _last_conv(path: str, module: nn.Module) -> tuple[str, nn.Module] | None:
    """The conv whose output leaves ``module``: itself, or the last conv of a ``Sequential`` after which only
    pass-through modules (padding, identity, dropout) follow."""
    if isinstance(module, nn.modules.conv._ConvNd):
        return path, module
    if isinstance(module, nn.Sequential):
        for name, child in reversed(list(module.named_children())):
            if not isinstance(child, _PASS_MODULES):
                return _last_conv(_join(path, name), child)
    return None


def _module_order_fallback(model: nn.Module, norms: dict[str, nn.Module], unseen: set[int], rel: Relations) -> None:
    """Norms no graph calls: the conv registered just before them in the same parent, when its output
    channels match (a ``Sequential`` ending in a conv counts); the others are ``unresolved``."""
    if not unseen:
        return
    for parent_path, parent in model.named_modules(remove_duplicate=False):
        previous: tuple[str, nn.Module] | None = None
        for name, child in parent.named_children():
            path = _join(parent_path, name)
            if id(child) in unseen:
                features = getattr(child, "num_features", None) or getattr(getattr(child, "weight", None),
                                                                           "shape", [None])[0]
                if previous is not None and previous[1].out_channels == features:
                    rel.feeds.setdefault(path, []).append(previous[0])
                    rel.by_module_order.add(path)
                else:
                    rel.unresolved.add(path)
            previous = _last_conv(path, child)
