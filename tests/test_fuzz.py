"""Property-based tests: random architectures (``fuzz_models.py``) through every built-in spec, and random
bytes through the file readers. A short seeded profile runs in the fast suite; ``pytest -m slow`` runs a
long one (``NORMSWAP_FUZZ_EXAMPLES``, default 2000 per test)."""

import copy
import os
import warnings

import pytest
import torch
from hypothesis import HealthCheck, assume, given, seed, settings
from hypothesis import strategies as st

import normswap
from fuzz_models import architectures

SPECS = ["gn_ws", "gn", "in", "ln", "ghost_bn", "rms", "bert_ln", "wn"]
FAST = settings(max_examples=12, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
LONG = settings(max_examples=int(os.environ.get("NORMSWAP_FUZZ_EXAMPLES", "2000")), deadline=None, derandomize=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _rows(plan):
    return [(c.path, c.action, c.new_type) for c in plan.changes]


def _runs(model, x) -> bool:
    """Whether the unconverted model runs forward and backward (a drawn model may not: two in-place acts in a
    row break autograd), so a failure below is the conversion's."""
    try:
        copy.deepcopy(model).train()(x).square().mean().backward()
        return True
    except RuntimeError:
        return False


def check_spec_invariants(model, x, spec, tmp_path):
    """Every invariant a conversion keeps, on one model and spec."""
    assume(_runs(model, x))
    before, types = _state(model), [type(m) for m in model.modules()]
    tied = model[-1].fc1.weight is model[-1].fc2.weight
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            planned = normswap.plan(model, spec)
            converted = normswap.convert(model, spec)
        except normswap.NormSwapError:
            return  # a clear refusal is allowed
        again = normswap.convert(converted, spec)
    # the input is untouched, the plan is what convert did, converting twice is converting once
    assert [type(m) for m in model.modules()] == types
    assert all(torch.equal(before[k], v) for k, v in _state(model).items())
    assert _rows(planned) == _rows(normswap.last_plan(converted))
    assert not [c for c in normswap.last_plan(again).changes if c.action != "skip"], normswap.last_plan(again)
    # tied weights stay tied (one weight, or one shared parametrization)
    head = converted[-1]
    if tied:
        assert torch.equal(head.fc1.weight, head.fc2.weight)
        if spec == "wn":
            assert head.fc1.parametrizations.weight is head.fc2.parametrizations.weight
    # finite forward and backward, train and eval
    for train in (True, False):
        m = copy.deepcopy(converted).train(train)
        y = m(x)
        assert torch.isfinite(y).all()
        y.square().mean().backward()
        assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    # outputs equal where the spec preserves computation
    if spec in ("wn", "ghost_bn"):
        with torch.no_grad():
            torch.testing.assert_close(copy.deepcopy(converted).eval()(x), copy.deepcopy(model).eval()(x),
                                       rtol=1e-4, atol=1e-5)
    # state dict and save / load round trips
    fresh = copy.deepcopy(converted)
    fresh.load_state_dict(converted.state_dict())
    path = tmp_path / f"{spec}.safetensors"
    normswap.save(converted, path, force=True)
    loaded = normswap.load(path, model=copy.deepcopy(model))
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), copy.deepcopy(converted).eval()(x), rtol=0, atol=0)


@FAST
@seed(20261127)
@given(arch=architectures(), spec=st.sampled_from(SPECS))
def test_random_architectures_keep_every_invariant(arch, spec, tmp_path):
    check_spec_invariants(*arch, spec, tmp_path)


@pytest.mark.slow
@LONG
@given(arch=architectures(), spec=st.sampled_from(SPECS))
def test_random_architectures_keep_every_invariant_long(arch, spec, tmp_path):
    check_spec_invariants(*arch, spec, tmp_path)


JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.text(max_size=6),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                    max_leaves=10)


@st.composite
def damaged_files(draw):
    """``(name, bytes)``: random bytes, or a safetensors header of random JSON, under a checkpoint name."""
    import json
    import struct

    kind = draw(st.sampled_from(["bytes", "header", "entries"]))
    if kind == "bytes":
        data = draw(st.binary(max_size=200))
    else:
        header = draw(JSON) if kind == "header" else {draw(st.text(max_size=4)): {
            "dtype": draw(st.sampled_from(["F32", "F16", "I64", "XX", 3])),
            "shape": draw(st.lists(st.integers(-2, 2**31), max_size=3)),
            "data_offsets": draw(st.lists(st.integers(-5, 2**40), max_size=3))}}
        raw = json.dumps(header).encode()
        data = struct.pack("<Q", draw(st.sampled_from([len(raw), len(raw) + 7, 2**60]))) + raw + draw(st.binary(max_size=64))
    return draw(st.sampled_from(["m.safetensors", "m.pt", "m.bin"])), data


@FAST
@seed(20261127)
@given(damaged=damaged_files())
def test_any_file_is_read_or_refused_with_one_normswap_error(damaged, tmp_path):
    name, data = damaged
    path = tmp_path / name
    path.write_bytes(data)
    for read in (lambda: normswap.inspect(path), lambda: normswap.load(path, model="timm:test_resnet")):
        try:
            read()
        except normswap.NormSwapError:
            pass


@FAST
@seed(20261127)
@given(config=JSON)
def test_any_config_json_is_read_or_refused_with_one_normswap_error(config, tmp_path):
    import json

    folder = tmp_path / "folder"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(folder / "model.safetensors"))
    try:
        normswap.load(folder)
    except normswap.NormSwapError:
        pass


@pytest.mark.slow
@LONG
@given(damaged=damaged_files())
def test_any_file_is_read_or_refused_long(damaged, tmp_path):
    test_any_file_is_read_or_refused_with_one_normswap_error.hypothesis.inner_test(damaged=damaged, tmp_path=tmp_path)


@pytest.mark.slow
@LONG
@given(config=JSON)
def test_any_config_json_is_read_or_refused_long(config, tmp_path):
    test_any_config_json_is_read_or_refused_with_one_normswap_error.hypothesis.inner_test(config=config,
                                                                                        tmp_path=tmp_path)
