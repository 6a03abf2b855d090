"""Converting one model with one spec and checking the result, for the zoo sweeps (timm and transformers).

Per spec the checks are: no exception but ``NormSwapError``; no source-family module without a plan row;
the same class; and, for a model that runs on the given inputs, each converted module computes its spec's
formula; convs feeding converted norms standardized or named (gn_ws); finite forward (eval) and backward
(train); batch independence for the specs whose norms do not mix samples (GroupNorm family, ``ln``) where the
plan skipped no norm; and a save + ``normswap.load`` round trip giving the same outputs. The formulas and
plan-row checks themselves are in ``conversion_checks.py``.
"""

from __future__ import annotations

import copy
import warnings
from typing import Callable

import torch
from torch import nn

SPECS = ("gn_ws", "gn", "in", "ghost_bn", "ln", "rms", "bert_ln")
# virtual batches of one sample: the sweeps' batches of two then run GhostBatchNorm's chunked path
SPEC_OPTIONS = {"ghost_bn": {"virtual_batch": 1}}


def output_tensor(out):
    """The first floating tensor of a model output, with a batch dim of 2."""
    if isinstance(out, torch.Tensor):
        return out if out.is_floating_point() and out.dim() and out.shape[0] == 2 else None
    values = out.values() if hasattr(out, "values") else out if isinstance(out, (tuple, list)) else ()
    for v in values:
        t = output_tensor(v)
        if t is not None:
            return t
    return None


def run(model: nn.Module, inputs: dict):
    return model(**inputs)


def present_specs(model: nn.Module) -> list[str]:
    """The specs of :data:`SPECS` whose source family ``model`` holds (read or skipped with a reason)."""
    from conversion_checks import SOURCES
    from normswap.adapters import norm_family, read_norm

    families = set()
    for m in model.modules():
        info, reason = read_norm(m)
        if info is not None:
            families.add(info.kind)
        elif reason is not None:
            families.add(norm_family(m))
    return [s for s in SPECS if families & set(SOURCES[s])]


def check_spec(model: nn.Module, inputs: dict | None, spec: str, reload: Callable[[nn.Module], nn.Module] | None,
               skipped: list | None = None) -> list[str]:
    """The failures of converting ``model`` with ``spec`` (empty: it passes every check). ``reload`` saves a
    converted model and loads it back with ``normswap.load``; the plan's skip rows go into ``skipped``.
    ``inputs=None`` (a model that does not run on generated inputs) checks the structure alone: the
    conversion, the plan rows, the class."""
    import normswap
    from conversion_checks import BATCH_INDEPENDENT, formula_errors, unplanned_norms, unstandardized_feeds

    options = SPEC_OPTIONS.get(spec, {})
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            plan = normswap.plan(model, spec, **options)
            converted = normswap.convert(model, spec, **options)
    except normswap.NormSwapError:
        return []  # a clear refusal is an allowed outcome
    except Exception as exc:  # noqa: BLE001 - anything but NormSwapError is a failure
        return [f"convert raised {type(exc).__name__}: {exc}"[:300]]
    if skipped is not None:
        skipped += [f"{c.path}: {c.reason}" for c in plan.skipped]
    failures = [f"no plan row: {m}" for m in unplanned_norms(model, plan, spec)[:3]]
    if type(converted) is not type(model):
        failures.append(f"class changed: {type(converted).__name__}")
    if not plan.replaced or inputs is None:
        return failures
    checks = (
        ("formula", lambda: formula_errors(converted, normswap.last_plan(converted), inputs, run)),
        ("conv feeds", lambda: unstandardized_feeds(converted, normswap.last_plan(converted), inputs, run)
         if spec == "gn_ws" else []),
        ("finite", lambda: _finite(model, converted, inputs)),
        # a plan that skips source norms (with their reasons) leaves the model batch-dependent on purpose
        ("batch independence", lambda: _batch_independence(model, converted, inputs)
         if spec in BATCH_INDEPENDENT and not plan.skipped else []),
        ("save/load", lambda: _round_trip(converted, inputs, reload)),
    )
    for name, check in checks:
        try:
            failures += [f"{name}: {m}" for m in check()[:3]]
        except Exception as exc:  # noqa: BLE001 - a check that raises is a failure of that check
            failures.append(f"{name} raised {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
    return failures


def _finite(original: nn.Module, model: nn.Module, inputs: dict) -> list[str]:
    """Finite forward in eval mode and backward in train mode; a model that needs more than these inputs in
    train mode (labels, say: the original refuses them just the same) does its backward in eval mode, and
    a model whose unconverted form cannot run that backward either (Reformer's reversible layers train only
    in train mode) is not checked."""
    train = True
    try:
        with torch.no_grad():
            run(copy.deepcopy(original).train(), inputs)
    except Exception:  # noqa: BLE001 - the unconverted model does not run in train mode on these inputs
        train = False
    try:
        _forward_backward(copy.deepcopy(original), inputs, train)
    except Exception:  # noqa: BLE001 - nothing the conversion could have broken
        return []
    return _forward_backward(model, inputs, train)


def _forward_backward(model: nn.Module, inputs: dict, train: bool) -> list[str]:
    out = []
    for mode, backward in ((False, False), (train, True)):
        model.train(mode)
        model.zero_grad(set_to_none=True)
        y = output_tensor(run(model, inputs))
        if not bool(torch.isfinite(y).all()):
            out.append(f"non-finite output in {'train' if mode else 'eval'} mode")
            continue
        if backward:
            y.float().square().mean().backward()
            bad = [n for n, p in model.named_parameters()
                   if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
            if bad:
                out.append(f"non-finite gradients: {bad[:3]}")
    model.eval()
    return out


def per_sample_field(model: nn.Module, inputs: dict) -> str | None:
    """The first output field that holds one row per sample (not a batch-by-batch similarity matrix)."""
    one_sample = {k: v[:1] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == 2 else v
                  for k, v in inputs.items()}
    with torch.no_grad():
        full, alone = run(model.eval(), inputs), run(model, one_sample)
    if isinstance(full, torch.Tensor) or not hasattr(full, "keys"):
        return None
    for key in full.keys():
        a, b = full[key], alone.get(key) if hasattr(alone, "get") else None
        if (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.is_floating_point() and a.dim()
                and a.shape[0] == 2 and b.shape[0] == 1 and a.shape[1:] == b.shape[1:]):
            return key
    return None


def _batch_independence(original: nn.Module, converted: nn.Module, inputs: dict) -> list[str]:
    from normswap.validation import validate

    field = per_sample_field(original, inputs)
    report = validate(original, converted, inputs, checks=["batch_independence"], output=field)
    return [f"{r.detail} (at {r.module or '-'})" for r in report.rows if r.status == "fail"]


def _round_trip(model: nn.Module, inputs: dict, reload: Callable[[nn.Module], nn.Module]) -> list[str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = reload(model).eval()
    model.eval()
    with torch.no_grad():  # the same seed for both: some models sample in eval mode (ViLT's image patches)
        torch.manual_seed(0)
        a = output_tensor(run(model, inputs))
        torch.manual_seed(0)
        b = output_tensor(run(loaded, inputs))
    if a.shape != b.shape or not torch.allclose(a, b, rtol=0, atol=1e-6 * max(1.0, float(a.abs().max()))):
        return [f"loaded model's output differs by {float((a - b).abs().max()):.3g}"]
    return []
