"""The real `normswap` console script, run in a subprocess."""

import shutil
import subprocess
import sys

import pytest

import normswap

EXE = shutil.which("normswap")


def run(*args):
    cmd = [EXE, *args] if EXE else [sys.executable, "-m", "normswap.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_console_script_is_installed():
    assert EXE is not None, "pip install -e . should install the `normswap` console script"


def test_list_prints_one_line_per_spec():
    res = run("list")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines] == list(normswap.list_specs())


def test_list_verbose_shows_options():
    res = run("list", "--verbose")
    assert res.returncode == 0 and "--set groups=<int | None>" in res.stdout


def test_plan_timm_model():
    res = run("plan", "--model", "timm:resnet18", "--spec", "gn_ws", "--set", "groups=16")
    assert res.returncode == 0, res.stderr
    assert "layer1.0.bn1" in res.stdout and "GroupNorm" in res.stdout and "layer1.0.conv1" in res.stdout


def test_plan_hf_config_folder(tmp_path):
    transformers = pytest.importorskip("transformers")
    transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=37).save_pretrained(tmp_path)
    res = run("inspect", "--model", str(tmp_path), "--spec", "rms")
    assert res.returncode == 0, res.stderr
    assert "embeddings.LayerNorm" in res.stdout and "RMSNorm" in res.stdout


def test_bad_usage_exit_code_and_message():
    res = run("plan", "--model", "timm:resnet18", "--spec", "gn_wz")
    assert res.returncode == 2 and "Did you mean 'gn_ws'" in res.stderr and "Traceback" not in res.stderr
    res = run("plan", "--model", "timm:resnet_does_not_exist", "--spec", "gn")
    assert res.returncode == 2 and "timm does not know" in res.stderr
    res = run("plan", "--model", "timm:resnet18", "--spec", "gn", "--set", "groupz=3")
    assert res.returncode == 2 and "unknown option 'groupz'" in res.stderr
