"""Trace the smallest enclosing modules that torch.fx can trace.

Whole timm models usually trace; HuggingFace models (``transformers`` v5 has no FX tracer of its own)
mostly do not, but their blocks do. :func:`trace_regions` tries a module, and when it fails, its
children, down to the leaves. Norms, convs, and the modules timm marks as not traceable are leaves.
A module is first traced with every argument symbolic (a graph that can replace its ``forward``); if
that fails, once more with its defaulted arguments fixed to their defaults (``specialized``: good for
reading relations, not for rewriting).
"""

from __future__ import annotations

import copy
import inspect
import sys
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.fx
from torch import nn

from ..adapters import calls_norm_function


@dataclass
class Region:
    """A module that traced, with its graph; ``path`` is its module path in the model."""

    path: str
    module: nn.Module
    graph: torch.fx.Graph
    specialized: bool


@dataclass
class TraceResult:
    """The traced regions and the modules under which nothing traced (paths, with the first error)."""

    regions: list[Region] = field(default_factory=list)
    untraced: list[tuple[str, str]] = field(default_factory=list)
    original: dict[int, nn.Module] = field(default_factory=dict)  # id of a traced copy's module -> the model's

    def module_of(self, traced: nn.Module | None) -> nn.Module | None:
        """The model's own module for a module of a traced region (regions trace a copy of the model)."""
        return None if traced is None else self.original.get(id(traced), traced)


def structure_copy(model: nn.Module) -> tuple[nn.Module, dict[int, nn.Module]]:
    """A copy of ``model``'s module tree and state sharing its parameters and buffers (no tensor is copied),
    and a map from each copied module's id to the original. Tracing runs ``forward`` with Proxies, and a
    forward that stores what it sees (timm's feature hooks keep outputs by device) must store it here, not
    in the user's model."""
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    copied = copy.deepcopy(model, dict(tensors))
    originals = dict(model.named_modules(remove_duplicate=False))
    return copied, {id(m): originals[p] for p, m in copied.named_modules(remove_duplicate=False) if p in originals}


def _timm_notrace() -> tuple[tuple[type, ...], tuple]:
    fx = sys.modules.get("timm.layers._fx")
    if fx is None:
        return (), ()
    try:
        return tuple(fx.get_notrace_modules()), tuple(fx.get_notrace_functions())
    except Exception:  # an older or newer timm without these helpers: trace without its hints
        return (), ()


class _Tracer(torch.fx.Tracer):
    def __init__(self, leaf_ids: set[int], leaf_types: tuple[type, ...], autowrap: tuple) -> None:
        super().__init__(autowrap_functions=autowrap)
        self._leaf_ids = leaf_ids
        self._leaf_types = leaf_types

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if id(m) in self._leaf_ids or (self._leaf_types and isinstance(m, self._leaf_types)):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward, args, kwargs):
        # trace through the module's own forward, not Module.__call__: the user's hooks (and torch's global
        # ones) must neither run on Proxies nor end up in the graph; they still run around the real call
        return super().call_module(m, m.forward, args, kwargs)


def _concrete_defaults(module: nn.Module) -> dict[str, object] | None:
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return None
    out = {}
    for p in params.values():
        if p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            continue
        if p.default is not inspect.Parameter.empty:
            out[p.name] = p.default
    return out or None


def _try_trace(tracer_args: tuple, module: nn.Module) -> tuple[torch.fx.Graph | None, bool, str]:
    first_error = ""
    attempts: list[dict | None] = [None]
    concrete = _concrete_defaults(module)
    if concrete:
        attempts.append(concrete)
    for concrete_args in attempts:
        tracer = _Tracer(*tracer_args)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                graph = tracer.trace(module, concrete_args=concrete_args)
            return graph, concrete_args is not None, ""
        except Exception as exc:  # any failure inside user code means "does not trace"
            if not first_error:
                first_error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
    return None, False, first_error


def trace_regions(model: nn.Module, leaves: Iterable[nn.Module]) -> TraceResult:
    """Trace ``model``, or failing that the smallest enclosing modules that trace.

    Example:
        >>> m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
        >>> [r.path for r in trace_regions(m, [m[1]]).regions]
        ['']
    """
    leaves = list(leaves)
    try:
        traced_model, original = structure_copy(model)
    except Exception:  # noqa: BLE001 - a model that cannot be deep-copied is traced as it is
        traced_model, original = model, {}
    copy_of = {id(original[id(c)]): c for c in traced_model.modules() if id(c) in original}
    leaf_ids = {id(copy_of.get(id(m), m)) for m in leaves}
    notrace_types, notrace_fns = _timm_notrace()
    leaf_types = (nn.modules.conv._ConvNd,) + notrace_types
    tracer_args = (leaf_ids, leaf_types, notrace_fns)
    result = TraceResult(original=original)

    def visit(path: str, module: nn.Module) -> None:
        # a module timm marks as not traceable is a leaf inside its parent's graph, but is tried on its own
        if id(module) in leaf_ids or isinstance(module, nn.modules.conv._ConvNd):
            return
        children = list(module.named_children())
        if not children and not calls_norm_function(type(module)):
            return
        graph, specialized, error = _try_trace(tracer_args, module)
        if graph is not None:
            result.regions.append(Region(path, module, graph, specialized))
            return
        result.untraced.append((path, error))
        for name, child in children:
            visit(f"{path}.{name}" if path else name, child)

    visit("", traced_model)
    return result
