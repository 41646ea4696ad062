"""The model card (README.md) of an adapter: a `huggingface_hub.ModelCard` rendered from model_card_template.md
(or `DPOConfig.model_card_template`), which writes every word, from public values (no secret, no local path).
hf_dpo_run.json records the inputs so that `hf-dpo push --repo-id X` can render the card for X."""

import hashlib
import importlib.metadata
import json
import logging
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jinja2.meta
from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id

from hf_dpo import __version__
from hf_dpo.curves import CURVES_FILE
from hf_dpo.resources import bundled_file
from hf_dpo.tiny import TINY_MODEL_NAME

logger = logging.getLogger(__name__)

RUN_INFO_FILE = "hf_dpo_run.json"
HF_TOKEN_PATTERN = re.compile(r"(?<![A-Za-z0-9_])hf_[A-Za-z0-9]{30,}")
# Setting names that hold secrets (hub_token, api_key...), but not tokenizer_name_or_path or max_tokens.
_SECRET_KEY = re.compile(r"(?:^|_)(?:token|secret|password|passwd|api_?key|credentials?)$", re.IGNORECASE)
_DATA_SUFFIXES = {".json", ".jsonl", ".parquet", ".csv", ".tsv", ".txt", ".arrow"}
_RESULT_ORDER = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected")
_RESULT_ORDER += ("logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected")


class ModelCardTemplateError(ValueError):
    """A model card template could not be rendered (undefined name, syntax error)."""


def render_card(output_dir: str | os.PathLike, inputs: Mapping[str, Any], *, template_path=None) -> str:
    """The model card of the adapter in `output_dir`, rendered from `inputs` (see `card_variables`)."""
    output_dir = Path(output_dir)
    card_data, variables = card_variables(output_dir, inputs)
    path = Path(template_path) if template_path else bundled_file("model_card_template.md")
    source = path.read_text(encoding="utf-8")
    available = {"card_data", *card_data.to_dict(), *variables}
    try:
        used = jinja2.meta.find_undeclared_variables(jinja2.Environment().parse(source))
    except jinja2.TemplateSyntaxError as err:
        raise ModelCardTemplateError(f"Model card template {path}, line {err.lineno}: {err.message}") from err
    if undefined := sorted(used - available):
        raise ModelCardTemplateError(
            f"Model card template {path} uses undefined name(s) {', '.join(undefined)}. "
            f"Names available to templates: {', '.join(sorted(available))}."
        )
    card = ModelCard.from_template(card_data, template_str=source, **variables)
    card = str(card) if card.data.to_dict() else card.text  # a template without metadata gets none
    card = card if card.endswith("\n") else card + "\n"
    absolute = str(output_dir.resolve())
    if HF_TOKEN_PATTERN.search(card) or (len(absolute) > 1 and absolute in card):
        leak = "a Hugging Face token" if HF_TOKEN_PATTERN.search(card) else f"the local path {absolute}"
        raise ValueError(f"The model card rendered from {path} contains {leak}; refusing it.")
    return card


def write_card(output_dir: str | os.PathLike, inputs: Mapping[str, Any], *, template_path=None) -> Path:
    """Write README.md, and hf_dpo_run.json (the inputs, the template and the card's hash); returns README.md."""
    output_dir = Path(output_dir)
    record = {key: value for key, value in inputs.items() if not _SECRET_KEY.search(str(key))}
    for key in ("training", "results"):  # full paths kept: hf_dpo_run.json is never pushed
        record[key] = _public(inputs.get(key) or {}, cut_paths=False)
    record["versions"] = inputs.get("versions") or framework_versions()  # a later re-render keeps them
    card = render_card(output_dir, record, template_path=template_path).encode("utf-8")
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "README.md").write_bytes(card)
    record["model_card_template"] = str(Path(template_path).resolve()) if template_path else None
    record["card_sha256"] = hashlib.sha256(card).hexdigest()
    (output_dir / RUN_INFO_FILE).write_text(json.dumps(record, indent=2, default=str), encoding="utf-8")
    return output_dir / "README.md"


def card_for_repo(output_dir: str | os.PathLike, repo_id: str) -> str | None:
    """hf_dpo's unedited card re-rendered for `repo_id`; None: README.md goes up as is (edited, or same repo)."""
    try:
        run = json.loads((Path(output_dir) / RUN_INFO_FILE).read_text(encoding="utf-8"))
        readme = (Path(output_dir) / "README.md").read_bytes()
    except (OSError, ValueError):
        return None
    if run.get("hub_model_id") == repo_id or run.get("card_sha256") != hashlib.sha256(readme).hexdigest():
        return None  # already for repo_id, or edited since it was written: the user's words go up untouched
    try:
        inputs = {**run, "hub_model_id": repo_id}
        return render_card(output_dir, inputs, template_path=run.get("model_card_template"))
    except (OSError, ValueError) as err:  # a template that moved or broke: the card as written still holds
        logger.warning("model card not rendered for %s (%s); pushing README.md as it is", repo_id, err)
        return None


def card_variables(output_dir: Path, inputs: Mapping[str, Any]):
    """(ModelCardData, template variables) for the card; every value is public (no secret, no local path)."""
    base = str(inputs.get("base_model") or "")
    base_on_hub = is_hub_id(base)
    sources = [str(d) for d in inputs.get("datasets") or []]
    datasets = [{"name": d if is_hub_id(d) else local_name(d), "on_hub": is_hub_id(d)} for d in sources]
    training, results = _public(inputs.get("training") or {}), _public(inputs.get("results") or {})
    qlora = any(m in str(training.get("quantization", "")).lower() for m in ("4-bit", "4bit", "nf4", "fp4"))
    tags = ["base_model:adapter:" + base] * base_on_hub + ["dpo", "hf_dpo", "lora", "peft"]
    card_data = ModelCardData(
        base_model=base if base_on_hub else None,
        library_name="peft",
        license=inputs.get("license") or None,
        datasets=[d["name"] for d in datasets if d["on_hub"]] or None,
        tags=tags + ["qlora"] * qlora + ["transformers"],
        pipeline_tag="text-generation",
    )
    hub_model_id = inputs.get("hub_model_id") or None
    name = str(inputs.get("model_name") or (hub_model_id or "").split("/")[-1] or output_dir.resolve().name)
    reference_free = bool(training.get("reference_free"))
    reference = "none (reference-free)" if reference_free else "base model with the LoRA adapter disabled"
    return card_data, {
        "model_name": local_name(name) if is_local_path(name) else name,
        "hub_model_id": hub_model_id,
        "base_model": local_name(base) if is_local_path(base) else base,
        "base_model_on_hub": base_on_hub,
        "datasets": datasets,
        "license": inputs.get("license") or None,
        "qlora": qlora,
        "training": training,
        "training_cells": {key: format_value(value) for key, value in training.items()},
        "results": results,
        "results_table": _results_table(results),
        "losses": _losses(inputs.get("losses"), training),
        "reference": str(inputs.get("reference") or reference),
        "reference_free": reference_free,
        "logp_reduction": str(training.get("logp_reduction", "sum")),
        "curves_image": CURVES_FILE if (output_dir / CURVES_FILE).is_file() else None,
        "versions": dict(inputs.get("versions") or framework_versions()),
    }


def framework_versions() -> dict[str, str]:
    """Versions of hf_dpo and the libraries it trains with, read now (not at import time)."""
    versions = {"hf_dpo": __version__}
    for name in ("transformers", "peft", "torch", "bitsandbytes", "datasets", "huggingface_hub"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def is_local_path(name: str) -> bool:
    """A path on this machine rather than a Hub id (transformers also prefers an existing local folder)."""
    return os.path.isabs(name) or name.startswith((".", "~")) or "\\" in name or os.path.exists(name)


def is_hub_id(name: str) -> bool:
    """A Hub repo id (`org/name` or `name`): not a local path, a data file, nor the locally built tiny model."""
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return not (name == TINY_MODEL_NAME or is_local_path(name) or Path(name).suffix.lower() in _DATA_SUFFIXES)


def local_name(name: str) -> str:
    """The last component of a local path: enough to recognise it, without revealing where it lived."""
    return Path(os.path.expanduser(name).rstrip("/\\")).name or name


def format_value(value: Any) -> str:
    """A compact, exact-enough rendering of a setting or metric for a Markdown table cell (5e-05, 0.6523)."""
    if isinstance(value, float) and math.isfinite(value):
        if value != 0 and not 1e-3 <= abs(value) < 1e6:
            return f"{value:.4g}"
        text = f"{value:.4f}".rstrip("0").rstrip(".")
        return text if text not in ("", "-0") else "0"
    if isinstance(value, (list, tuple, set)):
        return ", ".join(format_value(v) for v in value)
    return str(value).replace("|", "\\|").replace("\n", " ")


def _public(values: Mapping[str, Any], cut_paths: bool = True) -> dict[str, Any]:
    """`values` less secret keys and token-holding strings; absolute or ~ paths cut to a name if `cut_paths`."""
    public = {}
    for key, value in values.items():
        if _SECRET_KEY.search(key) or (isinstance(value, str) and HF_TOKEN_PATTERN.search(value)):
            continue
        path = isinstance(value, (str, os.PathLike)) and (os.path.isabs(value) or str(value).startswith("~"))
        public[key] = local_name(os.fspath(value)) if cut_paths and path else value
    return public


def _losses(losses, training: Mapping[str, Any]) -> list[dict[str, Any]]:
    """[{name, weight, paper, url}]: as given, else one entry per name of training["loss_type"]."""
    if not losses:
        names = training.get("loss_type") or "sigmoid"
        names = [names] if isinstance(names, str) else list(names)
        weights = training.get("loss_weights") or [1.0] * len(names)
        losses = [{"name": name, "weight": weight} for name, weight in zip(names, weights)]
    return [
        {"paper": None, "url": None, **loss, "weight": float(loss.get("weight", 1.0))}
        for loss in map(_public, losses)
    ]


def _results_table(results: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(metric, train cell, eval cell) rows; `eval_x` pairs with `x` (and with `train_x`)."""
    table: dict[str, dict[str, str]] = {}
    for key, value in results.items():
        column = "eval" if key.startswith("eval_") else "train"
        table.setdefault(key.removeprefix("eval_").removeprefix("train_"), {})[column] = format_value(value)
    order = [name for name in _RESULT_ORDER if name in table] + sorted(set(table) - set(_RESULT_ORDER))
    return [(name, table[name].get("train", "–"), table[name].get("eval", "–")) for name in order]
