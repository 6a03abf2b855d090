"""normswap's CPU layers and converted models at another git revision against the working tree, side by side.

    python benchmarks/compare_revisions.py --base 3b70e95~1             # the layers, 5 alternating rounds
    python benchmarks/compare_revisions.py --base main --models --rounds 3

The base revision is checked out into a temporary git worktree (removed at the end). Every round runs one
child process per side, base and working tree in alternating order, each timing the same cases with the
normswap on its path (``python -c`` with that checkout first on ``sys.path``) and printing its medians;
the figure per case is the median over rounds of ``time(working tree) / time(base)`` taken in the same
round, so a machine that slows down between rounds changes both sides alike. Below 1 means the working
tree is faster. ``--threads`` (default 1) fixes torch's thread count in both children; glibc's mmap
threshold is raised as ``suite.py`` raises it (``--system-malloc`` keeps the default).

Cases: the norm layers of ``benchmarks/suite.py`` (fp32, forward and forward+backward, training mode) and,
with ``--models``, a resnet50 converted with ``gn_ws`` (train step and inference, 8 x 128 px) and a
4-layer BERT converted with ``rms`` and ``bert_ln`` (train step).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Runs in a child with one checkout first on sys.path: prints {case: median seconds}. Only names every
# revision since the first fused kernels has (the layer classes, convert) are used.
CHILD = r'''
import json, statistics, sys, time, warnings
sys.path.insert(0, sys.argv[1])
import torch
from torch import nn
torch.set_num_threads(int(sys.argv[2]))
models, repeat = sys.argv[3] == "1", int(sys.argv[4])
import normswap
from normswap.norms.bert_layer_norm import BertLayerNorm
from normswap.norms.channel_layer_norm import ChannelLayerNorm
from normswap.norms.ghost_batch_norm import GhostBatchNorm2d
from normswap.norms.rms_norm import RMSNorm
assert normswap.__file__.startswith(sys.argv[1]), normswap.__file__

def timed(fn, target=0.05):
    fn(); fn()
    t = time.perf_counter(); fn(); one = max(time.perf_counter() - t, 1e-7)
    inner = max(1, min(200, round(target / one)))
    samples = []
    for _ in range(repeat):
        t = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - t) / inner)
    return statistics.median(samples)

out = {}
layers = [("RMSNorm 8x128x768", RMSNorm(768), (8, 128, 768)),
          ("BertLayerNorm 8x128x768", BertLayerNorm(768), (8, 128, 768)),
          ("ChannelLayerNorm 8x256x56x56", ChannelLayerNorm(256), (8, 256, 56, 56)),
          ("GhostBatchNorm2d v16 64x64x56x56", GhostBatchNorm2d(64, virtual_batch_size=16), (64, 64, 56, 56))]
for name, m, shape in layers:
    torch.manual_seed(0)
    x = torch.randn(*shape, requires_grad=True)
    gy = torch.randn(*shape)
    m.train()
    def fwd():
        with torch.no_grad():
            m(x)
    inputs = (x, *m.parameters())
    out[name + " fwd"] = timed(fwd)
    out[name + " fwd+bwd"] = timed(lambda: torch.autograd.grad(m(x), inputs, gy))
if models:
    import timm, transformers
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        resnet = normswap.convert(timm.create_model("resnet50", pretrained=False), "gn_ws")
        config = transformers.BertConfig(vocab_size=8000, hidden_size=256, num_hidden_layers=4,
                                         num_attention_heads=4, intermediate_size=1024)
        bert = transformers.BertForMaskedLM(config)
    img = torch.randn(8, 3, 128, 128)
    ids = torch.randint(8000, (8, 128))
    def step(model, run):
        opt = torch.optim.SGD(model.parameters(), lr=1e-6)
        def go():
            opt.zero_grad(set_to_none=True)
            run(model).float().mean().backward()
            opt.step()
        return go
    resnet.train()
    out["resnet50 gn_ws train step"] = timed(step(resnet, lambda m: m(img)), 0.2)
    resnet.eval()
    def infer():
        with torch.inference_mode():
            resnet(img)
    out["resnet50 gn_ws inference"] = timed(infer, 0.2)
    for spec in ("rms", "bert_ln"):
        m = normswap.convert(bert, spec).train()
        out[f"BERT {spec} train step"] = timed(step(m, lambda m: m(input_ids=ids).logits), 0.2)
print("RESULT " + json.dumps(out))
'''


def _run(checkout: pathlib.Path, args: argparse.Namespace) -> dict[str, float]:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    if not args.system_malloc and sys.platform.startswith("linux"):  # as suite.py: freed outputs reused
        env.setdefault("MALLOC_MMAP_THRESHOLD_", str(2**30))
        env.setdefault("MALLOC_TRIM_THRESHOLD_", str(2**30))
    proc = subprocess.run([sys.executable, "-c", CHILD, str(checkout), str(args.threads), "1" if args.models else "0",
                           str(args.repeat)], capture_output=True, text=True, env=env, cwd=tempfile.gettempdir())
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"timing {checkout} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="a git revision to compare the working tree against")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=5, help="timed repeats per case within one child")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", action="store_true", help="also the converted resnet50 and BERT")
    parser.add_argument("--system-malloc", action="store_true", help="keep glibc's default mmap threshold")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="normswap-base-") as tmp:
        base = pathlib.Path(tmp) / "base"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(base), args.base], check=True,
                       capture_output=True)
        try:
            ratios: dict[str, list[float]] = {}
            times: dict[str, dict[str, list[float]]] = {"base": {}, "tree": {}}
            for r in range(args.rounds):
                sides = [("base", base), ("tree", ROOT)]
                got = dict((side, _run(path, args)) for side, path in (sides if r % 2 == 0 else sides[::-1]))
                for case, t in got["tree"].items():
                    if case in got["base"]:
                        ratios.setdefault(case, []).append(t / got["base"][case])
                        for side in ("base", "tree"):
                            times[side].setdefault(case, []).append(got[side][case])
                print(f"round {r + 1}/{args.rounds} done", flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)], capture_output=True)
    print(f"\nworking tree vs {args.base}, {args.threads} thread(s), median of {args.rounds} rounds "
          "(below 1: the working tree is faster)\n")
    print("| case | base ms | working tree ms | tree / base (min-max over rounds) |\n|---|---|---|---|")
    for case, rs in ratios.items():
        b, t = (statistics.median(times[s][case]) * 1e3 for s in ("base", "tree"))
        print(f"| {case} | {b:.3f} | {t:.3f} | {statistics.median(rs):.2f} ({min(rs):.2f}-{max(rs):.2f}) |")


if __name__ == "__main__":
    main()
