"""``convert(model, "rms", exact=True)``: LayerNorm -> RMSNorm with the outputs kept, by centering the residual
stream's writers. References are the original models' own outputs on the same inputs."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from torch import nn

import normswap
from normswap.inputs import noise_floor, run, split_inputs
from normswap.norms.rms_norm import CenteredRMSNorm, RMSNorm

transformers = pytest.importorskip("transformers")
T = transformers

# the goal: within 1e-5 relative in float32
GOAL_F32 = 1e-5
SMALL = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64, vocab_size=64)


def _gpt2():
    return T.GPT2LMHeadModel(T.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32))


def _opt():
    return T.OPTForCausalLM(T.OPTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, ffn_dim=64,
                                        vocab_size=64, max_position_embeddings=32, word_embed_proj_dim=32))


def _bloom():
    return T.BloomForCausalLM(T.BloomConfig(hidden_size=32, n_layer=2, n_head=2, vocab_size=64))


def _gpt_neo():
    return T.GPTNeoForCausalLM(T.GPTNeoConfig(hidden_size=32, num_layers=2, num_heads=2, vocab_size=64,
                                              max_position_embeddings=32, attention_types=[[["global", "local"], 1]]))


def _phi():
    return T.PhiForCausalLM(T.PhiConfig(num_hidden_layers=2, **SMALL))


def _vit():
    return T.ViTForImageClassification(T.ViTConfig(num_hidden_layers=2, image_size=32, patch_size=8, num_labels=3,
                                                   **{k: v for k, v in SMALL.items() if k != "vocab_size"}))


def _clip():
    tower = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64)
    return T.CLIPModel(T.CLIPConfig(text_config=dict(vocab_size=64, max_position_embeddings=16, **tower),
                                    vision_config=dict(image_size=32, patch_size=8, **tower), projection_dim=16))


MODELS = {"gpt2": _gpt2, "opt": _opt, "bloom": _bloom, "gpt_neo": _gpt_neo, "phi": _phi, "vit": _vit, "clip": _clip}


def _inputs(name: str, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(2, 3, 32, 32, generator=g)
    ids = torch.randint(0, 64, (2, 9), generator=g)
    if name == "vit":
        return pixels
    if name == "clip":
        return {"input_ids": ids, "pixel_values": pixels}
    return {"input_ids": ids}


def _output(model, inputs):
    args, kwargs = split_inputs(inputs)
    with torch.no_grad():
        out = model(*args, **kwargs)
    if hasattr(out, "logits_per_image"):  # CLIP: both towers meet here
        return torch.cat([out.logits_per_image.flatten(), out.text_embeds.flatten(), out.image_embeds.flatten()])
    return out.logits


def _perturbed(build, seed=0, dtype=torch.float32):
    """Random weights moved away from their initialization: LayerNorm weights and biases are not 1 and 0."""
    torch.manual_seed(seed)
    model = build().to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def _rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def _convert(model, inputs, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return normswap.convert(model, "rms", exact=True, example_inputs=inputs, **kw)


@pytest.mark.parametrize("name", list(MODELS))
def test_exact_rms_keeps_the_outputs(name):
    model = _perturbed(MODELS[name])
    ln_biases = [m.bias for m in model.modules() if isinstance(m, nn.LayerNorm)]
    assert ln_biases and all(float(b.detach().abs().max()) > 0 for b in ln_biases)
    converted = _convert(model, _inputs(name, seed=1))
    plan = normswap.last_plan(converted)
    assert not any(isinstance(m, nn.LayerNorm) for m in converted.modules())
    assert [c for c in plan.changes if c.action == "center"]
    # checked on other inputs than the ones the stream was found on
    inputs = _inputs(name, seed=2)
    assert _rel(_output(converted, inputs), _output(model, inputs)) <= GOAL_F32


@pytest.mark.parametrize("name", ["gpt2", "clip"])
def test_exact_rms_in_float64_is_exact_to_rounding(name):
    model = _perturbed(MODELS[name], dtype=torch.float64)
    converted = _convert(model, _inputs(name))
    inputs = split_inputs(_inputs(name, seed=3))
    with torch.no_grad():
        ref = run(model, inputs)
        # how far rounding alone moves this model's output: every weight moved by 4 ulp of float64
        floor = noise_floor(model, inputs, ref, torch.float64)
        assert 0 < floor < 1e-12
        assert _rel(run(converted, inputs), ref) <= 10 * floor


def test_heads_of_the_stream_become_centered_rms_norms():
    clip = _convert(_perturbed(_clip), _inputs("clip"))
    bloom = _convert(_perturbed(_bloom), _inputs("bloom"))
    assert type(clip.vision_model.pre_layrnorm) is CenteredRMSNorm
    assert type(bloom.transformer.word_embeddings_layernorm) is CenteredRMSNorm
    assert type(clip.text_model.final_layer_norm) is RMSNorm


def test_centering_keeps_the_parameters_and_lists_every_writer():
    model = _perturbed(_gpt2)
    before = {name: p for name, p in model.named_parameters()}
    converted = normswap.convert(model, "rms", inplace=True, exact=True, example_inputs=_inputs("gpt2"))
    centered = {c.path for c in normswap.last_plan(converted).changes if c.action == "center"}
    expected = {"transformer.wte.weight", "transformer.wpe.weight"} | {
        f"transformer.h.{i}.{m}.c_proj.{p}" for i in range(2) for m in ("attn", "mlp") for p in ("weight", "bias")}
    assert centered == expected
    for name in centered:
        assert converted.get_parameter(name) is before[name]
        dim = {"weight": 1, "bias": 0}[name.rsplit(".", 1)[1]] if "c_proj" in name else 1
        assert float(converted.get_parameter(name).detach().double().mean(dim).abs().max()) < 1e-6


def test_a_tied_output_embedding_is_untied_and_keeps_the_logits(tmp_path):
    model = _perturbed(_gpt2)
    assert model.lm_head.weight is model.transformer.wte.weight
    converted = _convert(model, _inputs("gpt2"))
    assert converted.lm_head.weight is not converted.transformer.wte.weight
    assert converted.config.tie_word_embeddings is False and model.config.tie_word_embeddings is True
    assert torch.equal(converted.lm_head.weight, model.lm_head.weight)
    rows = [c for c in normswap.last_plan(converted).changes if c.action == "untie"]
    assert [r.path for r in rows] == ["lm_head"]
    inputs = _inputs("gpt2", seed=5)
    ref = _output(model, inputs)
    converted.save_pretrained(tmp_path / "hf")
    normswap.save(converted, tmp_path / "gpt2.safetensors")
    for source in (tmp_path / "hf", tmp_path / "gpt2.safetensors"):
        loaded = normswap.load(source).eval()
        assert loaded.lm_head.weight is not loaded.transformer.wte.weight
        assert _rel(_output(loaded, inputs), ref) <= GOAL_F32


def test_a_post_ln_model_is_refused_and_left_alone():
    torch.manual_seed(0)
    bert = T.BertModel(T.BertConfig(num_hidden_layers=2, **SMALL)).eval()
    state = {k: v.clone() for k, v in bert.state_dict().items()}
    with pytest.raises(normswap.ConversionError, match=r"^encoder\.layer\.0\.attention\.output\.LayerNorm: .*post-LN"):
        normswap.convert(bert, "rms", inplace=True, exact=True)
    assert all(type(m) is not RMSNorm for m in bert.modules())
    assert all(torch.equal(v, state[k]) for k, v in bert.state_dict().items())


def test_exact_needs_the_rms_spec_and_its_formula():
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8))
    with pytest.raises(normswap.OptionError, match="spec 'bert_ln' does not support it"):
        normswap.convert(model, "bert_ln", exact=True)
    with pytest.raises(normswap.OptionError, match="drop eps="):
        normswap.convert(model, "rms", exact=True, eps=1e-3)
    with pytest.raises(normswap.OptionError, match="drop bias=False"):
        normswap.convert(model, "rms", exact=True, bias=False)
    with pytest.raises(normswap.OptionError, match="only with exact=True"):
        normswap.convert(model, "rms", example_inputs=torch.randn(2, 4))
    with pytest.raises(normswap.OptionError, match="option 'exact'"):
        normswap.convert(model, "rms", exact="yes")


def test_a_forward_that_fails_on_the_example_inputs_is_one_clear_error():
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8))
    with pytest.raises(normswap.ConversionError, match="pass example_inputs="):
        normswap.convert(model, "rms", exact=True, example_inputs=torch.randn(2, 5))


def test_a_missed_writer_is_caught_by_the_output_check_and_nothing_changes(monkeypatch):
    """The analysis is checked on the result: if it missed a writer, the outputs move, the conversion is
    refused and an in-place model is put back as it was."""
    from normswap.core import exact
    from normswap.graph import residual

    real = residual.find_stream

    def forgetful(*args, **kwargs):
        stream = real(*args, **kwargs)
        stream.writers = [w for w in stream.writers if "wpe" not in w.param]
        return stream

    monkeypatch.setattr(exact, "find_stream", forgetful)
    model = _perturbed(_gpt2)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(normswap.ConversionError, match="exact=True changed the output"):
        normswap.convert(model, "rms", inplace=True, exact=True, example_inputs=_inputs("gpt2"))
    assert model.lm_head.weight is model.transformer.wte.weight
    assert all(type(m) is not RMSNorm for m in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.long
@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "deit3_small_patch16_224"])
def test_timm_vits_with_and_without_layer_scale(name):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, img_size=32, patch_size=8, depth=2).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    converted = _convert(model, None)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert _rel(converted(x), model(x)) <= GOAL_F32
    scaled = [c for c in normswap.last_plan(converted).changes if c.scale]
    assert bool(scaled) == name.startswith("deit3")


@pytest.mark.long
def test_a_merge_of_the_features_with_other_dims_is_refused():
    """Swin's patch merging puts four tokens' features in one row: centering each token is not a shift of
    that row, so its LayerNorm would see another input."""
    timm = pytest.importorskip("timm")
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, depths=(1, 1, 1, 1), embed_dim=32,
                              num_heads=(1, 1, 1, 1), img_size=64, window_size=2).eval()
    with pytest.raises(normswap.ConversionError, match="reshapes the features"):
        _convert(model, None)


# ------------------------------------------------------------------------------ random architectures


class _Block(nn.Module):
    """One random residual block: ``x + f(norm(x))`` (pre-LN), ``norm(x + f(x))`` (post-LN), parallel
    branches, LayerScale, or a nonlinearity on the stream itself."""

    def __init__(self, d: int, kind: str, hidden: int) -> None:
        super().__init__()
        self.kind = kind
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, hidden)
        self.down = nn.Linear(hidden, d, bias=kind != "nobias")
        self.other = nn.Linear(d, d)
        self.gamma = nn.Parameter(torch.rand(d) + 0.5)

    def forward(self, x):
        if self.kind == "post":
            return self.norm(x + self.down(torch.relu(self.up(x))))
        h = self.norm(x)
        y = self.down(torch.relu(self.up(h)))
        if self.kind == "parallel":
            return x + y + self.other(h)
        if self.kind == "scale":
            return x + self.gamma * y
        if self.kind == "gelu_stream":
            return torch.nn.functional.gelu(x + y)
        if self.kind == "shift":
            return x + y + 1.0
        return x + y


class _Net(nn.Module):
    def __init__(self, d: int, kinds: list[str], head_norm: bool, hidden: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, d)
        self.pos = nn.Parameter(torch.randn(6, d))
        self.head_norm = nn.LayerNorm(d) if head_norm else None
        self.blocks = nn.ModuleList(_Block(d, k, hidden) for k in kinds)
        self.final = nn.LayerNorm(d)
        self.out = nn.Linear(d, 5)

    def forward(self, ids):
        x = self.embed(ids) + self.pos[: ids.shape[1]]
        if self.head_norm is not None:
            x = self.head_norm(x)
        for block in self.blocks:
            x = block(x)
        return self.out(self.final(x))


EXACT_KINDS = ("pre", "parallel", "scale", "nobias")
ALL_KINDS = EXACT_KINDS + ("post", "gelu_stream", "shift")


@pytest.mark.long
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(d=st.integers(2, 12), kinds=st.lists(st.sampled_from(ALL_KINDS), min_size=1, max_size=4),
       head_norm=st.booleans(), hidden=st.integers(1, 16), seed=st.integers(0, 2**16))
def test_random_residual_models_convert_exactly_or_are_refused(d, kinds, head_norm, hidden, seed):
    """Never a silent wrong result: pre-LN models (with parallel branches, LayerScale, a LayerNorm heading the
    stream) convert with their outputs kept; any other is refused with a NormSwapError."""
    torch.manual_seed(seed)
    model = _Net(d, kinds, head_norm, hidden).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ids = torch.randint(0, 20, (3, 6))
    exact_expected = all(k in EXACT_KINDS for k in kinds)
    try:
        converted = normswap.convert(model, "rms", exact=True, example_inputs=ids)
    except normswap.NormSwapError:
        assert not exact_expected
        return
    assert exact_expected
    other = torch.randint(0, 20, (2, 5))
    with torch.no_grad():
        ref = model(other)
        floor = noise_floor(model, ((other,), {}), ref, torch.float64)
        assert _rel(converted(other), ref) <= max(10 * floor, 1e-12)


# ------------------------------------------------------------------------------ command line and recipes


def test_command_line_plans_and_converts_an_hf_folder_exactly(tmp_path, capfd):
    from cli_helpers import in_process

    model = _perturbed(_gpt2)
    model.save_pretrained(tmp_path / "gpt2")
    res = in_process(capfd, "plan", "--model", tmp_path / "gpt2", "--spec", "rms", "--exact")
    assert res.returncode == 0, res.stderr
    assert "residual-stream parameters centered" in res.stdout and " untie " in res.stdout
    for out in (tmp_path / "gpt2-rms", tmp_path / "gpt2-rms.safetensors"):
        res = in_process(capfd, "convert", tmp_path / "gpt2", "--spec", "rms", "--exact", "--out", out, "-q")
        assert res.returncode == 0, res.stderr
        inputs = _inputs("gpt2", seed=7)
        assert _rel(_output(normswap.load(out).eval(), inputs), _output(model, inputs)) <= GOAL_F32
    res = in_process(capfd, "plan", "--model", tmp_path / "gpt2", "--spec", "gn", "--exact")
    assert res.returncode == 2 and "does not support it" in res.stderr


@pytest.mark.long
def test_the_exact_recipe_starts_from_the_trained_model_unchanged(tmp_path):
    """``recipes/vit_rms_exact.yaml``: a checkpoint given as init_from converts with its outputs kept, then
    fine-tunes."""
    import pathlib

    import timm
    import yaml

    from normswap.finetune import finetune

    recipe = pathlib.Path(__file__).parents[1] / "recipes" / "vit_rms_exact.yaml"
    cfg = yaml.safe_load(recipe.read_text())
    assert cfg["convert"] == {"spec": "rms", "options": {"exact": True}}
    args = {k: v for k, v in cfg["model"].items() if k not in ("_component_", "name")}
    torch.manual_seed(0)
    trained = timm.create_model(cfg["model"]["name"], pretrained=False, num_classes=10, **{**args, "depth": 2})
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    normswap.save(trained, tmp_path / "trained.safetensors")
    result = finetune(recipe, ["data=builtin", "model.depth=2", f"init_from={tmp_path / 'trained.safetensors'}",
                                "max_steps=1", "optimizer.lr=0.0", "optimizer.weight_decay=0.0", "eval_every=1",
                                "checkpoint_every=1", f"output_dir={tmp_path / 'run'}"])
    finetuned = normswap.load(result.checkpoint).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert _rel(finetuned(x), trained.eval()(x)) <= GOAL_F32
    assert any(type(m) is RMSNorm for m in finetuned.modules())


def test_a_centered_rms_norm_scripts_and_computes_its_formula():
    norm = CenteredRMSNorm(8, eps=1e-5, bias=True)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(8))
        norm.bias.copy_(torch.randn(8))
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    norm = norm.double()
    y = x / x.square().mean(-1, keepdim=True).add(1e-5).sqrt() * norm.weight + norm.bias
    ref = y - y.mean(-1, keepdim=True)
    with torch.no_grad():
        torch.testing.assert_close(norm(x), ref)
        torch.testing.assert_close(torch.jit.script(norm)(x), ref)
