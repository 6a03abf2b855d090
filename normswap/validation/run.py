"""The entry point that runs the checks of ``checks.py`` in order."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..core.state import conversions_of
from ..errors import OptionError, closest
from ..inputs import OUTPUT_FIELD, map_inputs, split_inputs
from .registry import Context, registered
from .report import ValidationReport


def validate(original: nn.Module, converted: nn.Module, example_inputs: Any, *,
             checks: Sequence[str] | None = None, skip: Sequence[str] = (), device: str | torch.device = "cpu",
             autocast_dtypes: Sequence[torch.dtype] = (torch.bfloat16, torch.float16),
             output: str | None = None) -> ValidationReport:
    """Check a converted model against its original; returns a :class:`ValidationReport` (``.passed``).

    Checks (``checks=`` picks some, ``skip=`` leaves some out): forward/backward finite in train and eval
    mode; every trainable parameter gets a gradient; outputs equal the original's where the spec preserves
    computation (otherwise the difference is reported); a sample's train-mode output does not depend on its
    batch (GroupNorm family); bf16/fp16 autocast finite and close to fp32; ``torch.compile`` equals eager;
    channels_last equals contiguous (conv nets); on ``device="cuda"`` all of it on the GPU plus CPU vs GPU
    agreement. ``example_inputs``: a tensor, a tuple of tensors, or a dict of keyword tensors (batch >= 2).
    ``output`` names the output field to check (default: the tensor itself, ``logits``,
    ``last_hidden_state``, or the first tensor), e.g. ``"text_embeds"`` for CLIP, whose logits mix samples.

    Example:
        >>> report = validate(model, normswap.convert(model, "gn_ws"), torch.randn(2, 3, 224, 224))  # doctest: +SKIP
        >>> print(report)  # doctest: +SKIP
    """
    if not isinstance(original, nn.Module) or not isinstance(converted, nn.Module):
        raise OptionError("validate(original, converted, example_inputs): both models must be torch.nn.Module")
    known = registered()
    wanted = list(checks) if checks is not None else list(known)
    for name in [*wanted, *skip]:
        if name not in known:
            raise OptionError(f"unknown check {name!r}; the checks are {', '.join(known)}.{closest(name, known)}")
    wanted = [c for c in known if c in wanted and c not in skip]
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise OptionError("device='cuda' but CUDA is not available here; validate on the CPU (device='cpu')")
    token = OUTPUT_FIELD.set(output)
    try:
        history = conversions_of(converted)
        spec = "+".join(h["spec"] for h in history) or "(no recorded conversion)"
        report = ValidationReport(type(converted).__name__, spec, str(dev))
        conv = _on(converted, dev)
        ctx = Context(report, _on(original, dev), conv, map_inputs(split_inputs(example_inputs), lambda t: t.to(dev)),
                      next((p.dtype for p in conv.parameters() if p.is_floating_point()), torch.float32), dev,
                      tuple(autocast_dtypes), converted)
        for name in wanted:
            known[name](ctx)
        return report
    finally:
        OUTPUT_FIELD.reset(token)  # the caller's context is left as it was


def _on(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` on ``device``: itself when already there, else a copy (the caller's model never moves)."""
    param = next(iter(model.parameters()), None)
    if param is None or param.device == device:
        return model
    return copy.deepcopy(model).to(device)
