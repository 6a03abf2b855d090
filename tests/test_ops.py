"""The fused kernels as torch operators (``normswap::*``): every registration passes torch.library.opcheck
(schema, fake kernel, autograd registration, AOT dispatch), and converted models compile with
``fullgraph=True`` and export with ``torch.export`` where the originals do."""

import copy
import importlib
import warnings

import pytest
import torch
from torch import nn

import normswap
from normswap.norms.bert_layer_norm import bert_layer_norm_rows
from normswap.norms.layer_rows import layer_norm_rows
from normswap.norms.rms_norm import rms_norm_rows

OPS = {"rms_norm_rows": rms_norm_rows, "bert_layer_norm_rows": bert_layer_norm_rows, "layer_norm_rows": layer_norm_rows}


def _within_float32_error(got, exact, approx):
    """Whether ``got`` is within float32's own error of the float64 ``exact``: 4x that of ``approx`` (the same
    quantity computed in float32 by the reference path), plus one rounding of the largest value."""
    exact = exact.double()
    tol = 4 * float((approx.double() - exact).abs().max()) + torch.finfo(torch.float32).eps * float(exact.abs().max())
    return float((got.double() - exact).abs().max()) <= tol


def _args(dtype, weight, bias, rows=6, d=10):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, d, generator=g, dtype=dtype, requires_grad=True)
    w = torch.randn(d, generator=g, requires_grad=True) if weight else None
    b = torch.randn(d, generator=g, requires_grad=True) if bias else None
    return x, w, b, 1e-5


@pytest.mark.parametrize("name", list(OPS))
@pytest.mark.parametrize("dtype,weight,bias", [(torch.float32, True, True), (torch.float64, True, False),
                                               (torch.bfloat16, False, False)])
def test_every_row_operator_passes_opcheck(name, dtype, weight, bias):
    """float32 runs the fused CPU kernels, float64 the torch ops, bfloat16 inputs with float32 parameters
    are computed in float32."""
    torch.library.opcheck(OPS[name].op, _args(dtype, weight, bias))


@pytest.mark.parametrize("spec", ["rms", "bert_ln"])
def test_a_converted_transformer_compiles_whole_and_exports(spec):
    transformers = pytest.importorskip("transformers")
    model = transformers.BertModel(transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1,
                                                           num_attention_heads=4, intermediate_size=37)).eval()
    converted = normswap.convert(model, spec).eval()
    ids = torch.randint(0, 99, (2, 7))
    with torch.no_grad():
        expected = converted(ids).last_hidden_state
        compiled = torch.compile(converted, fullgraph=True, backend="eager")
        torch.testing.assert_close(compiled(ids).last_hidden_state, expected)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exported = torch.export.export(converted, (ids,))
        assert any("normswap" in str(n.target) for n in exported.graph.nodes)  # one operator, not a decomposition
        torch.testing.assert_close(exported.module()(ids).last_hidden_state, expected)


@pytest.mark.parametrize("shape,dtype,affine,memory_format", [
    ((2, 8, 5, 5), torch.float32, True, torch.contiguous_format),  # the fused CPU kernels
    ((2, 8, 5, 5), torch.float32, False, torch.channels_last),      # torch ops, another layout
    ((3, 6, 7), torch.float64, True, torch.contiguous_format),      # torch ops, float64
])
def test_the_channel_layer_norm_operator_passes_opcheck(shape, dtype, affine, memory_format):
    from normswap.norms.channel_layer_norm import channel_layer_norm

    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=dtype)
    if len(shape) == 4:
        x = x.contiguous(memory_format=memory_format)
    c = shape[1]
    w = torch.randn(c, generator=g, dtype=dtype, requires_grad=True) if affine else None
    b = torch.randn(c, generator=g, dtype=dtype, requires_grad=True) if affine else None
    torch.library.opcheck(channel_layer_norm, (x.requires_grad_(), w, b, 1e-5))


@pytest.mark.parametrize("dtype,affine,stats", [
    (torch.float32, True, True),    # the fused CPU kernels, running statistics wanted
    (torch.float32, False, False),  # fused, no parameters, no statistics
    (torch.float64, True, True),    # torch's batch-norm kernel per chunk
])
def test_the_ghost_batch_norm_operator_passes_opcheck(dtype, affine, stats):
    from normswap.norms.ghost_batch_norm import ghost_batch_norm

    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 4, 3, 3, generator=g, dtype=dtype).requires_grad_()
    w = torch.rand(4, generator=g, dtype=dtype).add_(0.5).requires_grad_() if affine else None
    b = torch.randn(4, generator=g, dtype=dtype).requires_grad_() if affine else None
    torch.library.opcheck(ghost_batch_norm, (x, w, b, [3, 3, 4], 1e-5, dtype if stats else None))


def test_a_ghost_batch_norm_model_compiles_whole_in_train_mode():
    from normswap.norms.ghost_batch_norm import GhostBatchNorm2d

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), GhostBatchNorm2d(8, virtual_batch_size=2), nn.ReLU()).train()
    twin = copy.deepcopy(model)
    x = torch.randn(6, 3, 8, 8)
    compiled = torch.compile(twin, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), model(x))
    torch.testing.assert_close(twin[1].running_var, model[1].running_var)


@pytest.mark.parametrize("name", list(OPS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_eager_path_computes_what_the_operator_computes(name, dtype):
    """In plain eager mode a row kernel skips the operator's dispatch: same outputs, statistics and
    gradients, bit for bit (float32: the fused CPU kernels, float64: torch ops)."""
    kernel = OPS[name]
    x, w, b, eps = _args(dtype, True, True)
    gy = torch.randn_like(x)
    results = []
    for call in (kernel, kernel.op):
        y, stats = call(x, w, b, eps)
        results.append([y, stats, *torch.autograd.grad(y, (x, w, b), gy)])
    for got, expected in zip(*results):
        assert torch.equal(got, expected)


@pytest.mark.parametrize("name", list(OPS))
def test_row_kernels_work_under_torch_func_transforms(name):
    """vmap (one call for shared parameters, else per sample), grad, jacrev and vmap(grad) -- per-sample
    gradients -- against autograd. A transform's backward runs torch ops on its wrappers, autograd the fused
    kernel: each within float32's own error of the float64 gradient (the fused kernel's error, 4x, plus a
    rounding of the largest value)."""
    kernel = OPS[name]
    x, w, b, eps = (t.detach() if isinstance(t, torch.Tensor) else t for t in _args(torch.float32, True, True))
    fn = lambda rows: kernel(rows, w, b, eps)[0]  # noqa: E731
    batched = torch.stack([x, 2 * x + 1])
    torch.testing.assert_close(torch.func.vmap(fn)(batched), torch.stack([fn(batched[0]), fn(batched[1])]))
    # the batch dim elsewhere; batched parameters (one weight per sample, with and without batched rows)
    torch.testing.assert_close(torch.func.vmap(fn, in_dims=1)(batched.transpose(0, 1)), torch.func.vmap(fn)(batched))
    ws = torch.stack([w, 2 * w])
    per_weight = lambda rows, weight: kernel(rows, weight, b, eps)[0]  # noqa: E731
    torch.testing.assert_close(torch.func.vmap(per_weight)(batched, ws),
                               torch.stack([per_weight(batched[i], ws[i]) for i in range(2)]))
    torch.testing.assert_close(torch.func.vmap(per_weight, in_dims=(None, 0))(x, ws),
                               torch.stack([per_weight(x, ws[i]) for i in range(2)]))

    def grad_ok(got, rows):
        refs = []
        for dtype in (torch.float64, torch.float32):
            xr = rows.to(dtype).requires_grad_(True)
            kernel(xr, w.to(dtype), b.to(dtype), eps)[0].pow(2).sum().backward()
            refs.append(xr.grad)
        return _within_float32_error(got, refs[0], refs[1])

    loss = lambda rows: fn(rows).pow(2).sum()  # noqa: E731
    assert grad_ok(torch.func.grad(loss)(x), x)
    per_sample = torch.func.vmap(torch.func.grad(loss))(batched)
    assert grad_ok(per_sample[0], batched[0]) and grad_ok(per_sample[1], batched[1])
    row = x[:1]
    torch.testing.assert_close(torch.func.jacrev(fn)(row), torch.autograd.functional.jacobian(fn, row))


def test_per_sample_gradients_of_a_converted_layer_with_torch_func():
    """The torch.func recipe for per-sample gradients (functional_call + vmap(grad)) on an RMSNorm layer: each
    sample's weight gradient equals autograd's on that sample alone."""
    from normswap.norms.rms_norm import RMSNorm

    torch.manual_seed(0)
    layer = RMSNorm(10)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
    params = {k: v.detach() for k, v in layer.named_parameters()}
    x = torch.randn(3, 4, 10)

    def loss(p, sample):
        return torch.func.functional_call(layer, p, (sample,)).pow(2).sum()

    with torch.profiler.profile() as prof:
        grads = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x)["weight"]
    # the parameters are shared: one call of the operator normalizes every sample's rows
    assert sum(e.name == "normswap::rms_norm_rows" for e in prof.events()) == 1
    for i in range(3):
        layer.zero_grad()
        layer(x[i]).pow(2).sum().backward()
        torch.testing.assert_close(grads[i], layer.weight.grad)


def test_traced_and_compiled_calls_go_through_the_operator():
    """torch.jit.trace and torch.compile see the operator (the eager path would hide the fused kernel)."""
    from normswap.norms.rms_norm import RMSNorm

    layer = RMSNorm(10)
    x = torch.randn(3, 10)
    traced = torch.jit.trace(layer, (x,))
    assert "normswap::rms_norm_rows" in str(traced.graph)
    torch.testing.assert_close(traced(x), layer(x))
    seen = []
    torch.compile(layer, fullgraph=True, backend=lambda gm, _: seen.append(str(gm.graph)) or gm)(x)
    assert any("normswap.rms_norm_rows" in graph for graph in seen)


@pytest.mark.parametrize("module", ["rms_norm", "bert_layer_norm"])
def test_every_implementation_lays_out_its_statistics_alike(module):
    """A backward may run on another implementation than its forward (torch ops where the gradient has no
    data pointer for the fused kernel, after a fused forward): the statistics agree, and torch ops' gradient
    from the fused kernel's statistics is as close to float64's as the fused kernel's own (constant rows
    too: BERT's std is 0)."""
    from normswap.norms import native

    if native.status().startswith("off"):
        pytest.skip("the fused CPU kernels are off")
    impl = importlib.import_module(f"normswap.norms.{module}")._IMPL
    x, w, b, eps = (t.detach() if isinstance(t, torch.Tensor) else t for t in _args(torch.float32, True, True))
    x[2] = 0.75
    g = torch.randn_like(x)
    _, stats = impl.native_forward(x, w, b, eps)
    _, *parts = impl.torch_forward(x.clone(), True, w, b, eps)
    torch.testing.assert_close(torch.cat(parts, 1), stats)
    columns = tuple(c.contiguous() for c in stats.split(1, dim=1))
    need = (True, True, True)
    exact = impl.torch_backward(g.double(), x.double(), w.double(), tuple(c.double() for c in columns), eps, need)
    fused = impl.native_backward(g, x, stats, w, need)
    crossed = impl.torch_backward(g, x, w, columns, eps, need)
    for ref, own, other in zip(exact, fused, crossed):
        assert _within_float32_error(other, ref, own)


@pytest.mark.parametrize("name", list(OPS))
def test_meta_tensors_go_through_the_operators_fake_kernel(name):
    """Shape-only runs (meta-device models) worked through the operator before the eager path existed."""
    x, w, b, eps = (t.to("meta").detach().requires_grad_(True) if isinstance(t, torch.Tensor) else t
                    for t in _args(torch.float32, True, True))
    y, stats = OPS[name](x, w, b, eps)
    assert y.is_meta and y.shape == x.shape and stats.shape[0] == x.shape[0]
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), torch.ones_like(y))
    assert (gx.shape, gw.shape, gb.shape) == (x.shape, w.shape, b.shape)


def test_compiling_the_layers_traces_into_no_cached_helper():
    """The layers ask whether their Triton kernels apply; under torch.compile those checks must not be
    ``functools.cache``d functions Dynamo traces into (it warns, and their cached state is not theirs there)."""
    from normswap.norms.channel_layer_norm import ChannelLayerNorm
    from normswap.norms.group_norm import GroupNorm

    cases = [(ChannelLayerNorm(8), torch.randn(2, 8, 5, 5, dtype=torch.bfloat16)),
             (GroupNorm(2, 8), torch.randn(2, 8, 5, 5).to(memory_format=torch.channels_last))]
    for layer, x in cases:
        torch._dynamo.reset()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            torch.testing.assert_close(torch.compile(layer, backend="eager", fullgraph=True)(x), layer(x))
        assert not [str(w.message) for w in seen if "lru_cache" in str(w.message)]


class _Refuse:
    """Stands in for an eager autograd.Function that must not be used."""

    @staticmethod
    def apply(*args):
        raise AssertionError("the autograd.Function ran")


@pytest.mark.parametrize("name", list(OPS))
def test_calls_autograd_need_not_see_run_the_forward_alone(name, monkeypatch):
    """no_grad, inference_mode, or no input wanting a gradient: the row kernel runs its forward without an
    autograd.Function (about 10 us a call saved) and returns what the operator returns, bit for bit; a call
    that wants a gradient still gets the Function."""
    kernel = OPS[name]
    x, w, b, eps = _args(torch.float32, True, True)
    expected = [t.detach() for t in kernel.op(x, w, b, eps)]
    monkeypatch.setattr(kernel, "_eager", _Refuse)
    contexts = [torch.no_grad, torch.inference_mode]
    for context in contexts:
        with context():
            got = kernel(x, w, b, eps)
        assert all(torch.equal(g, e) for g, e in zip(got, expected))
    got = kernel(x.detach(), w.detach(), b.detach(), eps)
    assert all(torch.equal(g, e) for g, e in zip(got, expected)) and got[0].grad_fn is None
    with pytest.raises(AssertionError, match="Function ran"):
        kernel(x, w, b, eps)


def _layers_with_parameters():
    """One of each layer normswap swaps in (float64, parameters away from their initial values) and an input."""
    from normswap.norms.bert_layer_norm import BertLayerNorm, BertLayerNorm2d
    from normswap.norms.channel_layer_norm import ChannelLayerNorm
    from normswap.norms.ghost_batch_norm import GhostBatchNorm2d
    from normswap.norms.group_norm import GroupNorm
    from normswap.norms.rms_norm import RMSNorm, RMSNorm2d
    from normswap.norms.std_conv import standardize_conv

    torch.manual_seed(0)
    cases = {
        "RMSNorm": (RMSNorm(6, bias=True), (3, 2, 6)), "BertLayerNorm": (BertLayerNorm((2, 3)), (3, 2, 3)),
        "RMSNorm2d": (RMSNorm2d(4, bias=True), (2, 4, 2, 3)), "BertLayerNorm2d": (BertLayerNorm2d(4), (2, 4, 3)),
        "ChannelLayerNorm": (ChannelLayerNorm(4), (2, 4, 3, 2)), "GroupNorm": (GroupNorm(2, 4), (2, 4, 3, 2)),
        "GhostBatchNorm2d": (GhostBatchNorm2d(3, virtual_batch_size=2, track_running_stats=False), (4, 3, 2, 2)),
        "StdConv2d inside": (standardize_conv(nn.Conv2d(3, 4, 2), 1e-6, "inside"), (2, 3, 3, 3)),
        "StdConv2d outside": (standardize_conv(nn.Conv2d(3, 4, 2), 1e-6, "outside"), (2, 3, 3, 3)),
    }
    for name, (layer, shape) in cases.items():
        layer.double()
        with torch.no_grad():
            for p in layer.parameters():
                p.add_(torch.rand_like(p) - 0.5)
        yield name, layer, torch.randn(shape, dtype=torch.float64)


@pytest.mark.parametrize("name,layer,x", list(_layers_with_parameters()), ids=lambda v: v if isinstance(v, str) else "")
def test_forward_mode_and_second_order_derivatives_of_every_layer(name, layer, x):
    """Forward-mode AD (torch.autograd.forward_ad, as gradcheck's check_forward_ad uses it), double backward
    (create_graph=True: gradient penalties, MAML) and forward-over-reverse (torch.func.hessian) through each
    layer, checked against finite differences by torch's gradcheck / gradgradcheck in float64. Before, forward
    mode raised and a double backward silently missed every term through the norm (its fused gradients are
    opaque to autograd)."""
    names = [k for k, _ in layer.named_parameters()]

    def fn(inp, *params):
        return torch.func.functional_call(layer, dict(zip(names, params)), (inp,))

    inputs = (x.requires_grad_(True), *(p.detach().requires_grad_(True) for p in layer.parameters()))
    assert torch.autograd.gradcheck(fn, inputs, check_forward_ad=True)
    assert torch.autograd.gradgradcheck(fn, inputs, check_fwd_over_rev=True)
    hessian = torch.func.hessian(lambda inp: fn(inp, *inputs[1:]).pow(3).sum())(x.detach())
    expected = torch.autograd.functional.hessian(lambda inp: fn(inp, *inputs[1:]).pow(3).sum(), x.detach())
    torch.testing.assert_close(hessian, expected)


def test_a_gradient_penalty_through_a_converted_model_matches_its_torch_ops_form():
    """An R1-style penalty (the squared input gradient, differentiated again) on a float32 converted model
    whose norms run the fused CPU kernels equals the same model run as TorchScript (every layer's torch-ops
    form): the gradient through the norm is recorded by autograd. Before, the penalty's weight gradients
    missed every term through the norms (0.8 of the largest one apart for the first Linear)."""
    from normswap.norms.rms_norm import RMSNorm

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), RMSNorm(8, bias=True), nn.GELU(), nn.Linear(8, 8), RMSNorm(8),
                          nn.Linear(8, 1))
    scripted = torch.jit.script(model)
    x = torch.randn(5, 8, requires_grad=True)

    def penalty_grads(m):
        (g,) = torch.autograd.grad(m(x).sum(), x, create_graph=True)
        return torch.autograd.grad(g.pow(2).sum(), list(m.parameters()), allow_unused=True)

    got, expected = penalty_grads(model), penalty_grads(scripted)
    assert [g is None for g in got] == [e is None for e in expected] == [False] * 8 + [True]  # the last bias
    for g, e in zip(got[:-1], expected[:-1]):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_channel_layer_norm_eager_path_computes_what_its_operator_computes(dtype, memory_format, monkeypatch):
    """ChannelLayerNorm in plain eager mode skips the operator's dispatch (as much as the norm itself on a small
    input): the same output and gradients bit for bit; under no_grad the forward alone, no Function."""
    from normswap.norms import channel_layer_norm as cln

    torch.manual_seed(0)
    layer = cln.ChannelLayerNorm(6).to(dtype)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 6, 4, 5, dtype=dtype).to(memory_format=memory_format).requires_grad_(True)
    gy = torch.randn_like(x)
    results = []
    for call in (lambda: layer(x), lambda: cln.channel_layer_norm(x, layer.weight, layer.bias, layer.eps)[0]):
        y = call()
        results.append([y, *torch.autograd.grad(y, (x, layer.weight, layer.bias), gy)])
    for got, expected in zip(*results):
        assert torch.equal(got, expected)
    monkeypatch.setattr(cln, "_Eager", _Refuse)
    with torch.no_grad():
        assert torch.equal(layer(x), results[0][0])
    with pytest.raises(AssertionError, match="Function ran"):
        layer(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_ghost_batch_norm_eager_path_computes_what_its_operator_computes(dtype, monkeypatch):
    """GhostBatchNorm in training mode skips its operator's dispatch in plain eager mode: the same output,
    gradients and running statistics, bit for bit, as the operator; a no_grad training-mode call runs the
    forward alone (no Function) and still updates the running statistics."""
    from normswap.norms import ghost_batch_norm as gbn

    torch.manual_seed(0)
    layers = [gbn.GhostBatchNorm2d(5, virtual_batch_size=3).to(dtype) for _ in range(2)]
    for layer in layers:
        with torch.no_grad():
            layer.weight.copy_(torch.linspace(0.5, 1.5, 5))
            layer.bias.copy_(torch.linspace(-0.5, 0.5, 5))
    x = torch.randn(8, 5, 3, 4, dtype=dtype, requires_grad=True)
    gy = torch.randn_like(x)
    y = layers[0](x)
    with monkeypatch.context() as patched:  # the second layer through the operator
        patched.setattr(gbn, "_Eager", type("_ViaOperator", (), {"apply": staticmethod(gbn.ghost_batch_norm)}))
        expected = layers[1](x)
    got = [y, *torch.autograd.grad(y, (x, layers[0].weight, layers[0].bias), gy)]
    want = [expected, *torch.autograd.grad(expected, (x, layers[1].weight, layers[1].bias), gy)]
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(layers[0].buffers(), layers[1].buffers()))
    monkeypatch.setattr(gbn, "_Eager", _Refuse)
    before = layers[0].running_mean.clone()
    with torch.no_grad():
        assert torch.equal(layers[0](x), y.detach())
    assert not torch.equal(layers[0].running_mean, before)
    with pytest.raises(AssertionError, match="Function ran"):
        layers[0](x)


def _check_per_sample_grads(layer, x):
    """Per-sample parameter gradients by torch.func (functional_call + vmap(grad)) equal autograd's, sample by
    sample; so does grad over the parameters with the input captured rather than passed (a plain tensor beside
    the transform's wrapped parameters)."""
    params = {k: v.detach() for k, v in layer.named_parameters()}

    def loss(p, sample):
        return torch.func.functional_call(layer, p, (sample,)).pow(2).sum()

    got = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x)
    captured = torch.func.grad(lambda p: loss(p, x[0]))(params)
    for i, sample in enumerate(x):
        layer.zero_grad()
        layer(sample).pow(2).sum().backward()
        for k, v in layer.named_parameters():
            torch.testing.assert_close(got[k][i], v.grad)
            if i == 0:
                torch.testing.assert_close(captured[k], v.grad)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_channel_layer_norm_works_under_torch_func_transforms(memory_format):
    """grad, jacrev and per-sample gradients (vmap(grad) with functional_call) through ChannelLayerNorm, as
    through timm's LayerNorm2d: against autograd (they failed: the operator's generated autograd.Function is
    refused by the transforms)."""
    from normswap.norms.channel_layer_norm import ChannelLayerNorm

    torch.manual_seed(0)
    layer = ChannelLayerNorm(6)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
    samples = [s.to(memory_format=memory_format) for s in torch.randn(3, 2, 6, 4, 5)]
    _check_per_sample_grads(layer, torch.stack(samples))
    sample = samples[0].requires_grad_(True)
    layer(sample).pow(2).sum().backward()
    torch.testing.assert_close(torch.func.grad(lambda s: layer(s).pow(2).sum())(sample.detach()), sample.grad)
    small = torch.randn(1, 6, 2, 1)
    torch.testing.assert_close(torch.func.jacrev(layer)(small), torch.autograd.functional.jacobian(layer, small))


def test_ghost_batch_norm_works_under_torch_func_transforms_as_batch_norm_does():
    """torch.func through GhostBatchNorm where it works through nn.BatchNorm2d: without running statistics
    (replace_all_batch_norm_modules_, the torch.func recipe) grad and per-sample gradients match autograd,
    and in eval mode grad does; with running statistics in training mode both refuse alike (an in-place update
    of a buffer during a transform)."""
    from normswap.norms.ghost_batch_norm import GhostBatchNorm2d

    torch.manual_seed(0)
    layer = GhostBatchNorm2d(4, virtual_batch_size=2)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 6, 4, 3, 3)
    params = {k: v.detach() for k, v in layer.named_parameters()}
    errors = []
    for norm in (torch.nn.BatchNorm2d(4), copy.deepcopy(layer)):
        with pytest.raises(RuntimeError) as raised:
            torch.func.grad(lambda p: torch.func.functional_call(norm, p, (x[0],)).sum())(params)
        errors.append(str(raised.value).split(".")[0])
    assert errors[0] == errors[1]
    layer.eval()
    expected = torch.autograd.grad(layer(x[0]).pow(2).sum(), layer.weight)[0]
    got = torch.func.grad(lambda p: torch.func.functional_call(layer, p, (x[0],)).pow(2).sum())(params)["weight"]
    torch.testing.assert_close(got, expected)
    layer.train()
    torch.func.replace_all_batch_norm_modules_(layer)
    _check_per_sample_grads(layer, x)


def test_forward_mode_ad_through_ghost_batch_norm_with_running_statistics():
    """A training-mode GhostBatchNorm with running statistics under forward-mode AD: the output's tangent is
    the per-virtual-batch formula's, the running statistics are updated as without tangents and, as in
    nn.BatchNorm, carry none."""
    import torch.autograd.forward_ad as fwAD

    from normswap.norms.ghost_batch_norm import GhostBatchNorm2d
    from normswap.norms.scripted import ghost_batch_norm_train

    torch.manual_seed(0)
    layer, twin = GhostBatchNorm2d(3, virtual_batch_size=2), GhostBatchNorm2d(3, virtual_batch_size=2)
    x, t = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    expected = torch.func.jvp(lambda v: ghost_batch_norm_train(v, layer.weight, layer.bias, [2, 2], layer.eps)[0],
                              (x,), (t,))[1]
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(layer(fwAD.make_dual(x, t))).tangent
        assert fwAD.unpack_dual(layer.running_mean).tangent is None
    twin(x)
    torch.testing.assert_close(tangent, expected)
    for a, b in zip(layer.buffers(), twin.buffers()):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name,layer,x", list(_layers_with_parameters()), ids=lambda v: v if isinstance(v, str) else "")
def test_batched_gradients_through_every_layer(name, layer, x):
    """autograd.grad(..., is_grads_batched=True) (vmap over the backward: Jacobian rows, per-output gradients)
    through each layer on its fused float32 path equals one backward per gradient. ChannelLayerNorm and
    GhostBatchNorm raised "Cannot access data pointer" once their eager path skipped the operator: a batched
    gradient now goes to the backward operator."""
    layer.float()
    x = x.float().requires_grad_(True)
    y = layer(x)
    grads = torch.randn(4, *y.shape, generator=torch.Generator().manual_seed(0))
    inputs = (x, *layer.parameters())
    batched = torch.autograd.grad(y, inputs, grads, is_grads_batched=True, retain_graph=True)
    for i, g in enumerate(grads):
        for got, expected in zip(batched, torch.autograd.grad(y, inputs, g, retain_graph=True)):
            torch.testing.assert_close(got[i], expected)
