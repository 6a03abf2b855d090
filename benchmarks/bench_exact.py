"""LayerNorm -> RMSNorm with ``exact=True`` against the original: same outputs, one reduction less per norm.

    python benchmarks/bench_exact.py                 # CPU, fp32
    python benchmarks/bench_exact.py --device cuda   # adds bf16 autocast rows

For a GPT-2 (4 layers, hidden 256) and timm's ViT-Ti/16 at 224 px: inference (eval, no grad) and a train
step (forward, backward, AdamW), original and converted timed in alternating rounds in one run (medians),
printed as a markdown table with the ratios and the largest relative output difference.
"""

from __future__ import annotations

import argparse
import datetime
import pathlib
import sys
import warnings
from collections.abc import Callable

import torch
from torch import nn

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import normswap  # noqa: E402
from suite import machine, medians  # noqa: E402


def _models(device: torch.device) -> dict[str, tuple[nn.Module, Callable[[nn.Module], torch.Tensor]]]:
    import timm
    import transformers

    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=8000, n_embd=256, n_layer=4, n_head=4,
                                                                n_positions=256)).to(device)
    ids = torch.randint(8000, (8, 128), device=device)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False).to(device)
    pixels = torch.randn(8, 3, 224, 224, device=device)
    return {"GPT-2 (4 layers, hidden 256), b8 x 128 tokens": (gpt2, lambda m: m(input_ids=ids).logits),
            "ViT-Ti/16, b8 x 224 px": (vit, lambda m: m(pixels))}


def _perturb(model: nn.Module) -> None:
    with torch.no_grad():  # LayerNorm weights and biases away from 1 and 0, as in a trained model
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)


def rows(device: torch.device, repeat: int, dtype: torch.dtype | None) -> list[dict]:
    out = []
    for what, (model, forward) in _models(device).items():
        _perturb(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exact = normswap.convert(model, "rms", exact=True)
        pair = {"original": model, "exact rms": exact}
        with torch.no_grad():
            a, b = forward(model.eval()), forward(exact.eval())
        diff = float((a.double() - b.double()).abs().max() / a.double().abs().max())

        def infer(m: nn.Module) -> Callable[[], None]:
            def run() -> None:
                with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                    forward(m.eval())
            return run

        def step(m: nn.Module) -> Callable[[], None]:
            opt = torch.optim.AdamW(m.parameters(), lr=1e-6)

            def run() -> None:
                m.train()
                opt.zero_grad(set_to_none=True)
                with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                    loss = forward(m).float().mean()
                loss.backward()
                opt.step()
            return run

        label = f"{what}{', ' + str(dtype).removeprefix('torch.') + ' autocast' if dtype else ', fp32'}"
        for kind, make in (("inference", infer), ("train step", step)):
            t = medians({k: make(m) for k, m in pair.items()}, repeat, device, target_s=0.2)
            row = {"what": f"{label}: {kind}", "original": t["original"] * 1e3, "exact": t["exact rms"] * 1e3,
                   "diff": diff}
            print(f"  {row['what']}: exact / original {row['exact'] / row['original']:.3f} "
                  f"(output rel diff {diff:.2g})", flush=True)
            out.append(row)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=9)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtypes = [None] + ([torch.bfloat16] if device.type == "cuda" else [])
    table = [r for d in dtypes for r in rows(device, args.repeat, d)]
    print(f"\n### exact=True LayerNorm -> RMSNorm ({machine(device)}, torch {torch.__version__}, "
          f"{datetime.date.today()})\n")
    print("| figure | original ms | exact rms ms | exact / original | output rel diff |")
    print("|---|---|---|---|---|")
    for r in table:
        print(f"| {r['what']} | {r['original']:.1f} | {r['exact']:.1f} | {r['exact'] / r['original']:.3f} | "
              f"{r['diff']:.1e} |")


if __name__ == "__main__":
    main()
