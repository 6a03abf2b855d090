"""Swap modules in place on the module tree, keeping what the user's model had.

A replacement gets the source's affine ``Parameter`` objects (so an optimizer built before the swap
keeps stepping them, with its state), its device, dtype, train/eval mode, hooks and fused activation,
and is set at every path the source was reachable at (shared and tied modules stay shared).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.nn.utils import parametrize

from ..adapters.base import NormInfo
from ..graph.relations import FUNCTIONAL_NORMS
from ..graph.tracing import structure_copy
from ..norms.act import attach_act

_HOOK_DICTS = (
    "_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
    "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
)


def carry_over(new: nn.Module, info: NormInfo, source: nn.Module) -> tuple[list[str], list[str]]:
    """Give ``new`` the source's affine tensors (the same ``Parameter`` objects where possible) and,
    where ``new`` keeps running statistics, the source's buffers. Returns ``(carried, notes)``."""
    carried, notes = [], []
    for name in ("weight", "bias"):
        old = getattr(info, name)
        slot = new._parameters.get(name)
        if parametrize.is_parametrized(source, name) and slot is not None and old is not None \
                and old.shape == slot.shape and info.weight_offset == 0.0:
            # the same parametrization (its original tensors, its key) moves to the replacement
            parametrize.register_parametrization(new, name, nn.Identity(), unsafe=True)
            new.parametrizations[name] = source.parametrizations[name]
            carried.append(name)
            notes.append(f"{name} keeps its parametrization ({type(source.parametrizations[name][0]).__name__})")
            continue
        if slot is None:
            if old is not None:
                notes.append(f"{name} not carried: the new layer has none")
            continue
        if old is None:
            notes.append(f"new {name} initialized (the source had none)")
            continue
        if old.shape != slot.shape:
            notes.append(f"{name} not carried: shape {tuple(old.shape)} vs {tuple(slot.shape)}")
            continue
        offset = info.weight_offset if name == "weight" else 0.0
        if isinstance(old, nn.Parameter) and offset == 0.0:
            new._parameters[name] = old
        else:
            with torch.no_grad():
                slot.copy_(old + offset)
            if isinstance(old, nn.Parameter):
                slot.requires_grad_(old.requires_grad)
                notes.append(f"{name} folded from (1 + {name}) into a new parameter")
            else:
                notes.append(f"{name} was a frozen buffer; it is now a trainable parameter")
        carried.append(name)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        old = source._buffers.get(name) if hasattr(source, "_buffers") else None
        if new._buffers.get(name) is not None and old is not None and old.shape == new._buffers[name].shape:
            new._buffers[name] = old
            carried.append(name)
    for name in sorted(getattr(source, "_non_persistent_buffers_set", ())):
        # a non-persistent buffer is not in any checkpoint, but the model's own code may read it
        # (falcon_mamba passes its weightless norms' dummy ``weight`` to a fused kernel): keep it
        buf = source._buffers.get(name)
        if buf is not None and not hasattr(new, name):
            new.register_buffer(name, buf, persistent=False)
            notes.append(f"non-persistent buffer {name} kept (not in checkpoints; the model's code may read it)")
    return carried, notes


def copy_hooks(source: nn.Module, new: nn.Module) -> None:
    """Copy every hook registered on ``source`` to ``new``."""
    for attr in _HOOK_DICTS:
        hooks = getattr(source, attr, None)
        if hooks:
            getattr(new, attr).update(hooks)


def finish_replacement(new: nn.Module, info: NormInfo, source: nn.Module) -> tuple[list[str], list[str]]:
    """Carry parameters, device, dtype, mode, hooks and fused act from ``source`` onto ``new``."""
    ref = info.reference_tensor(source)
    if ref is not None:
        new.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
    carried, notes = carry_over(new, info, source)
    if ref is not None and isinstance(ref, nn.Parameter):
        for name, p in new.named_parameters(recurse=False):
            if name not in carried:
                p.requires_grad_(ref.requires_grad)
    attach_act(new, info.act, info.drop)
    new.train(source.training)
    copy_hooks(source, new)
    return carried, notes


def set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    """Set the module at dotted ``path`` (``"layer1.0.bn1"``) to ``new``."""
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    parent._modules[name] = new


class _ShallowTracer(torch.fx.Tracer):
    """Traces one module's own forward: every submodule is a leaf, so children keep their hooks."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


def rewrite_functional(module: nn.Module, targets: dict[str, Callable[..., Any]], options: dict[str, Any]) -> list[str]:
    """Rewrite the functional norm calls in ``module``'s own ``forward`` to ``targets`` (by norm name).

    Each target is called with the call's own arguments and ``spec_options=`` the spec's options.

    The module keeps its class (a subclass with the rewritten ``forward`` replaces it in place), its
    parameters and state-dict keys. Returns the rewritten call names; raises when it does not trace.
    """
    traced, _ = structure_copy(module)  # what the forward stores while traced lands in a copy
    graph = _ShallowTracer().trace(traced)
    changed = []
    for node in graph.nodes:
        if node.op == "call_function" and FUNCTIONAL_NORMS.get(node.target) in targets:
            # the target gets the call's own arguments plus the spec's options
            node.target = targets[FUNCTIONAL_NORMS[node.target]]
            node.kwargs = {**node.kwargs, "spec_options": dict(options)}
            changed.append(node.name)
    if changed:
        graph.lint()
        forward = type(torch.fx.GraphModule(traced, graph)).forward
        cls = type(module)
        module.__class__ = type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__,
                                                       "_normswap_rewritten": tuple(changed)})
    return changed
