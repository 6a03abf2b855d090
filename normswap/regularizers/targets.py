"""The weights a regularizer works on: each conv / linear weight as a batch of matrices.

A weight becomes ``[groups, rows, cols]``: a linear ``[out, in]`` is one ``out x in`` matrix; a conv
``[out, in / groups, *kernel]`` is ``groups`` matrices of ``out / groups`` rows (filters in different groups
see different inputs, so only filters of one group are compared); HF's ``Conv1D`` stores ``[in, out]`` and
is read transposed. Weights with the same matrix shape, dtype and device form one bucket, so a regularizer
runs one batched matrix product (``bmm``) per bucket instead of one per weight.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..errors import OptionError
from ..core.selection import classifier_head_paths, globs, in_head, selected, unmatched, weight_layers


@dataclass
class WeightMatrices:
    """One selected weight read as ``[groups, rows, cols]`` matrices."""

    path: str
    param: nn.Parameter
    groups: int
    rows: int
    cols: int
    transposed: bool  # HF Conv1D: the parameter is [in, out]

    def matrices(self, t: Tensor | None = None) -> Tensor:
        """The parameter (or a tensor of its shape, e.g. its gradient) as ``[groups, rows, cols]``."""
        t = self.param if t is None else t
        return t.t().unsqueeze(0) if self.transposed else t.reshape(self.groups, self.rows, self.cols)

    def as_param(self, m: Tensor) -> Tensor:
        """Inverse of :meth:`matrices`: ``[groups, rows, cols]`` back to the parameter's shape."""
        return m[0].t() if self.transposed else m.reshape(self.param.shape)


@dataclass
class Bucket:
    """Weights whose matrices share one shape, dtype and device: stacked and multiplied together."""

    rows: int
    cols: int
    entries: list[WeightMatrices] = field(default_factory=list)

    @property
    def count(self) -> int:
        """How many matrices the bucket stacks."""
        return sum(e.groups for e in self.entries)

    def stack(self, differentiable: bool) -> Tensor:
        """All matrices as one ``[count, rows, cols]`` tensor (tracked by autograd when ``differentiable``)."""
        mats = [e.matrices() if differentiable else e.matrices().detach() for e in self.entries]
        return mats[0] if len(mats) == 1 else torch.cat(mats)

    def split(self, t: Tensor) -> Iterator[tuple[WeightMatrices, Tensor]]:
        """Cut a ``[count, rows, cols]`` tensor back into per-parameter pieces, in parameter shape."""
        start = 0
        for e in self.entries:
            yield e, e.as_param(t[start:start + e.groups])
            start += e.groups


def _matrices_of(path: str, module: nn.Module) -> WeightMatrices:
    w = module.weight
    if type(module).__name__ == "Conv1D" and not isinstance(module, nn.modules.conv._ConvNd):
        return WeightMatrices(path, w, 1, w.shape[1], w.shape[0], transposed=True)
    groups = int(getattr(module, "groups", 1)) if isinstance(module, nn.modules.conv._ConvNd) else 1
    return WeightMatrices(path, w, groups, w.shape[0] // groups, math.prod(w.shape[1:]), transposed=False)


def select_weights(
    model: nn.Module, include: object, exclude: object, exclude_head: bool, who: str
) -> list[WeightMatrices]:
    """The conv / linear weights ``who`` works on (see :class:`~normswap.regularizers.OrthogonalRegularizer`).

    Without ``include``, every conv / linear weight except the classifier head's (when ``exclude_head``);
    with ``include``, the layers matching one of its globs (the head too, if a glob names it); then the
    ``exclude`` globs are taken out. A glob that matches no layer is warned about by name. Frozen weights
    (``requires_grad=False``) are left out.
    """
    inc, exc = globs("include", include), globs("exclude", exclude)
    layers = weight_layers(model)
    for kind, patterns in (("include", inc), ("exclude", exc)):
        for g in unmatched(patterns, layers):
            warnings.warn(f"{who}: {kind} glob {g!r} matches no conv or linear layer of {type(model).__name__}",
                          UserWarning, stacklevel=4)
    heads = classifier_head_paths(model) if exclude_head and not inc else set()
    chosen = [
        _matrices_of(path, m) for path, m in layers.items()
        if m.weight.requires_grad and selected([path], inc, exc) and not in_head(path, heads)
    ]
    if not chosen:
        raise OptionError(
            f"{who}: no conv or linear weight of {type(model).__name__} is selected "
            f"(include={list(inc)}, exclude={list(exc)}); widen include= or narrow exclude=."
        )
    return chosen


def buckets_of(weights: list[WeightMatrices]) -> list[Bucket]:
    """Group weights by matrix shape, dtype and device (one batched product per bucket)."""
    by_key: dict[tuple, Bucket] = {}
    for w in weights:
        key = (w.rows, w.cols, w.param.dtype, w.param.device)
        by_key.setdefault(key, Bucket(w.rows, w.cols)).entries.append(w)
    return list(by_key.values())
