"""Checkpoint tensors in the layout a transformers model holds them.

transformers 5 saves some tensors in another layout than its modules hold and converts them when
loading: one tensor per expert where the model keeps one fused ``[experts, ...]`` parameter, older fused
or split projections, renamed prefixes. ``from_pretrained`` applies the model's *conversion mapping*
(``transformers.conversion_mapping``); :func:`in_model_layout` applies the same mapping, through the same
transformers function, to a checkpoint, so a folder that ``from_pretrained`` loads maps onto the model
(converted or not) key for key. Nothing is downloaded and no code from the folder runs.
"""

from __future__ import annotations

import contextlib
import copy
import pathlib
from collections.abc import Iterator

import torch
from torch import nn

from ..errors import CheckpointError
from ..io.readers import Checkpoint, TensorInfo


class ModelLayoutCheckpoint(Checkpoint):
    """A checkpoint with the tensors a conversion mapping produced in place of those it consumed."""

    def __init__(self, inner: Checkpoint, produced: dict[str, torch.Tensor], consumed: set[str]) -> None:
        self._inner = inner
        self._produced = produced
        tensors = {k: v for k, v in inner.tensors.items() if k not in consumed}
        tensors.update((k, TensorInfo(v.dtype, tuple(v.shape))) for k, v in produced.items())
        super().__init__(inner.path, tensors, inner.files, inner.record, inner.config)

    def tensor(self, name: str) -> torch.Tensor:
        return self._produced[name] if name in self._produced else self._inner.tensor(name)

    def release(self, name: str) -> None:
        if name not in self._produced:
            self._inner.release(name)

    def byte_range(self, name: str) -> tuple[pathlib.Path, int] | None:
        return None if name in self._produced else self._inner.byte_range(name)

    def close(self) -> None:
        self._inner.close()


def _meta_shadow(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers are on the meta device (no memory, no copy of values)."""
    memo: dict[int, object] = {}
    for t in (*model.parameters(), *model.buffers()):
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(model, memo)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No progress bar and no loading report from transformers while it converts tensors for us."""
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    level = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bar:
            hf_logging.enable_progress_bar()


def in_model_layout(model: nn.Module, ckpt: Checkpoint) -> Checkpoint:
    """``ckpt`` with the tensors ``model``'s transformers conversion mapping converts on load replaced by
    what that conversion makes of them; ``ckpt`` itself for any other model or when nothing converts.

    Renamings alone are left to the key map (they need no tensor work); tensors that a converter takes
    (e.g. per-expert weights fused into one parameter) go through transformers' own loading function on
    a meta-device copy of ``model``.

    Example:
        >>> ckpt = in_model_layout(model, open_checkpoint("./qwen3-moe-folder"))  # doctest: +SKIP
    """
    if not type(model).__module__.startswith("transformers.") or not hasattr(model, "config"):
        return ckpt
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (WeightConverter, WeightRenaming,
                                                     convert_and_load_state_dict_in_model, rename_source_key)
        from transformers.modeling_utils import LoadStateDictConfig

        mapping = get_model_conversion_mapping(model)
    except Exception:  # noqa: BLE001 - an older transformers without conversion mappings: keys are as saved
        return ckpt
    converters = [t for t in mapping if isinstance(t, WeightConverter)]
    if not converters:
        return ckpt
    renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
    targets = model.state_dict()
    prefix = getattr(model, "base_model_prefix", "")
    consumed = set()
    for key in ckpt.tensors:
        renamed, pattern = rename_source_key(key, renamings, converters, prefix, targets)
        if pattern is not None and renamed in targets:
            consumed.add(key)
    if not consumed:
        return ckpt
    shadow = _meta_shadow(model)
    try:
        with _quiet_transformers():
            info, _ = convert_and_load_state_dict_in_model(
                shadow, {k: ckpt.tensor(k) for k in sorted(consumed)}, LoadStateDictConfig(weight_mapping=mapping))
    except Exception as exc:  # noqa: BLE001 - transformers' own conversion failed on these tensors
        raise CheckpointError(f"{ckpt.path}: transformers could not convert its tensors to the layout "
                              f"{type(model).__name__} holds ({type(exc).__name__}: {exc})") from None
    errors = getattr(info, "conversion_errors", None)
    if errors:
        first = next(iter(errors.items()))
        raise CheckpointError(f"{ckpt.path}: transformers could not convert {len(errors)} tensor group(s) to the "
                              f"layout {type(model).__name__} holds (first: {first[0]}: {first[1]})")
    produced = {k: v for k, v in shadow.state_dict().items() if v.device.type != "meta"}
    return ModelLayoutCheckpoint(ckpt, produced, consumed)
