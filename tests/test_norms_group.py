"""normswap's GroupNorm (``normswap/norms/group_norm.py``): ``nn.GroupNorm`` with the same keys, what the
GroupNorm specs build; its operator passes opcheck; converted models keep working everywhere torch's
GroupNorm did (pickling with a fused activation, TorchScript, compile, export). Its Triton kernels are
checked against float64 in ``tests/test_triton.py``."""

import copy
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normswap
from normswap.adapters.base import read_norm
from normswap.norms.group_norm import GroupNorm, group_norm, group_norm_op

timm = pytest.importorskip("timm")


def _inputs(shape, dtype, memory_format, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64).mul_(2).add_(0.5).to(dtype)
    return x.contiguous(memory_format=memory_format) if x.dim() == 4 else x


@pytest.mark.parametrize("shape,groups,dtype,affine,memory_format", [
    ((2, 8, 5, 5), 4, torch.float32, True, torch.contiguous_format),
    ((2, 8, 5, 5), 2, torch.float32, False, torch.channels_last),
    ((3, 6, 7), 3, torch.float64, True, torch.contiguous_format),
    ((2, 12, 3, 4), 12, torch.bfloat16, True, torch.channels_last),  # half input, float32 parameters
])
def test_the_group_norm_operator_passes_opcheck(shape, groups, dtype, affine, memory_format):
    x = _inputs(shape, dtype, memory_format).requires_grad_()
    g = torch.Generator().manual_seed(1)
    w = torch.rand(shape[1], generator=g).add_(0.5).requires_grad_() if affine else None
    b = torch.randn(shape[1], generator=g).requires_grad_() if affine else None
    torch.library.opcheck(group_norm_op, (x, w, b, groups, 1e-5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_the_operator_computes_torchs_group_norm_in_the_inputs_layout(dtype, memory_format):
    """Output, statistics and gradients against float64 ``F.group_norm`` / ``native_group_norm``, within the
    float32 computation's own error of it (plus one rounding of a half dtype); the output keeps x's layout."""
    x = _inputs((3, 12, 5, 4), dtype, memory_format)
    w, b = torch.linspace(0.5, 1.5, 12), torch.linspace(-1, 1, 12)
    gy = _inputs((3, 12, 5, 4), dtype, memory_format, seed=2)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    y, mean, rstd = group_norm_op(*leaves, 3, 1e-5)
    y.backward(gy)
    assert y.dtype == dtype and y.stride() == x.stride() and mean.dtype == rstd.dtype == torch.float32
    results = {}
    for cdt in (torch.float64, torch.float32):
        ref = [t.detach().to(cdt).requires_grad_() for t in (x, w, b)]
        out, ref_mean, ref_rstd = torch.native_group_norm(*ref, 3, 12, 20, 3, 1e-5)
        out.backward(gy.to(cdt))
        results[cdt] = [out, ref_mean, ref_rstd] + [t.grad for t in ref]
    rounding = 0.0 if dtype == torch.float32 else torch.finfo(dtype).eps
    for got, exact, approx in zip([y, mean, rstd] + [t.grad for t in leaves], results[torch.float64],
                                  results[torch.float32]):
        exact = exact.detach()
        tol = 4 * float((approx.detach() - exact).abs().max()) + (rounding + 1e-7) * float(exact.abs().max())
        assert float((got.detach().double() - exact).abs().max()) <= tol


def test_the_eager_path_computes_what_the_operator_computes():
    """Plain eager calls skip the operator's dispatch through an autograd.Function over the same forward and
    backward: outputs and gradients equal bit for bit (here on torch's kernel; the Triton path is checked the
    same way under the interpreter in tests/test_triton.py)."""
    from normswap.norms.group_norm import _Eager

    x = _inputs((2, 12, 5, 4), torch.float32, torch.channels_last).requires_grad_()
    w, b = torch.linspace(0.5, 1.5, 12).requires_grad_(), torch.linspace(-1, 1, 12).requires_grad_()
    gy = _inputs((2, 12, 5, 4), torch.float32, torch.channels_last, seed=3)
    results = []
    for call in (lambda: group_norm_op(x, w, b, 3, 1e-5)[0], lambda: _Eager.apply(x, w, b, 3, 1e-5)):
        y = call()
        results.append([y, *torch.autograd.grad(y, (x, w, b), gy)])
    for got, expected in zip(*results):
        assert torch.equal(got, expected)


def test_the_layer_is_nn_group_norm_with_the_same_keys_and_math():
    ours, theirs = GroupNorm(4, 8), nn.GroupNorm(4, 8)
    with torch.no_grad():
        theirs.weight.uniform_()
        theirs.bias.uniform_()
    ours.load_state_dict(theirs.state_dict())
    assert isinstance(ours, nn.GroupNorm) and ours.state_dict().keys() == theirs.state_dict().keys()
    x = torch.randn(2, 8, 3, 3).to(memory_format=torch.channels_last)
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)  # CPU: both are torch's kernel
    assert repr(ours) == repr(theirs)


def test_the_functional_form_keeps_torchs_errors():
    with pytest.raises(RuntimeError, match="divisible"):
        group_norm(torch.randn(2, 6, 3, 3), 4)


@pytest.mark.parametrize("spec", ["gn", "gn_ws"])
def test_group_norm_specs_build_it_and_a_second_reading_sees_a_group_norm(spec):
    model = timm.create_model("resnet10t", pretrained=False, num_classes=5)
    converted = normswap.convert(model, spec)
    norms = [m for m in converted.modules() if isinstance(m, nn.GroupNorm)]
    assert norms and all(isinstance(m, GroupNorm) for m in norms)
    plain = next(m for m in norms if type(m) is GroupNorm)  # resnet's bn2 has no fused activation
    info, reason = read_norm(plain)
    assert reason is None and info.kind == "group" and info.num_groups == plain.num_groups


def test_a_converted_model_with_fused_activations_pickles_and_deep_copies(tmp_path):
    """timm's BatchNormAct2d becomes a GroupNorm subclass with ``act``, a class made at run time: a whole
    model saved with ``torch.save`` loads in a fresh process (which has made no such class yet), also next
    to torch's GroupNorm given a fused activation (a class of the same name)."""
    from normswap.norms.act import act_class, attach_act

    torch.manual_seed(0)
    model = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=5).eval()
    converted = normswap.convert(model, "gn", groups=4)
    converted.extra = attach_act(nn.GroupNorm(2, 4), nn.ReLU(), None)
    assert type(converted.extra) is act_class(nn.GroupNorm)
    classes = {type(m) for m in converted.modules() if isinstance(m, GroupNorm)}
    assert len(classes) == 2  # plain and with act
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.save({"model": converted, "x": x, "y": converted(x)}, tmp_path / "whole.pt")
        torch.testing.assert_close(copy.deepcopy(converted)(x), converted(x))
    script = ("import sys, torch; saved = torch.load(sys.argv[1], weights_only=False); "
              "m = saved['model']; names = sorted({type(k).__name__ for k in m.modules()}); "
              "torch.testing.assert_close(m(saved['x']), saved['y']); print('GroupNormAct' in names)")
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "whole.pt")], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "True", result.stderr[-2000:]


def test_a_converted_resnet_in_channels_last_compiles_whole_and_exports():
    model = timm.create_model("resnet10t", pretrained=False, num_classes=5).eval()
    converted = normswap.convert(model, "gn_ws").eval().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32).to(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = converted(x)
        compiled = torch.compile(converted, fullgraph=True, backend="eager")
        torch.testing.assert_close(compiled(x), expected)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exported = torch.export.export(converted, (x,))
        torch.testing.assert_close(exported.module()(x), expected)


def test_the_layer_scripts():
    layer = GroupNorm(2, 6)
    x = torch.randn(2, 6, 4, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(layer)
    torch.testing.assert_close(scripted(x), F.group_norm(x, 2, layer.weight, layer.bias, layer.eps))


def test_compiled_calls_never_reach_the_triton_path(monkeypatch):
    """Inside torch.compile the layer is F.group_norm without asking whether the kernels apply (Dynamo would
    trace into that check and the kernel launch: under Triton's interpreter that broke later eager calls)."""
    from normswap.norms import triton_groups

    asked = []
    monkeypatch.setattr(triton_groups, "usable", lambda x: asked.append(x.shape) or False)
    layer = GroupNorm(2, 4)
    x = torch.randn(2, 4, 3, 3).to(memory_format=torch.channels_last)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(layer, backend="eager", fullgraph=True)(x), layer(x))
    assert asked == [x.shape]  # the eager call only
