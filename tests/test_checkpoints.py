"""Checkpoints: convert_checkpoint, save/load round trips, key mapping both ways, safety and bad input."""

import hashlib
import json
import pathlib
import pickle

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import normswap
from normswap.io.safetensors_file import read_header

timm = pytest.importorskip("timm")
safetensors_torch = pytest.importorskip("safetensors.torch")
pytestmark = pytest.mark.usefixtures("one_thread")

TIMM = "test_resnet"


def randomize(model: nn.Module) -> nn.Module:
    """Non-trivial norm statistics and affine values, so a lost or misplaced tensor changes the output."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            for name in ("weight", "bias"):
                p = getattr(m, name, None)
                if isinstance(p, nn.Parameter) and p.dim() == 1:
                    p.copy_(torch.rand(p.shape, generator=g) + (0.5 if name == "weight" else -0.5))
    return model.eval()


def timm_model(**kwargs):
    return randomize(timm.create_model(TIMM, pretrained=False, **kwargs))


def digest(path: pathlib.Path) -> str:
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    h = hashlib.sha256()
    for f in files:
        if f.is_file():
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def leftovers(folder: pathlib.Path) -> list[str]:
    return [p.name for p in folder.iterdir() if "normswap-" in p.name]


@pytest.fixture
def timm_ckpt(tmp_path):
    model = timm_model()
    path = tmp_path / "orig.safetensors"
    safetensors_torch.save_file(model.state_dict(), path)
    return model, path


def tiny_bert_folder(path: pathlib.Path, cls="BertForMaskedLM", **cfg):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=37, **cfg)
    model = randomize(getattr(transformers, cls)(config))
    model.save_pretrained(path)
    return model


BERT_INPUT = torch.tensor([[1, 5, 7, 9, 2, 0]])


# ------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("spec,options", [("gn_ws", {"groups": 8}), ("gn", {}), ("ghost_bn", {"virtual_batch": 2}),
                                          ("wn", {}), ("in", {})])
def test_timm_checkpoint_converts_streamed_and_loads_back_identical(timm_ckpt, tmp_path, spec, options):
    model, src = timm_ckpt
    before = digest(src)
    out = tmp_path / "out.safetensors"
    result = normswap.convert_checkpoint(src, out, spec, model=f"timm:{TIMM}", **options)
    assert result.streamed and out.is_file() and digest(src) == before
    loaded = normswap.load(out)
    reference = normswap.convert(model, spec, **options).eval()
    x = torch.randn(2, 3, 64, 64)
    assert type(loaded) is type(model)
    torch.testing.assert_close(loaded.eval()(x), reference(x), rtol=0, atol=0)
    # what was written is a plain safetensors file other tools read
    assert set(safetensors_torch.load_file(out)) == set(reference.state_dict())


def test_save_load_round_trip_of_a_trained_converted_timm_model(tmp_path):
    converted = normswap.convert(timm_model(num_classes=7), "gn_ws", groups=4)
    opt = torch.optim.SGD(converted.parameters(), lr=0.1)
    converted.train()
    converted(torch.randn(4, 3, 32, 32)).square().mean().backward()
    opt.step()
    path = normswap.save(converted, tmp_path / "trained.safetensors")
    loaded = normswap.load(path)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded.eval()(x), converted.eval()(x))
    assert loaded.num_classes == 7


def test_hf_folder_saved_from_a_converted_model_reloads_identical(tmp_path):
    transformers = pytest.importorskip("transformers")
    original = tiny_bert_folder(tmp_path / "orig")
    converted = normswap.convert(original, "rms")
    converted.save_pretrained(tmp_path / "conv")
    assert json.loads((tmp_path / "conv" / "config.json").read_text())["normswap"]["conversions"][0]["spec"] == "rms"
    loaded = normswap.load(tmp_path / "conv")
    assert type(loaded) is transformers.BertForMaskedLM
    assert type(loaded.bert.embeddings.LayerNorm).__name__ == "RMSNorm"
    # tied weights stay tied after the strict load
    assert loaded.cls.predictions.decoder.weight is loaded.bert.embeddings.word_embeddings.weight
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(BERT_INPUT).logits, converted.eval()(BERT_INPUT).logits,
                                   rtol=0, atol=0)


@pytest.mark.parametrize("out_name", ["conv_folder", "conv.safetensors"])
def test_hf_folder_converts_to_folder_or_file_and_loads_back(tmp_path, out_name):
    original = tiny_bert_folder(tmp_path / "orig", cls="BertForSequenceClassification", num_labels=3)
    (tmp_path / "orig" / "vocab.txt").write_text("[PAD]\n[UNK]\n")
    out = tmp_path / out_name
    result = normswap.convert_checkpoint(tmp_path / "orig", out, "bert_ln")
    assert result.streamed == out_name.endswith(".safetensors")
    if out.is_dir():
        assert (out / "vocab.txt").read_text() == "[PAD]\n[UNK]\n"
    loaded = normswap.load(out)
    reference = normswap.convert(original, "bert_ln").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(BERT_INPUT).logits, reference(BERT_INPUT).logits, rtol=0, atol=0)


def test_sharded_hf_folder_converts(tmp_path):
    original = tiny_bert_folder(tmp_path / "orig")
    original.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    out = tmp_path / "rms.safetensors"
    normswap.convert_checkpoint(tmp_path / "sharded", out, "rms")
    loaded = normswap.load(out)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(BERT_INPUT).logits,
                                   normswap.convert(original, "rms").eval()(BERT_INPUT).logits, rtol=0, atol=0)


def test_training_pickle_with_nesting_and_ddp_prefix(tmp_path):
    model = timm_model()
    src = tmp_path / "train.pth"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, src)
    out = tmp_path / "out.safetensors"
    normswap.convert_checkpoint(src, out, "gn", model=f"timm:{TIMM}")
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(normswap.load(out).eval()(x), normswap.convert(model, "gn").eval()(x), rtol=0, atol=0)


def test_load_original_checkpoint_with_spec(timm_ckpt):
    model, src = timm_ckpt
    loaded = normswap.load(src, model=f"timm:{TIMM}", spec="gn_ws", groups=8)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded.eval()(x), normswap.convert(model, "gn_ws", groups=8).eval()(x), rtol=0, atol=0)
    # the README's promise: the dropped running statistics are noted in the plan's warnings
    assert any("running statistics" in w and "dropped" in w for w in normswap.last_plan(loaded).warnings)


def test_custom_spec_with_new_parameters_falls_back_to_materializing(timm_ckpt, tmp_path):
    class ScaledGN(nn.GroupNorm):
        def __init__(self, c):
            super().__init__(1, c)
            self.scale = nn.Parameter(torch.full((1,), 2.0))

        def forward(self, x):
            return super().forward(x) * self.scale

    @normswap.register_spec("test_scaled_gn", sources=("batch",), description="GN with a learned scale")
    def scaled_gn(info):
        return ScaledGN(info.num_features)

    try:
        model, src = timm_ckpt
        out = tmp_path / "out.safetensors"
        result = normswap.convert_checkpoint(src, out, "test_scaled_gn", model=f"timm:{TIMM}")
        assert not result.streamed
        stored = safetensors_torch.load_file(out)
        scales = [v for k, v in stored.items() if k.endswith(".scale")]
        assert scales and all(torch.equal(s, torch.full((1,), 2.0)) for s in scales)
        loaded = normswap.load(out)
        x = torch.randn(1, 3, 32, 32)
        torch.testing.assert_close(loaded.eval()(x), normswap.convert(model, "test_scaled_gn").eval()(x),
                                   rtol=0, atol=0)
    finally:
        normswap.unregister_spec("test_scaled_gn")


# ------------------------------------------------------------------------------------- key mapping both ways


def test_original_state_dict_loads_into_converted_model_with_a_note():
    original = timm_model()
    converted = normswap.convert(timm.create_model(TIMM, pretrained=False), "gn_ws", groups=8)
    report = normswap.load_state_dict(converted, original.state_dict())
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in original.modules())
    assert any(f"of {n_bn} norms dropped" in n for n in report.notes)
    for name, m in original.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            new = converted.get_submodule(name)
            assert torch.equal(new.weight, m.weight) and torch.equal(new.bias, m.bias)
            assert not hasattr(new, "running_mean")


def test_converted_checkpoint_loads_into_the_original_architecture():
    converted = normswap.convert(timm_model(), "gn", groups=8)
    original = timm.create_model(TIMM, pretrained=False)
    report = normswap.load_state_dict(original, converted.state_dict())
    assert any("set to mean 0, var 1" in n for n in report.notes)
    bn = next(m for m in original.modules() if isinstance(m, nn.BatchNorm2d))
    assert torch.equal(bn.running_var, torch.ones_like(bn.running_var))


def test_weight_norm_keys_map_both_ways():
    plain = timm_model()
    wn_model = normswap.convert(timm.create_model(TIMM, pretrained=False), "wn")
    report = normswap.load_state_dict(wn_model, plain.state_dict())
    assert any("split into weight-norm g and v" in n for n in report.notes)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(wn_model.eval()(x), plain(x), rtol=1e-5, atol=1e-5)
    # and back: g/v folded into a plain weight equals torch's own removal
    back = timm.create_model(TIMM, pretrained=False)
    report = normswap.load_state_dict(back, wn_model.state_dict())
    assert any("folded into a plain weight" in n for n in report.notes)
    folded = normswap.remove_weight_norm(wn_model)
    for k, v in folded.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v, rtol=1e-6, atol=1e-6)


def test_legacy_weight_norm_keys_load_into_wn_model():
    legacy = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ConvTranspose2d(4, 5, 3))
    for m in legacy:
        torch.nn.utils.weight_norm(m, dim=1 if isinstance(m, nn.ConvTranspose2d) else 0)
    target = normswap.convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ConvTranspose2d(4, 5, 3)), "wn")
    normswap.load_state_dict(target, legacy.state_dict())
    x = torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(target(x), legacy(x))


def test_rms_without_bias_drops_and_restores_bias():
    original = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
    randomize(original)
    converted = normswap.convert(original, "rms", bias=False)
    report = normswap.load_state_dict(converted, original.state_dict())
    assert any("bias of 1 norms dropped" in n for n in report.notes)
    back = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
    report = normswap.load_state_dict(back, converted.state_dict())
    assert torch.equal(back[1].bias, torch.zeros(8)) and any("set to 0" in n for n in report.notes)


def test_base_model_checkpoint_prefix_is_mapped(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=37)
    head = transformers.BertForMaskedLM(config)
    base = normswap.convert(transformers.BertModel(config, add_pooling_layer=False), "rms")
    normswap.load_state_dict(base, {k: v for k, v in head.state_dict().items() if k.startswith("bert.")})
    assert torch.equal(base.embeddings.word_embeddings.weight, head.bert.embeddings.word_embeddings.weight)


# --------------------------------------------------------------------------------------------- bad input


def test_wrong_architecture_names_the_file_and_first_keys(timm_ckpt, tmp_path):
    _, src = timm_ckpt
    with pytest.raises(normswap.CheckpointError) as err:
        normswap.convert_checkpoint(src, tmp_path / "o.safetensors", "gn", model="timm:resnet18")
    msg = str(err.value)
    assert str(src) in msg and "missing from the checkpoint" in msg and "first:" in msg
    assert not (tmp_path / "o.safetensors").exists() and not leftovers(tmp_path)


def test_head_shape_mismatch_suggests_num_classes(tmp_path):
    src = tmp_path / "ten.safetensors"
    safetensors_torch.save_file(timm_model(num_classes=10).state_dict(), src)
    with pytest.raises(normswap.CheckpointError, match=r"num_classes=10"):
        normswap.convert_checkpoint(src, tmp_path / "o.safetensors", "gn", model=f"timm:{TIMM}")


@pytest.mark.parametrize("damage", ["truncated", "header", "short"])
def test_truncated_or_corrupt_safetensors(timm_ckpt, tmp_path, damage):
    _, src = timm_ckpt
    data = src.read_bytes()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes({"truncated": data[: len(data) // 2], "header": data[:8] + b"{not json" + data[17:],
                     "short": data[:5]}[damage])
    with pytest.raises(normswap.CheckpointError, match="bad.safetensors: not a readable safetensors file"):
        normswap.convert_checkpoint(bad, tmp_path / "o.safetensors", "gn", model=f"timm:{TIMM}")
    assert not (tmp_path / "o.safetensors").exists()


def test_truncated_pickle(tmp_path):
    src = tmp_path / "m.pth"
    torch.save(timm_model().state_dict(), src)
    src.write_bytes(src.read_bytes()[:5000])
    with pytest.raises(normswap.CheckpointError, match="m.pth: not a readable torch checkpoint"):
        normswap.load(src, model=f"timm:{TIMM}")


class _RunsCode:
    """Unpickling this calls ``pathlib.Path.touch`` on a marker file: what a malicious checkpoint does."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    src = tmp_path / "evil.pt"
    state = timm_model().state_dict()
    with open(src, "wb") as f:
        torch.save({**state, "payload": _RunsCode(marker)}, f)
    # the file really would run code when unpickled without weights_only
    torch.load(src, weights_only=False)
    assert marker.exists()
    marker.unlink()
    with pytest.raises(normswap.UnsafeCheckpointError, match="evil.pt: refused"):
        normswap.convert_checkpoint(src, tmp_path / "o.safetensors", "gn", model=f"timm:{TIMM}")
    with pytest.raises(normswap.UnsafeCheckpointError):
        normswap.load(src, model=f"timm:{TIMM}")
    assert not marker.exists() and not (tmp_path / "o.safetensors").exists()


def test_plain_pickle_protocol_file_is_refused_too(tmp_path):
    marker = tmp_path / "pwned"
    src = tmp_path / "evil.bin"
    src.write_bytes(pickle.dumps(_RunsCode(marker)))
    with pytest.raises(normswap.UnsafeCheckpointError):
        normswap.load(src, model=f"timm:{TIMM}")
    assert not marker.exists()


def test_unknown_spec_and_missing_path(timm_ckpt, tmp_path):
    _, src = timm_ckpt
    with pytest.raises(normswap.UnknownSpecError, match="Did you mean 'gn_ws'"):
        normswap.convert_checkpoint(src, tmp_path / "o.safetensors", "gn_wz", model=f"timm:{TIMM}")
    with pytest.raises(normswap.CheckpointNotFoundError, match="nope.safetensors: no such file"):
        normswap.convert_checkpoint(tmp_path / "nope.safetensors", tmp_path / "o.safetensors", "gn")
    with pytest.raises(normswap.OptionError, match="does not say which model"):
        normswap.convert_checkpoint(src, tmp_path / "o.safetensors", "gn")
    with pytest.raises(normswap.OptionError, match="not pickles"):
        normswap.convert_checkpoint(src, tmp_path / "o.pt", "gn", model=f"timm:{TIMM}")


def test_unrecordable_options_fail_before_writing(tmp_path):
    @normswap.register_spec("test_obj_opt", sources=("batch",), description="takes an object option")
    def obj_opt(info, *, factory: object = None):
        return nn.GroupNorm(1, info.num_features)

    try:
        converted = normswap.convert(nn.Sequential(nn.BatchNorm2d(4)), "test_obj_opt", factory=object())
        with pytest.raises(normswap.CheckpointError, match="cannot be recorded as JSON"):
            normswap.save(converted, tmp_path / "x.safetensors")
        assert not (tmp_path / "x.safetensors").exists() and not leftovers(tmp_path)
    finally:
        normswap.unregister_spec("test_obj_opt")


# ------------------------------------------------------------------------------------------ atomic output


def test_existing_output_needs_force_and_input_is_never_overwritten(timm_ckpt, tmp_path):
    _, src = timm_ckpt
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"keep me")
    with pytest.raises(normswap.DestinationExistsError, match="already exists; pass --force"):
        normswap.convert_checkpoint(src, out, "gn", model=f"timm:{TIMM}")
    assert out.read_bytes() == b"keep me"
    normswap.convert_checkpoint(src, out, "gn", model=f"timm:{TIMM}", force=True)
    assert read_header(out)[1]["normswap"]
    before = digest(src)
    with pytest.raises(normswap.DestinationExistsError, match="never overwrites its input"):
        normswap.convert_checkpoint(src, src, "gn", model=f"timm:{TIMM}", force=True)
    assert digest(src) == before


def test_failure_mid_write_leaves_no_partial_output(timm_ckpt, tmp_path, monkeypatch):
    from normswap.io import safetensors_file as safetensors_io

    _, src = timm_ckpt
    out = tmp_path / "sub" / "out.safetensors"
    calls = {"n": 0}
    real_write = safetensors_io.OutputTensor

    def failing(*args, **kwargs):
        item = real_write(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 5:
            def boom():
                raise KeyboardInterrupt
            return real_write(item.name, item.dtype, item.shape, boom, item.done)
        return item

    monkeypatch.setattr("normswap.checkpoints.writers.OutputTensor", failing)
    with pytest.raises(KeyboardInterrupt):
        normswap.convert_checkpoint(src, out, "gn", model=f"timm:{TIMM}")
    assert not out.exists() and not (tmp_path / "sub").exists() and not leftovers(tmp_path)


def test_force_replaces_only_a_folder_normswap_wrote(tmp_path):
    """--force replaces an output folder normswap wrote, atomically; a folder it did not write (`--out ..`
    from inside a project) is refused even with --force, and every file in it stays."""
    tiny_bert_folder(tmp_path / "orig")
    out = tmp_path / "out"
    normswap.convert_checkpoint(tmp_path / "orig", out, "rms")
    (out / "stale.txt").write_text("from an earlier conversion")
    normswap.convert_checkpoint(tmp_path / "orig", out, "bert_ln", force=True)
    assert not (out / "stale.txt").exists() and (out / "config.json").is_file() and not leftovers(tmp_path)
    project = tmp_path / "project"
    project.mkdir()
    (project / "train.py").write_text("print('mine')")
    with pytest.raises(normswap.DestinationExistsError, match="did not write"):
        normswap.convert_checkpoint(tmp_path / "orig", project, "rms", force=True)
    assert (project / "train.py").read_text() == "print('mine')" and not leftovers(tmp_path)


# --------------------------------------------------------------------------------------------------- inspect


def test_inspect_lists_norms_with_fused_act_and_tensor_summary(tmp_path):
    model = timm.create_model("test_efficientnet", pretrained=False)
    src = tmp_path / "eff.safetensors"
    safetensors_torch.save_file(model.state_dict(), src)
    result = normswap.inspect(src, model="timm:test_efficientnet")
    bn1 = next(r for r in result.norms if r.path == "bn1")
    assert (bn1.type, bn1.kind, bn1.features, bn1.affine, bn1.act) == ("BatchNormAct2d", "batch",
                                                                       str(model.bn1.num_features), "yes", "SiLU")
    assert result.tensors.count == len(model.state_dict())
    assert result.tensors.nbytes == sum(t.numel() * t.element_size() for t in model.state_dict().values())
    text = str(result)
    assert "fused act" in text and "largest tensors" in text
    plain = normswap.inspect(src)
    assert plain.norms is None and "pass --model" in str(plain)


def test_inspect_converted_checkpoint_shows_its_conversion(timm_ckpt, tmp_path):
    _, src = timm_ckpt
    out = tmp_path / "o.safetensors"
    normswap.convert_checkpoint(src, out, "gn_ws", model=f"timm:{TIMM}", groups=8)
    result = normswap.inspect(out)
    assert result.conversions[0]["spec"] == "gn_ws" and {r.type for r in result.norms} == {"GroupNorm"}
    assert "converted with spec gn_ws (groups=8" in str(result)


# ------------------------------------------------------------------------------- transformers specifics


def test_hf_renamed_checkpoint_keys_load(tmp_path):
    """transformers v5 renames some keys between the checkpoint and the model (ViT's attention): a folder
    written by save_pretrained converts and loads back."""
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                    num_attention_heads=4, intermediate_size=37)
    original = randomize(transformers.ViTModel(config))
    original.save_pretrained(tmp_path / "vit")
    x = torch.randn(2, 3, 32, 32)
    reference = normswap.convert(original, "rms").eval()
    for out in (tmp_path / "vit.safetensors", tmp_path / "vit-rms"):
        normswap.convert_checkpoint(tmp_path / "vit", out, "rms")
        with torch.no_grad():
            torch.testing.assert_close(normswap.load(out).eval()(x).last_hidden_state,
                                       reference(x).last_hidden_state, rtol=0, atol=0)


def test_specs_that_derive_values_are_converted_in_memory(tmp_path):
    """Gemma's RMSNorm scales by 1 + weight; `ln` folds that into the new weight, so copying the tensor
    as it is would be wrong: the converter notices the new tensor and converts the model for real."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GemmaConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                      num_key_value_heads=2, head_dim=8, intermediate_size=37)
    original = randomize(transformers.GemmaForCausalLM(config))
    original.save_pretrained(tmp_path / "gemma")
    result = normswap.convert_checkpoint(tmp_path / "gemma", tmp_path / "gemma-ln.safetensors", "ln")
    assert not result.streamed and any("anew from their old values" in n for n in result.notes)
    ids = torch.tensor([[1, 5, 7, 9]])
    with torch.no_grad():
        torch.testing.assert_close(normswap.load(tmp_path / "gemma-ln.safetensors").eval()(ids).logits,
                                   normswap.convert(original, "ln").eval()(ids).logits, rtol=0, atol=0)


def test_original_checkpoint_into_a_folded_conversion_is_refused():
    transformers = pytest.importorskip("transformers")
    config = transformers.GemmaConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                      num_key_value_heads=2, head_dim=8, intermediate_size=37)
    original = transformers.GemmaForCausalLM(config)
    converted = normswap.convert(original, "ln")
    with pytest.raises(normswap.CheckpointError, match="scales by 1 \\+ weight"):
        normswap.load_state_dict(converted, original.state_dict())


def test_folders_transformers_converts_on_load_load_and_convert(tmp_path):
    """transformers 5 saves a MoE model one tensor per expert and fuses them when loading: normswap reads
    the folder the way from_pretrained does, unconverted or converted, through load and convert_checkpoint."""
    transformers = pytest.importorskip("transformers")
    config = transformers.Qwen3MoeConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                         num_key_value_heads=2, head_dim=8, intermediate_size=37,
                                         moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2)
    original = randomize(transformers.Qwen3MoeForCausalLM(config)).eval()
    original.save_pretrained(tmp_path / "moe")
    from safetensors import safe_open

    with safe_open(tmp_path / "moe" / "model.safetensors", "pt") as f:
        assert "model.layers.0.mlp.experts.0.gate_proj.weight" in f.keys()  # the saved layout differs
    ids = torch.tensor([[1, 5, 7, 9], [3, 4, 2, 8]])
    reference = transformers.Qwen3MoeForCausalLM.from_pretrained(tmp_path / "moe").eval()
    with torch.no_grad():
        expected = reference(ids).logits
        torch.testing.assert_close(normswap.load(tmp_path / "moe").eval()(ids).logits, expected, rtol=0, atol=0)
        converted = normswap.convert(reference, "ln").eval()
        converted.save_pretrained(tmp_path / "moe-ln")
        torch.testing.assert_close(normswap.load(tmp_path / "moe-ln").eval()(ids).logits, converted(ids).logits,
                                   rtol=0, atol=0)
        for out in (tmp_path / "moe.safetensors", tmp_path / "moe-ln-folder"):
            normswap.convert_checkpoint(tmp_path / "moe", out, "ln")
            torch.testing.assert_close(normswap.load(out).eval()(ids).logits, converted(ids).logits, rtol=0, atol=0)


def test_tensors_a_converter_produced_are_not_renamed_twice(tmp_path):
    """Mistral Large 4 saves its experts as ``...layers.1.experts.0.w1.weight``; a scoped renaming
    (``.experts.`` -> ``.mlp.experts.``) applies to the fused ``...mlp.experts.gate_up_proj`` the converter
    makes too: a name the model already holds is taken as it is."""
    transformers = pytest.importorskip("transformers")
    import hf_sweep

    if "mistral_large4" not in hf_sweep.model_types():
        pytest.skip(f"transformers {transformers.__version__} has no mistral_large4")
    original, _, _ = hf_sweep.build("mistral_large4")
    original.save_pretrained(tmp_path / "m")
    for folder, model in ((tmp_path / "m", original), (tmp_path / "m-rms", normswap.convert(original, "rms"))):
        if model is not original:
            model.save_pretrained(folder)
        loaded = normswap.load(folder)
        assert loaded.state_dict().keys() == model.state_dict().keys()
        for key, value in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), key


def test_affine_free_batch_norm_and_shared_wn_modules_load_across_the_conversion():
    """A converted checkpoint of BatchNorm(affine=False) loads back into the original (running statistics
    set to 0/1, as the README says for every BatchNorm); an original checkpoint loads into `wn` on a module
    used at two paths."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, affine=False))
    converted = normswap.convert(model, "gn_ws", groups=2)
    report = normswap.load_state_dict(model, converted.state_dict())
    assert any("set to mean 0, var 1" in n for n in report.notes)
    assert torch.equal(model[1].running_var, torch.ones(8))
    shared = nn.Linear(4, 4)
    twice = nn.Sequential(shared, nn.ReLU(), shared)
    wn = normswap.convert(twice, "wn")
    normswap.load_state_dict(wn, twice.state_dict())
    x = torch.randn(2, 4)
    torch.testing.assert_close(wn(x), twice(x))


def test_files_outside_the_source_folder_are_never_read_or_copied(tmp_path):
    """A tokenizer file that is a link to elsewhere is not copied into the output; a shard index naming
    ../x or an absolute path is refused."""
    tiny_bert_folder(tmp_path / "orig")
    secret = tmp_path / "secret.txt"
    secret.write_text("private")
    (tmp_path / "orig" / "tokenizer.json").symlink_to(secret)
    (tmp_path / "orig" / "vocab.txt").write_text("[PAD]\n")
    normswap.convert_checkpoint(tmp_path / "orig", tmp_path / "out", "rms")
    assert not (tmp_path / "out" / "tokenizer.json").exists() and (tmp_path / "out" / "vocab.txt").is_file()
    for name in ("../secret.safetensors", str(secret)):
        bad = tmp_path / "bad"
        bad.mkdir(exist_ok=True)
        (bad / "config.json").write_text((tmp_path / "orig" / "config.json").read_text())
        (bad / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": name}}))
        with pytest.raises(normswap.CheckpointError, match="outside its folder"):
            normswap.load(bad)


@pytest.mark.parametrize("model_type", ["bert", "evilbert"])
def test_a_folder_with_custom_code_never_runs_it_nor_prompts(tmp_path, model_type):
    """config.json's auto_map names the folder's own Python file: a known model_type is built with the
    library's class, an unknown one is refused with one error; the file never runs, nothing is asked."""
    tiny_bert_folder(tmp_path / "orig")
    config = json.loads((tmp_path / "orig" / "config.json").read_text())
    config.update(model_type=model_type, architectures=["EvilModel"],
                  auto_map={"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"})
    (tmp_path / "orig" / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "pwned"
    (tmp_path / "orig" / "evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
                                               "from transformers import BertConfig as EvilConfig\n"
                                               "from transformers import BertModel as EvilModel\n")
    if model_type == "bert":  # the library's BertModel: the masked-LM head's keys do not fit it, said in one error
        with pytest.raises(normswap.CheckpointError, match="in the checkpoint but not in the model"):
            normswap.load(tmp_path / "orig")
        from normswap.named_models import build_model

        assert type(build_model(str(tmp_path / "orig"))).__name__ == "BertModel"
    else:
        with pytest.raises(normswap.NormSwapError, match="never does"):
            normswap.load(tmp_path / "orig")
    assert not marker.exists()


# ------------------------------------------------------------------------------------ untrusted records


def _with_record(tmp_path, record) -> pathlib.Path:
    """A small .safetensors file whose normswap metadata is ``record`` (any JSON, or raw text)."""
    from safetensors.torch import save_file

    path = tmp_path / "r.safetensors"
    text = record if isinstance(record, str) else json.dumps(record)
    save_file({"w": torch.zeros(2)}, str(path), metadata={"normswap": text})
    return path


@pytest.mark.parametrize("record,match", [
    ({"format": 1, "base": {"timm": "test_resnet", "kwargs": {"checkpoint_path": "/etc/passwd"}}}, "read files"),
    ({"format": 1, "base": {"timm": "test_resnet", "kwargs": {"pretrained": True}}}, "read files"),
    ({"format": "1", "conversions": []}, "format: a positive integer"),
    ({"format": 1, "conversions": {"spec": "gn"}}, "conversions: a list"),
    ({"format": 1, "conversions": [{"spec": 3}]}, r"conversions\[0\]"),
    ({"format": 1, "base": {"hf": "Bert Model", "config": {"model_type": "bert"}}}, "base.hf"),
    ({"format": 1, "base": {"hf": "BertModel"}}, "base.config"),
    ({"format": 1, "base": [1, 2]}, "base:"),
    ({"format": 1, "extra": 1}, "unknown entries"),
    ([1, 2, 3], "not a JSON object"),
    ("[" * 100000 + "]" * 100000, "not valid JSON"),
    ({"format": 1, "conversions": [{"spec": "gn", "options": {"a": [[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]}}]}, "deeper"),
])
def test_a_malformed_record_is_one_checkpoint_error(tmp_path, record, match):
    with pytest.raises(normswap.CheckpointError, match=match):
        normswap.load(_with_record(tmp_path, record))


def test_absurd_recorded_sizes_are_refused_on_the_meta_device(tmp_path, monkeypatch):
    """A 7 KB folder whose config names hidden_size 16384: the model is built on meta and the weights checked
    against it first, so the refusal comes before any real allocation (5.7 GB before)."""
    from normswap import named_models as models

    tiny_bert_folder(tmp_path / "orig")
    config = json.loads((tmp_path / "orig" / "config.json").read_text())
    config.update(hidden_size=16384, intermediate_size=65536, num_attention_heads=16)
    (tmp_path / "orig" / "config.json").write_text(json.dumps(config))
    devices = []
    real = models._build_hf
    monkeypatch.setattr(models, "_build_hf", lambda config, device, where: devices.append(device) or
                        real(config, device, where))
    with pytest.raises(normswap.CheckpointError, match="does not fit"):
        normswap.load(tmp_path / "orig")
    assert devices == ["meta"]


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children,
                                                                                       max_size=3), max_leaves=12)
RECORDS = st.fixed_dictionaries({}, optional={"format": JSON, "base": JSON | st.fixed_dictionaries(
    {"timm": JSON | st.sampled_from(["test_resnet", "nope"]), "kwargs": JSON}), "conversions": JSON | st.lists(
        st.fixed_dictionaries({"spec": JSON | st.sampled_from(["gn", "wn", "nope"]), "options": JSON}), max_size=2),
    "source": JSON}) | JSON


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(record=RECORDS)
def test_any_record_gives_a_model_or_one_normswap_error(tmp_path, record):
    try:
        normswap.load(_with_record(tmp_path, record))
    except normswap.NormSwapError:
        pass
