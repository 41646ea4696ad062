"""Shared builders for trainer tests: tiny real models, tokenised preference rows, a dequantised twin."""

from __future__ import annotations

import copy

import torch
from datasets import Dataset

from hf_dpo.config import DPOConfig, ModelArguments
from hf_dpo.modeling import load_model


def tokenised_rows(tokenizer, n: int = 16) -> Dataset:
    """n pairs: a correct sum (chosen) against an evasive answer (rejected), of varying lengths."""
    rows = []
    for i in range(n):
        prompt = tokenizer(f"Question {i}: what is {i} plus {i * 3}?").input_ids
        chosen = tokenizer(f" The answer is {4 * i}.", add_special_tokens=False).input_ids
        rejected = tokenizer(" I do not know" + " really" * (i % 4) + ".", add_special_tokens=False).input_ids
        eos = [tokenizer.eos_token_id]
        rows.append(
            {
                "prompt_input_ids": prompt,
                "completion_input_ids": [chosen + eos, rejected + eos],
                "source_line": i + 1,
            }
        )
    return Dataset.from_list(rows)


def model_args(path: str, **overrides) -> ModelArguments:
    kwargs = dict(model_name_or_path=path, lora_r=4, lora_alpha=8, lora_dropout=0.0)
    kwargs.update(overrides)
    return ModelArguments(**kwargs)


def dpo_config(output_dir, **overrides) -> DPOConfig:
    kwargs = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        learning_rate=5e-3,
        max_steps=4,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
    )
    kwargs.update(overrides)
    return DPOConfig(**kwargs)


def lora_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" in k}


def base_state(model) -> dict[str, torch.Tensor]:
    """Every non-LoRA tensor, 4-bit packed weights included (as stored)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" not in k}


def dequantized_twin(peft_model):
    """A full-precision copy of a 4-bit peft model: every Linear4bit becomes an fp32 nn.Linear holding the
    dequantised weight; LoRA weights are copied. Its gradients are the ground truth for the 4-bit model."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit

    twin = copy.deepcopy(peft_model)
    for _name, module in list(twin.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, bnb.nn.Linear4bit):
                weight = dequantize_4bit(child.weight.data, child.weight.quant_state).float()
                linear = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                linear.weight.data.copy_(weight)
                linear.weight.requires_grad_(False)
                if child.bias is not None:
                    linear.bias.data.copy_(child.bias.data.float())
                    linear.bias.requires_grad_(False)
                setattr(module, child_name, linear)
    return twin


def load(path, seed: int = 0, **overrides):
    """The tiny model in 4-bit with a fresh LoRA whose random init depends only on `seed`."""
    torch.manual_seed(seed)
    return load_model(model_args(str(path), **overrides), use_cpu=True)
