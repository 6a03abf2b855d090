"""convert/plan on small real models: what convert must keep, bad input, the plan."""

import copy
import warnings

import pytest
import timm
import torch
from timm.layers import BatchNormAct2d
import torch.nn.functional as F
from torch import nn

import normswap
from normswap.norms.std_conv import StdConv2d


class Block(nn.Module):
    def __init__(self, c_in=3, c=48):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c, 3, padding=1, bias=False)
        self.bn = BatchNormAct2d(c, act_layer=nn.ReLU)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.head = nn.Linear(c, 5)

    def forward(self, x):
        x = self.bn2(self.conv2(self.bn(self.conv(x))))
        return self.head(x.mean((2, 3)))


def _bn_count(model):
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_resnet_gn_ws_keeps_class_methods_and_keys():
    model = timm.create_model("resnet18", pretrained=False)
    keys = set(model.state_dict())
    out = normswap.convert(model, "gn_ws")
    assert type(out) is type(model) and hasattr(out, "forward_features") and out.pretrained_cfg
    assert _bn_count(out) == 0 and _bn_count(model) > 0
    assert isinstance(out.conv1, StdConv2d)
    dropped = {k for k in keys if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    assert set(out.state_dict()) == keys - dropped
    y = out.forward_features(torch.randn(1, 3, 64, 64))
    assert torch.isfinite(y).all()


def test_inplace_false_leaves_input_untouched():
    model = Block()
    before = copy.deepcopy(model.state_dict())
    types_before = [type(m) for m in model.modules()]
    normswap.convert(model, "gn_ws")
    assert [type(m) for m in model.modules()] == types_before
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_affine_parameters_are_the_same_objects_and_optimizer_keeps_state():
    model = Block()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.randn(4, 3, 8, 8)
    model(x).sum().backward()
    opt.step()
    weight = model.bn.weight
    state_before = opt.state[weight]["exp_avg"].clone()
    out = normswap.convert(model, "gn_ws", inplace=True)
    assert out.bn.weight is weight and out.conv.weight is model.conv.weight
    opt.zero_grad()
    out(x).sum().backward()
    before = weight.detach().clone()
    opt.step()
    assert not torch.equal(before, weight.detach())
    assert opt.state[weight]["step"] == 2
    assert not torch.equal(opt.state[weight]["exp_avg"], state_before)


def test_fused_activation_survives():
    model = Block()
    out = normswap.convert(model, "gn_ws")
    assert isinstance(out.bn, nn.GroupNorm) and isinstance(out.bn.act, nn.ReLU)
    y = out.bn(torch.randn(2, 48, 4, 4))
    assert (y >= 0).all() and (y == 0).any()
    # the same for every spec that takes BatchNorm
    for spec in ("gn", "in", "ln", "ghost_bn"):
        conv = normswap.convert(model, spec)
        assert isinstance(conv.bn.act, nn.ReLU), spec
        assert (conv.bn(torch.randn(4, 48, 4, 4)) >= 0).all(), spec


def test_idempotent():
    model = Block()
    once = normswap.convert(model, "gn_ws")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        twice = normswap.convert(once, "gn_ws")
    assert any(issubclass(w.category, normswap.NothingToConvertWarning) for w in caught)
    assert [type(m) for m in twice.modules()] == [type(m) for m in once.modules()]
    x = torch.randn(2, 3, 8, 8)
    once.eval(), twice.eval()
    assert torch.equal(once(x), twice(x))


def test_device_dtype_mode_requires_grad_and_hooks():
    model = Block().to(torch.bfloat16).eval()
    model.bn2.weight.requires_grad_(False)
    calls = []
    model.bn2.register_forward_hook(lambda m, i, o: calls.append(o.shape))
    out = normswap.convert(model, "gn")
    assert not out.bn2.training and out.bn2.weight.dtype == torch.bfloat16
    assert not out.bn2.weight.requires_grad and out.bn2.bias.requires_grad
    out(torch.randn(1, 3, 8, 8, dtype=torch.bfloat16))
    assert calls == [torch.Size([1, 48, 8, 8])]


def test_shared_module_replaced_everywhere():
    model = Block()
    model.shared = model.bn2  # one module at two paths
    out = normswap.convert(model, "gn")
    assert out.shared is out.bn2 and isinstance(out.bn2, nn.GroupNorm)
    plan = normswap.last_plan(out)
    row = next(c for c in plan.changes if c.path in ("bn2", "shared"))
    assert set((row.path, *row.also_at)) == {"bn2", "shared"}


def test_group_count_rule_reported():
    model = Block(c=24)
    plan = normswap.plan(model, "gn")
    row = next(c for c in plan.changes if c.path == "bn2")
    assert any("12 groups of 2" in w for w in row.warnings)
    out = normswap.convert(model, "gn")
    assert out.bn2.num_groups == 12
    assert normswap.convert(model, "gn", group_size=8).bn2.num_groups == 3


def test_choose_groups_never_size_one_by_accident():
    from normswap.specs import choose_groups

    for c in range(2, 300):
        g, _ = choose_groups(c, 32)
        assert c % g == 0 and c // g >= 2
        if c % 32 == 0 and c >= 64:
            assert g == 32


def test_plan_changes_nothing_and_prints_a_table():
    model = timm.create_model("resnet18", pretrained=False)
    types_before = [type(m) for m in model.modules()]
    plan = normswap.plan(model, "gn_ws")
    assert [type(m) for m in model.modules()] == types_before
    assert len(plan.replaced) == _bn_count(model)
    row = next(c for c in plan.changes if c.path == "layer1.0.bn1")
    assert row.old_type == "BatchNorm2d" and row.new_type == "GroupNorm"
    assert row.carried == ("weight", "bias") and row.convs_standardized == ("layer1.0.conv1",)
    text = str(plan)
    assert "layer1.0.bn1" in text and "GroupNorm" in text and "convs standardized" in text


def test_ws_all_convs_option():
    model = Block()
    model.extra = nn.Conv2d(48, 48, 1)
    plan = normswap.plan(model, "gn_ws", ws_convs="all")
    assert "extra" in plan.standardized_convs and "conv" in plan.standardized_convs
    assert "extra" not in normswap.plan(model, "gn_ws").standardized_convs


def test_include_exclude():
    model = Block()
    out = normswap.convert(model, "gn", exclude="bn2")
    assert isinstance(out.bn, nn.GroupNorm) and isinstance(out.bn2, nn.BatchNorm2d)
    with pytest.warns(UserWarning, match="matched no norm"), \
            pytest.warns(normswap.NothingToConvertWarning, match="nothing to convert"):
        unchanged = normswap.convert(model, "gn", include=["nothing.*"])
    assert isinstance(unchanged.bn, nn.BatchNorm2d) and isinstance(unchanged.bn2, nn.BatchNorm2d)


def test_errors():
    model = Block()
    with pytest.raises(normswap.UnknownSpecError, match="Did you mean 'gn_ws'"):
        normswap.convert(model, "gn_wss")
    with pytest.raises(normswap.OptionError, match="unknown option 'grups'.*Did you mean 'groups'"):
        normswap.convert(model, "gn", grups=8)
    with pytest.raises(normswap.OptionError, match="'groups'.*must be int"):
        normswap.convert(model, "gn", groups="eight")
    with pytest.raises(normswap.OptionError, match="ws_eps_mode"):
        normswap.convert(model, "gn_ws", ws_eps_mode="sideways")
    assert issubclass(normswap.UnknownSpecError, normswap.NormSwapError)
    assert issubclass(normswap.NormSwapError, ValueError)


def test_nothing_to_convert_warns_and_keeps_model():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.warns(normswap.NothingToConvertWarning):
        out = normswap.convert(model, "gn_ws")
    assert [type(m) for m in out.modules()] == [type(m) for m in model.modules()]


def test_register_custom_spec_and_convert():
    class ScaledGN(nn.GroupNorm):
        def forward(self, x):
            return 2 * super().forward(x)

    @normswap.register_spec("scaled_gn", sources=("batch",), description="GroupNorm times two")
    def scaled_gn(info, *, groups: int = 4):
        return ScaledGN(groups, info.num_features, eps=info.eps)

    try:
        assert "scaled_gn" in normswap.list_specs()
        out = normswap.convert(Block(), "scaled_gn", groups=6)
        assert isinstance(out.bn2, ScaledGN) and out.bn2.num_groups == 6
        assert isinstance(out.bn.act, nn.ReLU)
        with pytest.raises(normswap.RegistrationError):
            normswap.register_spec("scaled_gn", sources=("batch",), description="again")(scaled_gn)
    finally:
        normswap.unregister_spec("scaled_gn")


def test_frozen_batchnorm_converts():
    from timm.layers import FrozenBatchNormAct2d
    from torchvision.ops.misc import FrozenBatchNorm2d

    model = Block()
    model.bn2 = FrozenBatchNorm2d(48)
    model.bn = FrozenBatchNormAct2d(48, act_layer=nn.ReLU)
    with torch.no_grad():
        model.bn2.weight.uniform_(0.5, 1.5)
    out = normswap.convert(model, "gn_ws")
    assert isinstance(out.bn2, nn.GroupNorm) and out.conv2.__class__ is StdConv2d
    assert isinstance(out.bn2.weight, nn.Parameter) and torch.equal(out.bn2.weight, model.bn2.weight)
    assert isinstance(out.bn.act, nn.ReLU)
    rows = {c.path: c for c in normswap.last_plan(out).changes}
    assert rows["bn2"].action == "replace" and rows["bn"].action == "replace"
    with pytest.warns(normswap.NothingToConvertWarning):
        normswap.convert(nn.Sequential(FrozenBatchNorm2d(4)), "ghost_bn")


def test_unknown_subclass_overriding_forward_is_skipped_with_reason():
    class OddBN(nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x) * 3

    model = Block()
    model.bn2 = OddBN(48)
    plan = normswap.plan(model, "gn")
    row = next(c for c in plan.changes if c.path == "bn2")
    assert row.action == "skip" and "overrides forward" in row.reason


def test_functional_layer_norm_rewritten():
    class FuncLN(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.rand(16) + 0.5)
            self.bias = nn.Parameter(torch.randn(16))
            self.proj = nn.Linear(16, 16)

        def forward(self, x):
            return self.proj(torch.nn.functional.layer_norm(x, (16,), self.weight, self.bias, 1e-5))

    model = nn.Sequential(FuncLN())
    out = normswap.convert(model, "rms")
    plan = normswap.last_plan(out)
    assert [c.action for c in plan.changes] == ["rewrite"]
    x = torch.randn(3, 16)
    m = out[0]
    expected = m.proj(x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * m.weight + m.bias)
    torch.testing.assert_close(out(x), expected)
    assert type(out[0]).__name__ == "FuncLN" and set(out.state_dict()) == set(model.state_dict())


def test_functional_batch_norm_rewritten_to_group_norm():
    class FuncBN(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.weight = nn.Parameter(torch.rand(8) + 0.5)
            self.bias = nn.Parameter(torch.randn(8))
            self.register_buffer("mean", torch.zeros(8))
            self.register_buffer("var", torch.ones(8))

        def forward(self, x):
            x = self.conv(x)
            return torch.nn.functional.batch_norm(x, self.mean, self.var, self.weight, self.bias, self.training)

    model = nn.Sequential(FuncBN())
    out = normswap.convert(model, "gn", groups=4)
    x = torch.randn(2, 3, 6, 6)
    m = out[0]
    expected = torch.nn.functional.group_norm(m.conv(x), 4, m.weight, m.bias, 1e-5)
    torch.testing.assert_close(out(x), expected)
    plan = normswap.plan(model, "ghost_bn")
    assert plan.changes[0].action == "skip" and "no functional form" in plan.changes[0].reason


def test_tracing_runs_no_hook_and_leaves_nothing_in_the_model():
    """plan() changes nothing: user hooks never see a Proxy, and a forward that stores what it sees (timm's
    feature hooks keep outputs by device) stores it in a copy, so the model still deep-copies."""
    timm = pytest.importorskip("timm")
    seen = []
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Sequential(nn.BatchNorm2d(8), nn.ReLU()))
    model[1].register_forward_hook(lambda m, args, out: seen.append(type(out).__name__))
    model.register_forward_pre_hook(lambda m, args: seen.append("pre"))
    assert normswap.plan(model, "gn_ws").replaced[0].convs_standardized == ("0",)
    assert seen == []
    normswap.convert(model, "gn_ws", inplace=True)(torch.randn(1, 3, 8, 8))
    assert seen == ["pre", "Tensor"]  # the hooks are kept and run on real calls
    features = timm.create_model("resnet18", pretrained=False, features_only=True, feature_cls="hook")
    normswap.plan(features, "gn_ws")
    copy.deepcopy(features)
    converted = normswap.convert(features, "gn_ws")
    assert [t.shape[1] for t in converted(torch.randn(1, 3, 64, 64))] == [64, 64, 128, 256, 512]


def test_bert_ln_leaves_a_functional_norm_over_one_value_as_it_is():
    class OneValueNorms(nn.Module):
        def forward(self, x):
            return F.layer_norm(x[..., :1], (1,)), F.layer_norm(x[..., :1], x[..., :1].shape[-1:]), F.layer_norm(x, (4,))

    model = OneValueNorms()
    rows = normswap.plan(model, "bert_ln").changes
    assert [c.action for c in rows] == ["skip", "rewrite", "rewrite"] and "single value" in rows[0].reason
    x = torch.randn(3, 4)
    a, b, c = normswap.convert(model, "bert_ln")(x)
    expected = (x - x.mean(-1, keepdim=True)) / (x.std(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(a, F.layer_norm(x[..., :1], (1,)))  # the shape computed at run time: kept too
    torch.testing.assert_close(b, F.layer_norm(x[..., :1], (1,)))
    torch.testing.assert_close(c, expected)
    assert not normswap.plan(model, "gn_ws").changes  # F.layer_norm is no BatchNorm: no row for gn_ws


def test_a_parametrized_norm_weight_keeps_its_parametrization_and_key():
    from torch.nn.utils import parametrize

    class Positive(nn.Module):
        def forward(self, w):
            return w.abs() + 0.1

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
    parametrize.register_parametrization(model[1], "weight", Positive())
    converted = normswap.convert(model, "gn_ws", groups=2)
    row = normswap.last_plan(converted).replaced[0]
    assert "weight keeps its parametrization (Positive)" in row.warnings and "frozen buffer" not in str(row.warnings)
    assert "1.parametrizations.weight.original" in converted.state_dict()  # the key does not change
    torch.testing.assert_close(converted[1].weight, model[1].weight)
    converted(torch.randn(2, 3, 8, 8)).sum().backward()
    assert converted[1].parametrizations.weight.original.grad is not None


class _Gated(nn.Module):
    """A conv block with a squeeze-excite gate whose BatchNorm sees one position per channel (``pool`` makes
    the gate's input), and a pooled head with a BatchNorm after its conv."""

    def __init__(self, pool):
        super().__init__()
        self.pool = pool
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc1, self.gate_bn, self.fc2 = nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 8, 1)
        self.head_pool, self.head, self.head_bn = nn.AdaptiveAvgPool2d(1), nn.Conv2d(8, 6, 1), nn.BatchNorm2d(6)

    def forward(self, x):
        x = self.bn(self.conv(x)).relu()
        gate = self.fc2(F.silu(self.gate_bn(self.fc1(self.pool(x)))))
        x = x * gate.sigmoid()
        return self.head_bn(self.head(self.head_pool(x))).flatten(1)


_GLOBAL_POOLS = {
    "mean keepdim": lambda x: x.mean((2, 3), keepdim=True),
    "negative dims": lambda x: torch.mean(x, dim=[-1, -2], keepdim=True),
    "amax": lambda x: x.amax((3, 2), keepdim=True),
    "adaptive pool": lambda x: F.adaptive_avg_pool2d(x, 1),
    "adaptive max pool module": nn.AdaptiveMaxPool2d((1, 1)),
    "avg + max": lambda x: 0.5 * (F.adaptive_avg_pool2d(x, 1) + F.adaptive_max_pool2d(x, output_size=(1, 1))),
    "timm avgmax": "timm",
}


class _Pool(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


@pytest.mark.parametrize("pool", sorted(_GLOBAL_POOLS))
def test_in_leaves_batch_norms_after_a_global_pool_as_they_are(pool):
    """InstanceNorm over one position per channel has nothing to normalize (torch refuses it in every mode):
    ``in`` skips the BatchNorms whose input graph analysis shows to be a global pool's output, through 1x1
    convs, activations and norms, with the reason, and converts the others; the model still runs."""
    fn = _GLOBAL_POOLS[pool]
    if fn == "timm":
        fn = pytest.importorskip("timm").layers.SelectAdaptivePool2d(pool_type="avgmax")
    model = _Gated(fn if isinstance(fn, nn.Module) else _Pool(fn))
    plan = normswap.plan(model, "in")
    assert {c.path: c.action for c in plan.changes} == {"bn": "replace", "gate_bn": "skip", "head_bn": "skip"}
    assert all("global pool" in c.reason for c in plan.skipped)
    converted = normswap.convert(model, "in")
    assert isinstance(converted.bn, nn.InstanceNorm2d)
    x = torch.randn(2, 3, 8, 8)
    for mode in (True, False):
        assert converted.train(mode)(x).shape == (2, 6)
    # the other specs convert them all: GroupNorm / LayerNorm over channels work on one position
    for spec in ("gn", "ln"):
        assert len(normswap.plan(model, spec).replaced) == 3


def test_in_leaves_a_frozen_batch_norm_after_a_global_pool_as_it_is():
    """A norm class that is no torch BatchNorm (torchvision's / timm's FrozenBatchNorm2d) tells its spatial rank
    by its name."""
    from torchvision.ops import FrozenBatchNorm2d

    model = _Gated(_Pool(_GLOBAL_POOLS["mean keepdim"]))
    model.gate_bn = FrozenBatchNorm2d(4)
    assert [c.path for c in normswap.plan(model, "in").skipped] == ["gate_bn", "head_bn"]
    normswap.convert(model, "in")(torch.randn(2, 3, 8, 8))


def test_in_converts_batch_norms_after_pools_that_keep_positions():
    """A pool to more than one position, a reduction over one spatial dim, a pooled tensor added to an unpooled
    one: not a global pool's output as the graph shows it, so those BatchNorms convert."""
    for pool in (nn.AdaptiveAvgPool2d(2), _Pool(lambda x: x.mean(3, keepdim=True).expand(-1, -1, -1, 2)),
                 _Pool(lambda x: F.adaptive_avg_pool2d(x, (2, 1))), _Pool(lambda x: x.mean((2, 3), keepdim=True) + x)):
        model = _Gated(pool)
        model.head_pool = nn.AdaptiveAvgPool2d(2)
        assert len(normswap.plan(model, "in").replaced) == 3, pool


def test_in_refuses_a_functional_batch_norm_over_one_position_instead_of_returning_its_bias():
    """A functional ``F.batch_norm`` rewritten to InstanceNorm, given one value per channel ([N, C] or a pooled
    [N, C, 1, 1]), would return its bias whatever the input (GroupNorm(C, C) over one value): it raises, as
    torch's InstanceNorm modules do, and the message names the way out."""
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight, self.bias = nn.Parameter(torch.rand(4) + 0.5), nn.Parameter(torch.randn(4))

        def forward(self, x):
            return F.batch_norm(x, None, None, self.weight, self.bias, True)

    converted = normswap.convert(Functional(), "in")
    x = torch.randn(3, 4, 5, 5)
    expected = F.instance_norm(x, weight=converted.weight, bias=converted.bias)
    torch.testing.assert_close(converted(x), expected)
    for shape in ((3, 4), (3, 4, 1, 1)):
        with pytest.raises(ValueError, match="exclude"):
            converted(torch.randn(shape))


class _ExpertNorm(nn.Module):
    """A norm of two inputs (Ergo's per-expert RMSNorm: the expert ids pick the weight rows): no adapter reads
    it, and its functional call sits at the root of its own traced region."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(3, 8) + 0.5)

    def forward(self, x, ids):
        return F.rms_norm(x, (x.shape[-1],), eps=1e-6) * self.weight[ids]


class _Experts(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj, self.norm = nn.Linear(8, 8), _ExpertNorm()

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: this module does not trace, its children do
            x = x * 2
        return self.norm(self.proj(x), torch.zeros(x.shape[0], dtype=torch.long))


def test_a_functional_norm_at_the_root_of_a_traced_child_is_rewritten_at_that_child():
    """The call's row names the child's path (it was 'experts.norm.', a path no module has, and convert
    raised AttributeError), and the rewritten child computes the spec's formula."""
    model = nn.Sequential(nn.Identity(), _Experts())
    rows = [(c.path, c.action) for c in normswap.plan(model, "ln").changes]
    assert rows == [("1.norm", "rewrite")]
    converted = normswap.convert(model, "ln")
    x = torch.randn(4, 8)
    h = model[1].proj(x) * (2 if x.sum() > 0 else 1)
    expected = F.layer_norm(h, (8,), eps=1e-6) * model[1].norm.weight[0]
    torch.testing.assert_close(converted(x), expected)
    # the norm as the whole model: its call is at the root
    assert [(c.path, c.action) for c in normswap.plan(_ExpertNorm(), "ln").changes] == [("<root>", "rewrite")]
