"""Map the keys of a checkpoint onto a model, in both directions of a conversion.

A checkpoint of the original model loads into the converted one, and a converted checkpoint loads into
the original architecture. Where a spec changes the state-dict keys, a rule maps them:

- BatchNorm running statistics: dropped when the target norm keeps none (``gn_ws``, ``gn``, ``in``, ``ln``);
  set to their initial values (mean 0, var 1) when the target is a BatchNorm and the checkpoint has none;
- a norm's ``bias``: dropped when the target norm has none (``rms`` with ``bias=False``), zero when the
  target has one the checkpoint lacks;
- weight normalization (``wn``): a plain ``weight`` is split into ``g`` and ``v``; ``g``/``v`` (new or old
  torch keys) are folded back into ``weight``;
- tied weights (HF ``save_pretrained`` writes one of each tied pair) and HF's base-model prefix.

Everything else must match exactly: missing keys, unexpected keys and shape mismatches are one
:class:`~normswap.errors.CheckpointError` naming the file and the first offending keys. Every key the
rules change is summed up in :attr:`KeyMap.notes`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..adapters import read_norm
from ..errors import CheckpointError
from ..core.selection import classifier_head_paths, in_head
from ..specs.weight_norm import output_dim
from ..io.readers import TensorInfo

Derive = Callable[[list[torch.Tensor]], torch.Tensor]
RUNNING_STATS = ("running_mean", "running_var", "num_batches_tracked")
WN_NEW = ("parametrizations.weight.original0", "parametrizations.weight.original1")
WN_OLD = ("weight_g", "weight_v")


@dataclass
class Mapped:
    """How one key of the target gets its value: from ``sources`` in the checkpoint, through ``make``
    (``None``: the single source as it is). ``dtype``/``shape`` are the value's."""

    target: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    sources: tuple[str, ...] = ()
    make: Derive | None = None


@dataclass
class KeyMap:
    """Every target key with its source; ``aliases`` maps a tied key to the key it shares storage with."""

    entries: dict[str, Mapped] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def value(self, get: Callable[[str], torch.Tensor], key: str) -> torch.Tensor:
        """The value of target ``key``, reading checkpoint tensors with ``get``."""
        m = self.entries[key]
        values = [get(s) for s in m.sources]
        return values[0] if m.make is None else m.make(values)

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors written from this map (tied keys once)."""
        return sum(m.dtype.itemsize * math.prod(m.shape) for k, m in self.entries.items() if k not in self.aliases)


def _hf_renamed(model: nn.Module, tensors: dict[str, TensorInfo]) -> dict[str, str]:
    """``{name the model uses: checkpoint name}``: transformers v5 renames some checkpoint keys on load
    (and back on save_pretrained); keys its tensor-level converters handle are left as they are."""
    names = {k: k for k in tensors}
    if not type(model).__module__.startswith("transformers.") or not hasattr(model, "config"):
        return names
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key

        transforms = get_model_conversion_mapping(model)
    except Exception:  # an older transformers without conversion mappings, or a model it cannot map
        return names
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if not isinstance(t, WeightRenaming)]
    if not renamings:
        return names
    out = {}
    held = set(model.state_dict())
    for k in tensors:
        if k in held:  # already the name the model uses (a tensor a converter produced): renaming it again
            out[k] = k  # could rename a renamed part twice (".experts." -> ".mlp.experts.")
            continue
        new, converter = rename_source_key(k, renamings, converters)
        out[new if converter is None else k] = k
    return out


def _split(name: str) -> tuple[str, str]:
    path, _, leaf = name.rpartition(".")
    return path, leaf


def _module(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _output_dim(layer: nn.Module | None) -> int:
    return 0 if layer is None else output_dim(layer)


def _wn_dim(g_shape: tuple[int, ...], layer: nn.Module | None) -> int:
    """The dim weight norm was taken over, read from g's shape (the one dim that is not 1)."""
    dims = [d for d, n in enumerate(g_shape) if n != 1]
    return dims[0] if len(dims) == 1 else _output_dim(layer)


def _g_shape(shape: tuple[int, ...], dim: int) -> tuple[int, ...]:
    return tuple(n if d == dim else 1 for d, n in enumerate(shape))


def _fold(dim: int) -> Derive:
    def make(gv: list[torch.Tensor]) -> torch.Tensor:
        g, v = gv
        return (v.float() * (g.float() / torch.norm_except_dim(v.float(), 2, dim))).to(v.dtype)
    return make


def _norm_of(dim: int) -> Derive:
    return lambda w: torch.norm_except_dim(w[0], 2, dim)


def _const(value: float, dtype: torch.dtype, shape: tuple[int, ...]) -> Derive:
    return lambda _: torch.full(shape, value, dtype=dtype)


def _is_norm(module: nn.Module | None) -> bool:
    return module is not None and read_norm(module)[0] is not None


class KeyMapper:
    def __init__(self, model: nn.Module, tensors: dict[str, TensorInfo], where: str) -> None:
        self.model, self.where = model, where
        self.expected = model.state_dict(keep_vars=True)
        self.names = self._prefixed(tensors)  # target-side name -> checkpoint name
        self.avail = {k: tensors[v] for k, v in self.names.items()}
        self.used: set[str] = set()
        self.out = KeyMap()
        self.missing: list[str] = []
        self.mismatch: list[str] = []
        self.unexpected: list[str] = []
        self.counts: dict[str, list[str]] = {}

    def _prefixed(self, tensors: dict[str, TensorInfo]) -> dict[str, str]:
        """Checkpoint names as the target sees them: renamed as transformers renames them on load (v5
        checkpoint conversion mappings), HF's base-model prefix added or removed."""
        prefix = getattr(self.model, "base_model_prefix", "") or ""
        names = _hf_renamed(self.model, tensors)
        if not prefix or not tensors:
            return names
        p = prefix + "."
        target_has = any(k.startswith(p) for k in self.expected)
        ckpt_has = any(k.startswith(p) for k in names)
        if ckpt_has and not target_has:
            return {(k[len(p):] if k.startswith(p) else k): v for k, v in names.items()}
        if target_has and not ckpt_has and not (set(names) & set(self.expected)):
            return {p + k: v for k, v in names.items()}
        return names

    def note(self, kind: str, path: str) -> None:
        self.counts.setdefault(kind, []).append(path)

    def take(self, key: str, info: TensorInfo, sources: tuple[str, ...], make: Derive | None = None) -> None:
        self.out.entries[key] = Mapped(key, info.dtype, info.shape, tuple(self.names[s] for s in sources), make)
        self.used.update(sources)

    def run(self) -> KeyMap:
        groups: dict[int, list[str]] = {}
        for key, t in self.expected.items():
            groups.setdefault(id(t), []).append(key)
        for keys in groups.values():
            present = [k for k in keys if k in self.avail]
            first = present[0] if present else keys[0]
            self.resolve(first)
            for k in keys:
                if k != first:
                    self.out.aliases[k] = first
                    self.used.update(x for x in present if x == k)
                    self._mark_alias_sources(k)
        for name in self.avail:
            if name not in self.used:
                self.leftover(name)
        self.finish()
        return self.out

    def _mark_alias_sources(self, key: str) -> None:
        """A tied key takes its value from the key it shares storage with; what the checkpoint holds for it
        under its own name (``2.weight`` for a weight-norm parametrization shared with ``0``) is used too."""
        saved = (dict(self.out.entries), list(self.missing), list(self.mismatch),
                 {k: list(v) for k, v in self.counts.items()})
        self.resolve(key)
        self.out.entries, self.missing, self.mismatch, self.counts = saved

    def resolve(self, key: str) -> None:
        want = self.expected[key]
        shape = tuple(want.shape)
        if key in self.avail:
            have = self.avail[key]
            if have.shape != shape:
                self.mismatch.append(f"{key}: checkpoint {list(have.shape)}, model {list(shape)}")
            self.take(key, have, (key,))
            return
        path, leaf = _split(key)
        if self._weight_norm(key, shape) or self._fold_weight(key, path, leaf, shape):
            return
        module = _module(self.model, path)
        has_weight = f"{path}.weight" in self.avail
        # a norm without affine parameters (BatchNorm(affine=False)) has no other key to show it is there
        affine_free = module is not None and getattr(module, "weight", None) is None and getattr(module, "bias", None) is None
        if leaf in RUNNING_STATS and (has_weight or f"{path}.bias" in self.avail or affine_free) and _is_norm(module):
            value = 1.0 if leaf == "running_var" else 0.0
            self.take(key, TensorInfo(want.dtype, shape), (), _const(value, want.dtype, shape))
            self.note("stats_init", path)
            return
        if leaf == "bias" and has_weight and _is_norm(module):
            dtype = self.avail[f"{path}.weight"].dtype
            self.take(key, TensorInfo(dtype, shape), (), _const(0.0, dtype, shape))
            self.note("bias_init", path)
            return
        self.missing.append(key)

    def _weight_norm(self, key: str, shape: tuple[int, ...]) -> bool:
        """Target has weight norm (new or old keys); the checkpoint has the other form or a plain weight."""
        for forms in (WN_NEW, WN_OLD):
            for i, suffix in enumerate(forms):
                if not key.endswith("." + suffix) and key != suffix:
                    continue
                base = key[: len(key) - len(suffix)]
                other = WN_OLD if forms is WN_NEW else WN_NEW
                if base + other[i] in self.avail:
                    self.take(key, self.avail[base + other[i]], (base + other[i],))
                    return True
                plain = base + "weight"
                if plain not in self.avail:
                    return False
                w = self.avail[plain]
                layer = _module(self.model, base.rstrip("."))
                dim = self._target_wn_dim(layer)
                if i == 1:
                    self.take(key, w, (plain,))
                else:
                    self.take(key, TensorInfo(w.dtype, _g_shape(w.shape, dim)), (plain,), _norm_of(dim))
                    self.note("wn_split", base.rstrip("."))
                return True
        return False

    @staticmethod
    def _target_wn_dim(layer: nn.Module | None) -> int:
        if layer is not None and hasattr(layer, "parametrizations"):
            return int(getattr(layer.parametrizations["weight"][0], "dim", 0))
        for hook in getattr(layer, "_forward_pre_hooks", {}).values():
            if type(hook).__name__ == "WeightNorm":
                return int(hook.dim)
        return _output_dim(layer)

    def _fold_weight(self, key: str, path: str, leaf: str, shape: tuple[int, ...]) -> bool:
        """Target has a plain weight; the checkpoint has weight-norm g and v."""
        if leaf != "weight":
            return False
        prefix = f"{path}." if path else ""
        for g_name, v_name in ((prefix + WN_NEW[0], prefix + WN_NEW[1]), (prefix + WN_OLD[0], prefix + WN_OLD[1])):
            if g_name in self.avail and v_name in self.avail:
                g, v = self.avail[g_name], self.avail[v_name]
                dim = _wn_dim(g.shape, _module(self.model, path))
                self.take(key, TensorInfo(v.dtype, v.shape), (g_name, v_name), _fold(dim))
                if v.shape != shape:
                    self.mismatch.append(f"{key}: checkpoint {list(v.shape)} (weight norm v), model {list(shape)}")
                self.note("wn_fold", path)
                return True
        return False

    def leftover(self, name: str) -> None:
        path, leaf = _split(name)
        module = _module(self.model, path)
        if leaf in RUNNING_STATS and module is not None and getattr(module, leaf, None) is None and _is_norm(module):
            self.note("stats_dropped", path)
        elif leaf == "bias" and module is not None and getattr(module, "bias", None) is None and _is_norm(module):
            self.note("bias_dropped", path)
        else:
            self.unexpected.append(name)
            return
        self.out.dropped.append(self.names[name])

    def finish(self) -> None:
        if self.missing or self.unexpected or self.mismatch:
            raise CheckpointError(self.misfit_message())
        texts = {
            "stats_dropped": "running statistics (running_mean, running_var, num_batches_tracked) of {n} norms "
                             "dropped: the converted norms keep none",
            "bias_dropped": "bias of {n} norms dropped: the target norms have none",
            "stats_init": "running statistics of {n} BatchNorms are not in the checkpoint: set to mean 0, var 1; "
                          "recalibrate them on data before evaluating",
            "bias_init": "bias of {n} norms is not in the checkpoint: set to 0",
            "wn_split": "weight of {n} layers split into weight-norm g and v",
            "wn_fold": "weight-norm g and v of {n} layers folded into a plain weight",
        }
        for kind, paths in self.counts.items():
            paths = list(dict.fromkeys(paths))
            shown = ", ".join(p or "<root>" for p in paths[:4]) + (", ..." if len(paths) > 4 else "")
            self.out.notes.append(f"{texts[kind].format(n=len(paths))} ({shown})")

    def misfit_message(self) -> str:
        parts = []
        for label, keys in (("missing from the checkpoint", self.missing),
                            ("in the checkpoint but not in the model", [self.names[k] for k in self.unexpected]),
                            ("with a different shape", self.mismatch)):
            if keys:
                parts.append(f"{len(keys)} key(s) {label} (first: {', '.join(keys[:3])})")
        message = f"{self.where}: does not fit {type(self.model).__name__}: " + "; ".join(parts) + "."
        heads = classifier_head_paths(self.model)
        bad = [k.split(":")[0] for k in self.mismatch] + self.missing
        if heads and any(in_head(_split(k)[0], heads) for k in bad):
            sizes = sorted({self.avail[k].shape[0] for k in self.avail
                            if in_head(_split(k)[0], heads) and _split(k)[1] == "weight"})
            n = f"={sizes[0]}" if len(sizes) == 1 else "=N"
            message += (f" The classifier head differs: build the model with the checkpoint's number of classes "
                        f"(command line: --model-arg num_classes{n}; timm: create_model(..., num_classes{n})).")
        else:
            message += " Check that the model is the architecture the checkpoint was saved from."
        return message


def map_keys(model: nn.Module, tensors: dict[str, TensorInfo], *, where: str = "checkpoint") -> KeyMap:
    """How each state-dict key of ``model`` gets its value from a checkpoint holding ``tensors``.

    Raises :class:`~normswap.errors.CheckpointError` (naming ``where`` and the first keys) when the
    checkpoint does not fit. ``model`` may live on the ``meta`` device.

    Example:
        >>> import normswap
        >>> bn = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
        >>> tensors = {k: TensorInfo(v.dtype, tuple(v.shape)) for k, v in bn.state_dict().items()}
        >>> km = map_keys(normswap.convert(bn, "gn", groups=2), tensors)
        >>> km.notes[0][:40]
        'running statistics (running_mean, runnin'
    """
    return KeyMapper(model, tensors, where).run()
