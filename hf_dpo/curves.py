"""The training-curves image of the model card: loss, reward accuracy and reward margin against step."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

CURVES_FILE = "training_curves.png"
# One panel per metric that was logged: (metric key in the log history, panel title).
CURVE_METRICS = (
    ("loss", "DPO loss"),
    ("rewards/accuracies", "Reward accuracy"),
    ("rewards/margins", "Reward margin (chosen - rejected)"),
)


def training_curves_figure(log_history: Sequence[Mapping[str, Any]]):
    """A matplotlib Figure with one panel per metric of CURVE_METRICS that was logged, or None if none was.

    Train points come from the entries holding `loss`, `rewards/accuracies`, `rewards/margins`; eval points
    from `eval_loss`, `eval_rewards/accuracies`, `eval_rewards/margins`. The x axis is the entry's `step`.
    """
    from matplotlib.figure import Figure

    panels = []
    for metric, title in CURVE_METRICS:
        train, evaluation = _series(log_history, metric), _series(log_history, "eval_" + metric)
        if train or evaluation:
            panels.append((metric, title, train, evaluation))
    if not panels:
        return None

    # Figure() without pyplot: no global backend switch, safe in threads and headless runs (Agg on save).
    fig = Figure(figsize=(4.6 * len(panels), 3.6), dpi=100, layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (metric, title, train, evaluation) in zip(axes, panels):
        if train:
            ax.plot(*zip(*train), marker="." if len(train) < 50 else None, label="train")
        if evaluation:
            ax.plot(*zip(*evaluation), marker="o", linestyle="--", label="eval")
        if metric == "rewards/accuracies":
            ax.set_ylim(-0.02, 1.02)
        ax.set(title=title, xlabel="step", ylabel=metric)
        ax.grid(alpha=0.3)
        ax.legend()
    return fig


def plot_training_curves(log_history: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path | None:
    """Draw the curves into a PNG and return its path; None (and no file) if nothing was logged.

    `path` is the PNG's path, or a folder (the run's output_dir) to write `training_curves.png` into.
    `log_history` is the "log_history" list of transformers' trainer_state.json.
    """
    fig = training_curves_figure(log_history)
    if fig is None:
        return None
    path = Path(path)
    if path.is_dir():
        path = path / CURVES_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _series(log_history: Sequence[Mapping[str, Any]], key: str) -> list[tuple[float, float]]:
    points = []
    for entry in log_history:
        value, step = entry.get(key), entry.get("step")
        if isinstance(value, (int, float)) and isinstance(step, (int, float)) and math.isfinite(value):
            points.append((step, float(value)))
    return points
