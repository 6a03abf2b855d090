"""What normswap remembers on a model it converted: the plan of the last conversion and every conversion
it went through (spec and options, oldest first). These two functions are the only way to read it."""

from __future__ import annotations

from typing import Any

from torch import nn

from .plan import Plan

_PLAN = "_normswap_plan"
_HISTORY = "_normswap_history"


def last_plan(model: nn.Module) -> Plan | None:
    """The plan of the last :func:`normswap.convert` that produced ``model`` (``None`` if it was not converted).

    Example:
        >>> import torch
        >>> last_plan(torch.nn.Linear(2, 2)) is None
        True
    """
    return model.__dict__.get(_PLAN)


def conversions_of(model: nn.Module) -> list[dict[str, Any]]:
    """The conversions :func:`normswap.convert` applied to ``model``, oldest first (``{"spec", "options"}``).

    Example:
        >>> import torch
        >>> conversions_of(torch.nn.Linear(2, 2))
        []
    """
    return list(model.__dict__.get(_HISTORY, []))


def remember(model: nn.Module, plan: Plan, applied: bool) -> None:
    """Keep ``plan`` on ``model`` as its last plan and, when it changed something, in its conversions."""
    model.__dict__[_PLAN] = plan
    if applied:
        model.__dict__.setdefault(_HISTORY, []).append({"spec": plan.spec, "options": plan.options})
