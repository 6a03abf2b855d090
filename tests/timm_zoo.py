"""Building timm models for the zoo tests: names, input sizes, the per-model check."""

from __future__ import annotations

import json
import pathlib
import random
import warnings

import timm
import torch
from torch import nn

import normswap
from conversion_checks import formula_errors, unplanned_norms, unstandardized_feeds
from zoo_checks import check_batch_independence, check_forward_backward

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


def input_size(model: nn.Module) -> tuple[int, int, int]:
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    c, h, w = cfg.get("input_size", (3, 224, 224))
    if cfg.get("fixed_input_size", False):
        return c, h, w
    side = min(h, w, MAX_SIDE)
    if "min_input_size" in cfg:
        side = max(side, cfg["min_input_size"][-1])
    return c, side, side


def build(name: str, **kwargs) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return timm.create_model(name, pretrained=False, **kwargs)


def build_small(name: str, shallow: bool = False, built_with: dict | None = None) -> tuple[nn.Module, tuple[int, int, int]]:
    """``name`` built once, and its input size; a model whose input size is fixed (ViTs' position embeddings)
    is built for a smaller image (``img_size=``) when it takes one and runs on it, which the norms do not
    care about. ``shallow`` also cuts its depth (``shallow_kwargs``) where that keeps every module class;
    the depth arguments used are written into ``built_with``."""
    try:
        with torch.device("meta"):
            probe = build(name)
    except Exception:  # noqa: BLE001 - computes values while building: read its config from a real build
        probe = build(name)
    kwargs = shallow_kwargs(name, probe) if shallow else {}
    if built_with is not None:
        built_with.update(kwargs)
    c, h, w = input_size(probe)
    if max(h, w) > MAX_SIDE:
        for side in (MAX_SIDE, 128, 192):
            try:
                small = build(name, img_size=side, **kwargs)
                with torch.no_grad():
                    small.eval()(torch.randn(1, c, side, side))
                return small, (c, side, side)
            except Exception:  # noqa: BLE001 - no img_size argument, or a size its windows do not fit
                continue
    return build(name, **kwargs), (c, h, w)


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


def sample(names: list[str], k: int = SAMPLE) -> list[str]:
    rng = random.Random(SEED)
    return sorted(rng.sample(names, min(k, len(names))))


def has_norm_cheap(name: str, kind: str) -> bool:
    """Whether timm ``name`` has a ``kind`` norm, built on the meta device (no memory, no init cost)."""
    try:
        with torch.device("meta"):
            return has_norm(build(name), kind)
    except Exception:  # some models compute values while building; build those for real
        return has_norm(build(name), kind)


def check_timm(name: str, spec: str, kind: str, small: bool = False, shallow: bool = False,
               built_with: dict | None = None) -> str:
    """Convert timm ``name`` with ``spec`` and run the zoo checks; returns 'ok' or 'no-norm'. ``small`` builds
    models of a fixed input size for a smaller one where they allow it (the sweeps), ``shallow`` with fewer
    blocks where every module class stays (``shallow_kwargs``; the arguments used go into ``built_with``)."""
    if not has_norm_cheap(name, kind):
        return "no-norm"
    model, (c, h, w) = build_small(name, shallow, built_with) if small or shallow else (build(name), (None, None, None))
    plan = normswap.plan(model, spec)
    missing = unplanned_norms(model, plan, spec)
    assert not missing, f"{len(missing)} {kind} norm(s) without a plan row: {missing[:5]}"
    model = normswap.convert(model, spec, inplace=True)
    assert not has_norm(model, kind) or kind != "batch" or _left(model) == [], f"BatchNorm left: {_left(model)[:5]}"
    if c is None:
        c, h, w = input_size(model)
    torch.manual_seed(0)
    x = torch.randn(2, c, h, w)
    other = torch.randn(2, c, h, w)
    plan = normswap.last_plan(model)
    run = lambda m, inputs: m(**inputs)  # noqa: E731
    bad = formula_errors(model, plan, {"x": x}, run)
    assert not bad, f"{len(bad)} converted module(s) off their formula: {bad[:3]}"
    if kind == "batch":
        bad = unstandardized_feeds(model, plan, {"x": x}, run)
        assert not bad, f"{len(bad)} conv(s) feeding converted norms: {bad[:3]}"
    check_forward_backward(model, {"x": x}, train=True)
    check_forward_backward(model, {"x": x}, train=False)
    if kind == "batch":
        check_batch_independence(model, {"x": x}, "x", other)
    return "ok"


def _left(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
