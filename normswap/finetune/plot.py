"""The PNG plot of a run: training loss and accuracy, validation loss and accuracy, by step (matplotlib)."""

from __future__ import annotations

import json
import pathlib
import warnings

from ..io.atomic import atomic_output


def plot_metrics(metrics: pathlib.Path, out: pathlib.Path) -> pathlib.Path | None:
    """Plot ``metrics.jsonl`` into ``out`` (written atomically); ``None`` with a warning without matplotlib.

    Example:
        >>> plot_metrics(pathlib.Path("runs/x/metrics.jsonl"), pathlib.Path("runs/x/metrics.png"))  # doctest: +SKIP
    """
    try:
        # a Figure of its own, drawn by the Agg canvas: pyplot and the process-wide backend (a notebook's) untouched
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        warnings.warn("normswap: matplotlib is not installed, so no plot was drawn (pip install matplotlib)",
                      UserWarning, stacklevel=2)
        return None
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line]
    train = [r for r in rows if "loss" in r]
    val = [r for r in rows if "val_loss" in r]
    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    ax_loss, ax_acc = fig.subplots(1, 2)
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    ax_loss.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    ax_loss.set(xlabel="step", ylabel="loss", title="loss")
    ax_acc.plot([r["step"] for r in train], [r["train_accuracy"] for r in train], label="train")
    ax_acc.plot([r["step"] for r in val], [r["val_accuracy"] for r in val], "o-", label="validation")
    ax_acc.set(xlabel="step", ylabel="accuracy", title="accuracy", ylim=(0, 1))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(metrics.parent.name)
    fig.tight_layout()
    with atomic_output(out, force=True) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return out
