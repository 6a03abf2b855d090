"""Regenerate timm_norms.json: which norm kinds each timm architecture has (built on the meta device).

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


def kinds(name: str) -> list[str]:
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
    return sorted(found)


def main() -> None:
    out = {"timm_version": timm.__version__, "models": {}}
    for name in timm.list_models():
        try:
            out["models"][name] = kinds(name)
        except Exception as exc:  # record, so the sweep still lists it
            out["models"][name] = [f"error: {type(exc).__name__}"]
    path = pathlib.Path(__file__).with_name("timm_norms.json")
    path.write_text(json.dumps(out, indent=0, sort_keys=True) + "\n")
    print(f"wrote {path} ({len(out['models'])} models)")


if __name__ == "__main__":
    main()
