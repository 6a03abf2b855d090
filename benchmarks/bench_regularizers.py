"""Cost of orthogonal regularization and gradient clipping on timm resnet50, measured side by side in one run.

    python benchmarks/bench_regularizers.py [--repeat 5] [--threads N] [--skip-large]

Prints, per orthogonal form (offdiag, full, srip):
  * one ``apply_()`` over the bare Gram matrix products it needs (the same batched products on weights
    already stacked: the floor any implementation pays; goal <= 1.5);
  * a per-parameter autograd loop of the same penalty (``autograd.grad`` weight by weight, the rows-side
    Gram matrix, as written naively) over one ``apply_()`` (goal >= 2);
  * ``apply_()`` as a fraction of one train step (SGD, fwd+bwd) at batch 8 / 128 px and batch 32 / 224 px,
    every step and with ``every=4`` (goal with every=4 at 32 / 224: < 5%);
and each clipping mode's cost as a fraction of the same train steps (goal < 2%), next to one read of all
gradients (``grad_norm``): every mode reports the pre-clip norm, so that read is a floor for all of them.
Candidates are timed interleaved; each figure is the median of --repeat rounds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from normswap.regularizers import OrthogonalRegularizer, clip_gradients, grad_norm  # noqa: E402
from normswap.regularizers.orthogonal import FORMS  # noqa: E402


def interleaved(fns: dict[str, Callable[[], object]], repeat: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each candidate, timed in alternating rounds."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(repeat):
        for name, fn in (list(fns.items()) if r % 2 == 0 else list(reversed(fns.items()))):
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in samples.items()}


def bare_products(reg: OrthogonalRegularizer) -> Callable[[], None]:
    """The Gram products ``apply_()`` needs, on pre-stacked weights: S = smaller Gram, then S W (or W S)."""
    stacks = [b.stack(differentiable=False).clone() for b in reg.buckets]
    srip = reg.form == "srip"

    def run() -> None:
        for w in stacks:
            wide = w.shape[1] <= w.shape[2]
            s = torch.bmm(w, w.transpose(1, 2)) if wide else torch.bmm(w.transpose(1, 2), w)
            if srip:  # one power-iteration step and two matrix-vector products
                v = torch.ones(s.shape[0], s.shape[1], 1)
                torch.bmm(s, v)
                torch.bmm(w, v) if not wide else torch.bmm(v.transpose(1, 2), w)
            else:
                torch.bmm(s, w) if wide else torch.bmm(w, s)

    return run


def autograd_loop(reg: OrthogonalRegularizer) -> Callable[[], None]:
    """The naive way: each weight alone, its rows-side Gram matrix, autograd for the gradient."""
    form = reg.form

    def run() -> None:
        for e in reg.weights:
            w = e.param.reshape(e.param.shape[0], -1)
            g = w @ w.T
            eye = torch.eye(g.shape[0])
            if form == "offdiag":
                pen = (g * (1 - eye)).pow(2).sum()
            elif form == "full":
                pen = (g - eye).pow(2).sum()
            else:
                a = g - eye
                v = torch.ones(a.shape[0])
                v = a.detach() @ v
                v = v / v.norm()
                pen = (v @ a @ v) ** 2
            (grad,) = torch.autograd.grad(pen * reg.strength_at(0), e.param)
            e.param.grad.add_(grad)

    return run


def train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step() -> None:
        opt.zero_grad(set_to_none=False)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--skip-large", action="store_true", help="skip the batch 32 / 224 px train step")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import timm

    print(f"torch {torch.__version__}, timm {timm.__version__}, {torch.get_num_threads()} threads, "
          f"median of {args.repeat} interleaved rounds\n")
    torch.manual_seed(0)
    model = timm.create_model("resnet50", pretrained=False).train()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)

    rows: list[tuple[str, str, str]] = []
    apply_time = {}
    for form in FORMS:
        reg = OrthogonalRegularizer(model, strength=1e-4, form=form)
        t = interleaved({"apply": reg.apply_, "bare": bare_products(reg), "loop": autograd_loop(reg)}, args.repeat)
        apply_time[form] = t["apply"]
        rows.append((f"{form}: apply_() ms ({len(reg.weights)} weights, {len(reg.buckets)} buckets)",
                     f"{t['apply'] * 1e3:.1f}", ""))
        rows.append((f"{form}: apply_() / bare Gram products", f"{t['apply'] / t['bare']:.2f}", "goal <= 1.5"))
        rows.append((f"{form}: autograd loop / apply_() (speed-up)", f"{t['loop'] / t['apply']:.2f}", "goal >= 2"))

    sizes = [(8, 128)] + ([] if args.skip_large else [(32, 224)])
    clip_modes = {"norm": {"max_norm": 1.0}, "value": {"value": 1.0}, "agc": {}}
    for batch, px in sizes:
        x = torch.randn(batch, 3, px, px)
        y = torch.randint(0, 1000, (batch,))
        step = train_step(model, x, y)
        fns: dict[str, Callable[[], object]] = {"step": step}
        fns["one pass"] = lambda: grad_norm(model)  # the floor: one read of every gradient
        fns.update({f"clip {m}": (lambda m=m, kw=kw: clip_gradients(model, m, **kw)) for m, kw in clip_modes.items()})
        t = interleaved(fns, max(3, args.repeat // 2) if px > 128 else args.repeat)
        rows.append((f"train step b{batch}/{px}px ms", f"{t['step'] * 1e3:.0f}", ""))
        for form, a in apply_time.items():
            goal = "goal < 5%" if (batch, px) == (32, 224) else ""
            rows.append((f"{form}: apply_() / train step b{batch}/{px}px, every step", f"{a / t['step']:.1%}", ""))
            rows.append((f"{form}: apply_() / train step b{batch}/{px}px, every=4", f"{a / 4 / t['step']:.1%}", goal))
        rows.append((f"one read of all gradients (grad_norm) / train step b{batch}/{px}px",
                     f"{t['one pass'] / t['step']:.2%}", "the floor every mode pays"))
        for m in clip_modes:
            rows.append((f"clip {m} / train step b{batch}/{px}px", f"{t[f'clip {m}'] / t['step']:.2%}", "goal < 2%"))

    width = max(len(r[0]) for r in rows)
    for name, value, goal in rows:
        print(f"{name:<{width}}  {value:>8}  {goal}")


if __name__ == "__main__":
    main()
