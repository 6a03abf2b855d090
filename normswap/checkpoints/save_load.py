"""``normswap.save``, ``normswap.load`` and ``normswap.load_state_dict``: converted models on disk.

A converted model saved by :func:`save` (a ``.safetensors`` file) or by ``save_pretrained`` (an HF
folder) records its base model and conversions; :func:`load` rebuilds the base, replays the conversions
and loads the weights strictly. :func:`load_state_dict` loads any checkpoint into a model across a
conversion, in either direction, mapping the keys a spec changes (see ``keymap.py``).
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, NormSwapError, OptionError
from ..named_models import build_base, build_model
from ..io.atomic import atomic_output
from .hf_layout import in_model_layout
from .keymap import KeyMap, map_keys
from .record import check_record, make_record, replay
from ..io.readers import Checkpoint, StateDictCheckpoint
from .record import open_checkpoint
from .writers import write_hf_folder, write_model

PathLike = str | os.PathLike


@dataclass
class LoadReport:
    """What :func:`load_state_dict` did beyond copying tensors: keys dropped, filled or transformed."""

    source: str
    loaded: int
    dropped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return "\n".join([f"{self.source}: {self.loaded} tensors loaded"] + [f"note: {n}" for n in self.notes])


def _open(source: PathLike | dict[str, torch.Tensor] | Checkpoint) -> tuple[Checkpoint, bool]:
    if isinstance(source, Checkpoint):
        return source, False
    if isinstance(source, dict):
        bad = [k for k, v in source.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise CheckpointError(f"state dict: values of {bad[:3]} are not tensors")
        return StateDictCheckpoint(pathlib.Path("<state dict>"), source, []), False
    return open_checkpoint(source), True


def load_mapped(model: nn.Module, ckpt: Checkpoint, keymap: KeyMap) -> None:
    state = {k: keymap.value(ckpt.tensor, k) for k in keymap.entries}
    for alias, key in keymap.aliases.items():
        state[alias] = state[key]
    with torch.no_grad():
        model.load_state_dict(state, strict=True)


def load_state_dict(model: nn.Module, source: PathLike | dict[str, torch.Tensor] | Checkpoint) -> LoadReport:
    """Load a checkpoint (path, HF folder or state dict) into ``model``, across a conversion if need be.

    A checkpoint of the original model loads into the converted one (BatchNorm running statistics dropped,
    affine weights kept, weight-norm g/v derived) and a converted checkpoint into the original architecture.
    Any other difference raises :class:`~normswap.errors.CheckpointError` naming the first keys.

    Example:
        >>> import normswap
        >>> original = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
        >>> converted = normswap.convert(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)), "gn_ws", groups=2)
        >>> print(normswap.load_state_dict(converted, original.state_dict()).notes[0][:44])
        running statistics (running_mean, running_va
    """
    ckpt, owned = _open(source)
    try:
        _refuse_folded(model, ckpt)
        ckpt = in_model_layout(model, ckpt)
        keymap = map_keys(model, ckpt.tensors, where=str(ckpt.path))
        load_mapped(model, ckpt, keymap)
        return LoadReport(str(ckpt.path), len(keymap.entries), list(keymap.dropped), list(keymap.notes))
    finally:
        if owned:
            ckpt.close()


def _refuse_folded(model: nn.Module, ckpt: Checkpoint) -> None:
    """A conversion that changed a parameter's value (Gemma's ``1 + weight`` folded into a LayerNorm weight)
    cannot take that tensor from a checkpoint of the original model: the value would be the unfolded one."""
    from ..core.state import last_plan

    plan = last_plan(model)
    if plan is None or (ckpt.record or {}).get("conversions"):
        return
    for change in plan.replaced:
        if "weight" in change.folded and f"{change.path}.weight" in ckpt.tensors:
            raise CheckpointError(
                f"{ckpt.path}: {change.path} was converted from a norm that scales by 1 + weight, and its weight "
                "was folded; a checkpoint of the original model must be loaded before converting: "
                "normswap.load(path, model=..., spec=...) or load into the original model, then convert. If this "
                "state dict comes from the converted model itself, load it with model.load_state_dict(state)")


def base_builder(ckpt: Checkpoint, model: str | None, model_kwargs: dict[str, Any]) -> Callable[..., nn.Module]:
    """How to build the base model of ``ckpt``: from ``model`` (``timm:NAME`` / HF folder) when given, else
    from the HF folder the checkpoint is, else from its normswap record."""
    if model is not None:
        return lambda device=None: build_model(model, device=device, **model_kwargs)
    if ckpt.config is not None:
        return lambda device=None: build_model(str(ckpt.path), device=device, **model_kwargs)
    base = (ckpt.record or {}).get("base")
    if isinstance(base, dict):
        if model_kwargs:
            base = {**base, "kwargs": {**base.get("kwargs", {}), **model_kwargs}}
        return lambda device=None: build_base(base, device=device)
    raise OptionError(f"{ckpt.path}: the checkpoint does not say which model it belongs to (no normswap record); "
                      "name it: model='timm:NAME' or an HF folder (command line: --model)")


def skeleton(build: Callable[..., nn.Module], conversions: list[dict[str, Any]], notes: list[str]) -> nn.Module:
    """The base model with the recorded conversions, on ``meta`` when it builds there, else in memory."""
    try:
        return replay(build(device="meta"), conversions)
    except NormSwapError:
        raise
    except Exception as exc:  # a model whose __init__ needs real values (e.g. calls .item())
        notes.append(f"the model does not build on the meta device ({type(exc).__name__}: {exc}); "
                     "its skeleton was built in memory")
        return replay(build(), conversions)


def recorded_conversions(ckpt: Checkpoint) -> list[dict[str, Any]]:
    return check_record(ckpt.record, str(ckpt.path)) if ckpt.record else []


def load(path: PathLike, *, model: str | nn.Module | None = None, spec: str | None = None,
         model_kwargs: dict[str, Any] | None = None, **options: Any) -> nn.Module:
    """Rebuild a model from a checkpoint: build its base, replay its recorded conversions, load its weights
    strictly; then, when ``spec`` is given, convert it further (``options`` are that spec's).

    ``model`` names the base when the checkpoint does not (``"timm:NAME"``, an HF folder) or is a model
    instance to load into (changed in place). A plain checkpoint of the original model with ``spec=`` gives
    the converted model with the original weights. The key notes are in ``normswap.last_plan(m).warnings``.

    Example:
        >>> m = load("resnet50_gn_ws.safetensors")  # doctest: +SKIP
        >>> m = load("resnet50_a1_0-14fe96d1.pth", model="timm:resnet50", spec="gn_ws")  # doctest: +SKIP
    """
    from ..core.convert import convert
    from ..core.state import last_plan

    if spec is None and options:
        raise OptionError(f"options {sorted(options)} were given without spec=; they are a spec's options")
    with open_checkpoint(path) as ckpt:
        if isinstance(model, nn.Module):
            base = model
        else:
            build = base_builder(ckpt, model, dict(model_kwargs or {}))
            # the checkpoint must fit the model it names before that model takes memory: a record or config
            # is untrusted, and one naming absurd sizes is refused here, on the meta device
            skel = skeleton(build, recorded_conversions(ckpt), [])
            map_keys(skel, in_model_layout(skel, ckpt).tensors, where=str(ckpt.path))
            base = build()
        built = replay(base, recorded_conversions(ckpt))
        notes = load_state_dict(built, ckpt).notes
        if spec is not None:
            built = convert(built, spec, inplace=True, **options)
            # what the checkpoint's keys become in the converted model (running statistics dropped, ...)
            notes += map_keys(built, in_model_layout(built, ckpt).tensors, where=str(ckpt.path)).notes
    plan = last_plan(built)
    if plan is not None:
        plan.warnings.extend(f"checkpoint {path}: {n}" for n in dict.fromkeys(notes))
    return built


def save(model: nn.Module, path: PathLike, *, force: bool = False,
         state_dict: dict[str, torch.Tensor] | None = None) -> pathlib.Path:
    """Save a (converted) model so :func:`load` can rebuild it: a ``.safetensors`` file carrying the base
    model and conversions in its metadata, or, for a transformers model and a folder path, ``save_pretrained``
    (the conversions are in its config.json). Written atomically; an existing path needs ``force=True``.
    ``state_dict`` replaces ``model.state_dict()`` (e.g. the gathered weights of an FSDP-sharded model).

    Example:
        >>> save(normswap.convert(timm.create_model("resnet18"), "gn_ws"), "r18_gn_ws.safetensors")  # doctest: +SKIP
    """
    path = pathlib.Path(path)
    if path.suffix.lower() in (".pt", ".pth", ".bin", ".ckpt"):
        raise OptionError(f"{path}: normswap writes .safetensors files or HF folders, not pickles")
    if path.suffix.lower() == ".safetensors":
        record = make_record(model)
        with atomic_output(path, force=force) as tmp, open(tmp, "wb") as f:
            write_model(f, model, record, str(path), state=state_dict)
    else:
        with atomic_output(path, force=force, folder=True) as tmp:
            write_hf_folder(tmp, model, None, state_dict=state_dict)
    return path
