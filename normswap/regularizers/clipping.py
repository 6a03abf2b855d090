"""Gradient clipping by norm, by value, or adaptive (AGC), with non-finite gradients reported.

* ``norm``: scale all gradients together so their total ``norm_type`` norm is at most ``max_norm``
  (``torch.nn.utils.clip_grad_norm_``, foreach kernels).
* ``value``: clamp every gradient element to ``[-value, value]``.
* ``agc`` (Brock et al., 2021, "High-Performance Large-Scale Image Recognition Without Normalization"):
  per unit (output row of a weight; the whole tensor for vectors), scale the gradient down where its norm
  exceeds ``clip_factor * max(||w_unit||, eps)``. The ``eps`` floor lets zero-initialized parameters
  (biases, last-layer gains) still learn; the classifier head is not clipped, as in the paper.

Every mode first measures the total gradient norm (returned, for logging). When it is not finite, the
parameters holding NaN/inf gradients are named in a :class:`NonFiniteGradientWarning`, nothing is clipped
(clipping would spread the NaN to every gradient), and with ``skip_nonfinite=True`` every gradient is set to
``None`` so that ``optimizer.step()`` leaves the weights as they are.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from ..errors import OptionError, closest
from ..core.selection import classifier_head_paths, in_head

__all__ = ["MODES", "NonFiniteGradientWarning", "clip_gradients", "grad_norm"]

MODES = ("norm", "value", "agc")


class NonFiniteGradientWarning(UserWarning):
    """Warned when gradients hold NaN or inf; the message names the first parameters concerned."""


def _positive(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise OptionError(f"clip_gradients: {name} must be a finite number > 0, got {value!r}.")
    return float(value)


def _named_grads(model_or_params: nn.Module | Iterable[Tensor]) -> list[tuple[str, Tensor]]:
    if isinstance(model_or_params, nn.Module):
        return [(n, p) for n, p in model_or_params.named_parameters() if p.grad is not None]
    if isinstance(model_or_params, Tensor):
        model_or_params = [model_or_params]
    try:
        params = list(model_or_params)
    except TypeError:
        raise OptionError(f"clip_gradients: expected a model or an iterable of parameters, "
                          f"got {type(model_or_params).__name__}.") from None
    if not all(isinstance(p, Tensor) for p in params):
        raise OptionError("clip_gradients: every item of the parameter iterable must be a tensor "
                          "(pass model.parameters(), not param groups).")
    return [(f"params[{i}]", p) for i, p in enumerate(params) if p.grad is not None]


def _by_device_dtype(grads: list[Tensor]) -> list[list[Tensor]]:
    """Gradients grouped for the foreach kernels, which take one device and dtype per call."""
    groups: dict[tuple, list[Tensor]] = {}
    for g in grads:
        groups.setdefault((g.device, g.dtype), []).append(g)
    return list(groups.values())


def _total_norm(grads: list[Tensor], norm_type: float) -> Tensor:
    """The ``norm_type`` norm of all gradients together."""
    device = grads[0].device
    norms = [n.to(device, torch.float32) for gs in _by_device_dtype(grads) for n in torch._foreach_norm(gs, norm_type)]
    return torch.linalg.vector_norm(torch.stack(norms), norm_type)


def _unitwise_norm(t: Tensor) -> Tensor:
    """Norm per output unit (over every dim but the first), or of the whole tensor for scalars and vectors."""
    if t.dim() <= 1:
        return torch.linalg.vector_norm(t)
    return torch.linalg.vector_norm(t, dim=tuple(range(1, t.dim())), keepdim=True)


@torch.no_grad()
def _unit_grad_norms(params: list[Tensor]) -> list[Tensor]:
    """Each parameter's gradient norm per unit (see :func:`_unitwise_norm`), in the order of ``params``.

    Vectors (biases, norm gains) are one unit each: their norms come from the foreach kernels, a few calls
    for all of them instead of several per tensor.
    """
    norms: dict[int, Tensor] = {}
    for group in _by_device_dtype([p for p in params if p.dim() <= 1]):
        norms.update(zip(map(id, group), torch._foreach_norm([p.grad for p in group])))
    return [norms[id(p)] if p.dim() <= 1 else _unitwise_norm(p.grad) for p in params]


@torch.no_grad()
def _agc_(params: list[Tensor], unit_norms: list[Tensor], clip_factor: float, eps: float) -> None:
    """Scale each unit's gradient down to ``clip_factor * max(||w_unit||, eps)`` where it is larger."""
    norm_of = {id(p): n for p, n in zip(params, unit_norms)}
    for group in _by_device_dtype([p for p in params if p.dim() <= 1]):
        grads = [p.grad for p in group]
        g_norms = torch.stack([norm_of[id(p)] for p in group])
        max_norms = torch.stack(torch._foreach_norm(group)).clamp_(min=eps).mul_(clip_factor)
        scale = max_norms.div_(g_norms.clamp(min=1e-6)).clamp_(max=1.0)
        torch._foreach_mul_(grads, list(scale.to(grads[0].dtype).unbind()))
    for p, g_norm in zip(params, unit_norms):
        if p.dim() > 1:
            max_norm = _unitwise_norm(p.detach()).clamp_(min=eps).mul_(clip_factor)
            scale = max_norm.div_(g_norm.clamp(min=1e-6)).clamp_(max=1.0)
            p.grad.mul_(scale.to(p.grad.dtype))


def _measure(named: list[tuple[str, Tensor]], norm_type: float, skip_nonfinite: bool,
             total: Tensor | None = None) -> Tensor:
    """Total gradient norm (``total`` when the caller has it already); on NaN/inf, warn with the parameters'
    names and drop the gradients if asked."""
    if norm_type != math.inf:
        norm_type = _positive("norm_type", norm_type)
    if not named:
        return torch.zeros(())
    if total is None:
        total = _total_norm([p.grad for _, p in named], norm_type)
    if not torch.isfinite(total):
        bad = [n for n, p in named if not torch.isfinite(p.grad).all()]
        action = "gradients set to None, the step will change nothing" if skip_nonfinite else "nothing clipped"
        warnings.warn(f"non-finite gradients in {len(bad)} parameter(s), first: {', '.join(bad[:5])} ({action}).",
                      NonFiniteGradientWarning, stacklevel=3)
        if skip_nonfinite:
            for _, p in named:
                p.grad = None
    return total


def grad_norm(model_or_params: nn.Module | Iterable[Tensor], norm_type: float = 2.0, *,
              skip_nonfinite: bool = False) -> Tensor:
    """Total norm of the gradients, with NaN/inf reported as :func:`clip_gradients` does; clips nothing.

    Example:
        >>> model = nn.Linear(4, 2)
        >>> model(torch.randn(8, 4)).sum().backward()
        >>> bool(grad_norm(model) > 0)
        True
    """
    return _measure(_named_grads(model_or_params), norm_type, skip_nonfinite)


def clip_gradients(
    model_or_params: nn.Module | Iterable[Tensor],
    mode: str = "norm",
    *,
    max_norm: float | None = None,
    value: float | None = None,
    clip_factor: float = 0.01,
    eps: float = 1e-3,
    norm_type: float = 2.0,
    exclude_head: bool = True,
    skip_nonfinite: bool = False,
) -> Tensor:
    """Clip the gradients of a model (or of parameters) in place; return their total norm before clipping.

    Args:
        model_or_params: a model, or an iterable of parameters (then AGC cannot tell the head apart).
        mode: ``"norm"`` (needs ``max_norm``), ``"value"`` (needs ``value``) or ``"agc"``.
        clip_factor, eps: AGC's ratio of gradient to weight norm per unit, and the floor on the weight norm.
        norm_type: the norm of ``"norm"`` mode and of the returned total (``inf`` for the max).
        exclude_head: AGC leaves the classifier head unclipped (default True; only for a model).
        skip_nonfinite: on NaN/inf gradients, set every gradient to ``None`` so the optimizer step changes
            nothing (a :class:`NonFiniteGradientWarning` names the parameters either way).

    Example:
        >>> model = nn.Linear(4, 2)
        >>> model(torch.randn(8, 4)).pow(2).sum().backward()
        >>> total = clip_gradients(model, "norm", max_norm=0.1)
        >>> bool(torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in model.parameters()])) <= 0.1 + 1e-6)
        True
    """
    if mode not in MODES:
        raise OptionError(f"clip_gradients: unknown mode {mode!r}; use one of {MODES}.{closest(str(mode), MODES)}")
    if mode == "norm":
        if max_norm is None:
            raise OptionError("clip_gradients: mode='norm' needs max_norm=..., e.g. max_norm=1.0.")
        max_norm = _positive("max_norm", max_norm)
    elif mode == "value":
        if value is None:
            raise OptionError("clip_gradients: mode='value' needs value=..., e.g. value=1.0.")
        value = _positive("value", value)
    else:
        clip_factor, eps = _positive("clip_factor", clip_factor), _positive("eps", eps)
    named = _named_grads(model_or_params)
    if mode == "agc":
        return _clip_agc(model_or_params, named, clip_factor, eps, norm_type, exclude_head, skip_nonfinite)
    total = _measure(named, norm_type, skip_nonfinite)
    if not named or not torch.isfinite(total):
        return total
    grads = [p.grad for _, p in named]
    if mode == "norm":
        coef = (max_norm / (total + 1e-6)).clamp_(max=1.0)
        for gs in _by_device_dtype(grads):
            torch._foreach_mul_(gs, coef.to(gs[0].device, gs[0].dtype))
    else:
        for g in grads:  # one pass per tensor; the foreach form needs two (clamp_min_, then clamp_max_)
            g.clamp_(-value, value)
    return total


def _clip_agc(model_or_params, named, clip_factor: float, eps: float, norm_type: float, exclude_head: bool,
              skip_nonfinite: bool) -> Tensor:
    """AGC; with the L2 total, that total comes from the per-unit norms AGC needs anyway (one read less)."""
    clipped = named
    if exclude_head and isinstance(model_or_params, nn.Module):
        heads = classifier_head_paths(model_or_params)
        clipped = [(n, p) for n, p in named if not in_head(n.rpartition(".")[0], heads)]
    params = [p for _, p in clipped]
    unit_norms = _unit_grad_norms(params)
    total = None
    if norm_type == 2.0 and named:
        chosen = set(map(id, params))
        rest = [p.grad for _, p in named if id(p) not in chosen]
        squares = [torch.cat([u.reshape(-1).float() for u in unit_norms] or [torch.zeros(0)]).square().sum()]
        squares += [n.float().square() for gs in _by_device_dtype(rest) for n in torch._foreach_norm(gs)]
        total = torch.stack([q.to(squares[0].device) for q in squares]).sum().sqrt()
    total = _measure(named, norm_type, skip_nonfinite, total)
    if named and torch.isfinite(total):
        _agc_(params, unit_norms, clip_factor, eps)
    return total
