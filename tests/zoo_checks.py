"""Checks run on every converted model of the zoo tests (timm and HF)."""

from __future__ import annotations

import torch
from torch import nn


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict) or hasattr(out, "values"):
        for v in out.values():
            t = _first_tensor(v)
            if t is not None:
                return t
    if isinstance(out, (tuple, list)):
        for v in out:
            t = _first_tensor(v)
            if t is not None:
                return t
    return None


def _float_sum(out) -> torch.Tensor:
    t = _first_tensor(out)
    assert t is not None, "model returned no tensor"
    return t.float().sum()


def run(model: nn.Module, inputs: dict, output: str | None = None) -> torch.Tensor:
    out = model(**inputs)
    return out[output] if output else _first_tensor(out)


def check_forward_backward(model: nn.Module, inputs: dict, train: bool) -> None:
    """Forward and backward are finite; every parameter that gets a gradient gets a finite one."""
    model.train(train)
    model.zero_grad(set_to_none=True)
    out = run(model, inputs)
    assert torch.isfinite(out).all(), f"non-finite output in {'train' if train else 'eval'} mode"
    out.float().square().mean().backward()
    grads = [(n, p.grad) for n, p in model.named_parameters() if p.grad is not None]
    assert grads, "no parameter received a gradient"
    bad = [n for n, g in grads if not torch.isfinite(g).all()]
    assert not bad, f"non-finite gradients in {bad[:5]}"


def check_batch_independence(model: nn.Module, inputs: dict, batch_key: str, other: torch.Tensor,
                             output: str | None = None) -> None:
    """In train mode, sample 0's output does not depend on its batch mates."""
    model.train()
    a = dict(inputs)
    b = dict(inputs)
    b[batch_key] = torch.cat([inputs[batch_key][:1], other[1:]], 0)
    with torch.no_grad():
        torch.manual_seed(1)
        out_a = run(model, a, output)[:1]
        torch.manual_seed(1)
        out_b = run(model, b, output)[:1]
    scale = out_a.abs().max().clamp_min(1e-3)
    diff = (out_a - out_b).abs().max() / scale
    assert diff < 1e-4, f"sample 0 changed by {diff:.2e} (relative) when its batch mates changed"
