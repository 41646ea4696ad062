"""The model card (README.md) of a trained adapter, and the training-curves image it embeds.

The card is `model_card_template.md` rendered with jinja2. Undefined names raise, so a typo in a custom
template fails loudly instead of leaving a hole in the card. Everything that reaches the card is a
relative name or a Hub id: no token, no absolute local path.

Where the default template lives: the canonical file is `model_card_template.md` at the repository top
level. In a source checkout or an editable install `hf_dpo/..` is that top level, so the file is read
from there and there is exactly one copy to edit. A wheel ships the package only; it carries the
template as package data (`hf_dpo/model_card_template.md`, matched by `package-data = ["*.md"]`), which is
read through `importlib.resources` when the top-level file is not there.
"""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

TEMPLATE_NAME = "model_card_template.md"
TRAINING_CURVES_FILENAME = "training_curves.png"
ADAPTER_PLACEHOLDER = "path/to/adapter"
BASE_MODEL_PLACEHOLDER = "path/to/base-model"

# The curves plot_training_curves draws, one panel each: (metric key, panel title).
CURVE_METRICS = (
    ("loss", "DPO loss"),
    ("rewards/accuracies", "Reward accuracy"),
    ("rewards/margins", "Reward margin (chosen - rejected)"),
)

# Results are listed in this order first, then any other key alphabetically.
_RESULT_ORDER = (
    "loss",
    "rewards/accuracies",
    "rewards/margins",
    "rewards/chosen",
    "rewards/rejected",
    "logps/chosen",
    "logps/rejected",
    "logits/chosen",
    "logits/rejected",
)

# Friendly labels for the settings the trainer passes; unknown keys are shown under their own name.
_TRAINING_LABELS = {
    "loss_type": "DPO loss",
    "beta": "beta, the KL penalty strength",
    "label_smoothing": "label smoothing (cDPO)",
    "reference_free": "reference-free",
    "logp_reduction": "log-prob reduction over completion tokens",
    "precompute_ref_log_probs": "reference log-probs precomputed",
    "learning_rate": "learning rate",
    "lr_scheduler_type": "learning-rate schedule",
    "warmup_ratio": "warmup ratio",
    "warmup_steps": "warmup steps",
    "optim": "optimizer",
    "weight_decay": "weight decay",
    "max_grad_norm": "max gradient norm",
    "max_steps": "max steps",
    "num_train_epochs": "epochs",
    "global_step": "optimizer steps completed",
    "per_device_train_batch_size": "pairs per device per step",
    "gradient_accumulation_steps": "gradient accumulation steps",
    "total_train_batch_size": "pairs per optimizer step",
    "lora_r": "LoRA rank r",
    "lora_alpha": "LoRA alpha",
    "lora_dropout": "LoRA dropout",
    "lora_target_modules": "LoRA target modules",
    "quantization": "quantisation",
    "max_length": "max sequence length, in tokens",
    "max_prompt_length": "max prompt length, in tokens",
    "padding_free": "padding-free batches",
    "gradient_checkpointing": "gradient checkpointing",
    "seed": "seed",
}

# Setting names that hold secrets (hub_token, token, api_key...), but not tokenizer_name_or_path or max_tokens.
_SECRET_KEY = re.compile(r"(?:^|_)(?:token|secret|password|passwd|api_?key|credentials?)$", re.IGNORECASE)
# Hugging Face user access tokens: "hf_" followed by a long run of letters and digits.
HF_TOKEN_PATTERN = re.compile(r"(?<![A-Za-z0-9_])hf_[A-Za-z0-9]{30,}")
_DATA_SUFFIXES = {".json", ".jsonl", ".parquet", ".csv", ".tsv", ".txt", ".arrow"}
_FRAMEWORKS = ("transformers", "peft", "torch", "bitsandbytes", "datasets", "huggingface_hub")


class ModelCardTemplateError(ValueError):
    """A model card template could not be rendered (undefined name, syntax error)."""


def render_model_card(
    output_dir: str | os.PathLike,
    *,
    base_model: str,
    datasets: Sequence[str],
    training: Mapping[str, Any],
    results: Mapping[str, Any],
    hub_model_id: str | None = None,
    template_path: str | os.PathLike | None = None,
    license: str | None = None,
    curves_image: str | os.PathLike | None = None,
    model_name: str | None = None,
) -> str:
    """Render the model card of the adapter in `output_dir` and return its text (README.md content).

    `training` is a flat dict of settings and `results` a flat dict of final metrics (eval ones prefixed
    `eval_`); every key given is shown. `curves_image` defaults to `training_curves.png` when that file
    exists in `output_dir`. `template_path` replaces the default template. The title is the repo's name, else
    `model_name`, else the folder's name.
    """
    import jinja2

    output_dir = Path(output_dir)
    base_is_hub = _is_hub_model_id(base_model)
    hub_datasets = [d for d in datasets if _is_hub_dataset_id(d)]
    training = _sanitise(training)
    results = _sanitise(results)

    tags = ["base_model:adapter:" + base_model] if base_is_hub else []
    tags += ["dpo", "hf_dpo", "lora", "peft"]
    if _is_qlora(training):
        tags.append("qlora")
    tags.append("transformers")

    from huggingface_hub import ModelCardData

    card_data = ModelCardData(
        base_model=base_model if base_is_hub else None,
        library_name="peft",
        license=license or None,
        datasets=hub_datasets or None,
        tags=tags,
        pipeline_tag="text-generation",
    )

    base_model_name = base_model if base_is_hub else _local_name(base_model)
    usage_note = None
    if hub_model_id is None:
        usage_note = f'Replace `"{ADAPTER_PLACEHOLDER}"` with the folder holding this card (or its Hub repo id once pushed).'
    if not base_is_hub:
        usage_note = (usage_note + " " if usage_note else "") + (
            f"The base model was loaded from a local folder (`{base_model_name}`): replace "
            f'`"{BASE_MODEL_PLACEHOLDER}"` with its path.'
        )

    if curves_image is None and (output_dir / TRAINING_CURVES_FILENAME).is_file():
        curves_image = TRAINING_CURVES_FILENAME

    if hub_model_id:
        model_name = hub_model_id.split("/")[-1]
    model_name = model_name or output_dir.resolve().name or "adapter"
    base_link = (
        f"[{base_model}](https://huggingface.co/{base_model})" if base_is_hub else f"`{base_model_name}`"
    )
    context = {
        "card_data": card_data.to_yaml(),
        "model_name": model_name,
        "hub_model_id": hub_model_id,
        "adapter_ref": hub_model_id or ADAPTER_PLACEHOLDER,
        "base_model": base_model_name,
        "base_model_name": base_model_name,
        "base_model_ref": base_model if base_is_hub else BASE_MODEL_PLACEHOLDER,
        "base_model_link": base_link,
        "usage_note": usage_note,
        "datasets": [d if _is_hub_dataset_id(d) else _local_name(d) for d in datasets],
        "dataset_lines": [_dataset_line(d) for d in datasets] or ["(not recorded)"],
        "datasets_text": _datasets_text(datasets),
        "training": training,
        "training_rows": _training_rows(training),
        "procedure_summary": _procedure_summary(training),
        "method_text": _method_text(training),
        "data_format_text": _data_format_text(training),
        "results": results,
        "results_rows": _results_rows(results),
        "curves_image": _relative_image(curves_image, output_dir),
        "license": license,
        "versions": framework_versions(),
    }

    text, source = _load_template(template_path)
    env = jinja2.Environment(
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )
    try:
        card = env.from_string(text).render(**context)
    except jinja2.UndefinedError as err:
        raise ModelCardTemplateError(
            f"Model card template {source} uses an undefined name: {err.message}. "
            f"Names available to templates: {', '.join(sorted(context))}."
        ) from err
    except jinja2.TemplateSyntaxError as err:
        raise ModelCardTemplateError(
            f"Model card template {source} has a syntax error on line {err.lineno}: {err.message}"
        ) from err

    _check_no_secrets_or_local_paths(card, output_dir)
    return card


def write_model_card(output_dir: str | os.PathLike, **kwargs: Any) -> Path:
    """Render the model card (same keywords as `render_model_card`) and write it to `output_dir/README.md`."""
    output_dir = Path(output_dir)
    card = render_model_card(output_dir, **kwargs)
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / "README.md"
    path.write_text(card, encoding="utf-8")
    return path


def default_template_path() -> Path:
    """The default template: the repository's top-level file, else the copy packaged inside hf_dpo."""
    top_level = Path(__file__).resolve().parent.parent / TEMPLATE_NAME
    if top_level.is_file():
        return top_level
    packaged = importlib.resources.files("hf_dpo") / TEMPLATE_NAME
    if packaged.is_file():
        return Path(str(packaged))
    raise FileNotFoundError(
        f"The default model card template was not found: looked for {top_level} and for {TEMPLATE_NAME} inside "
        "the installed hf_dpo package. Pass template_path=... or reinstall hf_dpo."
    )


def framework_versions() -> dict[str, str]:
    """Versions of hf_dpo and the libraries it trains with, read now (not at import time)."""
    from hf_dpo import __version__

    versions = {"hf_dpo": __version__}
    for name in _FRAMEWORKS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def training_curves_figure(log_history: Sequence[Mapping[str, Any]]):
    """A matplotlib Figure with one panel per metric of CURVE_METRICS that was logged, or None if none was.

    Train points come from the entries holding `loss`, `rewards/accuracies`, `rewards/margins`; eval points
    from `eval_loss`, `eval_rewards/accuracies`, `eval_rewards/margins`. The x axis is the entry's `step`.
    """
    from matplotlib.figure import Figure

    panels = []
    for metric, title in CURVE_METRICS:
        train = _series(log_history, metric)
        evaluation = _series(log_history, "eval_" + metric)
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
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    return fig


def plot_training_curves(log_history: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path | None:
    """Draw loss, reward accuracy and reward margin against step into a PNG; None if nothing was logged.

    `path` is the PNG's path, or a folder (the run's output_dir) to write `training_curves.png` into.
    `log_history` is the "log_history" list of transformers' trainer_state.json.
    """
    fig = training_curves_figure(log_history)
    if fig is None:
        return None
    path = Path(path)
    if path.is_dir():
        path = path / TRAINING_CURVES_FILENAME
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


# ----------------------------------------------------------------------------------------------- helpers


def _load_template(template_path: str | os.PathLike | None) -> tuple[str, str]:
    path = Path(template_path) if template_path is not None else default_template_path()
    if not path.is_file():
        raise FileNotFoundError(f"Model card template not found: {path}")
    return path.read_text(encoding="utf-8"), str(path)


def _is_local_path(name: str) -> bool:
    """A path on this machine rather than a Hub id (transformers also prefers an existing local folder)."""
    return os.path.isabs(name) or name.startswith((".", "~")) or "\\" in name or os.path.exists(name)


def _is_hub_model_id(name: str) -> bool:
    """A Hub model id (`org/name` or `name`), not a local folder nor the locally built tiny model."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    from hf_dpo.tiny import TINY_MODEL_NAME

    if not name or name in (TINY_MODEL_NAME, "tiny") or _is_local_path(name):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _is_hub_dataset_id(name: str) -> bool:
    return _is_hub_model_id(name) and Path(name).suffix.lower() not in _DATA_SUFFIXES


def _local_name(name: str) -> str:
    """The last component of a local path: enough to recognise it, without revealing where it lived."""
    return Path(os.path.expanduser(str(name)).rstrip("/\\")).name or str(name)


def _dataset_line(name: str) -> str:
    if _is_hub_dataset_id(name):
        return f"[{name}](https://huggingface.co/datasets/{name})"
    return f"local data: `{_local_name(name)}`"


def _datasets_text(datasets: Sequence[str]) -> str:
    if not datasets:
        return "preference data"
    parts = [
        f"[{d}](https://huggingface.co/datasets/{d})" if _is_hub_dataset_id(d) else f"`{_local_name(d)}`"
        for d in datasets
    ]
    if len(parts) == 1:
        return "the preference data " + parts[0]
    return "the preference data sets " + ", ".join(parts[:-1]) + " and " + parts[-1]


def _sanitise(values: Mapping[str, Any]) -> dict[str, Any]:
    """Drop secret-looking keys and reduce absolute local paths to their last component."""
    clean = {}
    for key, value in values.items():
        if _SECRET_KEY.search(str(key)) or (isinstance(value, str) and HF_TOKEN_PATTERN.search(value)):
            continue
        if isinstance(value, (str, os.PathLike)) and (
            os.path.isabs(os.fspath(value)) or os.fspath(value).startswith("~")
        ):
            value = _local_name(os.fspath(value))
        clean[str(key)] = value
    return clean


def _is_qlora(training: Mapping[str, Any]) -> bool:
    """QLoRA unless the settings say the base was not loaded in 4 bit (the recipe's default is 4-bit NF4)."""
    if "quantization" not in training:
        return True
    quantization = str(training["quantization"]).lower().replace(" ", "")
    return any(marker in quantization for marker in ("4-bit", "4bit", "nf4", "fp4", "int4"))


def format_value(value: Any) -> str:
    """A compact, exact-enough rendering of a setting or metric for a Markdown table cell."""
    if isinstance(value, bool) or value is None or isinstance(value, int):
        text = str(value)
    elif isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            text = str(value)
        elif value == 0 or 1e-3 <= abs(value) < 1e6:
            text = f"{value:.4f}".rstrip("0").rstrip(".")
            text = text if text not in ("", "-0") else "0"
        else:
            text = f"{value:.4g}"
    elif isinstance(value, (list, tuple, set)):
        text = ", ".join(format_value(v) for v in value)
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _training_rows(training: Mapping[str, Any]) -> list[tuple[str, str]]:
    known = [key for key in _TRAINING_LABELS if key in training]
    others = [key for key in training if key not in _TRAINING_LABELS]
    rows = []
    for key in known + others:
        value = training[key]
        # Learning rates and other small floats read better in scientific notation than as 0.0001.
        text = f"{value:g}" if isinstance(value, float) and key == "learning_rate" else format_value(value)
        rows.append((f"{_TRAINING_LABELS.get(key, key)} (`{key}`)", text))
    return rows


def _results_rows(results: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(metric, train value, eval value) rows; `eval_x` pairs with `x` (and with `train_x`)."""
    table: dict[str, dict[str, str]] = {}
    for key, value in results.items():
        if key.startswith("eval_"):
            name, column = key[len("eval_") :], "eval"
        elif key.startswith("train_"):
            name, column = key[len("train_") :], "train"
        else:
            name, column = key, "train"
        table.setdefault(name, {})[column] = format_value(value)
    order = [name for name in _RESULT_ORDER if name in table]
    order += sorted(name for name in table if name not in _RESULT_ORDER)
    return [(name, table[name].get("train", "–"), table[name].get("eval", "–")) for name in order]


def _procedure_summary(training: Mapping[str, Any]) -> str:
    """One line on how it was trained, from whichever of the main settings are known."""
    items = []
    if "loss_type" in training:
        items.append(f"`{format_value(training['loss_type'])}` loss")
    if "beta" in training:
        items.append(f"beta = {format_value(training['beta'])}")
    steps = training.get("global_step", training.get("max_steps"))
    if isinstance(steps, int) and not isinstance(steps, bool) and steps > 0:
        items.append(f"{steps} optimizer steps")
    if "quantization" in training:
        items.append(f"base model quantisation: {format_value(training['quantization'])}")
    return ("Training: " + ", ".join(items) + ".") if items else ""


def _method_text(training: Mapping[str, Any]) -> str:
    reduction = "averaged" if training.get("logp_reduction") == "mean" else "summed"
    if training.get("reference_free"):
        return (
            "No reference model was used (reference-free DPO): the implicit reward of a completion is "
            f"`beta * log p_policy`, {reduction} over the completion tokens."
        )
    return (
        "The policy is the base model plus the LoRA adapter; the reference model is the same base model with "
        "the adapter disabled, so no second copy of the weights is held in memory. The implicit reward of a "
        f"completion is `beta * (log p_policy - log p_reference)`, {reduction} over the completion tokens."
    )


def _data_format_text(training: Mapping[str, Any]) -> str:
    if training.get("loss_type") == "plackett_luce":
        return "Each example is a prompt with several responses ranked best first (Plackett-Luce loss)."
    return "Each example is a prompt with a preferred (chosen) and a dispreferred (rejected) completion."


def _relative_image(curves_image: str | os.PathLike | None, output_dir: Path) -> str | None:
    if curves_image is None:
        return None
    image = Path(curves_image)
    if image.is_absolute():
        try:
            return image.resolve().relative_to(output_dir.resolve()).as_posix()
        except ValueError:
            return image.name
    return image.as_posix()


def _series(log_history: Sequence[Mapping[str, Any]], key: str) -> list[tuple[float, float]]:
    points = []
    for entry in log_history:
        value, step = entry.get(key), entry.get("step")
        if isinstance(value, (int, float)) and isinstance(step, (int, float)) and math.isfinite(value):
            points.append((step, float(value)))
    return points


def _check_no_secrets_or_local_paths(card: str, output_dir: Path) -> None:
    if HF_TOKEN_PATTERN.search(card):
        raise ValueError(
            "The rendered model card contains what looks like a Hugging Face token; refusing to write it."
        )
    absolute = str(output_dir.resolve())
    if len(absolute) > 1 and absolute in card:
        raise ValueError(f"The rendered model card contains the local path {absolute}; refusing to write it.")
