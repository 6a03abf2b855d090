"""Every tiny HF config converts with its specs and passes the zoo checks."""

import warnings

import pytest
import torch
from torch import nn

import normswap
from hf_zoo import MODELS, OUTPUT
from zoo_checks import check_batch_independence, check_forward_backward

CASES = [(name, spec) for name, (_, _, _, specs) in MODELS.items() for spec in specs]
# ghost_bn with one sample per virtual batch: then no sample may depend on its batch mates either
OPTIONS = {"ghost_bn": {"virtual_batch": 1}}
SOURCE_KINDS = {"gn_ws": "batch", "gn": "batch", "ghost_bn": "batch", "rms": "layer", "bert_ln": "layer",
                "ln": "rms"}


def _kinds(model):
    from normswap.adapters import read_norm

    out = {}
    for path, m in model.named_modules():
        info, _ = read_norm(m)
        if info is not None:
            out[path] = (info.kind, info.variant)
    return out


@pytest.mark.parametrize("name,spec", CASES, ids=[f"{n}-{s}" for n, s in CASES])
def test_hf_model_converts_and_trains(name, spec):
    build, make_inputs, batch_key, _ = MODELS[name]
    torch.manual_seed(0)
    model = build()
    kind = SOURCE_KINDS[spec]
    before = _kinds(model)
    assert any(k == kind for k, _ in before.values()), f"{name} has no {kind} norm to convert"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = normswap.convert(model, spec, **OPTIONS.get(spec, {}))
    assert type(out) is type(model) and out.config is not None
    plan = normswap.last_plan(out)
    after = _kinds(out)
    produced = {"bert_ln": "bert", "ghost_bn": "ghost:1"}.get(spec)  # specs whose output is read as the same kind
    left = [p for p, (k, v) in after.items() if k == kind and v != produced]
    assert not left, f"{spec} left {kind} norms: {left[:5]}\n{plan}"
    assert plan.replaced, plan
    g = torch.Generator().manual_seed(0)
    inputs, other = make_inputs(g), make_inputs(g)
    check_forward_backward(out, inputs, train=True)
    check_forward_backward(out, inputs, train=False)
    check_batch_independence(out, inputs, batch_key, other[batch_key], OUTPUT.get(name))


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_hf_generate_and_save_pretrained_survive(name, tmp_path):
    build, make_inputs, _, specs = MODELS[name]
    model = normswap.convert(build(), specs[0])
    model.eval()
    ids = make_inputs(torch.Generator().manual_seed(0))["input_ids"]
    out = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 10)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").is_file()
    assert any(p.suffix == ".safetensors" for p in tmp_path.iterdir())


def test_hf_rms_to_ln_keeps_values_of_weight():
    build = MODELS["llama"][0]
    model = build()
    with torch.no_grad():
        model.model.norm.weight.uniform_(0.5, 2.0)
    out = normswap.convert(model, "ln")
    assert isinstance(out.model.norm, nn.LayerNorm)
    assert out.model.norm.weight is model.model.norm.weight or torch.equal(out.model.norm.weight,
                                                                           model.model.norm.weight)
    assert out.model.norm.eps == model.model.norm.variance_epsilon
