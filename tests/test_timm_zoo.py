"""timm zoo: every architecture with a BatchNorm converts with gn_ws (and gn, in, ghost_bn, ln) and trains;
every one with a LayerNorm converts with rms and bert_ln. CI runs a seeded sample; ``pytest -m slow`` runs
them all. The checks are ``spec_checks.check_spec``'s (``timm_zoo.check_timm_specs``)."""


import pytest
import timm

from timm_zoo import INDEX, SAMPLE, check_timm, check_timm_specs, sample, skip_unless_installed, with_norm as _with

AVAILABLE = set(timm.list_models())


# the CI sample draws from models up to 40M parameters, to keep the fast suite fast on 2 cores; the full
# sweep (pytest -m slow) takes every architecture whatever its size
CI_MAX_PARAMS = 40e6
BN = _with("batch")
LN = _with("layer")
# architectures with known failures; each with the reason (see the sweep in the CHANGELOG / README)
KNOWN_FAILURES: dict[str, str] = {}


# of each sample, the first ones up to FAST_MAX_PARAMS run in the fast suite, the rest under -m long
FAST_BN, FAST_LN, FAST_OTHER, FAST_MAX_PARAMS = 10, 2, 2, 8e6
# the specs other than gn_ws that take a BatchNorm, checked together on one build of each sampled model
OTHER_BATCH_SPECS = ("gn", "in", "ghost_bn", "ln")


def _param(names, fast=None):
    """``names`` as parameters: known failures xfail; all but the first ``fast`` of at most FAST_MAX_PARAMS
    parameters are marked ``long``."""
    out, quick = [], 0
    for n in names:
        marks = [pytest.mark.xfail(reason=KNOWN_FAILURES[n], strict=True)] if n in KNOWN_FAILURES else []
        if fast is not None:
            if quick < fast and INDEX[n]["params"] <= FAST_MAX_PARAMS:
                quick += 1
            else:
                marks.append(pytest.mark.long)
        out.append(pytest.param(n, marks=marks))
    return out


def _spread(names: list[str]) -> list[str]:
    """The sample reordered so that any prefix of it is itself a sample (every k-th name first)."""
    return [n for start in range(4) for n in names[start::4]]


def test_index_covers_the_zoo():
    assert len(BN) >= 300 and len(LN) >= 200, "regenerate tests/data/timm_norms.json"


@pytest.mark.parametrize("name", _param(_spread(sample(_with("batch", CI_MAX_PARAMS, installed_only=False), SAMPLE)), FAST_BN))
def test_gn_ws_sample(name):
    skip_unless_installed(name)
    assert check_timm(name, "gn_ws", "batch") == "ok"


@pytest.mark.parametrize("name", _param(_spread(sample(_with("batch", CI_MAX_PARAMS, installed_only=False), 8,
                                                       seed=1)), FAST_OTHER))
def test_other_batch_specs_sample(name):
    """Built as the sweeps build them (small inputs; ``in`` at the model's own size): four specs on full-size
    models and inputs took the long suite's process past this machine's 24 GB."""
    skip_unless_installed(name)
    failures = check_timm_specs(name, OTHER_BATCH_SPECS, "batch", small=True)
    assert failures is not None and not any(failures.values()), failures


@pytest.mark.parametrize("name", _param(_spread(sample(_with("layer", CI_MAX_PARAMS, installed_only=False), 8)), FAST_LN))
@pytest.mark.parametrize("spec", ["rms", "bert_ln"])
def test_layer_norm_specs_sample(name, spec):
    skip_unless_installed(name)
    assert check_timm(name, spec, "layer") == "ok"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(AVAILABLE))
def test_gn_ws_full(name):
    if check_timm(name, "gn_ws", "batch") == "no-norm":
        pytest.skip("no BatchNorm")


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(AVAILABLE))
def test_other_batch_specs_full(name):
    failures = check_timm_specs(name, OTHER_BATCH_SPECS, "batch")
    if failures is None:
        pytest.skip("no BatchNorm")
    assert not any(failures.values()), failures


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["rms", "bert_ln"])
@pytest.mark.parametrize("name", sorted(AVAILABLE))
def test_layer_norm_specs_full(name, spec):
    if check_timm(name, spec, "layer") == "no-norm":
        pytest.skip("no LayerNorm")


@pytest.mark.parametrize("name", ["vit_base_patch16_224", "convnext_base", "resnet50"])
def test_shallow_builds_keep_every_kind_of_module(name):
    """The sweeps' shallow builds (giants with 1-2 blocks per stage) hold every kind of module the full model
    has, with the same parameter shapes, and fewer parameters."""
    import torch

    from timm_zoo import _kinds, build, shallow_kwargs

    with torch.device("meta"):
        full = build(name)
        kwargs = shallow_kwargs(name, full)
        assert kwargs, f"{name} has depth arguments"
        small = build(name, **kwargs)
    assert _kinds(small) == _kinds(full)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in full.parameters())
