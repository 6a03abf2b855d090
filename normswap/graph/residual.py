"""The residual stream that a model's LayerNorms read, found from one recorded forward pass.

In a pre-LN transformer every LayerNorm reads the residual stream, and the stream is a sum of what its
writers add: embeddings, each attention and MLP output projection, a patch-embedding conv, a class token.
If every writer's output has zero mean over the features, so has the stream, and a LayerNorm reading it
computes exactly what an RMSNorm with the same weight and bias does (the idea SliceGPT and QuaRot apply
by hand, one model family at a time).

``torch.fx`` cannot trace most transformers-5 models whole, so the graph is recorded instead: one
forward pass in eval mode under a ``TorchFunctionMode`` keeps every torch call (its tensor inputs and
outputs; the module it ran in). :func:`find_stream` walks back from each LayerNorm's input through sums
and shape-only ops (dropout in eval, views, transposes, slices, concatenation, scaling by a per-row or
scalar factor) to the writers: ``linear`` / ``addmm`` (HF ``Conv1D``) / ``embedding`` / conv calls on a
model parameter, a parameter read directly, or the output of another LayerNorm that heads the stream
(its output is centered at run time). Anything else on the way (a LayerNorm that reads the stream and
writes it again, as post-LN models do; a nonlinear op; a tensor that is not a parameter) is refused with
the first LayerNorm it concerns and why. Every tensor of the stream must be read only by the stream
itself and by LayerNorms, which do not see a shift of the mean; a centered parameter that something else
reads too is refused, except a tied output projection (``lm_head``), which is untied and keeps the
original weight.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from ..errors import ConversionError

__all__ = ["Stream", "Writer", "find_stream"]


@dataclass(frozen=True)
class Writer:
    """A parameter to center: subtract its mean along ``dim`` (the stream's features)."""

    param: str
    dim: int
    how: str
    scale: str = ""  # a per-feature scale applied to the writer's output (LayerScale): centered weighted by it


@dataclass
class Stream:
    """What makes the LayerNorms' inputs zero-mean: writers to center, LayerNorms whose output must be
    centered (they head the stream), and modules whose tied weight must be untied from a centered one."""

    writers: list[Writer] = field(default_factory=list)
    heads: list[str] = field(default_factory=list)
    untie: list[tuple[str, str]] = field(default_factory=list)  # (module path, the centered parameter's path)


@dataclass
class _Op:
    name: str
    func: Callable
    args: tuple
    kwargs: dict
    inputs: list[tuple[int, int]]
    outputs: list[Tensor]
    module: str


def _key(t: Tensor) -> tuple[int, int]:
    return id(t), t._version


def _func_name(func: Callable) -> str:
    name = getattr(func, "__name__", "") or repr(func)
    if name == "__get__":  # a property of Tensor (``.T``, ``.mT``): ``<attribute 'T' ...>.__get__``
        name = getattr(getattr(func, "__self__", None), "__name__", name)
    return name.strip("_").removesuffix("_") if name not in ("__getitem__",) else "getitem"


class _Tape(TorchFunctionMode):
    """Every torch call of one forward: producers and consumers of each tensor version."""

    def __init__(self, where: list[str]) -> None:
        super().__init__()
        self.where = where
        self.producer: dict[tuple[int, int], tuple[_Op, int]] = {}
        self.consumers: dict[tuple[int, int], list[_Op]] = defaultdict(list)
        self.keep: list[Any] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat_in = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)]
        in_keys = [_key(t) for t in flat_in]
        out = func(*args, **kwargs)
        flat_out = [t for t in tree_flatten(out)[0] if isinstance(t, Tensor)]
        if not flat_out:
            return out  # sizes, dtypes, bools: reading them does not depend on the values
        op = _Op(_func_name(func), func, args, kwargs, in_keys, flat_out, self.where[-1])
        for k in in_keys:
            self.consumers[k].append(op)
        for i, t in enumerate(flat_out):
            k = _key(t)
            if k not in in_keys:  # an op that returns its input unchanged (dropout in eval) is no producer
                self.producer[k] = (op, i)
        self.keep.extend((flat_in, flat_out))
        return out


# ops that only move or scale rows: each feature of a row stays a feature of one row of the output
_VIEWS = {"view", "reshape", "flatten", "unflatten", "contiguous", "clone", "to", "type", "type_as", "float",
          "half", "bfloat16", "double", "dropout", "alpha_dropout", "feature_alpha_dropout", "expand",
          "expand_as", "squeeze", "unsqueeze", "detach", "view_as", "reshape_as"}
_RESHAPES = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as"}
_PERMUTES = {"transpose", "permute", "swapaxes", "swapdims", "movedim", "T", "mT"}
_SUMS = {"add", "iadd", "radd", "sub", "isub", "rsub"}
_SCALES = {"mul", "imul", "rmul", "div", "idiv", "truediv", "itruediv"}
_CATS = {"cat", "concat", "concatenate", "stack"}
_CONVS = {"conv1d", "conv2d", "conv3d"}


def _reshaped_dim(src: tuple[int, ...], dst: tuple[int, ...], dim: int) -> int | None:
    """The dim of ``src`` (negative) that dim ``dim`` of ``dst`` came from through a reshape, or None.

    A reshape that merges the features with another dim (Swin's patch merging flattens 2x2 neighbours into
    one row) is None: centering each part is not a shift of the merged row, so a LayerNorm reading it
    would see another input."""
    if not dst:
        return None
    j = dim % len(dst)
    before = math.prod(dst[:j])
    for i, size in enumerate(src):
        if size == dst[j] and math.prod(src[:i]) == before:
            return i - len(src)
    return None


def _indexed_dim(index: Any, ndim: int, dim: int) -> tuple[int | None, bool]:
    """For ``x[index]`` with ``x.ndim == ndim``: the output dim (negative) holding input dim ``dim``, and
    whether that dim is kept whole. Only basic indexing (ints, slices, None, Ellipsis) is read."""
    entries = list(index) if isinstance(index, tuple) else [index]
    if any(not (e is None or e is Ellipsis or isinstance(e, (int, slice))) for e in entries):
        return None, False
    consumed = sum(1 for e in entries if e is not None and e is not Ellipsis)
    if Ellipsis in entries:
        at = entries.index(Ellipsis)
        entries[at:at + 1] = [slice(None)] * (ndim - consumed)
    entries += [slice(None)] * (ndim - sum(1 for e in entries if e is not None))
    pos, target = 0, dim % ndim
    for k, e in enumerate(entries):
        if e is None:
            continue
        if pos == target:
            if not isinstance(e, slice) or e != slice(None):
                return None, False
            after = sum(1 for f in entries[k + 1:] if f is None or isinstance(f, slice))
            return -(1 + after), True
        pos += 1
    return None, False


class _Walk:
    def __init__(self, tape: _Tape, params: dict[int, str], norms: dict[tuple[int, int], str], readers: set[str]
                 ) -> None:
        self.tape, self.params, self.norms, self.readers = tape, params, norms, readers
        self.stream: set[tuple[int, int]] = set()
        self.writers: dict[str, Writer] = {}
        self.writer_ops: set[int] = set()
        self.heads: dict[str, tuple[int, int]] = {}
        self.reader: str = ""
        self.scale: str = ""

    def refuse(self, why: str) -> None:
        raise ConversionError(f"{self.reader}: exact=True cannot make its input zero-mean: {why}")

    def visit(self, t: Tensor, dim: int) -> None:
        k = _key(t)
        if k in self.stream:
            return
        self.stream.add(k)
        if k in self.norms:
            if self.scale:
                self.refuse(f"the output of LayerNorm {self.norms[k]} is scaled per feature by {self.scale}")
            self.head(self.norms[k], k)
            return
        found = self.tape.producer.get(k)
        if found is None:
            name = self.params.get(id(t))
            if name is None:
                self.refuse(f"it adds a tensor that is neither a parameter nor computed from one (shape "
                            f"{tuple(t.shape)}), such as the model's input or a buffer")
            self.add_writer(name, dim % t.ndim, "parameter read directly")
            return
        op, index = found
        self.through(op, index, t, dim)

    def head(self, path: str, key: tuple[int, int]) -> None:
        if path not in self.readers:
            self.refuse(f"the stream starts at the output of LayerNorm {path}, which is not converted")
        self.heads[path] = key

    def add_writer(self, name: str, dim: int, how: str) -> None:
        known = self.writers.setdefault(name, Writer(name, dim, how, self.scale))
        if known.scale != self.scale or known.dim != dim:
            self.refuse(f"parameter {name} writes the stream twice, in different ways")

    def through(self, op: _Op, index: int, out: Tensor, dim: int) -> None:
        name, args = op.name, op.args
        tensors = [a for a in args if isinstance(a, Tensor)]
        where = f"{op.name} in {op.module or '<root>'}"
        if name in _SUMS:
            for a in args[:2]:
                if isinstance(a, Tensor):
                    if a.ndim < -dim or a.shape[dim] != out.shape[dim]:
                        self.refuse(f"{where} adds a tensor of shape {tuple(a.shape)} that is constant across "
                                    "the features (it shifts each row's mean)")
                    self.visit(a, dim)
                elif a != 0:
                    self.refuse(f"{where} adds the constant {a!r} to every feature")
            alpha = op.kwargs.get("alpha", 1)
            if len(args) > 2 or not isinstance(alpha, (int, float)):
                self.refuse(f"{where} has arguments the walk does not read")
            return
        if name in _SCALES:
            streamed = [a for a in args[:2] if isinstance(a, Tensor) and a.ndim >= -dim and a.shape[dim] == out.shape[dim]
                        and a.shape[dim] != 1]
            if len(streamed) == 2 and name in ("mul", "imul", "rmul") and not self.scale:
                self.layer_scale(streamed, dim, where)
                return
            if len(streamed) != 1 or (name in ("div", "idiv", "truediv", "itruediv") and streamed[0] is not args[0]):
                self.refuse(f"{where} scales the features one by one (not by one factor per row)")
            self.visit(streamed[0], dim)
            return
        if name in _VIEWS:
            src = args[0] if args and isinstance(args[0], Tensor) else (tensors[0] if tensors else None)
            if src is None:
                self.refuse(f"{where} has no tensor input")
            mapped = _reshaped_dim(tuple(src.shape), tuple(out.shape), dim)
            if mapped is None and src.ndim >= -dim and src.shape[dim] == out.shape[dim] and name not in _RESHAPES:
                mapped = dim  # expand / broadcast keeps the trailing dims where they are
            if mapped is None:
                self.refuse(f"{where} reshapes the features")
            self.visit(src, mapped)
            return
        if name in _PERMUTES:
            self.visit(args[0], self.permuted(op, args[0], out, dim, where))
            return
        if name == "getitem":
            src = args[0]
            d_src = None
            for cand in range(-src.ndim, 0):
                m, whole = _indexed_dim(args[1], src.ndim, cand)
                if whole and m == dim:
                    d_src = cand
            if d_src is None:
                self.refuse(f"{where} indexes into the features")
            self.visit(src, d_src)
            return
        if name in _CATS:
            pieces = args[0]
            axis = op.kwargs.get("dim", args[1] if len(args) > 1 else 0)
            if name == "stack":
                self.refuse(f"{where} stacks tensors (not read)")
            if axis % out.ndim == dim % out.ndim:
                self.refuse(f"{where} concatenates along the features")
            for p in pieces:
                self.visit(p, dim)
            return
        if name in ("roll", "flip", "mean", "sum", "pad"):
            self.visit(args[0], self.kept_dim(op, args[0], out, dim, where))
            return
        if name in ("split", "chunk", "unbind", "tensor_split"):
            axis = op.kwargs.get("dim", args[2] if len(args) > 2 else 0)
            if name == "unbind" or axis % args[0].ndim == dim % out.ndim:
                self.refuse(f"{where} splits the features")
            self.visit(args[0], dim)
            return
        self.writer(op, out, dim, where)

    def layer_scale(self, pair: list[Tensor], dim: int, where: str) -> None:
        """``x * gamma`` with ``gamma`` a per-feature parameter (LayerScale): ``x``'s writers are centered
        weighted by ``gamma``, so that the product is zero-mean."""
        for gamma, x in (pair, pair[::-1]):
            name = self.params.get(id(gamma))
            if name is not None and self.tape.producer.get(_key(gamma)) is None \
                    and gamma.numel() == gamma.shape[dim]:
                self.scale = name
                try:
                    self.visit(x, dim)
                finally:
                    self.scale = ""
                return
        self.refuse(f"{where} scales the features one by one by a computed tensor (not a per-feature parameter)")

    def kept_dim(self, op: _Op, src: Tensor, out: Tensor, dim: int, where: str) -> int:
        """Ops that act along other dims than the features (a spatial roll or flip, zero padding, a mean or
        sum over tokens) keep each row zero-mean: the feature dim of ``src`` for ``dim`` of ``out``."""
        name, args, kw = op.name, op.args, op.kwargs
        n = src.ndim
        feature = (out.ndim + dim) if out.ndim == n else None
        if name == "pad":
            pad = args[1] if len(args) > 1 else kw.get("pad")
            value = args[3] if len(args) > 3 else kw.get("value", 0)
            mode = args[2] if len(args) > 2 else kw.get("mode", "constant")
            touched = {n - 1 - i // 2 for i, p in enumerate(pad) if p}
            if mode != "constant" or value or (n + dim) in touched:
                self.refuse(f"{where} pads the features or pads with a value other than zero")
            return dim
        axes = args[2] if name == "roll" and len(args) > 2 else kw.get("dims" if name in ("roll", "flip") else "dim")
        if name == "flip" and axes is None and len(args) > 1:
            axes = args[1]
        if name in ("mean", "sum") and axes is None and len(args) > 1:
            axes = args[1]
        if axes is None:
            if name == "roll":
                self.refuse(f"{where} rolls the flattened tensor")
            if name in ("mean", "sum"):
                self.refuse(f"{where} reduces over every dim")
        axes = [axes] if isinstance(axes, int) else list(axes)
        axes = [a % n for a in axes]
        if name in ("mean", "sum"):
            keep = kw.get("keepdim", args[2] if len(args) > 2 else False)
            if keep:
                feature = out.ndim + dim
            else:
                kept = [d for d in range(n) if d not in axes]
                feature = kept[dim % out.ndim]
        if feature is None or feature in axes:
            self.refuse(f"{where} acts along the features")
        return feature - n

    def permuted(self, op: _Op, src: Tensor, out: Tensor, dim: int, where: str) -> int:
        n = out.ndim
        if op.name in ("T", "mT"):
            order = list(range(n))[::-1] if op.name == "T" else [*range(n - 2), n - 1, n - 2]
        elif op.name == "permute":
            dims = op.args[1:] if len(op.args) > 2 or isinstance(op.args[1], int) else op.args[1]
            order = [d % n for d in dims]
        elif op.name == "movedim":
            self.refuse(f"{where} moves dims (not read)")
        else:
            a, b = (op.args[1] % n, op.args[2] % n) if len(op.args) > 2 else (op.kwargs["dim0"] % n, op.kwargs["dim1"] % n)
            order = list(range(n))
            order[a], order[b] = order[b], order[a]
        return order[dim % n] - n

    def writer(self, op: _Op, out: Tensor, dim: int, where: str) -> None:
        args, name = op.args, op.name
        if name == "linear" and dim % out.ndim == out.ndim - 1:
            w, b = args[1], (args[2] if len(args) > 2 else op.kwargs.get("bias"))
            self.param_writer(w, 0, "output features of a linear layer", where)
            if b is not None:
                self.param_writer(b, 0, "bias of a linear layer", where)
        elif name == "addmm" and out.ndim == 2 and dim % 2 == 1:  # HF Conv1D: bias + x @ weight
            self.param_writer(args[2], 1, "output features of a Conv1D layer", where)
            self.param_writer(args[0], args[0].ndim - 1, "bias of a Conv1D layer", where)
        elif name == "embedding" and dim % out.ndim == out.ndim - 1:
            self.param_writer(args[1], 1, "rows of an embedding table", where)
        elif name in _CONVS and dim % out.ndim == 1:
            self.param_writer(args[1], 0, "output channels of a conv", where)
            b = args[2] if len(args) > 2 else op.kwargs.get("bias")
            if b is not None:
                self.param_writer(b, 0, "bias of a conv", where)
        else:
            self.refuse(f"it reads the output of {where}, which is not a sum of linear writers")
        self.writer_ops.add(id(op))

    def param_writer(self, p: Any, dim: int, how: str, where: str) -> None:
        name = self.params.get(id(p)) if isinstance(p, Tensor) else None
        if name is None:
            self.refuse(f"{where} takes a weight that is not a parameter of the model")
        self.add_writer(name, dim, how)


def _module_tracker(model: nn.Module, where: list[str]) -> list[Any]:
    handles = []
    for path, module in model.named_modules():
        def pre(_m, _a, path=path):
            where.append(path)

        def post(_m, _a, _o):
            where.pop()

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post, always_call=True))
    return handles


def find_stream(model: nn.Module, run: Callable[[], Any], readers: dict[str, nn.Module]) -> Stream:
    """Record ``run()`` (one forward of ``model``) and find what makes every reader's input zero-mean.

    ``readers`` are the LayerNorms to convert, by path; each must normalize the last dim.

    Example:
        >>> m = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8))
        >>> s = find_stream(m, lambda: m(torch.randn(2, 4)), {"1": m[1]})
        >>> [(w.param, w.dim) for w in s.writers]
        [('0.weight', 0), ('0.bias', 0)]
    """
    params: dict[int, str] = {}
    holders: dict[int, list[tuple[str, str]]] = defaultdict(list)
    for mpath, module in model.named_modules(remove_duplicate=False):
        for pname, p in module._parameters.items():
            if p is not None:
                full = f"{mpath}.{pname}" if mpath else pname
                params.setdefault(id(p), full)
                holders[id(p)].append((mpath, pname))
    where: list[str] = [""]
    inputs: dict[str, Tensor] = {}
    outputs: dict[tuple[int, int], str] = {}
    keep: list[Tensor] = []
    handles = _module_tracker(model, where)
    for path, norm in readers.items():
        def grab_in(_m, args, path=path):
            if args and isinstance(args[0], Tensor) and path not in inputs:
                inputs[path] = args[0]

        def grab_out(_m, _a, out, path=path):
            if isinstance(out, Tensor):
                outputs[_key(out)] = path
                keep.append(out)

        handles.append(norm.register_forward_pre_hook(grab_in))
        handles.append(norm.register_forward_hook(grab_out))
    tape = _Tape(where)
    try:
        with torch.no_grad(), tape:
            run()
    finally:
        for h in handles:
            h.remove()
    missing = [p for p in readers if p not in inputs]
    if missing:
        raise ConversionError(f"{missing[0]}: exact=True found no call of this LayerNorm in a forward pass on the "
                              "example inputs, so what it reads is unknown; pass example_inputs= that reach it")
    walk = _Walk(tape, params, outputs, set(readers))
    order = list(readers)
    for path in order:
        walk.reader = path
        walk.visit(inputs[path], -1)
    for head in walk.heads:  # a LayerNorm heading the stream may not itself read the stream it writes
        walk.reader = head
        head_in = _Walk(tape, params, outputs, set(readers))
        head_in.reader = head
        head_in.visit(inputs[head], -1)
        if head_in.heads:
            first = next(iter(head_in.heads))
            raise ConversionError(f"{head}: exact=True cannot convert this model: this LayerNorm reads the residual "
                                  f"stream (headed by {first}) and writes its output back as the stream (a post-LN "
                                  "model); RMSNorm equals LayerNorm only on a stream that is a sum of writers")
    stream_ops = {id(tape.producer[k][0]) for k in walk.stream if k in tape.producer}
    _check_consumers(walk, tape, stream_ops)
    untie = _ties(walk, tape, params, holders, stream_ops)
    return Stream(writers=list(walk.writers.values()), heads=list(walk.heads), untie=untie)


_NORM_OPS = {"layer_norm"}


def _inside(module: str, paths: set[str]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in paths)


def _check_consumers(walk: _Walk, tape: _Tape, stream_ops: set[int]) -> None:
    """Every tensor on the stream is read only by the stream's own ops and by LayerNorms (what runs inside
    a LayerNorm being converted does not matter: the module is replaced)."""
    for k in walk.stream:
        for op in tape.consumers.get(k, []):
            if id(op) in stream_ops or op.name in _NORM_OPS or id(op) in walk.writer_ops:
                continue
            if _inside(op.module, walk.readers):
                continue
            if op.name in ("getitem", *_VIEWS) and all(_key(o) in walk.stream or not _used(tape, o) for o in op.outputs):
                continue
            raise ConversionError(f"{op.module or '<root>'}: exact=True cannot convert this model: {op.name} in "
                                  f"{op.module or '<root>'} reads the residual stream directly (not through a "
                                  "LayerNorm), so centering the stream's writers would change what it computes")


def _used(tape: _Tape, t: Tensor) -> bool:
    return bool(tape.consumers.get(_key(t)))


def _ties(walk: _Walk, tape: _Tape, params: dict[int, str], holders: dict[int, list[tuple[str, str]]],
          stream_ops: set[int]) -> list[tuple[str, str]]:
    """Modules that hold a centered parameter but read it as something other than a stream writer: a tied
    ``lm_head`` (a linear layer's ``weight``) is untied; anything else is refused."""
    by_name = {name: pid for pid, name in params.items()}
    readers_of: dict[int, list[_Op]] = defaultdict(list)  # parameter id -> the ops that read it
    for (tid, _version), ops in tape.consumers.items():
        if tid in params:
            readers_of[tid].extend(ops)
    untie: list[tuple[str, str]] = []
    for w in walk.writers.values():
        pid = by_name[w.param]
        users = [op for op in readers_of[pid] if id(op) not in walk.writer_ops and id(op) not in stream_ops]
        for op in users:
            owners = [(m, n) for m, n in holders[pid] if n == "weight" and m == op.module]
            if op.name == "linear" and owners:
                if (op.module, w.param) not in untie:
                    untie.append((op.module, w.param))
                continue
            raise ConversionError(f"{w.param}: exact=True would center this parameter, but {op.name} in "
                                  f"{op.module or '<root>'} also reads it (not as a residual-stream writer)")
    return untie
