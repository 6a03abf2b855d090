"""The whole timm zoo, one architecture per subprocess with a timeout: ``check_timm`` of ``timm_zoo.py``
(plan rows for every source norm, each converted module's formula, the convs feeding converted norms,
finite forward/backward, batch independence) for BatchNorm architectures with ``gn_ws`` and LayerNorm
ones with ``rms`` and ``bert_ln``.

    python tests/timm_sweep.py --kind batch --out bn.jsonl          # every BatchNorm architecture
    python tests/timm_sweep.py --kind layer --out ln.jsonl          # every LayerNorm one, both specs

Results are appended one JSON line per (architecture, spec); a rerun skips what its file already holds.
Architectures run smallest first (parameter counts from ``tests/data/timm_norms.json``), each in a forked
child with a timeout and an address-space cap; models whose input size is fixed are built for a smaller
image where they take ``img_size=``; with ``--shallow-above N``, architectures of more than N parameters are
built with 1-2 blocks per stage where their constructor allows it and every module class of the full model
remains (the record's ``built_with`` names the arguments; empty: built full size).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import resource
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from sweep_runner import ResultLog, run_forked  # noqa: E402

HERE = pathlib.Path(__file__).parent
INDEX = json.loads((HERE / "data" / "timm_norms.json").read_text())["models"]
SPECS = {"batch": ("gn_ws",), "layer": ("rms", "bert_ln")}


def one(item: tuple[str, str, str, bool], report=lambda partial: None) -> dict:
    """Check one (architecture, spec, kind); the failure, if any, is the result."""
    from timm_zoo import check_timm

    name, spec, kind, shallow = item
    torch.set_num_threads(1)
    start = time.time()
    built_with: dict = {}
    try:
        status = check_timm(name, spec, kind, small=True, shallow=shallow, built_with=built_with)
        error = ""
    except BaseException as exc:  # noqa: BLE001 - the failure is the result
        status, error = "fail", f"{type(exc).__name__}: {str(exc)[:400]}"
    return {"name": name, "spec": spec, "status": status, "error": error, "seconds": round(time.time() - start, 1),
            "built_with": built_with}


def failed(item: tuple[str, str, str, bool], why: str, partial: dict | None = None) -> dict:
    return {"name": item[0], "spec": item[1], "status": "timeout" if "timed out" in why else "crash", "error": why,
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
    parser.add_argument("names", nargs="*")
    args = parser.parse_args(argv)
    if args.one:
        big = INDEX.get(args.one, {}).get("params", 0) > args.shallow_above
        print(json.dumps(one((args.one, args.spec, args.kind, big))), flush=True)
        return 0
    import timm

    available = set(timm.list_models())
    names = args.names or sorted((n for n, d in INDEX.items() if args.kind in d["kinds"] and n in available
                                  and args.min_params <= d["params"] <= args.max_params),
                                 key=lambda n: (INDEX[n]["params"], n))
    log = ResultLog(args.out, key=lambda r: (r["name"], r["spec"]))
    todo = [(n, s) for n in names for s in SPECS[args.kind] if (n, s) not in log.earlier]

    def record(r: dict) -> None:
        log.add(r)
        print(f"{r['name']} {r['spec']}: {r['status']} {r['error'][:200]}", flush=True)

    if args.memory_gb:  # a child over it fails with MemoryError instead of taking the machine down
        resource.setrlimit(resource.RLIMIT_AS, (int(args.memory_gb * 2**30),) * 2)
    import timm_zoo  # noqa: F401 - imported once here, inherited by every forked child

    torch.set_num_threads(1)
    run_forked([(n, s, args.kind, INDEX[n]["params"] > args.shallow_above) for n, s in todo], one, failed, workers=args.workers, timeout=args.timeout,
               done=record)
    bad = [r for r in log.new if r["status"] not in ("ok", "no-norm")]
    print(f"{len(log.new)} run, {len(bad)} not ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
