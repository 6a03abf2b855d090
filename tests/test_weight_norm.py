"""Spec ``wn``: weight normalization of convs and linears; checkpoint keys old, new and plain; removal."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import normswap


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.ConvTranspose2d(8, 4, 2),
                         nn.Flatten(), nn.LazyLinear(5))


def built(model: nn.Module) -> nn.Module:
    model(torch.randn(1, 3, 8, 8))  # materialize the lazy layer
    return model


def test_preserves_outputs_changes_keys_and_trains():
    model = built(small_cnn())
    x = torch.randn(2, 3, 8, 8)
    converted = normswap.convert(model, "wn")
    plan = normswap.last_plan(converted)
    assert [(c.path, c.action, c.new_type) for c in plan.changes] == [
        ("0", "reparametrize", "WeightNorm(Conv2d)"), ("3", "reparametrize", "WeightNorm(ConvTranspose2d)"),
        ("5", "reparametrize", "WeightNorm(Linear)")]
    torch.testing.assert_close(converted(x), model(x))
    keys = set(converted.state_dict())
    assert "0.parametrizations.weight.original0" in keys and "0.weight" not in keys and "1.weight" in keys
    # per output unit: g has one entry per output channel (dim 1 of a transposed conv's weight)
    assert converted[0].parametrizations.weight.original0.shape == (8, 1, 1, 1)
    assert converted[3].parametrizations.weight.original0.shape == (1, 4, 1, 1)
    opt = torch.optim.SGD(converted.parameters(), lr=0.1)
    converted(x).pow(2).mean().backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in converted.parameters())


def test_converting_twice_is_converting_once():
    once = normswap.convert(built(small_cnn()), "wn")
    with pytest.warns(normswap.NothingToConvertWarning):
        twice = normswap.convert(once, "wn")
    assert {c.reason for c in normswap.last_plan(twice).changes} == {"already weight-normalized"}
    assert set(twice.state_dict()) == set(once.state_dict())


@pytest.mark.filterwarnings("ignore:.*torch.nn.utils.weight_norm. is deprecated:FutureWarning")
def test_loads_new_old_and_plain_checkpoints():
    x = torch.randn(3, 4)
    torch.manual_seed(1)
    legacy = torch.nn.utils.weight_norm(nn.Linear(4, 3))  # old keys: weight_g / weight_v
    with torch.no_grad():
        legacy.weight_g.mul_(2.0)
    target = normswap.convert(nn.Linear(4, 3), "wn")
    target.load_state_dict(legacy.state_dict())
    torch.testing.assert_close(target(x), legacy(x))

    plain = nn.Linear(4, 3)  # a checkpoint of the original model
    target.load_state_dict(plain.state_dict())
    torch.testing.assert_close(target(x), plain(x))

    new = normswap.convert(nn.Linear(4, 3), "wn")
    target.load_state_dict(new.state_dict())
    torch.testing.assert_close(target(x), new(x))


@pytest.mark.filterwarnings("ignore:.*torch.nn.utils.weight_norm. is deprecated:FutureWarning")
def test_remove_folds_back_to_plain_weights():
    model = built(small_cnn())
    x = torch.randn(2, 3, 8, 8)
    converted = normswap.convert(model, "wn")
    plain = normswap.remove_weight_norm(converted)
    assert set(plain.state_dict()) == set(model.state_dict())
    assert type(plain[0]) is nn.Conv2d and "parametrizations" in dict(converted[0].named_children())
    torch.testing.assert_close(plain(x), converted(x))
    plain.load_state_dict(model.state_dict())  # the load hook steps aside once the norm is gone
    legacy = torch.nn.utils.weight_norm(nn.Linear(4, 3))
    assert set(normswap.remove_weight_norm(legacy).state_dict()) == {"weight", "bias"}


def test_include_exclude_and_unmatched_globs():
    model = built(small_cnn())
    converted = normswap.convert(model, "wn", exclude="5")
    actions = {c.path: c.action for c in normswap.last_plan(converted).changes}
    assert actions == {"0": "reparametrize", "3": "reparametrize", "5": "skip"}
    with pytest.warns(UserWarning, match="'head' matched no conv or linear"):
        normswap.plan(model, "wn", exclude="head")


def test_hf_gpt2_conv1d_and_generate():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=1, n_head=2)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    converted = normswap.convert(model, "wn")
    ids = torch.randint(0, 64, (1, 6))
    torch.testing.assert_close(converted(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-5)
    attn = converted.transformer.h[0].attn.c_attn  # Conv1D: weight [in, out], normalized per output column
    assert attn.parametrizations.weight.original0.shape == (1, 3 * 16)
    assert converted.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 9)


def test_tied_weights_stay_tied_through_convert_train_save_and_remove(tmp_path):
    """`b.weight = a.weight`: one parametrization, shared; a plain checkpoint loads into it; folding back
    gives one weight again."""
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    model[2].weight = model[0].weight
    x = torch.randn(3, 4)
    converted = normswap.convert(model, "wn")
    rows = normswap.last_plan(converted).changes
    assert [(c.path, c.action, c.shares) for c in rows] == [("0", "reparametrize", ""), ("2", "reparametrize", "0")]
    assert converted[0].parametrizations.weight is converted[2].parametrizations.weight
    torch.testing.assert_close(converted(x), model(x))
    optimizer = torch.optim.SGD(converted.parameters(), lr=0.1)
    converted(x).square().sum().backward()
    optimizer.step()
    torch.testing.assert_close(converted[0].weight, converted[2].weight, rtol=0, atol=0)  # trained, still tied
    fresh = normswap.convert(model, "wn")
    normswap.load_state_dict(fresh, model.state_dict())  # a checkpoint of the original: both keys tied
    torch.testing.assert_close(fresh(x), model(x))
    folded = normswap.remove_weight_norm(converted)
    assert folded[0].weight is folded[2].weight


def test_a_weight_tied_to_a_layer_wn_leaves_alone_is_skipped_and_saves(tmp_path):
    """GPT-2's lm_head shares its weight with the token embedding, which wn does not transform: lm_head is
    skipped with that reason, so the tie survives and save_pretrained, save and convert_checkpoint work."""
    transformers = pytest.importorskip("transformers")
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=99, n_embd=32, n_layer=1, n_head=4,
                                                                  n_positions=64)).eval()
    converted = normswap.convert(model, "wn").eval()
    row = next(c for c in normswap.last_plan(converted).changes if c.path == "lm_head")
    assert row.action == "skip" and "tied to transformer.wte.weight (Embedding)" in row.reason
    assert converted.lm_head.weight is converted.transformer.wte.weight
    ids = torch.tensor([[1, 5, 7, 9]])
    expected = converted(ids).logits
    converted.save_pretrained(tmp_path / "folder")
    normswap.save(converted, tmp_path / "file.safetensors")
    model.save_pretrained(tmp_path / "orig")
    normswap.convert_checkpoint(tmp_path / "orig", tmp_path / "converted.safetensors", "wn")
    with torch.no_grad():
        for path in ("folder", "file.safetensors", "converted.safetensors"):
            torch.testing.assert_close(normswap.load(tmp_path / path).eval()(ids).logits, expected)
