"""normswap.validate and `normswap validate`: passes on the core test set, fails clearly on a planted bug."""

import json
import warnings

import pytest
import torch
from torch import nn

import normswap
from normswap import cli
from normswap.validation import checks as C
from normswap.inputs import output_tensor, split_inputs
from normswap.validation import example_inputs, validate
from cli_helpers import console

timm = pytest.importorskip("timm")
pytestmark = pytest.mark.usefixtures("one_thread")
FAST = ["compile"]  # torch.compile is checked once below: it takes a minute per model on this CPU


def _convert(model, spec, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return normswap.convert(model, spec, **options)


def _timm(name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return timm.create_model(name, pretrained=False).eval()


def _timm_cases():
    from timm_zoo import sample, with_norm as _with

    bn = sample(_with("batch", 8e6, installed_only=False), 6)
    ln = sample(_with("layer", 6e6, installed_only=False), 3)
    cases = [(n, "gn_ws") for n in bn] + [(n, s) for n in ln for s in ("rms", "bert_ln")]
    fast = {cases[0], cases[1], cases[6], cases[7]}  # two BatchNorm models and one LayerNorm model in the fast suite
    return [pytest.param(*c, marks=() if c in fast else pytest.mark.long) for c in cases]


@pytest.mark.parametrize("name,spec", _timm_cases(), ids=lambda v: v)
def test_validate_passes_on_converted_timm_models(name, spec):
    from timm_zoo import input_size, skip_unless_installed

    skip_unless_installed(name)
    model = _timm(name)
    c, h, w = input_size(model)
    report = validate(model, _convert(model, spec), torch.randn(2, c, h, w), skip=FAST)
    assert report.passed, str(report)
    names = [r.check for r in report.rows]
    assert "gradients" in names and "outputs (eval)" in names and "autocast bfloat16" in names


def _hf_cases():
    from hf_zoo import MODELS

    return [(name, spec) for name, (_, _, _, specs) in MODELS.items() for spec in specs[:1]]


@pytest.mark.parametrize("name,spec", _hf_cases(), ids=lambda v: v)
def test_validate_passes_on_converted_hf_models(name, spec):
    pytest.importorskip("transformers")
    from hf_zoo import MODELS, OUTPUT

    build, make_inputs, _, _ = MODELS[name]
    torch.manual_seed(0)
    model = build().eval()
    options = {"virtual_batch": 1} if spec == "ghost_bn" else {}
    inputs = make_inputs(torch.Generator().manual_seed(0))
    report = validate(model, _convert(model, spec, **options), inputs, skip=FAST, output=OUTPUT.get(name))
    assert report.passed, str(report)


def test_preserving_specs_match_and_others_report_the_difference():
    model = _timm("test_resnet")
    x = torch.randn(2, 3, 32, 32)
    rows = {r.check: r for r in validate(model, _convert(model, "wn"), x, checks=["outputs"]).rows}
    assert rows["outputs (eval)"].status == "pass" and rows["outputs (train)"].status == "pass"
    rows = {r.check: r for r in validate(model, _convert(model, "ghost_bn"), x, checks=["outputs"]).rows}
    assert rows["outputs (eval)"].status == "pass" and rows["outputs (train)"].status == "info"
    rows = {r.check: r for r in validate(model, _convert(model, "gn_ws"), x, checks=["outputs"]).rows}
    reference = (model(x) - _convert(model, "gn_ws").eval()(x)).abs().max() / model(x).abs().max()
    assert rows["outputs (eval)"].status == "info"
    assert rows["outputs (eval)"].value == pytest.approx(float(reference), rel=1e-5)


# ---------------------------------------------------------------------------------------- planted bugs


class _Half(nn.GroupNorm):
    """A GroupNorm with an extra parameter its forward never uses (a classic surgery bug)."""

    def __init__(self, c):
        super().__init__(1, c)
        self.unused = nn.Parameter(torch.ones(c))


class _Nan(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(c))

    def forward(self, x):
        return x * self.weight[:, None, None] / 0.0 * 0.0


class _BatchMixing(nn.Module):
    """Normalizes over the batch but is not a BatchNorm: the batch-independence check must catch it."""

    def __init__(self, c):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(c))

    def forward(self, x):
        return (x - x.mean(0, keepdim=True)) * self.weight[:, None, None]


@pytest.fixture
def broken_specs():
    @normswap.register_spec("test_fake_preserving", sources=("batch",), preserves="yes",
                            description="claims to preserve computation, but is a GroupNorm")
    def fake(info):
        return nn.GroupNorm(1, info.num_features)

    @normswap.register_spec("test_unused_param", sources=("batch",), description="a parameter no gradient reaches")
    def unused(info):
        return _Half(info.num_features)

    @normswap.register_spec("test_nan", sources=("batch",), description="outputs NaN")
    def nan(info):
        return _Nan(info.num_features)

    @normswap.register_spec("test_batch_mixing", sources=("batch",), description="mixes the batch")
    def mixing(info):
        return _BatchMixing(info.num_features)

    yield
    for name in ("test_fake_preserving", "test_unused_param", "test_nan", "test_batch_mixing"):
        normswap.unregister_spec(name)


def test_planted_bugs_fail_with_the_first_offending_module(broken_specs):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8))
    with torch.no_grad():
        model[1].running_mean.fill_(0.3)
    x = torch.randn(2, 3, 12, 12)
    report = validate(model.eval(), _convert(model, "test_fake_preserving"), x, skip=FAST)
    row = next(r for r in report.rows if r.check == "outputs (eval)")
    assert not report.passed and row.status == "fail" and row.module == "1"
    text = str(report)
    assert "FAILED" in text and "outputs (eval)" in text and "fail" in text
    report = validate(model, _convert(model, "test_unused_param"), x, checks=["gradients"])
    assert report.failed[0].module == "1.unused" and "receive no gradient" in report.failed[0].detail
    report = validate(model, _convert(model, "test_nan"), x, checks=["finite"])
    assert [r.module for r in report.failed] == ["1", "1"]
    assert json.loads(report.to_json())["passed"] is False
    report = validate(model, _convert(model, "test_batch_mixing"), x, checks=["batch_independence"])
    assert report.failed[0].check == "batch independence" and report.failed[0].module == "1"


def test_cli_exit_codes_and_json(broken_specs, capsys):
    assert cli.main(["validate", "--model", "timm:test_resnet", "--spec", "test_fake_preserving",
                     "--image-size", "32", "--skip", "compile"]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "outputs (eval)" in out
    res = console("validate", "--model", "timm:test_resnet", "--spec", "gn_ws", "--image-size", "32",
                  "--skip", "compile", "--json")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["passed"] and {c["check"] for c in data["checks"]} >= {"finite (train)", "batch independence"}
    assert cli.main(["validate", "--model", "timm:test_resnet", "--spec", "gn_ws", "--skip", "compyle"]) == 2
    assert "Did you mean 'compile'" in capsys.readouterr().err


def test_compile_check_on_a_small_model():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()
    report = validate(model, _convert(model, "gn_ws", groups=2), torch.randn(2, 3, 8, 8), checks=["compile"])
    assert report.rows[0].check == "torch.compile" and report.rows[0].status in ("pass", "skip"), str(report)


# ------------------------------------------------------------------------------------------------ devices


def test_device_path_runs_on_cpu_and_cuda_is_refused_without_it():
    """The CPU-vs-GPU comparison is the same code for any two devices: run it CPU vs CPU here."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
    converted = _convert(model, "gn_ws", groups=2)
    report = normswap.ValidationReport("m", "gn_ws", "cpu")
    inputs = split_inputs(torch.randn(2, 3, 8, 8))
    C.check_devices(report, converted, inputs, torch.device("cpu"), torch.device("cpu"), torch.float32)
    assert report.rows[0].check == "cpu vs cpu" and report.rows[0].status == "pass"
    if not torch.cuda.is_available():
        with pytest.raises(normswap.OptionError, match="CUDA is not available"):
            validate(model, converted, torch.randn(2, 3, 8, 8), device="cuda")


@pytest.mark.gpu
def test_validate_on_cuda():
    model = _timm("resnet18")
    report = validate(model, _convert(model, "gn_ws"), torch.randn(2, 3, 64, 64), device="cuda", skip=FAST)
    assert report.passed, str(report)
    assert any(r.check == "cpu vs cuda" and r.status == "pass" for r in report.rows)


def test_example_inputs_for_timm_and_hf():
    transformers = pytest.importorskip("transformers")
    x = example_inputs(_timm("test_resnet"))
    assert x.shape[:2] == (2, 3)
    bert = transformers.BertModel(transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1,
                                                          num_attention_heads=4, intermediate_size=37))
    ids = example_inputs(bert)["input_ids"]
    assert ids.shape == (2, 16) and int(ids.max()) < 50


def test_a_batch_norm_planted_after_gn_ws_fails_batch_independence():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8))
    converted = _convert(model, "gn_ws", groups=2)
    converted[4] = nn.BatchNorm2d(8)  # planted after the conversion
    report = validate(model, converted, torch.randn(4, 3, 10, 10), checks=["batch_independence"])
    assert report.failed[0].module == "4" and "did not skip on purpose" in report.failed[0].detail
    kept = _convert(model, "gn_ws", groups=2, exclude=["4"])  # left out on purpose: a skip, as before
    assert validate(model, kept, torch.randn(4, 3, 10, 10), checks=["batch_independence"]).rows[0].status == "skip"


def test_the_output_tensor_is_found_inside_nested_outputs():
    maps = (torch.randn(2, 4, 3, 3), torch.randn(2, 8, 2, 2))
    assert output_tensor({"feature_maps": maps}) is maps[0]
    with pytest.raises(normswap.OptionError, match="holds no tensor"):
        output_tensor({"feature_maps": ()})


def test_a_registered_check_runs_and_can_be_picked(broken_specs):
    from normswap.validation import check, registered, unregister

    @check("parameter_count")
    def parameter_count(ctx):
        ctx.report.add("parameters", "info", str(sum(p.numel() for p in ctx.converted.parameters())))

    try:
        model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
        report = validate(model, _convert(model, "gn", groups=2), torch.randn(2, 3, 8, 8), checks=["parameter_count"])
        assert [(r.check, r.detail) for r in report.rows] == [("parameters", str(3 * 8 * 9 + 8 + 16))]
        assert list(registered())[:3] == ["finite", "gradients", "outputs"]
    finally:
        unregister("parameter_count")
