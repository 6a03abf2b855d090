"""Training checkpoints: written atomically, the previous ones kept, resumed bit-exactly.

A checkpoint is a folder ``checkpoints/step_0000100/`` holding ``model.safetensors`` (written by
:func:`normswap.save`, so :func:`normswap.load` rebuilds the converted model from it alone) and
``trainer_state.pt`` (step, optimizer, scheduler, grad scaler and every rank's random-number states; read
back with ``weights_only=True``). The folder is renamed into place only when complete, then
``checkpoints/latest.json`` is replaced atomically to point at it, then checkpoints beyond ``keep`` are
removed, oldest first. A run killed at any moment leaves ``latest.json`` pointing at a complete checkpoint.
"""

from __future__ import annotations

import json
import pathlib
import random
import shutil
from typing import Any

import torch
from torch import nn

from ..io.atomic import atomic_output
from ..checkpoints.save_load import save
from ..errors import CheckpointError, CheckpointNotFoundError

LATEST = "latest.json"
STATE = "trainer_state.pt"
MODEL = "model.safetensors"


def rng_state() -> dict[str, Any]:
    """The random-number states of this process (torch CPU and CUDA, Python's ``random``)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: pathlib.Path, step: int, model: nn.Module, trainer: dict[str, Any], keep: int,
                    weights: dict[str, torch.Tensor] | None = None) -> pathlib.Path:
    """Write the checkpoint of ``step`` atomically, point ``latest.json`` at it, keep the last ``keep``.
    ``weights`` replaces ``model.state_dict()`` (the gathered state of a sharded model)."""
    folder = run_dir / "checkpoints"
    target = folder / f"step_{step:07d}"
    with atomic_output(target, folder=True, force=True) as tmp:
        save(model, tmp / MODEL, state_dict=weights)
        torch.save({"step": step, **trainer}, tmp / STATE)
    with atomic_output(folder / LATEST, force=True) as tmp:
        tmp.write_text(json.dumps({"step": step, "checkpoint": target.name}))
    done = sorted(p for p in folder.glob("step_*") if p.is_dir() and (p / STATE).is_file())
    for old in done[:-keep]:
        if old != target:
            shutil.rmtree(old, ignore_errors=True)
    return target


def find_checkpoint(path: str | pathlib.Path) -> pathlib.Path:
    """The checkpoint folder ``path`` names: itself, or the latest one of a run folder.

    Example:
        >>> find_checkpoint("runs/gn_ws_resnet")  # doctest: +SKIP
        PosixPath('runs/gn_ws_resnet/checkpoints/step_0000300')
    """
    path = pathlib.Path(path)
    if (path / STATE).is_file():
        return path
    for folder in (path / "checkpoints", path):
        latest = folder / LATEST
        if latest.is_file():
            try:
                name = json.loads(latest.read_text())["checkpoint"]
            except (ValueError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{latest}: unreadable ({exc}); resume from a step_* folder instead") from None
            if (folder / name / STATE).is_file():
                return folder / name
            raise CheckpointNotFoundError(f"{latest} points at {name}, which is not a complete checkpoint")
    raise CheckpointNotFoundError(f"{path}: no training checkpoint here (expected {STATE} or checkpoints/{LATEST})")


def load_trainer_state(checkpoint: pathlib.Path) -> dict[str, Any]:
    """The trainer state of a checkpoint folder (``weights_only=True``)."""
    try:
        return torch.load(checkpoint / STATE, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{checkpoint / STATE}: unreadable ({type(exc).__name__}: {exc})") from None
