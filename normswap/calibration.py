"""``normswap.calibrate``: give a converted pretrained model its function back, from unlabeled inputs.

A conversion that changes what a layer computes (BatchNorm -> GroupNorm + WS, GroupNorm, InstanceNorm,
LayerNorm) keeps the trained weights but not the statistics they were trained with, so the converted
model's outputs drift from the original's. Calibration trains the converted model to reproduce the
original's outputs on inputs alone (no labels): by default only the affine parameters of the converted
norms, which is cheap and enough for most of the drift, or every parameter with ``params="all"``.
"""

from __future__ import annotations

import math
import os
import pathlib
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .core.state import last_plan
from .errors import NormSwapError, OptionError
from .inputs import Inputs, eval_mode, example_inputs, map_inputs, output_tensor, split_inputs

__all__ = ["Agreement", "Calibration", "CalibrationReport", "calibrate"]

PARAMS = ("norms", "all")
# measured on BatchNorm CNNs converted to GroupNorm (+ WS), InstanceNorm and LayerNorm (benchmarks/bench_calibrate.py):
# "norms" at 1e-2 reaches 99% of the original's accuracy two to four times later; "all" at 3e-3 left InstanceNorm
# (few steps in the budget) short of 99% at 20 s, 8e-3 set LayerNorm back; 1e-3 with the converted norms' parameters
# at 30 times that, or a rate that decays over the budget, generalizes worse. On timm resnet18 (11M parameters,
# few steps per budget) "norms" reached 99% first. Lower "all" for large pretrained transformers.
DEFAULT_LR = {"norms": 3e-2, "all": 5e-3}


@dataclass(frozen=True)
class Agreement:
    """How close the converted model's outputs are to the original's on the same inputs: mean squared
    difference, and the share of rows whose arg-max (top-1 class) is the same."""

    mse: float
    top1: float


@dataclass
class CalibrationReport:
    """What :func:`calibrate` did: agreement with the original before and after, on the first batches of
    the data; steps taken, time spent, what was trained and why it stopped."""

    before: Agreement
    after: Agreement
    steps: int
    seconds: float
    params: str
    trained: int
    stopped: str

    def __str__(self) -> str:
        return (f"calibrated {self.trained} {self.params} parameter values in {self.steps} steps, "
                f"{self.seconds:.1f} s (stopped: {self.stopped})\n"
                f"  agreement with the original: top-1 {self.before.top1:.3f} -> {self.after.top1:.3f}, "
                f"output MSE {self.before.mse:.4g} -> {self.after.mse:.4g}")


def _as_inputs(batch: Any, where: str) -> Inputs:
    try:
        return split_inputs(batch)
    except OptionError as exc:
        raise OptionError(f"{where}: {exc}") from None


class _Batches:
    """The data as an endless stream of batches: a re-iterable (a list, a DataLoader) is iterated again at
    its end; a one-shot iterator is kept in memory on its first pass and replayed."""

    def __init__(self, data: Any) -> None:
        if isinstance(data, (torch.Tensor, dict)) or not isinstance(data, Iterable):
            raise OptionError("data must be an iterable of batches (a list, a DataLoader, a generator), got "
                              f"{type(data).__name__}; wrap a single batch in a list")
        self.data = data
        self.one_shot = iter(data) is data
        self.kept: list[Any] = []
        self.epochs = 0

    def __iter__(self) -> Iterator[Any]:
        while True:
            source = self.kept if self.one_shot and self.epochs else self.data
            count = 0
            for batch in source:
                if self.one_shot and not self.epochs:
                    self.kept.append(batch)
                count += 1
                yield batch
            self.epochs += 1
            if count == 0:
                raise OptionError("data holds no batch")


def _norm_params(converted: nn.Module) -> list[nn.Parameter] | None:
    """The floating-point parameters of the norms the conversion replaced (None: not a normswap conversion)."""
    plan = last_plan(converted)
    if plan is None:
        return None
    seen: set[int] = set()
    chosen = []
    for change in plan.replaced:
        for p in converted.get_submodule(change.path).parameters():
            if id(p) not in seen and p.is_floating_point():
                seen.add(id(p))
                chosen.append(p)
    return chosen


def _trainable(converted: nn.Module, params: str) -> list[nn.Parameter]:
    """What to train: the converted norms' parameters (``norms``), or every floating-point parameter
    (``all``; ``params`` checked by the caller)."""
    if params == "norms":
        chosen = _norm_params(converted)
        if chosen is None:
            raise NormSwapError(f"{type(converted).__name__} was not made by normswap.convert (or loaded by "
                                "normswap.load), so its converted norms are unknown; pass params='all'")
        if not chosen:
            raise NormSwapError(f"{type(converted).__name__}: its converted norms have no affine parameters, so "
                                "params='norms' has nothing to calibrate; pass params='all'")
        return chosen
    chosen = [p for p in converted.parameters() if p.is_floating_point()]
    if not chosen:
        raise NormSwapError(f"{type(converted).__name__} has no floating-point parameter to calibrate")
    return chosen


class _Teacher:
    """The original's outputs for training batches. Data held in memory (a list or tuple of batches, or a
    one-shot iterator kept on its first pass) gives the same batch objects on every pass: each one's output
    is computed once and reused (up to ``limit`` bytes of outputs), so later passes cost what fine-tuning
    with labels costs."""

    def __init__(self, original: nn.Module, to_original, field: str | None, reuse: bool, limit: int = 2**30) -> None:
        self.original, self.to_original, self.field = original, to_original, field
        self.reuse, self.limit, self.bytes = reuse, limit, 0
        self.kept: dict[int, tuple[Any, torch.Tensor]] = {}

    def __call__(self, batch: Any, inputs: Inputs) -> torch.Tensor:
        hit = self.kept.get(id(batch))
        if hit is not None and hit[0] is batch:
            return hit[1]
        target = self.compute(inputs)
        size = target.numel() * target.element_size()
        if self.reuse and self.bytes + size <= self.limit:
            self.hold(batch, target)
            self.bytes += size
        return target

    def hold(self, batch: Any, target: torch.Tensor) -> None:
        """Reuse ``target`` as the output for ``batch`` (kept with it, so its id cannot be reused)."""
        self.kept[id(batch)] = (batch, target)

    def compute(self, inputs: Inputs) -> torch.Tensor:
        """The original's output for ``inputs``, computed now (nothing kept)."""
        with torch.no_grad():
            args, kwargs = self.to_original(inputs)
            return output_tensor(self.original(*args, **kwargs), self.field).detach()


def _same_shape(out: torch.Tensor, target: torch.Tensor) -> None:
    if out.shape != target.shape:
        raise NormSwapError(f"the converted model's output has shape {tuple(out.shape)}, the original's "
                            f"{tuple(target.shape)}: calibrate a model against the one it was converted from")


def _device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _agreement(student: torch.Tensor, teacher: torch.Tensor) -> tuple[float, int, int]:
    s, t = student.detach().float(), teacher.detach().float()
    sq = float((s - t).square().sum())
    same = int((s.argmax(-1) == t.argmax(-1)).sum()) if s.dim() else int(bool(s == t))
    rows = max(1, t.numel() // max(1, t.shape[-1] if t.dim() else 1))
    return sq, same, rows


class _Measure:
    """Agreement over a fixed set of batches, with the original's outputs computed once."""

    def __init__(self, batches: list[Inputs], teacher: _Teacher) -> None:
        self.batches, self.field = batches, teacher.field
        self.targets = [teacher.compute(b) for b in batches]

    def __call__(self, converted: nn.Module, to_converted) -> Agreement:
        sq = count = same = rows = 0
        with torch.no_grad():
            for batch, target in zip(self.batches, self.targets):
                args, kwargs = to_converted(batch)
                out = output_tensor(converted(*args, **kwargs), self.field)
                _same_shape(out, target)
                s, m, r = _agreement(out, target.to(out.device))
                sq, same, rows, count = sq + s, same + m, rows + r, count + out.numel()
        return Agreement(mse=sq / max(count, 1), top1=same / max(rows, 1))


def _train(converted: nn.Module, trainable: list[nn.Parameter], rate: float, next_batch, teacher: _Teacher,
           to_converted, output: str | None, steps: int | None, seconds: float | None) -> tuple[int, str, float]:
    """Adam on ``trainable`` at ``rate``, the converted model's outputs against the original's (MSE), until
    the budget or one pass over the data ends: the steps taken, why it stopped, and the seconds spent."""
    optimizer = torch.optim.Adam(trainable, lr=rate)
    start = time.perf_counter()
    done = 0
    while True:
        elapsed = time.perf_counter() - start
        if steps is not None and done >= steps:
            return done, f"{steps} steps", elapsed
        if seconds is not None and elapsed >= seconds:
            return done, f"{seconds:g} s", elapsed
        step = next_batch(done)
        if step is None:
            return done, "one pass over the data", elapsed
        target = teacher(*step)
        args, kwargs = to_converted(step[1])
        out = output_tensor(converted(*args, **kwargs), output)
        _same_shape(out, target)
        loss = (out.float() - target.to(out.device).float()).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        done += 1


def calibrate(converted: nn.Module, original: nn.Module, data: Iterable[Any], *, seconds: float | None = None,
              steps: int | None = None, params: str = "norms", lr: float | None = None, eval_batches: int = 4,
              output: str | None = None) -> CalibrationReport:
    """Train ``converted`` (in place) to reproduce ``original``'s outputs on the inputs of ``data``.

    ``data`` is any iterable of input batches as the models take them: a tensor (one positional input), a
    tuple or list (positional inputs) or a dict (keyword inputs) per batch; a ``DataLoader`` works and is
    iterated again as needed. No labels: the target is the original's output (``output=`` names the field
    of a structured output; by default ``logits``, ``last_hidden_state`` or the first tensor). Training
    stops after ``seconds`` or ``steps`` (whichever comes first; one pass over the data when neither is
    given). ``params="norms"`` trains the affine parameters of the norms the conversion replaced (Adam, lr
    3e-2), ``params="all"`` every parameter (lr 5e-3: on small networks it gets closer to the original, and
    sooner; on timm resnet18 the default did; for a large pretrained transformer pass a lower ``lr`` such as
    1e-5). Data held in memory (a list of batches) has the original's outputs computed once and reused on
    later passes. Both models run in eval mode (no dropout); their modes and ``requires_grad`` flags are put
    back, and ``original`` is not changed.

    The report gives the output MSE and the top-1 agreement with the original on the first ``eval_batches``
    batches, before and after (measuring them is not counted in ``seconds``).

    Example:
        >>> import torch, normswap
        >>> original = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        ...                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4))
        >>> converted = normswap.convert(original, "gn", groups=2)
        >>> report = calibrate(converted, original, [torch.randn(8, 3, 16, 16)], steps=20)
        >>> report.after.mse < report.before.mse
        True
    """
    for name, model in (("converted", converted), ("original", original)):
        if not isinstance(model, nn.Module):
            raise OptionError(f"{name} must be a torch.nn.Module, got {type(model).__name__}")
    if converted is original:
        raise OptionError("converted and original are the same object; convert with inplace=False to keep the "
                          "original")
    if seconds is not None and not (isinstance(seconds, (int, float)) and seconds > 0 and math.isfinite(seconds)):
        raise OptionError(f"seconds must be a positive number, got {seconds!r}")
    if steps is not None and not (isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1):
        raise OptionError(f"steps must be a positive integer, got {steps!r}")
    if not (isinstance(eval_batches, int) and eval_batches >= 1):
        raise OptionError(f"eval_batches must be a positive integer, got {eval_batches!r}")
    if params not in PARAMS:
        raise OptionError(f"params must be one of {PARAMS}, got {params!r}")
    rate = DEFAULT_LR[params] if lr is None else lr
    if not (isinstance(rate, (int, float)) and not isinstance(rate, bool) and rate > 0 and math.isfinite(rate)):
        raise OptionError(f"lr must be a positive number, got {lr!r}")
    trainable = _trainable(converted, params)
    dev_c, dev_o = _device(converted), _device(original)
    to_c = lambda b: map_inputs(b, lambda t: t.to(dev_c))  # noqa: E731
    to_o = lambda b: map_inputs(b, lambda t: t.to(dev_o))  # noqa: E731

    stream = _Batches(data)
    batches = iter(stream)
    first: list[tuple[Any, Inputs]] = []
    while len(first) < eval_batches:
        batch = next(batches)
        if stream.epochs:  # fewer batches than eval_batches: this one is the first again
            pending_wrap = batch
            break
        first.append((batch, _as_inputs(batch, f"data batch {len(first)}")))
    else:
        pending_wrap = None
    one_pass = steps is None and seconds is None

    def next_batch(done: int) -> tuple[Any, Inputs] | None:
        """The next training batch and its inputs: the measured ones first, then the rest; None at the end
        of one pass."""
        nonlocal pending_wrap
        if done < len(first):
            return first[done]
        if pending_wrap is not None:
            batch, pending_wrap = pending_wrap, None
        else:
            batch = next(batches)
        if one_pass and stream.epochs:
            return None
        return batch, _as_inputs(batch, f"data batch {done}")

    flags = {p: p.requires_grad for p in converted.parameters()}
    try:
        with eval_mode(converted), eval_mode(original):
            teacher = _Teacher(original, to_o, output, reuse=stream.one_shot or isinstance(data, (list, tuple)))
            measure = _Measure([inputs for _, inputs in first], teacher)
            for (batch, _), target in zip(first, measure.targets):  # the first training steps take these batches
                teacher.hold(batch, target)
            before = measure(converted, to_c)
            for p in converted.parameters():
                p.requires_grad_(False)
            for p in trainable:
                p.requires_grad_(True)
            done, stopped, seconds_spent = _train(converted, trainable, float(rate), next_batch, teacher, to_c,
                                                  output, steps, seconds)
            after = measure(converted, to_c)
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None
    trained = sum(p.numel() for p in trainable)
    return CalibrationReport(before, after, done, seconds_spent, params, trained, stopped)


@dataclass
class Calibration:
    """A calibration to run right after a conversion (``normswap convert --calibrate DATA``,
    :func:`normswap.convert_checkpoint`'s ``calibrate=``): ``data`` is an iterable of input batches, or a path
    read as recipes read it: an image folder (one subfolder per class, or ``train/`` and ``val/``) or a text
    table (``.csv`` / ``.jsonl`` with ``text`` and ``label`` columns, tokenized with ``tokenizer``, a local
    tokenizer folder). Labels are never used.

    Example:
        >>> Calibration("photos/", seconds=60).seconds
        60
    """

    data: str | os.PathLike | Iterable[Any]
    seconds: float | None = None
    steps: int | None = None
    params: str = "norms"
    batch_size: int = 32
    tokenizer: str | os.PathLike | None = None

    def run(self, converted: nn.Module, original: nn.Module) -> CalibrationReport:
        """:func:`calibrate` ``converted`` against ``original`` with this data and budget."""
        data = self.data
        if isinstance(data, (str, os.PathLike)):
            data = read_inputs(data, original, self.batch_size, self.tokenizer)
        return calibrate(converted, original, data, seconds=self.seconds, steps=self.steps, params=self.params)


def read_inputs(path: str | os.PathLike, model: nn.Module, batch_size: int = 32,
                tokenizer: str | os.PathLike | None = None) -> Iterable[Any]:
    """The inputs of an image folder or a text table, in batches as ``model`` takes them (pixels at the
    model's input size; token ids and mask), without labels.

    Example:
        >>> batches = read_inputs("photos/", model, batch_size=16)  # doctest: +SKIP
    """
    from torch.utils.data import ConcatDataset

    from .finetune.builders import task_of
    from .finetune.data import Unlabeled, image_folder, text_table

    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise OptionError(f"batch_size must be a positive integer, got {batch_size!r}")
    path = pathlib.Path(path)
    if task_of(model) == "image":
        size = example_inputs(model).shape[-1]
        bundle = image_folder(str(path), "image", seed=0, image_size=int(size))
    else:
        if tokenizer is None:
            raise OptionError(f"{path}: a text table is tokenized with a local tokenizer folder; pass tokenizer= "
                              "(--tokenizer DIR)")
        bundle = text_table(str(path), str(tokenizer), "text", seed=0)
    return Unlabeled(ConcatDataset([bundle.train, bundle.val]), batch_size)
