"""TorchScript: a converted model scripts wherever the original does (timm tests scripting for every
model) and computes what the eager model computes; ``torch.jit.trace`` passes its own check."""

import warnings

import pytest
import torch

import normswap

timm = pytest.importorskip("timm")

pytestmark = pytest.mark.usefixtures("one_thread")

# small architectures covering every layer a spec swaps in: plain and fused-act BatchNorm (BatchNormAct2d),
# TF "SAME" convs (Conv2dSame), channels-first LayerNorm (LayerNorm2d) and token LayerNorms
CASES = [
    ("resnet10t", {}, ("gn_ws", "gn", "in", "ghost_bn", "ln")),
    ("vit_tiny_patch16_224", {"img_size": 32}, ("rms",)),
    pytest.param("tf_mobilenetv3_small_minimal_100", {}, ("gn_ws", "ghost_bn"), marks=pytest.mark.long),
    pytest.param("convnext_atto", {}, ("rms", "bert_ln"), marks=pytest.mark.long),
    pytest.param("vit_tiny_patch16_224", {"img_size": 32}, ("bert_ln",), marks=pytest.mark.long),
]


def _model(name, kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=5, **kwargs)


def _scripts(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script is deprecated upstream
        return torch.jit.script(model)


def _tolerance(model, x):
    """10x the float32 rounding noise of the eager model: its distance from the same model in float64."""
    with torch.no_grad():
        ref = model.double()(x.double())
        out = model.float()(x)
    return 10 * float((out.double() - ref).abs().max()) + 1e-7


def _cases():
    for case in CASES:
        values, marks = (case.values, case.marks) if hasattr(case, "values") else (case, ())
        name, kwargs, specs = values
        yield from (pytest.param(name, kwargs, spec, marks=marks, id=f"{name}-{spec}") for spec in specs)


@pytest.mark.parametrize("name,kwargs,spec", list(_cases()))
def test_a_converted_model_scripts_and_matches_eager(name, kwargs, spec):
    original = _model(name, kwargs).eval()
    _scripts(original)  # the original scripts: so must the converted model
    options = {"virtual_batch": 2} if spec == "ghost_bn" else {}
    converted = normswap.convert(original, spec, **options)
    scripted = _scripts(converted)
    size = kwargs.get("img_size", 64)
    x = torch.randn(4, 3, size, size)
    for train in (False, True):
        converted.train(train)
        scripted.train(train)
        tol = _tolerance(converted, x)
        with torch.no_grad():
            expected, got = converted(x), scripted(x)
        assert float((got - expected).abs().max()) <= tol, (train, float((got - expected).abs().max()), tol)
    # state (running statistics a train-mode forward updated) is the same tensors
    assert scripted.state_dict().keys() == converted.state_dict().keys()


def test_scripted_ghost_batch_norm_updates_running_statistics_like_eager():
    from normswap.norms.ghost_batch_norm import GhostBatchNorm2d

    for momentum in (0.1, None):
        eager = GhostBatchNorm2d(4, virtual_batch_size=3, momentum=momentum)
        with torch.no_grad():
            eager.weight.uniform_()
            eager.bias.uniform_()
        twin = GhostBatchNorm2d(4, virtual_batch_size=3, momentum=momentum)
        twin.load_state_dict(eager.state_dict())
        scripted = _scripts(twin)
        x = torch.randn(8, 4, 3, 3)
        for _ in range(2):
            torch.testing.assert_close(scripted(x), eager(x))
        for key, value in eager.state_dict().items():
            torch.testing.assert_close(scripted.state_dict()[key], value, msg=key)


@pytest.mark.parametrize("name,kwargs,spec", [("resnet10t", {}, "gn_ws"), ("resnet10t", {}, "ln"),
                                               ("resnet10t", {}, "ghost_bn"),
                                               ("vit_tiny_patch16_224", {"img_size": 32}, "bert_ln")])
def test_jit_trace_passes_its_own_check(name, kwargs, spec):
    converted = normswap.convert(_model(name, kwargs).eval(), spec,
                                 **({"virtual_batch": 2} if spec == "ghost_bn" else {}))
    size = kwargs.get("img_size", 64)
    x = torch.randn(2, 3, size, size)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        traced = torch.jit.trace(converted, x, check_inputs=[(torch.randn(3, 3, size, size),)])
    # the trace check reports a traced graph that computes something else as a TracerWarning saying so
    mismatches = [str(w.message) for w in caught if "does not match" in str(w.message)
                  or "nondeterministic" in str(w.message)]
    assert not mismatches
    torch.testing.assert_close(traced(x), converted(x))
