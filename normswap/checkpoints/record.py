"""The record a converted checkpoint carries: which base model, which conversions, with which options.

In a ``.safetensors`` file it is the JSON string under ``__metadata__["normswap"]``; in an HF folder it is
the ``"normswap"`` entry of ``config.json`` (written by :func:`normswap.convert` into the model's config,
so ``save_pretrained`` keeps it). Replaying the conversions on a freshly built base model gives a model
whose state dict fits the checkpoint.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any

from torch import nn

from ..errors import CheckpointError
from ..core.convert import after_convert
from ..io import readers
from ..io.readers import Checkpoint
from ..core.state import conversions_of
from ..named_models import RECORD_FORMAT, RECORD_KEY, describe_base, file_reading_arguments

@after_convert
def record_in_hf_config(model: nn.Module) -> None:
    """Write the conversions into a transformers model's config, so ``save_pretrained`` keeps them and
    :func:`normswap.load` can replay them from the saved folder (called by ``convert`` on every model it
    changed)."""
    config = getattr(model, "config", None)
    if config is not None and type(config).__module__.startswith("transformers."):
        setattr(config, RECORD_KEY, {"format": RECORD_FORMAT, "conversions": conversions_of(model)})


def make_record(model: nn.Module, **extra: Any) -> dict[str, Any]:
    """The record that rebuilds ``model``: its base description and its conversions.

    Example:
        >>> import normswap, torch
        >>> make_record(normswap.convert(torch.nn.Sequential(torch.nn.BatchNorm2d(4)), "gn", groups=2))["conversions"][0]["spec"]
        'gn'
    """
    from .. import __version__

    return {"format": RECORD_FORMAT, "normswap_version": __version__, "base": describe_base(model),
            "conversions": conversions_of(model), **extra}


def record_json(record: dict[str, Any], where: str) -> str:
    """``record`` as JSON, or a clear error naming the option that JSON cannot hold."""
    try:
        return json.dumps(record, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: the conversion options cannot be recorded as JSON ({exc}); use plain "
                              "numbers, strings and lists as spec options") from None


RECORD_KEYS = {"format", "normswap_version", "base", "conversions", "source"}
_MAX_DEPTH = 16


def _plain_problem(value: Any, where: str, depth: int = 0) -> str | None:
    """Why ``value`` is not plain JSON data (None, bool, number, string, and lists / string-keyed dicts of them,
    at most ``_MAX_DEPTH`` deep), or ``None``."""
    if depth > _MAX_DEPTH:
        return f"{where}: nested deeper than {_MAX_DEPTH} levels"
    if value is None or isinstance(value, (bool, int, float, str)):
        return None
    if isinstance(value, list):
        return next((p for i, v in enumerate(value) if (p := _plain_problem(v, f"{where}[{i}]", depth + 1))), None)
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            return f"{where}: keys must be strings"
        return next((p for k, v in value.items() if (p := _plain_problem(v, f"{where}.{k}", depth + 1))), None)
    return f"{where}: a {type(value).__name__}, not JSON data"


def _base_problems(base: Any) -> list[str]:
    if base is None:
        return []
    if not isinstance(base, dict) or len({"timm", "hf"} & set(base)) != 1:
        return ["base: a dict with one 'timm' or 'hf' entry"]
    problems = []
    if "timm" in base:
        if set(base) - {"timm", "kwargs"}:
            problems.append(f"base: unknown entries {sorted(set(base) - {'timm', 'kwargs'})}")
        if not isinstance(base["timm"], str) or not base["timm"]:
            problems.append("base.timm: a model name (a string)")
        kwargs = base.get("kwargs") or {}
        if not isinstance(kwargs, dict):
            problems.append("base.kwargs: a dict of create_model arguments")
        else:
            problems += [f"base.kwargs.{k}: an argument that makes timm read files or the network; a record never "
                         "passes it" for k in file_reading_arguments(kwargs)]
            problems += [p for p in [_plain_problem(kwargs, "base.kwargs")] if p]
    else:
        if set(base) - {"hf", "config"}:
            problems.append(f"base: unknown entries {sorted(set(base) - {'hf', 'config'})}")
        if not isinstance(base["hf"], str) or not base["hf"].isidentifier():
            problems.append("base.hf: a transformers class name")
        config = base.get("config")
        if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
            problems.append("base.config: a dict with a model_type")
        else:
            problems += [p for p in [_plain_problem(config, "base.config")] if p]
    return problems


def validate_record(record: Any, where: str) -> dict[str, Any]:
    """The normswap record read from a file, checked against its schema (a record is untrusted input: its
    values reach timm and transformers). Every problem is named in one :class:`CheckpointError`.

    Example:
        >>> validate_record({"format": 1, "base": {"timm": "resnet18", "kwargs": {"checkpoint_path": "x.pth"}},
        ...                  "conversions": []}, "f.safetensors")
        Traceback (most recent call last):
        ...
        normswap.errors.CheckpointError: f.safetensors: its normswap record is malformed: base.kwargs.checkpoint_path: an argument that makes timm read files or the network; a record never passes it
    """
    if not isinstance(record, dict):
        raise CheckpointError(f"{where}: its normswap record is not a JSON object")
    fmt = record.get("format", RECORD_FORMAT)
    if isinstance(fmt, int) and not isinstance(fmt, bool) and fmt > RECORD_FORMAT:
        raise CheckpointError(f"{where}: written by a newer normswap (record format {fmt}); upgrade normswap to "
                              "read it")
    problems = [f"unknown entries {sorted(set(record) - RECORD_KEYS)}"] if set(record) - RECORD_KEYS else []
    if not isinstance(fmt, int) or isinstance(fmt, bool) or fmt < 1:
        problems.append("format: a positive integer")
    for key in ("normswap_version", "source"):
        if key in record and not isinstance(record[key], str):
            problems.append(f"{key}: a string")
    problems += _base_problems(record.get("base"))
    conversions = record.get("conversions", [])
    if not isinstance(conversions, list):
        problems.append("conversions: a list")
    else:
        for i, c in enumerate(conversions):
            if not isinstance(c, dict) or set(c) - {"spec", "options"} or not isinstance(c.get("spec"), str) \
                    or not isinstance(c.get("options", {}), dict):
                problems.append(f"conversions[{i}]: a dict with a 'spec' name and an 'options' dict")
            elif (p := _plain_problem(c.get("options", {}), f"conversions[{i}].options")):
                problems.append(p)
    if problems:
        raise CheckpointError(f"{where}: its normswap record is malformed: {'; '.join(problems[:5])}")
    return record


def check_record(record: dict[str, Any], where: str) -> list[dict[str, Any]]:
    """The conversions of a record read from a file (validated: :func:`validate_record`)."""
    return list(validate_record(record, where).get("conversions", []))


def _plain(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists), for comparing records."""
    return json.loads(json.dumps(value, default=repr))


def replay(model: nn.Module, conversions: list[dict[str, Any]]) -> nn.Module:
    """Apply recorded conversions to ``model`` in place, skipping those it already has.

    Example:
        >>> import normswap, torch
        >>> m = normswap.convert(torch.nn.Sequential(torch.nn.BatchNorm2d(4)), "gn", groups=2)
        >>> type(replay(torch.nn.Sequential(torch.nn.BatchNorm2d(4)), conversions_of(m))[0]).__name__
        'GroupNorm'
    """
    from ..core.convert import NothingToConvertWarning, convert

    done = _plain(conversions_of(model))
    if _plain(conversions[: len(done)]) == done:
        conversions = conversions[len(done):]
    for c in conversions:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NothingToConvertWarning)
            model = convert(model, c["spec"], inplace=True, **c.get("options", {}))
    return model


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """:func:`normswap.io.open_checkpoint` with the record checked against its schema (:func:`validate_record`).

    Example:
        >>> with open_checkpoint("resnet50_gn_ws.safetensors") as ckpt:  # doctest: +SKIP
        ...     ckpt.record["conversions"]
    """
    return readers.open_checkpoint(path, validate_record)
