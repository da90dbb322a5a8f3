"""Loss and learning-rate curves of a stage as a PNG (matplotlib, Agg canvas: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_stage(records: list[dict[str, Any]], path: str | Path, title: str) -> Path:
    """Draw loss (left) and learning rate (right) against the global step from ``metrics.jsonl`` step records."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps = [r["step"] for r in records]
    figure = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(figure)
    loss_axes, lr_axes = figure.subplots(1, 2)
    loss_axes.plot(steps, [r["loss"] for r in records], color="tab:blue", linewidth=1)
    loss_axes.set(title="training loss", xlabel="step", ylabel="loss")
    loss_axes.grid(alpha=0.3)
    for name in sorted({k for r in records for k in r.get("lrs", {}) if not k.endswith(".no_decay")}):
        lr_axes.plot(steps, [r.get("lrs", {}).get(name) for r in records], label=name, linewidth=1)
    lr_axes.set(title="learning rate", xlabel="step", ylabel="lr")
    lr_axes.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    lr_axes.grid(alpha=0.3)
    if lr_axes.get_legend_handles_labels()[0]:
        lr_axes.legend(fontsize="small")
    figure.suptitle(title)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path
