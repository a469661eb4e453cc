"""The loss plot of a run: training and validation loss against tokens trained on, from metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from smallm.checkpoint import atomic_file


def read_metrics(path) -> list[dict]:
    """The rows of a metrics.jsonl; a half-written last line (a killed run) is skipped."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def plot_losses(metrics_path, png_path) -> None:
    """Draw train loss (every logged step) and the evaluations' train and validation loss against tokens,
    and write the PNG atomically (WriteFailed if it cannot be written). Uses the Agg canvas directly: no
    display, no global pyplot state."""
    rows = read_metrics(metrics_path)
    train = [(r["tokens"], r["loss"]) for r in rows if "loss" in r and "tokens" in r]
    evals = [r for r in rows if "val_loss" in r and "tokens" in r]

    fig = Figure(figsize=(8, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if train:
        ax.plot(
            *zip(*train, strict=True), color="tab:blue", alpha=0.4, linewidth=1, label="train (logged steps)"
        )
    if evals:
        tokens = [r["tokens"] for r in evals]
        ax.plot(tokens, [r["train_loss"] for r in evals], "o-", color="tab:blue", label="train (eval)")
        ax.plot(tokens, [r["val_loss"] for r in evals], "o-", color="tab:orange", label="validation (eval)")
    ax.set_xlabel("tokens trained on")
    ax.set_ylabel("cross-entropy loss (nats/token)")
    ax.grid(True, alpha=0.3)
    if train or evals:
        ax.legend()
    fig.tight_layout()

    with atomic_file(png_path, suffix=".png") as tmp:  # savefig picks the format from the suffix
        fig.savefig(tmp)
