"""Example inputs for a model and running it on them: random inputs of the right kind (token ids for an HF
text model, pixels otherwise), the main tensor of any output, how far two outputs are apart and how far
rounding alone moves them. ``validate`` and ``convert(..., exact=True)`` both use them."""

from __future__ import annotations

from typing import Any

import contextlib
import contextvars
import copy
import math
from collections.abc import Callable, Iterator

import torch
from torch import nn

from .errors import OptionError


def example_inputs(model: nn.Module, *, batch: int = 2, image_size: int | None = None, seq_len: int = 16,
                   seed: int = 0) -> Any:
    """Random inputs of the right kind for ``model``: token ids for an HF text model, pixels otherwise
    (the size timm's ``pretrained_cfg`` or the HF config gives, unless ``image_size`` is set).

    Example:
        >>> example_inputs(nn.Conv2d(3, 4, 3), image_size=32).shape
        torch.Size([2, 3, 32, 32])
    """
    g = torch.Generator().manual_seed(seed)
    config = getattr(model, "config", None)
    if getattr(model, "main_input_name", "") == "input_ids":
        vocab = int(getattr(config, "vocab_size", 100))
        ids = torch.randint(min(vocab, 1000), (batch, seq_len), generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if image_size is None:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        size = cfg.get("input_size") or (3, getattr(config, "image_size", 224), getattr(config, "image_size", 224))
        chans, h, w = size
        h = h if isinstance(h, int) else h[0]
        w = w if isinstance(w, int) else w[-1]
        fixed = _built_image_size(model) if config is None else None
        if fixed is not None:  # a timm model built with img_size= keeps its registered pretrained_cfg
            h, w = fixed
    else:
        chans, h, w = 3, image_size, image_size
    chans = getattr(config, "num_channels", chans)
    return torch.randn(batch, chans, h, w, generator=g)


def _built_image_size(model: nn.Module) -> tuple[int, int] | None:
    """The input size a patch embedding was built for (timm's ``PatchEmbed.img_size``), if it has one."""
    for module in model.modules():
        size = getattr(module, "img_size", None)
        if isinstance(size, int):
            return size, size
        if isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(v, int) for v in size):
            return int(size[0]), int(size[1])
    return None


Inputs = tuple[tuple[Any, ...], dict[str, Any]]


def tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance for outputs computed in ``dtype``: 64 units in the last place, at least 1e-5."""
    return max(1e-5, 64 * torch.finfo(dtype).eps)


def split_inputs(example_inputs: Any) -> Inputs:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise OptionError("example_inputs must be a tensor, a tuple of tensors, or a dict of keyword tensors, "
                      f"got {type(example_inputs).__name__}")


def map_inputs(inputs: Inputs, fn: Callable[[torch.Tensor], torch.Tensor]) -> Inputs:
    args, kwargs = inputs
    f = lambda v: fn(v) if isinstance(v, torch.Tensor) else v  # noqa: E731
    return tuple(f(a) for a in args), {k: f(v) for k, v in kwargs.items()}


OUTPUT_FIELD: contextvars.ContextVar[str | None] = contextvars.ContextVar("normswap_output_field", default=None)


def output_tensor(out: Any, field: str | None = None) -> torch.Tensor:
    """The main tensor of a model output: itself, the named ``field``, ``logits``, ``last_hidden_state``
    or the first tensor."""
    if isinstance(out, torch.Tensor):
        return out
    if field is not None:
        value = out.get(field) if isinstance(out, dict) else getattr(out, field, None)
        if not isinstance(value, torch.Tensor):
            raise OptionError(f"the model's output ({type(out).__name__}) has no tensor {field!r}")
        return value
    for name in ("logits", "last_hidden_state", "pooler_output"):
        value = getattr(out, name, None)
        if isinstance(value, torch.Tensor):
            return value
    found = _first_tensor(out)
    if found is None:
        raise OptionError(f"the model's output ({type(out).__name__}) holds no tensor to check")
    return found


def _first_tensor(out: Any, depth: int = 0) -> torch.Tensor | None:
    """The first tensor in ``out``, looking into dicts, tuples and lists (a backbone's ``feature_maps``)."""
    if isinstance(out, torch.Tensor):
        return out
    values = out.values() if isinstance(out, dict) else out if isinstance(out, (tuple, list)) else ()
    for v in values:
        found = _first_tensor(v, depth + 1) if depth < 4 else None
        if found is not None:
            return found
    return None


def run(model: nn.Module, inputs: Inputs) -> torch.Tensor:
    """The main tensor of ``model``'s output on ``inputs`` (``(args, kwargs)``)."""
    args, kwargs = inputs
    return output_tensor(model(*args, **kwargs), OUTPUT_FIELD.get())


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a - b| / max |b|`` (infinite when the shapes differ), computed in float64 so that float64
    outputs keep their precision."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if a.shape != b.shape:
        return math.inf
    scale = max(float(b.abs().max()), 1e-300) if b.numel() else 1.0
    return float((a - b).abs().max()) / scale if a.numel() else 0.0


def noise_floor(model: nn.Module, inputs: Inputs, ref: torch.Tensor, dtype: torch.dtype) -> float:
    """How far the output moves when every weight moves by a few units in the last place of ``dtype``:
    the conditioning of this model on these inputs (train-mode BatchNorm over two values amplifies a lot)."""
    noisy = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in noisy.parameters():
            if p.is_floating_point():
                noise = torch.randn(p.shape, generator=g).to(p.device, p.dtype)
                p.mul_(1 + 4 * torch.finfo(dtype).eps * noise)
        out, error = _try(lambda: run(noisy, inputs))
    return 0.0 if error else rel_diff(out, ref)


def _try(fn: Callable[[], Any]) -> tuple[Any, str]:
    try:
        return fn(), ""
    except Exception as exc:  # a model that cannot run perturbed has no measurable floor
        return None, f"{type(exc).__name__}: {exc}"


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode for the block; every module's own mode is put back after.

    Example:
        >>> net = nn.Sequential(nn.Dropout()).train()
        >>> with eval_mode(net):
        ...     net.training
        False
        >>> net.training
        True
    """
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes.items():
            m.training = mode
