"""What a spec is, and the registry that names them.

A spec is a builder function plus a little metadata: which source kinds it takes, whether it preserves
computation, which checkpoint keys change, and whether the convs feeding a converted norm get Weight
Standardization. The builder receives the source's :class:`~normswap.adapters.NormInfo` and the
validated options (its own keyword-only parameters) and returns the new module; the surgery carries the
affine parameters over, keeps device, dtype, mode, hooks and fused activation.

A *weight spec* (``weights=WeightTransform(...)``, no norm ``sources``) works on convs and linears instead:
its function receives each selected layer and changes it in place (e.g. ``wn``, weight normalization).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..adapters.base import KINDS, NormInfo
from ..errors import RegistrationError, UnknownSpecError, closest
from .options import Option, options_of, validate_options

Builder = Callable[..., nn.Module]


@dataclass(frozen=True)
class WSConfig:
    """Weight Standardization a spec asks for on convs: which ones, with what eps form."""

    convs: str  # "fed": convs whose output feeds a converted norm; "all": every conv
    eps: float
    mode: str


@dataclass(frozen=True)
class WeightTransform:
    """What a weight spec does to conv / linear layers: ``label`` names it in the plan (``label(Conv2d)``),
    ``skip_reason(layer)`` says why a layer is left alone (``None`` to transform it)."""

    label: str
    skip_reason: Callable[[nn.Module], str | None]


@dataclass
class Spec:
    """A registered conversion. Build one with :func:`register_spec`."""

    name: str
    builder: Builder
    sources: tuple[str, ...]
    description: str
    preserves: str = "no"
    changed_keys: str = "none"
    accepts: Callable[[NormInfo, dict[str, Any]], str | None] | None = None
    weight_standardization: Callable[[dict[str, Any]], WSConfig | None] | None = None
    functional: dict[str, Callable[..., Any]] = field(default_factory=dict)
    options: dict[str, Option] = field(default_factory=dict)
    weights: WeightTransform | None = None
    exact: bool = False  # LayerNorm -> RMSNorm: convert(..., exact=True) centers the residual stream

    def resolve(self, given: dict[str, Any]) -> dict[str, Any]:
        """Validated options with defaults filled in (raises :class:`~normswap.errors.OptionError`)."""
        return validate_options(self.name, self.options, given)

    def skip_reason(self, info: NormInfo, options: dict[str, Any]) -> str | None:
        """Why this spec leaves ``info``'s module alone, or ``None`` when it converts it."""
        if info.kind not in self.sources:
            return f"spec {self.name!r} takes {'/'.join(self.sources)} norms, not {info.kind}"
        return self.accepts(info, options) if self.accepts is not None else None

    def ws_config(self, options: dict[str, Any]) -> WSConfig | None:
        return self.weight_standardization(options) if self.weight_standardization is not None else None


_SPECS: dict[str, Spec] = {}


def normalize_name(name: str) -> str:
    """Spec names are case-insensitive and treat ``-`` and ``_`` alike."""
    return re.sub(r"[-\s]+", "_", name.strip().lower())


def register_spec(
    name: str,
    *,
    sources: Sequence[str],
    description: str,
    preserves: str = "no",
    changed_keys: str = "none",
    accepts: Callable[[NormInfo, dict[str, Any]], str | None] | None = None,
    weight_standardization: Callable[[dict[str, Any]], WSConfig | None] | None = None,
    functional: dict[str, Callable[..., Any]] | None = None,
    weights: WeightTransform | None = None,
    exact: bool = False,
    replace: bool = False,
) -> Callable[[Builder], Builder]:
    """Register a conversion under ``name``; the decorated function builds one replacement.

    The builder is called as ``builder(info, **options)``: ``info`` is the source's ``NormInfo``
    and its keyword-only parameters are the spec's options (typed, validated, shown by ``normswap list``).
    ``sources`` are the norm kinds it takes (``batch``, ``layer``, ``rms``, ``group``, ``instance``).
    A weight spec passes ``sources=()`` and ``weights=WeightTransform(...)``; its function is called as
    ``fn(layer, **options)`` on each selected conv / linear and changes it in place. ``exact=True`` marks a
    LayerNorm -> RMSNorm spec that ``convert(..., exact=True)`` may use (it centers the residual stream).

    Example:
        >>> import torch
        >>> @register_spec("scaled_ln", sources=("layer",), description="LayerNorm with a fixed scale")
        ... def scaled_ln(info, *, scale: float = 2.0):
        ...     return torch.nn.LayerNorm(info.normalized_shape, eps=info.eps)
        >>> "scaled_ln" in list_specs()
        True
    """
    key = normalize_name(name)
    bad = [s for s in sources if s not in KINDS]
    if bad or (not sources) == (weights is None):
        raise RegistrationError(f"spec {name!r}: give norm sources among {KINDS} (got {tuple(sources)}), or "
                                "sources=() with weights=WeightTransform(...) for a spec on convs and linears")
    if key in _SPECS and not replace:
        raise RegistrationError(f"spec {key!r} is already registered; pass replace=True to override it")

    def deco(builder: Builder) -> Builder:
        if not callable(builder):
            raise RegistrationError(f"spec {name!r}: the decorated object must be a function")
        _SPECS[key] = Spec(
            name=key, builder=builder, sources=tuple(sources), description=description, preserves=preserves,
            changed_keys=changed_keys, accepts=accepts, weight_standardization=weight_standardization,
            functional=dict(functional or {}), options=options_of(builder), weights=weights, exact=exact,
        )
        return builder

    return deco


def unregister_spec(name: str) -> None:
    """Remove a registered spec (mostly for tests and notebooks).

    Example:
        >>> unregister_spec("scaled_ln")
    """
    _SPECS.pop(normalize_name(name), None)


def get_spec(spec: str | Spec) -> Spec:
    """The :class:`Spec` for a name (or the spec itself).

    Example:
        >>> get_spec("GN-WS").name
        'gn_ws'
    """
    if isinstance(spec, Spec):
        return spec
    if not isinstance(spec, str):
        raise UnknownSpecError(f"spec must be a registered name or a Spec, got {type(spec).__name__}")
    key = normalize_name(spec)
    if key not in _SPECS:
        raise UnknownSpecError(
            f"unknown spec {spec!r}. Known specs: {', '.join(sorted(_SPECS))}.{closest(key, _SPECS)}"
        )
    return _SPECS[key]


def list_specs() -> dict[str, Spec]:
    """All registered specs by name, sorted.

    Example:
        >>> "gn_ws" in list_specs()
        True
    """
    return dict(sorted(_SPECS.items()))
