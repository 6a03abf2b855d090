"""Building timm models for the zoo tests: names, input sizes, the per-model check."""

from __future__ import annotations

import json
import pathlib
import random
import tempfile
import warnings
from typing import Sequence

import timm
import torch
from torch import nn

import normswap
from spec_checks import check_spec

INDEX = json.loads((pathlib.Path(__file__).parent / "data" / "timm_norms.json").read_text())["models"]
SEED = 20261126
SAMPLE = 64
MAX_SIDE = 96


def with_norm(kind: str, max_params: float = float("inf"), installed_only: bool = True) -> list[str]:
    """The architectures of the recorded index (``tests/data/timm_norms.json``) holding a ``kind`` norm, up to
    ``max_params`` parameters (that this timm has, unless ``installed_only=False``: the samples are drawn
    from the record alone, so that every timm version tests the same models)."""
    available = set(timm.list_models()) if installed_only else set(INDEX)
    return sorted(n for n, d in INDEX.items() if kind in d["kinds"] and d["params"] <= max_params and n in available)


def skip_unless_installed(name: str) -> None:
    """Skip the calling test when the installed timm lacks ``name`` (a recorded sample is pinned)."""
    import pytest

    if name not in timm.list_models():
        pytest.skip(f"{name} is in tests/data/timm_norms.json but not in timm {timm.__version__}")


def has_norm(model: nn.Module, kind: str) -> bool:
    from normswap.adapters import read_norm

    for m in model.modules():
        info, _ = read_norm(m)
        if info is not None and info.kind == kind:
            return True
        if kind == "batch" and isinstance(m, nn.modules.batchnorm._BatchNorm):
            return True
    return False


def input_size(model: nn.Module, reduced: bool = True) -> tuple[int, int, int]:
    """The input size of timm ``model``: its config's, at most ``MAX_SIDE`` pixels a side where its input size
    is not fixed and ``reduced``."""
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    c, h, w = cfg.get("input_size", (3, 224, 224))
    if cfg.get("fixed_input_size", False) or not reduced:
        return c, h, w
    side = min(h, w, MAX_SIDE)
    if "min_input_size" in cfg:
        side = max(side, cfg["min_input_size"][-1])
    return c, side, side


def build(name: str, **kwargs) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return timm.create_model(name, pretrained=False, **kwargs)


def build_small(name: str, shallow: bool = False) -> tuple[nn.Module, tuple[int, int, int], dict]:
    """``name`` built once, its input size and the constructor arguments used; a model whose input size is
    fixed (ViTs' position embeddings) is built for a smaller image (``img_size=``) when it takes one and runs
    on it, which the norms do not care about. ``shallow`` also cuts its depth (``shallow_kwargs``) where that
    keeps every module class."""
    try:
        with torch.device("meta"):
            probe = build(name)
    except Exception:  # noqa: BLE001 - computes values while building: read its config from a real build
        probe = build(name)
    kwargs = shallow_kwargs(name, probe) if shallow else {}
    c, h, w = input_size(probe)
    if max(h, w) > MAX_SIDE:
        for side in (MAX_SIDE, 128, 192):
            try:
                small = build(name, img_size=side, **kwargs)
                with torch.no_grad():
                    small.eval()(torch.randn(1, c, side, side))
                return small, (c, side, side), {**kwargs, "img_size": side}
            except Exception:  # noqa: BLE001 - no img_size argument, or a size its windows do not fit
                continue
    return build(name, **kwargs), (c, h, w), kwargs


def _kinds(model: nn.Module) -> set:
    return {(type(m), tuple((n, tuple(p.shape)) for n, p in m.named_parameters(recurse=False)))
            for m in model.modules()}


# depth arguments of timm constructors, tried on the meta device: a flat block count, or one per stage
_DEPTH_KEYS = ("depth", "depths", "layers", "num_blocks")


def shallow_kwargs(name: str, full: nn.Module) -> dict:
    """Constructor arguments that build ``name`` with 1-2 blocks per stage (much faster to build and run),
    accepted only when the shallow model holds exactly the kinds of module of ``full``, told apart by class
    and parameter shapes: every kind of block, norm and conv of every stage width is still there. ``{}``
    when none does."""
    classes = _kinds(full)
    size = sum(p.numel() for p in full.parameters())
    candidates = [{"depth": 2}] + [{key: (1,) * n} for key in _DEPTH_KEYS[1:] for n in range(2, 7)]
    candidates += [{key: (2,) * n} for key in _DEPTH_KEYS[1:] for n in range(2, 7)]
    for kwargs in candidates:
        try:
            with torch.device("meta"):
                small = build(name, **kwargs)
        except Exception:  # noqa: BLE001 - not an argument of this constructor, or a length it refuses
            continue
        if _kinds(small) == classes and sum(p.numel() for p in small.parameters()) < size:
            return kwargs
    return {}


def sample(names: list[str], k: int = SAMPLE, seed: int = 0) -> list[str]:
    """``k`` of ``names``, drawn with ``SEED + seed``."""
    rng = random.Random(SEED + seed)
    return sorted(rng.sample(names, min(k, len(names))))


def has_norm_cheap(name: str, kind: str) -> bool:
    """Whether timm ``name`` has a ``kind`` norm, built on the meta device (no memory, no init cost)."""
    try:
        with torch.device("meta"):
            return has_norm(build(name), kind)
    except Exception:  # some models compute values while building; build those for real
        return has_norm(build(name), kind)


def check_timm_specs(name: str, specs: Sequence[str], kind: str, small: bool = False, shallow: bool = False,
                     built_with: dict | None = None, skipped: dict | None = None) -> dict[str, list[str]] | None:
    """Build timm ``name`` once and run ``spec_checks.check_spec`` for each of ``specs``: the failures by spec,
    ``None`` when it holds no ``kind`` norm. ``small`` builds models of a fixed input size for a smaller one
    where they allow it (the sweeps), ``shallow`` with fewer blocks where every module class stays
    (``shallow_kwargs``); the constructor arguments used go into ``built_with``, each plan's skip rows into
    ``skipped``. gn_ws must also leave no BatchNorm (every timm BatchNorm is one it converts)."""
    if not has_norm_cheap(name, kind):
        return None
    if small or shallow:
        model, (c, h, w), kwargs = build_small(name, shallow)
    else:
        model, kwargs = build(name), {}
        c, h, w = input_size(model)
    if built_with is not None:
        built_with.update(kwargs)
    torch.manual_seed(0)
    inputs = {"x": torch.randn(2, c, h, w)}
    # InstanceNorm needs more than one position per channel: at the small side the sweeps use, the last stages
    # of a stride-32 network (and their pooled branches, GhostNetV3's) are down to 1x1, so ``in`` runs at the
    # model's own input size (the global-pool case, 1x1 at any size, is the conversion's to skip)
    full = input_size(model, reduced=False) if "img_size" not in kwargs else (c, h, w)
    full_inputs = {"x": torch.randn(2, *full)}

    def reload(converted: nn.Module) -> nn.Module:
        with tempfile.TemporaryDirectory() as tmp:
            path = normswap.save(converted, pathlib.Path(tmp) / "model.safetensors")
            return normswap.load(path, model=build(name, **kwargs))

    out = {}
    for spec in specs:
        rows = [] if skipped is None else skipped.setdefault(spec, [])
        out[spec] = check_spec(model, full_inputs if spec == "in" else inputs, spec, reload, rows)
        if spec == "gn_ws" and rows:  # a BatchNorm left in place
            out[spec].append(f"skipped: {rows[:5]}")
    return out


def check_timm(name: str, spec: str, kind: str, small: bool = False, shallow: bool = False) -> str:
    """:func:`check_timm_specs` for one spec: 'ok' or 'no-norm', an ``AssertionError`` naming the failures."""
    result = check_timm_specs(name, (spec,), kind, small, shallow)
    if result is None:
        return "no-norm"
    assert not result[spec], f"{name} {spec}: {result[spec]}"
    return "ok"

