"""The training-curves image of the model card: loss, reward accuracy and reward margin against step."""

import math
import os
from pathlib import Path

CURVES_FILE = "training_curves.png"
# One panel per metric that was logged: (key in transformers' log history, panel title); eval_<key> too.
CURVE_METRICS = (("loss", "DPO loss"), ("rewards/accuracies", "Reward accuracy"))
CURVE_METRICS += (("rewards/margins", "Reward margin (chosen - rejected)"),)


def training_curves_figure(log_history: list[dict]):
    """A matplotlib Figure, a panel per logged metric of CURVE_METRICS (train, eval against step), or None."""
    from matplotlib.figure import Figure

    def points(key: str) -> list[tuple[float, float]]:
        return [(e["step"], e[key]) for e in log_history if math.isfinite(e.get(key, math.nan))]

    panels = [(key, title, points(key), points("eval_" + key)) for key, title in CURVE_METRICS]
    panels = [panel for panel in panels if panel[2] or panel[3]]
    if not panels:
        return None
    # Figure() without pyplot: no global backend switch, safe in threads and headless runs (Agg on save).
    figure = Figure(figsize=(4.6 * len(panels), 3.6), dpi=100, layout="constrained")
    for ax, (key, title, train, evaluation) in zip(figure.subplots(1, len(panels), squeeze=False)[0], panels):
        if train:
            ax.plot(*zip(*train), marker="." if len(train) < 50 else None, label="train")
        if evaluation:
            ax.plot(*zip(*evaluation), marker="o", linestyle="--", label="eval")
        if key == "rewards/accuracies":
            ax.set_ylim(-0.02, 1.02)
        ax.set(title=title, xlabel="step", ylabel=key)
        ax.grid(alpha=0.3)
        ax.legend()
    return figure


def plot_training_curves(log_history: list[dict], path: str | os.PathLike) -> Path | None:
    """Draw `log_history` into the PNG `path` (or `path`/training_curves.png); None, and no file, if no curve."""
    if (figure := training_curves_figure(log_history)) is None:
        return None
    path = Path(path) / CURVES_FILE if Path(path).is_dir() else Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path
