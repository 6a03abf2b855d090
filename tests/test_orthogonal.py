"""OrthogonalRegularizer: penalties against their definitions, loss term vs closed-form gradient, selection."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from normswap.errors import OptionError
from normswap.regularizers import OrthogonalRegularizer


class Mixed(nn.Module):
    """Wide and tall linears, a grouped conv, a depthwise conv, repeated shapes (buckets) and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.expand = nn.Conv2d(8, 32, 1)  # tall: 32 x 8
        self.twin_a = nn.Linear(32, 12)
        self.twin_b = nn.Linear(32, 12)  # same shape as twin_a: one bucket
        self.norm = nn.BatchNorm1d(12)
        self.emb = nn.Embedding(10, 32)
        self.fc = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.expand(self.depthwise(self.grouped(self.stem(x)))).mean((2, 3))
        return self.fc(self.norm(self.twin_a(h) + self.twin_b(h)))


def model() -> Mixed:
    torch.manual_seed(0)
    return Mixed()


def reference_penalty(weights, form: str) -> torch.Tensor:
    """The penalty by its definition, matrix by matrix on the rows side, in float64 with autograd."""
    total = torch.zeros((), dtype=torch.float64)
    for w in weights:
        for m in w:
            g = m @ m.T
            eye = torch.eye(g.shape[0], dtype=g.dtype)
            total = total + (((g * (1 - eye)) if form == "offdiag" else (g - eye)) ** 2).sum()
    return total


@pytest.mark.parametrize("form", ["offdiag", "full"])
def test_penalty_and_gradient_match_the_definition(form):
    net = model()
    reg = OrthogonalRegularizer(net, strength=0.3, form=form)
    leaves = [e.param.detach().double().requires_grad_() for e in reg.weights]
    mats = [e.matrices(t) for e, t in zip(reg.weights, leaves)]
    want = 0.3 * reference_penalty(mats, form)
    want_grads = torch.autograd.grad(want, leaves)

    value = reg()
    value.backward()
    torch.testing.assert_close(value.double(), want, rtol=1e-5, atol=1e-6)
    for e, g in zip(reg.weights, want_grads):
        torch.testing.assert_close(e.param.grad.double(), g, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("form", ["offdiag", "full", "srip"])
def test_loss_term_and_closed_form_give_the_same_gradients(form):
    a, b = model(), model()
    reg_a = OrthogonalRegularizer(a, strength=0.5, form=form, seed=3)
    reg_b = OrthogonalRegularizer(b, strength=0.5, form=form, seed=3)
    x = torch.randn(4, 3, 6, 6)
    (a(x).sum() + reg_a()).backward()
    b(x).sum().backward()
    value = reg_b.apply_()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-5, atol=1e-6, msg=name)
    assert value is not None and torch.isfinite(value)


def test_srip_penalty_converges_to_the_squared_spectral_norm():
    net = model()
    reg = OrthogonalRegularizer(net, strength=1.0, form="srip", power_iterations=200)
    want = 0.0
    for e in reg.weights:
        for m in e.matrices().detach().double():
            s = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
            want += torch.linalg.matrix_norm(s - torch.eye(s.shape[0], dtype=s.dtype), ord=2).item() ** 2
    assert reg().item() == pytest.approx(want, rel=1e-4)


def test_default_selection_is_conv_and_linear_weights_without_the_head():
    reg = OrthogonalRegularizer(model())
    assert [e.path for e in reg.weights] == ["stem", "grouped", "depthwise", "expand", "twin_a", "twin_b"]
    groups = {e.path: (e.groups, e.rows, e.cols) for e in reg.weights}
    assert groups["grouped"] == (2, 4, 4 * 9) and groups["depthwise"] == (8, 1, 9) and groups["expand"] == (1, 32, 8)
    # the two linears of one shape share a bucket: one batched product for both
    assert any(len(b.entries) == 2 for b in reg.buckets)


def test_timm_and_hf_heads_are_left_out():
    timm = pytest.importorskip("timm")
    transformers = pytest.importorskip("transformers")
    resnet = timm.create_model("resnet18", pretrained=False, num_classes=10)
    paths = [e.path for e in OrthogonalRegularizer(resnet).weights]
    assert "fc" not in paths and "conv1" in paths and not any("bn" in p for p in paths)
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, num_labels=3)
    bert = transformers.BertForSequenceClassification(config)
    paths = [e.path for e in OrthogonalRegularizer(bert).weights]
    assert "classifier" not in paths and "bert.pooler.dense" in paths
    assert not any("embeddings" in p or "LayerNorm" in p for p in paths)


def test_depthwise_filters_are_not_compared_with_each_other():
    net = model()
    reg = OrthogonalRegularizer(net, form="offdiag", include="depthwise")
    assert reg().item() == 0.0  # one filter per group: no off-diagonal pair


def test_include_exclude_and_globs_that_match_nothing():
    net = model()
    reg = OrthogonalRegularizer(net, include=["twin_*", "fc"], exclude="twin_b")
    assert [e.path for e in reg.weights] == ["twin_a", "fc"]  # an include naming the head takes it
    with pytest.warns(UserWarning, match="'nothing.*' matches no conv or linear"):
        OrthogonalRegularizer(net, exclude="nothing.*")
    with pytest.raises(OptionError, match="no conv or linear weight"), pytest.warns(UserWarning):
        OrthogonalRegularizer(net, include="nothing.*")


def test_bad_arguments():
    net = model()
    with pytest.raises(OptionError, match="strength must be a finite number >= 0"):
        OrthogonalRegularizer(net, strength=-1.0)
    with pytest.raises(OptionError, match="Did you mean 'offdiag'"):
        OrthogonalRegularizer(net, form="ofdiag")
    with pytest.raises(OptionError, match="every must be an int >= 1"):
        OrthogonalRegularizer(net, every=0)
    with pytest.raises(OptionError, match="schedule steps"):
        OrthogonalRegularizer(net, strength={-1: 0.1})
    reg = OrthogonalRegularizer(net, strength=lambda step: -0.5)
    with pytest.raises(OptionError, match=r"strength\(0\)"):
        reg()
    with pytest.raises(OptionError, match="another model"):
        reg(model())


def test_every_k_steps_and_schedules():
    net = model()
    reg = OrthogonalRegularizer(net, strength={0: 1.0, 2: 0.25}, every=2)
    grads = []
    for step in range(4):
        net.zero_grad(set_to_none=True)
        value = reg.apply_()
        assert (value is None) == (step % 2 == 1)
        grads.append(None if net.stem.weight.grad is None else net.stem.weight.grad.clone())
    assert grads[1] is None and grads[3] is None
    torch.testing.assert_close(grads[2], grads[0] * 0.25)  # same weights, strength 1.0 then 0.25
    assert reg.step == 4 and reg.strength_at(1) == 1.0 and reg.strength_at(5) == 0.25
    assert reg().item() > 0.0  # step 4: active
    assert reg().item() == 0.0 and reg.step == 6  # step 5: skipped, the loss term adds zero


def test_half_precision_weights():
    net = model()
    ref = OrthogonalRegularizer(copy.deepcopy(net))
    ref.apply_()
    half = net.to(torch.bfloat16)
    value = OrthogonalRegularizer(half).apply_()
    assert torch.isfinite(value)
    for e_ref, p in zip(ref.weights, [half.stem.weight, half.grouped.weight]):
        assert p.grad.dtype == torch.bfloat16
        torch.testing.assert_close(p.grad.float(), e_ref.param.grad, rtol=0.05, atol=1e-3)


def test_state_dict_resumes_srip_exactly():
    a = OrthogonalRegularizer(model(), form="srip", seed=1)
    for _ in range(3):
        a.apply_()
    b = OrthogonalRegularizer(model(), form="srip", seed=99)
    b.load_state_dict(a.state_dict())
    assert b.step == 3
    torch.testing.assert_close(a(), b())
    with pytest.raises(OptionError, match="do not fit"):
        OrthogonalRegularizer(model(), form="srip", include="stem").load_state_dict(a.state_dict())
