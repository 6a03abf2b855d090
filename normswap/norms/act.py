"""Keep a fused activation and drop on a replacement norm without changing its state-dict keys.

timm's norm-act layers (``BatchNormAct2d``, ``LayerNormAct`` ...) apply ``drop`` then ``act`` after the
norm. A naive swap to ``nn.GroupNorm`` silently drops both. :func:`attach_act` gives any replacement the
same behaviour by switching it to a subclass whose ``forward`` runs the norm's own ``forward`` and then
``drop`` and ``act``; the submodules are named ``drop`` and ``act`` as in timm, so keys such as
``bn1.act.weight`` (a PReLU) stay what they were.
"""

from __future__ import annotations

import types
from collections.abc import Callable

import torch
from torch import nn

_ACT_CLASSES: dict[type, type] = {}


class ActDropMixin:
    """Runs the wrapped norm, then ``self.drop`` and ``self.act`` (timm's order).

    The norm's own ``forward`` is held as ``_norm_forward`` by :func:`act_class` (TorchScript compiles no
    ``super()`` call; it compiles this method under that name)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(self._norm_forward(x)))  # type: ignore[attr-defined]

    def __reduce_ex__(self, protocol):
        # the class is made at run time, so pickle (torch.save of a whole model, deepcopy) names the norm class
        # it was made from, and a fresh process makes it again
        return _instance, (self._norm_class,), self.__dict__  # type: ignore[attr-defined]


def _instance(norm_cls: type[nn.Module]) -> nn.Module:
    """An empty instance of ``act_class(norm_cls)``, which unpickling then fills with the saved state."""
    cls = act_class(norm_cls)
    return cls.__new__(cls)


def _renamed(forward: Callable) -> Callable:
    """``forward`` as a function named ``_norm_forward`` (TorchScript compiles a method called on ``self``
    under its function's ``__name__``, and a second ``forward`` would clash)."""
    fn = types.FunctionType(forward.__code__, forward.__globals__, "_norm_forward", forward.__defaults__,
                            forward.__closure__)
    fn.__kwdefaults__, fn.__annotations__ = forward.__kwdefaults__, dict(forward.__annotations__)
    fn.__module__, fn.__qualname__ = forward.__module__, forward.__qualname__.rsplit(".", 1)[0] + "._norm_forward"
    return fn


def act_class(norm_cls: type[nn.Module]) -> type[nn.Module]:
    """Return the cached subclass of ``norm_cls`` that applies ``drop`` and ``act`` after the norm.

    Example:
        >>> from torch import nn
        >>> act_class(nn.GroupNorm).__name__
        'GroupNormAct'
    """
    if issubclass(norm_cls, ActDropMixin):
        return norm_cls
    cls = _ACT_CLASSES.get(norm_cls)
    if cls is None:
        name = f"{norm_cls.__name__}Act"
        body = {"__module__": __name__, "__qualname__": name, "_norm_forward": _renamed(norm_cls.forward),
                "_norm_class": norm_cls}
        cls = type(name, (ActDropMixin, norm_cls), body)
        _ACT_CLASSES[norm_cls] = cls
    return cls


def attach_act(norm: nn.Module, act: nn.Module | None, drop: nn.Module | None) -> nn.Module:
    """Give ``norm`` a fused ``drop`` and ``act``, in place; a no-op when both are ``None``.

    Example:
        >>> from torch import nn
        >>> gn = attach_act(nn.GroupNorm(2, 4), nn.ReLU(), None)
        >>> bool((gn(torch.randn(2, 4, 3, 3)) >= 0).all())
        True
    """
    if act is None and drop is None:
        return norm
    norm.__class__ = act_class(type(norm))
    norm.drop = drop if drop is not None else nn.Identity()
    norm.act = act if act is not None else nn.Identity()
    return norm
