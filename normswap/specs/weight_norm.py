"""Spec ``wn``: weight normalization of convs and linears (Salimans & Kingma, 2016), and its removal.

``w = g * v / ||v||``, the norm taken per output unit. It uses torch's parametrization
(``torch.nn.utils.parametrizations.weight_norm``), so the layer keeps its class's behaviour and methods;
its ``weight`` becomes ``parametrizations.weight.original0`` (g) and ``original1`` (v) in the state dict.
A converted layer loads all three checkpoint forms: the new keys; the old ``weight_g`` / ``weight_v`` of
``torch.nn.utils.weight_norm`` (torch's own hook maps them); and a plain ``weight`` from a checkpoint of the
original model (split into g and v on load, so it computes the same weight).
:func:`remove_weight_norm` folds g and v back into a plain ``weight``.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm as _torch_weight_norm
from torch.nn.utils.weight_norm import WeightNorm as _LegacyWeightNorm

from ..errors import NormSwapError
from .base import WeightTransform, register_spec

__all__ = ["output_dim", "remove_weight_norm", "share_weight_parametrization"]


def output_dim(layer: nn.Module) -> int:
    """The dim of the weight that indexes output units: 1 for transposed convs and HF's ``Conv1D``."""
    if isinstance(layer, nn.modules.conv._ConvTransposeNd) or type(layer).__name__ == "Conv1D":
        return 1
    return 0


def _has_weight_norm(layer: nn.Module) -> bool:
    if parametrize.is_parametrized(layer, "weight"):
        return any(type(p).__name__ == "_WeightNorm" for p in layer.parametrizations["weight"])
    return hasattr(layer, "weight_g") and hasattr(layer, "weight_v")


def _skip_reason(layer: nn.Module) -> str | None:
    if _has_weight_norm(layer):
        return "already weight-normalized"
    if parametrize.is_parametrized(layer, "weight"):
        return "its weight already has another parametrization"
    if isinstance(layer.weight, nn.parameter.UninitializedParameter):
        return "lazy layer not initialized yet: run one forward pass first"
    return None


def _plain_weight_hook(dim: int):
    """A load_state_dict pre-hook: a plain ``weight`` (checkpoint of the original model) becomes g and v."""

    def hook(layer, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs) -> None:
        key, g_key = f"{prefix}weight", f"{prefix}parametrizations.weight.original0"
        if key in state_dict and g_key not in state_dict and parametrize.is_parametrized(layer, "weight"):
            weight = state_dict.pop(key)
            state_dict[g_key] = torch.norm_except_dim(weight, 2, dim)  # as torch's _WeightNorm.right_inverse
            state_dict[f"{prefix}parametrizations.weight.original1"] = weight

    hook._normswap_plain_weight = True
    return hook


@register_spec(
    "wn",
    sources=(),
    weights=WeightTransform("WeightNorm", _skip_reason),
    description="weight normalization (g * v / ||v||) on every conv and linear",
    preserves="yes (g and v start from the weight)",
    changed_keys="weight -> parametrizations.weight.original0 (g) / original1 (v); old and plain keys load",
)
def wn(layer: nn.Module, *, dim: int | None = None) -> None:
    """Weight-normalize ``layer`` in place; ``dim=None`` normalizes per output unit (see ``output_dim``)."""
    d = output_dim(layer) if dim is None else dim
    _torch_weight_norm(layer, "weight", dim=d)
    layer._register_load_state_dict_pre_hook(_plain_weight_hook(d), with_module=True)


def share_weight_parametrization(layer: nn.Module, leader: nn.Module) -> None:
    """Give ``layer``, whose ``weight`` is tied to ``leader``'s, ``leader``'s weight parametrization itself:
    one set of original tensors (g and v for ``wn``), so the weights stay tied through training and saving.

    Example:
        >>> a, b = nn.Linear(4, 4), nn.Linear(4, 4)
        >>> b.weight = a.weight
        >>> wn(a); share_weight_parametrization(b, a)
        >>> a.parametrizations.weight.original0 is b.parametrizations.weight.original0
        True
    """
    parametrize.register_parametrization(layer, "weight", nn.Identity(), unsafe=True)
    layer.parametrizations["weight"] = leader.parametrizations["weight"]
    for hook in leader._load_state_dict_pre_hooks.values():
        if getattr(hook.hook, "_normswap_plain_weight", False):
            layer._register_load_state_dict_pre_hook(hook.hook, with_module=True)


def remove_weight_norm(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Fold weight normalization back into plain ``weight`` parameters (the ``wn`` spec's undo).

    Handles torch's parametrization (what ``wn`` applies) and the older ``torch.nn.utils.weight_norm``.
    The model computes the same outputs afterwards; ``inplace=False`` (default) works on a deep copy.

    Example:
        >>> import normswap
        >>> model = normswap.convert(nn.Sequential(nn.Linear(4, 4)), "wn")
        >>> sorted(remove_weight_norm(model).state_dict())
        ['0.bias', '0.weight']
    """
    if not isinstance(model, nn.Module):
        raise NormSwapError(f"remove_weight_norm: expected a torch.nn.Module, got {type(model).__name__}.")
    target = model if inplace else _copy(model)
    folded: dict[int, nn.Parameter] = {}  # one plain weight per parametrization: layers that shared one stay tied
    for path, layer in target.named_modules():
        if parametrize.is_parametrized(layer, "weight") and _has_weight_norm(layer):
            if len(layer.parametrizations["weight"]) > 1 or len(layer.parametrizations) > 1:
                raise NormSwapError(f"remove_weight_norm: {path or type(layer).__name__} has other parametrizations "
                                    "besides its weight norm; remove those first (torch.nn.utils.parametrize).")
            _unparametrize_weight(layer, folded)
        elif _has_weight_norm(layer):
            torch.nn.utils.remove_weight_norm(layer)
    return target


def _copy(model: nn.Module) -> nn.Module:
    """A deep copy, also of layers with the old ``torch.nn.utils.weight_norm``.

    Those hold their computed ``weight`` as a plain non-leaf tensor, which ``copy.deepcopy`` refuses; it is
    set aside during the copy (and put back on ``model``), then recomputed on the copy.
    """
    legacy = [m for m in model.modules() if hasattr(m, "weight_g") and "weight" in m.__dict__]
    stashed = [m.__dict__.pop("weight") for m in legacy]
    try:
        copied = copy.deepcopy(model)
    finally:
        for m, w in zip(legacy, stashed):
            m.__dict__["weight"] = w
    for m in copied.modules():
        for hook in m._forward_pre_hooks.values():
            if isinstance(hook, _LegacyWeightNorm):
                setattr(m, hook.name, hook.compute_weight(m))
    return copied


def _unparametrize_weight(layer: nn.Module, folded: dict[int, nn.Parameter]) -> None:
    """``parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)``, without its last step.

    torch's version also deletes the ``weight`` property from the layer's parametrized class, which a deep
    copy shares with the original model: the original would lose its weight. Here only the layer changes.
    Layers sharing one parametrization (tied weights) get the same folded ``Parameter`` from ``folded``.
    """
    plist = layer.parametrizations["weight"]
    weight = folded.get(id(plist))
    if weight is None:
        weight = nn.Parameter(layer.weight.detach().clone(), requires_grad=plist.original1.requires_grad)
        folded[id(plist)] = weight
    del layer._modules["parametrizations"]
    layer.__class__ = layer.__class__.__bases__[0]
    layer.register_parameter("weight", weight)
