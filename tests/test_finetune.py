"""Recipes and the fine-tuning runner: validation, end-to-end runs on tiny models, resume, DDP, bad input."""

import json
import pathlib
import shutil
import subprocess

import pytest
import torch
import yaml

import normswap
from normswap.finetune import RecipeError, finetune, load_config
from normswap.finetune import runner as runner_mod
from normswap.finetune import state as state_mod
from cli_helpers import console, in_process

pytest.importorskip("timm")
pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = pathlib.Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
TINY_IMAGE = ["data=builtin", "model.name=test_resnet", "data.train_size=64", "data.val_size=32", "batch_size=4",
              "log_every=1", "plot=false"]
TINY_TEXT = ["data=builtin", "data.train_size=64", "data.val_size=32", "batch_size=4", "log_every=1", "plot=false",
             "model.config.hidden_size=32", "model.config.intermediate_size=37", "model.config.num_hidden_layers=1"]


def image_run(tmp_path, *extra, name="run"):
    return finetune(ROOT / "recipes/gn_ws_resnet_microbatch.yaml",
                    [*TINY_IMAGE, f"output_dir={tmp_path / name}", *extra], progress=False)


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------------------------- recipes


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_recipe_validates_and_starts_with_its_command(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith(f"# normswap finetune recipes/{path.name}"), first
    cfg = load_config(path)
    assert cfg["output_dir"] and cfg["model"]["_component_"]
    load_config(path, ["data=builtin", "max_steps=3"])


def test_recipe_problems_are_reported_all_at_once(tmp_path):
    recipe = {
        "output_dir": str(tmp_path / "x"), "max_stepz": 3, "precision": "fp8", "batch_size": 0,
        "model": {"_component_": "timm", "name": "resnet18"},
        "convert": {"spec": "gn_wz"},
        "data": {"_component_": "builtin", "image_sise": 32},
        "optimizer": {"_component_": "torch.optim.SGD", "lr": 0.1, "momentun": 0.9},
        "scheduler": {"_component_": "cosin"},
        "clip": {"mode": "agc", "clip_factr": 0.1},
    }
    with pytest.raises(RecipeError) as err:
        load_config(recipe)
    problems = err.value.problems
    expected = ["max_stepz: not a recipe key", "precision: expected one of", "batch_size: must be >= 1",
                "convert: unknown spec 'gn_wz'", "data.image_sise: not an argument", "optimizer.momentun",
                "scheduler._component_: unknown scheduler component 'cosin'", "clip.clip_factr"]
    for text in expected:
        assert any(p.startswith(text) or text in p for p in problems), (text, problems)
    assert "Did you mean 'momentum'" in str(err.value) and "Did you mean 'max_steps'" in str(err.value)
    assert not (tmp_path / "x").exists()
    # an unknown model is reported together with the other problems
    recipe["model"]["name"] = "resnet_nope"
    with pytest.raises(RecipeError) as err:
        load_config(recipe)
    assert any("timm does not know the model 'resnet_nope'" in p for p in err.value.problems)
    assert any(p.startswith("optimizer.momentun") for p in err.value.problems)


@pytest.mark.parametrize("override,message", [
    ("model.name=resnet_nope", "timm does not know the model 'resnet_nope'"),
    ("optimizer.betas=[0.9, 0.99]", "optimizer.betas: not an argument of SGD"),
    ("data._component_=image_folder", "data.path: required"),
    ("resume=/nonexistent/run", "resume: /nonexistent/run does not exist"),
])
def test_bad_recipe_input_fails_before_training(tmp_path, override, message):
    with pytest.raises(RecipeError, match=message.replace("[", r"\[")):
        image_run(tmp_path, override)
    assert not (tmp_path / "run").exists()


def test_missing_data_path_and_wrong_columns(tmp_path):
    with pytest.raises(RecipeError, match="data: data.path: .*missing-folder is not a folder"):
        image_run(tmp_path, "data=image_folder", f"data.path={tmp_path / 'missing-folder'}")
    table = tmp_path / "train.csv"
    table.write_text("sentence,target\nhello world,1\nbye world,0\n")
    (tmp_path / "tok").mkdir()
    with pytest.raises(RecipeError, match=r"has no column 'text', 'label'; its columns are \['sentence', 'target'\]"):
        finetune(ROOT / "recipes/bert_rms_text.yaml", [*TINY_TEXT, f"output_dir={tmp_path / 'run'}",
                                                         "data=text_table", f"data.path={table}",
                                                         f"data.tokenizer={tmp_path / 'tok'}"], progress=False)


# -------------------------------------------------------------------------------------------- end to end


def test_image_recipe_end_to_end(tmp_path):
    result = image_run(tmp_path, "max_steps=6", "eval_every=3", "checkpoint_every=3", "plot=true")
    out = tmp_path / "run"
    rows = metrics(out)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in rows if "val_accuracy" in r] == [3, 6]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows if "loss" in r)
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["max_steps"] == 6 and resolved["model"]["name"] == "test_resnet"
    assert json.loads((out / "checkpoints/latest.json").read_text())["checkpoint"] == "step_0000006"
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_0000003", "step_0000006"]
    if result.plot is not None:
        assert result.plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    loaded = normswap.load(out / "checkpoints/step_0000006/model.safetensors")
    assert type(loaded.bn1).__name__ == "GroupNorm"
    assert result.final["val_accuracy"] == rows[-1]["val_accuracy"]


def test_text_recipe_end_to_end_and_loss_falls(tmp_path):
    result = finetune(ROOT / "recipes/bert_rms_text.yaml",
                      [*TINY_TEXT, f"output_dir={tmp_path / 'run'}", "max_steps=40", "optimizer.lr=0.003",
                       "scheduler.warmup_steps=2"], progress=False)
    losses = [r["loss"] for r in metrics(tmp_path / "run") if "loss" in r]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    loaded = normswap.load(result.checkpoint / "model.safetensors")
    assert type(loaded.bert.embeddings.LayerNorm).__name__ == "RMSNorm"


def _interrupt_at(monkeypatch, at_step):
    real = runner_mod.TrainingRun.train_step

    def train_step(self):
        if self.step == at_step:
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(runner_mod.TrainingRun, "train_step", train_step)


@pytest.mark.parametrize("kind", ["image", "text"])
def test_resume_continues_bit_exactly(tmp_path, monkeypatch, kind):
    """Stop a run after its step-4 checkpoint, resume it, and compare with an uninterrupted run.

    The text model has dropout, so its random state must be restored too; the image run uses fp16
    autocast with a grad scaler and gradient accumulation."""
    if kind == "image":
        recipe, base = ROOT / "recipes/gn_ws_resnet_microbatch.yaml", [*TINY_IMAGE, "grad_accum=2"]
    else:
        recipe, base = ROOT / "recipes/bert_rms_text.yaml", TINY_TEXT
    common = [*base, "max_steps=7", "checkpoint_every=4", "eval_every=0"]
    full = finetune(recipe, [*common, f"output_dir={tmp_path / 'full'}"], progress=False)
    with monkeypatch.context() as m:
        _interrupt_at(m, 5)
        with pytest.raises(KeyboardInterrupt):
            finetune(recipe, [*common, f"output_dir={tmp_path / 'cut'}"], progress=False)
    assert json.loads((tmp_path / "cut/checkpoints/latest.json").read_text())["step"] == 4
    resumed = finetune(recipe, [*common, f"output_dir={tmp_path / 'cut'}", f"resume={tmp_path / 'cut'}"],
                       progress=False)
    a = normswap.load(full.checkpoint / "model.safetensors").state_dict()
    b = normswap.load(resumed.checkpoint / "model.safetensors").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    drop = ("seconds",)
    strip = [{k: v for k, v in r.items() if k not in drop} for r in metrics(tmp_path / "full")]
    assert strip == [{k: v for k, v in r.items() if k not in drop} for r in metrics(tmp_path / "cut")]


def test_interrupted_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    real_save = torch.save
    calls = {"n": 0}

    def dying_save(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint: killed half way through its trainer state
            pathlib.Path(f).write_bytes(b"partial")
            raise KeyboardInterrupt
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(state_mod.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        image_run(tmp_path, "max_steps=6", "checkpoint_every=2")
    folder = tmp_path / "run/checkpoints"
    assert json.loads((folder / "latest.json").read_text())["checkpoint"] == "step_0000002"
    assert sorted(p.name for p in folder.iterdir()) == ["latest.json", "step_0000002"]
    assert state_mod.find_checkpoint(tmp_path / "run") == folder / "step_0000002"


def test_grad_accumulation_matches_a_larger_batch(tmp_path):
    """GroupNorm is batch-independent, so 2 micro-batches of 2 give the gradient of one batch of 4."""
    a = image_run(tmp_path, "max_steps=3", "batch_size=4", "grad_accum=1", "optimizer.momentum=0.0", name="a")
    b = image_run(tmp_path, "max_steps=3", "batch_size=2", "grad_accum=2", "optimizer.momentum=0.0", name="b")
    sa = normswap.load(a.checkpoint / "model.safetensors").state_dict()
    sb = normswap.load(b.checkpoint / "model.safetensors").state_dict()
    # the two runs read different samples (a batch of 4 vs two of 2 from the same permutation): same ones
    assert all(torch.allclose(sa[k], sb[k], rtol=1e-4, atol=1e-5) for k in sa)


@pytest.mark.parametrize("extra", [["precision=bf16"], ["precision=fp16"], ["channels_last=true"]])
def test_precision_and_memory_format_options_train(tmp_path, extra):
    result = image_run(tmp_path, "max_steps=3", *extra)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in metrics(result.output_dir) if "loss" in r)


def test_regularized_recipe_logs_penalty(tmp_path):
    finetune(ROOT / "recipes/orthogonal_clip_resnet.yaml", [*TINY_IMAGE, f"output_dir={tmp_path / 'run'}",
                                                            "max_steps=4", "orthogonal.every=2"], progress=False)
    rows = [r for r in metrics(tmp_path / "run") if "loss" in r]
    penalties = [r["orthogonal_penalty"] for r in rows]
    assert penalties[0] > 0 and penalties[1] is None and penalties[2] > 0  # applied every second step
    assert all(r["grad_norm"] > 0 for r in rows)


# ------------------------------------------------------------------------------------- processes and CLI


@pytest.mark.long
def test_torchrun_two_processes_gloo_end_with_identical_weights(tmp_path):
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not on PATH")
    out = tmp_path / "ddp"
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "normswap.cli", "finetune",
           str(ROOT / "recipes/gn_ws_resnet_microbatch.yaml"), *TINY_IMAGE, f"output_dir={out}", "max_steps=4",
           "checkpoint_every=2"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    ranks = json.loads((out / "ranks.json").read_text())
    assert ranks["world"] == 2 and ranks["agree"] and len(set(ranks["weights_sha256"])) == 1
    # the samples were split: two processes read batches of their own
    assert (out / "checkpoints/step_0000004/model.safetensors").is_file()


@pytest.mark.long
def test_torchrun_fsdp_matches_ddp(tmp_path):
    """FSDP (fully_shard) on 2 gloo processes trains to the weights DDP reaches (up to reduction order)."""
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not on PATH")
    results = {}
    for mode in ("ddp", "fsdp"):
        out = tmp_path / mode
        cmd = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "normswap.cli", "finetune",
               str(ROOT / "recipes/gn_ws_resnet_microbatch.yaml"), *TINY_IMAGE, f"output_dir={out}", "max_steps=3",
               f"distributed={mode}", "clip=null", "-q"]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                             env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
        assert res.returncode == 0, res.stderr[-3000:]
        results[mode] = normswap.load(out / "checkpoints/step_0000003/model.safetensors").state_dict()
    for k, v in results["ddp"].items():
        torch.testing.assert_close(results["fsdp"][k], v, rtol=1e-4, atol=1e-5)
    with pytest.raises(RecipeError, match="clip: not supported with distributed=fsdp"):
        load_config(ROOT / "recipes/gn_ws_resnet_microbatch.yaml", ["distributed=fsdp"])


def test_cli_finetune_validate_only_and_errors(tmp_path, capfd):
    recipe = str(ROOT / "recipes/gn_ws_resnet_microbatch.yaml")
    res = in_process(capfd, "finetune", recipe, "--validate-only")
    assert res.returncode == 0 and "valid" in res.stdout
    res = in_process(capfd, "finetune", recipe, "--validate-only", "optimizer.lrr=1", "max_steps=-1")
    assert res.returncode == 2 and "2 problem(s)" in res.stderr and "optimizer.lrr" in res.stderr
    res = console("finetune", recipe, *TINY_IMAGE, f"output_dir={tmp_path / 'cli'}", "max_steps=2", "--quiet")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "cli/metrics.jsonl").is_file()


# ------------------------------------------------------------------------------------------ user data


def test_image_folder_data_end_to_end(tmp_path):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for c, name in enumerate(["cats", "dogs"]):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        for i in range(6):
            pixels = (torch.rand(20, 28, 3, generator=g) * 255 * (0.3 + 0.7 * c)).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(tmp_path / "imgs" / name / f"{i}.png")
    result = image_run(tmp_path, "data=image_folder", f"data.path={tmp_path / 'imgs'}", "data.image_size=16",
                       "data.val_fraction=0.25", "max_steps=3")
    assert result.final["val_accuracy"] >= 0 and normswap.load(result.checkpoint / "model.safetensors").num_classes == 2


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_text_table_with_local_tokenizer_end_to_end(tmp_path, suffix):
    transformers = pytest.importorskip("transformers")
    words = ["good", "great", "fine", "bad", "awful", "poor", "movie", "plot", "the", "was"]
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(tmp_path / "tok")
    rows = [{"review": f"the movie was {w}", "sentiment": "pos" if i < 3 else "neg"} for i, w in enumerate(words[:6])] * 4
    table = tmp_path / f"reviews{suffix}"
    if suffix == ".csv":
        table.write_text("review,sentiment\n" + "".join(f"{r['review']},{r['sentiment']}\n" for r in rows))
    else:
        table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = finetune(ROOT / "recipes/bert_rms_text.yaml",
                      [*TINY_TEXT, f"output_dir={tmp_path / 'run'}", "data=text_table", f"data.path={table}",
                       f"data.tokenizer={tmp_path / 'tok'}", "data.text_column=review",
                       "data.label_column=sentiment", "data.max_length=8", "max_steps=3"], progress=False)
    model = normswap.load(result.checkpoint / "model.safetensors")
    assert model.config.num_labels == 2 and type(model.bert.embeddings.LayerNorm).__name__ == "RMSNorm"


def test_init_from_a_checkpoint_of_the_original_model(tmp_path):
    """Fine-tuning starts from given weights: an original (BatchNorm) checkpoint loads into the model
    before conversion, so its affine weights carry over."""
    timm = pytest.importorskip("timm")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    base = timm.create_model("test_resnet", pretrained=False, num_classes=10)
    with torch.no_grad():
        base.bn1.weight.fill_(0.5)
    safetensors_torch.save_file(base.state_dict(), tmp_path / "base.safetensors")
    result = image_run(tmp_path, f"init_from={tmp_path / 'base.safetensors'}", "max_steps=1", "optimizer.lr=0.0",
                       "clip=null")
    loaded = normswap.load(result.checkpoint / "model.safetensors")
    assert torch.equal(loaded.bn1.weight, base.bn1.weight)


@pytest.mark.long
def test_compile_option_trains_like_eager(tmp_path):
    eager = image_run(tmp_path, "max_steps=2", "eval_batches=1", name="eager")
    compiled = image_run(tmp_path, "max_steps=2", "eval_batches=1", "compile=true", name="compiled")
    a = normswap.load(eager.checkpoint / "model.safetensors").state_dict()
    b = normswap.load(compiled.checkpoint / "model.safetensors").state_dict()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-4)


def test_a_new_run_never_replaces_a_finished_one(tmp_path):
    """A second run into the same output_dir is refused (it would replace the metrics and checkpoints);
    resume= continues it instead; the first run's files are untouched by the refusal."""
    first = image_run(tmp_path, "max_steps=2")
    before = {p: p.read_bytes() for p in first.output_dir.rglob("*") if p.is_file()}
    with pytest.raises(RecipeError, match="already holds a run"):
        image_run(tmp_path, "max_steps=2")
    assert {p: p.read_bytes() for p in first.output_dir.rglob("*") if p.is_file()} == before
    resumed = image_run(tmp_path, "max_steps=3", f"resume={first.output_dir}")
    assert resumed.steps == 3


def test_validation_calls_and_imports_nothing_a_recipe_names(tmp_path, monkeypatch):
    """`--validate-only` checks components by signature: `os.system` as the model is not called, and a module
    of the working directory (on the path under `python -m`) is named as a problem, not imported."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "local_models.py").write_text("import pathlib\npathlib.Path('IMPORTED').touch()\n"
                                              "def make():\n    pathlib.Path('CALLED').touch()\n")
    marker = tmp_path / "RAN"
    shell = {"output_dir": str(tmp_path / "run"), "data": {"_component_": "builtin"},
             "model": {"_component_": "os.system", "command": f"touch {marker}"}}
    load_config(shell)
    local = {**shell, "model": {"_component_": "local_models.make"}}
    with pytest.raises(RecipeError, match="validation imports only installed packages"):
        load_config(local)
    assert not marker.exists() and not (tmp_path / "IMPORTED").exists() and not (tmp_path / "CALLED").exists()
    timm_file = {**shell, "model": {"_component_": "timm", "name": "test_resnet", "checkpoint_path": "/etc/passwd"}}
    with pytest.raises(RecipeError, match="model.checkpoint_path: makes timm read a file"):
        load_config(timm_file)


def test_overrides_and_set_values_share_one_typed_parser():
    """`optimizer.lr=1e-6` is a float (YAML 1.1 left the string '1e-6', and the run died in torch.optim); a
    value that does not fit the component's annotation is a problem with its key path."""
    cfg = load_config(ROOT / "recipes/gn_ws_resnet_microbatch.yaml", [*TINY_IMAGE, "output_dir=x", "optimizer.lr=1e-6"])
    assert cfg["optimizer"]["lr"] == 1e-6
    with pytest.raises(RecipeError, match="optimizer.lr: SGD takes float"):
        load_config(ROOT / "recipes/gn_ws_resnet_microbatch.yaml", [*TINY_IMAGE, "output_dir=x", "optimizer.lr='fast'"])


def test_the_plot_leaves_the_process_matplotlib_backend_alone(tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    from normswap.finetune.plot import plot_metrics

    before = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0, "train_accuracy": 0.1}\n'
                                                '{"step": 1, "val_loss": 2.1, "val_accuracy": 0.2}\n')
        assert plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG"
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)


def test_validate_leaves_the_callers_output_field_alone():
    from normswap import inputs

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    normswap.validate(model, normswap.convert(model, "gn", groups=2), torch.randn(2, 3, 6, 6), checks=["finite"],
                      output="logits")
    assert inputs.OUTPUT_FIELD.get() is None
