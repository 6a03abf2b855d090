"""Norms no adapter knows are identified by what they compute, converted like their known equivalents,
or skipped with the true reason; nothing of a spec's source family is left without a plan row."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import normswap
from conversion_checks import formula_errors, unplanned_norms
from normswap.adapters import read_norm
from normswap.adapters.probe import NotANorm, identify

pytestmark = pytest.mark.usefixtures("one_thread")


class WrittenNorm(nn.Module):
    """A norm written out in python ops the way model code writes them, for any of the probed formulas."""

    def __init__(self, size, kind, eps, weight, bias, channels_first=False):
        super().__init__()
        self.kind, self.eps, self.mode, self.channels_first = kind, eps, weight, channels_first
        if weight != "none":
            self.weight = nn.Parameter(torch.randn(size))
        if bias:
            self.bias = nn.Parameter(torch.randn(size))

    def forward(self, x):
        if self.channels_first:
            x = x.movedim(1, -1)
        h = x.float()
        if self.kind == "layer":
            h = h - h.mean(-1, keepdim=True)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.mode == "w":
            h = self.weight * h
        elif self.mode == "1+w":
            h = h * (1.0 + self.weight.float())
        if hasattr(self, "bias"):
            h = h + self.bias
        h = h.to(x.dtype)
        return h.movedim(-1, 1) if self.channels_first else h


class FrozenBN(nn.Module):
    """DETR's frozen BatchNorm: buffers only, eps fixed in forward."""

    def __init__(self, n):
        super().__init__()
        for name, init in (("weight", torch.rand), ("bias", torch.randn), ("running_mean", torch.randn),
                           ("running_var", torch.rand)):
            self.register_buffer(name, init(n))

    def forward(self, x):
        scale = self.weight.reshape(1, -1, 1, 1) * (self.running_var.reshape(1, -1, 1, 1) + 1e-5).rsqrt()
        return x * scale + (self.bias.reshape(1, -1, 1, 1) - self.running_mean.reshape(1, -1, 1, 1) * scale)


EPS = st.one_of(st.sampled_from([0.0, 1e-5, 1e-6, 1e-12, 1e-8, torch.finfo(torch.float32).eps]),
                st.floats(1e-9, 1e-2).map(lambda e: float(f"{e:.3g}")))


@settings(max_examples=40, deadline=None)
@given(kind=st.sampled_from(["layer", "rms"]), eps=EPS, weight=st.sampled_from(["w", "1+w", "none"]),
       bias=st.booleans(), channels_first=st.booleans(), size=st.integers(2, 40))
def test_probing_identifies_each_formula_and_its_eps(kind, eps, weight, bias, channels_first, size):
    found = identify(WrittenNorm(size, kind, eps, weight, bias, channels_first))
    assert (found.kind, found.weight, found.bias, found.channels_first) == (kind, weight, bias, channels_first)
    assert found.eps == pytest.approx(eps, rel=1e-3, abs=1e-30)


@pytest.mark.parametrize("eps", [0.00781, 0.0078125, 1.2345e-5, torch.finfo(torch.float16).eps])
@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_probing_reads_an_eps_near_a_machine_epsilon_or_with_more_digits(kind, eps):
    """Found by hypothesis: eps 0.00781 (within 1e-3 of bfloat16's epsilon 2**-7, not it) was snapped to 2**-7,
    which then missed the rows and left the norm unidentified; an eps with more than three significant
    digits must be read too."""
    found = identify(WrittenNorm(7, kind, eps, "w", False, False))
    assert found.kind == kind and found.eps == pytest.approx(eps, rel=1e-4)


def test_probing_reads_a_frozen_batch_norm_and_converts_it():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), FrozenBN(8), nn.ReLU())
    info, reason = read_norm(model[1])
    assert reason is None and (info.kind, info.frozen, info.eps, info.adapter) == ("batch", True, 1e-5, "probe")
    plan = normswap.plan(model, "gn_ws", groups=4)
    row = plan.replaced[0]
    assert row.path == "1" and row.convs_standardized == ("0",) and "identified by probing" in row.warnings[0]
    converted = normswap.convert(model, "gn_ws", groups=4)
    assert isinstance(converted[1], nn.GroupNorm)
    assert torch.equal(converted[1].weight, model[1].weight) and torch.equal(converted[1].bias, model[1].bias)
    x = torch.randn(2, 3, 10, 10)
    assert not formula_errors(converted, normswap.last_plan(converted), {"input": x}, lambda m, i: m(*i.values()))


@pytest.mark.parametrize("spec,kind,expect", [("rms", "layer", "RMSNorm"), ("bert_ln", "layer", "BertLayerNorm"),
                                              ("ln", "rms", "LayerNorm")])
def test_identified_norms_convert_like_their_known_equivalents(spec, kind, expect):
    model = nn.Sequential(nn.Linear(16, 16), WrittenNorm(16, kind, 1e-6, "w", kind == "layer"), nn.Linear(16, 4))
    weight = model[1].weight
    converted = normswap.convert(model, spec, inplace=True)
    assert type(converted[1]).__name__ == expect
    assert converted[1].weight is weight  # the same Parameter: an optimizer keeps its state
    x = torch.randn(3, 5, 16)
    assert not formula_errors(converted, normswap.last_plan(converted), {"input": x}, lambda m, i: m(*i.values()))
    if spec == "ln":  # RMS -> LN over the same dims with the eps probing read
        assert converted[1].eps == 1e-6


def test_unit_offset_weight_is_folded_like_gemma():
    norm = WrittenNorm(16, "rms", 1e-6, "1+w", False)
    converted = normswap.convert(nn.Sequential(norm), "ln")
    assert torch.allclose(converted[0].weight, 1 + norm.weight)
    assert any("folded" in w for w in normswap.last_plan(converted).replaced[0].warnings)


def test_unsized_norms_take_their_size_from_the_input():
    class NoWeightRMSNorm(nn.Module):  # nanochat / Llama 4 QK norm: no parameter, no size
        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    model = nn.Sequential(nn.Linear(8, 12), NoWeightRMSNorm())
    converted = normswap.convert(model, "ln")
    x = torch.randn(4, 8)
    h = model[0](x)
    assert torch.allclose(converted(x), F.layer_norm(h, (12,), eps=1e-6), atol=1e-6)
    assert normswap.convert(converted, "rms")[1].kind == "rms"  # read back and converted again


def _layer_norm(x):
    x = x - x.mean(-1, keepdim=True)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)


class GatedRMSNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(8))

    def forward(self, x, gate=None):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


class TupleLayerNorm(nn.Module):  # I-BERT style: returns (output, scaling factor)
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(8))

    def forward(self, x):
        return self.weight * _layer_norm(x), None


class PerHeadLayerNorm(nn.Module):  # Cohere's QK norm: a [heads, dim] weight, normalizing over dim only
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(2, 8))

    def forward(self, x):
        return self.weight * _layer_norm(x)


class EpsOutsideLayerNorm(nn.Module):  # normalizes, but as no formula normswap replaces
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(8))

    def forward(self, x):
        return self.weight * (x - x.mean(-1, keepdim=True)) / (x.std(-1, keepdim=True) + 1e-6)


@pytest.mark.parametrize("module,family,reason", [
    (GatedRMSNorm(), "rms", "more than the input (gate)"),
    (TupleLayerNorm(), "layer", "returns a tuple"),
    (PerHeadLayerNorm(), "layer", "shape (2, 8)"),
    (EpsOutsideLayerNorm(), "layer", "matches no formula"),
])
def test_what_cannot_be_read_is_a_skip_row_with_the_reason(module, family, reason):
    assert normswap.adapters.norm_family(module) == family
    model = nn.Sequential(nn.Linear(8, 8), module)
    spec = "ln" if family == "rms" else "rms"
    plan = normswap.plan(model, spec)
    assert [(c.path, c.action) for c in plan.changes] == [("1", "skip")]
    assert reason in plan.changes[0].reason and "register an adapter" in plan.changes[0].reason
    assert not unplanned_norms(model, plan, spec)


def test_a_norm_module_that_calls_a_functional_norm_but_is_not_one_is_rewritten_inside():
    class TupleFunctionalLayerNorm(nn.Module):  # returns a tuple, but its F.layer_norm call can be rewritten
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(8))

        def forward(self, x):
            return F.layer_norm(x, (8,), self.weight), None

    model = nn.Sequential(TupleFunctionalLayerNorm())
    assert [(c.path, c.action) for c in normswap.plan(model, "rms").changes] == [("0", "rewrite")]
    x = torch.randn(2, 8)
    y, _ = normswap.convert(model, "rms")(x)
    assert torch.allclose(y, x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5), atol=1e-6)


def test_an_elementwise_scale_is_not_a_norm():
    class NoNorm(nn.Module):  # MobileBERT: named like a norm, computes x * w + b
        def __init__(self):
            super().__init__()
            self.weight, self.bias = nn.Parameter(torch.ones(8)), nn.Parameter(torch.zeros(8))

        def forward(self, x):
            return x * self.weight + self.bias

    with pytest.raises(NotANorm):
        identify(NoNorm())
    assert read_norm(NoNorm()) == (None, None)


def test_probing_leaves_the_user_module_alone_and_works_on_meta():
    norm = WrittenNorm(16, "layer", 1e-5, "w", True)
    calls = []
    norm.register_forward_hook(lambda *a: calls.append(a))
    before = {k: v.clone() for k, v in norm.state_dict().items()}
    state = torch.random.get_rng_state()
    assert read_norm(norm)[0].identified.startswith("LayerNorm")
    assert not calls and all(torch.equal(before[k], v) for k, v in norm.state_dict().items())
    assert torch.equal(state, torch.random.get_rng_state())
    with torch.device("meta"):
        meta = WrittenNorm(16, "rms", 1e-6, "w", False)
    info, _ = read_norm(meta)
    assert info.kind == "rms" and info.weight.device.type == "meta"
    assert type(normswap.convert(nn.Sequential(meta), "ln")[0]) is nn.LayerNorm


def test_a_known_adapter_wins_over_probing():
    info, _ = read_norm(nn.LayerNorm(8))
    assert info.adapter == "layer_norm" and not info.identified


def test_functional_calls_inside_leaf_modules_are_rewritten():
    class ScaledLayerNorm(nn.Module):  # no children; its own forward calls F.layer_norm
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.rand(8) + 0.5)

        def forward(self, x):
            return 2 * F.layer_norm(x, (8,), self.weight, None, 1e-5)

    model = nn.Sequential(nn.Linear(8, 8), ScaledLayerNorm())
    plan = normswap.plan(model, "rms")
    assert [(c.path, c.action) for c in plan.changes] == [("1", "rewrite")]
    converted = normswap.convert(model, "rms")
    x = torch.randn(3, 8)
    h = model[0](x)
    expected = 2 * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5) * model[1].weight
    assert torch.allclose(converted(x), expected, atol=1e-6)


def test_plan_counts_only_the_spec_family():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.LayerNorm(8 * 6 * 6))
    assert [c.path for c in normswap.plan(model, "rms").changes] == ["3"]
    only_ln = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    with pytest.warns(normswap.NothingToConvertWarning, match="holds no batch norm"):
        converted = normswap.convert(only_ln, "gn_ws")
    assert normswap.last_plan(converted).summary().endswith("0 skipped")


def test_convs_behind_padding_in_untraced_modules_are_standardized():
    timm = pytest.importorskip("timm")
    from conversion_checks import unstandardized_feeds

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = timm.create_model("cpubone_t0", pretrained=False)
    converted = normswap.convert(model, "gn_ws")
    plan = normswap.last_plan(converted)
    assert all(c.convs_standardized for c in plan.replaced), [c.path for c in plan.replaced if not c.convs_standardized]
    x = torch.randn(2, 3, 64, 64)
    assert not unstandardized_feeds(converted, plan, {"x": x}, lambda m, i: m(**i))


def test_a_trainable_batch_norm_of_another_class_is_read_with_its_statistics():
    class MyBatchNorm(nn.Module):  # not a torch subclass: batch statistics in train mode, running ones in eval
        def __init__(self, n):
            super().__init__()
            self.weight, self.bias = nn.Parameter(torch.rand(n) + 0.5), nn.Parameter(torch.randn(n))
            self.register_buffer("running_mean", torch.zeros(n))
            self.register_buffer("running_var", torch.ones(n))

        def forward(self, x):
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training,
                                0.1, 1e-3)

    info, _ = read_norm(MyBatchNorm(6))
    assert (info.kind, info.frozen, info.eps) == ("batch", False, 1e-3)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), MyBatchNorm(6))
    assert isinstance(normswap.convert(model, "ghost_bn", virtual_batch=2)[1], nn.BatchNorm2d)


def test_a_norm_that_runs_only_in_float32_is_probed_in_float32():
    class Float32OnlyRMSNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(8))

        def forward(self, x):
            if x.dtype != torch.float32:
                raise TypeError("this kernel takes float32 only")
            return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    found = identify(Float32OnlyRMSNorm())
    assert (found.kind, found.eps) == ("rms", 1e-6)


def test_a_module_that_breaks_the_probe_is_a_skip_row_not_a_crash():
    class LazyLayerNorm(nn.Module):  # a parameter without a shape yet
        def __init__(self):
            super().__init__()
            self.weight = nn.parameter.UninitializedParameter()

        def forward(self, x):
            return _layer_norm(x)

    model = nn.Sequential(nn.Linear(4, 4), LazyLayerNorm())
    plan = normswap.plan(model, "rms")
    assert [(c.path, c.action) for c in plan.changes] == [("1", "skip")] and "probing it failed" in plan.changes[0].reason


def test_a_norm_that_ignores_its_dummy_weight_is_replaced_by_one_of_any_size():
    class WeightlessRMSNorm(nn.Module):  # FalconMamba: a dummy weight buffer of another size than the input
        def __init__(self, size):
            super().__init__()
            self.register_buffer("weight", torch.ones(size), persistent=False)

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    class Mixer(nn.Module):  # FalconMamba's mixer reads the norm's dummy weight for its fused kernel
        def __init__(self):
            super().__init__()
            self.proj, self.norm = nn.Linear(4, 6), WeightlessRMSNorm(64)

        def forward(self, x):
            assert self.norm.weight.shape == (64,)
            return self.norm(self.proj(x))

    model = Mixer()
    converted = normswap.convert(model, "ln")
    x = torch.randn(3, 4)
    torch.testing.assert_close(converted(x), F.layer_norm(model.proj(x), (6,), eps=1e-6))
    assert torch.equal(converted.norm.weight, model.norm.weight) and converted.state_dict().keys() == model.state_dict().keys()
    assert any("non-persistent buffer weight kept" in w for w in normswap.last_plan(converted).replaced[0].warnings)


def test_inspect_marks_probed_norms():
    rows = normswap.inspect(nn.Sequential(nn.Linear(8, 8), WrittenNorm(8, "rms", 1e-6, "w", False))).norms
    assert [(r.path, r.kind, r.features) for r in rows] == [("1", "rms (probed)", "8")]
