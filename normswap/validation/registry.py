"""The registry of validation checks: each is a function of one :class:`Context`, registered under its name
by :func:`check`, run by :func:`normswap.validate` in registration order (as Opacus registers its
validators). ``checks=`` / ``skip=`` name them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .report import ValidationReport

Inputs = tuple[tuple[Any, ...], dict[str, Any]]


@dataclass
class Context:
    """What every check sees: the report to add rows to, both models (on the validation device), the inputs
    there, the converted model's dtype, the device, and the converted model as given (for device checks)."""

    report: ValidationReport
    original: nn.Module
    converted: nn.Module
    inputs: Inputs
    dtype: torch.dtype
    device: torch.device
    autocast_dtypes: Sequence[torch.dtype]
    as_given: nn.Module


CheckFn = Callable[[Context], None]
_CHECKS: dict[str, CheckFn] = {}


def check(name: str) -> Callable[[CheckFn], CheckFn]:
    """Register a check under ``name``.

    Example:
        >>> @check("parameter_count")
        ... def parameter_count(ctx):
        ...     ctx.report.add("parameters", "info", str(sum(p.numel() for p in ctx.converted.parameters())))
        >>> "parameter_count" in registered()
        True
        >>> unregister("parameter_count")
    """
    def deco(fn: CheckFn) -> CheckFn:
        _CHECKS[name] = fn
        return fn
    return deco


def unregister(name: str) -> None:
    """Remove a registered check (tests and notebooks)."""
    _CHECKS.pop(name, None)


def registered() -> dict[str, CheckFn]:
    """Every registered check by name, in the order they run."""
    return dict(_CHECKS)
