"""When a norm layer's call may skip its ``torch.library`` operator, and whether autograd must see the call.

The norms' operators (``normswap::rms_norm_rows``, ``normswap::channel_layer_norm``, ``normswap::group_norm``,
...) are what ``torch.compile``, ``torch.export``, ``torch.jit.trace`` and tensor subclasses see. A call through
an operator's dispatch costs tens of microseconds on a CPU, as much as the norm itself on a small input; in
plain eager mode the layers run the operator's body directly instead:

* through an ``autograd.Function`` (about 10 us) when autograd must record the call (:func:`differentiable`);
* as a bare function call when it need not (``no_grad``, ``inference_mode``, or nothing wants a gradient).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd import forward_ad

from .native import has_data

__all__ = ["differentiable", "plain", "untraced"]


def untraced(x: Tensor) -> bool:
    """Whether a norm's call on ``x`` may skip the operator's dispatch: a plain tensor off the meta device, no
    ``torch.compile`` / ``torch.export`` / ``torch.jit.trace`` tracing the call, no ``__torch_function__``
    override or mode. Those see the operator (meta tensors its fake kernel). A ``torch.func`` transform's
    tensors pass (their type is ``Tensor``) but have no data pointer (see :func:`plain`).

    Example:
        >>> untraced(torch.ones(2)), untraced(torch.ones(2, device="meta"))
        (True, False)
    """
    return (type(x) is Tensor and not x.is_meta and not torch.compiler.is_compiling() and not torch.jit.is_tracing()
            and not torch.overrides.has_torch_function((x,)))


def plain(x: Tensor, *params: Tensor | None) -> bool:
    """:func:`untraced` for ``x``, and ``x`` and every parameter given has a data pointer (a ``torch.func``
    transform's wrappers have none: the operator, or a Function made for the transforms, handles those).

    Example:
        >>> plain(torch.ones(2), None, torch.ones(2))
        True
    """
    return untraced(x) and all(t is None or has_data(t) for t in (x, *params))


def differentiable(*tensors: Tensor | None) -> bool:
    """Whether autograd must see a call on ``tensors``: grad mode on and one of them requiring a gradient, or one
    of them carrying a forward-mode tangent (``torch.autograd.forward_ad``).

    Example:
        >>> w = torch.ones(2, requires_grad=True)
        >>> differentiable(torch.ones(2), w), differentiable(torch.ones(2), None)
        (True, False)
        >>> with torch.no_grad():
        ...     differentiable(torch.ones(2), w)
        False
    """
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return True
    return any(t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors)
