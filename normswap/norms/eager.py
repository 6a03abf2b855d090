"""When a norm layer's call may skip its ``torch.library`` operator, and whether autograd must see the call.

The norms' operators (``normswap::rms_norm_rows``, ``normswap::channel_layer_norm``, ``normswap::group_norm``,
...) are what ``torch.compile``, ``torch.export``, ``torch.jit.trace`` and tensor subclasses see. A call through
an operator's dispatch costs tens of microseconds on a CPU, as much as the norm itself on a small input; in
plain eager mode the layers run the operator's body directly instead:

* through an ``autograd.Function`` (about 10 us) when autograd must record the call (:func:`differentiable`);
* as a bare function call when it need not (``no_grad``, ``inference_mode``, or nothing wants a gradient).

``torch.func`` transforms (``grad``, ``vmap``, ``jacrev``: per-sample gradients with ``functional_call``) wrap
tensors in ones without a data pointer, which neither a fused kernel nor the operators' generated
``autograd.Function`` accepts, and forward-mode AD needs a derivative the fused kernels lack; there each layer
runs a form that has them (:func:`route` says ``"transform"``).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd import forward_ad

from .native import has_data

__all__ = ["differentiable", "route", "untraced"]


def untraced(x: Tensor) -> bool:
    """Whether a norm's call on ``x`` may skip the operator's dispatch: a plain tensor off the meta device, no
    ``torch.compile`` / ``torch.export`` / ``torch.jit.trace`` tracing the call, no ``__torch_function__``
    override or mode. Those see the operator (meta tensors its fake kernel). A ``torch.func`` transform's
    tensors pass (their type is ``Tensor``) but have no data pointer (see :func:`route`).

    Example:
        >>> untraced(torch.ones(2)), untraced(torch.ones(2, device="meta"))
        (True, False)
    """
    return (type(x) is Tensor and not x.is_meta and not torch.compiler.is_compiling() and not torch.jit.is_tracing()
            and not torch.overrides.has_torch_function((x,)))


def differentiable(*tensors: Tensor | None) -> bool:
    """Whether autograd must record a call on ``tensors``: grad mode on and one of them requiring a gradient.

    Example:
        >>> w = torch.ones(2, requires_grad=True)
        >>> differentiable(torch.ones(2), w), differentiable(torch.ones(2), None)
        (True, False)
        >>> with torch.no_grad():
        ...     differentiable(torch.ones(2), w)
        False
    """
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def route(x: Tensor, *params: Tensor | None) -> str:
    """Which way a norm's call on ``x`` (and its ``params``) goes:

    * ``"operator"``: traced, compiled, exported, a tensor subclass or the meta device (:func:`untraced` fails);
    * ``"transform"``: a ``torch.func`` transform's wrapper among them (no data pointer), or a forward-mode
      tangent (``torch.autograd.forward_ad``): a form with a forward-mode derivative;
    * ``"function"``: plain tensors, and autograd must see the call (:func:`differentiable`);
    * ``"forward"``: plain tensors, and it need not (inference).

    Example:
        >>> route(torch.ones(2), torch.ones(2, requires_grad=True)), route(torch.ones(2), None)
        ('function', 'forward')
        >>> torch.func.grad(lambda x: x.sum() * (2.0 if route(x) == "transform" else 1.0))(torch.ones(2))
        tensor([2., 2.])
    """
    if not untraced(x):
        return "operator"
    tensors = (x, *params)
    if not all(t is None or has_data(t) for t in tensors) or any(_has_tangent(t) for t in tensors):
        return "transform"
    return "function" if differentiable(*tensors) else "forward"


def _has_tangent(t: Tensor | None) -> bool:
    return t is not None and forward_ad.unpack_dual(t).tangent is not None
