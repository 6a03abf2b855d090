"""The whole timm zoo, one architecture per subprocess with a timeout: ``check_timm_specs`` of ``timm_zoo.py``
(the checks of ``spec_checks.py``: plan rows for every source norm, each converted module's formula, the convs
feeding converted norms, finite forward/backward, batch independence, save/load) for BatchNorm architectures
with every spec that takes a BatchNorm, LayerNorm ones with ``rms`` and ``bert_ln``, RMSNorm ones with ``ln``.

    python tests/timm_sweep.py --kind batch --out bn.jsonl              # every BatchNorm architecture
    python tests/timm_sweep.py --kind batch --spec gn_ws --out bn.jsonl  # ... with gn_ws only
    python tests/timm_sweep.py --kind layer --out ln.jsonl              # every LayerNorm one, both specs
    python tests/timm_sweep.py --kind rms --out rms.jsonl               # every RMSNorm one, with ln

Results are appended one JSON line per architecture (its failures by spec, and each plan's skip rows); a
rerun skips what its file already holds. Architectures run smallest first (parameter counts from
``tests/data/timm_norms.json``), each in a forked child with a timeout and an address-space cap; models
whose input size is fixed are built for a smaller image where they take ``img_size=``; with
``--shallow-above N``, architectures of more than N parameters are built with 1-2 blocks per stage where
their constructor allows it and every module class of the full model remains (the record's ``built_with``
names the arguments; empty: built full size).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import random
import resource
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from sweep_runner import ResultLog, run_forked  # noqa: E402

HERE = pathlib.Path(__file__).parent
INDEX = json.loads((HERE / "data" / "timm_norms.json").read_text())["models"]
SPECS = {"batch": ("gn_ws", "gn", "in", "ghost_bn", "ln"), "layer": ("rms", "bert_ln"), "rms": ("ln",)}


def one(item: tuple[str, tuple[str, ...], str, bool], report=lambda partial: None) -> dict:
    """Check one architecture with its specs; a failure to build or check is the result."""
    from timm_zoo import check_timm_specs

    name, specs, kind, shallow = item
    torch.set_num_threads(1)
    start = time.time()
    built_with: dict = {}
    skipped: dict = {}
    report({"name": name, "specs": specs})
    try:
        failures = check_timm_specs(name, specs, kind, small=True, shallow=shallow, built_with=built_with,
                                    skipped=skipped)
        status = "no-norm" if failures is None else "ok" if not any(failures.values()) else "fail"
        error = ""
    except BaseException as exc:  # noqa: BLE001 - the failure is the result
        failures, status, error = {}, "fail", f"{type(exc).__name__}: {str(exc)[:400]}"
    return {"name": name, "status": status, "error": error, "specs": failures or {},
            "skipped": {s: rows for s, rows in skipped.items() if rows}, "seconds": round(time.time() - start, 1),
            "built_with": built_with}


def failed(item: tuple[str, tuple[str, ...], str, bool], why: str, partial: dict | None = None) -> dict:
    return {"name": item[0], "status": "timeout" if "timed out" in why else "crash", "error": why, "specs": {},
            "seconds": None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="timm zoo sweep")
    parser.add_argument("--kind", choices=sorted(SPECS), required=True)
    parser.add_argument("--one")
    parser.add_argument("--spec")
    parser.add_argument("--out")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--timeout", type=int, default=600)
    parser.add_argument("--memory-gb", type=float, default=10.0)
    parser.add_argument("--max-params", type=float, default=float("inf"))
    parser.add_argument("--min-params", type=float, default=0.0)
    parser.add_argument("--shallow-above", type=float, default=float("inf"),
                        help="build architectures of more parameters with 1-2 blocks per stage where that keeps "
                             "every module class (timm_zoo.shallow_kwargs); the record says which")
    parser.add_argument("--sample", type=int, help="a random sample of this many architectures (smallest first)")
    parser.add_argument("--seed", type=int, default=0, help="the seed of --sample")
    parser.add_argument("names", nargs="*")
    args = parser.parse_args(argv)
    specs = (args.spec,) if args.spec else SPECS[args.kind]
    if args.one:
        big = INDEX.get(args.one, {}).get("params", 0) > args.shallow_above
        print(json.dumps(one((args.one, specs, args.kind, big))), flush=True)
        return 0
    import timm

    available = set(timm.list_models())
    names = args.names or sorted((n for n, d in INDEX.items() if args.kind in d["kinds"] and n in available
                                  and args.min_params <= d["params"] <= args.max_params),
                                 key=lambda n: (INDEX[n]["params"], n))
    if args.sample:
        drawn = set(random.Random(args.seed).sample(names, min(args.sample, len(names))))
        names = [n for n in names if n in drawn]
    log = ResultLog(args.out, key=lambda r: r["name"])
    todo = [n for n in names if n not in log.earlier]

    def record(r: dict) -> None:
        log.add(r)
        bad = {s: f for s, f in r["specs"].items() if f}
        print(f"{r['name']}: {r['status']} {r['error'][:200]} {bad or ''}"[:600], flush=True)

    if args.memory_gb:  # a child over it fails with MemoryError instead of taking the machine down
        resource.setrlimit(resource.RLIMIT_AS, (int(args.memory_gb * 2**30),) * 2)
    import timm_zoo  # noqa: F401 - imported once here, inherited by every forked child

    torch.set_num_threads(1)
    run_forked([(n, specs, args.kind, INDEX[n]["params"] > args.shallow_above) for n in todo], one, failed,
               workers=args.workers, timeout=args.timeout, done=record)
    bad = [r for r in log.new if r["status"] not in ("ok", "no-norm")]
    print(f"{len(log.new)} run, {len(bad)} not ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
