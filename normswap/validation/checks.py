"""``normswap.validate``: behaviour checks of a converted model against its original.

Each check runs on copies, never on the models given, and names the first offending module or parameter
when it fails. A check that fails for the original model just as much (an autocast dtype torch does not
support on this device, a model torch.compile cannot trace) is a skip with that reason, not a failure of
the conversion.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..adapters import NormInfo, read_norm
from ..errors import OptionError
from ..specs import get_spec
from ..core.state import conversions_of, last_plan
from ..inputs import Inputs, map_inputs, output_tensor, tolerance
from ..inputs import noise_floor, rel_diff, run as run_model
from .registry import Context, check, registered
from .report import ValidationReport

def _module_outputs(model: nn.Module, inputs: Inputs) -> tuple[torch.Tensor, list[tuple[str, torch.Tensor]]]:
    """The model's output and, in execution order, each submodule's first tensor output."""
    seen: list[tuple[str, torch.Tensor]] = []
    hooks = []
    for path, module in model.named_modules():
        if path:
            def hook(m, args, out, path=path):
                try:
                    seen.append((path, output_tensor(out).detach().clone()))  # later ops may act in place
                except OptionError:
                    pass
            hooks.append(module.register_forward_hook(hook))
    try:
        out = run_model(model, inputs)
    finally:
        for h in hooks:
            h.remove()
    return out, seen


def first_nonfinite(model: nn.Module, inputs: Inputs) -> str:
    """The first module (in execution order) whose output holds NaN or inf; ``""`` when none does."""
    with torch.no_grad():
        _, outputs = _module_outputs(model, inputs)
    return next((p for p, t in outputs if t.is_floating_point() and not bool(torch.isfinite(t).all())), "")


def first_divergent(original: nn.Module, converted: nn.Module, inputs: Inputs, tol: float,
                    converted_inputs: Inputs | None = None) -> str:
    """The first module path (in the converted model's order) whose output differs from the original's.

    ``converted_inputs`` (default: ``inputs``) may be the first samples of ``inputs``; the original's
    outputs are then compared on those samples only."""
    with torch.no_grad():
        _, a = _module_outputs(original, inputs)
        _, b = _module_outputs(converted, inputs if converted_inputs is None else converted_inputs)
    ref = dict(a)
    for path, t in b:
        r = ref.get(path)
        if r is None:
            continue
        if r.shape != t.shape:
            if not (r.dim() and r.shape[1:] == t.shape[1:] and r.shape[0] > t.shape[0]):
                continue
            r = r[: t.shape[0]]
        if rel_diff(t, r) > tol:
            return path
    return ""


def _preserves(converted: nn.Module) -> str:
    """``yes``, ``eval`` or ``no``: what the recorded conversions say about preserving computation."""
    history = conversions_of(converted)
    if not history:
        return "no"
    modes = ["yes" if h.get("options", {}).get("exact") else get_spec(h["spec"]).preserves.split()[0].lower()
             for h in history]
    if all(m == "yes" for m in modes):
        return "yes"
    return "eval" if all(m in ("yes", "eval") for m in modes) else "no"


def _batch_norms(model: nn.Module) -> list[str]:
    return [p for p, m in model.named_modules() if (info := read_norm(m)[0]) is not None and info.kind == "batch"]


def _replaces_batch_norms(plan: Any) -> bool:
    """Whether ``plan``'s spec turns a BatchNorm into a norm of another kind (``gn_ws`` does, ``ghost_bn``
    does not): asked of the spec itself, by building its replacement for a small BatchNorm on ``meta``."""
    try:
        spec = get_spec(plan.spec)
        if "batch" not in spec.sources:
            return False
        options = spec.resolve({k: v for k, v in plan.options.items() if k not in ("include", "exclude")})
        info = NormInfo(kind="batch", num_features=8, eps=1e-5, channels_first=True, normalized_shape=(8,),
                        spatial_dims=2)
        with torch.device("meta"):
            made = spec.builder(info, **options)
    except Exception:  # noqa: BLE001 - a spec no longer registered or a builder that needs real values
        return False
    made_info = read_norm(made)[0]
    return made_info is None or made_info.kind != "batch"


def _left_behind(converted: nn.Module, batch_norms: list[str]) -> list[str]:
    """BatchNorms left in a model whose last conversion replaced BatchNorms by batch-independent norms, and
    which its plan did not leave out on purpose (``include``/``exclude``): a norm planted after converting,
    or one the conversion missed."""
    plan = last_plan(converted)
    if plan is None or not batch_norms or not _replaces_batch_norms(plan):
        return []
    on_purpose = {p for c in plan.skipped if "include/exclude" in c.reason for p in (c.path, *c.also_at)}
    return [p for p in batch_norms if p not in on_purpose]


def _norms_train_rest_eval(model: nn.Module) -> nn.Module:
    """Eval mode except the norms: dropout off, the norms' own train-mode behaviour on."""
    model.eval()
    for m in model.modules():
        if read_norm(m)[0] is not None:
            m.train()
    return model


def _param_aliases(name: str) -> list[str]:
    out = [name]
    for suffix in (".parametrizations.weight.original0", ".parametrizations.weight.original1"):
        if name.endswith(suffix):
            out.append(name[: -len(suffix)] + ".weight")
    return out


def _backward(model: nn.Module, inputs: Inputs) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    out = run_model(model, inputs)
    out.float().square().mean().backward()
    return out


def _try(fn: Callable[[], Any]) -> tuple[Any, str]:
    try:
        return fn(), ""
    except Exception as exc:  # a check reports what went wrong; it does not stop the others
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"


# --------------------------------------------------------------------------------------------- the checks


def check_finite(report: ValidationReport, converted: nn.Module, inputs: Inputs) -> None:
    for mode in ("train", "eval"):
        model = copy.deepcopy(converted).train(mode == "train")
        out, error = _try(lambda: _backward(model, inputs) if mode == "train" else run_model(model, inputs))
        name = f"finite ({mode})"
        if error:
            report.add(name, "fail", f"forward{'/backward' if mode == 'train' else ''} raised {error}")
            continue
        if not bool(torch.isfinite(out).all()):
            report.add(name, "fail", "the output holds NaN or inf", first_nonfinite(model, inputs))
            continue
        if mode == "train":
            bad = [n for n, p in model.named_parameters() if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
            if bad:
                report.add(name, "fail", f"{len(bad)} parameter gradient(s) hold NaN or inf", bad[0])
                continue
        report.add(name, "pass", "forward and backward finite" if mode == "train" else "forward finite")


def check_gradients(report: ValidationReport, original: nn.Module, converted: nn.Module, inputs: Inputs) -> None:
    orig, conv = copy.deepcopy(original).train(), copy.deepcopy(converted).train()
    _, e1 = _try(lambda: _backward(orig, inputs))
    _, e2 = _try(lambda: _backward(conv, inputs))
    if e2:
        report.add("gradients", "fail", f"backward raised {e2}")
        return
    without = set() if e1 else {n for n, p in orig.named_parameters() if p.requires_grad and p.grad is None}
    missing = [n for n, p in conv.named_parameters() if p.requires_grad and p.grad is None
               and not any(a in without for a in _param_aliases(n))]
    total = sum(1 for p in conv.parameters() if p.requires_grad)
    if missing:
        report.add("gradients", "fail", f"{len(missing)} of {total} trainable parameters receive no gradient",
                   missing[0])
    else:
        note = f" ({len(without)} get none in the original either)" if without else ""
        report.add("gradients", "pass", f"all {total} trainable parameters receive a gradient{note}")


def check_outputs(report: ValidationReport, original: nn.Module, converted: nn.Module, inputs: Inputs,
                  dtype: torch.dtype) -> None:
    preserves = _preserves(converted)
    for mode in ("eval", "train"):
        orig = _norms_train_rest_eval(copy.deepcopy(original)) if mode == "train" else copy.deepcopy(original).eval()
        conv = _norms_train_rest_eval(copy.deepcopy(converted)) if mode == "train" else copy.deepcopy(converted).eval()
        with torch.no_grad():
            (a, e1), (b, e2) = _try(lambda: run_model(orig, inputs)), _try(lambda: run_model(conv, inputs))
        name = f"outputs ({mode})"
        if e1 or e2:
            report.add(name, "fail" if e2 else "skip", f"forward raised {e2 or e1}")
            continue
        diff = rel_diff(b, a)
        must = preserves == "yes" or (preserves == "eval" and mode == "eval")
        tol = max(tolerance(dtype), 10 * noise_floor(orig, inputs, a, dtype)) if must else tolerance(dtype)
        if must and diff > tol:
            report.add(name, "fail", f"max |diff| / max |original| = {diff:.3g} > {tol:.2g} (the spec preserves "
                       f"computation{' in eval mode' if preserves == 'eval' else ''})",
                       first_divergent(orig, conv, inputs, tol), diff)
        elif must:
            report.add(name, "pass", f"matches the original: {diff:.3g} <= {tol:.2g} (dtype tolerance, or 10x the "
                       "output change from weights moved by 4 ulp)", value=diff)
        else:
            report.add(name, "info", f"differs from the original by {diff:.3g} (max |diff| / max |original|); the "
                       "spec does not preserve computation: fine-tune before use", value=diff)


def _first_sample(inputs: Inputs, batch: int) -> Inputs:
    return map_inputs(inputs, lambda t: t[:1] if t.dim() and t.shape[0] == batch else t)


def _batch_size(inputs: Inputs) -> int:
    args, kwargs = inputs
    sizes = [t.shape[0] for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor) and t.dim()]
    return sizes[0] if sizes else 0


def check_batch_independence(report: ValidationReport, converted: nn.Module, inputs: Inputs,
                             dtype: torch.dtype) -> None:
    bns = _batch_norms(converted)
    left = _left_behind(converted, bns)
    if left:
        report.add("batch independence", "fail", f"{len(left)} BatchNorm(s) the conversion did not skip on purpose "
                   f"remain (first: {left[0]}); a sample's output depends on its batch through them", left[0])
        return
    if bns:
        report.add("batch independence", "skip", f"{len(bns)} BatchNorm-family norm(s) remain (e.g. {bns[0]}): "
                   "their train-mode output depends on the batch by design")
        return
    batch = _batch_size(inputs)
    if batch < 2:
        report.add("batch independence", "skip", "the example inputs hold a single sample; give a batch of 2 or more")
        return
    model = _norms_train_rest_eval(copy.deepcopy(converted))
    with torch.no_grad():
        full = run_model(model, inputs)[:1]
        first = _first_sample(inputs, batch)
        alone = run_model(model, first)
    diff = rel_diff(full, alone)
    # a batch of one may take other conv / matmul algorithms than a batch of several: rounding-level
    # differences, which a deep model amplifies as much as it amplifies weights moved by a few ulp
    tol = max(tolerance(dtype), 10 * noise_floor(model, first, alone, dtype))
    if diff > tol:
        report.add("batch independence", "fail", f"sample 0 changes with its batch mates in train mode by {diff:.3g} > {tol:.2g}",
                   first_divergent(model, model, inputs, tol, first), diff)
    else:
        report.add("batch independence", "pass", f"train-mode output of a sample does not depend on its batch "
                   f"({diff:.2g} <= {tol:.2g}: dtype tolerance, or 10x the output change from weights moved by 4 ulp)",
                   value=diff)


def _layers_to_check(model: nn.Module) -> dict[str, nn.Module]:
    """The layers the conversion made (its plan: replaced norms, standardized convs, reparametrized
    weights); every norm layer when there is no plan."""
    plan = last_plan(model)
    if plan is None:
        return {p: m for p, m in model.named_modules() if p and read_norm(m)[0] is not None}
    paths = set()
    for c in plan.changes:
        if c.action in ("replace", "standardize", "reparametrize"):
            paths.update((c.path, *c.also_at))
        paths.update(c.convs_standardized)
    return {p: m for p, m in model.named_modules() if p in paths}


def _local_errors(model: nn.Module, inputs: Inputs, device: torch.device, dtype: torch.dtype) -> list[tuple[str, float]]:
    """Each norm / conv layer run on its own fp32 input, rounded to ``dtype`` as autocast would hand it over,
    under autocast: its output's RMS error relative to the fp32 output (errors of earlier layers excluded)."""
    layers = _layers_to_check(model)
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    def keep(path: str):
        def hook(m: nn.Module, args: tuple, out: Any) -> None:
            if len(args) == 1 and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor):
                seen.setdefault(path, (args[0].detach().clone(), out.detach().clone()))  # later ops may act in place
        return hook

    hooks = [m.register_forward_hook(keep(p)) for p, m in layers.items()]
    try:
        with torch.no_grad():
            run_model(model, inputs)
    finally:
        for h in hooks:
            h.remove()
    errors = []
    for path, (x, ref) in seen.items():
        if not x.is_floating_point():
            continue
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype):
            out = output_tensor(layers[path](x.to(dtype)))
        denom = float(ref.float().norm())
        errors.append((path, float((out.float() - ref.float()).norm()) / denom if denom > 0 else 0.0))
    return errors


def check_autocast(report: ValidationReport, original: nn.Module, converted: nn.Module, inputs: Inputs,
                   device: torch.device, dtypes: Sequence[torch.dtype]) -> None:
    """Under bf16/fp16 autocast: forward and backward finite, and every norm / conv layer close to its fp32
    result on the same input. The end-to-end drift is reported too; in a deep network with random weights
    it compounds layer by layer, so it is a figure, not a criterion."""
    model = copy.deepcopy(converted).eval()
    with torch.no_grad():
        ref = run_model(model, inputs)
    for dtype in dtypes:
        name = f"autocast {str(dtype).removeprefix('torch.')}"

        def run(m: nn.Module) -> torch.Tensor:
            m = copy.deepcopy(m).eval()
            with torch.autocast(device.type, dtype=dtype):
                out = run_model(m, inputs)
                out.float().square().mean().backward()
            return out

        out, error = _try(lambda: run(converted))
        if error:
            _, orig_error = _try(lambda: run(original))
            status = "skip" if orig_error else "fail"
            report.add(name, status, f"raised {error}" + (" (the original model too)" if orig_error else ""))
            continue
        if not bool(torch.isfinite(out).all()):
            with torch.autocast(device.type, dtype=dtype):
                where = first_nonfinite(model, inputs)
            report.add(name, "fail", "non-finite output under autocast", where)
            continue
        local, local_error = _try(lambda: _local_errors(model, inputs, device, dtype))
        if local_error:
            report.add(name, "fail", f"a layer raised {local_error} on its own input under autocast")
            continue
        tol = 8 * torch.finfo(dtype).eps
        worst = max(local, key=lambda pe: pe[1], default=("", 0.0))
        bad = [(p, e) for p, e in local if e > tol]
        drift = rel_diff(out, ref)
        if bad:
            report.add(name, "fail", f"{len(bad)} layer(s) off their fp32 result by more than {tol:.2g} (first: "
                       f"{bad[0][1]:.3g}); end to end {drift:.3g}", bad[0][0], bad[0][1])
        else:
            report.add(name, "pass", f"finite; every norm/conv layer within {tol:.2g} of fp32 (worst {worst[1]:.2g} at "
                       f"{worst[0] or '-'}); end-to-end drift {drift:.3g}", value=worst[1])


def check_compile(report: ValidationReport, original: nn.Module, converted: nn.Module, inputs: Inputs,
                  dtype: torch.dtype) -> None:
    model = copy.deepcopy(converted).eval()

    def run(m: nn.Module) -> torch.Tensor:
        compiled = torch.compile(copy.deepcopy(m).eval())
        with torch.no_grad():
            return run_model(compiled, inputs)

    out, error = _try(lambda: run(converted))
    if error:
        _, orig_error = _try(lambda: run(original))
        report.add("torch.compile", "skip" if orig_error else "fail",
                   f"raised {error}" + (" (the original model too)" if orig_error else ""))
        return
    with torch.no_grad():
        ref = run_model(model, inputs)
    diff, tol = rel_diff(out, ref), 16 * tolerance(dtype)
    report.add("torch.compile", "pass" if diff <= tol else "fail",
               f"compiled vs eager: {diff:.3g} (tolerance {tol:.1g})", value=diff)


def _channels_last_diff(model: nn.Module, inputs: Inputs) -> tuple[float | None, str, nn.Module, nn.Module]:
    plain = copy.deepcopy(model).eval()
    cl = copy.deepcopy(model).eval().to(memory_format=torch.channels_last)
    cl_inputs = map_inputs(inputs, lambda t: t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t)
    with torch.no_grad():
        ref = run_model(plain, inputs)
        out, error = _try(lambda: run_model(cl, cl_inputs))
    return (None if error else rel_diff(out, ref)), error, plain, cl


def check_channels_last(report: ValidationReport, original: nn.Module, converted: nn.Module, inputs: Inputs,
                        dtype: torch.dtype) -> None:
    if not any(isinstance(m, nn.Conv2d) for m in converted.modules()):
        report.add("channels_last", "skip", "no 2-d convolution: channels_last does not apply")
        return
    diff, error, model, cl = _channels_last_diff(converted, inputs)
    if error:
        report.add("channels_last", "fail", f"raised {error}")
        return
    orig_diff = _channels_last_diff(original, inputs)[0] or 0.0
    tol = max(10 * tolerance(dtype), 2 * orig_diff)
    report.add("channels_last", "pass" if diff <= tol else "fail",
               f"channels_last vs contiguous: {diff:.3g} (the original: {orig_diff:.3g}; tolerance {tol:.1g})",
               "" if diff <= tol else first_divergent(model, cl, inputs, tol), diff)


def check_devices(report: ValidationReport, converted: nn.Module, inputs: Inputs, reference: torch.device,
                  device: torch.device, dtype: torch.dtype) -> None:
    """The converted model's eval outputs on ``device`` against ``reference`` (CPU vs GPU)."""
    name = f"{reference.type} vs {device.type}"
    a = copy.deepcopy(converted).eval().to(reference)
    b = copy.deepcopy(converted).eval().to(device)
    tf32 = _tf32_off()
    try:
        with torch.no_grad():
            ref = run_model(a, map_inputs(inputs, lambda t: t.to(reference)))
            out, error = _try(lambda: run_model(b, map_inputs(inputs, lambda t: t.to(device))))
    finally:
        _tf32_restore(tf32)
    if error:
        report.add(name, "fail", f"raised {error}")
        return
    diff, tol = rel_diff(out, ref), 16 * tolerance(dtype)
    report.add(name, "pass" if diff <= tol else "fail", f"{diff:.3g} apart (tolerance {tol:.1g}, TF32 off)", value=diff)


def _tf32_off() -> tuple[bool, bool]:
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return old


def _tf32_restore(old: tuple[bool, bool]) -> None:
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


# --------------------------------------------------------------------------------------------- registration


@check("finite")
def _finite(ctx: Context) -> None:
    check_finite(ctx.report, ctx.converted, ctx.inputs)


@check("gradients")
def _gradients(ctx: Context) -> None:
    check_gradients(ctx.report, ctx.original, ctx.converted, ctx.inputs)


@check("outputs")
def _outputs(ctx: Context) -> None:
    check_outputs(ctx.report, ctx.original, ctx.converted, ctx.inputs, ctx.dtype)


@check("batch_independence")
def _batch_independence(ctx: Context) -> None:
    check_batch_independence(ctx.report, ctx.converted, ctx.inputs, ctx.dtype)


@check("autocast")
def _autocast(ctx: Context) -> None:
    check_autocast(ctx.report, ctx.original, ctx.converted, ctx.inputs, ctx.device, ctx.autocast_dtypes)


@check("compile")
def _compile(ctx: Context) -> None:
    check_compile(ctx.report, ctx.original, ctx.converted, ctx.inputs, ctx.dtype)


@check("channels_last")
def _channels_last(ctx: Context) -> None:
    check_channels_last(ctx.report, ctx.original, ctx.converted, ctx.inputs, ctx.dtype)


@check("device")
def _device(ctx: Context) -> None:
    if ctx.device.type != "cpu":  # CPU against the validation device: nothing to compare on the CPU itself
        check_devices(ctx.report, ctx.as_given, map_inputs(ctx.inputs, lambda t: t.cpu()), torch.device("cpu"), ctx.device,
                      ctx.dtype)


CHECKS = tuple(registered())  # the built-in checks, in the order they run
