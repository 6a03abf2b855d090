"""What the norms' ``torch.library`` operators share about gradients (:func:`~normswap.norms.row_norm.define_row_op`,
``normswap::channel_layer_norm``, ``normswap::group_norm``): each backward operator takes ``need_x``,
``need_weight``, ``need_bias`` and returns three tensors, an empty one for each gradient not asked for
(operators return tensors, never ``None``); autograd then wants ``None`` in those places. Where autograd records
the backward itself (:func:`recorded_grads`), the gradients come from the norm's torch-ops formula instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor


def fake_grads(x: Tensor, weight: Tensor | None, bias: Tensor | None, need_x: bool, need_weight: bool,
               need_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The fake (meta) result of a norm's backward operator: a tensor like each gradient asked for, an empty
    one (each its own: outputs of an operator must not alias) for each not asked for or without a parameter.

    Example:
        >>> [tuple(g.shape) for g in fake_grads(torch.ones(2, 3), torch.ones(3), None, True, False, True)]
        [(2, 3), (0,), (0,)]
    """
    return (torch.empty_like(x) if need_x else x.new_empty(0),
            torch.empty_like(weight) if need_weight and weight is not None else x.new_empty(0),
            torch.empty_like(bias) if need_bias and bias is not None else x.new_empty(0))


def autograd_grads(need: tuple[bool, ...], weight: Tensor | None, bias: Tensor | None, gx: Tensor | None,
                   gw: Tensor | None, gb: Tensor | None, others: int) -> tuple[Tensor | None, ...]:
    """What a norm's autograd backward returns for ``(x, weight, bias, *others)`` from its backward operator's
    three tensors: ``None`` for a gradient not asked for, a missing parameter, and each of the ``others``
    (non-tensor arguments such as ``eps``).

    Example:
        >>> g = torch.ones(3)
        >>> autograd_grads((True, True, False), g, None, g, g, g, 1)[1:]
        (tensor([1., 1., 1.]), None, None)
    """
    return (gx if need[0] else None, gw if need[1] and weight is not None else None,
            gb if need[2] and bias is not None else None) + (None,) * others


def recorded_grads(formula: Callable[..., Tensor], tensors: Sequence[Tensor | None], gy: Tensor,
                   need: Sequence[bool]) -> tuple[Tensor | None, ...]:
    """The gradients of ``formula(*tensors)`` (the norm in torch ops) against ``gy``, for each tensor ``need``
    asks for (``None`` elsewhere), computed so that autograd records them: what a norm's backward returns
    when its own gradient will be differentiated (``create_graph=True``: gradient penalties, MAML, Hessians;
    forward-over-reverse under ``torch.func``). The fused kernels' gradients are opaque to autograd there: a
    further backward would miss every term through the norm.

    Example:
        >>> x = torch.randn(3, requires_grad=True)
        >>> (g,) = recorded_grads(lambda t: t.pow(2), (x,), torch.ones(3), (True,))
        >>> bool(torch.allclose(torch.autograd.grad(g.sum(), x)[0], torch.full((3,), 2.0)))
        True
    """
    wanted = [i for i, (t, n) in enumerate(zip(tensors, need)) if n and t is not None]
    grads: list[Tensor | None] = [None] * len(tensors)
    if not wanted:
        return tuple(grads)

    def partial(*chosen: Tensor) -> Tensor:
        args = list(tensors)
        for i, t in zip(wanted, chosen):
            args[i] = t
        return formula(*args)

    with torch.enable_grad():
        _, pullback = torch.func.vjp(partial, *(tensors[i] for i in wanted))
        for i, g in zip(wanted, pullback(gy)):
            grads[i] = g
    return tuple(grads)


def norm_grads(need: Sequence[bool], formula: Callable[..., Tensor], x: Tensor, weight: Tensor | None,
               bias: Tensor | None, gy: Tensor, fused: Callable[[], tuple[Tensor, Tensor, Tensor]], others: int,
               recorded: bool = False) -> tuple[Tensor | None, ...]:
    """What a norm's autograd backward returns for ``(x, weight, bias, *others)``: the gradients of its torch-ops
    ``formula`` (:func:`recorded_grads`) when autograd records the backward (grad mode on inside it:
    ``create_graph=True``) or ``recorded`` asks for them, else the three tensors of its fused backward
    ``fused()`` (:func:`autograd_grads`).

    Example:
        >>> x, w = torch.ones(2), torch.full((2,), 3.0)
        >>> fused = lambda: (w.clone(), x.clone(), x.new_empty(0))
        >>> norm_grads((True, True, False), lambda x, w, b: x * w, x, w, None, torch.ones(2), fused, 1)
        (tensor([3., 3.]), tensor([1., 1.]), None, None)
    """
    if recorded or torch.is_grad_enabled():
        return recorded_grads(formula, (x, weight, bias), gy, need) + (None,) * others
    return autograd_grads(tuple(need), weight, bias, *fused(), others)
