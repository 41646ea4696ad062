"""DPOTrainer on a tiny real Llama in real bitsandbytes 4-bit with a real peft LoRA adapter."""

from __future__ import annotations

import json
import math

import pytest
import torch
from trainer_helpers import (
    base_state,
    dequantized_twin,
    dpo_config,
    load,
    lora_state,
    model_args,
    tokenised_rows,
)
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from hf_dpo.callbacks import NonFiniteLossError
from hf_dpo.collator import PreferenceCollator
from hf_dpo.losses import METRIC_NAMES
from hf_dpo.modeling import guard_cpu_4bit_repacking, load_model
from hf_dpo.trainer import DPOTrainer

LN2 = math.log(2.0)


def _trainer(path, out, dataset=None, loaded=None, **config):
    loaded = loaded or load(path)
    dataset = dataset if dataset is not None else tokenised_rows(loaded.tokenizer)
    args = dpo_config(out, **config)
    return DPOTrainer(
        model=loaded.model,
        args=args,
        train_dataset=dataset,
        eval_dataset=dataset,
        processing_class=loaded.tokenizer,
    )


def _batch(trainer, n=4):
    collator = PreferenceCollator(pad_token_id=trainer.processing_class.pad_token_id)
    return trainer._prepare_inputs(collator([trainer.train_dataset[i] for i in range(n)]))


def test_step0_loss_is_ln2_with_zero_rewards(tiny_model_path, tmp_path):
    """A fresh LoRA (B = 0) makes policy == reference: loss ln 2, rewards and margins 0, accuracy 0 (ties)."""
    trainer = _trainer(tiny_model_path, tmp_path)
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, _batch(trainer))
    assert loss.item() == pytest.approx(LN2, abs=1e-6)
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] == pytest.approx(LN2, abs=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert metrics[f"eval_{key}"] == 0.0
    assert set(f"eval_{k}" for k in METRIC_NAMES) <= set(metrics)


def test_one_policy_forward_and_one_reference_forward_per_step(tiny_model_path, tmp_path):
    trainer = _trainer(tiny_model_path, tmp_path)
    calls = []
    base = trainer.model.get_base_model()
    handle = base.register_forward_hook(lambda m, a, kw_out=None: calls.append(torch.is_grad_enabled()))
    trainer.model.train()
    batch = _batch(trainer)
    trainer.compute_loss(trainer.model, batch)
    handle.remove()
    assert calls == [True, False]  # the concatenated policy forward, then the no-grad reference forward
    assert batch["input_ids"].shape[0] == 8  # 4 pairs -> 8 rows [chosen; rejected]


def test_reference_equals_base_model_without_adapter_before_and_after_training(tiny_model_path, tmp_path):
    trainer = _trainer(tiny_model_path, tmp_path, max_steps=3)
    batch = _batch(trainer)
    trainer.model.train()
    before = trainer.reference_logps(trainer.model, batch)

    plain = AutoModelForCausalLM.from_pretrained(
        tiny_model_path,
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
        ),
        dtype=torch.float32,
        device_map={"": "cpu"},
    )
    guard_cpu_4bit_repacking(plain)
    plain.train()
    with torch.no_grad():
        plain_logps = trainer.sequence_logps(plain, batch).logps.view(2, -1).t()
    assert torch.equal(before, plain_logps)

    trainer.train()
    trainer.model.train()
    after = trainer.reference_logps(trainer.model, batch)
    assert torch.equal(before, after)
    with torch.no_grad():
        policy = trainer.sequence_logps(trainer.model, batch).logps.view(2, -1).t()
    assert not torch.allclose(policy, after)  # the policy did move


def test_continued_adapter_is_the_reference(tiny_model_path, tmp_path):
    first = _trainer(tiny_model_path, tmp_path / "sft", max_steps=3)
    first.train()
    first.save_model(str(tmp_path / "sft"))

    loaded = load(tiny_model_path, adapter_name_or_path=str(tmp_path / "sft"))
    trainer = _trainer(tiny_model_path, tmp_path / "dpo", loaded=loaded, max_steps=3)
    assert trainer.reference.description == "a frozen copy of the loaded adapter"
    batch = _batch(trainer)
    trainer.model.train()

    from peft import PeftModel

    fresh = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(
            tiny_model_path,
            quantization_config=BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
            ),
            dtype=torch.float32,
            device_map={"": "cpu"},
        ),
        str(tmp_path / "sft"),
    )
    guard_cpu_4bit_repacking(fresh)
    fresh.train()
    with torch.no_grad():
        adapter_logps = trainer.sequence_logps(fresh, batch).logps.view(2, -1).t()
    ref_before = trainer.reference_logps(trainer.model, batch)
    torch.testing.assert_close(ref_before, adapter_logps, atol=1e-6, rtol=0)
    # step 0: the policy is the same adapter, so the loss is ln 2
    assert trainer.compute_loss(trainer.model, batch).item() == pytest.approx(LN2, abs=1e-6)
    trainer.train()
    trainer.model.train()
    assert torch.equal(trainer.reference_logps(trainer.model, batch), ref_before)
    reference_params = {k: v for k, v in trainer.model.named_parameters() if ".reference." in k}
    assert reference_params and not any(p.requires_grad for p in reference_params.values())


def test_only_lora_weights_change(tiny_model_path, tmp_path):
    trainer = _trainer(tiny_model_path, tmp_path, max_steps=3)
    lora_before, base_before = lora_state(trainer.model), base_state(trainer.model)
    trainer.train()
    lora_after, base_after = lora_state(trainer.model), base_state(trainer.model)
    assert any(not torch.equal(lora_before[k], lora_after[k]) for k in lora_before if "lora_B" in k)
    assert all(not torch.equal(lora_before[k], lora_after[k]) for k in lora_before if "lora_B" in k)
    assert base_before.keys() == base_after.keys()
    for key in base_before:
        assert torch.equal(base_before[key], base_after[key]), key


def test_lora_gradients_match_dequantized_twin_after_eval_passes(tiny_model_path, tmp_path):
    """Evaluation (eval mode, no_grad) and reference passes must not corrupt later 4-bit LoRA gradients
    (bitsandbytes repacks weights for CPU inference on AVX512-BF16 machines). Ground truth: the same model
    with every 4-bit weight dequantised to an fp32 nn.Linear."""
    trainer = _trainer(tiny_model_path, tmp_path, max_steps=2)
    trainer.train()  # non-zero LoRA B, so gradients reach lora_A too
    trainer.evaluate()  # eval-mode no-grad passes over every 4-bit layer
    model = trainer.model
    model.train()
    batch = _batch(trainer)
    twin = dequantized_twin(model)
    twin.train()

    model.zero_grad()
    trainer.compute_loss(model, batch).backward()
    twin.zero_grad()
    trainer.compute_loss(twin, batch).backward()
    grads = {k: p.grad for k, p in model.named_parameters() if p.requires_grad}
    twin_grads = {k: p.grad for k, p in twin.named_parameters() if p.requires_grad}
    assert grads.keys() == twin_grads.keys() and grads
    for key in grads:
        torch.testing.assert_close(grads[key], twin_grads[key], atol=1e-5, rtol=1e-4, msg=key)


def test_gradient_accumulation_1x8_equals_8x1(tiny_model_path, tmp_path):
    """One micro-batch of 8 pairs and eight micro-batches of 1 give the same update (1e-5)."""
    big = _trainer(tiny_model_path, tmp_path / "big", max_steps=2, per_device_train_batch_size=8)
    big.train()
    small = _trainer(
        tiny_model_path,
        tmp_path / "small",
        max_steps=2,
        per_device_train_batch_size=1,
        gradient_accumulation_steps=8,
    )
    small.train()
    a, b = lora_state(big.model), lora_state(small.model)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-5, msg=key)
    # metrics are summed and counted over micro-batches, so the first logged step agrees
    first_big = next(h for h in big.state.log_history if "loss" in h)
    first_small = next(h for h in small.state.log_history if "loss" in h)
    for key in ("loss", *METRIC_NAMES):
        assert first_big[key] == pytest.approx(first_small[key], rel=1e-4, abs=1e-6), key


def test_gradient_checkpointing_gives_same_training(tiny_model_path, tmp_path):
    plain = _trainer(tiny_model_path, tmp_path / "a", max_steps=2)
    plain.train()
    torch.manual_seed(0)
    ckpt_loaded = load_model(model_args(str(tiny_model_path)), use_cpu=True, gradient_checkpointing=True)
    ckpt = _trainer(
        tiny_model_path, tmp_path / "b", loaded=ckpt_loaded, max_steps=2, gradient_checkpointing=True
    )
    ckpt.train()
    a, b = lora_state(plain.model), lora_state(ckpt.model)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=2e-6, rtol=1e-5, msg=key)


def test_checkpoints_hold_only_the_adapter_and_resume_exactly(tiny_model_path, tmp_path):
    straight = _trainer(
        tiny_model_path, tmp_path / "straight", max_steps=4, save_strategy="steps", save_steps=2
    )
    straight.train()

    ckpt = tmp_path / "straight" / "checkpoint-2"
    files = {p.name for p in ckpt.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "README.md"} <= files
    assert not any(name.startswith(("model", "pytorch_model")) for name in files)

    resumed = _trainer(
        tiny_model_path, tmp_path / "resumed", max_steps=4, save_strategy="steps", save_steps=2
    )
    resumed.train(resume_from_checkpoint=str(ckpt))
    a, b = lora_state(straight.model), lora_state(resumed.model)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    losses = [h["loss"] for h in straight.state.log_history if "loss" in h]
    resumed_losses = [h["loss"] for h in resumed.state.log_history if "loss" in h]
    assert resumed_losses == losses[-len(resumed_losses) :]


def test_precomputed_and_live_reference_give_the_same_losses(tiny_model_path, tmp_path):
    live = _trainer(tiny_model_path, tmp_path / "live", max_steps=3)
    live.train()
    pre = _trainer(tiny_model_path, tmp_path / "pre", max_steps=3, precompute_ref_log_probs=True)
    pre.train()
    live_losses = [h["loss"] for h in live.state.log_history if "loss" in h]
    pre_losses = [h["loss"] for h in pre.state.log_history if "loss" in h]
    assert len(live_losses) == 3
    assert pre_losses == pytest.approx(live_losses, abs=1e-5)


def test_lora_gradients_match_twin_after_precomputing(tiny_model_path, tmp_path):
    trainer = _trainer(tiny_model_path, tmp_path, max_steps=2, precompute_ref_log_probs=True)
    trainer.train()
    model = trainer.model
    model.train()
    batch = _batch(trainer)
    twin = dequantized_twin(model)
    twin.train()
    model.zero_grad()
    trainer.compute_loss(model, batch).backward()
    twin.zero_grad()
    trainer.compute_loss(twin, batch).backward()
    for (key, p), (_, q) in zip(
        ((k, p) for k, p in model.named_parameters() if p.requires_grad),
        ((k, q) for k, q in twin.named_parameters() if q.requires_grad),
    ):
        rel = (p.grad - q.grad).norm() / q.grad.norm().clamp(min=1e-12)
        assert rel < 1e-3, key


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "robust"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_every_loss_and_reduction_trains_end_to_end(tiny_model_path, tmp_path, loss_type, reduction):
    trainer = _trainer(
        tiny_model_path,
        tmp_path,
        max_steps=3,
        loss_type=loss_type,
        logp_reduction=reduction,
        label_smoothing=0.1 if loss_type == "robust" else 0.0,
    )
    before = lora_state(trainer.model)
    trainer.model.train()
    step0 = trainer.compute_loss(trainer.model, _batch(trainer)).item()
    expected = {"sigmoid": LN2, "ipo": (1 / (2 * 0.1)) ** 2, "hinge": 1.0, "robust": LN2}[loss_type]
    assert step0 == pytest.approx(expected, abs=1e-5)  # h = 0 at step 0: the closed form at h = 0
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    after = lora_state(trainer.model)
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_plackett_luce_with_ranked_rows_trains(tiny_model_path, tmp_path, tiny_tokenizer):
    """Ranked rows with K = 3 responses: B*K rows in one forward; ln(3!) = 1.791759 at step 0."""
    from datasets import Dataset

    loaded = load(tiny_model_path)
    tok = loaded.tokenizer
    rows = []
    for i in range(8):
        prompt = tok(f"Rank answers to {i} + {i}:").input_ids
        answers = [f" {2 * i}.", f" maybe {2 * i + 1}.", " no idea."]
        completions = [tok(a, add_special_tokens=False).input_ids + [tok.eos_token_id] for a in answers]
        rows.append({"prompt_input_ids": prompt, "completion_input_ids": completions, "source_line": i + 1})
    trainer = _trainer(
        tiny_model_path,
        tmp_path,
        dataset=Dataset.from_list(rows),
        loaded=loaded,
        max_steps=3,
        loss_type="plackett_luce",
    )
    batch = _batch(trainer)
    assert batch["input_ids"].shape[0] == 12
    trainer.model.train()
    assert trainer.compute_loss(trainer.model, batch).item() == pytest.approx(math.log(6), abs=1e-5)
    trainer.train()
    assert all(math.isfinite(h["loss"]) for h in trainer.state.log_history if "loss" in h)


def test_bundled_data_short_run_learns_held_out_preferences(tiny_model_path, tmp_path):
    """On the bundled sample, a short CPU run lowers the loss and lifts held-out reward accuracy above 0.5."""
    from hf_dpo.data import bundled_data_path, load_preference_data

    loaded = load(tiny_model_path, lora_r=8, lora_alpha=16)
    data = load_preference_data(bundled_data_path(), test_size=0.2, seed=0)
    args = dpo_config(
        tmp_path,
        max_steps=120,
        per_device_train_batch_size=8,
        learning_rate=2e-3,
        lr_scheduler_type="cosine",
        warmup_steps=5,
        logging_steps=20,
        max_length=256,
        max_prompt_length=128,
    )
    trainer = DPOTrainer(
        model=loaded.model,
        args=args,
        train_dataset=data["train"],
        eval_dataset=data["test"],
        processing_class=loaded.tokenizer,
    )
    before = trainer.evaluate()
    assert before["eval_loss"] == pytest.approx(LN2, abs=1e-6)
    trainer.train()
    after = trainer.evaluate()
    assert after["eval_loss"] < before["eval_loss"] - 0.1
    assert after["eval_rewards/accuracies"] > 0.65
    assert after["eval_rewards/margins"] > 0


def test_precomputed_reference_is_cached_and_skips_the_reference_forward(tiny_model_path, tmp_path):
    live = _trainer(tiny_model_path, tmp_path / "live")
    batch = _batch(live)
    live.model.train()
    live_ref = live.reference_logps(live.model, batch)

    pre = _trainer(tiny_model_path, tmp_path / "pre", precompute_ref_log_probs=True)
    assert "ref_logps" in pre.train_dataset.column_names
    pre_batch = _batch(pre)
    torch.testing.assert_close(pre_batch["ref_logps"], live_ref, atol=1e-5, rtol=0)

    calls = []
    handle = pre.model.get_base_model().register_forward_hook(lambda *a: calls.append(1))
    pre.model.train()
    assert pre.compute_loss(pre.model, pre_batch).item() == pytest.approx(LN2, abs=1e-5)
    assert len(calls) == 1  # the policy forward only
    handle.remove()

    import hf_dpo.reference_cache as cache

    computed = []
    original = cache._compute_rows
    cache._compute_rows = lambda *a, **k: computed.append(1) or original(*a, **k)
    try:
        again = _trainer(tiny_model_path, tmp_path / "again", precompute_ref_log_probs=True)
    finally:
        cache._compute_rows = original
    assert computed == []  # served from the on-disk cache
    assert again.train_dataset["ref_logps"] == pre.train_dataset["ref_logps"]


def test_final_save_and_logged_metric_names(tiny_model_path, tmp_path):
    trainer = _trainer(tiny_model_path, tmp_path, max_steps=2)
    trainer.train()
    trainer.evaluate()
    trainer.save_model()
    names = {p.name for p in tmp_path.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "README.md"} <= names
    assert "model.safetensors" not in names
    logged = {k for h in trainer.state.log_history for k in h}
    assert set(METRIC_NAMES) <= logged
    assert {f"eval_{k}" for k in METRIC_NAMES} <= logged
    run_info = json.loads((tmp_path / "hf_dpo_run.json").read_text())
    assert run_info["training"]["loss_type"] == ["sigmoid"]


def test_nonfinite_loss_stops_with_step_and_rows(tiny_model_path, tmp_path):
    trainer = _trainer(tiny_model_path, tmp_path, max_steps=2, learning_rate=float("inf"))
    with pytest.raises(
        NonFiniteLossError,
        match=r"non-finite (\w+ at|weights after the update of) step \d+, <dataset> rows \d+",
    ):
        trainer.train()


def test_nonfinite_batches_can_be_skipped(tiny_model_path, tmp_path):
    trainer = _trainer(
        tiny_model_path, tmp_path, max_steps=3, learning_rate=float("inf"), nonfinite_action="skip"
    )
    trainer.train()
    assert trainer.guard.skipped >= 1
    assert any(h.get("nonfinite_batches_skipped", 0) >= 1 for h in trainer.state.log_history)


def test_checkpoint_cut_short_is_never_resumed(tiny_model_path, tmp_path):
    """The save of checkpoint-4 crashes after the adapter is written: resume picks checkpoint-2, refuses 4,
    and the resumed run ends where an uninterrupted one does."""
    from hf_dpo.callbacks import resolve_resume_checkpoint

    out = tmp_path / "run"
    trainer = _trainer(tiny_model_path, out, max_steps=6, save_strategy="steps", save_steps=2)
    original = trainer._save_rng_state

    def failing_rng_save(output_dir):
        if output_dir.endswith("checkpoint-4"):
            raise RuntimeError("crash while saving (simulated)")
        return original(output_dir)

    trainer._save_rng_state = failing_rng_save
    with pytest.raises(RuntimeError, match="simulated"):
        trainer.train()
    assert (out / "checkpoint-4" / "adapter_model.safetensors").exists()  # half written
    assert resolve_resume_checkpoint(True, str(out)) == str(out / "checkpoint-2")
    with pytest.raises(ValueError, match="not a complete"):
        resolve_resume_checkpoint(str(out / "checkpoint-4"), str(out))

    resumed = _trainer(tiny_model_path, out, max_steps=6, save_strategy="steps", save_steps=2)
    resumed.train(resume_from_checkpoint=True)
    straight = _trainer(tiny_model_path, tmp_path / "straight", max_steps=6)
    straight.train()
    a, b = lora_state(straight.model), lora_state(resumed.model)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_padding_free_gives_the_padded_losses_and_gradients(tiny_model_path, tmp_path):
    """Packed rows with per-sequence (varlen) attention: same sequence log-probs, loss and LoRA gradients as
    the padded batch (1e-5), and the model's attention is hf_dpo's varlen kernel, not an N x N mask."""
    from hf_dpo.attention import VARLEN_ATTENTION

    padded = _trainer(tiny_model_path, tmp_path / "padded", max_steps=1)
    packed = _trainer(tiny_model_path, tmp_path / "packed", max_steps=1, padding_free=True)
    assert packed.model.config._attn_implementation == VARLEN_ATTENTION
    rows = [padded.train_dataset[i] for i in range(4)]
    padded_batch = padded._prepare_inputs(PreferenceCollator(pad_token_id=0)(rows))
    packed_batch = packed._prepare_inputs(PreferenceCollator(pad_token_id=0, padding_free=True)(rows))
    assert packed_batch["input_ids"].shape[0] == 1
    # a trained adapter, so the policy differs from the reference and gradients are non-trivial
    padded.train()
    for p, q in zip(padded.model.parameters(), packed.model.parameters()):
        q.data.copy_(p.data)
    results = []
    for trainer, batch in ((padded, padded_batch), (packed, packed_batch)):
        trainer.model.train()
        trainer.model.zero_grad()
        logps = trainer.sequence_logps(trainer.model, batch).logps
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        grads = [p.grad.clone() for p in trainer.model.parameters() if p.requires_grad]
        results.append((logps.detach(), loss.detach(), grads))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(results[0][1], results[1][1], atol=1e-6, rtol=1e-5)
    for a, b in zip(results[0][2], results[1][2]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_raw_rows_are_normalised_and_tokenised_by_the_trainer(tiny_model_path, tmp_path):
    """A datasets.Dataset of the seed's rows goes straight into DPOTrainer: the implicit prompt is the common
    prefix cut at the last whitespace, ids follow the tokenisation contract, EOS ends each completion."""
    from datasets import Dataset

    from hf_dpo.data import PreferenceDataError

    loaded = load(tiny_model_path)
    tok = loaded.tokenizer
    raw = Dataset.from_list(
        [
            {
                "chose": "Question: is water wet? Answer: yes, it is",
                "rejected": "Question: is water wet? Answer: no",
            },
            {"chose": "Name a colour. Blue", "rejected": "Name a colour. Seven"},
        ]
    )
    trainer = _trainer(tiny_model_path, tmp_path, dataset=raw, loaded=loaded)
    first = trainer.train_dataset[0]
    assert first["prompt_input_ids"] == tok("Question: is water wet? Answer:").input_ids
    full = tok("Question: is water wet? Answer: yes, it is").input_ids
    assert first["prompt_input_ids"] + first["completion_input_ids"][0] == full + [tok.eos_token_id]
    assert first["completion_input_ids"][1][-1] == tok.eos_token_id
    assert len(trainer.train_dataset) == 2

    bad = Dataset.from_list([{"chose": "Name a colour. Blue", "rejected": 7}])
    with pytest.raises(PreferenceDataError, match="rejected"):
        _trainer(tiny_model_path, tmp_path / "bad", dataset=bad, loaded=load(tiny_model_path))


def test_building_the_tiny_model_leaves_the_callers_rng_alone():
    """The tiny model is built from its own seed inside a forked RNG: the training seed's stream is intact."""
    from hf_dpo.tiny import build_tiny_model

    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    first = build_tiny_model(vocab_size=64)
    assert torch.equal(torch.rand(3), expected)
    second = build_tiny_model(vocab_size=64)
    for a, b in zip(first.parameters(), second.parameters()):
        assert torch.equal(a, b)


def test_a_pairwise_loss_refuses_ranked_rows_up_front(tiny_model_path, tmp_path):
    """K = 3 under loss_type sigmoid is refused when the trainer is built, naming the data line; the same rows
    train under plackett_luce."""
    from datasets import Dataset

    from hf_dpo.data import PreferenceDataError

    rows = Dataset.from_list(
        [
            {"prompt": "Name a prime:", "chosen": " 7", "rejected": " 8", "responses": None},
            {"prompt": "Name a prime:", "chosen": None, "rejected": None, "responses": [" 7", " 9", " 10"]},
        ]
    )
    with pytest.raises(
        PreferenceDataError, match=r"<train dataset>, row 2, field 'responses': .* 3 responses"
    ):
        _trainer(tiny_model_path, tmp_path / "sigmoid", dataset=rows)
    trainer = _trainer(tiny_model_path, tmp_path / "pl", dataset=rows, loss_type="plackett_luce")
    assert len(trainer.train_dataset) == 2
