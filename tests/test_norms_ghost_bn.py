"""GhostBatchNorm1d/2d/3d (Hoffer et al., 2017) against per-chunk F.batch_norm and a whole-batch nn.BatchNorm."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normswap.norms.ghost_batch_norm import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d

from norm_helpers import randomize

pytestmark = pytest.mark.usefixtures("one_thread", "native_path")


def per_chunk_reference(x, sizes, weight, bias, eps):
    """Each virtual batch normalized with its own statistics, by F.batch_norm."""
    return torch.cat([F.batch_norm(c, None, None, weight, bias, True, 0.0, eps) for c in x.split(sizes)])


def _twin(ghost: nn.Module, cls=nn.BatchNorm2d) -> nn.Module:
    """A plain BatchNorm with the same arguments and state as ``ghost``."""
    bn = cls(ghost.num_features, eps=ghost.eps, momentum=ghost.momentum, affine=ghost.affine,
             track_running_stats=ghost.track_running_stats)
    bn.load_state_dict(ghost.state_dict())
    return bn


@pytest.mark.parametrize("batch,vbs,sizes", [(12, 4, [4, 4, 4]), (10, 4, [4, 4, 2]), (7, 3, [3, 3, 1])])
def test_training_output_is_per_chunk_batch_norm(batch, vbs, sizes):
    g = randomize(GhostBatchNorm2d(5, virtual_batch_size=vbs))
    x = torch.randn(batch, 5, 3, 4) * 2 + 1
    y = g(x)
    torch.testing.assert_close(y, per_chunk_reference(x, sizes, g.weight, g.bias, g.eps))
    # Each chunk is normalized to per-channel mean = bias and (biased) std = weight.
    for chunk in y.split(sizes):
        torch.testing.assert_close(chunk.mean((0, 2, 3)), g.bias.detach(), atol=1e-4, rtol=1e-4)
        std = chunk.var((0, 2, 3), unbiased=False).sqrt()
        torch.testing.assert_close(std, g.weight.detach().abs(), atol=1e-3, rtol=1e-3)


def test_backward_matches_per_chunk_reference():
    g = randomize(GhostBatchNorm2d(4, virtual_batch_size=3))
    x = torch.randn(8, 4, 3, 3, requires_grad=True)
    gy = torch.randn(8, 4, 3, 3)
    params = (x, g.weight, g.bias)
    got = torch.autograd.grad(g(x), params, gy)
    want = torch.autograd.grad(per_chunk_reference(x, [3, 3, 2], g.weight, g.bias, g.eps), params, gy)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("momentum", [0.1, 0.5, None])
def test_running_stats_equal_whole_batch_batch_norm(momentum):
    g = randomize(GhostBatchNorm2d(6, momentum=momentum, virtual_batch_size=4))
    bn = _twin(g)
    for step in range(4):
        x = torch.randn(10, 6, 3, 3) * (step + 1) + step
        g(x)
        bn(x)
        torch.testing.assert_close(g.running_mean, bn.running_mean)
        torch.testing.assert_close(g.running_var, bn.running_var)
        assert int(g.num_batches_tracked) == int(bn.num_batches_tracked) == step + 1
    assert list(g.state_dict()) == list(bn.state_dict())


def test_running_stats_with_a_merged_single_sample_chunk():
    # [N, C] input, batch 9 with virtual batches of 4: the last sample alone would have 1 value per channel.
    g = GhostBatchNorm1d(3, virtual_batch_size=4)
    bn = _twin(g, nn.BatchNorm1d)
    x = torch.randn(9, 3)
    y = g(x)
    bn(x)
    torch.testing.assert_close(y, per_chunk_reference(x, [4, 5], g.weight, g.bias, g.eps))
    torch.testing.assert_close(g.running_mean, bn.running_mean)
    torch.testing.assert_close(g.running_var, bn.running_var)


def test_virtual_batch_of_one_sample_without_spatial_dims_uses_pairs():
    g = GhostBatchNorm1d(3, virtual_batch_size=1)
    bn = _twin(g, nn.BatchNorm1d)
    x = torch.randn(5, 3)
    torch.testing.assert_close(g(x), per_chunk_reference(x, [2, 3], g.weight, g.bias, g.eps))
    bn(x)
    torch.testing.assert_close(g.running_var, bn.running_var)
    # With spatial dims one sample already holds several values per channel.
    g2 = GhostBatchNorm2d(3, virtual_batch_size=1)
    x2 = torch.randn(3, 3, 2, 2)
    torch.testing.assert_close(g2(x2), per_chunk_reference(x2, [1, 1, 1], g2.weight, g2.bias, g2.eps))


def test_eval_is_plain_batch_norm():
    g = randomize(GhostBatchNorm2d(6, virtual_batch_size=2))
    for _ in range(3):
        g(torch.randn(8, 6, 4, 4) * 3 + 1)
    bn = _twin(g)
    g.eval()
    bn.eval()
    x = torch.randn(5, 6, 4, 4)
    torch.testing.assert_close(g(x), bn(x))


def test_batch_within_one_virtual_batch_is_plain_batch_norm():
    g = randomize(GhostBatchNorm2d(3, virtual_batch_size=32))
    bn = _twin(g)
    x = torch.randn(6, 3, 2, 2)
    torch.testing.assert_close(g(x), bn(x))
    torch.testing.assert_close(g.running_var, bn.running_var)


def test_one_value_per_channel_raises_like_batch_norm():
    x = torch.randn(1, 4)
    with pytest.raises(ValueError) as want:
        nn.BatchNorm1d(4)(x)
    with pytest.raises(ValueError) as got:
        GhostBatchNorm1d(4, virtual_batch_size=1)(x)
    assert str(got.value) == str(want.value)
    with pytest.raises(ValueError):
        GhostBatchNorm2d(4)(torch.randn(1, 4, 1, 1))


def test_gradcheck_training_forward_float64():
    g = randomize(GhostBatchNorm2d(3, virtual_batch_size=2, track_running_stats=False).double())
    x = torch.randn(5, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: g(x), (x, g.weight, g.bias))


def test_gradcheck_without_affine_float64():
    g = GhostBatchNorm1d(3, virtual_batch_size=3, affine=False).double()
    x = torch.randn(7, 3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(g, (x,))


def test_gradient_for_parameters_only():
    g = randomize(GhostBatchNorm2d(3, virtual_batch_size=2))
    x = torch.randn(5, 3, 2, 2)  # no grad for the input
    y = g(x)
    y.square().sum().backward()
    ref = randomize(GhostBatchNorm2d(3))
    ref.load_state_dict(g.state_dict())
    w = ref.weight.detach().requires_grad_()
    b = ref.bias.detach().requires_grad_()
    per_chunk_reference(x, [2, 2, 1], w, b, g.eps).square().sum().backward()
    torch.testing.assert_close(g.weight.grad, w.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(g.bias.grad, b.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kwargs", [{"affine": False}, {"track_running_stats": False}])
def test_variants_match_batch_norm_semantics(kwargs):
    g = randomize(GhostBatchNorm2d(3, virtual_batch_size=2, **kwargs))
    bn = _twin(g)
    assert list(g.state_dict()) == list(bn.state_dict())
    x = torch.randn(6, 3, 2, 2)
    torch.testing.assert_close(g(x), per_chunk_reference(x, [2, 2, 2], g.weight, g.bias, g.eps))
    bn(x)
    if g.track_running_stats:
        torch.testing.assert_close(g.running_var, bn.running_var)
    g.eval()
    bn.eval()
    # Without running stats, eval mode keeps using batch statistics (per virtual batch), as BatchNorm does.
    want = bn(x) if g.track_running_stats else per_chunk_reference(x, [2, 2, 2], g.weight, g.bias, g.eps)
    torch.testing.assert_close(g(x), want)


def test_1d_and_3d():
    g1 = randomize(GhostBatchNorm1d(4, virtual_batch_size=3))
    x1 = torch.randn(7, 4, 5)
    torch.testing.assert_close(g1(x1), per_chunk_reference(x1, [3, 3, 1], g1.weight, g1.bias, g1.eps))
    g3 = randomize(GhostBatchNorm3d(2, virtual_batch_size=2))
    x3 = torch.randn(5, 2, 2, 3, 2)
    torch.testing.assert_close(g3(x3), per_chunk_reference(x3, [2, 2, 1], g3.weight, g3.bias, g3.eps))
    with pytest.raises(ValueError):
        g3(torch.randn(4, 2, 3, 3))


def test_channels_last_and_bfloat16():
    g = randomize(GhostBatchNorm2d(3, virtual_batch_size=2))
    x = torch.randn(5, 3, 4, 4).to(memory_format=torch.channels_last).requires_grad_()
    y = g(x)
    torch.testing.assert_close(y, per_chunk_reference(x, [2, 2, 1], g.weight, g.bias, g.eps))
    y.square().sum().backward()
    assert torch.isfinite(x.grad).all()
    xb = torch.randn(5, 3, 4, 4, dtype=torch.bfloat16, requires_grad=True)
    yb = g(xb)
    assert yb.dtype == torch.bfloat16 and torch.isfinite(yb).all()
    yb.float().square().sum().backward()
    assert torch.isfinite(xb.grad).all() and torch.isfinite(g.weight.grad).all()


def test_constructor_validation_and_repr():
    for bad in (0, -3, 2.5, True, "8"):
        with pytest.raises(ValueError, match="virtual_batch_size"):
            GhostBatchNorm2d(4, virtual_batch_size=bad)
    g = GhostBatchNorm2d(4, virtual_batch_size=8)
    assert g.virtual_batch_size == 8
    assert isinstance(g, nn.BatchNorm2d)
    assert repr(g).endswith("virtual_batch_size=8)")
    assert repr(g).startswith("GhostBatchNorm2d(4, eps=1e-05, momentum=0.1")
    assert GhostBatchNorm1d(4).virtual_batch_size == 32


def test_deepcopy_and_state_dict_round_trip():
    g = randomize(GhostBatchNorm2d(3, virtual_batch_size=2))
    g(torch.randn(6, 3, 2, 2))
    h = copy.deepcopy(g)
    bn = nn.BatchNorm2d(3)
    bn.load_state_dict(h.state_dict())
    torch.testing.assert_close(bn.running_mean, g.running_mean)


def test_torch_compile_eager_backend():
    g = randomize(GhostBatchNorm2d(3, virtual_batch_size=2))
    ref = copy.deepcopy(g)
    x = torch.randn(5, 3, 2, 2, requires_grad=True)
    y = torch.compile(g, backend="eager", fullgraph=True)(x)
    torch.testing.assert_close(y, ref(x))
    torch.testing.assert_close(g.running_var, ref.running_var)
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
