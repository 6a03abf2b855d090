"""Streaming checkpoint conversion: peak memory and throughput, side by side with a plain copy.

    python benchmarks/bench_checkpoint.py                        # timm regnety_1280 (2.4 GB), gn_ws
    python benchmarks/bench_checkpoint.py --model timm:vit_huge_patch14_224 --spec rms

It writes a random-valued checkpoint of the model (tensor by tensor, so writing it needs no model in
memory), then runs, each in a fresh process so their peaks do not mix:

- ``normswap``: ``normswap.convert_checkpoint(src, out, spec, model=...)`` (meta skeleton + streaming);
- ``copy``: ``safetensors.torch.save_file(load_file(src), out)``, a plain load-everything copy;
- ``copy+fsync``: the same, then ``fsync`` of the output, as normswap does before its atomic rename.

For each it prints the peak resident memory above the process's baseline after imports (``VmHWM`` minus
``VmRSS`` before the work), that peak over the largest tensor, and GB/s of checkpoint converted. The goal:
normswap's peak stays under 1.5x the largest tensor plus the model skeleton (measured on its own in the
same way). The file sits in the page cache for both runs (it was just written).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import subprocess
import sys
import tempfile
import time

WORKER = r"""
import json, sys, time, pathlib
import torch, timm, transformers, safetensors.torch, normswap
from normswap.named_models import build_model

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
mode, src, out, model, spec = sys.argv[1:6]
base = status("VmRSS")
t = time.perf_counter()
if mode == "normswap":
    normswap.convert_checkpoint(src, out, spec, model=model)
elif mode.startswith("copy"):
    safetensors.torch.save_file(safetensors.torch.load_file(src), out)
    if mode == "copy+fsync":  # what normswap does before its atomic rename, for a like-for-like time
        with open(out, "rb") as f:
            import os; os.fsync(f.fileno())
elif mode == "skeleton":
    normswap.convert(build_model(model, device="meta"), spec, inplace=True)
seconds = time.perf_counter() - t
print(json.dumps({"base": base, "peak": status("VmHWM"), "seconds": seconds}))
"""


def make_source(model: str, path: pathlib.Path) -> tuple[int, int]:
    """Write a random checkpoint of ``model`` tensor by tensor; returns (file bytes, largest tensor bytes)."""
    import torch

    from normswap.io.safetensors_file import OutputTensor, write_safetensors
    from normswap.checkpoints.writers import unique_state
    from normswap.named_models import build_model

    items = []
    for key, t in unique_state(build_model(model, device="meta")).items():

        def produce(t=t, key=key):
            if not t.dtype.is_floating_point:
                return torch.zeros(t.shape, dtype=t.dtype)
            value = torch.randn(t.shape, dtype=t.dtype)
            return value.abs_() + 0.5 if key.endswith("running_var") else value

        items.append(OutputTensor(key, t.dtype, tuple(t.shape), produce))
    with open(path, "wb") as f:
        size = write_safetensors(f, items)
    largest = max(math.prod(i.shape) * i.dtype.itemsize for i in items)
    return size, largest


def run(mode: str, src: pathlib.Path, out: pathlib.Path, model: str, spec: str) -> dict:
    env = dict(os.environ, MALLOC_ARENA_MAX="2")
    res = subprocess.run([sys.executable, "-c", WORKER, mode, str(src), str(out), model, spec],
                         capture_output=True, text=True, env=env, check=False)
    if res.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{res.stderr[-3000:]}")
    if out.exists():
        out.unlink()
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="timm:regnety_1280")
    parser.add_argument("--spec", default="gn_ws")
    parser.add_argument("--dir", default=None, help="where to write the checkpoints (default: a temp folder)")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    folder = pathlib.Path(args.dir or tempfile.mkdtemp(prefix="normswap-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    src, out = folder / "source.safetensors", folder / "out.safetensors"
    t = time.perf_counter()
    size, largest = make_source(args.model, src)
    print(f"{args.model}: checkpoint {size / 2**30:.2f} GB, largest tensor {largest / 2**20:.1f} MB "
          f"(written in {time.perf_counter() - t:.1f} s); spec {args.spec}")
    skeleton = run("skeleton", src, out, args.model, args.spec)
    skel = skeleton["peak"] - skeleton["base"]
    print(f"meta skeleton + conversion: {skel / 2**20:.1f} MB peak, {skeleton['seconds']:.2f} s")
    print(f"{'method':<11} {'peak MB':>9} {'peak/largest':>13} {'s':>7} {'GB/s':>6}")
    rows, speeds = {}, {}
    for rep in range(args.repeat):
        for mode in ("normswap", "copy", "copy+fsync"):
            r = run(mode, src, out, args.model, args.spec)
            peak = r["peak"] - r["base"]
            rows.setdefault(mode, []).append(peak)
            speeds.setdefault(mode, []).append(size / 2**30 / r["seconds"])
            print(f"{mode:<11} {peak / 2**20:>9.1f} {peak / largest:>13.2f} {r['seconds']:>7.2f} "
                  f"{size / 2**30 / r['seconds']:>6.2f}")
    best = min(rows["normswap"])
    bound = 1.5 * largest + skel
    print(f"normswap peak {best / 2**20:.1f} MB vs goal 1.5 x largest + skeleton = {bound / 2**20:.1f} MB: "
          f"{'met' if best <= bound else 'NOT met'}; plain copy peak / normswap peak = "
          f"{min(rows['copy']) / best:.1f}x")
    print("best GB/s: " + ", ".join(f"{m} {max(v):.2f}" for m, v in speeds.items())
          + f"; normswap / copy+fsync = {max(speeds['normswap']) / max(speeds['copy+fsync']):.2f}")
    src.unlink()


if __name__ == "__main__":
    main()
