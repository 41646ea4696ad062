"""The Python face: what a transformers or TRL user writes around DPOTrainer works unchanged in meaning.

Real tiny Llama, real bitsandbytes 4-bit, real peft adapters, and the real huggingface_hub client against the
fake Hub of tests/hub_server.py (the `fake_hub` fixture) for publishing.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math

import pytest
import torch
from peft import LoraConfig, PeftModel
from trainer_helpers import dpo_config, load, lora_state, tokenised_rows
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, TrainingArguments

from hf_dpo import DPOConfig, DPOTrainer
from hf_dpo.collator import PreferenceCollator

LN2 = math.log(2.0)


def _base(path, four_bit: bool = True):
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    return AutoModelForCausalLM.from_pretrained(
        path,
        quantization_config=quantization if four_bit else None,
        dtype=torch.float32,
        device_map={"": "cpu"},
    )


def _fields(args) -> dict:
    return copy.deepcopy({f.name: getattr(args, f.name) for f in dataclasses.fields(args)})


def _batch(trainer, n=8):
    collator = PreferenceCollator(pad_token_id=trainer.processing_class.pad_token_id)
    return trainer._prepare_inputs(collator([trainer.train_dataset[i] for i in range(n)]))


def _step0_eval(trainer):
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] == pytest.approx(LN2, abs=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert metrics[f"eval_{key}"] == 0.0, key
    return metrics


@pytest.fixture(scope="module")
def sft_adapter(tiny_model_path, tmp_path_factory):
    """A trained (non-zero B) LoRA adapter saved to disk, standing in for an SFT adapter."""
    out = tmp_path_factory.mktemp("sft")
    loaded = load(tiny_model_path)
    trainer = DPOTrainer(
        model=loaded.model,
        args=dpo_config(out, max_steps=3),
        train_dataset=tokenised_rows(loaded.tokenizer),
        processing_class=loaded.tokenizer,
    )
    trainer.train()
    trainer.save_model(str(out))
    return str(out)


def test_a_peft_model_from_a_trained_adapter_is_its_own_reference(
    tiny_model_path, sft_adapter, tmp_path, caplog
):
    """TRL bug #1193: PeftModel.from_pretrained(base, sft, is_trainable=True) must not be trained against the raw
    base. A frozen copy of the adapter is the reference: step-0 loss ln 2, rewards exactly 0, one log line."""
    model = PeftModel.from_pretrained(_base(tiny_model_path), sft_adapter, is_trainable=True)
    tokenizer = load(tiny_model_path).tokenizer
    rows = tokenised_rows(tokenizer)
    with caplog.at_level(logging.INFO, logger="hf_dpo"):
        trainer = DPOTrainer(
            model=model,
            args=dpo_config(tmp_path, max_steps=3),
            train_dataset=rows,
            eval_dataset=rows,
            processing_class=tokenizer,
        )
    assert trainer.reference.description == "a frozen copy of the loaded adapter"
    assert sum("already trained: a frozen copy" in r.getMessage() for r in caplog.records) == 1
    _step0_eval(trainer)
    batch = _batch(trainer)
    before = trainer.reference_logps(trainer.model, batch)
    trainer.train()
    trainer.model.train()
    assert torch.equal(trainer.reference_logps(trainer.model, batch), before)  # the reference stays frozen
    saved = tmp_path / "final"
    trainer.save_model(str(saved))
    assert (saved / "adapter_model.safetensors").is_file() and not (saved / "reference").exists()


def test_a_fresh_adapter_is_compared_with_the_base_model(tiny_model_path, tmp_path):
    loaded = load(tiny_model_path)
    rows = tokenised_rows(loaded.tokenizer)
    trainer = DPOTrainer(
        model=loaded.model,
        args=dpo_config(tmp_path),
        train_dataset=rows,
        eval_dataset=rows,
        processing_class=loaded.tokenizer,
    )
    assert trainer.reference.description == "the base model with the LoRA adapter disabled"
    assert "reference" not in trainer.model.peft_config  # no copy needed
    _step0_eval(trainer)


def test_ref_adapter_name_picks_that_adapter(tiny_model_path, sft_adapter, tmp_path):
    """A fresh trainable adapter, with the SFT adapter loaded beside it as `ref_adapter_name`: the reference
    log-probs are the SFT adapter's, so step 0 is NOT ln 2 (the policy is the base)."""
    loaded = load(tiny_model_path)
    loaded.model.load_adapter(sft_adapter, adapter_name="sft", is_trainable=False)
    loaded.model.set_adapter("default")
    rows = tokenised_rows(loaded.tokenizer)
    trainer = DPOTrainer(
        model=loaded.model,
        args=dpo_config(tmp_path, ref_adapter_name="sft"),
        train_dataset=rows,
        processing_class=loaded.tokenizer,
    )
    assert trainer.reference.description == "adapter 'sft' (ref_adapter_name)"
    batch = _batch(trainer)
    trainer.model.train()
    sft_only = PeftModel.from_pretrained(_base(tiny_model_path), sft_adapter)
    with torch.no_grad():
        expected = trainer.sequence_logps(sft_only.train(), batch).logps.view(2, -1).t()
        base_logps = trainer.sequence_logps(trainer.model, batch).logps.view(2, -1).t()
    torch.testing.assert_close(trainer.reference_logps(trainer.model, batch), expected, atol=1e-5, rtol=0)
    assert not torch.allclose(expected, base_logps, atol=1e-3)
    assert trainer.model.active_adapter == "default"
    with pytest.raises(ValueError, match="ref_adapter_name='nope' is not an adapter of the model"):
        DPOTrainer(
            model=loaded.model,
            args=dpo_config(tmp_path, ref_adapter_name="nope"),
            train_dataset=rows,
            processing_class=loaded.tokenizer,
        )


def test_a_separate_ref_model_is_the_reference(tiny_model_path, sft_adapter, tmp_path):
    loaded = load(tiny_model_path)
    ref_model = PeftModel.from_pretrained(_base(tiny_model_path), sft_adapter)
    rows = tokenised_rows(loaded.tokenizer)
    trainer = DPOTrainer(
        loaded.model, ref_model, dpo_config(tmp_path), train_dataset=rows, processing_class=loaded.tokenizer
    )
    assert trainer.reference.description == "a separate reference model"
    batch = _batch(trainer)
    with torch.no_grad():
        expected = trainer.sequence_logps(ref_model, batch).logps.view(2, -1).t()
    torch.testing.assert_close(trainer.reference_logps(trainer.model, batch), expected, atol=0, rtol=0)
    assert not any(p.requires_grad for p in ref_model.parameters())


def test_the_callers_args_are_never_modified_and_the_token_never_written(tiny_model_path, tmp_path):
    token = "hf_" + "A1b2C3d4" * 5
    args = dpo_config(
        tmp_path, push_to_hub=True, hub_model_id="me/run", hub_token=token, hub_strategy="every_save"
    )
    before = _fields(args)
    loaded = load(tiny_model_path)
    trainer = DPOTrainer(
        model=loaded.model,
        args=args,
        train_dataset=tokenised_rows(loaded.tokenizer),
        processing_class=loaded.tokenizer,
    )
    assert (
        _fields(args) == before
    )  # hub_token, push_to_hub, hub_strategy, pin memory: as the caller left them
    assert trainer.args is not args and trainer.args.hub_token is None and trainer.args.push_to_hub
    trainer.save_model(str(tmp_path / "saved"), _internal_call=True)  # saved, not pushed
    for path in (tmp_path / "saved").rglob("*"):
        if path.is_file():
            assert token.encode() not in path.read_bytes(), path


def test_a_plain_training_arguments_is_used_with_the_dpo_defaults(tiny_model_path, tmp_path, caplog):
    plain = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        max_steps=2,
        learning_rate=5e-3,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        seed=3,
    )
    before = _fields(plain)
    loaded = load(tiny_model_path)
    rows = tokenised_rows(loaded.tokenizer)
    with caplog.at_level(logging.INFO, logger="hf_dpo"):
        trainer = DPOTrainer(
            model=loaded.model,
            args=plain,
            train_dataset=rows,
            eval_dataset=rows,
            processing_class=loaded.tokenizer,
        )
    assert _fields(plain) == before
    assert isinstance(trainer.args, DPOConfig)
    assert (trainer.args.beta, trainer.args.loss_type, trainer.args.seed, trainer.args.max_steps) == (
        0.1,
        ["sigmoid"],
        3,
        2,
    )
    assert trainer.args.remove_unused_columns is False
    assert any("transformers TrainingArguments" in r.getMessage() for r in caplog.records)
    _step0_eval(trainer)
    trainer.train()
    assert trainer.state.global_step == 2


@pytest.mark.parametrize("four_bit", [True, False], ids=["4bit", "full"])
def test_peft_config_with_a_plain_model(tiny_model_path, tmp_path, four_bit):
    """TRL's call shape: a plain (quantised or not) model plus peft_config=LoraConfig(...)."""
    torch.manual_seed(0)
    base = _base(tiny_model_path, four_bit)
    tokenizer = load(tiny_model_path).tokenizer
    rows = tokenised_rows(tokenizer)
    trainer = DPOTrainer(
        model=base,
        args=dpo_config(tmp_path, max_steps=2),
        train_dataset=rows,
        eval_dataset=rows,
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
    )
    assert isinstance(trainer.model, PeftModel)
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    if four_bit:  # prepared for k-bit training as load_model does: layer norms in fp32
        assert all(p.dtype == torch.float32 for n, p in trainer.model.named_parameters() if "norm" in n)
    _step0_eval(trainer)
    before = lora_state(trainer.model)
    trainer.train()
    after = lora_state(trainer.model)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ValueError, match="already a PeftModel"):
        DPOTrainer(
            model=trainer.model,
            args=dpo_config(tmp_path),
            train_dataset=rows,
            processing_class=tokenizer,
            peft_config=LoraConfig(r=4),
        )


def test_a_model_id_is_loaded_with_its_tokenizer(tiny_model_path, tmp_path):
    raw = [
        {"prompt": f"Question {i}: 2+{i}?", "chosen": f" {2 + i}.", "rejected": " No idea."} for i in range(8)
    ]
    from datasets import Dataset

    trainer = DPOTrainer(
        model=tiny_model_path,
        args=dpo_config(tmp_path, max_steps=1),
        train_dataset=Dataset.from_list(raw),
        eval_dataset=Dataset.from_list(raw),
    )
    assert isinstance(trainer.model, PeftModel) and trainer.processing_class is not None
    _step0_eval(trainer)


def test_a_model_without_adapter_trains_fully_against_a_frozen_copy(tiny_model_path, tmp_path):
    torch.manual_seed(0)
    model = _base(tiny_model_path, four_bit=False)
    tokenizer = load(tiny_model_path).tokenizer
    rows = tokenised_rows(tokenizer)
    trainer = DPOTrainer(
        model=model,
        args=dpo_config(tmp_path, max_steps=2, learning_rate=1e-3),
        train_dataset=rows,
        eval_dataset=rows,
        processing_class=tokenizer,
    )
    assert trainer.reference.description == "a frozen copy of the model"
    _step0_eval(trainer)
    reference_before = {k: v.clone() for k, v in trainer.reference.model.state_dict().items()}
    trainer.train()
    assert all(torch.equal(v, trainer.reference.model.state_dict()[k]) for k, v in reference_before.items())
    assert not torch.equal(model.lm_head.weight, trainer.reference.model.lm_head.weight)


def test_no_private_trainer_method_is_overridden():
    from transformers import Trainer

    private = {n for n in vars(DPOTrainer) if n.startswith("_") and not n.startswith("__")}
    assert not private & {n for n in dir(Trainer) if n.startswith("_")}
    assert dataclasses.is_dataclass(DPOConfig)


# ------------------------------------------------------------------------------------------ publishing

NEVER = ("training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json")


def _assert_hf_dpo_card(text: str, tmp_path) -> None:
    from huggingface_hub import ModelCard

    card = ModelCard(text)
    assert {"dpo", "hf_dpo", "peft", "lora"} <= set(card.data.tags) and card.data.library_name == "peft"
    assert card.data.base_model is None  # a local folder is never metadata
    assert "trained from scratch" not in card.text and str(tmp_path) not in card.text
    assert "Direct Preference Optimization" in card.text and "hf_dpo/tiny-llama" in card.text


def test_push_to_hub_true_publishes_when_train_ends(tiny_model_path, tmp_path, fake_hub):
    loaded = load(tiny_model_path)
    args = dpo_config(tmp_path / "run", push_to_hub=True, hub_model_id="me/run", hub_token=fake_hub.token)
    trainer = DPOTrainer(
        model=loaded.model,
        args=args,
        train_dataset=tokenised_rows(loaded.tokenizer),
        processing_class=loaded.tokenizer,
    )
    trainer.train()
    files = fake_hub.files("me/run")
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md", "tokenizer.json"} <= set(files)
    assert not any(name.endswith(NEVER) for name in files) and not any("/" in name for name in files)
    assert [c["summary"] for c in fake_hub.repos["me/run"].commits] == ["End of training"]
    _assert_hf_dpo_card(files["README.md"].decode(), tmp_path)
    assert files["adapter_model.safetensors"] == (tmp_path / "run" / "adapter_model.safetensors").read_bytes()
    assert all(fake_hub.token.encode() not in data for data in files.values())


def test_push_to_hub_publishes_the_hf_dpo_card_and_keeps_it_locally(tiny_model_path, tmp_path, fake_hub):
    """transformers' own path would publish its generic card, the local folder as base_model and
    training_args.bin, and overwrite the local README.md: none of that happens."""
    loaded = load(tiny_model_path)
    out = tmp_path / "run"
    trainer = DPOTrainer(
        model=loaded.model,
        args=dpo_config(out, hub_model_id="me/later"),
        train_dataset=tokenised_rows(loaded.tokenizer),
        processing_class=loaded.tokenizer,
    )
    trainer.train()
    assert fake_hub.repos == {}  # push_to_hub was not asked for
    url = trainer.push_to_hub(token=fake_hub.token, dataset_name="my/prefs")  # TRL's keyword
    assert url.startswith(f"{fake_hub.endpoint}/me/later/commit/")
    files = fake_hub.files("me/later")
    assert not any(name.endswith(NEVER) for name in files)
    _assert_hf_dpo_card(files["README.md"].decode(), tmp_path)
    assert "my/prefs" in files["README.md"].decode()
    assert (out / "README.md").read_bytes() == files["README.md"]  # the local card is hf_dpo's too
    assert 'PeftModel.from_pretrained(base, "me/later")' in (out / "README.md").read_text()


def test_a_failed_push_raises_with_the_retry_command_and_loses_nothing(tiny_model_path, tmp_path, fake_hub):
    from hf_dpo.hub import HubPushError

    loaded = load(tiny_model_path)
    out = tmp_path / "run"
    trainer = DPOTrainer(
        model=loaded.model,
        args=dpo_config(out, hub_model_id="me/x"),
        train_dataset=tokenised_rows(loaded.tokenizer),
        processing_class=loaded.tokenizer,
    )
    trainer.train()
    fake_hub.fail("commit", 500)
    with pytest.raises(HubPushError) as caught:
        trainer.push_to_hub(token=fake_hub.token)
    assert caught.value.retry_command == f"hf-dpo push {out} --repo-id me/x"
    assert caught.value.retry_command in str(caught.value) and "HTTP 500" in str(caught.value)
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md"} <= {
        p.name for p in out.iterdir()
    }


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["end", "every_save", "checkpoint", "all_checkpoints"])
def test_each_hub_strategy_gives_the_recipes_repo_from_python(tiny_model_path, tmp_path, fake_hub, strategy):
    """The same run through the recipe and through a Python script (train, then save_model, as TRL's scripts
    do) leaves the same files in the repo, the same adapter bytes, and the same checkpoint folders."""
    import hf_dpo.recipe
    from hf_dpo import load_preference_data
    from hf_dpo.config import ModelArguments
    from hf_dpo.data import bundled_data_path
    from hf_dpo.modeling import load_model

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(bundled_data_path().read_text().splitlines(keepends=True)[:16]))
    settings = dict(
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=0.01,
        lora_r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        max_length=64,
        save_strategy="steps",
        save_steps=1,
        report_to="none",
        seed=0,
        disable_tqdm=True,
        push_to_hub=True,
        hub_strategy=strategy,
        hub_token=fake_hub.token,
    )
    argv = [
        "--model_name_or_path",
        tiny_model_path,
        "--dataset_name",
        str(data),
        "--output_dir",
        str(tmp_path / "r"),
    ]
    for key, value in {**settings, "hub_model_id": "me/recipe"}.items():
        argv += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    assert hf_dpo.recipe.main(argv) == 0

    lora = {k: settings.pop(k) for k in ("lora_r", "lora_alpha", "lora_dropout")}
    torch.manual_seed(0)
    loaded = load_model(ModelArguments(model_name_or_path=tiny_model_path, **lora), use_cpu=True)
    args = DPOConfig(output_dir=str(tmp_path / "p"), hub_model_id="me/python", use_cpu=True, **settings)
    trainer = DPOTrainer(
        model=loaded.model,
        args=args,
        train_dataset=load_preference_data(data)["train"],
        processing_class=loaded.tokenizer,
    )
    trainer.train()
    trainer.save_model()

    recipe_files, python_files = fake_hub.files("me/recipe"), fake_hub.files("me/python")
    results = {"train_results.json", "all_results.json"}  # the recipe's save_metrics; a script may skip it
    assert set(recipe_files) - results == set(python_files)
    for name in python_files:
        if name.endswith("adapter_model.safetensors"):
            assert recipe_files[name] == python_files[name], name
    folders = {name.split("/")[0] for name in python_files if "/" in name}
    assert (
        folders
        == {
            "end": set(),
            "every_save": set(),
            "checkpoint": {"last-checkpoint"},
            "all_checkpoints": {"checkpoint-1", "checkpoint-2"},
        }[strategy]
    )
