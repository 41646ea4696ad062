"""Tests of hf_dpo.model_card: the card's Hub metadata, its sections, custom templates and the curves PNG."""

from __future__ import annotations

import re
from importlib.metadata import version
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from hf_dpo.model_card import (
    ModelCardTemplateError,
    default_template_path,
    plot_training_curves,
    render_model_card,
    training_curves_figure,
    write_model_card,
)

BASE = "Qwen/Qwen2.5-0.5B-Instruct"
HUB_ID = "someone/qwen2.5-0.5b-dpo-qlora"
TRAINING = {
    "loss_type": "sigmoid",
    "beta": 0.1,
    "learning_rate": 5e-5,
    "max_steps": 10,
    "num_train_epochs": 1,
    "per_device_train_batch_size": 2,
    "gradient_accumulation_steps": 1,
    "lora_r": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.0,
    "lora_target_modules": "all-linear",
    "quantization": "4-bit nf4, compute float32",
    "max_length": 1024,
    "max_prompt_length": 512,
    "logp_reduction": "sum",
    "global_step": 10,
}
# Rendered value of each setting above, as it must appear in its table row.
TRAINING_CELLS = {
    "loss_type": "sigmoid",
    "beta": "0.1",
    "learning_rate": "5e-05",
    "max_steps": "10",
    "num_train_epochs": "1",
    "per_device_train_batch_size": "2",
    "gradient_accumulation_steps": "1",
    "lora_r": "8",
    "lora_alpha": "16",
    "lora_dropout": "0",
    "lora_target_modules": "all-linear",
    "quantization": "4-bit nf4, compute float32",
    "max_length": "1024",
    "max_prompt_length": "512",
    "logp_reduction": "sum",
    "global_step": "10",
}
RESULTS = {
    "train_loss": 0.6523,
    "rewards/accuracies": 0.625,
    "rewards/margins": 0.0417,
    "rewards/chosen": 0.0213,
    "rewards/rejected": -0.0204,
    "eval_loss": 0.6412,
    "eval_rewards/accuracies": 0.75,
    "eval_rewards/margins": 0.0531,
    "eval_rewards/chosen": 0.031,
    "eval_rewards/rejected": -0.0221,
}
# metric -> (train cell, eval cell)
RESULT_ROWS = {
    "loss": ("0.6523", "0.6412"),
    "rewards/accuracies": ("0.625", "0.75"),
    "rewards/margins": ("0.0417", "0.0531"),
    "rewards/chosen": ("0.0213", "0.031"),
    "rewards/rejected": ("-0.0204", "-0.0221"),
}
LOG_HISTORY = [
    {
        "loss": 0.6931,
        "rewards/accuracies": 0.0,
        "rewards/margins": 0.0,
        "learning_rate": 5e-5,
        "epoch": 0.2,
        "step": 2,
    },
    {
        "loss": 0.6810,
        "rewards/accuracies": 0.5,
        "rewards/margins": 0.021,
        "learning_rate": 4e-5,
        "epoch": 0.4,
        "step": 4,
    },
    {
        "eval_loss": 0.6850,
        "eval_rewards/accuracies": 0.5,
        "eval_rewards/margins": 0.01,
        "epoch": 0.5,
        "step": 5,
    },
    {
        "loss": 0.6702,
        "rewards/accuracies": 0.75,
        "rewards/margins": 0.035,
        "learning_rate": 3e-5,
        "epoch": 0.6,
        "step": 6,
    },
    {
        "loss": 0.6523,
        "rewards/accuracies": 0.625,
        "rewards/margins": 0.0417,
        "learning_rate": 1e-5,
        "epoch": 1.0,
        "step": 10,
    },
    {
        "eval_loss": 0.6412,
        "eval_rewards/accuracies": 0.75,
        "eval_rewards/margins": 0.0531,
        "epoch": 1.0,
        "step": 10,
    },
    {"train_runtime": 12.3, "train_loss": 0.6523, "epoch": 1.0, "step": 10},
]


def render(output_dir, **overrides):
    kwargs = dict(
        base_model=BASE,
        datasets=["trl-lib/ultrafeedback_binarized"],
        training=TRAINING,
        results=RESULTS,
        hub_model_id=HUB_ID,
        license="apache-2.0",
    )
    kwargs.update(overrides)
    return render_model_card(output_dir, **kwargs)


def table_rows(card: str) -> list[list[str]]:
    return [
        [cell.strip() for cell in line.strip().strip("|").split("|")]
        for line in card.splitlines()
        if line.startswith("|")
    ]


def python_block(card: str) -> str:
    return re.search(r"```python\n(.*?)```", card, re.S).group(1)


def test_metadata_is_what_the_hub_reads(tmp_path):
    card = ModelCard(render(tmp_path))
    data = card.data.to_dict()
    assert data["base_model"] == BASE
    assert data["library_name"] == "peft"
    assert data["pipeline_tag"] == "text-generation"
    assert data["license"] == "apache-2.0"
    assert data["datasets"] == ["trl-lib/ultrafeedback_binarized"]
    assert {"dpo", "qlora", "hf_dpo", "lora", "peft", f"base_model:adapter:{BASE}"} <= set(data["tags"])
    assert set(data) == {"base_model", "library_name", "pipeline_tag", "license", "datasets", "tags"}


def test_write_model_card_round_trips_through_model_card_load(tmp_path):
    path = write_model_card(
        tmp_path, **dict(base_model=BASE, datasets=[], training=TRAINING, results=RESULTS)
    )
    assert path == tmp_path / "README.md"
    card = ModelCard.load(path)
    assert card.data.base_model == BASE
    assert card.data.library_name == "peft"
    assert "dpo" in card.data.tags


def test_license_and_local_data_stay_out_of_metadata(tmp_path):
    card = render(tmp_path, license=None, datasets=[str(tmp_path / "prefs.jsonl"), "data/dpo_data.jsonl"])
    data = ModelCard(card).data.to_dict()
    assert "license" not in data
    assert "datasets" not in data  # local files are not Hub datasets
    assert "license:" not in card.split("---")[1]
    assert "`prefs.jsonl`" in card and "`dpo_data.jsonl`" in card


def test_every_training_setting_is_in_the_procedure_table(tmp_path):
    rows = {row[0]: row[1] for row in table_rows(render(tmp_path)) if len(row) == 2}
    for key, cell in TRAINING_CELLS.items():
        (label,) = [name for name in rows if name.endswith(f"(`{key}`)")]
        assert rows[label] == cell, key


def test_results_table_holds_the_final_train_and_eval_metrics(tmp_path):
    rows = {row[0]: tuple(row[1:]) for row in table_rows(render(tmp_path)) if len(row) == 3}
    for metric, cells in RESULT_ROWS.items():
        assert rows[metric] == cells, metric


def test_snippet_loads_base_then_adapter_from_the_hub_id(tmp_path):
    code = python_block(render(tmp_path))
    assert f'AutoModelForCausalLM.from_pretrained("{BASE}"' in code
    assert f'PeftModel.from_pretrained(base, "{HUB_ID}")' in code
    assert "model.generate(" in code
    compile(code, "snippet", "exec")  # valid Python


def test_snippet_without_hub_id_uses_a_relative_placeholder(tmp_path):
    card = render(tmp_path, hub_model_id=None)
    assert 'PeftModel.from_pretrained(base, "path/to/adapter")' in python_block(card)
    assert str(tmp_path) not in card


def test_card_has_citation_limitations_versions_and_no_local_path(tmp_path):
    training = {
        **TRAINING,
        "output_dir": str(tmp_path),
        "hub_token": "hf_" + "x" * 34,
        "note": "hf_" + "y" * 34,
        "tokenizer_name_or_path": "Qwen/Qwen2.5-0.5B-Instruct",
    }
    card = render(tmp_path, training=training, datasets=[str(tmp_path / "data.jsonl")])
    assert "@inproceedings{rafailov2023direct" in card
    assert "Direct Preference Optimization: Your Language Model is Secretly a Reward Model" in card
    assert "2305.18290" in card and "Advances in Neural Information Processing Systems" in card
    assert "## Limitations" in card
    for name in ("transformers", "peft", "torch", "huggingface_hub", "datasets", "bitsandbytes"):
        assert f"- {name}: {version(name)}" in card
    assert str(tmp_path) not in card
    assert "hf_xxx" not in card and "hub_token" not in card and "hf_yyy" not in card
    assert "(`tokenizer_name_or_path`) | Qwen/Qwen2.5-0.5B-Instruct |" in card  # a "token" name, not a secret
    assert f"(`output_dir`) | {tmp_path.name} |" in card  # an absolute path is cut to its last part


def test_local_base_model_gives_no_base_model_metadata_and_no_path(tmp_path):
    base = tmp_path / "models" / "my-llama"
    base.mkdir(parents=True)
    card = render(tmp_path, base_model=str(base))
    data = ModelCard(card).data.to_dict()
    assert "base_model" not in data
    assert not any(tag.startswith("base_model:") for tag in data["tags"])
    assert 'from_pretrained("path/to/base-model"' in python_block(card)
    assert "`my-llama`" in card and str(base) not in card


def test_curves_image_is_embedded_with_a_relative_link(tmp_path):
    assert "training_curves.png" not in render(tmp_path)
    image = plot_training_curves(LOG_HISTORY, tmp_path)
    assert "](training_curves.png)" in render(tmp_path)  # found in output_dir
    assert "](training_curves.png)" in render(tmp_path, curves_image=str(image))  # absolute -> relative
    assert str(tmp_path) not in render(tmp_path, curves_image=str(image))


def test_custom_template(tmp_path):
    template = tmp_path / "card.md"
    template.write_text(
        "---\n{{ card_data }}\n---\n# {{ model_name }}\n\nbeta={{ training.beta }} on {{ base_model }}; "
        "eval accuracy {{ results['eval_rewards/accuracies'] }}\n"
    )
    card = render(tmp_path, template_path=template)
    assert "# qwen2.5-0.5b-dpo-qlora" in card
    assert f"beta=0.1 on {BASE}; eval accuracy 0.75" in card
    assert ModelCard(card).data.library_name == "peft"


def test_undefined_name_in_custom_template_is_a_clear_error(tmp_path):
    template = tmp_path / "card.md"
    template.write_text("# {{ model_name }}\n{{ not_a_variable }}\n")
    with pytest.raises(ModelCardTemplateError, match="not_a_variable") as info:
        render(tmp_path, template_path=template)
    assert str(template) in str(info.value) and "model_name" in str(info.value)  # lists what is available


def test_token_in_custom_template_is_refused(tmp_path):
    template = tmp_path / "card.md"
    template.write_text("# {{ model_name }}\nhf_" + "A1b2" * 9 + "\n")
    with pytest.raises(ValueError, match="token"):
        render(tmp_path, template_path=template)


def test_default_template_is_the_top_level_file():
    assert default_template_path() == Path(__file__).resolve().parent.parent / "model_card_template.md"


def test_plot_training_curves_writes_a_three_panel_png(tmp_path):
    figure = training_curves_figure(LOG_HISTORY)
    assert len(figure.axes) == 3
    # each panel has a train and an eval line, at the logged steps
    for ax in figure.axes:
        train, evaluation = ax.get_lines()
        assert list(train.get_xdata()) == [2, 4, 6, 10]
        assert list(evaluation.get_xdata()) == [5, 10]
    path = plot_training_curves(LOG_HISTORY, tmp_path)
    assert path == tmp_path / "training_curves.png"
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > 2.5 * height  # three panels side by side
    assert len(data) > 10_000


def test_plot_training_curves_returns_none_when_nothing_was_logged(tmp_path):
    assert plot_training_curves([], tmp_path) is None
    assert plot_training_curves([{"train_runtime": 1.0, "train_loss": 0.69, "step": 1}], tmp_path) is None
    assert not (tmp_path / "training_curves.png").exists()


def test_snippet_runs_on_a_tiny_model(tmp_path):
    """The card's code, with the placeholders pointed at a real base and adapter, loads and generates."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_dpo.tiny import ensure_tiny_model

    base = ensure_tiny_model(tmp_path / "tiny")
    adapter = tmp_path / "run"
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base),
        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    model.save_pretrained(adapter)
    AutoTokenizer.from_pretrained(base).save_pretrained(adapter)

    card = write_model_card(adapter, base_model=str(base), datasets=[], training=TRAINING, results={})
    code = python_block(card.read_text())
    code = code.replace('"path/to/adapter"', repr(str(adapter))).replace(
        '"path/to/base-model"', repr(str(base))
    )
    namespace: dict = {}
    exec(compile(code, "model_card_snippet", "exec"), namespace)
    assert namespace["output"].shape[1] > namespace["inputs"]["input_ids"].shape[1]
