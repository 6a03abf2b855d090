"""Recipe components: named by a registered name (``cosine``, ``builtin``, ``timm``) or a dotted path
(``torch.optim.AdamW``), and checked against their signatures before anything runs.

A component node in a recipe is a mapping with ``_component_`` and the keyword arguments to call it with.
Arguments the runner supplies itself (the model's parameters for an optimizer, the optimizer for a
scheduler) are named per kind and never come from the recipe.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

from ..errors import closest

_REGISTRY: dict[str, dict[str, Callable[..., Any]]] = {}

# what the runner passes to each kind of component itself
SUPPLIED = {
    "model": (),
    "data": ("task", "seed", "model_config"),
    "optimizer": ("params",),
    "scheduler": ("optimizer", "max_steps"),
    "orthogonal": ("model",),
    "clip": ("model_or_params",),
}


def register_component(kind: str, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a function or class as component ``name`` of ``kind`` (``model``, ``data``, ``scheduler``...).

    Example:
        >>> @register_component("scheduler", "constant_lr")
        ... def constant_lr(optimizer, max_steps):
        ...     import torch
        ...     return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    """
    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        _REGISTRY.setdefault(kind, {})[name] = fn
        return fn
    return deco


def registered(kind: str) -> dict[str, Callable[..., Any]]:
    """The components registered for ``kind``, by name."""
    return dict(_REGISTRY.get(kind, {}))


def resolve(kind: str, name: str) -> Callable[..., Any]:
    """The callable a component name stands for; raises ``LookupError`` with a readable message."""
    if not isinstance(name, str) or not name:
        raise LookupError(f"_component_ must be a registered name or a dotted path, got {name!r}")
    if name in _REGISTRY.get(kind, {}):
        return _REGISTRY[kind][name]
    module_name, _, attr = name.rpartition(".")
    if not module_name:
        known = sorted(_REGISTRY.get(kind, {}))
        raise LookupError(f"unknown {kind} component {name!r}; registered: {', '.join(known) or 'none'}, or give a "
                          f"dotted path such as torch.optim.AdamW.{closest(name, known)}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise LookupError(f"{name!r}: cannot import {module_name!r} ({exc})") from None
    if not hasattr(module, attr):
        names = [n for n in dir(module) if not n.startswith("_")]
        raise LookupError(f"{name!r}: {module_name} has no {attr!r}.{closest(attr, names)}")
    return getattr(module, attr)


def check_arguments(kind: str, fn: Callable[..., Any], given: dict[str, Any]) -> list[str]:
    """Problems with calling ``fn`` with ``given`` (plus what the runner supplies): unknown or missing
    arguments, each as ``(argument, message)`` text."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return []
    params = sig.parameters
    supplied = set(SUPPLIED.get(kind, ()))
    takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
    problems = []
    names = [n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    for key in given:
        if key in supplied:
            problems.append(f"{key}: supplied by the runner; remove it from the recipe")
        elif key not in params and not takes_kwargs:
            problems.append(f"{key}: not an argument of {getattr(fn, '__qualname__', fn)} "
                            f"(it takes {', '.join(n for n in names if n not in supplied) or 'nothing'})."
                            f"{closest(key, names)}")
    for n, p in params.items():
        if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) \
                and n not in given and n not in supplied and n != "self":
            problems.append(f"{n}: required by {getattr(fn, '__qualname__', fn)} but not given")
    return problems


def split_node(node: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """``(component name, keyword arguments)`` of a recipe node."""
    args = {k: v for k, v in node.items() if k != "_component_"}
    return node.get("_component_"), args
