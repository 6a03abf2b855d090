"""The benchmark scripts run (figures are not checked: timings are not tests). A GPU is lent rarely and
briefly, so ``benchmarks/suite.py`` is run here with tiny shapes in fp32 and bf16 (``--smoke``): every
layer row, baseline and table the CUDA run takes must work before the device does."""

import pathlib
import re
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.long


def test_the_suite_runs_every_layer_row_in_both_dtypes(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import suite
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    out = tmp_path / "bench.md"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "suite.py"), "--smoke", "--skip", "models",
                             "--skip", "bert", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    table = out.read_text()
    names = [case[0] for case in suite.layer_cases(torch.device("cpu"), smoke=True)]
    for dtype in ("float32", "bfloat16"):
        rows = [line for line in table.splitlines() if re.search(rf"\| {dtype} \| [0-9.]+ \| [0-9.]+ \|", line)]
        assert [row.split(" | ")[0].lstrip("| ") for row in rows] == names
    assert "split/cat" in table and "reshaped batch" in table
    assert "nn.GroupNorm, contiguous input" in table and "nn.GroupNorm, channels_last input" in table


def test_compare_revisions_times_both_sides():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compare_revisions.py"), "--base", "HEAD",
                             "--rounds", "1", "--repeat", "1"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert result.stdout.count("| RMSNorm 8x128x768") == 2
    worktrees = subprocess.run(["git", "-C", str(ROOT), "worktree", "list"], capture_output=True, text=True).stdout
    assert "normswap-base-" not in worktrees  # its temporary checkout is gone
