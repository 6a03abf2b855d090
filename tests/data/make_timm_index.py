"""Regenerate timm_norms.json: which norm kinds each timm architecture has and its parameter count
(built on the meta device, so nothing is allocated or initialized).

Run: python tests/data/make_timm_index.py   (a few minutes; no weights are downloaded)
"""

import json
import pathlib
import sys
import warnings

import timm
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
from normswap.adapters import read_norm  # noqa: E402


def describe(name: str) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with torch.device("meta"):
                model = timm.create_model(name, pretrained=False)
        except Exception:
            model = timm.create_model(name, pretrained=False)
    found = set()
    for m in model.modules():
        info, _ = read_norm(m)
        if info is not None:
            found.add(info.kind)
        elif isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            found.add("batch")
    return {"kinds": sorted(found), "params": sum(p.numel() for p in model.parameters())}


def main() -> None:
    out = {"timm_version": timm.__version__, "models": {}}
    for name in timm.list_models():
        try:
            out["models"][name] = describe(name)
        except Exception as exc:  # record, so the sweep still lists it
            out["models"][name] = {"kinds": [f"error: {type(exc).__name__}"], "params": 0}
    path = pathlib.Path(__file__).with_name("timm_norms.json")
    path.write_text(json.dumps(out, sort_keys=True, separators=(",", ":")).replace("},", "},\n") + "\n")
    print(f"wrote {path} ({len(out['models'])} models)")


if __name__ == "__main__":
    main()
