"""What happens between ``loss.backward()`` and ``optimizer.step()``: one object for every training loop.

:class:`RegularizedStep` adds the orthogonal penalty's gradient, clips, and reports; the plain-loop helper,
the HF ``TrainerCallback`` (:mod:`normswap.regularizers.hf`) and the Lightning ``Callback``
(:mod:`normswap.regularizers.lightning`) all call it, so every integration does exactly the same thing.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..errors import OptionError, closest
from .clipping import clip_gradients, grad_norm
from .orthogonal import OrthogonalRegularizer

__all__ = ["RegularizedStep"]

_CLIP_KEYS = [n for n in inspect.signature(clip_gradients).parameters if n != "model_or_params"]


class RegularizedStep:
    """Orthogonal gradient, then clipping, after each backward pass; returns numbers to log.

    Args:
        model: the model being trained.
        orthogonal: an :class:`OrthogonalRegularizer` of ``model`` (its :meth:`~OrthogonalRegularizer.apply_`
            runs here), or ``None``.
        clip: keyword arguments of :func:`clip_gradients`, e.g. ``{"mode": "agc", "clip_factor": 0.01}``,
            or ``None`` to only measure the gradient norm.

    With mixed precision and a ``GradScaler``, call ``scaler.unscale_(optimizer)`` before this step.

    Example:
        >>> model = nn.Linear(4, 2)
        >>> step = RegularizedStep(model, OrthogonalRegularizer(model, 1e-3), clip={"mode": "norm", "max_norm": 1.0})
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> model(torch.randn(8, 4)).pow(2).mean().backward()
        >>> sorted(step())
        ['grad_norm', 'orthogonal_penalty', 'skipped']
        >>> opt.step()
    """

    def __init__(self, model: nn.Module, orthogonal: OrthogonalRegularizer | None = None,
                 clip: Mapping[str, Any] | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise OptionError(f"RegularizedStep: model must be a torch.nn.Module, got {type(model).__name__}.")
        if orthogonal is not None:
            if not isinstance(orthogonal, OrthogonalRegularizer):
                raise OptionError("RegularizedStep: orthogonal= takes an OrthogonalRegularizer, "
                                  f"got {type(orthogonal).__name__}.")
            if orthogonal.model is not model:
                raise OptionError("RegularizedStep: the OrthogonalRegularizer was built for another model.")
        clip = dict(clip or {})
        unknown = [k for k in clip if k not in _CLIP_KEYS]
        if unknown:
            hint = closest(unknown[0], _CLIP_KEYS)
            raise OptionError(f"RegularizedStep: unknown clip option(s) {unknown}; clip_gradients takes "
                              f"{_CLIP_KEYS}.{hint}")
        self.model = model
        self.orthogonal = orthogonal
        self.clip = clip
        if clip:  # every bad value reported now, not at the first step
            clip_gradients([], **clip)

    def __call__(self) -> dict[str, float | bool]:
        """Run after ``backward()``: returns ``grad_norm`` (before clipping), ``orthogonal_penalty`` (``nan``
        on a step the regularizer skips) and ``skipped`` (gradients were non-finite and dropped)."""
        penalty = self.orthogonal.apply_() if self.orthogonal is not None else None
        total = clip_gradients(self.model, **self.clip) if self.clip else grad_norm(self.model)
        finite = bool(torch.isfinite(total))
        return {
            "grad_norm": float(total),
            "orthogonal_penalty": float("nan") if penalty is None else float(penalty),
            "skipped": not finite and bool(self.clip.get("skip_nonfinite", False)),
        }
