"""Recipes: YAML files read, overridden from the command line, and checked as a whole before anything runs.

A recipe is a mapping of the keys in :data:`SCHEMA`. Component sections (``model``, ``data``,
``optimizer``, ``scheduler``) name a ``_component_`` (a registered name or a dotted path) and its keyword
arguments; ``orthogonal`` and ``clip`` hold the arguments of :class:`~normswap.regularizers.OrthogonalRegularizer`
and :func:`~normswap.regularizers.clip_gradients`. :func:`validate` reports every problem at once, each
with its key path (:class:`RecipeError`).

Overrides are ``key=value`` with dotted keys (``optimizer.lr=0.1``); the value is read by the same rule as
``normswap convert --set`` (:func:`~normswap.specs.options.parse_option_value`: ``1e-6`` is a float). Giving a
name to a component section (``data=builtin``) switches its component and drops the old arguments.
"""

from __future__ import annotations

import copy
import pathlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from ..errors import NormSwapError, closest
from . import builders  # noqa: F401  (registers the model and scheduler components)
from . import data as _data  # noqa: F401  (registers the data components)
from ..named_models import file_reading_arguments
from ..specs.options import parse_option_value
from .components import check_arguments, is_registered, resolve, split_node

COMPONENTS = ("model", "data", "optimizer", "scheduler")


@dataclass(frozen=True)
class Key:
    """One top-level recipe key: the types it takes, its default, and a check of its value."""

    types: tuple[type, ...]
    default: Any
    choices: tuple[Any, ...] = ()
    minimum: int | None = None
    required: bool = False


SCHEMA: dict[str, Key] = {
    "seed": Key((int,), 0, minimum=0),
    "output_dir": Key((str,), None, required=True),
    "max_steps": Key((int,), 100, minimum=1),
    "batch_size": Key((int,), 8, minimum=1),
    "grad_accum": Key((int,), 1, minimum=1),
    "eval_every": Key((int,), 0, minimum=0),
    "eval_batches": Key((int, type(None)), None, minimum=1),
    "log_every": Key((int,), 10, minimum=1),
    "checkpoint_every": Key((int,), 0, minimum=0),
    "keep_checkpoints": Key((int,), 2, minimum=1),
    "precision": Key((str,), "fp32", choices=("fp32", "bf16", "fp16")),
    "compile": Key((bool,), False),
    "channels_last": Key((bool,), False),
    "distributed": Key((str,), "ddp", choices=("ddp", "fsdp")),
    "device": Key((str,), "auto", choices=("auto", "cpu", "cuda")),
    "resume": Key((str, type(None)), None),
    "init_from": Key((str, type(None)), None),
    "model": Key((dict,), None, required=True),
    "convert": Key((dict, type(None)), None),
    "calibrate": Key((dict, type(None)), None),
    "data": Key((dict,), None, required=True),
    "optimizer": Key((dict,), {"_component_": "torch.optim.AdamW", "lr": 1e-3}),
    "scheduler": Key((dict, type(None)), None),
    "orthogonal": Key((dict, type(None)), None),
    "clip": Key((dict, type(None)), None),
    "plot": Key((bool,), True),
}


class RecipeError(NormSwapError):
    """Raised when a recipe has problems; the message lists every one with its key path."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"recipe {source}: {len(problems)} problem(s):\n{lines}")


def read_recipe(path: str | pathlib.Path) -> dict[str, Any]:
    """The mapping in a recipe YAML file (raises :class:`RecipeError` for a missing or malformed file)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise RecipeError(str(path), [f"{path}: no such file"])
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise RecipeError(str(path), [f"not valid YAML: {exc}"]) from None
    if not isinstance(loaded, dict):
        raise RecipeError(str(path), ["the file does not hold a mapping of recipe keys"])
    return loaded


def apply_overrides(recipe: dict[str, Any], overrides: Sequence[str], source: str = "recipe") -> dict[str, Any]:
    """A copy of ``recipe`` with ``key=value`` overrides applied (dotted keys, YAML values).

    Example:
        >>> r = apply_overrides({"data": {"_component_": "image_folder", "path": "x"}, "max_steps": 9},
        ...                     ["data=builtin", "max_steps=3", "optimizer.lr=0.1"])
        >>> r["data"], r["max_steps"], r["optimizer"]["lr"]
        ({'_component_': 'builtin'}, 3, 0.1)
    """
    out = copy.deepcopy(recipe)
    problems = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            problems.append(f"override {item!r}: expected key=value")
            continue
        value = parse_option_value(raw)
        parts = key.strip().split(".")
        node = out
        for p in parts[:-1]:
            if node.get(p) is None:
                node[p] = {}
            if not isinstance(node[p], dict):
                problems.append(f"override {item!r}: {p} is not a section")
                break
            node = node[p]
        else:
            last = parts[-1]
            if len(parts) == 1 and last in COMPONENTS and isinstance(value, str):
                if (node.get(last) or {}).get("_component_") != value:
                    node[last] = {"_component_": value}
            else:
                node[last] = value
    if problems:
        raise RecipeError(source, problems)
    return out


def with_defaults(recipe: dict[str, Any]) -> dict[str, Any]:
    """``recipe`` with every missing top-level key at its default."""
    out = {k: copy.deepcopy(key.default) for k, key in SCHEMA.items()}
    out.update(copy.deepcopy(recipe))
    return out


def _check_key(name: str, key: Key, value: Any) -> str | None:
    if value is None and key.required:
        return f"{name}: required"
    if not isinstance(value, key.types) or (isinstance(value, bool) and bool not in key.types):
        want = " or ".join("null" if t is type(None) else t.__name__ for t in key.types)
        return f"{name}: expected {want}, got {type(value).__name__} {value!r}"
    if key.choices and value not in key.choices:
        return f"{name}: expected one of {list(key.choices)}, got {value!r}.{closest(str(value), map(str, key.choices))}"
    if key.minimum is not None and isinstance(value, int) and value < key.minimum:
        return f"{name}: must be >= {key.minimum}, got {value}"
    return None


def validate(recipe: dict[str, Any], source: str = "recipe", *, check_data: bool = True) -> dict[str, Any]:
    """Check a recipe (after overrides) completely; return it with defaults filled in.

    Every problem is collected: unknown keys, wrong types, components that do not resolve, arguments a
    component does not take (or lacks), an unknown model or spec, bad spec options, missing data, files
    that do not exist. Then one :class:`RecipeError` lists them all.

    Example:
        >>> validate({"output_dir": "runs/x", "model": {"_component_": "timm", "name": "resnet18"},
        ...           "data": {"_component_": "builtin"}, "optimizer": {"_component_": "torch.optim.SGD",
        ...           "lr": 0.1, "momentun": 0.9}})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        normswap.finetune.recipe.RecipeError: recipe recipe: 1 problem(s):
          - optimizer.momentun: not an argument of SGD ... Did you mean 'momentum'?
    """
    problems: list[str] = []
    for name in recipe:
        if name not in SCHEMA:
            problems.append(f"{name}: not a recipe key.{closest(name, SCHEMA)}")
    full = with_defaults({k: v for k, v in recipe.items() if k in SCHEMA})
    for name, key in SCHEMA.items():
        problem = _check_key(name, key, full[name])
        if problem:
            problems.append(problem)
    for name in COMPONENTS:
        node = full.get(name)
        if isinstance(node, dict):
            problems += _check_component(name, node)
    problems += _check_regularizers(full)
    if full["distributed"] == "fsdp":
        problems += [f"{k}: not supported with distributed=fsdp (the regularizers work on whole weights, FSDP "
                     f"shards them); use distributed=ddp, or {k}=null" for k in ("orthogonal", "clip") if full[k]]
    problems += _check_convert(full)
    problems += _check_calibrate(full)
    for name in ("resume", "init_from"):
        if isinstance(full[name], str) and not pathlib.Path(full[name]).exists():
            problems.append(f"{name}: {full[name]} does not exist")
    # build what has no problem of its own yet, so those problems are listed in the same report; only
    # normswap's registered components are built: a dotted path is checked by its signature, never called
    if isinstance(full["model"], dict) and not any(p.startswith("model") for p in problems) \
            and is_registered("model", full["model"].get("_component_")):
        data_ok = isinstance(full["data"], dict) and not any(p.startswith("data") for p in problems) \
            and is_registered("data", full["data"].get("_component_"))
        problems += _check_built(full, check_data and data_ok)
    if problems:
        raise RecipeError(source, problems)
    return full


def _check_component(name: str, node: dict[str, Any]) -> list[str]:
    component, args = split_node(node)
    if component is None:
        return [f"{name}._component_: missing (a registered name or a dotted path)"]
    try:
        fn = resolve(name, component, installed_only=True)
    except LookupError as exc:
        return [f"{name}._component_: {exc}"]
    problems = [f"{name}.{p}" for p in check_arguments(name, fn, args)]
    if name == "model" and component == "timm":
        problems += [f"model.{k}: makes timm read a file or the network; load weights with init_from= (read with "
                     "weights_only=True)" for k in file_reading_arguments(args)]
    return problems


def _check_regularizers(full: dict[str, Any]) -> list[str]:
    from ..regularizers import OrthogonalRegularizer, clip_gradients

    problems = []
    if isinstance(full["orthogonal"], dict):
        problems += [f"orthogonal.{p}" for p in check_arguments("orthogonal", OrthogonalRegularizer, full["orthogonal"])]
    if isinstance(full["clip"], dict):
        found = [f"clip.{p}" for p in check_arguments("clip", clip_gradients, full["clip"])]
        if not found:
            try:
                clip_gradients([], **full["clip"])
            except NormSwapError as exc:
                found.append(f"clip: {exc}")
        problems += found
    return problems


def _check_convert(full: dict[str, Any]) -> list[str]:
    from ..core.convert import check_options

    conv = full["convert"]
    if conv is None:
        return []
    problems = [f"convert.{k}: not a convert key (it takes spec, options)" for k in conv if k not in ("spec", "options")]
    spec, options = conv.get("spec"), conv.get("options") or {}
    if spec is None:
        return problems
    if not isinstance(options, dict):
        return problems + [f"convert.options: expected a mapping, got {type(options).__name__}"]
    try:
        check_options(spec, options)
    except NormSwapError as exc:
        problems.append(f"convert: {exc}")
    return problems


CALIBRATE_KEYS = ("seconds", "steps", "params", "lr", "eval_batches")


def _check_calibrate(full: dict[str, Any]) -> list[str]:
    """``calibrate:`` takes :func:`normswap.calibrate`'s budget and training keys, and needs a conversion."""
    section = full["calibrate"]
    if section is None:
        return []
    problems = [f"calibrate.{k}: not a calibrate key (it takes {', '.join(CALIBRATE_KEYS)})"
                for k in section if k not in CALIBRATE_KEYS]
    if not (full["convert"] or {}).get("spec"):
        problems.append("calibrate: needs a convert: section with a spec (it calibrates the converted model "
                        "against the one the recipe builds)")
    checks = {"seconds": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0,
              "steps": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
              "params": lambda v: v in ("norms", "all"),
              "lr": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0,
              "eval_batches": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1}
    for key, ok in checks.items():
        if key in section and section[key] is not None and not ok(section[key]):
            want = {"params": "'norms' or 'all'", "steps": "an integer >= 1", "eval_batches": "an integer >= 1"}
            problems.append(f"calibrate.{key}: expected {want.get(key, 'a positive number')}, got {section[key]!r}")
    return problems


def _check_built(full: dict[str, Any], check_data: bool) -> list[str]:
    """Build the model on the meta device and the data (both cheap) to catch what signatures cannot."""
    from .builders import build_recipe_model, task_of

    problems = []
    try:
        model = build_recipe_model(full["model"], device="meta")
    except (NormSwapError, TypeError, ValueError, OSError) as exc:
        return [f"model: {exc}"]
    if check_data:
        from .builders import build_data

        try:
            build_data(full["data"], task_of(model), full["seed"], getattr(model, "config", None))
        except (NormSwapError, TypeError, ValueError, OSError) as exc:
            problems.append(f"data: {exc}")
    return problems
