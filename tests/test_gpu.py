"""The same conversions on CUDA (skipped where CUDA is absent)."""

import pytest
import torch
from torch import nn

import normswap

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("spec", ["gn_ws", "gn", "ghost_bn", "ln", "in"])
def test_batchnorm_specs_on_cuda(spec):
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet18", pretrained=False).cuda()
    out = normswap.convert(model, spec)
    assert all(p.is_cuda for p in out.parameters()) and all(b.is_cuda for b in out.buffers())
    x = torch.randn(4, 3, 64, 64, device="cuda")
    y = out(x)
    y.square().mean().backward()
    assert torch.isfinite(y).all()
    assert all(torch.isfinite(p.grad).all() for p in out.parameters() if p.grad is not None)
    out.eval()
    with torch.no_grad():
        cpu = normswap.convert(model.cpu(), spec).eval()(x.cpu())
        torch.testing.assert_close(out.cuda()(x).cpu(), cpu, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("spec", ["rms", "bert_ln"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layernorm_specs_on_cuda(spec, dtype):
    model = nn.Sequential(nn.Linear(64, 64), nn.LayerNorm(64), nn.Linear(64, 8)).cuda().to(dtype)
    out = normswap.convert(model, spec)
    x = torch.randn(16, 64, device="cuda", dtype=dtype, requires_grad=True)
    y = out(x)
    y.float().square().mean().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
