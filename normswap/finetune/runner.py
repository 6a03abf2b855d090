"""``normswap.finetune``: run a recipe. Build the model, convert it, fine-tune it with the regularizers.

The data order is a pure function of (seed, step, rank): micro-batch ``k`` of a rank comes from epoch
``k // batches_per_epoch`` of a seeded permutation, so a resumed run reads exactly the batches the
uninterrupted run would have, and with the restored optimizer, scheduler, scaler and random states it
continues bit-exactly.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import pathlib
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from ..io.atomic import atomic_output
from ..checkpoints.save_load import load_state_dict
from ..io.progress import Progress
from ..regularizers import OrthogonalRegularizer, RegularizedStep
from . import distributed
from .builders import build_data, build_optimizer, build_recipe_model, build_scheduler, task_of
from .data import DataError, Unlabeled, model_inputs
from .recipe import RecipeError, apply_overrides, read_recipe, validate
from .state import MODEL, find_checkpoint, load_trainer_state, rng_state, save_checkpoint, set_rng_state

METRICS = "metrics.jsonl"
PLOT = "metrics.png"
CONFIG = "config.yaml"


@dataclass
class RunResult:
    """Where a run wrote its outputs, and its last figures."""

    output_dir: pathlib.Path
    steps: int
    final: dict[str, float] = field(default_factory=dict)
    checkpoint: pathlib.Path | None = None
    plot: pathlib.Path | None = None
    config: dict[str, Any] = field(default_factory=dict)
    calibration: Any = None  # the CalibrationReport of a recipe's calibrate: section

    def __str__(self) -> str:
        figures = ", ".join(f"{k} {v:.4g}" for k, v in self.final.items())
        lines = [f"{self.steps} steps -> {self.output_dir}: {figures}"]
        if self.checkpoint:
            lines.append(f"checkpoint: {self.checkpoint} (normswap.load('{self.checkpoint / MODEL}'))")
        if self.plot:
            lines.append(f"plot: {self.plot}")
        if self.calibration is not None:
            lines.append(f"before fine-tuning, {self.calibration}")
        return "\n".join(lines)


def load_config(recipe: str | pathlib.Path | dict[str, Any], overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The validated recipe with overrides applied and defaults filled in (raises ``RecipeError``).

    Example:
        >>> cfg = load_config("recipes/gn_ws_resnet_microbatch.yaml", ["data=builtin", "max_steps=5"])  # doctest: +SKIP
    """
    if isinstance(recipe, dict):
        source, raw = "recipe", recipe
    else:
        source, raw = str(recipe), read_recipe(recipe)
    return validate(apply_overrides(raw, overrides, source), source)


def _collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


class BatchOrder:
    """Which samples micro-batch ``k`` of a rank holds: seeded permutations, one per epoch, split by rank."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int, world: int) -> None:
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.per_rank = n // world
        self.per_epoch = self.per_rank // batch_size
        if self.per_epoch == 0:
            raise DataError(f"the training set has {n} samples: fewer than batch_size {batch_size} x {world} "
                            "process(es); lower batch_size or add data")
        self._epoch, self._perm = -1, None

    def indices(self, k: int) -> list[int]:
        epoch, pos = divmod(k, self.per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 7919 + epoch)
            perm = torch.randperm(self.n, generator=g)
            self._perm, self._epoch = perm[self.rank::self.world][: self.per_rank].tolist(), epoch
        return self._perm[pos * self.batch_size:(pos + 1) * self.batch_size]


def _forward(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    inputs = model_inputs(batch)
    out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    return out.logits if hasattr(out, "logits") else out


def _to(batch: dict[str, torch.Tensor], device: torch.device, channels_last: bool) -> dict[str, torch.Tensor]:
    out = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    if channels_last and "pixel_values" in out and out["pixel_values"].dim() == 4:
        out["pixel_values"] = out["pixel_values"].contiguous(memory_format=torch.channels_last)
    return out


class TrainingRun:
    """The state of one fine-tuning run (kept small: every piece is built by a named function)."""

    def __init__(self, cfg: dict[str, Any], progress: bool) -> None:
        self.cfg = cfg
        self.dist = distributed.setup(cfg["device"])
        self.out = pathlib.Path(cfg["output_dir"])
        self.progress = progress and self.dist.main
        seed = cfg["seed"]
        meta = build_recipe_model(cfg["model"], device="meta")
        self.task = task_of(meta)
        self.data = build_data(cfg["data"], self.task, seed, getattr(meta, "config", None))
        torch.manual_seed(seed)  # the same initial weights on every rank
        model = build_recipe_model(cfg["model"], num_classes=self.data.num_classes)
        if cfg["init_from"]:
            load_state_dict(model, cfg["init_from"])
        conv = cfg["convert"] or {}
        checkpoint = find_checkpoint(cfg["resume"]) if cfg["resume"] else None
        # calibrate: against the model as it was before the conversion (not when resuming: the weights are
        # the checkpoint's)
        original = copy.deepcopy(model) if cfg["calibrate"] is not None and checkpoint is None else None
        if conv.get("spec"):
            from ..core.convert import convert

            model = convert(model, conv["spec"], inplace=True, **(conv.get("options") or {}))
        model.to(self.dist.device)
        if cfg["channels_last"] and self.task == "image":
            model.to(memory_format=torch.channels_last)
        self.model = model
        self.calibration = None
        if original is not None:
            self.calibration = self._calibrate(original.to(self.dist.device), cfg["calibrate"], seed)
        if checkpoint is not None:
            load_state_dict(model, checkpoint / MODEL)  # before sharding: every rank loads the whole model
        # wrap first: FSDP replaces the parameters, and the optimizer must hold the sharded ones
        self.train_model = distributed.wrap(model, self.dist, cfg["distributed"])
        self.optimizer = build_optimizer(cfg["optimizer"], model)
        self.scheduler = build_scheduler(cfg["scheduler"], self.optimizer, cfg["max_steps"])
        self.scaler = torch.amp.GradScaler(self.dist.device.type) if cfg["precision"] == "fp16" else None
        ortho = OrthogonalRegularizer(model, **cfg["orthogonal"]) if cfg["orthogonal"] else None
        self.reg_step = RegularizedStep(model, ortho, cfg["clip"])
        self.order = BatchOrder(len(self.data.train), cfg["batch_size"], seed, self.dist.rank, self.dist.world)
        self.step = 0
        if checkpoint is not None:
            self._resume(checkpoint)
        if cfg["compile"]:
            self.train_model = torch.compile(self.train_model)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg["precision"])
        self.autocast = (lambda: torch.autocast(self.dist.device.type, dtype=dtype)) if dtype else contextlib.nullcontext

    def _calibrate(self, original: nn.Module, options: dict[str, Any], seed: int):
        """The recipe's ``calibrate:`` section: the converted model learns the original's outputs on the
        training inputs (labels unused) before fine-tuning; the same batches on every rank."""
        from ..calibration import calibrate

        report = calibrate(self.model, original, Unlabeled(self.data.train, self.cfg["batch_size"], seed), **options)
        if self.dist.main:
            with atomic_output(self.out / "calibration.json", force=True) as tmp:
                tmp.write_text(json.dumps(dataclasses.asdict(report), indent=1))
        return report

    def _resume(self, checkpoint: pathlib.Path) -> None:
        state = load_trainer_state(checkpoint)
        distributed.load_optimizer_state(self.model, self.optimizer, state["optimizer"], self.dist,
                                         self.cfg["distributed"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        rngs = state["rng"]
        if len(rngs) != self.dist.world:
            raise DataError(f"{checkpoint}: saved by {len(rngs)} process(es), resumed by {self.dist.world}; "
                            "resume with the same number of processes for a bit-exact continuation")
        set_rng_state(rngs[self.dist.rank])
        self.step = int(state["step"])

    # ------------------------------------------------------------------------------------------- loop

    def train_step(self) -> dict[str, float]:
        cfg, model = self.cfg, self.train_model
        model.train()
        accum = cfg["grad_accum"]
        loss_sum, correct, seen = 0.0, 0, 0
        for micro in range(accum):
            k = self.step * accum + micro
            batch = _to(_collate([self.data.train[i] for i in self.order.indices(k)]), self.dist.device,
                        cfg["channels_last"])
            sync = micro == accum - 1 or not isinstance(model, nn.parallel.DistributedDataParallel)
            with (contextlib.nullcontext() if sync else model.no_sync()), self.autocast():
                logits = _forward(model, batch)
                loss = F.cross_entropy(logits.float(), batch["labels"]) / accum
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            loss_sum += float(loss.detach()) * accum
            correct += int((logits.argmax(-1) == batch["labels"]).sum())
            seen += len(batch["labels"])
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        figures = self.reg_step()
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        elif not figures["skipped"]:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()
        self.step += 1
        loss, acc = self.dist.all_mean([loss_sum / accum, correct / max(1, seen)])
        return {"loss": loss, "train_accuracy": acc, "grad_norm": figures["grad_norm"],
                "orthogonal_penalty": figures["orthogonal_penalty"], "lr": self.optimizer.param_groups[0]["lr"]}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        model = self.train_model
        model.eval()
        val = self.data.val
        mine = list(range(self.dist.rank, len(val), self.dist.world))
        bs = self.cfg["batch_size"] * max(1, 4 // self.cfg["grad_accum"])
        batches = [mine[i:i + bs] for i in range(0, len(mine), bs)]
        if self.cfg["eval_batches"]:
            batches = batches[: self.cfg["eval_batches"]]
        loss_sum, correct, seen = 0.0, 0, 0
        for idx in batches:
            batch = _to(_collate([val[i] for i in idx]), self.dist.device, self.cfg["channels_last"])
            with self.autocast():
                logits = _forward(model, batch).float()
            loss_sum += float(F.cross_entropy(logits, batch["labels"], reduction="sum"))
            correct += int((logits.argmax(-1) == batch["labels"]).sum())
            seen += len(idx)
        loss_sum, correct, seen = self.dist.all_sum([loss_sum, correct, seen])
        model.train()
        return {"val_loss": loss_sum / max(1, seen), "val_accuracy": correct / max(1, seen)}

    def checkpoint(self) -> pathlib.Path | None:
        rngs = self.dist.gather(rng_state())
        mode = self.cfg["distributed"]
        weights = distributed.full_model_state(self.model, self.dist, mode)
        optim = distributed.optimizer_state(self.model, self.optimizer, self.dist, mode)
        path = None
        if self.dist.main:
            trainer = {"optimizer": optim, "rng": rngs,
                       "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                       "scaler": self.scaler.state_dict() if self.scaler is not None else None}
            path = save_checkpoint(self.out, self.step, self.model, trainer, self.cfg["keep_checkpoints"], weights)
        self.dist.barrier()
        return path


def _log(path: pathlib.Path, row: dict[str, Any]) -> None:
    row = {k: (None if isinstance(v, float) and v != v else v) for k, v in row.items()}  # NaN is not JSON
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def _trim_metrics(path: pathlib.Path, step: int) -> None:
    """On resume, drop logged rows after the checkpoint's step (they are logged again)."""
    if path.is_file():
        rows = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        with atomic_output(path, force=True) as tmp:
            tmp.write_text("".join(r + "\n" for r in rows))


def weights_digest(model: nn.Module) -> str:
    """SHA-256 of every parameter and buffer of ``model``, in state-dict order."""
    h = hashlib.sha256()
    for key, t in model.state_dict().items():
        h.update(key.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _check_ranks_agree(run: TrainingRun) -> None:
    """After a distributed run, every rank must hold the same weights: written to ``ranks.json``."""
    digests = run.dist.gather(weights_digest(run.model))
    if run.dist.main:
        with atomic_output(run.out / "ranks.json", force=True) as tmp:
            tmp.write_text(json.dumps({"world": run.dist.world, "weights_sha256": digests,
                                       "agree": len(set(digests)) == 1}))
        if len(set(digests)) != 1:
            warnings.warn(f"normswap: the {run.dist.world} ranks ended with different weights (see "
                          f"{run.out / 'ranks.json'})", RuntimeWarning, stacklevel=2)


def finetune(recipe: str | pathlib.Path | dict[str, Any], overrides: Sequence[str] = (), *,
             progress: bool = True) -> RunResult:
    """Run a fine-tuning recipe: build, convert, train with regularizers and clipping, checkpoint, plot.

    Under ``torchrun --nproc_per_node N`` the same call trains with DDP across the processes.

    Example:
        >>> result = finetune("recipes/gn_ws_resnet_microbatch.yaml", ["data=builtin", "max_steps=20"])  # doctest: +SKIP
    """
    cfg = load_config(recipe, overrides)
    _refuse_to_replace_a_run(cfg, str(recipe) if not isinstance(recipe, dict) else "recipe")
    run = TrainingRun(cfg, progress)
    try:
        return _train(run)
    finally:
        run.dist.close()


RUN_FILES = (CONFIG, METRICS, "checkpoints")  # what a run writes that a fresh run would replace


def _refuse_to_replace_a_run(cfg: dict[str, Any], source: str) -> None:
    """A fresh run into an ``output_dir`` that holds a run would replace its metrics and checkpoints: refused
    (the previous run continues with ``resume=``); only a resumed run writes into its own folder."""
    out = pathlib.Path(cfg["output_dir"])
    found = [name for name in RUN_FILES if (out / name).exists()]
    if found and not cfg["resume"]:
        raise RecipeError(source, [f"output_dir: {out} already holds a run ({', '.join(found)}); continue it with "
                                   f"resume={out}, or give another output_dir: a new run never replaces one"])


def _train(run: TrainingRun) -> RunResult:
    cfg, out, main = run.cfg, run.out, run.dist.main
    metrics = out / METRICS
    if main:
        out.mkdir(parents=True, exist_ok=True)
        with atomic_output(out / CONFIG, force=True) as tmp:
            tmp.write_text(yaml.safe_dump(cfg, sort_keys=False))
        if run.step:
            _trim_metrics(metrics, run.step)
        elif metrics.exists():
            metrics.unlink()
    run.dist.barrier()
    last: dict[str, float] = {}
    checkpoint = None
    total = cfg["max_steps"]
    with Progress("fine-tuning", total, unit="steps", enabled=run.progress) as bar:
        bar.update(run.step)
        started = time.perf_counter()
        window: list[dict[str, float]] = []  # steps since the last log row: loss and accuracy are their mean
        while run.step < total:
            figures = run.train_step()
            window.append(figures)
            last.update(figures)
            step = run.step
            if step % cfg["log_every"] == 0 or step == total:
                averaged = {k: sum(w[k] for w in window) / len(window) for k in ("loss", "train_accuracy")}
                row = {"step": step, **figures, **averaged, "seconds": time.perf_counter() - started}
                window = []
                if main:
                    _log(metrics, row)
            if cfg["eval_every"] and step % cfg["eval_every"] == 0 and step != total:
                ev = run.evaluate()
                last.update(ev)
                if main:
                    _log(metrics, {"step": step, **ev})
            if cfg["checkpoint_every"] and step % cfg["checkpoint_every"] == 0 and step != total:
                checkpoint = run.checkpoint()
            bar.update(1, f"loss {figures['loss']:.3f}")
    ev = run.evaluate()
    last.update(ev)
    if main:
        _log(metrics, {"step": run.step, **ev})
    checkpoint = run.checkpoint()
    if run.dist.active and cfg["distributed"] == "ddp":
        _check_ranks_agree(run)
    plot = None
    if main and cfg["plot"]:
        from .plot import plot_metrics

        plot = plot_metrics(metrics, out / PLOT)
    keep = ("loss", "train_accuracy", "val_loss", "val_accuracy")
    return RunResult(out, run.step, {k: last[k] for k in keep if k in last}, checkpoint, plot, cfg, run.calibration)
