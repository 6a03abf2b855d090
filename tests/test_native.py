"""The fused CPU kernels of the row norms (normswap.norms.native): threads, build cache, fallback."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch

from normswap.norms import native
from normswap.norms.bert_layer_norm import BertLayerNorm
from normswap.norms.rms_norm import RMSNorm

needs_native = pytest.mark.skipif(not native.available(), reason=f"fused CPU kernels {native.status()}")


def _grads(layer: torch.nn.Module, x: torch.Tensor, gy: torch.Tensor, threads: int | None = None) -> list[torch.Tensor]:
    """Output and gradients (input, then parameters), run with ``threads`` intra-op threads."""
    before = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)  # more threads than cores is fine: the split is what is tested
        x = x.clone().requires_grad_()
        y = layer(x)
        return [y.detach(), *torch.autograd.grad(y, (x, *layer.parameters()), gy)]
    finally:
        torch.set_num_threads(before)


def _torch_ops_reference(layer: torch.nn.Module, x: torch.Tensor, gy: torch.Tensor, monkeypatch) -> list[torch.Tensor]:
    """The same in float64 on the torch-ops path (itself checked against autograd of the formula elsewhere)."""
    monkeypatch.setattr(native, "usable", lambda x: False)
    return _grads(copy.deepcopy(layer).double(), x.double(), gy.double())


def _assert_threads_match_reference(layer, x, gy, monkeypatch) -> None:
    """4 threads and 1 thread give the float64 torch-ops numbers, to 1e-4 of each tensor's largest value."""
    fused, single = _grads(layer, x, gy, threads=4), _grads(layer, x, gy, threads=1)
    reference = _torch_ops_reference(layer, x, gy, monkeypatch)
    for a, b, ref in zip(fused, single, reference):
        tol = 1e-4 * ref.abs().max().item()
        torch.testing.assert_close(a.double(), ref, rtol=0, atol=tol)
        torch.testing.assert_close(b.double(), ref, rtol=0, atol=tol)


@needs_native
@pytest.mark.parametrize("make", [lambda d: RMSNorm(d, bias=True), lambda d: BertLayerNorm(d)])
def test_several_threads_match_the_torch_ops_path(make, monkeypatch):
    """Rows split over threads, per-thread weight/bias gradient sums: same numbers as the torch-ops path."""
    torch.manual_seed(0)
    d = 96
    layer = make(d)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
    x = torch.randn(1000, d) * 3 + 1
    gy = torch.randn(1000, d)
    _assert_threads_match_reference(layer, x, gy, monkeypatch)


@needs_native
def test_empty_input_and_no_parameter_gradients():
    layer = RMSNorm(8)
    assert layer(torch.empty(0, 8)).shape == (0, 8)
    layer.requires_grad_(False)
    x = torch.randn(5, 8, requires_grad=True)
    (gx,) = torch.autograd.grad(layer(x).sum(), x)
    assert torch.isfinite(gx).all()


def _run(code: str, **env: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


_PROBE = (
    "import torch; from normswap.norms import native; from normswap.norms.rms_norm import RMSNorm; "
    "x = torch.randn(3, 8, requires_grad=True); RMSNorm(8)(x).sum().backward(); "
    "print(native.status()); print(torch.isfinite(x.grad).all().item())"
)


def test_switched_off_by_environment_variable():
    status, finite = _run(_PROBE, NORMSWAP_NATIVE="0").splitlines()
    assert status.startswith("off:") and "NORMSWAP_NATIVE=0" in status
    assert finite == "True"


def test_no_compiler_falls_back_to_torch_ops_and_says_so_once(tmp_path):
    proc = subprocess.run([sys.executable, "-W", "always", "-c", _PROBE + "; RMSNorm(8)(x)"], capture_output=True,
                          text=True, env={**os.environ, "NORMSWAP_CACHE_DIR": str(tmp_path), "CC": "", "PATH": ""},
                          timeout=300)
    status, finite = proc.stdout.strip().splitlines()
    assert status.startswith("unavailable:") and "compiler" in status
    assert finite == "True"
    assert proc.stderr.count("could not be built") == 1 and "Install a C compiler" in proc.stderr  # once, with the fix
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == []  # nothing half-written left


@needs_native
def test_builds_once_into_the_cache_directory_even_when_processes_start_together(tmp_path):
    """Two processes starting at once (torchrun ranks): one builds, under a file lock, the other loads what
    it built; XDG_CACHE_HOME places the cache when NORMSWAP_CACHE_DIR is not set."""
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    env.pop("NORMSWAP_CACHE_DIR", None)
    procs = [subprocess.Popen([sys.executable, "-c", _PROBE], stdout=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    outs = [p.communicate(timeout=300)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    files = sorted(p.name for p in (tmp_path / "normswap").iterdir() if not p.name.startswith("."))
    assert len(files) == 1 and files[0].endswith(".so")
    assert outs[0] == outs[1] and str(tmp_path / "normswap" / files[0]) in outs[0][1]


@needs_native
def test_threads_follow_torch_and_a_forked_child_runs_alone():
    """The kernels use torch.get_num_threads() threads (one when torch is set to one), and a child forked after
    the parent used several threads (a DataLoader worker, which torch sets to one thread) runs them correctly."""
    import multiprocessing

    layer, x = RMSNorm(256), torch.randn(4096, 256)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        expected = layer(x)
        assert native.last_threads() == 1
        torch.set_num_threads(2)
        torch.testing.assert_close(layer(x), expected)
        assert native.last_threads() == 2 or "without OpenMP" in native.status()
    finally:
        torch.set_num_threads(before)
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        child, threads = pool.apply_async(_rms_in_child, (layer, x)).get(timeout=120)
    torch.testing.assert_close(child, expected.detach())
    assert threads == 1


def _rms_in_child(layer, x):
    with torch.no_grad():
        return layer(x), native.last_threads()


@needs_native
@pytest.mark.parametrize("shape,affine", [((37, 24, 9, 9), True), ((37, 24, 9, 9), False), ((50, 16), True)])
def test_ghost_batch_norm_backward_matches_the_torch_ops_path(shape, affine, monkeypatch):
    """Uneven virtual batches, several threads, with and without affine, spatial and 1-D inputs."""
    from normswap.norms.ghost_batch_norm import GhostBatchNorm1d, GhostBatchNorm2d

    torch.manual_seed(0)
    cls = GhostBatchNorm2d if len(shape) == 4 else GhostBatchNorm1d
    layer = cls(shape[1], affine=affine, virtual_batch_size=8)
    if affine:
        with torch.no_grad():
            layer.weight.normal_()
            layer.bias.normal_()
    x = torch.randn(*shape) * 2 + 0.5
    gy = torch.randn(*shape)
    if len(shape) == 4:  # a gradient in another memory layout than the input
        gy = gy.to(memory_format=torch.channels_last)
    fused = _grads(layer, x, gy, threads=4)
    reference = _torch_ops_reference(layer, x, gy, monkeypatch)
    for a, ref in zip(fused, reference):
        torch.testing.assert_close(a.double(), ref, rtol=0, atol=1e-4 * ref.abs().max().item())


@needs_native
@pytest.mark.parametrize("shape,affine,bias", [((5, 24, 9, 11), True, True), ((3, 7, 130), True, False),
                                               ((2, 16, 3, 4, 5), False, False), ((4, 256, 8, 8), True, True)])
def test_channel_layer_norm_matches_the_torch_ops_path(shape, affine, bias, monkeypatch):
    """Tiles of positions split over threads (a partial last tile), with or without affine and bias, 1-3
    spatial dims, a gradient in another memory layout; against float64 on the transpose path."""
    from normswap.norms.channel_layer_norm import ChannelLayerNorm

    torch.manual_seed(0)
    layer = ChannelLayerNorm(shape[1], affine=affine, bias=bias)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
    x = torch.randn(*shape) * 2 + 3
    gy = torch.randn(*shape)
    if len(shape) == 4:
        gy = gy.to(memory_format=torch.channels_last)
    assert _runs_native(layer, x.clone().requires_grad_(), monkeypatch)
    _assert_threads_match_reference(layer, x, gy, monkeypatch)


@needs_native
def test_channel_layer_norm_is_as_precise_as_torch_layer_norm_over_many_channels(monkeypatch):
    """Hundreds of channels whose first value lies far from their mean: the forward's sums ran in float32 from
    that first value and lost ~300 ulp (GhostNetV3's 538 channels, caught by the timm sweep). Forward and
    backward against float64, within 4x the error of torch's own float32 LayerNorm on the same values plus
    4 ulp."""
    import torch.nn.functional as F

    from normswap.norms.channel_layer_norm import ChannelLayerNorm

    torch.manual_seed(0)
    channels = 538
    x = torch.randn(2, channels, 7, 9) + 1.0
    x[:, 0] = 8.0
    gy = torch.randn_like(x)
    layer = ChannelLayerNorm(channels)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
    assert _runs_native(layer, x.clone().requires_grad_(), monkeypatch)

    def torch_ops(dtype):
        xs = x.to(dtype, copy=True).requires_grad_()
        w, b = (p.detach().to(dtype).requires_grad_() for p in layer.parameters())
        y = F.layer_norm(xs.movedim(1, -1), (channels,), w, b, layer.eps).movedim(-1, 1)
        y.backward(gy.to(dtype))
        return [t.double() for t in (y.detach(), xs.grad, w.grad, b.grad)]

    reference, theirs = torch_ops(torch.float64), torch_ops(torch.float32)
    xs = x.clone().requires_grad_()
    y = layer(xs)
    y.backward(gy)
    mine = [t.double() for t in (y.detach(), xs.grad, layer.weight.grad, layer.bias.grad)]
    ulp = torch.finfo(torch.float32).eps
    for name, a, t, r in zip(("y", "dx", "dw", "db"), mine, theirs, reference):
        scale = r.abs().max()
        err, torch_err = float((a - r).abs().max() / scale), float((t - r).abs().max() / scale)
        assert err <= 4 * torch_err + 4 * ulp, f"{name}: {err:.3g} off float64 (torch's LayerNorm: {torch_err:.3g})"


def _runs_native(layer, x, monkeypatch) -> bool:
    """Whether ``layer(x)`` ran the fused channel LayerNorm kernel."""
    calls = []
    real = native.channel_ln_forward
    monkeypatch.setattr(native, "channel_ln_forward", lambda *a: calls.append(1) or real(*a))
    layer(x)
    monkeypatch.setattr(native, "channel_ln_forward", real)
    return bool(calls)


@needs_native
def test_channel_layer_norm_falls_back_for_other_layouts_and_dtypes(monkeypatch):
    from normswap.norms.channel_layer_norm import ChannelLayerNorm

    layer = ChannelLayerNorm(8)
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    assert not _runs_native(layer, x.to(memory_format=torch.channels_last), monkeypatch)
    assert not _runs_native(layer.double(), x.double(), monkeypatch)


@needs_native
@pytest.mark.parametrize("shape", [(37, 24, 9, 9), (50, 16), (20, 6, 300)])
def test_ghost_batch_norm_forward_matches_the_torch_ops_path(shape, monkeypatch):
    """The fused forward: output, per-chunk statistics (through the running stats) and gradients."""
    from normswap.norms.ghost_batch_norm import GhostBatchNorm1d, GhostBatchNorm2d

    torch.manual_seed(0)
    cls = GhostBatchNorm2d if len(shape) == 4 else GhostBatchNorm1d
    layer = cls(shape[1], virtual_batch_size=8)
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
    x = torch.randn(*shape) * 2 + 5
    gy = torch.randn(*shape)
    fused_layer, ref_layer = copy.deepcopy(layer), copy.deepcopy(layer).double()
    fused = _grads(fused_layer, x, gy, threads=4)
    monkeypatch.setattr(native, "usable", lambda x: False)
    reference = _grads(ref_layer, x.double(), gy.double())
    for a, ref in zip(fused, reference):
        torch.testing.assert_close(a.double(), ref, rtol=0, atol=1e-4 * ref.abs().max().item())
    torch.testing.assert_close(fused_layer.running_mean.double(), ref_layer.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused_layer.running_var.double(), ref_layer.running_var, rtol=1e-5, atol=1e-6)


@needs_native
@pytest.mark.parametrize("make,shape", [
    (lambda: RMSNorm(64, bias=True), (6, 64)),
    (lambda: BertLayerNorm(64), (6, 64)),
    (lambda: __import__("normswap.norms.channel_layer_norm", fromlist=["x"]).ChannelLayerNorm(64), (4, 64, 5, 5)),
    (lambda: __import__("normswap.norms.ghost_batch_norm", fromlist=["x"]).GhostBatchNorm2d(
        64, virtual_batch_size=2).train(), (4, 64, 5, 5)),
])
def test_non_contiguous_parameters_are_read_as_their_values(make, shape, monkeypatch):
    """The kernels read raw pointers: a non-contiguous weight was copied into a temporary freed before the
    call ran (ChannelLayerNorm returned values off by 6.9e24). Every buffer now lives through the call."""
    torch.manual_seed(0)
    layer = make()
    with torch.no_grad():
        for name, p in list(layer.named_parameters()):
            strided = torch.randn(p.shape[0], 3)[:, 1]  # every third float: not contiguous
            assert not strided.is_contiguous()
            setattr(layer, name, torch.nn.Parameter(strided))
    x, gy = torch.randn(shape), torch.randn(shape)
    reference = _torch_ops_reference(layer, x, gy, monkeypatch)
    monkeypatch.undo()
    for got, ref in zip(_grads(layer, x, gy), reference):
        torch.testing.assert_close(got.double(), ref, rtol=0, atol=1e-4 * ref.abs().max().item())
