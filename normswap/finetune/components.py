"""Recipe components: named by a registered name (``cosine``, ``builtin``, ``timm``) or a dotted path
(``torch.optim.AdamW``), and checked against their signatures before anything runs.

A component node in a recipe is a mapping with ``_component_`` and the keyword arguments to call it with.
Arguments the runner supplies itself (the model's parameters for an optimizer, the optimizer for a
scheduler) are named per kind and never come from the recipe.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import pathlib
import site
import sys
import sysconfig
import typing
from collections.abc import Callable
from typing import Any

from ..errors import closest
from ..specs.options import matches, type_name

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


def is_registered(kind: str, name: Any) -> bool:
    """Whether ``name`` is a component registered for ``kind`` (normswap's own, or ``register_component``'s)."""
    return isinstance(name, str) and name in _REGISTRY.get(kind, {})


def _installed(module_name: str) -> str | None:
    """Why importing ``module_name`` would run code that is not an installed package's, or ``None``: a module
    already imported, the standard library and site-packages are installed; a file of the working directory
    (``python -m`` puts it on the path) or any other folder is not."""
    if module_name in sys.modules:
        return None
    top = module_name.split(".")[0]
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError) as exc:
        return f"cannot find {top!r} ({exc})"
    if spec is None:
        return f"no installed package {top!r}"
    origin = spec.origin or next(iter(spec.submodule_search_locations or []), None)
    if origin in (None, "built-in", "frozen"):
        return None
    where = pathlib.Path(origin).resolve()
    roots = {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")} | set(site.getsitepackages())
    if any(pathlib.Path(r).resolve() in where.parents for r in roots if r):
        return None
    return f"{top!r} comes from {where.parent}, not an installed package"


def resolve(kind: str, name: str, *, installed_only: bool = False) -> Callable[..., Any]:
    """The callable a component name stands for; raises ``LookupError`` with a readable message.

    ``installed_only`` (validation) imports nothing but installed packages: a recipe's dotted path to a file
    of the working directory is named as a problem, not imported."""
    if not isinstance(name, str) or not name:
        raise LookupError(f"_component_ must be a registered name or a dotted path, got {name!r}")
    if name in _REGISTRY.get(kind, {}):
        return _REGISTRY[kind][name]
    module_name, _, attr = name.rpartition(".")
    if not module_name:
        known = sorted(_REGISTRY.get(kind, {}))
        raise LookupError(f"unknown {kind} component {name!r}; registered: {', '.join(known) or 'none'}, or give a "
                          f"dotted path such as torch.optim.AdamW.{closest(name, known)}")
    why = _installed(module_name) if installed_only else None
    if why is not None:
        raise LookupError(f"{name!r}: validation imports only installed packages, and {why}; the recipe imports it "
                          "when it runs")
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
    hints = _type_hints(fn)
    for key, value in given.items():
        if key in supplied:
            problems.append(f"{key}: supplied by the runner; remove it from the recipe")
        elif key not in params and not takes_kwargs:
            problems.append(f"{key}: not an argument of {getattr(fn, '__qualname__', fn)} "
                            f"(it takes {', '.join(n for n in names if n not in supplied) or 'nothing'})."
                            f"{closest(key, names)}")
        elif key in hints and not _fits(value, hints[key]):
            problems.append(f"{key}: {getattr(fn, '__qualname__', fn)} takes {type_name(hints[key])}, got "
                            f"{type(value).__name__} {value!r}")
    for n, p in params.items():
        if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) \
                and n not in given and n not in supplied and n != "self":
            problems.append(f"{n}: required by {getattr(fn, '__qualname__', fn)} but not given")
    return problems


def _type_hints(fn: Callable[..., Any]) -> dict[str, Any]:
    """The resolvable annotations of ``fn``'s (or a class's ``__init__``'s) arguments; none where they do not
    resolve (forward references to names the module does not export)."""
    target = fn.__init__ if inspect.isclass(fn) else fn
    try:
        return typing.get_type_hints(target)
    except Exception:  # noqa: BLE001 - annotations are a help here, not a requirement
        return {}


def _fits(value: Any, annotation: Any) -> bool:
    try:
        return matches(value, annotation)
    except TypeError:  # an annotation isinstance cannot check (a generic alias, a protocol)
        return True


def split_node(node: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """``(component name, keyword arguments)`` of a recipe node."""
    args = {k: v for k, v in node.items() if k != "_component_"}
    return node.get("_component_"), args
