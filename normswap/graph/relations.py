"""What the module tree does not show: which conv feeds which norm, and functional norm calls.

Read from the graphs of :mod:`normswap.graph.tracing`. A norm that no traced graph calls (it sits in a
module that does not trace, or inside a leaf module) falls back to module order: the conv registered
just before it in the same parent, with as many output channels as the norm has features. Every
fallback is recorded so the report can say so.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
    functional: list[FunctionalCall] = field(default_factory=list)
    trace: TraceResult = field(default_factory=TraceResult)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


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
    seen: set[int] = set()
    for region in rel.trace.regions:
        modules = dict(region.module.named_modules(remove_duplicate=False))
        for node in region.graph.nodes:
            called = rel.trace.module_of(modules.get(node.target)) if node.op == "call_module" else None
            if called is not None and id(called) in norm_ids:
                seen.add(id(called))
                arg = node.args[0] if node.args else None
                conv = _producer_conv(arg, modules) if isinstance(arg, torch.fx.Node) else None
                if conv is not None:
                    norm_path = _join(region.path, node.target)
                    rel.feeds.setdefault(norm_path, []).append(_join(region.path, conv))
            elif node.op == "call_function" and node.target in FUNCTIONAL_NORMS:
                stack = node.meta.get("nn_module_stack") or {}
                inner = list(stack.values())[-1][0] if stack else ""
                norm = FUNCTIONAL_NORMS[node.target]
                rel.functional.append(FunctionalCall(region.path, node.name, norm, region.specialized,
                                                     _join(region.path, inner), _constant_shape(node, norm)))
    _module_order_fallback(model, norms, norm_ids - seen, rel)
    return rel


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
