"""Calibration after a conversion that changes the function, against fine-tuning with labels, in one run.

    python benchmarks/bench_calibrate.py                       # timm test_resnet and HF ResNet, every BN spec
    python benchmarks/bench_calibrate.py --models timm --specs gn_ws --budgets 2 5 10 --cache /tmp/originals

A BatchNorm model is trained here on the built-in images (ten procedurally drawn pattern classes, 32 px;
no download) to convergence (one-cycle schedule). Each spec converts it; then, from the same converted
weights, side by side for each time budget: ``normswap.calibrate`` on the unlabeled training images
(``params="norms"``: affine parameters of the converted norms; ``params="all"``), and fine-tuning with
labels (every parameter, AdamW, cross-entropy) at each learning rate given, each ``--seeds`` times with its
own order of the batches (single runs at a few seconds vary by a few points). Printed: validation accuracy
of the original, the converted model and each method at each budget (the mean over the runs), and the
first budget at which each method reaches 99% of the original's accuracy.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import pathlib
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import normswap  # noqa: E402
from normswap.finetune.data import builtin  # noqa: E402


def _tensors(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    items = [dataset[i] for i in range(len(dataset))]
    return torch.stack([d["pixel_values"] for d in items]), torch.stack([d["labels"] for d in items])


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out.logits if hasattr(out, "logits") else out


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((torch.cat([_logits(model, b).argmax(-1) for b in x.split(256)]) == y).float().mean())


# the clock the budgets are read on: wall time, or (--clock cpu) this process's CPU time on one thread, which
# neighbours on a shared machine do not eat into; calibrate reads the same clock (see main)
CLOCK = [time.perf_counter]


def train_labels(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, seconds: float | None = None,
                 steps: int | None = None, lr: float = 1e-3, batch: int = 64, seed: int = 0,
                 one_cycle: bool = False) -> int:
    """Train every parameter with labels (AdamW, cross-entropy) for a time or step budget; ``one_cycle``
    (with ``steps``) warms the rate up and anneals it to zero, to train an original to convergence."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1) if one_cycle else None
    model.train()
    start, done = CLOCK[0](), 0
    while (steps is None or done < steps) and (seconds is None or CLOCK[0]() - start < seconds):
        idx = torch.randint(len(x), (batch,), generator=g)
        loss = F.cross_entropy(_logits(model, x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        done += 1
    return done


def unlabeled(x: torch.Tensor, batch: int = 64, seed: int = 0) -> list[torch.Tensor]:
    """The training images in shuffled unlabeled batches, as calibrate takes them: a list, so calibrate
    computes the original's outputs once and reuses them on later passes."""
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    return [x[perm[i:i + batch]] for i in range(0, len(x), batch)]


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "timm":
        import timm

        return timm.create_model("test_resnet", pretrained=False, num_classes=10)
    import transformers

    config = transformers.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
                                       layer_type="basic", num_labels=10)
    return transformers.ResNetForImageClassification(config)


MODELS = {"timm": "timm test_resnet (0.37M parameters)", "hf": "HF ResNet (basic blocks 1-1-1-1, widths 16-128)"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--specs", nargs="+", default=["gn_ws", "gn", "in", "ln"])
    parser.add_argument("--budgets", nargs="+", type=float, default=[3.0, 6.0, 10.0, 20.0])
    parser.add_argument("--params", nargs="+", default=["norms", "all"], choices=["norms", "all"],
                        help="what calibrate trains (each at its default learning rate)")
    parser.add_argument("--label-lrs", nargs="+", type=float, default=[3e-3, 5e-3],
                        help="learning rates of the fine-tuning with labels (each one a column)")
    parser.add_argument("--seeds", type=int, default=3,
                        help="runs per method and budget, each with its own order of the batches; the mean is printed")
    parser.add_argument("--train-steps", type=int, default=1500, help="steps training the original (one cycle)")
    parser.add_argument("--image-size", type=int, default=32,
                        help="side of the built-in images (64 lets InstanceNorm run: 32 px leaves 1x1 maps)")
    parser.add_argument("--groups", type=int, default=None, help="groups= for gn_ws and gn (default: the spec's 32)")
    parser.add_argument("--cache", default=None, help="a folder keeping the trained originals between runs")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="cpu",
                        help="budgets in wall seconds, or in CPU seconds of this process on one thread (default: "
                             "steady figures on a shared machine)")
    args = parser.parse_args()
    if args.clock == "cpu":
        import normswap.calibration as calibration_module

        torch.set_num_threads(1)
        CLOCK[0] = time.process_time
        # calibrate reads its budget on time.perf_counter: point it at the same CPU clock, for this benchmark only
        calibration_module.time = type("CpuClock", (), {"perf_counter": staticmethod(time.process_time)})
    warnings.filterwarnings("ignore")
    data = builtin("image", seed=0, train_size=2048, val_size=512, image_size=args.image_size)
    x, y = _tensors(data.train)
    vx, vy = _tensors(data.val)
    methods = [f"calibrate {p}" for p in args.params] + [f"labels lr {lr:g}" for lr in args.label_lrs]
    lines = []
    for name in args.models:
        original = build(name)
        size = "" if args.image_size == 32 else f"_{args.image_size}px"
        cached = pathlib.Path(args.cache) / f"{name}_cycle{args.train_steps}{size}.pt" if args.cache else None
        t = time.perf_counter()
        if cached is not None and cached.is_file():
            original.load_state_dict(torch.load(cached, weights_only=True))
        else:
            train_labels(original, x, y, steps=args.train_steps, lr=3e-3, one_cycle=True)
            if cached is not None:
                cached.parent.mkdir(parents=True, exist_ok=True)
                torch.save(original.state_dict(), cached)
        base = accuracy(original, vx, vy)
        print(f"{MODELS[name]}: trained with BatchNorm on {args.image_size} px images ({args.train_steps} steps, "
              f"{time.perf_counter() - t:.0f} s), "
              f"val accuracy {base:.3f}", flush=True)
        for spec in args.specs:
            options = {"groups": args.groups} if args.groups and spec in ("gn_ws", "gn") else {}
            converted = normswap.convert(original.eval(), spec, **options)
            try:
                row: dict = {"converted": accuracy(converted, vx, vy)}
            except (RuntimeError, ValueError) as exc:  # e.g. InstanceNorm on the 1x1 maps of a small input
                print(f"  {spec}: the converted model does not run on these images: {exc}", flush=True)
                continue
            for budget in args.budgets:  # every method from the same converted weights, one after the other
                for method in methods:
                    runs = []
                    for seed in range(args.seeds):  # the order of the batches; accuracy is their mean
                        model = copy.deepcopy(converted)
                        if method.startswith("calibrate"):
                            steps = normswap.calibrate(model, original, unlabeled(x, seed=seed), seconds=budget,
                                                       params=method.split()[1]).steps
                        else:
                            steps = train_labels(model, x, y, seconds=budget, lr=float(method.split()[-1]),
                                                 seed=seed)
                        runs.append((accuracy(model, vx, vy), steps))
                    row[method, budget] = tuple(sum(r[i] for r in runs) / len(runs) for i in (0, 1))
            for method in methods:
                cells = "; ".join(f"{b:g} s {row[method, b][0]:.3f} ({row[method, b][1]:.0f} steps)" for b in args.budgets)
                print(f"  {spec}: converted {row['converted']:.3f}; {method}: {cells}", flush=True)
            label = MODELS[name] + ("" if args.image_size == 32 else f", {args.image_size} px")
            lines.append((label, base, spec + (f" groups={args.groups}" if options else ""), row))
    clock = "CPU seconds of one thread" if args.clock == "cpu" else f"wall seconds, {torch.get_num_threads()} threads"
    print(f"\n### Calibration ({datetime.date.today()}, torch {torch.__version__}, budgets in {clock})\n")
    print(f"Validation accuracy after each time budget, mean of {args.seeds} runs; the last column is the first "
          "budget at which each method reached 99% of the original's accuracy.\n")
    head = " | ".join(f"{b:g} s" for b in args.budgets)
    print(f"| model (original) | spec (converted) | method | {head} | 99% at |")
    print("|---|---|---|" + "---|" * len(args.budgets) + "---|")
    for model, base, spec, row in lines:
        for method in methods:
            cells = " | ".join(f"{row[method, b][0]:.3f}" for b in args.budgets)
            reached = next((f"{b:g} s" for b in args.budgets if row[method, b][0] >= 0.99 * base), "not within "
                           f"{args.budgets[-1]:g} s")
            print(f"| {model} ({base:.3f}) | {spec} ({row['converted']:.3f}) | {method} | {cells} | {reached} |")


if __name__ == "__main__":
    main()
