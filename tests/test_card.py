"""Tests of hf_dpo.card: the card's Hub metadata, its prose (all in the template), custom templates, what
never reaches a card, and the record that lets a later push render the card for another repo id."""

from __future__ import annotations

import hashlib
import json
import re
from importlib.metadata import version
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from hf_dpo.card import (
    RUN_INFO_FILE,
    ModelCardTemplateError,
    card_for_repo,
    render_card,
    write_card,
)
from hf_dpo.curves import plot_training_curves
from hf_dpo.resources import bundled_file

ROOT = Path(__file__).resolve().parent.parent
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
SIGMOID = {
    "name": "sigmoid",
    "weight": 1.0,
    "paper": "Rafailov et al. 2023",
    "url": "https://arxiv.org/abs/2305.18290",
}
# Every name a template may use, and what the default template is given for the inputs of `card`.
TEMPLATE_NAMES = {
    "card_data", "library_name", "pipeline_tag", "model_name", "hub_model_id", "base_model",
    "base_model_on_hub", "datasets", "license", "tags", "qlora", "training", "training_cells", "results",
    "results_table", "losses", "reference", "reference_free", "logp_reduction", "curves_image", "versions",
}  # fmt: skip


def inputs(**overrides) -> dict:
    values = dict(
        base_model=BASE,
        datasets=["trl-lib/ultrafeedback_binarized"],
        training=TRAINING,
        results=RESULTS,
        hub_model_id=HUB_ID,
        license="apache-2.0",
    )
    values.update(overrides)
    return values


def card(output_dir, template_path=None, **overrides) -> str:
    return render_card(output_dir, inputs(**overrides), template_path=template_path)


def table_rows(text: str) -> list[list[str]]:
    return [
        [cell.strip() for cell in line.strip().strip("|").split("|")]
        for line in text.splitlines()
        if line.startswith("|")
    ]


def python_block(text: str) -> str:
    return re.search(r"```python\n(.*?)```", text, re.S).group(1)


def paragraph_after(text: str, heading: str) -> str:
    return text.split(f"## {heading}\n\n", 1)[1].split("\n\n", 1)[0]


# ------------------------------------------------------------------------------------------- metadata


def test_metadata_is_what_the_hub_reads(tmp_path):
    data = ModelCard(card(tmp_path)).data.to_dict()
    assert data["base_model"] == BASE
    assert data["library_name"] == "peft"
    assert data["pipeline_tag"] == "text-generation"
    assert data["license"] == "apache-2.0"
    assert data["datasets"] == ["trl-lib/ultrafeedback_binarized"]
    assert data["tags"] == [
        f"base_model:adapter:{BASE}",
        "dpo",
        "hf_dpo",
        "lora",
        "peft",
        "qlora",
        "transformers",
    ]
    assert set(data) == {"base_model", "library_name", "pipeline_tag", "license", "datasets", "tags"}


def test_qlora_tag_only_for_a_4bit_base(tmp_path):
    for quantization, qlora in (("4-bit nf4", True), ("8-bit", False), ("none (bfloat16)", False)):
        text = card(tmp_path, training={**TRAINING, "quantization": quantization})
        assert ("qlora" in ModelCard(text).data.tags) is qlora, quantization
        assert ("fitted to the 4-bit quantised weights" in text) is qlora
    assert "qlora" not in ModelCard(card(tmp_path, training={"loss_type": "sigmoid"})).data.tags


def test_license_and_local_data_stay_out_of_metadata(tmp_path):
    text = card(tmp_path, license=None, datasets=[str(tmp_path / "prefs.jsonl"), "data/dpo_data.jsonl"])
    data = ModelCard(text).data.to_dict()
    assert "license" not in data
    assert "datasets" not in data  # local files are not Hub datasets
    assert "local data: `prefs.jsonl`" in text and "local data: `dpo_data.jsonl`" in text
    assert "the preference data sets `prefs.jsonl` and `dpo_data.jsonl`." in text


def test_local_base_model_gives_no_base_model_metadata_and_no_path(tmp_path):
    base = tmp_path / "models" / "my-llama"
    base.mkdir(parents=True)
    text = card(tmp_path, base_model=str(base))
    data = ModelCard(text).data.to_dict()
    assert "base_model" not in data
    assert not any(tag.startswith("base_model:") for tag in data["tags"])
    assert 'from_pretrained("path/to/base-model"' in python_block(text)
    assert "a LoRA adapter for `my-llama`" in text and str(base) not in text
    assert 'The base model `my-llama` is not on the Hub: replace `"path/to/base-model"`' in text


def test_tiny_model_is_named_but_not_a_hub_base(tmp_path):
    text = card(tmp_path, base_model="hf_dpo/tiny-llama")
    assert "base_model" not in ModelCard(text).data.to_dict()
    assert "a LoRA adapter for `hf_dpo/tiny-llama`" in text


def test_write_card_round_trips_through_model_card_load(tmp_path):
    path = write_card(tmp_path, inputs(datasets=[], hub_model_id=None))
    assert path == tmp_path / "README.md"
    loaded = ModelCard.load(path)
    assert loaded.data.base_model == BASE and loaded.data.library_name == "peft" and "dpo" in loaded.data.tags
    assert path.read_text().endswith("```\n")


# ------------------------------------------------------------------------------------------- the prose


def test_every_training_setting_is_in_the_procedure_table(tmp_path):
    rows = {row[0]: row[1] for row in table_rows(card(tmp_path)) if len(row) == 2}
    for key, cell in TRAINING_CELLS.items():
        (label,) = [name for name in rows if name.endswith(f"(`{key}`)")]
        assert rows[label] == cell, key


def test_results_table_holds_the_final_train_and_eval_metrics(tmp_path):
    text = card(tmp_path)
    rows = {row[0]: tuple(row[1:]) for row in table_rows(text) if len(row) == 3}
    for metric, cells in RESULT_ROWS.items():
        assert rows[metric] == cells, metric
    assert "No metrics were recorded" in card(tmp_path, results={})


def test_snippet_loads_base_then_adapter_from_the_hub_id(tmp_path):
    code = python_block(card(tmp_path))
    assert f'AutoModelForCausalLM.from_pretrained("{BASE}"' in code
    assert f'PeftModel.from_pretrained(base, "{HUB_ID}")' in code
    assert "model.generate(" in code
    compile(code, "snippet", "exec")  # valid Python


def test_title_is_the_model_name_else_the_repo_name_else_the_folder_name(tmp_path):
    assert "\n# qwen2.5-0.5b-dpo-qlora\n" in card(tmp_path)
    assert "\n# My adapter\n" in card(tmp_path, model_name="My adapter")
    text = card(tmp_path, hub_model_id=None)
    assert f"\n# {tmp_path.name}\n" in text
    assert 'PeftModel.from_pretrained(base, "path/to/adapter")' in python_block(text)
    assert str(tmp_path) not in text


def test_single_loss_is_named_with_its_reference(tmp_path):
    text = card(tmp_path, losses=[SIGMOID])
    assert "Loss: `sigmoid` ([Rafailov et al. 2023](https://arxiv.org/abs/2305.18290))." in text
    # No losses given: one entry, from training["loss_type"].
    assert "\nLoss: `ipo`.\n" in card(tmp_path, training={**TRAINING, "loss_type": "ipo"})


def test_loss_combination_lists_every_loss_with_its_weight_and_reference(tmp_path):
    losses = [{**SIGMOID, "weight": 0.8}, {"name": "sft", "weight": 0.2, "paper": None, "url": None}]
    losses.append({"name": "bco_pair", "weight": 0.05, "paper": "Jung et al. 2024"})
    text = card(tmp_path, losses=losses)
    assert (
        "Loss: the weighted sum of 3 losses:\n\n"
        "- `sigmoid`, weight 0.8 ([Rafailov et al. 2023](https://arxiv.org/abs/2305.18290))\n"
        "- `sft`, weight 0.2\n"
        "- `bco_pair`, weight 0.05 (Jung et al. 2024)\n"
    ) in text
    # TRL-style loss_type list + loss_weights, without a losses list.
    derived = card(
        tmp_path, training={**TRAINING, "loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]}
    )
    assert "- `sigmoid`, weight 1\n- `sft`, weight 0.5\n" in derived


@pytest.mark.parametrize(
    "reference, expected",
    [
        (None, "Reference policy: base model with the LoRA adapter disabled (no second copy of the weights"),
        ("frozen copy of the loaded adapter", "Reference policy: frozen copy of the loaded adapter.\n"),
        ("adapter 'sft' (ref_adapter_name)", "Reference policy: adapter 'sft' (ref_adapter_name).\n"),
        ("separate reference model", "Reference policy: separate reference model.\n"),
    ],
)
def test_method_paragraph_names_the_reference_policy(tmp_path, reference, expected):
    text = card(tmp_path, reference=reference)
    assert expected in text
    assert "`beta * (log p_policy - log p_reference)`, summed over the\ncompletion tokens." in text


def test_reference_free_and_mean_log_probs_change_the_method_paragraph(tmp_path):
    training = {**TRAINING, "reference_free": True, "logp_reduction": "mean"}
    text = card(tmp_path, training=training, reference="none (reference-free)")
    method = paragraph_after(text, "Training procedure")
    assert method.startswith("No reference model was used (reference-free)")
    assert "`beta * log p_policy`,\naveraged over the completion tokens." in method
    assert "Reference policy" not in text


def test_ranked_data_is_described_for_plackett_luce(tmp_path):
    text = card(tmp_path, training={**TRAINING, "loss_type": "plackett_luce"})
    assert "several responses ranked best first (Plackett-Luce loss)" in text
    assert "a preferred (chosen) and a dispreferred (rejected) completion" in card(tmp_path)


def test_curves_image_is_embedded_with_a_relative_link(tmp_path):
    assert "training_curves.png" not in card(tmp_path)
    plot_training_curves([{"loss": 0.69, "step": 1}, {"loss": 0.6, "step": 2}], tmp_path)
    assert "](training_curves.png)" in card(tmp_path)


def test_citation_limitations_and_versions(tmp_path):
    text = card(tmp_path)
    assert "@inproceedings{rafailov2023direct" in text
    assert "Direct Preference Optimization: Your Language Model is Secretly a Reward Model" in text
    assert "2305.18290" in text and "Advances in Neural Information Processing Systems" in text
    assert "## Limitations" in text
    for name in ("transformers", "peft", "torch", "huggingface_hub", "datasets", "bitsandbytes"):
        assert f"- {name}: {version(name)}" in text


# ------------------------------------------------------------------------------- what never reaches a card


def test_no_secret_and_no_local_path(tmp_path):
    training = {
        **TRAINING,
        "output_dir": str(tmp_path),
        "hub_token": "hf_" + "x" * 34,
        "note": "hf_" + "y" * 34,
        "tokenizer_name_or_path": "Qwen/Qwen2.5-0.5B-Instruct",
    }
    text = card(tmp_path, training=training, datasets=[str(tmp_path / "data.jsonl")])
    assert str(tmp_path) not in text
    assert "hf_xxx" not in text and "hub_token" not in text and "hf_yyy" not in text
    assert "(`tokenizer_name_or_path`) | Qwen/Qwen2.5-0.5B-Instruct |" in text  # a "token" name, not a secret
    assert f"(`output_dir`) | {tmp_path.name} |" in text  # an absolute path is cut to its last part


def test_a_card_with_a_token_or_the_output_dir_is_refused(tmp_path):
    template = tmp_path / "card.md"
    template.write_text("# {{ model_name }}\nhf_" + "A1b2" * 9 + "\n")
    with pytest.raises(ValueError, match="token"):
        card(tmp_path, template)
    template.write_text(f"# {{{{ model_name }}}} from {tmp_path.resolve()}\n")
    with pytest.raises(ValueError, match="local path"):
        card(tmp_path, template)
    assert not (tmp_path / "README.md").exists()


# ------------------------------------------------------------------------------------------- templates


def test_default_template_is_the_top_level_file():
    assert bundled_file("model_card_template.md").resolve() == ROOT / "model_card_template.md"


def test_custom_template(tmp_path):
    template = tmp_path / "card.md"
    template.write_text(
        "---\n{{ card_data }}\n---\n# {{ model_name }}\n\nbeta={{ training.beta }} on {{ base_model }}; "
        "eval accuracy {{ results['eval_rewards/accuracies'] }}\n"
    )
    text = card(tmp_path, template)
    assert "# qwen2.5-0.5b-dpo-qlora" in text
    assert f"beta=0.1 on {BASE}; eval accuracy 0.75" in text
    assert ModelCard(text).data.library_name == "peft"
    template.write_text("# {{ model_name }}, without metadata")
    assert card(tmp_path, template) == "# qwen2.5-0.5b-dpo-qlora, without metadata\n"


def test_custom_template_rewrites_the_method_paragraph(tmp_path):
    """Every word is in the template: a copy of the default with its own method text says that instead."""
    default = bundled_file("model_card_template.md").read_text()
    start = default.index("{% if reference_free -%}")
    method = default[start : default.index("{%- endif %}", start) + len("{%- endif %}")]
    ours = "We trained {{ model_name }} against: {{ reference }}. Rewards were {{ logp_reduction }}-reduced."
    template = tmp_path / "card.md"
    template.write_text(default.replace(method, ours))
    text = card(tmp_path, template, reference="frozen copy of the loaded adapter")
    rendered = "We trained qwen2.5-0.5b-dpo-qlora against: frozen copy of the loaded adapter. Rewards were sum-reduced."
    assert paragraph_after(text, "Training procedure") == rendered
    as_default = card(tmp_path, reference="frozen copy of the loaded adapter")
    assert text == as_default.replace(
        paragraph_after(as_default, "Training procedure"), rendered
    )  # the rest alike


def test_custom_template_can_use_every_variable(tmp_path):
    plot_training_curves([{"loss": 0.69, "step": 1}], tmp_path)
    template = tmp_path / "card.md"
    template.write_text("".join(f"{name}=[{{{{ {name} }}}}]\n" for name in sorted(TEMPLATE_NAMES)))
    text = card(tmp_path, template, losses=[SIGMOID], reference="separate reference model")
    values = dict(re.findall(r"^(\w+)=\[(.*?)\]$", text, re.M | re.S))
    assert set(values) == TEMPLATE_NAMES
    assert values["model_name"] == "qwen2.5-0.5b-dpo-qlora" and values["hub_model_id"] == HUB_ID
    assert values["base_model"] == BASE and values["base_model_on_hub"] == "True"
    assert values["license"] == "apache-2.0" and values["qlora"] == "True"
    assert values["library_name"] == "peft" and values["pipeline_tag"] == "text-generation"
    assert values["reference"] == "separate reference model" and values["reference_free"] == "False"
    assert values["logp_reduction"] == "sum" and values["curves_image"] == "training_curves.png"
    assert "'on_hub': True" in values["datasets"] and "Rafailov et al. 2023" in values["losses"]
    assert "'beta': 0.1" in values["training"] and "'learning_rate': '5e-05'" in values["training_cells"]
    assert (
        "'eval_loss': 0.6412" in values["results"]
        and "('loss', '0.6523', '0.6412')" in values["results_table"]
    )
    assert "library_name: peft" in values["card_data"] and "'dpo'" in values["tags"]
    assert f"'hf_dpo': '{version('hf_dpo')}'" in values["versions"]


def test_undefined_name_in_custom_template_is_a_clear_error(tmp_path):
    template = tmp_path / "card.md"
    template.write_text("# {{ model_name }}\n{{ not_a_variable }}\n")
    with pytest.raises(ModelCardTemplateError, match="not_a_variable") as info:
        card(tmp_path, template)
    message = str(info.value)
    assert str(template) in message
    available = set(message.split("Names available to templates: ", 1)[1].rstrip(".").split(", "))
    assert available == TEMPLATE_NAMES


def test_template_syntax_error_names_the_file_and_line(tmp_path):
    template = tmp_path / "card.md"
    template.write_text("# {{ model_name }}\n\n{% if qlora %}unclosed\n")
    with pytest.raises(ModelCardTemplateError, match=rf"{re.escape(str(template))}, line \d"):
        card(tmp_path, template)


# ------------------------------------------------------------------------- hf_dpo_run.json and later pushes


def test_write_card_records_the_inputs_the_template_and_the_hash(tmp_path):
    template = tmp_path / "card.md"
    template.write_text(bundled_file("model_card_template.md").read_text())
    training = {**TRAINING, "hub_token": "hf_" + "x" * 34}
    path = write_card(
        tmp_path / "run",
        inputs(training=training, datasets=[str(tmp_path / "d.jsonl")]),
        template_path=template,
    )
    run = json.loads((tmp_path / "run" / RUN_INFO_FILE).read_text())
    assert run["card_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert run["model_card_template"] == str(template.resolve())
    assert run["datasets"] == [str(tmp_path / "d.jsonl")]  # the full path: this file is never pushed
    assert run["training"] == TRAINING and run["results"] == RESULTS and run["hub_model_id"] == HUB_ID
    assert run["versions"]["hf_dpo"] == version("hf_dpo")
    assert "hf_xxx" not in (tmp_path / "run" / RUN_INFO_FILE).read_text()


def test_card_for_another_repo_is_rendered_unless_edited(tmp_path):
    write_card(tmp_path, inputs(hub_model_id=None))
    written = (tmp_path / "README.md").read_bytes()
    other = card_for_repo(tmp_path, "me/renamed")
    assert 'PeftModel.from_pretrained(base, "me/renamed")' in other and "path/to/adapter" not in other
    assert "\n# renamed\n" in other
    assert other == card(tmp_path, hub_model_id="me/renamed")  # the same card, only the repo differs
    assert (tmp_path / "README.md").read_bytes() == written  # nothing local is rewritten

    (tmp_path / "README.md").write_bytes(written + b"\nMy notes.\n")
    assert card_for_repo(tmp_path, "me/renamed") is None  # edited by hand: goes up as it is


def test_card_for_its_own_repo_or_without_a_record_is_left_alone(tmp_path):
    write_card(tmp_path, inputs())
    assert card_for_repo(tmp_path, HUB_ID) is None
    (tmp_path / RUN_INFO_FILE).unlink()
    assert card_for_repo(tmp_path, "me/other") is None


def test_a_template_gone_since_leaves_the_card_as_written(tmp_path, caplog):
    template = tmp_path / "card.md"
    template.write_text("---\n{{ card_data }}\n---\n# {{ model_name }} ({{ hub_model_id }})\n")
    write_card(tmp_path / "run", inputs(hub_model_id=None), template_path=template)
    assert "(me/x)" in card_for_repo(tmp_path / "run", "me/x")
    template.unlink()
    assert card_for_repo(tmp_path / "run", "me/x") is None
    assert "pushing README.md as it is" in caplog.text


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

    path = write_card(adapter, {"base_model": str(base), "datasets": [], "training": TRAINING, "results": {}})
    code = python_block(path.read_text())
    code = code.replace('"path/to/adapter"', repr(str(adapter))).replace(
        '"path/to/base-model"', repr(str(base))
    )
    namespace: dict = {}
    exec(compile(code, "model_card_snippet", "exec"), namespace)
    assert namespace["output"].shape[1] > namespace["inputs"]["input_ids"].shape[1]
