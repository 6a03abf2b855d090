"""The benchmark suite: one command, every figure a ratio measured side by side in one run.

    python benchmarks/suite.py                          # CPU; writes docs/benchmarks.md
    python benchmarks/suite.py --device cuda            # on a GPU (adds bf16 model rows)
    python benchmarks/suite.py --quick --out /tmp/b.md  # fewer repeats
    python benchmarks/suite.py --smoke --out /tmp/b.md  # tiny shapes, every code path (fp32 and bf16): a dry run

1. The machine's copy bandwidth (a large ``copy_``: bytes read + written per second).
2. Each norm layer normswap builds, forward and forward+backward, against torch's nearest layer and
   against the bandwidth limit: the bytes the layer must move at least (forward: x in, y out; forward +
   backward adds dy in, dx out) at the machine's copy bandwidth (a 256 MB copy, which no cache holds).
   Goals on CPU fp32: within 2x of the limit forward, 3x forward+backward. On CUDA the layers run in fp32 and
   bf16 (the GPU goals are bf16: within 1.5x of the limit, RMSNorm no slower than ``F.rms_norm``, BertLayerNorm
   within 1.1x of ``nn.LayerNorm``, GroupNorm on a channels_last input no slower than on a contiguous one),
   with Liger-Kernel's RMSNorm and LayerNorm as further baselines where it is installed; Ghost BatchNorm is
   timed against the split/cat and reshaped-batch forms, Weight Standardization against its torch ops.
3. resnet50 converted with ``gn_ws`` against timm's hand-written BiT ResNet (``resnetv2_50x1_bit``) and the
   BatchNorm original: train step and inference, contiguous and channels_last (bf16 too on GPU).
4. A BERT converted with ``rms`` and ``bert_ln`` against the original: train step.

Candidates of one comparison are timed in alternating rounds and the median is kept. On Linux the suite
runs with glibc's ``MALLOC_MMAP_THRESHOLD_`` raised (it re-executes itself so), so that a freed multi-MB
output is reused rather than returned to the OS: otherwise every call of every candidate pays for fresh,
kernel-zeroed pages, a cost of the allocator that varied the layer figures by up to 4x between runs.
``--system-malloc`` keeps the default allocator.
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import normswap  # noqa: E402
from bench_layers import _fwd, _fwd_bwd  # noqa: E402
from normswap.norms.bert_layer_norm import BertLayerNorm  # noqa: E402
from normswap.norms.channel_layer_norm import ChannelLayerNorm  # noqa: E402
from normswap.norms.ghost_batch_norm import GhostBatchNorm2d  # noqa: E402
from normswap.norms.group_norm import GroupNorm  # noqa: E402
from normswap.norms.rms_norm import RMSNorm  # noqa: E402
from normswap.norms.std_conv import standardize_weight_fused, standardize_weight  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def medians(fns: dict[str, Callable[[], object]], repeat: int, device: torch.device, target_s: float = 0.05) -> dict[str, float]:
    """Median seconds per call of each candidate, candidates alternated within every round."""
    inner = {}
    for name, fn in fns.items():
        fn(), fn()
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        inner[name] = max(1, min(200, round(target_s / max(time.perf_counter() - t, 1e-7))))
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(repeat):
        items = list(fns.items()) if r % 2 == 0 else list(reversed(fns.items()))
        for name, fn in items:
            sync(device)
            t = time.perf_counter()
            for _ in range(inner[name]):
                fn()
            sync(device)
            samples[name].append((time.perf_counter() - t) / inner[name])
    return {k: statistics.median(v) for k, v in samples.items()}


def copy_bandwidth(device: torch.device, repeat: int) -> float:
    """Bytes per second moved by a large tensor copy (read + write)."""
    src = torch.randn(64 * 2**20, device=device)  # 256 MB
    dst = torch.empty_like(src)
    t = medians({"copy": lambda: dst.copy_(src)}, repeat, device)["copy"]
    return 2 * src.numel() * src.element_size() / t


class _WeightStd(nn.Module):
    """Weight Standardization of its input (a conv weight) as a layer, for the timing helpers: normswap's
    (the fused Triton kernel on CUDA) or the torch-ops formula."""

    def __init__(self, mode: str, fused: bool) -> None:
        super().__init__()
        self.mode, self.fused = mode, fused

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return (standardize_weight_fused if self.fused else standardize_weight)(w, 1e-6, self.mode)


class _GhostSplitCat(nn.Module):
    """Ghost BatchNorm the common way: ``split`` the batch, ``F.batch_norm`` each part, ``cat`` the outputs."""

    def __init__(self, c: int, virtual: int) -> None:
        super().__init__()
        self.weight, self.bias, self.virtual = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c)), virtual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([F.batch_norm(part, None, None, self.weight, self.bias, training=True)
                          for part in x.split(self.virtual)])


class _GhostReshaped(_GhostSplitCat):
    """Ghost BatchNorm as one batch norm over a reshaped batch: the k virtual batches become k groups of
    channels (``[N, C, *]`` -> ``[N / k, k * C, *]``, a copy in and out), the parameters repeated k times."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, k = x.shape[0], x.shape[1], x.shape[0] // self.virtual
        grouped = x.reshape(k, self.virtual, *x.shape[1:]).transpose(0, 1).reshape(self.virtual, k * c, *x.shape[2:])
        y = F.batch_norm(grouped, None, None, self.weight.repeat(k), self.bias.repeat(k), training=True)
        return y.reshape(self.virtual, k, *x.shape[1:]).transpose(0, 1).reshape(n, *x.shape[1:])


def _liger(kind: str, d: int) -> dict[str, nn.Module]:
    """Liger-Kernel's layer of ``kind`` (the anchor for the GPU kernels) where it is installed and CUDA runs."""
    if not torch.cuda.is_available():
        return {}
    try:
        from liger_kernel.transformers import LigerLayerNorm, LigerRMSNorm
    except ImportError:
        return {}
    return {"Liger RMSNorm": LigerRMSNorm(d, eps=1e-6, in_place=False)} if kind == "rms" else \
        {"Liger LayerNorm": LigerLayerNorm(d, eps=1e-6)}


def layer_cases(device: torch.device, smoke: bool = False) -> list[tuple]:
    """``(name, ours, {label: baseline or (baseline, memory format)}, shape, memory format)`` of each layer row;
    a baseline given with a memory format gets the input in that format. ``smoke``: tiny shapes."""
    cl, contiguous = torch.channels_last, torch.contiguous_format
    cases = [
        ("GroupNorm (32 groups; gn, gn_ws)", GroupNorm(32, 256), {"nn.GroupNorm": nn.GroupNorm(32, 256)},
         (8, 256, 56, 56), contiguous),
        ("GroupNorm, channels_last input (gn, gn_ws)", GroupNorm(32, 256),
         {"nn.GroupNorm, contiguous input": (nn.GroupNorm(32, 256), contiguous),
          "nn.GroupNorm, channels_last input": nn.GroupNorm(32, 256)}, (8, 256, 56, 56), cl),
        ("ChannelLayerNorm (ln from BatchNorm)", ChannelLayerNorm(256), {"timm LayerNorm2d": _timm_ln2d(256)},
         (8, 256, 56, 56), contiguous),
        ("RMSNorm (rms)", RMSNorm(768), {"nn.RMSNorm (F.rms_norm)": nn.RMSNorm(768), "nn.LayerNorm": nn.LayerNorm(768),
                                        **_liger("rms", 768)}, (8, 128, 768), contiguous),
        ("BertLayerNorm (bert_ln)", BertLayerNorm(768), {"nn.LayerNorm": nn.LayerNorm(768), **_liger("layer", 768)},
         (8, 128, 768), contiguous),
        ("GhostBatchNorm2d (ghost_bn, virtual 16)", GhostBatchNorm2d(64, virtual_batch_size=16),
         {"nn.BatchNorm2d": nn.BatchNorm2d(64), "split/cat": _GhostSplitCat(64, 16),
          "reshaped batch": _GhostReshaped(64, 16)}, (64, 64, 56, 56), contiguous),
        ("Weight Standardization, inside (gn_ws)", _WeightStd("inside", True),
         {"torch ops (F.batch_norm)": _WeightStd("inside", False)}, (512, 512, 3, 3), contiguous),
        ("Weight Standardization, outside", _WeightStd("outside", True),
         {"torch ops (std_mean)": _WeightStd("outside", False)}, (512, 512, 3, 3), contiguous),
    ]
    if smoke:  # channels and widths kept (the layers are built for them), batch and spatial size cut
        cases = [(n, o, b, (32, 16, 3, 3) if "Weight" in n else (shape[0] if "Ghost" in n else 2, shape[1], 3, 3)
                  if len(shape) == 4 else (2, 3, shape[-1]), f) for n, o, b, shape, f in cases]
    return cases


def layer_rows(device: torch.device, repeat: int, bw: float, dtype: torch.dtype = torch.float32,
               smoke: bool = False) -> list[dict]:
    rows = []
    for name, ours, baselines, shape, fmt in layer_cases(device, smoke):
        torch.manual_seed(0)
        x = torch.randn(*shape, device=device, dtype=dtype).contiguous(memory_format=fmt).requires_grad_(True)
        gy = torch.randn(*shape, device=device, dtype=dtype).contiguous(memory_format=fmt)
        fns = {}
        for label, m in {"ours": ours, **baselines}.items():
            m, xm, gm = (m, x, gy) if isinstance(m, nn.Module) else (
                m[0], x.detach().contiguous(memory_format=m[1]).requires_grad_(True), gy.contiguous(memory_format=m[1]))
            m.to(device=device, dtype=dtype).train()
            fns[f"{label}/fwd"] = _fwd(m, xm)
            fns[f"{label}/fwdbwd"] = _fwd_bwd(m, xm, gm)
        t = medians(fns, repeat, device)
        nbytes = x.numel() * x.element_size()
        limit_fwd, limit_bwd = 2 * nbytes / bw, 4 * nbytes / bw
        row = {"layer": name, "shape": "x".join(map(str, shape)), "dtype": str(dtype).replace("torch.", ""),
               "fwd_ms": t["ours/fwd"] * 1e3, "fwdbwd_ms": t["ours/fwdbwd"] * 1e3,
               "fwd_vs_limit": t["ours/fwd"] / limit_fwd,
               "fwdbwd_vs_limit": t["ours/fwdbwd"] / limit_bwd, "vs": {}}
        for label in baselines:
            row["vs"][label] = (t["ours/fwd"] / t[f"{label}/fwd"], t["ours/fwdbwd"] / t[f"{label}/fwdbwd"],
                                t[f"{label}/fwdbwd"] / limit_bwd)
        rows.append(row)
        print(f"  {name:<42} {row['shape']:<14} {row['dtype']:<8} fwd {row['fwd_vs_limit']:.2f}x limit, fwd+bwd "
              f"{row['fwdbwd_vs_limit']:.2f}x limit; " + ", ".join(
                  f"/{k} {v[0]:.2f} fwd {v[1]:.2f} fwd+bwd" for k, v in row["vs"].items()), flush=True)
    return rows


def _timm_ln2d(c: int) -> nn.Module:
    from timm.layers import LayerNorm2d

    return LayerNorm2d(c)


def _models(device: torch.device) -> dict[str, nn.Module]:
    import timm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = timm.create_model("resnet50", pretrained=False)
        return {"gn_ws": normswap.convert(base, "gn_ws").to(device),
                "BiT (timm resnetv2_50x1_bit)": timm.create_model("resnetv2_50x1_bit", pretrained=False).to(device),
                "BatchNorm original": base.to(device)}


def _train_step(model: nn.Module, x: torch.Tensor, dtype: torch.dtype | None) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    model.train()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
            loss = model(x).float().mean()
        loss.backward()
        opt.step()

    return step


def _infer(model: nn.Module, x: torch.Tensor, dtype: torch.dtype | None) -> Callable[[], None]:
    model.eval()

    def run() -> None:
        with torch.inference_mode(), torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
            model(x)

    return run


def model_rows(device: torch.device, repeat: int, smoke: bool = False) -> list[dict]:
    batch, size = (2, 32) if smoke else (32, 224) if device.type == "cuda" else (8, 128)
    models = _models(device)
    rows = []
    dtypes = [None, torch.bfloat16] if device.type == "cuda" or smoke else [None]
    for dtype in dtypes:
        for layout in ("contiguous", "channels_last"):
            fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=fmt)
            for m in models.values():
                m.to(memory_format=fmt)
            for kind, make in (("train step", _train_step), ("inference", _infer)):
                t = medians({k: make(m, x, dtype) for k, m in models.items()}, repeat, device, target_s=0.2)
                label = f"resnet50 {kind}, b{batch}/{size}px, {layout}" + (", bf16" if dtype else "")
                row = {"what": label, "ms": {k: v * 1e3 for k, v in t.items()}}
                rows.append(row)
                print(f"  {label}: gn_ws / BiT {t['gn_ws'] / t['BiT (timm resnetv2_50x1_bit)']:.2f}, "
                      f"gn_ws / BatchNorm {t['gn_ws'] / t['BatchNorm original']:.2f}", flush=True)
    return rows


def bert_rows(device: torch.device, repeat: int, smoke: bool = False) -> list[dict]:
    import transformers

    config = transformers.BertConfig(vocab_size=8000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                                     intermediate_size=1024)
    torch.manual_seed(0)
    base = transformers.BertForMaskedLM(config).to(device)
    models = {"original": base, "rms": normswap.convert(base, "rms"), "bert_ln": normswap.convert(base, "bert_ln")}
    ids = torch.randint(8000, (2, 16) if smoke else (8, 128), device=device)

    def step(m: nn.Module) -> Callable[[], None]:
        opt = torch.optim.AdamW(m.parameters(), lr=1e-5)
        m.train()

        def run() -> None:
            opt.zero_grad(set_to_none=True)
            m(input_ids=ids).logits.float().mean().backward()
            opt.step()

        return run

    t = medians({k: step(m) for k, m in models.items()}, repeat, device, target_s=0.2)
    row = {"what": f"BERT (4 layers, hidden 256) train step, b{ids.shape[0]} x {ids.shape[1]} tokens",
           "ms": {k: v * 1e3 for k, v in t.items()}}
    print(f"  {row['what']}: rms / original {t['rms'] / t['original']:.2f}, "
          f"bert_ln / original {t['bert_ln'] / t['original']:.2f}", flush=True)
    return [row]


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    cpu = platform.processor() or "CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads"


def markdown(device: torch.device, bw: float, layers: list[dict], models: list[dict], bert: list[dict]) -> str:
    from normswap.norms import native

    today = datetime.date.today().isoformat()
    malloc = ("glibc mmap threshold raised (freed outputs reused)" if "MALLOC_MMAP_THRESHOLD_" in os.environ
              else "default allocator")
    out = [f"## {device.type.upper()}: {machine(device)}", "",
           f"{today}, torch {torch.__version__}, normswap {normswap.__version__}, fp32 unless noted; "
           f"fused CPU kernels: {native.status().split(':')[0]}; {malloc}. Copy bandwidth {bw / 1e9:.1f} GB/s.", "",
           "### Norm layers (ratios: time / time; below 1 means normswap's layer is faster)", "",
           "| layer | shape | dtype | fwd / limit | fwd+bwd / limit "
           "| vs torch's layer: fwd, fwd+bwd (torch's own fwd+bwd / limit) |",
           "|---|---|---|---|---|---|"]
    for r in layers:
        vs = "; ".join(f"{k}: {a:.2f}, {b:.2f} ({c:.2f})" for k, (a, b, c) in r["vs"].items())
        out.append(f"| {r['layer']} | {r['shape']} | {r['dtype']} | {r['fwd_vs_limit']:.2f} "
                   f"| {r['fwdbwd_vs_limit']:.2f} | {vs} |")
    out += ["", "Limit: the bytes a layer must move at least (forward: x in, y out; forward+backward adds dy in, "
            "dx out) at the machine's copy bandwidth (a 256 MB copy). Tensors that fit in cache can beat it. "
            "Goals on CPU fp32: fwd <= 2, fwd+bwd <= 3; on CUDA bf16: both <= 1.5, RMSNorm / F.rms_norm <= 1, "
            "BertLayerNorm / nn.LayerNorm <= 1.1, GroupNorm channels_last / contiguous <= 1.", "",
            "### Converted resnet50 (milliseconds per call; ratios)", "",
            "| figure | gn_ws | BiT (timm) | BatchNorm | gn_ws / BiT | gn_ws / BatchNorm |", "|---|---|---|---|---|---|"]
    for r in models:
        ms = r["ms"]
        g, b, n = ms["gn_ws"], ms["BiT (timm resnetv2_50x1_bit)"], ms["BatchNorm original"]
        out.append(f"| {r['what']} | {g:.1f} | {b:.1f} | {n:.1f} | {g / b:.2f} | {g / n:.2f} |")
    out += ["", "### Converted BERT", "", "| figure | original | rms | bert_ln | rms / original | bert_ln / original |",
            "|---|---|---|---|---|---|"]
    for r in bert:
        ms = r["ms"]
        out.append(f"| {r['what']} | {ms['original']:.1f} | {ms['rms']:.1f} | {ms['bert_ln']:.1f} | "
                   f"{ms['rms'] / ms['original']:.2f} | {ms['bert_ln'] / ms['original']:.2f} |")
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="3 repeats instead of 7")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, one repeat, fp32 and bf16 everywhere: "
                        "checks that every part runs (figures meaningless)")
    parser.add_argument("--out", default=str(HERE.parent / "docs" / "benchmarks.md"))
    parser.add_argument("--skip", action="append", default=[], choices=["layers", "models", "bert"])
    parser.add_argument("--system-malloc", action="store_true", help="keep glibc's default mmap threshold")
    args = parser.parse_args()
    if not args.system_malloc and sys.platform.startswith("linux") and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**30), "MALLOC_TRIM_THRESHOLD_": str(2**30)}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    device = torch.device(args.device)
    repeat = 1 if args.smoke else 3 if args.quick else 7
    print(f"{machine(device)}, torch {torch.__version__}", flush=True)
    bw = copy_bandwidth(device, repeat)
    print(f"copy bandwidth {bw / 1e9:.1f} GB/s", flush=True)
    dtypes = [torch.float32, torch.bfloat16] if device.type == "cuda" or args.smoke else [torch.float32]
    layers = ([r for dt in dtypes for r in layer_rows(device, repeat, bw, dt, args.smoke)]
              if "layers" not in args.skip else [])
    model_repeat = 1 if args.smoke else max(3, repeat // 2)
    models = model_rows(device, model_repeat, args.smoke) if "models" not in args.skip else []
    bert = bert_rows(device, model_repeat, args.smoke) if "bert" not in args.skip else []
    section = markdown(device, bw, layers, models, bert)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    title = "# Benchmarks\n\nWritten by `python benchmarks/suite.py` (one section per device, the latest run replaces it).\n\n"
    text = out.read_text() if out.exists() else title
    marker = f"## {device.type.upper()}:"
    if marker in text:  # replace this device's section, keep the others
        head, _, rest = text.partition(marker)
        tail = rest[rest.find("\n## ") + 1:] if "\n## " in rest else ""
        text = head + section + ("\n" + tail if tail else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    tmp = out.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, out)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
