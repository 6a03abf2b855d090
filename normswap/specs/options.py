"""Typed conversion options, validated against the annotations of a spec's builder.

A spec's builder declares its options as keyword-only parameters with annotations and defaults; the
same signature is the documentation, the validation and the CLI's ``--set key=value`` parser.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import OptionError, closest


@dataclass(frozen=True)
class Range:
    """The numbers an option allows, declared in its annotation: ``Annotated[int, Range(1)]`` (>= 1),
    ``Annotated[float, Range(0, above=True)]`` (> 0). ``None``, where the type allows it, is not a number.

    Example:
        >>> Range(1).check(0), Range(0, above=True).check(0.5)
        ('>= 1', None)
    """

    low: float | None = None
    high: float | None = None
    above: bool = False  # the low end itself is excluded

    def describe(self) -> str:
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.above else '>='} {self.low:g}")
        if self.high is not None:
            parts.append(f"<= {self.high:g}")
        return " and ".join(parts)

    def check(self, value: Any) -> str | None:
        """``None`` when ``value`` is allowed, else the allowed range (as text)."""
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return None
        too_low = self.low is not None and (value <= self.low if self.above else value < self.low)
        too_high = self.high is not None and value > self.high
        return self.describe() if too_low or too_high or value != value else None


@dataclass(frozen=True)
class Option:
    """One option of a spec: its name, annotation (``Annotated[...]`` stripped), allowed range and default."""

    name: str
    annotation: Any
    default: Any
    range: Range | None = None

    def type_name(self) -> str:
        kind = type_name(self.annotation)
        return f"{kind} ({self.range.describe()})" if self.range is not None else kind


def type_name(ann: Any) -> str:
    """An annotation as people write it: ``int | None``, ``'inside' | 'outside'``, ``float``.

    Example:
        >>> type_name(int | None)
        'int | None'
    """
    origin = typing.get_origin(ann)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(ann))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(ann))
    if ann is type(None):
        return "None"
    return getattr(ann, "__name__", str(ann))


def options_of(builder: Callable[..., Any]) -> dict[str, Option]:
    """The keyword-only options a builder takes, with their resolved annotations."""
    hints = typing.get_type_hints(builder, include_extras=True)
    out = {}
    for p in inspect.signature(builder).parameters.values():
        if p.kind is inspect.Parameter.KEYWORD_ONLY:
            ann, allowed = hints.get(p.name, Any), None
            if typing.get_origin(ann) is typing.Annotated:
                ann, *extras = typing.get_args(ann)
                allowed = next((e for e in extras if isinstance(e, Range)), None)
            out[p.name] = Option(p.name, ann, p.default, allowed)
    return out


def _matches(value: Any, ann: Any) -> tuple[bool, Any]:
    """Whether ``value`` fits ``ann``; returns the (possibly widened, int -> float) value."""
    if ann is Any:
        return True, value
    origin = typing.get_origin(ann)
    if origin is typing.Literal:
        return value in typing.get_args(ann), value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(ann):
            ok, v = _matches(value, arg)
            if ok:
                return True, v
        return False, value
    if origin in (tuple, list):
        (inner, *_) = typing.get_args(ann) or (Any,)
        if isinstance(value, str):
            value = (value,)
        if not isinstance(value, (tuple, list)):
            return False, value
        return all(_matches(v, inner)[0] for v in value), tuple(value)
    if ann is type(None):
        return value is None, value
    if ann is bool:
        return isinstance(value, bool), value
    if ann is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if ann is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        return False, value
    return isinstance(value, ann), value


def validate_options(spec_name: str, declared: dict[str, Option], given: dict[str, Any]) -> dict[str, Any]:
    """Check ``given`` against ``declared`` and return the full option dict (defaults filled in).

    Every problem is collected and raised as one :class:`OptionError`.

    Example:
        >>> def build(info, *, groups: int = 32): ...
        >>> validate_options("gn", options_of(build), {"groups": 16})
        {'groups': 16}
    """
    problems = []
    resolved = {name: opt.default for name, opt in declared.items()}
    for name, value in given.items():
        opt = declared.get(name)
        if opt is None:
            known = ", ".join(sorted(declared)) or "none"
            problems.append(f"unknown option {name!r} for spec {spec_name!r} (its options: {known})."
                            f"{closest(name, declared)}")
            continue
        ok, value = _matches(value, opt.annotation)
        allowed = opt.range.check(value) if ok and opt.range is not None else None
        if not ok or allowed:
            problems.append(f"option {name!r} of spec {spec_name!r} must be {opt.type_name()}, got {value!r}")
            continue
        resolved[name] = value
    if problems:
        raise OptionError("; ".join(problems))
    return resolved


def parse_option_value(text: str) -> Any:
    """Parse a command-line ``key=value`` value, the one rule for spec options (``--set``) and recipe overrides:
    ``true``/``false``, ``none``/``null``, ints, floats (``1e-6`` included, which YAML 1.1 leaves a string),
    ``[...]`` and ``{...}`` as YAML flow collections whose items follow the same rule, a quoted string as it is,
    anything else as the string.

    Example:
        >>> parse_option_value("16"), parse_option_value("1e-6"), parse_option_value("true")
        (16, 1e-06, True)
        >>> parse_option_value("[1e-6, none, 'a']"), parse_option_value("'1e-6'")
        ([1e-06, None, 'a'], '1e-6')
    """
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    if text[:1] in "[{":
        import yaml

        try:
            return _typed(yaml.safe_load(text))
        except yaml.YAMLError:
            return text
    return _scalar(text)


def _scalar(text: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null", "~", ""):
        return None
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


def _typed(value: Any) -> Any:
    """A YAML collection with its plain-string items read by :func:`_scalar` (``[1e-6]`` holds a float)."""
    if isinstance(value, str):
        return _scalar(value)
    if isinstance(value, list):
        return [_typed(v) for v in value]
    if isinstance(value, dict):
        return {k: _typed(v) for k, v in value.items()}
    return value


def matches(value: Any, annotation: Any) -> bool:
    """Whether ``value`` fits a type annotation (``int``, ``float | None``, ``Literal[...]``, ``list[int]``...).

    Example:
        >>> matches("1e-6", float), matches(1e-6, float | None)
        (False, True)
    """
    return _matches(value, annotation)[0]
