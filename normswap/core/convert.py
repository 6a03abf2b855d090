"""``normswap.convert`` and ``normswap.plan``: the one public function that does the work.

Data flows one way: adapters read every norm -> torch.fx relates convs to norms and finds functional
calls -> the spec builds each replacement -> the surgery swaps it in place -> the plan reports it.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..adapters import NormInfo, norm_family, read_norm
from ..errors import ConversionError, NormSwapError, OptionError
from ..graph import FUNCTIONAL_FAMILY, FunctionalCall, find_relations
from ..norms.std_conv import standardize_conv, ws_skip_reason
from ..specs import Spec, get_spec
from ..specs.weight_norm import share_weight_parametrization
from .exact import (CENTERED, apply_exact, apply_verified, centered_head, check_exact_options, plan_exact,
                    recorded_structure)
from .plan import Change, Plan
from .selection import globs, selected, unmatched, weight_layers
from .state import remember
from .surgery import finish_replacement, rewrite_functional, set_module


_AFTER_CONVERT: list[Callable[[nn.Module], None]] = []


def after_convert(hook: Callable[[nn.Module], None]) -> Callable[[nn.Module], None]:
    """Register ``hook(model)``, called on every model :func:`convert` changed (after its state is recorded):
    how the checkpoints package writes the conversions into a transformers model's config, without the
    pipeline knowing about checkpoints.

    Example:
        >>> seen = []
        >>> hook = after_convert(seen.append)
        >>> _ = convert(torch.nn.Sequential(torch.nn.BatchNorm2d(4)), "gn", groups=2)
        >>> len(seen)
        1
        >>> _AFTER_CONVERT.remove(hook)
    """
    _AFTER_CONVERT.append(hook)
    return hook


class NothingToConvertWarning(UserWarning):
    """Warned when a model has no module the spec converts; the model is returned unchanged."""


@dataclass
class _Norm:
    paths: list[str]
    module: nn.Module
    info: NormInfo | None
    reason: str | None

    @property
    def family(self) -> str | None:
        """The norm family (``batch``, ``layer``, ...); ``None`` for an unreadable norm nothing names."""
        return self.info.kind if self.info is not None else norm_family(self.module)


@dataclass
class _Pipeline:
    """The options that belong to the pipeline rather than to the spec."""

    include: tuple[str, ...]
    exclude: tuple[str, ...]
    exact: bool | dict = False  # True, or the structure a checkpoint recorded (replayed without a forward)
    inputs: Any = None


def _split_options(options: dict[str, Any]) -> tuple[_Pipeline, dict[str, Any]]:
    rest = dict(options)
    exact = rest.pop("exact", False)
    if not isinstance(exact, bool):
        exact = recorded_structure(exact)
    inputs = rest.pop("example_inputs", None)
    if inputs is not None and not exact:
        raise OptionError("example_inputs= is read only with exact=True")
    pipe = _Pipeline(globs("include", rest.pop("include", None)), globs("exclude", rest.pop("exclude", None)),
                     exact, inputs)
    return pipe, rest


def _collect_norms(model: nn.Module) -> list[_Norm]:
    by_id: dict[int, _Norm] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        if not path:
            continue
        item = by_id.get(id(module))
        if item is not None:
            item.paths.append(path)
            continue
        info, reason = read_norm(module)
        if info is not None or reason is not None:
            by_id[id(module)] = _Norm([path], module, info, reason)
    return list(by_id.values())


def _type_name(module: nn.Module) -> str:
    return type(module).__name__


def _describe(spec: Spec, item: _Norm, options: dict[str, Any]) -> tuple[str, list[str]]:
    """Build the replacement on the meta device only to name it and collect the builder's notes."""
    info = copy.copy(item.info)
    info.notes = []
    with torch.device("meta"):
        new = spec.builder(info, **options)
    name = _type_name(new) + ("Act" if info.act is not None or info.drop is not None else "")
    return name, info.notes


def _analyze(model: nn.Module, spec: Spec, options: dict[str, Any], pipe: _Pipeline) -> Plan:
    plan = _analyze_norms(model, spec, options, pipe.include, pipe.exclude)
    if pipe.exact:
        plan_exact(model, plan, pipe.inputs, pipe.exact)
    return plan


def _analyze_norms(model: nn.Module, spec: Spec, options: dict[str, Any], include: tuple[str, ...],
                   exclude: tuple[str, ...]) -> Plan:
    norms = _collect_norms(model)
    convs = {p: m for p, m in model.named_modules(remove_duplicate=False) if isinstance(m, nn.modules.conv._ConvNd)}
    rel = find_relations(model, {p: n.module for n in norms for p in n.paths}, convs)
    ws = spec.ws_config(options)
    plan = Plan(spec=spec.name, options={**options, "include": list(include), "exclude": list(exclude)})
    if spec.weights is not None:
        _plan_weight_layers(model, spec, include, exclude, plan)
        return plan
    standardized: set[int] = set()
    matched_include = False
    for item in norms:
        old = _type_name(item.module)
        if item.family is not None and item.family not in spec.sources:
            continue  # a norm of another family: not this spec's business, so not a row (nor a skip) of its plan
        if not selected(item.paths, include, exclude):
            plan.changes.append(Change(item.paths[0], "skip", old, reason="not selected by include/exclude",
                                       also_at=tuple(item.paths[1:])))
            continue
        matched_include = True
        if item.info is None:
            plan.changes.append(Change(item.paths[0], "skip", old, reason=item.reason or "not readable",
                                       also_at=tuple(item.paths[1:])))
            continue
        item.info.pooled = any(p in rel.pooled for p in item.paths)
        reason = spec.skip_reason(item.info, options)
        if reason:
            plan.changes.append(Change(item.paths[0], "skip", old, reason=reason, also_at=tuple(item.paths[1:])))
            continue
        new_type, notes = _describe(spec, item, options)
        if item.info.identified:
            notes.insert(0, f"identified by probing: {item.info.identified}")
        conv_paths: list[str] = []
        if ws is not None:
            for path in item.paths:
                for conv_path in rel.feeds.get(path, []):
                    conv = convs[conv_path]
                    why = ws_skip_reason(conv)
                    if why is not None:
                        notes.append(f"conv {conv_path} not standardized: {why}")
                    elif id(conv) not in standardized:
                        standardized.add(id(conv))
                        conv_paths.append(conv_path)
                if path in rel.by_module_order:
                    notes.append("conv feeding it found by module order (its enclosing module does not trace)")
                elif path in rel.unresolved:
                    notes.append("no traced graph shows what feeds it (its enclosing module does not trace) and no "
                                 "conv precedes it in its parent: a conv feeding it, if any, is not standardized")
        plan.changes.append(Change(item.paths[0], "replace", old, new_type, carried=_carried_names(item.info),
                                   convs_standardized=tuple(conv_paths), warnings=tuple(notes),
                                   also_at=tuple(item.paths[1:])))
    if ws is not None and ws.convs == "all":
        for path, conv in convs.items():
            if id(conv) in standardized or not selected([path], include, exclude) or ws_skip_reason(conv):
                continue
            standardized.add(id(conv))
            plan.changes.append(Change(path, "standardize", _type_name(conv), "Std" + _type_name(conv)))
    for call in rel.functional:
        if FUNCTIONAL_FAMILY[call.norm] not in spec.sources or not selected([call.module_path], include, exclude):
            continue  # a functional norm of another family is not this spec's business
        where = call.module_path or "<root>"
        why = _functional_skip_reason(spec, call, options)
        if call.norm not in spec.functional:
            plan.changes.append(Change(where, "skip", f"{call.norm}()", reason=f"functional {call.norm} call "
                                       f"{call.node}: spec {spec.name!r} has no functional form for it"))
        elif call.specialized:
            plan.changes.append(Change(where, "skip", f"{call.norm}()", reason=f"functional call {call.node} "
                                       "found only with arguments fixed; its module cannot be rewritten"))
        elif why:
            plan.changes.append(Change(where, "skip", f"{call.norm}()", reason=f"functional call {call.node}: {why}"))
        else:
            plan.changes.append(Change(where, "rewrite", f"{call.norm}()", f"{spec.name} functional",
                                       warnings=(f"call {call.node}",)))
    if include and not matched_include:
        message = f"include={list(include)} matched no norm module"
        plan.warnings.append(message)
        warnings.warn(f"normswap: {message}", UserWarning, stacklevel=4)
    # modules under which nothing traced at all, outermost only
    covered = [r.path for r in rel.trace.regions]
    opaque = [(p, e) for p, e in rel.trace.untraced if not any(_within(c, p) for c in covered)]
    opaque = [(p, e) for p, e in opaque if not any(q != p and _within(p, q) for q, _ in opaque)]
    if opaque:
        first = ", ".join(f"{p or '<root>'} ({e})" for p, e in opaque[:3])
        plan.warnings.append(f"{len(opaque)} module(s) do not trace with torch.fx, so functional norm calls "
                             f"inside them are not seen: {first}")
    return plan


def _functional_skip_reason(spec: Spec, call: FunctionalCall, options: dict[str, Any]) -> str | None:
    """Why ``spec`` leaves a functional call alone, judged like a module of the same shape (``bert_ln`` leaves
    a norm over one value); ``None`` when the call's shape is computed at run time or the spec takes it."""
    if call.shape is None:
        return None
    info = NormInfo(kind=FUNCTIONAL_FAMILY[call.norm], num_features=math.prod(call.shape), eps=0.0,
                    channels_first=False, normalized_shape=call.shape)
    return spec.skip_reason(info, options)


def _plan_weight_layers(model: nn.Module, spec: Spec, include: tuple[str, ...], exclude: tuple[str, ...],
                        plan: Plan) -> None:
    """The rows of a weight spec: one per conv / linear (``reparametrize`` or ``skip``)."""
    layers = weight_layers(model, parametrized=True)
    eligible = {p for p, layer in layers.items() if selected([p], include, exclude) and not spec.weights.skip_reason(layer)}
    ties = _weight_ties(model)
    leaders: dict[int, str] = {}
    for path, layer in layers.items():
        where, old = path or "<root>", _type_name(layer)
        if not selected([path], include, exclude):
            plan.changes.append(Change(where, "skip", old, reason="not selected by include/exclude"))
            continue
        reason = spec.weights.skip_reason(layer)
        weight = layer._parameters.get("weight")
        partners = [o for o in ties.get(id(weight), []) if o != path] if weight is not None else []
        left = [o for o in partners if o not in eligible]
        if not reason and left:
            owner = left[0] or "<root>"
            reason = (f"its weight is tied to {owner}.weight ({_type_name(model.get_submodule(left[0]))}), which "
                      f"spec {spec.name!r} leaves as it is: transforming one would untie them")
        if reason:
            plan.changes.append(Change(where, "skip", old, reason=reason))
            continue
        leader = leaders.setdefault(id(weight), path) if partners else path
        shares = leader if leader != path else ""
        notes = (f"weight tied to {shares or '<root>'}: one parametrization, shared",) if shares else ()
        plan.changes.append(Change(where, "reparametrize", old, f"{spec.weights.label}({old})", carried=("weight",),
                                   warnings=notes, shares=shares))
    for kind, patterns in (("include", include), ("exclude", exclude)):
        for g in unmatched(patterns, layers):
            message = f"{kind} glob {g!r} matched no conv or linear layer"
            plan.warnings.append(message)
            warnings.warn(f"normswap: {message}", UserWarning, stacklevel=4)


def _weight_ties(model: nn.Module) -> dict[int, list[str]]:
    """``{id(parameter): [paths of every module holding it as its 'weight']}`` for weights held by several."""
    owners: dict[int, list[str]] = {}
    for path, module in model.named_modules(remove_duplicate=True):
        weight = module._parameters.get("weight")
        if weight is not None:
            owners.setdefault(id(weight), []).append(path)
    return {k: v for k, v in owners.items() if len(v) > 1}


def _within(path: str, ancestor: str) -> bool:
    """Whether module ``path`` is ``ancestor`` or below it (the root, ``""``, holds everything)."""
    return not ancestor or path == ancestor or path.startswith(ancestor + ".")


def _carried_names(info: NormInfo) -> tuple[str, ...]:
    return tuple(n for n in ("weight", "bias") if getattr(info, n) is not None)


def check_options(spec: str | Spec, options: dict[str, Any]) -> None:
    """Check ``options`` for :func:`convert` with ``spec`` without a model (a recipe's ``convert:`` section):
    the spec's own, ``include``/``exclude``, ``exact``.

    Example:
        >>> check_options("rms", {"exact": True, "exclude": ["head*"]})
        >>> check_options("gn", {"exact": True})
        Traceback (most recent call last):
        ...
        normswap.errors.OptionError: exact=True is for LayerNorm -> RMSNorm (spec 'rms'); spec 'gn' does not support it
    """
    _resolve(spec, options)


def _resolve(spec: str | Spec, options: dict[str, Any]) -> tuple[Spec, _Pipeline, dict[str, Any]]:
    spec_obj = get_spec(spec)
    pipe, rest = _split_options(options)
    resolved = spec_obj.resolve(rest)
    if pipe.exact:
        check_exact_options(spec_obj.name, spec_obj.exact, resolved, rest)
    return spec_obj, pipe, resolved


def _prepare(model: nn.Module, spec: str | Spec, options: dict[str, Any]) -> tuple[Spec, _Pipeline, dict[str, Any]]:
    if not isinstance(model, nn.Module):
        raise NormSwapError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return _resolve(spec, options)


def plan(model: nn.Module, spec: str | Spec, **options: Any) -> Plan:
    """What :func:`convert` would do to ``model``, changing nothing.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 3), torch.nn.BatchNorm2d(64))
        >>> p = plan(model, "gn_ws")
        >>> [(c.path, c.new_type, c.convs_standardized) for c in p.changes]
        [('1', 'GroupNorm', ('0',))]
    """
    spec_obj, pipe, opts = _prepare(model, spec, options)
    return _analyze(model, spec_obj, opts, pipe)


def convert(model: nn.Module, spec: str | Spec, *, inplace: bool = False, **options: Any) -> nn.Module:
    """Swap ``model``'s norms as ``spec`` says and return the model (same class, same methods).

    ``inplace=False`` (default) converts a deep copy and leaves ``model`` untouched. Options are the
    spec's own (see ``normswap list --verbose``) plus ``include=``/``exclude=`` module-path globs.
    The plan of what was done is at ``normswap.last_plan(converted)``.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 3), torch.nn.BatchNorm2d(64))
        >>> converted = convert(model, "gn_ws", groups=16)
        >>> type(converted[0]).__name__, converted[1].num_groups
        ('StdConv2d', 16)
    """
    spec_obj, pipe, opts = _prepare(model, spec, options)
    plan_ = _analyze(model, spec_obj, opts, pipe)
    target = model if inplace else copy.deepcopy(model)
    if len(plan_) == 0:
        warnings.warn(f"normswap: nothing to convert with spec {spec_obj.name!r} in {type(model).__name__}: "
                      f"{_nothing_reason(spec_obj, plan_)}; the model is unchanged",
                      NothingToConvertWarning, stacklevel=2)
        remember(target, plan_, applied=False)
        return target
    if pipe.exact is True:
        apply_verified(plan_, target, pipe.inputs, lambda: _apply(plan_, target, spec_obj, opts), keep_original=inplace)
    else:
        _apply(plan_, target, spec_obj, opts)
    remember(target, plan_, applied=True)
    for hook in _AFTER_CONVERT:
        hook(target)
    return target


def _nothing_reason(spec: Spec, plan_: Plan) -> str:
    family = "/".join(spec.sources) or "conv or linear"
    what = f"{family} norm" if spec.sources else "conv or linear layer"
    if not plan_.changes:
        return f"it holds no {what} the spec takes"
    return f"all {len(plan_.skipped)} {what}s skipped (see normswap.last_plan(model) for why)"


def _apply(plan_: Plan, target: nn.Module, spec: Spec, options: dict[str, Any]) -> None:
    ws = spec.ws_config(options)
    apply_exact(plan_, target)
    for change in plan_.changes:
        if change.action == "replace":
            source = target.get_submodule(change.path)
            info, reason = read_norm(source)
            if info is None:
                raise ConversionError(f"{change.path}: {reason}")
            new = spec.builder(info, **options)
            if change.new_type == CENTERED:
                new = centered_head(new)
            carried, notes = finish_replacement(new, info, source)
            # the plan returned by last_plan() says what was actually carried, not what was expected
            change.carried = tuple(carried)
            change.folded = ("weight",) if info.weight_offset and "weight" in carried else ()
            change.warnings = tuple(dict.fromkeys((*change.warnings, *notes)))
            for path in (change.path, *change.also_at):
                set_module(target, path, new)
            for conv_path in change.convs_standardized:
                _standardize(target, conv_path, ws)
        elif change.action == "standardize":
            _standardize(target, change.path, ws)
        elif change.action == "reparametrize":
            layer = target if change.path == "<root>" else target.get_submodule(change.path)
            if change.shares:
                share_weight_parametrization(layer, target.get_submodule(change.shares))
            else:
                spec.builder(layer, **options)
    rewritten: set[str] = set()
    for change in plan_.changes:
        if change.action == "rewrite" and change.path not in rewritten:
            rewritten.add(change.path)
            module = target if change.path == "<root>" else target.get_submodule(change.path)
            try:
                rewrite_functional(module, spec.functional, options)
            except Exception as exc:  # tracing user code: report, do not half-convert
                raise ConversionError(f"{change.path}: could not rewrite its functional norm calls "
                                      f"({type(exc).__name__}: {exc}); exclude it with exclude=[{change.path!r}]") from exc


def _standardize(target: nn.Module, path: str, ws) -> None:
    # the plan lists each conv once and only when ws_skip_reason allowed it; standardize_conv checks again
    standardize_conv(target.get_submodule(path), ws.eps, ws.mode)
