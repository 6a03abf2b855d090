"""Every source family is read through the one adapter interface and converts."""

import pytest
import torch
from torch import nn

import normswap
from normswap.adapters import read_norm
from normswap.norms.std_conv import StdConv1d, StdConv3d


def test_batchnorm_1d_3d_and_sync_convert_with_their_convs():
    model = nn.Sequential(nn.Conv1d(3, 16, 3), nn.BatchNorm1d(16), nn.Conv3d(16, 16, 1), nn.BatchNorm3d(16),
                          nn.Conv3d(16, 16, 3), nn.SyncBatchNorm(16))
    plan = normswap.plan(model, "gn_ws")
    assert [c.action for c in plan.changes] == ["replace"] * 3
    out = normswap.convert(model, "gn_ws")
    assert isinstance(out[0], StdConv1d) and isinstance(out[2], StdConv3d)
    assert all(isinstance(out[i], nn.GroupNorm) for i in (1, 3, 5))


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it, so convs are related by module order."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3)
        self.bn = nn.BatchNorm2d(16)

    def forward(self, x):
        if x.sum() > 0:
            x = -x
        return self.bn(self.conv(x))


def test_untraceable_module_falls_back_to_module_order():
    model = nn.Sequential(Untraceable())
    plan = normswap.plan(model, "gn_ws")
    row = plan.changes[0]
    assert row.convs_standardized == ("0.conv",)
    assert any("module order" in w for w in row.warnings)
    assert any("do not trace" in w for w in plan.warnings)


def test_timm_layernorm_family_keeps_layout_and_act():
    from timm.layers import LayerNorm2d, LayerNormAct2d

    from normswap.norms.rms_norm import RMSNorm2d

    model = nn.Sequential(LayerNorm2d(8), LayerNormAct2d(8, act_layer=nn.ReLU))
    info, _ = read_norm(model[0])
    assert info.kind == "layer" and info.channels_first
    out = normswap.convert(model, "rms")
    assert isinstance(out[0], RMSNorm2d) and isinstance(out[1].act, nn.ReLU)
    x = torch.randn(2, 8, 3, 3)
    y = out(x)
    assert (y >= 0).all()
    z = out[0](x)
    ref = x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + model[0].eps) * out[0].weight.view(1, -1, 1, 1)
    torch.testing.assert_close(z, ref + out[0].bias.view(1, -1, 1, 1))


def test_hf_norm_classes_are_read():
    transformers = pytest.importorskip("transformers")
    from transformers.models.convnext.modeling_convnext import ConvNextLayerNorm
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    assert transformers  # imported for the classes above
    cf, _ = read_norm(ConvNextLayerNorm(8, data_format="channels_first"))
    cl, _ = read_norm(ConvNextLayerNorm(8, data_format="channels_last"))
    assert (cf.kind, cf.channels_first, cl.channels_first) == ("layer", True, False)
    for cls in (LlamaRMSNorm, T5LayerNorm):
        info, _ = read_norm(cls(8, eps=1e-5))
        assert info.kind == "rms" and info.eps == 1e-5 and info.weight_offset == 0.0
    gemma = GemmaRMSNorm(8, eps=1e-6)
    with torch.no_grad():
        gemma.weight.uniform_(-0.5, 0.5)
    info, _ = read_norm(gemma)
    assert info.kind == "rms" and info.weight_offset == 1.0
    out = normswap.convert(nn.Sequential(gemma), "ln")
    torch.testing.assert_close(out[0].weight, gemma.weight + 1)


def test_torch_rmsnorm_eps_none_becomes_explicit():
    info, _ = read_norm(nn.RMSNorm(8))
    assert info.eps == torch.finfo(torch.float32).eps
    out = normswap.convert(nn.Sequential(nn.RMSNorm(8)), "ln")
    assert out[0].eps == torch.finfo(torch.float32).eps


def test_rms_eps_carried_and_bert_eps_default():
    model = nn.Sequential(nn.LayerNorm(8, eps=1e-12))
    assert normswap.convert(model, "rms")[0].eps == 1e-12
    assert normswap.convert(model, "bert_ln")[0].eps == 1e-6
    assert normswap.convert(model, "bert_ln", eps=1e-5)[0].eps == 1e-5
