"""Prompt sharing: [prompt | chosen | rejected] (or K ranked responses) in one sequence gives the log-probs,
gradients and training of the prompt repeated before every completion, on the tiny 4-bit model (fp32)."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from datasets import Dataset
from trainer_helpers import dpo_config, load, lora_state, model_args, tokenised_rows

from hf_dpo.collator import PreferenceCollator, SharedPromptLayout
from hf_dpo.logps import shared_completion_positions
from hf_dpo.losses import METRIC_NAMES
from hf_dpo.modeling import load_model
from hf_dpo.trainer import DPOTrainer

LN2_FP32 = torch.tensor(math.log(2.0), dtype=torch.float32).item()  # -logsigmoid(0) in fp32, exactly
LAYOUTS = [pytest.param(False, id="padded"), pytest.param(True, id="padding_free")]
RESPONSES = [pytest.param(2, id="pairs"), pytest.param(4, id="ranked_k4")]


def ranked_rows(tokenizer, n: int = 12) -> Dataset:
    """n prompts with 4 responses best first (every third row has only 3: a missing response)."""
    rows = []
    for i in range(n):
        prompt = tokenizer(f"Rank the answers to question {i}: what is {i} times {i + 2}?").input_ids
        answers = [f" It is {i * (i + 2)}.", f" Perhaps {i * (i + 2) + 1}.", " Ask someone else.", " No."]
        if i % 3 == 2:
            answers = answers[:3]
        completions = [
            tokenizer(a, add_special_tokens=False).input_ids + [tokenizer.eos_token_id] for a in answers
        ]
        rows.append({"prompt_input_ids": prompt, "completion_input_ids": completions, "source_line": i + 1})
    return Dataset.from_list(rows)


def _trainer(path, out, k: int = 2, loaded=None, dataset=None, **config):
    loaded = loaded or load(path)
    if dataset is None:
        dataset = tokenised_rows(loaded.tokenizer) if k == 2 else ranked_rows(loaded.tokenizer)
    config.setdefault("loss_type", "sigmoid" if k == 2 else "plackett_luce")
    return DPOTrainer(
        model=loaded.model,
        args=dpo_config(out, **config),
        train_dataset=dataset,
        processing_class=loaded.tokenizer,
    )


def _perturb_adapter(model, seed: int = 1) -> None:
    """Non-zero LoRA B, so the policy differs from the reference and gradients reach every LoRA weight."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)


def _batches(trainer, indices, padding_free: bool):
    rows = [trainer.train_dataset[i] for i in indices]
    pad = trainer.processing_class.pad_token_id
    shared = PreferenceCollator(pad_token_id=pad, padding_free=padding_free, share_prompt=True)(rows)
    unshared = PreferenceCollator(pad_token_id=pad, padding_free=padding_free)(rows)
    return trainer._prepare_inputs(shared), trainer._prepare_inputs(unshared)


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


# ------------------------------------------------------------------------------------- the gather
def test_every_completion_is_predicted_from_the_last_prompt_position():
    """Row 0: prompt [10 11 12], completions [20 21] and [30]; row 1: prompt [40], completions [50] and
    [60 61 62]. Padded (B, T) rows and one packed row: the first token of each completion is predicted by its
    prompt's last position; sequence k*B + b is completion k of row b."""
    rows = [
        {"prompt_input_ids": [10, 11, 12], "completion_input_ids": [[20, 21], [30]]},
        {"prompt_input_ids": [40], "completion_input_ids": [[50], [60, 61, 62]]},
    ]
    padded = PreferenceCollator(pad_token_id=0, share_prompt=True)(rows)
    assert padded["input_ids"].tolist() == [[10, 11, 12, 20, 21, 30], [40, 50, 60, 61, 62, 0]]
    index, targets, sequences, count = shared_completion_positions(
        padded["input_ids"], SharedPromptLayout.from_batch(padded)
    )
    assert count == 4
    # flat positions in (2 * 6): row 1 starts at 6
    assert index.tolist() == [2, 3, 2, 6, 6, 8, 9]
    assert targets.tolist() == [20, 21, 30, 50, 60, 61, 62]
    assert sequences.tolist() == [0, 0, 2, 1, 3, 3, 3]

    packed = PreferenceCollator(pad_token_id=0, padding_free=True, share_prompt=True)(rows)
    assert packed["input_ids"].tolist() == [[10, 11, 12, 20, 21, 30, 40, 50, 60, 61, 62]]
    index, targets, sequences, count = shared_completion_positions(
        packed["input_ids"], SharedPromptLayout.from_batch(packed)
    )
    assert index.tolist() == [2, 3, 2, 6, 6, 8, 9]
    assert targets.tolist() == [20, 21, 30, 50, 60, 61, 62] and sequences.tolist() == [0, 0, 2, 1, 3, 3, 3]


def test_a_completion_after_an_empty_prompt_skips_its_first_token():
    """As in the unshared path, a first token with nothing before it is not scored."""
    rows = [{"prompt_input_ids": [], "completion_input_ids": [[20, 21, 22], [30, 31]]}]
    batch = PreferenceCollator(pad_token_id=0, share_prompt=True)(rows)
    index, targets, sequences, _ = shared_completion_positions(
        batch["input_ids"], SharedPromptLayout.from_batch(batch)
    )
    assert (
        index.tolist() == [0, 1, 3] and targets.tolist() == [21, 22, 31] and sequences.tolist() == [0, 0, 1]
    )


# ------------------------------------------------------------------------- log-probs and gradients
@pytest.mark.parametrize("padding_free", LAYOUTS)
@pytest.mark.parametrize("k", RESPONSES)
def test_shared_logps_and_lora_gradients_equal_unshared(tiny_model_path, tmp_path, k, padding_free):
    """Per-sequence log-probs (policy, with gradients) and the LoRA gradients of the DPO loss (policy and
    live reference) agree with the prompt repeated per completion, to 1e-5 relative."""
    trainer = _trainer(tiny_model_path, tmp_path, k=k, padding_free=padding_free)
    assert trainer.data_collator.share_prompt
    model = trainer.model
    _perturb_adapter(model)
    model.train()
    shared, unshared = _batches(trainer, range(6), padding_free)
    assert shared["input_ids"].numel() < unshared["input_ids"].numel()

    results = {}
    for name, batch in (("shared", shared), ("unshared", unshared)):
        model.zero_grad()
        logps = trainer.sequence_logps(model, batch)
        loss = trainer.compute_loss(model, batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results[name] = (logps, loss.detach(), grads)
    (s_logps, s_loss, s_grads), (u_logps, u_loss, u_grads) = results["shared"], results["unshared"]
    assert s_logps.logps.shape == (k * 6,)
    torch.testing.assert_close(s_logps.logps, u_logps.logps, rtol=1e-5, atol=1e-6)
    assert torch.equal(s_logps.token_counts, u_logps.token_counts)
    torch.testing.assert_close(s_logps.logit_sums, u_logps.logit_sums, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s_loss, u_loss, rtol=1e-5, atol=0)
    assert s_grads.keys() == u_grads.keys() and len(s_grads) > 0
    for name in u_grads:
        assert u_grads[name].norm() > 0, name
        assert _relative_error(s_grads[name], u_grads[name]) < 1e-5, name


@pytest.mark.slow
@pytest.mark.parametrize("padding_free", LAYOUTS)
@pytest.mark.parametrize("k", RESPONSES)
def test_twenty_step_training_matches_unshared(tiny_model_path, tmp_path, k, padding_free):
    """20 optimizer steps through DPOTrainer: the logged losses and metrics of every step agree to 1e-4."""
    histories = {}
    for share in (True, False):
        trainer = _trainer(
            tiny_model_path,
            tmp_path / str(share),
            k=k,
            max_steps=20,
            per_device_train_batch_size=3,
            padding_free=padding_free,
            share_prompt=share,
        )
        assert trainer.data_collator.share_prompt is share
        trainer.train()
        histories[share] = [h for h in trainer.state.log_history if "loss" in h]
    shared, unshared = histories[True], histories[False]
    assert len(shared) == len(unshared) == 20
    assert shared[-1]["rewards/margins"] > 0.01  # it trained: the comparison is not between two idle runs
    for step, (a, b) in enumerate(zip(shared, unshared)):
        for key in ("loss", *METRIC_NAMES):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-4), (step, key)


# --------------------------------------------------------------------------------- exactness at step 0
@pytest.mark.parametrize("padding_free", LAYOUTS)
def test_fresh_adapter_gives_exactly_ln2_and_zero_rewards(tiny_model_path, tmp_path, padding_free):
    """Policy and reference run the same shared path on the same weights (LoRA B = 0): loss == ln 2 and
    rewards == 0, bit for bit, with the live reference and with the precomputed one (computed in other
    batches: evaluation batches of 8)."""
    live = _trainer(tiny_model_path, tmp_path / "live", padding_free=padding_free)
    pre = _trainer(
        tiny_model_path, tmp_path / "pre", padding_free=padding_free, precompute_ref_log_probs=True
    )
    for trainer in (live, pre):
        assert trainer.data_collator.share_prompt
        trainer.model.train()
        for indices in ([0, 1, 2, 3], [9, 4, 15], [7]):
            rows = [trainer.train_dataset[i] for i in indices]
            batch = trainer._prepare_inputs(trainer.data_collator(rows))
            assert "shared_layout" in batch and ("ref_logps" in batch) == (trainer is pre)
            loss, outputs = trainer.compute_loss(trainer.model, batch, return_outputs=True)
            assert loss.item() == LN2_FP32
            assert torch.equal(outputs["rewards"], torch.zeros_like(outputs["rewards"]))
    metrics = live.evaluate(live.train_dataset)
    assert metrics["eval_loss"] == LN2_FP32
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert metrics[f"eval_{key}"] == 0.0


def test_separate_reference_model_shares_prompts_too(tiny_model_path, tmp_path, caplog):
    """A separate ref_model (the plain 4-bit base) is switched to hf_dpo's attention as well: step 0 gives
    exactly ln 2. One that cannot share (flash-attention) turns sharing off for the run, naming ref_model."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from hf_dpo.attention import VARLEN_ATTENTION
    from hf_dpo.modeling import guard_cpu_4bit_repacking

    def plain_model():
        quantization = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
        )
        model = AutoModelForCausalLM.from_pretrained(
            tiny_model_path, quantization_config=quantization, dtype=torch.float32, device_map={"": "cpu"}
        )
        guard_cpu_4bit_repacking(model)
        return model

    loaded = load(tiny_model_path)
    trainer = DPOTrainer(
        model=loaded.model,
        args=dpo_config(tmp_path / "a"),
        train_dataset=tokenised_rows(loaded.tokenizer),
        processing_class=loaded.tokenizer,
        ref_model=plain_model(),
    )
    assert trainer.data_collator.share_prompt
    assert trainer.ref_model.config._attn_implementation == VARLEN_ATTENTION
    trainer.model.train()
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(4)]))
    assert trainer.compute_loss(trainer.model, batch).item() == LN2_FP32

    flash = plain_model()
    flash.config._attn_implementation = "flash_attention_2"
    loaded = load(tiny_model_path)
    with caplog.at_level(logging.WARNING, logger="hf_dpo.trainer"):
        trainer = DPOTrainer(
            model=loaded.model,
            args=dpo_config(tmp_path / "b"),
            train_dataset=tokenised_rows(loaded.tokenizer),
            processing_class=loaded.tokenizer,
            ref_model=flash,
        )
    lines = _fallback_lines(caplog)
    assert len(lines) == 1 and "ref_model" in lines[0] and "flash_attention_2" in lines[0], lines
    assert not trainer.data_collator.share_prompt


def test_precomputed_reference_is_cached_per_prompt_layout(tiny_model_path, tmp_path):
    """Shared and repeated prompts agree only to rounding: each keeps its own reference cache entry."""
    from hf_dpo.reference_cache import reference_cache_key

    loaded = load(tiny_model_path)
    shared = _trainer(tiny_model_path, tmp_path / "a", loaded=loaded)
    unshared = _trainer(tiny_model_path, tmp_path / "b", loaded=loaded, share_prompt=False)
    dataset = shared.train_dataset
    assert reference_cache_key(shared, dataset) != reference_cache_key(unshared, dataset)


# ------------------------------------------------------------------------ checkpointing and accumulation
def test_gradient_checkpointing_with_shared_prompts(tiny_model_path, tmp_path):
    """Shared + gradient checkpointing trains like unshared without it (2 steps, LoRA weights to 2e-6)."""
    plain = _trainer(tiny_model_path, tmp_path / "a", max_steps=2, share_prompt=False)
    plain.train()
    torch.manual_seed(0)
    loaded = load_model(model_args(str(tiny_model_path)), use_cpu=True, gradient_checkpointing=True)
    ckpt = _trainer(tiny_model_path, tmp_path / "b", loaded=loaded, max_steps=2, gradient_checkpointing=True)
    assert ckpt.data_collator.share_prompt and ckpt.model.is_gradient_checkpointing
    ckpt.train()
    a, b = lora_state(plain.model), lora_state(ckpt.model)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=2e-6, rtol=1e-5, msg=key)


@pytest.mark.parametrize("padding_free", LAYOUTS)
def test_gradient_accumulation_1x8_equals_8x1_with_shared_prompts(tiny_model_path, tmp_path, padding_free):
    big = _trainer(
        tiny_model_path,
        tmp_path / "big",
        max_steps=2,
        per_device_train_batch_size=8,
        padding_free=padding_free,
    )
    small = _trainer(
        tiny_model_path,
        tmp_path / "small",
        max_steps=2,
        per_device_train_batch_size=1,
        gradient_accumulation_steps=8,
        padding_free=padding_free,
    )
    assert big.data_collator.share_prompt and small.data_collator.share_prompt
    big.train()
    small.train()
    a, b = lora_state(big.model), lora_state(small.model)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-5, msg=key)
    first_big = next(h for h in big.state.log_history if "loss" in h)
    first_small = next(h for h in small.state.log_history if "loss" in h)
    for key in ("loss", *METRIC_NAMES):
        assert first_big[key] == pytest.approx(first_small[key], rel=1e-4, abs=1e-6), key


# ------------------------------------------------------------------------------------------- fallback
def _fallback_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "share_prompt is off" in r.getMessage()]


def test_flash_attention_model_falls_back_with_one_log_line(tiny_model_path, tmp_path, caplog):
    loaded = load(tiny_model_path)
    loaded.model.config._attn_implementation = "flash_attention_2"
    with caplog.at_level(logging.WARNING, logger="hf_dpo.trainer"):
        trainer = _trainer(tiny_model_path, tmp_path, loaded=loaded)
    lines = _fallback_lines(caplog)
    assert len(lines) == 1 and "flash_attention_2" in lines[0], lines
    assert not trainer.data_collator.share_prompt
    assert trainer.model.config._attn_implementation == "flash_attention_2"  # left as it was


def test_unchecked_model_type_falls_back_and_trains_unshared(tmp_path, tiny_tokenizer, caplog):
    """A GPT-2 (not a model type hf_dpo has checked): one log line, then it trains with repeated prompts."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=512, n_embd=32, n_layer=2, n_head=2, n_positions=256)
    config._attn_implementation = "sdpa"
    model = get_peft_model(
        GPT2LMHeadModel(config), LoraConfig(r=4, target_modules=["c_attn"], task_type="CAUSAL_LM")
    )
    with caplog.at_level(logging.WARNING, logger="hf_dpo.trainer"):
        trainer = DPOTrainer(
            model=model,
            args=dpo_config(tmp_path, max_steps=2),
            train_dataset=tokenised_rows(tiny_tokenizer, 8),
            processing_class=tiny_tokenizer,
        )
        trainer.train()
    lines = _fallback_lines(caplog)
    assert len(lines) == 1 and "'gpt2'" in lines[0], lines
    assert not trainer.data_collator.share_prompt
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and losses[0] == pytest.approx(math.log(2), abs=1e-4)


def test_sliding_window_shorter_than_max_length_falls_back(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from hf_dpo.attention import prompt_sharing_unsupported

    common = dict(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2
    )
    windowed = Qwen2ForCausalLM(
        Qwen2Config(**common, use_sliding_window=True, sliding_window=64, max_window_layers=0)
    )
    windowed.config._attn_implementation = "sdpa"
    assert "sliding-window" in prompt_sharing_unsupported(windowed, max_length=128)
    assert prompt_sharing_unsupported(windowed, max_length=64) is None  # the window never cuts a sequence
    full = Qwen2ForCausalLM(Qwen2Config(**common))
    full.config._attn_implementation = "sdpa"
    assert prompt_sharing_unsupported(full, max_length=None) is None


def test_a_shared_batch_on_a_model_without_hf_dpo_attention_is_refused(tiny_model_path, tmp_path):
    """A shared batch reaching a model that would let completions see each other fails loudly."""
    trainer = _trainer(tiny_model_path, tmp_path)
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(2)]))
    other = load(tiny_model_path).model
    other.config._attn_implementation = "sdpa"
    with pytest.raises(ValueError, match="prompt-shared batch needs"):
        trainer.sequence_logps(other, batch)


def test_share_prompt_false_collates_the_prompt_per_completion(tiny_model_path, tmp_path):
    trainer = _trainer(tiny_model_path, tmp_path, share_prompt=False)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    assert "shared_layout" not in batch and batch["input_ids"].shape[0] == 6
