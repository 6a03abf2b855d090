"""The `normswap` command line: the real console script once per subcommand (a subprocess), the rest
through ``cli.main`` in this process, with file descriptors 1 and 2 captured."""

import pathlib

import pytest
import torch

import normswap
from cli_helpers import EXE, console, in_process


@pytest.fixture
def run(capfd):
    return lambda *args: in_process(capfd, *args)


def test_console_script_is_installed():
    assert EXE is not None, "pip install -e . should install the `normswap` console script"


def test_list_prints_one_line_per_spec():
    res = console("list")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines] == list(normswap.list_specs())


def test_list_verbose_shows_options(run):
    res = run("list", "--verbose")
    assert res.returncode == 0 and "--set groups=<int | None (>= 1)>" in res.stdout


def test_plan_timm_model():
    res = console("plan", "--model", "timm:resnet18", "--spec", "gn_ws", "--set", "groups=16")
    assert res.returncode == 0, res.stderr
    assert "layer1.0.bn1" in res.stdout and "GroupNorm" in res.stdout and "layer1.0.conv1" in res.stdout


def test_plan_hf_config_folder(tmp_path, run):
    transformers = pytest.importorskip("transformers")
    transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=37).save_pretrained(tmp_path)
    res = run("plan", "--model", str(tmp_path), "--spec", "rms")
    assert res.returncode == 0, res.stderr
    assert "embeddings.LayerNorm" in res.stdout and "RMSNorm" in res.stdout


def test_bad_usage_exit_code_and_message(run):
    res = run("plan", "--model", "timm:resnet18", "--spec", "gn_wz")
    assert res.returncode == 2 and "Did you mean 'gn_ws'" in res.stderr and "Traceback" not in res.stderr
    res = run("plan", "--model", "timm:resnet_does_not_exist", "--spec", "gn")
    assert res.returncode == 2 and "timm does not know" in res.stderr
    res = run("plan", "--model", "timm:resnet18", "--spec", "gn", "--set", "groupz=3")
    assert res.returncode == 2 and "unknown option 'groupz'" in res.stderr


# ------------------------------------------------------------------------------ convert / inspect (issue 4)


@pytest.fixture(scope="module")
def r18_pth(tmp_path_factory):
    """A training-style timm checkpoint: nested under "state_dict", DDP "module." prefix, 10 classes."""
    timm = pytest.importorskip("timm")
    model = timm.create_model("test_resnet", pretrained=False, num_classes=10).eval()
    path = tmp_path_factory.mktemp("ckpt") / "train.pth"
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
    return model, path


def test_convert_through_the_console_script_and_load_back(r18_pth, tmp_path, run):
    model, src = r18_pth
    out = tmp_path / "out" / "gn_ws.safetensors"
    res = console("convert", str(src), "--model", "timm:test_resnet", "--model-arg", "num_classes=10",
              "--spec", "gn_ws", "--set", "groups=8", "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert "wrote" in res.stdout and "norms replaced" in res.stdout and "running statistics" in res.stdout
    assert "converting train.pth" in res.stderr  # the progress line (one summary line when not a terminal)
    loaded = normswap.load(out)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded.eval()(x), normswap.convert(model, "gn_ws", groups=8).eval()(x), rtol=0, atol=0)
    res = run("inspect", str(out))
    assert res.returncode == 0 and "converted with spec gn_ws" in res.stdout and "GroupNorm" in res.stdout

    # again: the output exists -> bad usage without --force, replaced with it; --quiet prints nothing
    res = run("convert", str(src), "--model", "timm:test_resnet", "--model-arg", "num_classes=10", "--spec", "gn",
              "--out", str(out))
    assert res.returncode == 2 and "already exists; pass --force" in res.stderr
    res = run("convert", str(src), "--model", "timm:test_resnet", "--model-arg", "num_classes=10", "--spec", "gn",
              "--out", str(out), "--force", "--quiet")
    assert res.returncode == 0 and res.stdout == "" and res.stderr == ""


def test_convert_hf_folder_to_folder(tmp_path, run):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=37)
    original = transformers.BertForMaskedLM(config).eval()
    original.save_pretrained(tmp_path / "bert")
    res = run("convert", str(tmp_path / "bert"), "--spec", "rms", "--out", str(tmp_path / "bert-rms"), "-q")
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""  # --quiet also silences transformers' own progress bar
    loaded = normswap.load(tmp_path / "bert-rms")
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(ids).logits, normswap.convert(original, "rms")(ids).logits,
                                   rtol=0, atol=0)


def test_convert_exit_codes_for_bad_input(r18_pth, tmp_path, run):
    model, src = r18_pth
    out = str(tmp_path / "o.safetensors")
    res = run("convert", str(tmp_path / "missing.pth"), "--model", "timm:test_resnet", "--spec", "gn", "--out", out)
    assert res.returncode == 2 and "missing.pth: no such file" in res.stderr
    res = run("convert", str(src), "--model", "timm:test_resnet", "--spec", "gm", "--out", out)
    assert res.returncode == 2 and "unknown spec 'gm'" in res.stderr
    res = run("convert", str(src), "--model", "timm:test_resnet", "--spec", "gn", "--out", out)  # 1000 vs 10 classes
    assert res.returncode == 1 and "num_classes=10" in res.stderr and "Traceback" not in res.stderr
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    res = run("convert", str(corrupt), "--model", "timm:test_resnet", "--spec", "gn", "--out", out)
    assert res.returncode == 1 and "corrupt.safetensors: not a readable safetensors file" in res.stderr
    res = run("convert", str(src), "--model", "timm:test_resnet", "--spec", "gn", "--out", str(src), "--force")
    assert res.returncode == 2 and "not pickles" in res.stderr  # and never the input, even with --force
    assert not (tmp_path / "o.safetensors").exists()


class _Touch:
    """Pickled, it would call ``pathlib.Path.touch`` on load: a file that runs code."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


def test_convert_refuses_malicious_pickle(tmp_path, run):
    marker = tmp_path / "pwned"
    payload = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "p": _Touch(marker)}, payload)
    res = run("convert", str(payload), "--model", "timm:test_resnet", "--spec", "gn",
              "--out", str(tmp_path / "o.safetensors"))
    assert res.returncode == 1 and "refused" in res.stderr and "weights_only=True" in res.stderr
    assert not marker.exists() and not (tmp_path / "o.safetensors").exists()


def test_inspect_a_model_name_and_help_documents_exit_codes(run):
    res = console("inspect", "timm:test_efficientnet")
    assert res.returncode == 0 and "BatchNormAct2d" in res.stdout and "SiLU" in res.stdout
    res = run("convert", "--help")
    assert res.returncode == 0 and "exit codes: 0 ok, 1 failure" in res.stdout


def test_a_closed_pipe_is_not_an_error(monkeypatch, capsys):
    """`normswap list --verbose | head -1`: the reader closed the pipe; exit 0 and say nothing."""
    from normswap import cli

    class ClosedPipe:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            pass

    monkeypatch.setattr("sys.stdout", ClosedPipe())
    assert cli.main(["list", "--verbose"]) == 0
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("option,value,allowed", [("groups", "0", ">= 1"), ("groups", "-4", ">= 1"),
                                                  ("group_size", "0", ">= 1"), ("eps", "-1.0", ">= 0")])
def test_nonsense_options_are_refused_with_the_allowed_range(run, option, value, allowed):
    res = run("plan", "--model", "timm:test_resnet", "--spec", "gn_ws", "--set", f"{option}={value}")
    assert res.returncode == 2 and f"option {option!r}" in res.stderr and allowed in res.stderr
    with pytest.raises(normswap.OptionError, match=allowed):
        normswap.plan(torch.nn.BatchNorm2d(8), "gn", **{option: float(value) if "." in value else int(value)})


def test_every_failure_is_one_error_line_and_warnings_show_once(run, tmp_path, monkeypatch):
    """A library error in the middle of writing (disk full while safetensors writes) is one `normswap: error:`
    line with exit 1, not a traceback; a warning is one `normswap: warning:` line, shown once."""
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    save_file(timm.create_model("test_vit", pretrained=False).state_dict(), str(tmp_path / "vit.safetensors"))
    res = run("convert", str(tmp_path / "vit.safetensors"), "--model", "timm:test_vit", "--spec", "gn_ws",
              "--out", str(tmp_path / "out.safetensors"), "-q")
    assert res.returncode == 0
    lines = res.stderr.splitlines()
    assert [ln for ln in lines if "nothing to convert" in ln] == [
        next(ln for ln in lines if ln.startswith("normswap: warning: nothing to convert"))]
    assert "warnings.warn" not in res.stderr and "UserWarning" not in res.stderr

    def disk_full(*args, **kwargs):
        raise RuntimeError("No space left on device (os error 28)")

    monkeypatch.setattr("normswap.checkpoints.writers.write_safetensors", disk_full)
    res = run("convert", str(tmp_path / "vit.safetensors"), "--model", "timm:test_vit", "--spec", "rms",
              "--out", str(tmp_path / "rms.safetensors"), "-q")
    assert res.returncode == 1 and res.stderr.strip().splitlines() == [
        "normswap: error: RuntimeError: No space left on device (os error 28) (NORMSWAP_DEBUG=1 shows the traceback)"]
    assert not (tmp_path / "rms.safetensors").exists()
