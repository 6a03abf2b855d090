"""Which modules a user means: module-path globs, weight layers (convs and linears) and the classifier head.

Shared by :func:`normswap.convert` (``include=`` / ``exclude=``), the ``wn`` spec and
:mod:`normswap.regularizers`, so that a glob or "the head" means the same thing everywhere.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from typing import Any

from torch import nn
from torch.nn.utils import parametrize

from ..errors import OptionError

__all__ = [
    "globs", "selected", "unmatched", "weight_layers", "is_weight_layer", "classifier_head_paths", "in_head",
]

# The names timm and transformers give their classifier heads (top-level attributes).
_HEAD_NAMES = ("head", "fc", "classifier", "last_linear", "lm_head", "score", "qa_outputs", "cls")


def globs(name: str, value: Any) -> tuple[str, ...]:
    """A user's ``include=`` / ``exclude=`` value as a tuple of globs (one string or a list of strings).

    Example:
        >>> globs("exclude", "head.*")
        ('head.*',)
    """
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, Sequence) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise OptionError(f"option {name!r} must be a module-path glob or a list of globs, got {value!r}")


def _hit(paths: Iterable[str], patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(p, g) for p in paths for g in patterns)


def selected(paths: Sequence[str], include: tuple[str, ...], exclude: tuple[str, ...]) -> bool:
    """Whether a module known by ``paths`` is kept: it matches an include glob (if any) and no exclude glob.

    Example:
        >>> selected(["layer1.0.conv1"], ("layer1.*",), ("*.conv2",))
        True
    """
    return (not include or _hit(paths, include)) and not _hit(paths, exclude)


def unmatched(patterns: tuple[str, ...], paths: Iterable[str]) -> list[str]:
    """The globs of ``patterns`` that match none of ``paths`` (to warn about a typo).

    Example:
        >>> unmatched(("layer1.*", "lyer2.*"), ["layer1.0", "layer2.0"])
        ['lyer2.*']
    """
    paths = list(paths)
    return [g for g in patterns if not any(fnmatch.fnmatchcase(p, g) for p in paths)]


def is_weight_layer(module: nn.Module, parametrized: bool = False) -> bool:
    """Convs, linears and HF's ``Conv1D`` (GPT-2's transposed linear) whose ``weight`` is a parameter.

    With ``parametrized=True``, also those whose weight is computed by a parametrization or by the old
    ``torch.nn.utils.weight_norm`` (what a weight spec must see to skip them).
    """
    if not (isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)) or type(module).__name__ == "Conv1D"):
        return False
    if isinstance(getattr(module, "weight", None), nn.Parameter):
        return True
    return parametrized and (parametrize.is_parametrized(module, "weight") or hasattr(module, "weight_g"))


def weight_layers(model: nn.Module, parametrized: bool = False) -> dict[str, nn.Module]:
    """Every conv / linear of ``model`` by module path, each shared module once (its first path).

    The model itself counts (path ``""``) when it is a single conv or linear. ``parametrized`` as for
    :func:`is_weight_layer`.

    Example:
        >>> list(weight_layers(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Linear(8, 2))))
        ['0', '2']
    """
    return {path: m for path, m in model.named_modules() if is_weight_layer(m, parametrized)}


def classifier_head_paths(model: nn.Module) -> set[str]:
    """Module paths of ``model``'s classifier head(s): what "excluding the head" leaves out.

    Read from timm's ``pretrained_cfg["classifier"]`` (e.g. ``"fc"``, ``"head.fc"``, or both heads of a
    distilled model), then HF's ``get_output_embeddings()`` (an LM head), then the usual top-level head names
    (``head``, ``fc``, ``classifier``, ``lm_head``, ``score``, ...). Everything below a returned path belongs
    to the head.

    Example:
        >>> model = nn.Sequential()
        >>> model.add_module("features", nn.Linear(4, 4)); model.add_module("classifier", nn.Linear(4, 2))
        >>> sorted(classifier_head_paths(model))
        ['classifier']
    """
    paths: set[str] = set()
    modules = dict(model.named_modules())
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, dict):
        names = cfg.get("classifier")
        for name in (names,) if isinstance(names, str) else tuple(names or ()):
            if name in modules:
                paths.add(name)
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        try:
            out = get_out()
        except (NotImplementedError, AttributeError, TypeError):
            out = None
        if isinstance(out, nn.Module):
            paths.update(p for p, m in modules.items() if m is out and p)
    if not paths:
        paths.update(name for name, _ in model.named_children() if name in _HEAD_NAMES)
    return paths


def in_head(path: str, heads: set[str]) -> bool:
    """Whether module ``path`` is one of ``heads`` or below one."""
    return any(path == h or path.startswith(h + ".") for h in heads)
