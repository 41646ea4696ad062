"""Tests of hf_dpo.curves: the training-curves PNG of the model card."""

from __future__ import annotations

import json
import subprocess
import sys

from hf_dpo.curves import plot_training_curves, training_curves_figure

LOG_HISTORY = [
    {"loss": 0.6931, "rewards/accuracies": 0.0, "rewards/margins": 0.0, "learning_rate": 5e-5, "step": 2},
    {"loss": 0.6810, "rewards/accuracies": 0.5, "rewards/margins": 0.021, "learning_rate": 4e-5, "step": 4},
    {"eval_loss": 0.6850, "eval_rewards/accuracies": 0.5, "eval_rewards/margins": 0.01, "step": 5},
    {"loss": 0.6702, "rewards/accuracies": 0.75, "rewards/margins": 0.035, "learning_rate": 3e-5, "step": 6},
    {
        "loss": 0.6523,
        "rewards/accuracies": 0.625,
        "rewards/margins": 0.0417,
        "learning_rate": 1e-5,
        "step": 10,
    },
    {"eval_loss": 0.6412, "eval_rewards/accuracies": 0.75, "eval_rewards/margins": 0.0531, "step": 10},
    {"train_runtime": 12.3, "train_loss": 0.6523, "epoch": 1.0, "step": 10},
]


def test_three_panels_with_train_and_eval_lines_at_the_logged_steps():
    figure = training_curves_figure(LOG_HISTORY)
    assert [ax.get_title() for ax in figure.axes] == [
        "DPO loss",
        "Reward accuracy",
        "Reward margin (chosen - rejected)",
    ]
    for ax, key in zip(figure.axes, ("loss", "rewards/accuracies", "rewards/margins")):
        train, evaluation = ax.get_lines()
        assert list(train.get_xdata()) == [2, 4, 6, 10]
        assert list(train.get_ydata()) == [e[key] for e in LOG_HISTORY if key in e]
        assert list(evaluation.get_xdata()) == [5, 10]
        assert list(evaluation.get_ydata()) == [e["eval_" + key] for e in LOG_HISTORY if "eval_" + key in e]
    assert figure.axes[1].get_ylim() == (-0.02, 1.02)  # accuracy is a fraction


def test_only_the_logged_metrics_get_a_panel():
    figure = training_curves_figure([{"loss": 0.69, "step": 1}, {"loss": float("nan"), "step": 2}])
    assert len(figure.axes) == 1
    assert list(figure.axes[0].get_lines()[0].get_xdata()) == [1]  # a non-finite value is not drawn


def test_plot_training_curves_writes_a_three_panel_png(tmp_path):
    path = plot_training_curves(LOG_HISTORY, tmp_path)
    assert path == tmp_path / "training_curves.png"
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > 2.5 * height  # three panels side by side
    assert len(data) > 10_000
    assert (
        plot_training_curves(LOG_HISTORY, tmp_path / "sub" / "curves.png") == tmp_path / "sub" / "curves.png"
    )


def test_nothing_logged_gives_no_file(tmp_path):
    assert plot_training_curves([], tmp_path) is None
    assert plot_training_curves([{"train_runtime": 1.0, "train_loss": 0.69, "step": 1}], tmp_path) is None
    assert list(tmp_path.iterdir()) == []


def test_drawing_never_imports_pyplot(tmp_path):
    """pyplot would pick a global backend (and a GUI one on a desktop): the Figure is drawn without it."""
    code = (
        "import json, sys\nfrom hf_dpo.curves import plot_training_curves\n"
        f"assert plot_training_curves(json.loads({json.dumps(LOG_HISTORY)!r}), {str(tmp_path)!r})\n"
        "print('matplotlib.pyplot' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
