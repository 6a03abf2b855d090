"""Convert time, and converted models against their references, measured side by side in one run.

    python benchmarks/bench_convert.py [--repeat 7] [--threads N]

Prints: convert time of timm resnet50 and of a 12-layer BERT; the train step of
convert(resnet50, "gn_ws") over timm's hand-written resnetv2_50x1_bit (same depth and input); eval
inference of gn_ws over gn at batch 1; forward+backward of the converted bert_ln and rms layers over
nn.LayerNorm. Each ratio compares candidates timed interleaved, median of --repeat rounds.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from torch import nn

import normswap


def _time(fn, inner: int) -> float:
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - start) / inner


def interleaved(fns: dict, repeat: int, inner: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each candidate, timed in alternating rounds."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(repeat):
        order = list(fns.items()) if r % 2 == 0 else list(reversed(fns.items()))
        for name, fn in order:
            samples[name].append(_time(fn, inner))
    return {k: statistics.median(v) for k, v in samples.items()}


def train_step(model: nn.Module, x: torch.Tensor):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    model.train()

    def step():
        opt.zero_grad(set_to_none=True)
        model(x).float().mean().backward()
        opt.step()

    return step


def infer(model: nn.Module, x: torch.Tensor):
    model.eval()

    def run():
        with torch.inference_mode():
            model(x)

    return run


def layer_fwd_bwd(layer: nn.Module, x: torch.Tensor):
    x = x.clone().requires_grad_(True)
    g = torch.randn_like(x)

    def run():
        layer(x).backward(g)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--batch", type=int, default=8, help="train-step batch")
    parser.add_argument("--size", type=int, default=128, help="train-step image side")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    import timm
    import transformers

    torch.manual_seed(0)
    rows = []

    # convert time
    resnet = timm.create_model("resnet50", pretrained=False)
    bert = transformers.BertModel(transformers.BertConfig(num_hidden_layers=12))
    t = interleaved({"resnet50": lambda: normswap.convert(resnet, "gn_ws"),
                     "bert12": lambda: normswap.convert(bert, "rms")}, repeat=3, inner=1, warmup=1)
    rows.append(("convert resnet50 gn_ws (s)", f"{t['resnet50']:.3f}", ""))
    rows.append(("convert 12-layer BERT rms (s)", f"{t['bert12']:.3f}", ""))

    # train step: converted resnet50 vs timm's hand-written BiT
    gn_ws = normswap.convert(resnet, "gn_ws")
    bit = timm.create_model("resnetv2_50x1_bit", pretrained=False)
    x = torch.randn(args.batch, 3, args.size, args.size)
    t = interleaved({"gn_ws": train_step(gn_ws, x), "bit": train_step(bit, x), "bn": train_step(resnet, x)},
                    repeat=args.repeat, inner=1)
    rows.append((f"train step b{args.batch}/{args.size}px: gn_ws resnet50 / timm resnetv2_50x1_bit",
                 f"{t['gn_ws'] / t['bit']:.3f}", "goal <= 1.05"))
    rows.append(("  (gn_ws / BN original)", f"{t['gn_ws'] / t['bn']:.3f}", ""))

    # eval inference at batch 1: gn_ws vs gn (the WS cache makes standardization free)
    gn = normswap.convert(resnet, "gn")
    x1 = torch.randn(1, 3, 224, 224)
    t = interleaved({"gn_ws": infer(gn_ws, x1), "gn": infer(gn, x1), "bit": infer(bit, x1)},
                    repeat=2 * args.repeat + 1, inner=5)
    rows.append(("eval b1/224px: gn_ws / gn", f"{t['gn_ws'] / t['gn']:.3f}", "goal <= 1.02"))
    rows.append(("  (timm resnetv2_50x1_bit / gn)", f"{t['bit'] / t['gn']:.3f}", ""))

    # converted BERT layers vs nn.LayerNorm, fwd+bwd at BERT-base shapes
    from normswap.norms.bert_layer_norm import BertLayerNorm
    from normswap.norms.rms_norm import RMSNorm

    xs = torch.randn(8, 128, 768)
    for threads in sorted({args.threads, 1}, reverse=True):
        torch.set_num_threads(threads)
        t = interleaved({"ln": layer_fwd_bwd(nn.LayerNorm(768), xs),
                         "rms": layer_fwd_bwd(RMSNorm(768, bias=True), xs),
                         "bert": layer_fwd_bwd(BertLayerNorm(768), xs)}, repeat=2 * args.repeat + 1, inner=20)
        rows.append((f"fwd+bwd [8,128,768] {threads} thread(s): rms / nn.LayerNorm", f"{t['rms'] / t['ln']:.3f}",
                     "goal <= 1.0"))
        rows.append((f"fwd+bwd [8,128,768] {threads} thread(s): bert_ln / nn.LayerNorm",
                     f"{t['bert'] / t['ln']:.3f}", "goal <= 1.3"))
    torch.set_num_threads(args.threads)

    print(f"torch {torch.__version__}, timm {timm.__version__}, transformers {transformers.__version__}, "
          f"{torch.get_num_threads()} threads")
    width = max(len(r[0]) for r in rows)
    for name, value, goal in rows:
        print(f"{name.ljust(width)}  {value:>8}  {goal}")


if __name__ == "__main__":
    main()
