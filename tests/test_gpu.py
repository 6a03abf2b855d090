"""normswap on CUDA (every test skips where CUDA is absent; ``benchmarks/gpu_check.sh`` runs them; a dry run
on CPU tensors is described at ``DEVICE`` below).

Each converted model is compared with the same model on the CPU, on the same weights, in eval mode (a
train-mode forward changes running statistics); each swapped-in layer is compared with its formula in
float64, forward and backward, in float32, bfloat16 and float16; each normswap operator passes
``torch.library.opcheck`` on CUDA tensors. Tolerances come from the dtype's rounding: a few units of
its epsilon relative to the output's scale, times the depth of the computation where there is one.
"""

import copy
import importlib
import os

import pytest
import torch
from torch import nn

import normswap
from normswap.norms.bert_layer_norm import BertLayerNorm, BertLayerNorm2d
from normswap.norms.channel_layer_norm import ChannelLayerNorm
from normswap.norms.ghost_batch_norm import GhostBatchNorm2d
from normswap.norms.group_norm import GroupNorm
from normswap.norms.rms_norm import RMSNorm, RMSNorm2d
from normswap.norms.std_conv import standardize_conv

# NORMSWAP_GPU_TESTS_ON=cpu with TRITON_INTERPRET=1 NORMSWAP_TRITON=1: a dry run of this file on CPU tensors
# (the Triton kernels in the interpreter), so that a test's own mistakes show before a GPU runs it
# (tests/test_triton.py runs it so under the long marker); CUDA-only tests skip there
DEVICE = os.environ.get("NORMSWAP_GPU_TESTS_ON", "cuda")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs CUDA")]
cuda_only = pytest.mark.skipif(DEVICE != "cuda", reason="CUDA itself (autocast / inductor on CUDA)")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def _exact_float32():
    """TF32 off: float32 matmuls and convs on CUDA round like the CPU's."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _eps(dtype):
    return torch.finfo(dtype).eps


def _rows_reference(kind, x, w, b, eps, dims):
    """The formula of each row norm over ``dims``, in the dtype of its arguments."""
    if kind == "rms":
        y = x * torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + eps)
    elif kind == "bert":
        std, mean = torch.std_mean(x, dims, correction=1, keepdim=True)
        y = (x - mean) / (std + eps)
    else:
        var, mean = torch.var_mean(x, dims, correction=0, keepdim=True)
        y = (x - mean) * torch.rsqrt(var + eps)
    return y * w + (b if b is not None else 0)


def _reference_and_grads(kind, layer, x, gy, channels_first, dtype):
    """``(y, grads of x, weight, bias)`` of the formula on ``x``'s values computed in ``dtype``."""
    xr = x.detach().to(dtype).requires_grad_(True)
    params = [p.detach().to(dtype).requires_grad_(True) if p is not None else None for p in (layer.weight, layer.bias)]
    if channels_first:
        y = _rows_reference(kind, xr.movedim(1, -1), *params, layer.eps, [-1]).movedim(-1, 1)
    else:
        y = _rows_reference(kind, xr, *params, layer.eps, [-1])
    y.backward(gy.to(dtype))
    return y.detach(), [t.grad for t in (xr, *params) if t is not None]


def _max_diff(a, b):
    return float((a.detach().double() - b.detach().double()).abs().max())


LAYERS = [  # (layer, kind, channels_first)
    (lambda c: RMSNorm(c, eps=1e-6), "rms", False),
    (lambda c: RMSNorm(c, eps=1e-6, bias=True), "rms", False),
    (lambda c: BertLayerNorm(c), "bert", False),
    (lambda c: RMSNorm2d(c, eps=1e-6), "rms", True),
    (lambda c: BertLayerNorm2d(c), "bert", True),
    (lambda c: ChannelLayerNorm(c), "layer", True),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("make,kind,channels_first", LAYERS)
def test_each_layer_computes_its_formula_forward_and_backward(make, kind, channels_first, dtype):
    torch.manual_seed(0)
    c = 96
    layer = make(c).to(DEVICE)
    with torch.no_grad():
        for p in layer.parameters():
            p.uniform_(0.5, 1.5)
    shape = (4, c, 5, 7) if channels_first else (4, 33, c)
    x = (torch.randn(shape, device=DEVICE) * 3 + 1).to(dtype).requires_grad_(True)
    y = layer(x)
    assert y.dtype == dtype and y.shape == x.shape
    gy = torch.randn_like(y)
    y.backward(gy)

    # (on CUDA every layer runs torch ops or fused GPU kernels; on the CPU, float32 ChannelLayerNorm runs a
    # one-pass C kernel whose float32 error is a few times the formula's)
    ref, ref_grads = _reference_and_grads(kind, layer, x, gy, channels_first, torch.float64)
    # the formula's own float32 error bounds the computation; half outputs are then rounded once more
    f32, f32_grads = _reference_and_grads(kind, layer, x, gy, channels_first, torch.float32)
    rounding = _eps(dtype) if dtype != torch.float32 else 0.0
    tol = 4 * _max_diff(f32, ref) + rounding * float(ref.abs().max()) + 1e-7
    assert _max_diff(y, ref) <= tol
    got_grads = [t.grad for t in (x, layer.weight, layer.bias) if t is not None]
    # a parameter's gradient sums M = rows products gy * x_hat, each of which a half-precision kernel may
    # round once: |x_hat| <= sqrt(C) for these norms, so the sum is off by at most ~ eps * sqrt(M) * that
    rows = x.numel() // c
    term = rounding * rows ** 0.5 * float(gy.abs().max()) * c ** 0.5
    for i, (got, expected, approx) in enumerate(zip(got_grads, ref_grads, f32_grads)):
        gtol = 4 * _max_diff(approx, expected) + rounding * float(expected.abs().max()) + 1e-6 + (term if i else 0)
        assert _max_diff(got, expected) <= gtol, (i, _max_diff(got, expected), gtol)


@pytest.mark.parametrize("spec", ["gn_ws", "gn", "in", "ghost_bn", "ln"])
def test_a_converted_cnn_on_cuda_matches_the_cpu_on_the_same_weights(spec):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    original = timm.create_model("resnet18", pretrained=False, num_classes=10)
    options = {"virtual_batch": 2} if spec == "ghost_bn" else {}
    cpu = normswap.convert(original, spec, **options).eval()
    cuda = copy.deepcopy(cpu).to(DEVICE)
    assert all(t.device.type == DEVICE for t in [*cuda.parameters(), *cuda.buffers()])
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        expected = cpu(x)
        got = cuda(x.to(DEVICE)).cpu()
        ref = copy.deepcopy(cpu).double()(x.double())
    # float32 on two devices: each within its rounding of the float64 result, so within twice of each other
    noise = float((expected.double() - ref).abs().max())
    assert float((got - expected).abs().max()) <= 20 * noise + 1e-5
    # converting a model that already lives on CUDA gives the same model
    on_device = normswap.convert(copy.deepcopy(original).to(DEVICE), spec, **options).eval()
    with torch.no_grad():
        torch.testing.assert_close(on_device(x.to(DEVICE)), cuda(x.to(DEVICE)))
    # train mode: finite forward and backward
    cuda.train()
    y = cuda(x.to(DEVICE))
    y.square().mean().backward()
    assert torch.isfinite(y).all()
    assert all(torch.isfinite(p.grad).all() for p in cuda.parameters() if p.grad is not None)


@pytest.mark.parametrize("dtype", DTYPES)
def test_group_norm_on_channels_last_input_computes_its_formula_and_keeps_the_layout(dtype):
    """The Triton GroupNorm (channels_last input): output and gradients against F.group_norm in float64, the
    same derived tolerances as the other layers; output and input gradient stay channels_last."""
    from normswap.norms import triton_groups

    torch.manual_seed(0)
    c, groups = 96, 32
    layer = GroupNorm(groups, c).to(DEVICE)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
    x = (torch.randn(4, c, 15, 17, device=DEVICE) * 3 + 1).to(dtype).to(memory_format=torch.channels_last)
    assert triton_groups.usable(x)
    x.requires_grad_(True)
    y = layer(x)
    gy = torch.randn_like(y)
    y.backward(gy)
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    assert x.grad.is_contiguous(memory_format=torch.channels_last)
    refs = {}
    for cdt in (torch.float64, torch.float32):
        leaves = [t.detach().to(cdt).requires_grad_(True) for t in (x, layer.weight, layer.bias)]
        out = torch.nn.functional.group_norm(leaves[0], groups, leaves[1], leaves[2], layer.eps)
        out.backward(gy.to(cdt))
        refs[cdt] = [out.detach()] + [t.grad for t in leaves]
    rounding = _eps(dtype) if dtype != torch.float32 else 0.0
    rows = x.numel() // c  # each parameter gradient sums this many products gy * x_hat (|x_hat| <= sqrt(size))
    term = rounding * rows ** 0.5 * float(gy.abs().max()) * (x.numel() // (x.shape[0] * groups)) ** 0.5
    got_all = [y.detach(), x.grad, layer.weight.grad, layer.bias.grad]
    for i, (got, exact, approx) in enumerate(zip(got_all, refs[torch.float64], refs[torch.float32])):
        tol = 4 * _max_diff(approx, exact) + rounding * float(exact.abs().max()) + 1e-6 + (term if i > 1 else 0)
        assert _max_diff(got, exact) <= tol, (i, _max_diff(got, exact), tol)


@cuda_only
def test_group_norm_under_autocast_returns_what_torchs_returns():
    """CUDA autocast runs torch's GroupNorm in float32: normswap's on a channels_last input does too (float32
    output, channels_last kept), and its gradient reaches the bf16 input."""
    torch.manual_seed(0)
    ours, theirs = GroupNorm(4, 32).to(DEVICE), nn.GroupNorm(4, 32).to(DEVICE)
    x = torch.randn(2, 32, 9, 7, device=DEVICE, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    x.requires_grad_(True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y, expected = ours(x), theirs(x.detach())
    assert y.dtype == expected.dtype == torch.float32 and y.is_contiguous(memory_format=torch.channels_last)
    exact = torch.nn.functional.group_norm(x.detach().double(), 4, ours.weight.double(), ours.bias.double(), ours.eps)
    # torch's float32 error of the float64 result bounds ours (4x), plus a rounding of the largest value
    tol = 4 * _max_diff(expected, exact) + _eps(torch.float32) * float(exact.abs().max())
    assert _max_diff(y.detach(), exact) <= tol
    y.sum().backward()
    assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_group_norm_operator_passes_opcheck_on_cuda(memory_format, dtype):
    x = torch.randn(2, 16, 5, 7, device=DEVICE, dtype=dtype).to(memory_format=memory_format).requires_grad_(True)
    w = torch.rand(16, device=DEVICE, requires_grad=True)
    b = torch.rand(16, device=DEVICE, requires_grad=True)
    torch.library.opcheck(torch.ops.normswap.group_norm.default, (x, w, b, 4, 1e-5))


def test_a_gn_ws_model_in_channels_last_on_cuda_matches_the_cpu_and_stays_channels_last():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    cpu = normswap.convert(timm.create_model("resnet18", pretrained=False, num_classes=10), "gn_ws").eval()
    cuda = copy.deepcopy(cpu).to(DEVICE).to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 64, 64)
    seen = []
    for m in cuda.modules():
        if isinstance(m, GroupNorm):
            m.register_forward_hook(
                lambda _m, _i, out: seen.append(out.is_contiguous(memory_format=torch.channels_last)))
    with torch.no_grad():
        expected = cpu(x)
        got = cuda(x.to(DEVICE).to(memory_format=torch.channels_last)).cpu()
        ref = copy.deepcopy(cpu).double()(x.double())
    assert seen and all(seen)
    noise = float((expected.double() - ref).abs().max())
    assert float((got - expected).abs().max()) <= 20 * noise + 1e-5


def test_ghost_batch_norm_on_cuda_matches_the_cpu_in_train_mode_and_running_statistics():
    torch.manual_seed(0)
    cpu = GhostBatchNorm2d(8, virtual_batch_size=3)
    with torch.no_grad():
        cpu.weight.uniform_(0.5, 1.5)
        cpu.bias.uniform_(-0.5, 0.5)
    cuda = copy.deepcopy(cpu).to(DEVICE)
    x = torch.randn(10, 8, 5, 5) * 2 + 1
    expected = cpu(x)
    got = cuda(x.to(DEVICE)).cpu()
    torch.testing.assert_close(got, expected, atol=16 * _eps(torch.float32) * 4, rtol=0)
    for key, value in cpu.state_dict().items():
        torch.testing.assert_close(cuda.state_dict()[key].cpu(), value, msg=key)


@pytest.mark.parametrize("mode", ["inside", "outside"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_weight_standardization_on_cuda(dtype, mode):
    """The standardized weight and its gradient against the formula in float64 (the fused Triton kernel where
    Triton is installed: it is checked to run)."""
    from normswap.norms import triton_rows
    from normswap.norms.std_conv import standardize_weight

    torch.manual_seed(0)
    conv = standardize_conv(nn.Conv2d(48, 64, 3), mode=mode).to(DEVICE).to(dtype)
    if triton_rows.kernels() is not None:
        assert triton_rows.usable(conv.weight.detach().flatten(1))
    gw = torch.randn_like(conv.weight)
    got = conv.standardized_weight()
    got.backward(gw)
    leaf = conv.weight.detach().double().requires_grad_(True)
    ref = standardize_weight(leaf, conv.ws_eps, mode)
    ref.backward(gw.double())
    assert got.dtype == dtype
    assert _max_diff(got.detach(), ref.detach()) <= 4 * _eps(dtype) * float(ref.abs().max())
    # the gradient's terms are sums over a fan-in of 432: a float32 rounding per term, then the dtype's
    fan_in = conv.weight[0].numel()
    tol = (4 * _eps(dtype) + fan_in * _eps(torch.float32)) * float(leaf.grad.abs().max())
    assert _max_diff(conv.weight.grad, leaf.grad) <= tol


@pytest.mark.parametrize("name", ["rms_norm_rows", "bert_layer_norm_rows", "layer_norm_rows"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_row_operators_pass_opcheck_on_cuda(name, dtype):
    importlib.import_module("normswap.norms.layer_rows")  # registers normswap::layer_norm_rows

    op = getattr(torch.ops.normswap, name).default
    x = torch.randn(37, 96, device=DEVICE, dtype=dtype, requires_grad=True)
    w = torch.rand(96, device=DEVICE, requires_grad=True)
    b = torch.rand(96, device=DEVICE, requires_grad=True)
    torch.library.opcheck(op, (x, w, b, 1e-6))


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_channel_layer_norm_operator_passes_opcheck_on_cuda(memory_format):
    x = torch.randn(2, 16, 5, 7, device=DEVICE).to(memory_format=memory_format).requires_grad_(True)
    w = torch.rand(16, device=DEVICE, requires_grad=True)
    b = torch.rand(16, device=DEVICE, requires_grad=True)
    torch.library.opcheck(torch.ops.normswap.channel_layer_norm.default, (x, w, b, 1e-5))


@cuda_only
@pytest.mark.parametrize("spec", ["rms", "bert_ln"])
def test_a_converted_transformer_compiles_whole_on_cuda(spec):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64)
    torch.manual_seed(0)
    model = normswap.convert(transformers.BertModel(config).eval(), spec).to(DEVICE)
    ids = torch.randint(0, 64, (2, 12), device=DEVICE)
    with torch.no_grad():
        expected = model(ids).last_hidden_state
        compiled = torch.compile(model, fullgraph=True)
        torch.testing.assert_close(compiled(ids).last_hidden_state, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("spec", ["gn_ws", "ghost_bn", "ln"])
def test_a_converted_model_scripts_on_cuda(spec):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = normswap.convert(timm.create_model("resnet10t", pretrained=False, num_classes=5), spec,
                             **({"virtual_batch": 2} if spec == "ghost_bn" else {})).to(DEVICE).eval()
    scripted = torch.jit.script(model)
    x = torch.randn(2, 3, 64, 64, device=DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x), atol=1e-4, rtol=1e-4)
