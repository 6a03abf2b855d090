"""Side-by-side CPU timings of normswap's hand-written norms against the torch layers they stand in for.

Compares, forward and forward+backward (gradients of the input and of every parameter):

* ``RMSNorm``        vs ``nn.LayerNorm`` (torch's fused kernel) and ``nn.RMSNorm``;
* ``BertLayerNorm``  vs ``nn.LayerNorm`` and the python-ops formula of the Annotated Transformer;
* ``GhostBatchNorm2d`` vs ``nn.BatchNorm2d``.

Timings on a shared machine are noisy, so the candidates of one comparison are interleaved (each repeat
times every candidate once, back to back) and the median over the repeats is reported; read the ratios,
not the absolute times. A ratio below 1 means normswap's layer is faster.

Usage::

    python benchmarks/bench_layers.py                 # default threads, 9 repeats
    python benchmarks/bench_layers.py --threads 1 --repeat 15
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from normswap.norms import native  # noqa: E402
from normswap.norms.bert_layer_norm import BertLayerNorm  # noqa: E402
from normswap.norms.ghost_batch_norm import GhostBatchNorm2d  # noqa: E402
from normswap.norms.rms_norm import RMSNorm  # noqa: E402

ROW_SHAPES = [(2048, 768), (8, 128, 768), (16, 197, 384)]
BN_SHAPES = [(64, 64, 56, 56), (256, 256, 14, 14)]
VIRTUAL_BATCH_SIZES = [16, 32]


class PythonBertLayerNorm(nn.Module):
    """The Annotated Transformer's LayerNorm, written with python ops (the reference normswap reimplements)."""

    def __init__(self, d: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.bias = nn.Parameter(torch.zeros(d))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        mean = x.mean(-1, keepdim=True)
        std = x.std(-1, keepdim=True)
        return self.weight * (x - mean) / (std + self.eps) + self.bias


def _fwd(module: nn.Module, x: Tensor) -> Callable[[], object]:
    def run() -> object:
        with torch.no_grad():
            return module(x)

    return run


def _fwd_bwd(module: nn.Module, x: Tensor, gy: Tensor) -> Callable[[], object]:
    inputs = (x, *[p for p in module.parameters() if p.requires_grad])

    def run() -> object:
        return torch.autograd.grad(module(x), inputs, gy)

    return run


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def _calibrate(fn: Callable[[], object], target_s: float) -> int:
    """Calls per timing sample so that one sample lasts about ``target_s`` (cuts timer noise on tiny ops)."""
    fn()
    t = time.perf_counter()
    fn()
    one = max(time.perf_counter() - t, 1e-6)
    return max(1, min(50, round(target_s / one)))


def interleaved_medians(
    fns: dict[str, Callable[[], object]], repeat: int, target_s: float, clock: Callable[[], float]
) -> dict[str, float]:
    """Median milliseconds per call of each candidate, timing the candidates in turn within every repeat."""
    inner = {name: _calibrate(fn, target_s) for name, fn in fns.items()}
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t = clock()
            for _ in range(inner[name]):
                fn()
            samples[name].append((clock() - t) / inner[name] * 1e3)
    return {name: statistics.median(v) for name, v in samples.items()}


def compare(
    ours: nn.Module, baselines: dict[str, nn.Module], shape: tuple[int, ...], repeat: int, target_s: float,
    clock: Callable[[], float],
) -> tuple[float, float, dict[str, tuple[float, float]]]:
    """Time ``ours`` and the baselines on one input (all in training mode).

    Returns normswap's fwd and fwd+bwd milliseconds and, per baseline, the (fwd, fwd+bwd) time ratios.
    """
    torch.manual_seed(0)
    x = torch.randn(*shape, requires_grad=True)
    gy = torch.randn(*shape)
    modules = {"ours": ours, **baselines}
    fns: dict[str, Callable[[], object]] = {}
    for name, m in modules.items():
        m.train()
        fns[f"{name}/fwd"] = _fwd(m, x)
        fns[f"{name}/fwdbwd"] = _fwd_bwd(m, x, gy)
    t = interleaved_medians(fns, repeat, target_s, clock)
    ratios = {
        name: (t["ours/fwd"] / t[f"{name}/fwd"], t["ours/fwdbwd"] / t[f"{name}/fwdbwd"]) for name in baselines
    }
    return t["ours/fwd"], t["ours/fwdbwd"], ratios


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=9, help="interleaved repeats per comparison (median)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--target-ms", type=float, default=15.0, help="approximate length of one timing sample")
    parser.add_argument("--only", choices=["rms", "bert", "ghost"], action="append", help="run only these")
    parser.add_argument(
        "--clock", choices=sorted(CLOCKS), default="wall",
        help="wall: elapsed time; cpu: CPU time of this process (steadier on a busy machine, sums all threads)",
    )
    args = parser.parse_args(argv)
    clock = CLOCKS[args.clock]
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    target_s = args.target_ms / 1e3
    groups = args.only or ["rms", "bert", "ghost"]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {args.clock} clock, "
        f"median of {args.repeat} interleaved repeats"
    )
    print(f"normswap fused CPU kernels: {native.status()}")
    print("ratio = normswap time / baseline time (fwd | fwd+bwd); < 1 means normswap is faster\n")
    header = f"{'layer':<24} {'shape':<20} {'ours fwd ms':>11} {'ours f+b ms':>11}  ratios vs baselines"
    print(header)
    print("-" * len(header) + "-" * 40)
    start = time.perf_counter()

    def show(label: str, shape: tuple[int, ...], result: tuple[float, float, dict]) -> None:
        f, fb, ratios = result
        rs = "   ".join(f"{name}: {rf:.2f} | {rfb:.2f}" for name, (rf, rfb) in ratios.items())
        print(f"{label:<24} {str(list(shape)):<20} {f:>11.3f} {fb:>11.3f}  {rs}", flush=True)

    if "rms" in groups:
        for shape in ROW_SHAPES:
            d = shape[-1]
            baselines = {"nn.LayerNorm": nn.LayerNorm(d), "nn.RMSNorm": nn.RMSNorm(d, eps=1e-6)}
            show("RMSNorm", shape, compare(RMSNorm(d), baselines, shape, args.repeat, target_s, clock))
    if "bert" in groups:
        for shape in ROW_SHAPES:
            d = shape[-1]
            baselines = {"nn.LayerNorm": nn.LayerNorm(d), "python-ops": PythonBertLayerNorm(d)}
            show("BertLayerNorm", shape, compare(BertLayerNorm(d), baselines, shape, args.repeat, target_s, clock))
    if "ghost" in groups:
        for shape in BN_SHAPES:
            for vbs in VIRTUAL_BATCH_SIZES:
                ours = GhostBatchNorm2d(shape[1], virtual_batch_size=vbs)
                baselines = {"nn.BatchNorm2d": nn.BatchNorm2d(shape[1])}
                # These inputs are ~50 MB: fewer repeats keep the whole run near a minute.
                result = compare(ours, baselines, shape, max(3, args.repeat // 2), target_s, clock)
                show(f"GhostBatchNorm2d vbs={vbs}", shape, result)
    print(f"\ntotal {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
