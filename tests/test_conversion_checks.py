"""The zoo checks of ``conversion_checks.py`` fail on planted defects (a check that cannot fail checks
nothing)."""

import pytest
import torch
from torch import nn

import normswap
from conversion_checks import formula_errors, unplanned_norms, unstandardized_feeds


def _run(model, inputs):
    return model(*inputs.values())


class MyFrozenBatchNorm2d(nn.Module):
    def __init__(self, n):
        super().__init__()
        for name in ("weight", "bias", "running_mean", "running_var"):
            self.register_buffer(name, torch.rand(n) + 0.5)

    def forward(self, x):
        scale = self.weight.reshape(1, -1, 1, 1) * (self.running_var.reshape(1, -1, 1, 1) + 1e-5).rsqrt()
        return x * scale + (self.bias - self.running_mean * self.weight *
                            (self.running_var + 1e-5).rsqrt()).reshape(1, -1, 1, 1)


def test_an_unread_norm_is_reported(monkeypatch):
    from normswap.adapters import base

    model = nn.Sequential(nn.Conv2d(3, 8, 3), MyFrozenBatchNorm2d(8))
    assert not unplanned_norms(model, normswap.plan(model, "gn_ws"), "gn_ws")
    monkeypatch.setattr(base, "_probe", lambda module, reason: (None, reason))
    assert unplanned_norms(model, normswap.plan(model, "gn_ws"), "gn_ws") == ["1 (MyFrozenBatchNorm2d: not read)"]


@pytest.fixture
def planted_specs():
    class Doubled(nn.GroupNorm):
        def forward(self, x):
            return 2 * super().forward(x)

    @normswap.register_spec("test_doubled_gn", sources=("batch",), description="a GroupNorm that doubles")
    def doubled(info):
        return Doubled(2, info.num_features, eps=info.eps)

    @normswap.register_spec("test_gn_no_ws", sources=("batch",), description="GroupNorm without standardizing")
    def no_ws(info):
        return nn.GroupNorm(2, info.num_features, eps=info.eps)

    yield
    normswap.unregister_spec("test_doubled_gn")
    normswap.unregister_spec("test_gn_no_ws")


def test_a_module_off_its_formula_and_an_unstandardized_feed_are_reported(planted_specs):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
    inputs = {"x": torch.randn(2, 3, 8, 8)}
    good = normswap.convert(model, "gn_ws", groups=2)
    assert not formula_errors(good, normswap.last_plan(good), inputs, _run)
    assert not unstandardized_feeds(good, normswap.last_plan(good), inputs, _run)
    bad = normswap.convert(model, "test_doubled_gn")
    assert formula_errors(bad, normswap.last_plan(bad), inputs, _run)[0].startswith("1 (Doubled)")
    bare = normswap.convert(model, "test_gn_no_ws")
    assert unstandardized_feeds(bare, normswap.last_plan(bare), inputs, _run) == [
        "0 feeds 1 but is neither standardized nor named in its row"]
