"""``normswap.inspect``: the norm layers of a model and the tensors of a checkpoint, as tables.

It works on a model instance, a ``timm:NAME``, an HF folder, or a checkpoint file. Models named by string
are built on the ``meta`` device, so inspecting a large model or checkpoint reads no weights.
"""

from __future__ import annotations

import os
import pathlib
from collections import Counter
from dataclasses import dataclass, field

from torch import nn

from .adapters import read_norm
from .io.readers import TensorInfo
from .errors import CheckpointNotFoundError


@dataclass
class NormRow:
    """One norm layer: path, class, what it normalizes, eps, affine, fused activation."""

    path: str
    type: str
    kind: str
    features: str
    eps: str
    affine: str
    act: str


@dataclass
class TensorSummary:
    """The tensors of a checkpoint: how many, how large, which dtypes, the largest few."""

    count: int
    nbytes: int
    numel: int
    dtypes: dict[str, int]
    largest: list[tuple[str, tuple[int, ...], str, int]]


@dataclass
class Inspection:
    """What :func:`inspect` found; ``str()`` prints it as tables."""

    source: str
    norms: list[NormRow] | None = None
    tensors: TensorSummary | None = None
    conversions: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"{self.source}"]
        for c in self.conversions:
            opts = ", ".join(f"{k}={v}" for k, v in c.get("options", {}).items() if v not in (None, [], ()))
            lines.append(f"converted with spec {c['spec']}" + (f" ({opts})" if opts else ""))
        if self.norms is not None:
            lines.append(f"{len(self.norms)} norm layers")
            header = ("path", "type", "kind", "features", "eps", "affine", "fused act")
            rows = [(r.path, r.type, r.kind, r.features, r.eps, r.affine, r.act) for r in self.norms]
            widths = [min(56, max([len(h)] + [len(row[i]) for row in rows])) for i, h in enumerate(header)]
            for row in [header, tuple("-" * w for w in widths), *rows]:
                lines.append("  ".join((v if len(v) <= w else v[: w - 1] + "…").ljust(w)
                                       for v, w in zip(row, widths)).rstrip())
        if self.tensors is not None:
            t = self.tensors
            dtypes = ", ".join(f"{d} x{n}" for d, n in sorted(t.dtypes.items()))
            lines.append(f"{t.count} tensors, {t.numel:,} values, {t.nbytes / 2**20:.1f} MB ({dtypes})")
            lines.append("largest tensors:")
            lines += [f"  {name}  {list(shape)}  {dtype}  {n / 2**20:.2f} MB" for name, shape, dtype, n in t.largest]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def norm_rows(model: nn.Module) -> list[NormRow]:
    """One :class:`NormRow` per norm module of ``model`` (shared modules once, at their first path).

    Example:
        >>> [r.features for r in norm_rows(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)))]
        ['8']
    """
    rows, seen = [], set()
    for path, module in model.named_modules():
        if id(module) in seen:
            continue
        seen.add(id(module))
        info, reason = read_norm(module)
        if info is None and reason is None:
            continue
        name = type(module).__name__
        if info is None:
            rows.append(NormRow(path or "<root>", name, "?", "-", "-", "-", f"not readable: {reason}"))
            continue
        acts = [type(m).__name__ for m in (info.drop, info.act) if m is not None]
        features = "x".join(map(str, info.normalized_shape)) if not info.channels_first else str(info.num_features)
        features = features or "any"  # a norm without parameters that takes its size from the input
        kind = f"{info.kind} (probed)" if info.identified else info.kind
        rows.append(NormRow(path or "<root>", name, kind, features, f"{info.eps:g}",
                            "yes" if info.weight is not None else "no", "+".join(acts) or "-"))
    return rows


def _summary(tensors: dict[str, TensorInfo], top: int = 5) -> TensorSummary:
    def dtype(t: TensorInfo) -> str:
        return str(t.dtype).removeprefix("torch.")

    largest = sorted(tensors.items(), key=lambda kv: -kv[1].nbytes)[:top]
    return TensorSummary(
        count=len(tensors), nbytes=sum(t.nbytes for t in tensors.values()),
        numel=sum(t.numel for t in tensors.values()),
        dtypes=dict(Counter(dtype(t) for t in tensors.values())),
        largest=[(k, tuple(t.shape), dtype(t), t.nbytes) for k, t in largest],
    )


def inspect(target: str | os.PathLike | nn.Module, *, model: str | None = None) -> Inspection:
    """Tabulate the norm layers of a model and, for a checkpoint, its tensors.

    ``target`` is a model, ``"timm:NAME"``, an HF folder, or a checkpoint file; for a checkpoint without a
    normswap record, ``model`` names its architecture so its norms can be listed too.

    Example:
        >>> print(inspect(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))).norms[0].type)
        BatchNorm2d
    """
    from .checkpoints.save_load import base_builder, recorded_conversions
    from .checkpoints.record import replay
    from .core.state import conversions_of
    from .checkpoints.record import open_checkpoint
    from .named_models import build_model

    if isinstance(target, nn.Module):
        return Inspection(type(target).__name__, norm_rows(target), conversions=conversions_of(target))
    text = os.fspath(target)
    if text.startswith("timm:"):
        return Inspection(text, norm_rows(build_model(text, device="meta")))
    path = pathlib.Path(text)
    try:
        ckpt = open_checkpoint(path)
    except CheckpointNotFoundError:
        if path.is_dir() and (path / "config.json").is_file():  # a config-only HF folder
            built = build_model(text, device="meta")
            return Inspection(text, norm_rows(built), conversions=conversions_of(built))
        raise
    with ckpt:
        result = Inspection(text, tensors=_summary(ckpt.tensors))
        conversions = recorded_conversions(ckpt)
        if model is None and ckpt.config is None and not (ckpt.record or {}).get("base"):
            result.notes.append("the checkpoint does not name its model; pass --model timm:NAME (or an HF "
                                "folder) to list its norm layers")
            return result
        built = replay(base_builder(ckpt, model, {})(device="meta"), conversions)
        result.norms, result.conversions = norm_rows(built), conversions_of(built)
    return result
