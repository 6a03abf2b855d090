"""The record a converted checkpoint carries: which base model, which conversions, with which options.

In a ``.safetensors`` file it is the JSON string under ``__metadata__["normswap"]``; in an HF folder it is
the ``"normswap"`` entry of ``config.json`` (written by :func:`normswap.convert` into the model's config,
so ``save_pretrained`` keeps it). Replaying the conversions on a freshly built base model gives a model
whose state dict fits the checkpoint.
"""

from __future__ import annotations

import json
import warnings
from typing import Any

from torch import nn

from ..errors import CheckpointError
from ..models import RECORD_FORMAT, describe_base

HISTORY_KEY = "_normswap_history"


def conversions_of(model: nn.Module) -> list[dict[str, Any]]:
    """The conversions :func:`normswap.convert` applied to ``model``, oldest first."""
    return list(model.__dict__.get(HISTORY_KEY, []))


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


def check_record(record: dict[str, Any], where: str) -> list[dict[str, Any]]:
    """The conversions of a record read from a file, checked for shape."""
    if record.get("format", RECORD_FORMAT) > RECORD_FORMAT:
        raise CheckpointError(f"{where}: written by a newer normswap (record format {record['format']}); "
                              "upgrade normswap to read it")
    conversions = record.get("conversions", [])
    ok = isinstance(conversions, list) and all(
        isinstance(c, dict) and isinstance(c.get("spec"), str) and isinstance(c.get("options", {}), dict)
        for c in conversions)
    if not ok:
        raise CheckpointError(f"{where}: its normswap record is malformed (conversions: {conversions!r:.200})")
    return conversions


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
    from ..engine import NothingToConvertWarning, convert

    done = _plain(conversions_of(model))
    if _plain(conversions[: len(done)]) == done:
        conversions = conversions[len(done):]
    for c in conversions:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NothingToConvertWarning)
            model = convert(model, c["spec"], inplace=True, **c.get("options", {}))
    return model
