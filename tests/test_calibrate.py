"""``normswap.calibrate``: a converted model learns its original's outputs back from unlabeled inputs.

The pretrained models are trained here, with BatchNorm, on the built-in images; every reference is the
original model's own output or accuracy."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

import normswap
from normswap.finetune.data import builtin

timm = pytest.importorskip("timm")
pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 16


def _tensors(dataset):
    items = [dataset[i] for i in range(len(dataset))]
    return torch.stack([d["pixel_values"] for d in items]), torch.stack([d["labels"] for d in items])


@pytest.fixture(scope="module")
def digits():
    data = builtin("image", seed=0, train_size=256, val_size=128, image_size=SIZE, num_classes=4)
    return _tensors(data.train), _tensors(data.val)


def _logits(model, x):
    out = model(x)
    return out.logits if hasattr(out, "logits") else out


def _accuracy(model, x, y):
    model.eval()
    with torch.no_grad():
        return float((_logits(model, x).argmax(-1) == y).float().mean())


def _train(model, x, y, steps):
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(x), (32,), generator=g)
        loss = F.cross_entropy(_logits(model, x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def pretrained(digits):
    """A BatchNorm model trained briefly (40 steps, under a second): its predictions are its own, not the
    near-ties of random weights, whose top-1 agreement flips with a CPU's rounding (a model with only its
    running statistics set lost agreement under calibration on one machine). What a fully trained one does
    is checked under ``-m long``."""
    (x, y), _ = digits
    torch.manual_seed(0)
    return _train(timm.create_model("test_resnet", pretrained=False, num_classes=4), x, y, steps=40)


@pytest.fixture(scope="module")
def trained():
    data = builtin("image", seed=0, train_size=512, val_size=256, image_size=32, num_classes=4)
    (x, y), (vx, vy) = _tensors(data.train), _tensors(data.val)
    torch.manual_seed(0)
    return _train(timm.create_model("test_resnet", pretrained=False, num_classes=4), x, y, steps=150), (x, y), (vx, vy)


def _batches(x, size=32):
    return [x[i:i + size] for i in range(0, len(x), size)]


def _agree(a, b, x):
    with torch.no_grad():
        return float((_logits(a.eval(), x).argmax(-1) == _logits(b.eval(), x).argmax(-1)).float().mean())


def test_calibration_improves_the_agreement_with_the_original(digits, pretrained):
    (x, _), (vx, _) = digits
    converted = normswap.convert(pretrained, "gn_ws")
    held_out = _agree(converted, pretrained, vx)
    report = normswap.calibrate(converted, pretrained, _batches(x), steps=30)
    assert report.steps == 30 and report.stopped == "30 steps" and report.params == "norms"
    assert report.after.mse < report.before.mse and report.after.top1 > report.before.top1
    # on images it was not calibrated on too
    assert _agree(converted, pretrained, vx) > held_out


@pytest.mark.long
@pytest.mark.parametrize("spec", ["gn_ws", "gn", "ln"])
def test_a_model_trained_here_gets_its_accuracy_back(trained, spec):
    model, (x, y), (vx, vy) = trained
    base = _accuracy(model, vx, vy)
    assert base > 0.5  # it learned something worth keeping (4 classes: chance is 0.25)
    converted = normswap.convert(model, spec)
    lost, agree = _accuracy(converted, vx, vy), _agree(converted, model, vx)
    report = normswap.calibrate(converted, model, _batches(x, 64), steps=150)
    assert report.after.mse < report.before.mse
    # on held-out images: closer to the original's predictions, and to its accuracy
    assert _agree(converted, model, vx) > agree
    assert abs(_accuracy(converted, vx, vy) - base) < abs(lost - base)


def test_only_the_converted_norms_change_and_the_original_is_left_alone(digits, pretrained):
    (x, _), _ = digits
    original_state = {k: v.clone() for k, v in pretrained.state_dict().items()}
    converted = normswap.convert(pretrained, "gn")
    converted.train()
    before = {k: v.clone() for k, v in converted.state_dict().items()}
    flags = {n: p.requires_grad for n, p in converted.named_parameters()}
    normswap.calibrate(converted, pretrained, _batches(x), steps=5)
    norms = {f"{c.path}.{n}" for c in normswap.last_plan(converted).replaced for n in ("weight", "bias")}
    changed = {k for k, v in converted.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and changed <= norms
    assert all(torch.equal(v, original_state[k]) for k, v in pretrained.state_dict().items())
    assert converted.training and not pretrained.training
    assert {n: p.requires_grad for n, p in converted.named_parameters()} == flags
    assert all(p.grad is None for p in converted.parameters())
    everything = normswap.calibrate(converted, pretrained, _batches(x), steps=2, params="all")
    assert everything.trained == sum(p.numel() for p in converted.parameters())


@pytest.mark.long
def test_any_iterable_of_batches_in_any_form(digits, pretrained):
    (x, _), _ = digits
    converted = normswap.convert(pretrained, "gn_ws")
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=64)
    one_shot = (b for b in _batches(x, 64))  # replayed from memory after its first pass
    forms = {"tensors": _batches(x, 64), "tuples": [(b,) for b in _batches(x, 64)],
             "dicts": [{"x": b} for b in _batches(x, 64)], "loader": loader, "generator": one_shot}
    for name, data in forms.items():
        report = normswap.calibrate(copy.deepcopy(converted), pretrained, data, steps=6)
        assert report.steps == 6, name
    # no budget: one pass over the data
    assert normswap.calibrate(copy.deepcopy(converted), pretrained, _batches(x, 64)).steps == 4
    report = normswap.calibrate(copy.deepcopy(converted), pretrained, _batches(x, 64), seconds=0.5)
    assert report.stopped == "0.5 s" and report.seconds < 30


@pytest.mark.long
def test_outputs_of_batches_held_in_memory_are_computed_once(digits, pretrained):
    """A list of batches (or a generator, replayed from memory) gives the original the same batches on every
    pass: it runs once per batch, the measured ones included; a DataLoader's batches are new objects every
    pass, so it runs once per step, except the first step (the measured batch)."""
    (x, _), _ = digits
    converted = normswap.convert(pretrained, "gn_ws")
    calls = []
    hook = pretrained.register_forward_hook(lambda *_: calls.append(1))
    try:
        batches = _batches(x, 64)  # 4 batches; 10 steps go round them two and a half times
        for data in (batches, (b for b in batches)):
            calls.clear()
            normswap.calibrate(copy.deepcopy(converted), pretrained, data, steps=10, eval_batches=1)
            assert len(calls) == len(batches)
        calls.clear()
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=64)
        normswap.calibrate(copy.deepcopy(converted), pretrained, loader, steps=10, eval_batches=1)
        assert len(calls) == 10
    finally:
        hook.remove()
    # reused outputs train exactly as recomputed ones do (the original is deterministic in eval mode)
    a, b = copy.deepcopy(converted), copy.deepcopy(converted)
    normswap.calibrate(a, pretrained, batches, steps=10)
    normswap.calibrate(b, pretrained, [t.clone() for t in batches * 3], steps=10)  # new objects: recomputed
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_params_all_trains_every_parameter_at_one_rate():
    """With params="all" every parameter trains at the default rate, the converted norms' too: one Adam step
    moves each parameter by about the rate; with params="norms" only the converted norms move."""
    from normswap.calibration import DEFAULT_LR

    torch.manual_seed(0)
    original = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Flatten(),
                                   torch.nn.Linear(8 * 6 * 6, 4)).eval()
    original[1].running_var.fill_(2.0)
    converted = normswap.convert(original, "gn", groups=2)
    old = {n: p.detach().clone() for n, p in converted.named_parameters()}
    for params in ("norms", "all"):
        model = copy.deepcopy(converted)
        normswap.calibrate(model, original, [torch.randn(16, 3, 8, 8)], steps=1, params=params)
        step = {n: float((p.detach() - old[n]).abs().max()) for n, p in model.named_parameters()}
        lr = DEFAULT_LR[params]
        assert step["1.weight"] == pytest.approx(lr, rel=1e-3)
        moved = lr if params == "all" else 0.0
        assert step["3.weight"] == pytest.approx(moved, rel=1e-3) and step["0.weight"] == pytest.approx(moved, rel=1e-3)


def test_bad_calls_are_one_clear_error(pretrained):
    converted = normswap.convert(pretrained, "gn")
    x = torch.randn(4, 3, SIZE, SIZE)
    with pytest.raises(normswap.OptionError, match="holds no batch"):
        normswap.calibrate(converted, pretrained, [])
    with pytest.raises(normswap.OptionError, match="wrap a single batch in a list"):
        normswap.calibrate(converted, pretrained, x)
    with pytest.raises(normswap.OptionError, match="params must be one of"):
        normswap.calibrate(converted, pretrained, [x], params="affine")
    with pytest.raises(normswap.OptionError, match="steps must be a positive integer"):
        normswap.calibrate(converted, pretrained, [x], steps=0)
    with pytest.raises(normswap.OptionError, match="same object"):
        normswap.calibrate(pretrained, pretrained, [x])
    with pytest.raises(normswap.NormSwapError, match="not made by normswap.convert"):
        normswap.calibrate(copy.deepcopy(pretrained), pretrained, [x])
    other = normswap.convert(timm.create_model("test_resnet", pretrained=False, num_classes=7), "gn")
    with pytest.raises(normswap.NormSwapError, match="the one it was converted from"):
        normswap.calibrate(other, pretrained, [x])
    plain = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8, affine=False)).eval()
    no_affine = normswap.convert(plain, "gn", groups=2)
    with pytest.raises(normswap.NormSwapError, match="no affine parameters.*pass params='all'"):
        normswap.calibrate(no_affine, plain, [x], steps=1)
    assert normswap.calibrate(no_affine, plain, [x], steps=1, params="all").trained == 8 * 3 * 3 * 3 + 8


def test_an_hf_model_calibrates_from_keyword_batches(digits):
    transformers = pytest.importorskip("transformers")
    (x, y), _ = digits
    config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic",
                                       num_labels=4, num_channels=3)
    torch.manual_seed(0)
    original = _train(transformers.ResNetForImageClassification(config), x, y, steps=10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = normswap.convert(original, "in")
    report = normswap.calibrate(converted, original, [{"pixel_values": b} for b in _batches(x)], steps=20)
    assert report.after.mse < report.before.mse


def test_command_line_calibrates_from_an_image_folder(tmp_path, pretrained, capfd):
    from PIL import Image

    from cli_helpers import in_process

    g = torch.Generator().manual_seed(0)
    for c, name in enumerate(["a", "b"]):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        for i in range(6):
            pixels = (torch.rand(SIZE, SIZE, 3, generator=g) * 255 * (0.3 + 0.7 * c)).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(tmp_path / "imgs" / name / f"{i}.png")
    normswap.save(pretrained, tmp_path / "r.safetensors")
    out = tmp_path / "r_gn_ws.safetensors"
    res = in_process(capfd, "convert", tmp_path / "r.safetensors", "--spec", "gn_ws", "--out", out,
                     "--calibrate", tmp_path / "imgs", "--calibrate-steps", "3", "--calibrate-batch-size", "4")
    assert res.returncode == 0, res.stderr
    assert "calibrated" in res.stdout and "in 3 steps" in res.stdout
    plain = normswap.convert(pretrained, "gn_ws").state_dict()
    loaded = normswap.load(out).state_dict()
    assert any(not torch.equal(loaded[k], plain[k]) for k in plain)
    res = in_process(capfd, "convert", tmp_path / "r.safetensors", "--spec", "gn_ws", "--out", tmp_path / "x.safetensors",
                     "--calibrate-steps", "3")
    assert res.returncode == 2 and "go with --calibrate DATA" in res.stderr


def test_a_recipe_calibrates_before_fine_tuning(tmp_path):
    import pathlib

    from normswap.finetune import finetune, load_config
    from normswap.finetune.recipe import RecipeError

    recipe = pathlib.Path(__file__).resolve().parents[1] / "recipes" / "gn_ws_resnet_microbatch.yaml"
    tiny = ["data=builtin", "model.name=test_resnet", "data.train_size=64", "data.val_size=32", "batch_size=8",
            "plot=false", "max_steps=1", f"output_dir={tmp_path / 'run'}"]
    result = finetune(recipe, [*tiny, "calibrate.steps=3"], progress=False)
    assert result.calibration.steps == 3
    assert (tmp_path / "run" / "calibration.json").is_file()
    with pytest.raises(RecipeError) as err:
        load_config(recipe, [*tiny, "calibrate.budget=3", "calibrate.params=some"])
    assert "calibrate.budget: not a calibrate key" in str(err.value) and "calibrate.params" in str(err.value)
    with pytest.raises(RecipeError, match="needs a convert"):
        load_config(recipe, [*tiny, "convert=null", "calibrate.steps=2"])
