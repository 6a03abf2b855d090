"""Random architectures for the property-based tests: nested containers, shared and tied modules, odd
channel counts, affine and running-statistics variants, convs of every kind feeding norms, functional
norm calls, in-place activations, hooks and parametrizations, drawn by hypothesis."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrize


class FunctionalNorms(nn.Module):
    """A block whose own forward calls functional norms (layer norm over channels, batch norm, group norm)."""

    def __init__(self, channels: int, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.weight = nn.Parameter(torch.rand(channels) + 0.5)
        self.bias = nn.Parameter(torch.randn(channels) * 0.1)
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "layer":
            return F.layer_norm(x.movedim(1, -1), (x.shape[1],), self.weight, self.bias).movedim(-1, 1)
        if self.kind == "batch":
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training)
        return F.group_norm(x, 1, self.weight, self.bias)


class Residual(nn.Module):
    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return x + y if y.shape == x.shape else y


class Head(nn.Module):
    """Pool, then linears and a LayerNorm (and maybe an RMSNorm) over features."""

    def __init__(self, channels: int, classes: int, rms: bool, tie: bool) -> None:
        super().__init__()
        self.fc1 = nn.Linear(channels, channels)
        self.ln = nn.LayerNorm(channels)
        self.rms = nn.RMSNorm(channels) if rms else nn.Identity()
        self.fc2 = nn.Linear(channels, channels)
        if tie:
            self.fc2.weight = self.fc1.weight  # tied weights
        self.out = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.mean((2, 3))
        h = self.rms(self.ln(self.fc1(h)))
        return self.out(torch.relu(self.fc2(h)))


class Positive(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w.abs() + 0.05


def _norm(kind: str, c: int, draw) -> nn.Module:
    if kind == "bn":
        affine, stats = draw(st.booleans()), draw(st.booleans())
        return nn.BatchNorm2d(c, affine=affine, track_running_stats=stats, eps=draw(st.sampled_from([1e-5, 1e-3])))
    if kind == "gn":
        return nn.GroupNorm(1, c)
    if kind == "in":
        return nn.InstanceNorm2d(c, affine=draw(st.booleans()))
    if kind == "frozen":
        from torchvision.ops.misc import FrozenBatchNorm2d

        return FrozenBatchNorm2d(c)
    if kind == "bnact":
        from timm.layers import BatchNormAct2d

        return BatchNormAct2d(c, act_layer=nn.ReLU)
    if kind == "ln2d":
        from timm.layers import LayerNorm2d

        return LayerNorm2d(c)
    return FunctionalNorms(c, draw(st.sampled_from(["layer", "batch", "group"])))


def _conv(c_in: int, c_out: int, draw) -> nn.Module:
    kind = draw(st.sampled_from(["plain", "depthwise", "grouped", "pointwise", "padded", "reflect"]))
    if kind == "depthwise":
        return nn.Conv2d(c_in, c_in, 3, padding=1, groups=c_in, bias=draw(st.booleans()))
    if kind == "grouped" and c_in % 2 == 0 and c_out % 2 == 0:
        return nn.Conv2d(c_in, c_out, 3, padding=1, groups=2)
    if kind == "pointwise":
        return nn.Conv2d(c_in, c_out, 1, bias=False)
    if kind == "padded":
        return nn.Sequential(nn.ZeroPad2d((1, 0, 1, 0)), nn.Conv2d(c_in, c_out, 2))
    if kind == "reflect":
        return nn.Conv2d(c_in, c_out, 3, padding=1, padding_mode="reflect")
    return nn.Conv2d(c_in, c_out, 3, padding=1)


@st.composite
def architectures(draw) -> tuple[nn.Module, torch.Tensor]:
    """A random model and an input batch of 4 for it."""
    torch.manual_seed(draw(st.integers(0, 2**16)))
    channels = draw(st.integers(2, 12))
    c = channels
    blocks: list[nn.Module] = [nn.Conv2d(3, c, 3, padding=1)]
    shared = None
    for _ in range(draw(st.integers(1, 4))):
        c_out = draw(st.integers(2, 12))
        conv = _conv(c, c_out, draw)
        c_new = (conv[-1] if isinstance(conv, nn.Sequential) else conv).out_channels  # depthwise keeps c
        norm = _norm(draw(st.sampled_from(["bn", "bn", "gn", "in", "frozen", "bnact", "ln2d", "functional"])),
                     c_new, draw)
        act = draw(st.sampled_from([nn.ReLU(inplace=True), nn.GELU(), nn.Identity()]))
        body: nn.Module = nn.Sequential(conv, norm, act)
        if draw(st.booleans()):
            body = Residual(body)
        if draw(st.booleans()) and hasattr(norm, "weight") and isinstance(norm.weight, nn.Parameter):
            parametrize.register_parametrization(norm, "weight", Positive())
        if draw(st.booleans()):
            body.register_forward_hook(lambda m, args, out: None)
        blocks.append(body)
        c = c_new
        if shared is None and draw(st.booleans()) and isinstance(conv, nn.Conv2d) and conv.in_channels == c_new \
                and conv.out_channels == c_new:
            shared = (body, c_new)
    if shared is not None and shared[1] == c:
        blocks.append(shared[0])  # the same module at two paths
    blocks.append(Head(c, draw(st.integers(2, 5)), rms=draw(st.booleans()), tie=draw(st.booleans())))
    model = nn.Sequential(*blocks)
    side = draw(st.sampled_from([5, 6, 8]))
    return model, torch.randn(4, 3, side, side)
