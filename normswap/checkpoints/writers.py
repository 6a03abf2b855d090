"""Write checkpoints: a safetensors file streamed from a model or from a key map over another checkpoint,
or an HF folder through ``save_pretrained``. Callers write into a temporary path (see ``atomic.py``)."""

from __future__ import annotations

import pathlib
import shutil
from collections.abc import Callable

import torch
from torch import nn

from ..errors import NormSwapError
from .keymap import KeyMap
from .record import record_json
from ..io.safetensors_file import OutputTensor, write_safetensors
from ..io.readers import HF_WEIGHTS, Checkpoint

Progress = Callable[[int], None] | None


def _metadata(record: dict, where: str) -> dict[str, str]:
    return {"format": "pt", "normswap": record_json(record, where)}


def unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state dict with each tied tensor once (under its first key), as safetensors requires."""
    seen: set[int] = set()
    out = {}
    for key, t in model.state_dict(keep_vars=True).items():
        if id(t) not in seen:
            seen.add(id(t))
            out[key] = t.detach()
    return out


def write_model(f, model: nn.Module, record: dict, where: str, progress: Progress = None,
                state: dict[str, torch.Tensor] | None = None) -> int:
    """Stream ``model``'s state dict (or ``state``) into the open file ``f`` as safetensors carrying ``record``."""
    tensors = unique_state(model) if state is None else state
    items = [OutputTensor(k, t.dtype, tuple(t.shape), (lambda t=t: t)) for k, t in tensors.items()]
    return write_safetensors(f, items, _metadata(record, where), progress=progress)


def write_mapped(f, ckpt: Checkpoint, keymap: KeyMap, record: dict, where: str, progress: Progress = None) -> int:
    """Stream the tensors ``keymap`` derives from ``ckpt`` into ``f``, one at a time, releasing each source."""
    def produce(key: str) -> Callable[[], torch.Tensor]:
        return lambda: keymap.value(ckpt.tensor, key)

    def done(key: str) -> Callable[[], None]:
        return lambda: [ckpt.release(s) for s in keymap.entries[key].sources]

    def raw(key: str) -> tuple[pathlib.Path, int] | None:
        m = keymap.entries[key]  # a tensor copied unchanged is copied file to file
        return ckpt.byte_range(m.sources[0]) if m.make is None else None

    items = [OutputTensor(k, m.dtype, m.shape, produce(k), done(k), raw(k)) for k, m in keymap.entries.items()
             if k not in keymap.aliases]
    return write_safetensors(f, items, _metadata(record, where), progress=progress)


def write_hf_folder(folder: pathlib.Path, model: nn.Module, source: pathlib.Path | None, *, quiet: bool = False,
                    state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """``model.save_pretrained(folder)``, plus the tokenizer and other small files of the source folder."""
    if not hasattr(model, "save_pretrained"):
        raise NormSwapError(f"{type(model).__name__} is not a transformers model, so it cannot be written as an "
                            "HF folder; give an output path ending in .safetensors")
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if quiet:
        hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(folder, **({"state_dict": state_dict} if state_dict is not None else {}))
    finally:
        if quiet and was_enabled:
            hf_logging.enable_progress_bar()
    if source is not None and source.is_dir():
        skip = {"config.json", *HF_WEIGHTS}
        for f in source.iterdir():
            # a link is not followed: what it points to lies outside the folder the user named
            if f.is_symlink() or not f.is_file() or f.name in skip or (folder / f.name).exists() \
                    or f.name.endswith((".safetensors", ".bin", ".pt", ".pth")):
                continue
            shutil.copy2(f, folder / f.name)
