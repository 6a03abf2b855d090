"""The micro-batch claim of Weight Standardization (Qiao et al. 2019), reproduced small.

    python benchmarks/microbatch_gn_ws_vs_bn.py                  # batch 2, 600 steps, 3 seeds
    python benchmarks/microbatch_gn_ws_vs_bn.py --steps 200 --seeds 1

Trains the same ResNet-18 on the built-in data (ten procedurally drawn pattern classes, 32 px) at a batch
of 2 images, from the same initial weights and the same batches, once with its BatchNorms and once
converted with ``gn_ws``, through ``recipes/gn_ws_resnet_microbatch.yaml`` (``convert=null`` for the
BatchNorm run). It prints the validation accuracy and loss of each (eval mode: BatchNorm uses its running
statistics, which two images per step estimate badly).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

from normswap.finetune import finetune

RECIPE = "recipes/gn_ws_resnet_microbatch.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    out = tempfile.mkdtemp(prefix="normswap-microbatch-")
    results: dict[str, list[dict[str, float]]] = {"BatchNorm": [], "gn_ws": []}
    for seed in range(args.seeds):
        for name, extra in (("BatchNorm", ["convert=null"]), ("gn_ws", [])):
            result = finetune(RECIPE, ["data=builtin", f"max_steps={args.steps}", f"batch_size={args.batch_size}",
                                       f"seed={seed}", f"output_dir={out}/{name}-{seed}", "checkpoint_every=0",
                                       f"eval_every={args.steps}", "plot=false", *extra], progress=False)
            results[name].append(result.final)
            print(f"seed {seed} {name:<9}: val accuracy {result.final['val_accuracy']:.3f}, "
                  f"val loss {result.final['val_loss']:.3f}", flush=True)
    print(f"\nresnet18, built-in data, batch {args.batch_size}, {args.steps} steps, {args.seeds} seed(s):")
    print(f"{'norm':<10} {'val accuracy (mean)':>20} {'min':>6} {'max':>6} {'val loss (mean)':>16}")
    for name, rows in results.items():
        acc = [r["val_accuracy"] for r in rows]
        print(f"{name:<10} {statistics.mean(acc):>20.3f} {min(acc):>6.3f} {max(acc):>6.3f} "
              f"{statistics.mean(r['val_loss'] for r in rows):>16.3f}")


if __name__ == "__main__":
    main()
