"""Build what a recipe names: the model (``timm``, ``hf``, ``hf_folder``), its data, optimizer and
learning-rate schedule (``cosine``, ``linear``, ``constant``, each with linear warmup, or any
``torch.optim.lr_scheduler`` class by dotted path)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..named_models import build_base, build_model, device_context
from .components import register_component, resolve, split_node
from .data import DataBundle


@register_component("model", "timm")
def timm_model(name: str, **kwargs: Any) -> nn.Module:
    """A timm model with random weights (``pretrained=False``); ``kwargs`` go to ``timm.create_model``."""
    return build_base({"timm": name, "kwargs": kwargs})


@register_component("model", "hf")
def hf_model(architecture: str, config: dict) -> nn.Module:
    """A transformers model of class ``architecture`` from an inline config (``model_type`` and sizes)."""
    return build_base({"hf": architecture, "config": config})


@register_component("model", "hf_folder")
def hf_folder_model(path: str) -> nn.Module:
    """The transformers model a local folder's config.json describes (weights: see ``init_from``)."""
    return build_model(path)


def build_recipe_model(node: dict[str, Any], *, device: str | None = None, num_classes: int | None = None) -> nn.Module:
    """The recipe's model, with the data's class count where the recipe leaves it open.

    Example:
        >>> build_recipe_model({"_component_": "timm", "name": "resnet18"}, device="meta", num_classes=4).num_classes
        4
    """
    name, args = split_node(node)
    args = dict(args)
    if name == "timm":
        if num_classes is not None:
            args.setdefault("num_classes", num_classes)
        return build_base({"timm": args.pop("name"), "kwargs": args}, device=device)
    if name == "hf":
        config = dict(args["config"])
        if num_classes is not None:
            config.setdefault("num_labels", num_classes)
        return build_base({"hf": args["architecture"], "config": config}, device=device)
    if name == "hf_folder":
        return build_model(args["path"], device=device)
    with device_context(device):
        return resolve("model", name)(**args)


def task_of(model: nn.Module) -> str:
    """``text`` for a transformers model whose main input is token ids, else ``image``."""
    return "text" if getattr(model, "main_input_name", "pixel_values") == "input_ids" else "image"


def build_data(node: dict[str, Any], task: str, seed: int, model_config: Any) -> DataBundle:
    """The recipe's data bundle."""
    name, args = split_node(node)
    fn = resolve("data", name)
    return fn(task=task, seed=seed, model_config=model_config, **args)


def build_optimizer(node: dict[str, Any], model: nn.Module) -> torch.optim.Optimizer:
    name, args = split_node(node)
    return resolve("optimizer", name)([p for p in model.parameters() if p.requires_grad], **args)


def build_scheduler(node: dict[str, Any] | None, optimizer: torch.optim.Optimizer, max_steps: int):
    if node is None:
        return None
    name, args = split_node(node)
    fn = resolve("scheduler", name)
    if name in ("cosine", "linear", "constant"):
        return fn(optimizer, max_steps=max_steps, **args)
    return fn(optimizer, **args)


def _warmup_schedule(optimizer: torch.optim.Optimizer, max_steps: int, warmup_steps: int, decay):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
        return decay(min(1.0, progress))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@register_component("scheduler", "cosine")
def cosine(optimizer: torch.optim.Optimizer, max_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.0):
    """Linear warmup, then cosine decay to ``min_lr_ratio`` of the base learning rate at ``max_steps``."""
    return _warmup_schedule(optimizer, max_steps, warmup_steps,
                            lambda p: min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


@register_component("scheduler", "linear")
def linear(optimizer: torch.optim.Optimizer, max_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.0):
    """Linear warmup, then linear decay to ``min_lr_ratio`` of the base learning rate."""
    return _warmup_schedule(optimizer, max_steps, warmup_steps, lambda p: 1 - (1 - min_lr_ratio) * p)


@register_component("scheduler", "constant")
def constant(optimizer: torch.optim.Optimizer, max_steps: int, warmup_steps: int = 0):
    """Linear warmup, then the base learning rate."""
    return _warmup_schedule(optimizer, max_steps, warmup_steps, lambda p: 1.0)
