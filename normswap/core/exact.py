"""``convert(model, "rms", exact=True)``: LayerNorm -> RMSNorm with identical outputs in a pre-LN model.

Planning records one forward pass on example inputs and finds the residual stream's writers
(:func:`normswap.graph.residual.find_stream`); the plan gets a ``center`` row per writer parameter, an
``untie`` row per output projection tied to a centered embedding, and the LayerNorms that head the stream
become :class:`~normswap.norms.rms_norm.CenteredRMSNorm`. Applying it subtracts each writer's mean over
the stream's features in place (the ``Parameter`` objects stay the same), so every LayerNorm reads a
zero-mean input and the RMSNorm that replaces it computes the same thing.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..errors import ConversionError, OptionError
from ..graph.residual import Stream, find_stream
from ..inputs import Inputs, eval_mode, example_inputs, map_inputs, noise_floor, rel_diff, run, split_inputs, tolerance
from .plan import Change, Plan

CENTERED = "CenteredRMSNorm"


def check_exact_options(spec_name: str, centers: bool, options: dict[str, Any], given: dict[str, Any]) -> None:
    """``exact=True`` needs a spec that centers the stream (``rms``) and options that keep the LayerNorm's
    formula (its own eps and bias)."""
    if not centers:
        raise OptionError(f"exact=True is for LayerNorm -> RMSNorm (spec 'rms'); spec {spec_name!r} does not "
                          "support it")
    if given.get("eps") is not None:
        raise OptionError("exact=True keeps each LayerNorm's own eps; drop eps=")
    if options.get("bias") is False:
        raise OptionError("exact=True keeps each LayerNorm's bias; drop bias=False")


def _run_inputs(model: nn.Module, inputs: Any | None) -> Inputs:
    """The given example inputs (random ones of the right kind when None) on the model's device."""
    param = next(iter(model.parameters()), None)
    split = split_inputs(example_inputs(model) if inputs is None else inputs)
    return split if param is None else map_inputs(split, lambda t: t.to(param.device))


def recorded_structure(value: Any) -> dict[str, list[str]]:
    """The form of ``exact=`` a checkpoint records: ``{"heads": [paths], "untie": [paths]}``, the modules
    an exact conversion changed in structure (its centered weights are in the checkpoint). Checked like any
    input from a file."""
    if not isinstance(value, dict) or set(value) - {"heads", "untie"} or not all(
            isinstance(v, list) and all(isinstance(p, str) for p in v) for v in value.values()):
        raise OptionError(f"option 'exact' must be True, False, or a recorded {{'heads': [...], 'untie': [...]}} "
                          f"of module paths; got {value!r}")
    return {"heads": list(value.get("heads", [])), "untie": list(value.get("untie", []))}


def plan_exact(model: nn.Module, plan: Plan, inputs: Any | None, exact: bool | dict) -> None:
    """Add the centering rows to ``plan`` (whose ``replace`` rows are the LayerNorms to convert) and record the
    structure in its options. ``exact`` is True (find the stream by running ``model``) or a recorded
    structure (a checkpoint's: rows for its heads and ties, no centering, no forward pass)."""
    readers: dict[str, nn.Module] = {}
    for change in plan.changes:
        if change.action == "rewrite":
            raise ConversionError(f"{change.path}: exact=True does not cover functional layer_norm calls; "
                                  f"exclude the module with exclude=[{change.path!r}]")
        if change.action != "replace":
            continue
        module = model.get_submodule(change.path)
        shape = tuple(getattr(module, "normalized_shape", ()) or ())
        if len(shape) != 1 or getattr(module, "channels_first", False) or change.new_type != "RMSNorm":
            raise ConversionError(f"{change.path}: exact=True converts LayerNorms over the last dim only; this one "
                                  f"becomes {change.new_type} over {shape or 'its input'}: exclude it")
        readers[change.path] = module
    if isinstance(exact, dict):
        stream = Stream(heads=exact["heads"], untie=[(p, "") for p in exact["untie"]])
        unknown = [p for p in stream.heads if p not in readers]
        if unknown:
            raise ConversionError(f"{unknown[0]}: the recorded exact conversion makes this LayerNorm a stream head, "
                                  "but it is not one this conversion replaces (a record of another model?)")
    elif readers:
        args, kwargs = _run_inputs(model, inputs)

        def forward() -> None:
            try:
                model(*args, **kwargs)
            except Exception as exc:  # the user's model on inputs we made or were given
                raise ConversionError(f"{type(model).__name__}: exact=True runs the model once to find its residual "
                                      f"stream, and the forward pass failed ({type(exc).__name__}: {exc}); pass "
                                      "example_inputs= that the model takes") from exc

        with eval_mode(model):
            stream = find_stream(model, forward, readers)
    else:
        stream = Stream()
    plan.options["exact"] = {"heads": list(stream.heads), "untie": [p for p, _ in stream.untie]}
    heads = set(stream.heads)
    for change in plan.changes:
        if change.path in heads:
            change.new_type = CENTERED
            change.warnings += ("heads the residual stream: its output is centered at run time",)
    owners = dict(model.named_parameters(remove_duplicate=False))
    for module_path, param in stream.untie:
        module = _weight_holder(model, module_path)
        tied = f"to {param}, which is centered" if param else "to a centered parameter"
        plan.changes.append(Change(module_path, "untie", type(module).__name__, type(module).__name__,
                                   warnings=(f"its weight was tied {tied}: it keeps its own copy of the original "
                                             "weight",)))
    for w in stream.writers:
        module_path = w.param.rpartition(".")[0]
        kind = type(model.get_submodule(module_path)).__name__ if module_path else type(model).__name__
        shape = tuple(owners[w.param].shape)
        note = f"mean over dim {w.dim} of {shape} subtracted ({w.how})"
        if w.scale:
            gamma = owners[w.scale]
            if bool((gamma == 0).any()):
                raise ConversionError(f"{w.scale}: exact=True centers {w.param} weighted by this per-feature scale, "
                                      "which has zeros")
            note = f"mean over dim {w.dim} of {shape}, weighted by {w.scale}, subtracted ({w.how}, then scaled)"
        plan.changes.append(Change(w.param, "center", kind, kind, dim=w.dim, scale=w.scale, warnings=(note,)))


def _weight_holder(model: nn.Module, path: str) -> nn.Module:
    try:
        module = model.get_submodule(path)
    except AttributeError:
        module = None
    if module is None or not isinstance(getattr(module, "weight", None), torch.Tensor):
        raise ConversionError(f"{path}: exact=True would untie this module's weight, but it has none (a record of "
                              "another model?)")
    return module


class _Snapshot:
    """What applying an exact plan changes in place, kept so that a failed check can put it back."""

    def __init__(self, plan: Plan, target: nn.Module) -> None:
        self.target = target
        self.values = {c.path: target.get_parameter(c.path).detach().clone() for c in plan.changes if c.action == "center"}
        self.weights = {c.path: target.get_submodule(c.path).weight for c in plan.changes if c.action == "untie"}
        self.modules = {p: target.get_submodule(p) for c in plan.changes if c.action in ("replace", "standardize")
                        for p in (c.path, *c.also_at)}
        config = getattr(target, "config", None)
        self.config = copy.deepcopy(config) if config is not None else None

    def restore(self) -> None:
        from .surgery import set_module

        with torch.no_grad():
            for path, value in self.values.items():
                self.target.get_parameter(path).copy_(value)
        for path, weight in self.weights.items():
            self.target.get_submodule(path).weight = weight
        for path, module in self.modules.items():
            set_module(self.target, path, module)
        if self.config is not None:
            self.target.config = self.config


def _eval_output(model: nn.Module, inputs: Inputs) -> torch.Tensor:
    with eval_mode(model), torch.no_grad():
        return run(model, inputs).detach().clone()


def apply_verified(plan: Plan, target: nn.Module, inputs: Any | None, apply: Callable[[], None],
                   keep_original: bool) -> None:
    """``apply()`` the plan, then check that ``target``'s output on the example inputs did not change (the
    centering found every writer); on a mismatch put ``target`` back as it was (``keep_original``: it is
    the caller's model) and raise :class:`~normswap.errors.ConversionError`.

    The tolerance is derived as ``validate`` derives it: the dtype's (64 units in the last place, at least
    1e-5), or 10x how far the output moves when every weight moves by 4 ulp, whichever is larger."""
    split = _run_inputs(target, inputs)
    before = _eval_output(target, split)
    snapshot = _Snapshot(plan, target) if keep_original else None
    apply()
    after = _eval_output(target, split)
    diff = rel_diff(after, before)
    tol = tolerance(before.dtype)
    if diff > tol:  # only then is the conditioning worth a copy of the model
        with eval_mode(target):
            tol = max(tol, 10 * noise_floor(target, split, after, before.dtype))
    if diff > tol:
        if snapshot is not None:
            snapshot.restore()
        raise ConversionError(f"{type(target).__name__}: exact=True changed the output by {diff:.3g} (max |diff| / "
                              f"max |original|, more than {tol:.2g}): the residual stream has a writer or a reader "
                              "the analysis does not see; the model is left as it was. Convert without exact=True "
                              "(and calibrate), or report the model")


def apply_exact(plan: Plan, target: nn.Module) -> None:
    """Untie, then center, as the plan's rows say (before the norms are replaced)."""
    untied = False
    for change in plan.changes:
        if change.action == "untie":
            module = _weight_holder(target, change.path)
            module.weight = nn.Parameter(module.weight.detach().clone(), requires_grad=module.weight.requires_grad)
            untied = True
    if untied:
        _untie_config(target)
    with torch.no_grad():
        for change in plan.changes:
            if change.action == "center":
                _center(target.get_parameter(change.path), change.dim,
                        target.get_parameter(change.scale) if change.scale else None)


def _center(p: torch.Tensor, dim: int, scale: torch.Tensor | None) -> None:
    """Subtract ``p``'s mean along ``dim`` in place; with a per-feature ``scale`` (applied to the output
    after ``p``), subtract ``mean(scale * p) / scale`` so that ``scale * p`` is the one centered."""
    if scale is None:
        p.sub_(p.mean(dim, keepdim=True, dtype=torch.float64).to(p.dtype))
        return
    shape = [1] * p.ndim
    shape[dim] = -1
    g = scale.detach().reshape(shape).double()
    p.sub_(((g * p.double()).mean(dim, keepdim=True) / g).to(p.dtype))


def _untie_config(model: nn.Module) -> None:
    """A transformers model re-ties its output embedding on load when its config says so: say it does not."""
    config = getattr(model, "config", None)
    if config is None:
        return
    configs = [config]
    text = getattr(config, "get_text_config", None)
    if callable(text):
        configs.append(text())
    for c in configs:
        if getattr(c, "tie_word_embeddings", None):
            c.tie_word_embeddings = False


def centered_head(new: nn.Module) -> nn.Module:
    """The :class:`~normswap.norms.rms_norm.CenteredRMSNorm` for a LayerNorm heading the stream."""
    from ..norms.rms_norm import CenteredRMSNorm, RMSNorm

    if type(new) is not RMSNorm:
        raise ConversionError(f"exact=True: a LayerNorm heading the stream became {type(new).__name__}, not RMSNorm")
    return CenteredRMSNorm(new.normalized_shape, eps=new.eps, elementwise_affine=new.elementwise_affine,
                           bias=new.bias is not None)
