"""The one reading every source norm is turned into, and the registry of adapters that produce it.

An adapter matches a norm class by its qualified name (so timm and transformers need not be imported)
and reads an instance into a :class:`NormInfo`: what it normalizes over, eps, affine tensors, running
statistics and any fused activation/drop. Classes are matched explicitly; a subclass of a known class
is read like its base only when it keeps the base's ``forward`` (otherwise its math is unknown and the
module is skipped with that reason).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import RegistrationError

KINDS = ("batch", "layer", "rms", "group", "instance")


@dataclass
class NormInfo:
    """What a source norm computes, read the same way for every class.

    ``kind`` is one of ``batch``, ``layer``, ``rms``, ``group``, ``instance``. ``channels_first`` says the
    norm runs over dim 1 of ``[N, C, *]`` (BatchNorm, GroupNorm, LayerNorm2d) rather than over the
    trailing ``normalized_shape`` dims (LayerNorm, RMSNorm). ``weight_offset`` is 1.0 for norms that
    scale by ``1 + weight`` (Gemma style).
    """

    kind: str
    num_features: int
    eps: float
    channels_first: bool
    normalized_shape: tuple[int, ...] = ()
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    running_mean: torch.Tensor | None = None
    running_var: torch.Tensor | None = None
    momentum: float | None = 0.1
    track_running_stats: bool = False
    frozen: bool = False
    spatial_dims: int | None = None
    num_groups: int | None = None
    weight_offset: float = 0.0
    variant: str = ""
    act: nn.Module | None = None
    drop: nn.Module | None = None
    adapter: str = ""
    identified: str = ""  # what probing found the module to compute (empty for modules a known adapter read)
    # set by graph analysis, not by adapters: the input is a global pool's output, one position per channel
    pooled: bool = False
    notes: list[str] = field(default_factory=list)

    def reference_tensor(self, module: nn.Module) -> torch.Tensor | None:
        """A tensor of the source module that gives the device and dtype a replacement should use."""
        for t in (self.weight, self.running_mean, self.bias):
            if t is not None:
                return t
        return next(iter(module.parameters(recurse=False)), next(iter(module.buffers(recurse=False)), None))


@dataclass(frozen=True)
class Adapter:
    """Reads instances of the named classes into :class:`NormInfo`."""

    name: str
    class_names: tuple[str, ...]
    read: Callable[[nn.Module], NormInfo]


class Unsupported(Exception):
    """Raised by a reader for a module it recognizes but cannot read; the message is the skip reason."""


_BY_CLASS: dict[str, Adapter] = {}
_PREDICATES: list[tuple[Callable[[nn.Module], bool], Adapter]] = []


def qualname(cls: type) -> str:
    """``module.QualName`` of a class, the key adapters are registered under."""
    return f"{cls.__module__}.{cls.__qualname__}"


def register_adapter(*class_names: str, name: str | None = None, predicate: Callable[[nn.Module], bool] | None = None):
    """Decorator registering a reader for classes given by qualified name (or by a predicate).

    Example:
        >>> @register_adapter("mypkg.layers.MyNorm")
        ... def read_my_norm(m):
        ...     return NormInfo(kind="layer", num_features=m.dim, eps=m.eps, channels_first=False,
        ...                     normalized_shape=(m.dim,), weight=m.scale)
    """
    if not class_names and predicate is None:
        raise RegistrationError("register_adapter needs at least one class name or a predicate")

    def deco(read: Callable[[nn.Module], NormInfo]) -> Callable[[nn.Module], NormInfo]:
        adapter = Adapter(name or read.__name__.removeprefix("read_"), tuple(class_names), read)
        for cls_name in class_names:
            _BY_CLASS[cls_name] = adapter
        if predicate is not None:
            _PREDICATES.append((predicate, adapter))
        return read

    return deco


def find_adapter(module: nn.Module) -> tuple[Adapter | None, str | None]:
    """The adapter for ``module`` and, when a norm-like module cannot be read, the reason.

    Exact class first; then the nearest known base class, accepted only when ``module`` keeps that
    base's ``forward``; then predicates (for families of generated classes such as HF RMSNorms).
    """
    cls = type(module)
    adapter = _BY_CLASS.get(qualname(cls))
    if adapter is not None:
        return adapter, None
    for base in cls.__mro__[1:]:
        adapter = _BY_CLASS.get(qualname(base))
        if adapter is None:
            continue
        if cls.forward is base.forward or getattr(cls, "_normswap_same_math", False):
            return adapter, None
        for predicate, pred_adapter in _PREDICATES:
            if predicate(module):
                return pred_adapter, None
        return None, (f"{cls.__name__} subclasses {base.__name__} but overrides forward; normswap does not "
                      f"know its math (register an adapter for {qualname(cls)!r} or exclude it)")
    for predicate, adapter in _PREDICATES:
        if predicate(module):
            return adapter, None
    return None, None


def read_norm(module: nn.Module) -> tuple[NormInfo | None, str | None]:
    """Read ``module`` into a :class:`NormInfo`; returns ``(None, reason)`` for unreadable norms and
    ``(None, None)`` for modules that are not norms.

    Example:
        >>> info, _ = read_norm(nn.BatchNorm2d(8))
        >>> info.kind, info.num_features
        ('batch', 8)
    """
    from ..norms.act import ActDropMixin

    if isinstance(module, ActDropMixin):
        # a replacement normswap gave a fused act: read it as its norm class, plus the act
        base_cls = next(c for c in type(module).__mro__[1:] if not issubclass(c, ActDropMixin))
        adapter = _BY_CLASS.get(qualname(base_cls))
        reason = None if adapter is not None else f"{type(module).__name__}: no adapter for {base_cls.__name__}"
    else:
        adapter, reason = find_adapter(module)
    if adapter is None:
        return _probe(module, reason)
    try:
        info = adapter.read(module)
    except Unsupported as exc:
        return _probe(module, str(exc))
    info.adapter = adapter.name
    if isinstance(module, ActDropMixin):
        info.act, info.drop = module.act, module.drop
    return info, None


def _probe(module: nn.Module, reason: str | None) -> tuple[NormInfo | None, str | None]:
    """No adapter read ``module`` (``reason`` says why, when it is a norm normswap knows of): identify it by
    what it computes, when it looks like a norm."""
    from .probe import NotANorm, Unidentified, identify, looks_like_norm, name_family, probed_info

    try:
        if reason is None and not looks_like_norm(module):
            return None, None
        info = probed_info(module, identify(module))
    except NotANorm:
        return None, reason
    except Exception as exc:  # noqa: BLE001 - user code broke the probe itself (lazy parameters, odd state)
        if reason is None and name_family(type(module)) is None:
            return None, None
        exc = Unidentified(f"probing it failed ({type(exc).__name__}: {str(exc)[:150]})")
        return _unidentified(module, reason, exc)
    except Unidentified as exc:
        return _unidentified(module, reason, exc)
    info.adapter = "probe"
    return info, None


def _unidentified(module: nn.Module, reason: str | None, exc: Exception) -> tuple[None, str | None]:
    from .probe import calls_norm_function

    if reason is None and calls_norm_function(type(module)):
        return None, None  # not a norm to replace whole: its functional norm calls are found and rewritten
    if reason is not None:
        return None, f"{reason}; probing did not identify it either: {exc}"
    cls = type(module)
    return None, (f"{cls.__name__} looks like a norm, but {exc}; register an adapter for {qualname(cls)!r} "
                  "or exclude it")


def norm_family(module: nn.Module) -> str | None:
    """The family (``"batch"``, ``"layer"``, ...) of a norm :func:`read_norm` could not read: its known base
    class's, else the one its class name announces; ``None`` when nothing says.

    Example:
        >>> class GatedRMSNorm(nn.Module):
        ...     def forward(self, x, gate): return x
        >>> norm_family(GatedRMSNorm())
        'rms'
    """
    from .probe import name_family

    for base in type(module).__mro__:
        adapter = _BY_CLASS.get(qualname(base))
        if adapter is not None:
            try:
                return adapter.read(module).kind
            except Exception:  # noqa: BLE001 - the base's reader does not fit this subclass; fall back to the name
                break
    return name_family(type(module))
