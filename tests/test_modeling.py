"""hf_dpo.modeling: model preparation happens once and honours every option it is given."""

from __future__ import annotations

import torch
from torch import nn
from trainer_helpers import dpo_config, load

from hf_dpo.modeling import describe_quantization, is_fresh_adapter, prepare_model


def test_lora_dropout_is_kept_under_disable_dropout(tiny_model_path, tmp_path):
    """disable_dropout zeroes the model's dropout (policy and reference passes must agree), but the dropout on
    the trained adapter's input is what `lora_dropout` asks for: the reference never runs that adapter, and a
    fresh adapter adds 0 either way. Before, lora_dropout was silently zeroed too."""
    loaded = load(tiny_model_path, lora_dropout=0.3)
    model = loaded.model
    attention = [m for m in model.modules() if isinstance(getattr(m, "attention_dropout", None), float)]
    prepare_model(model, dpo_config(tmp_path))
    lora = [
        m.lora_dropout["default"]
        for m in model.modules()
        if isinstance(getattr(m, "lora_dropout", None), nn.ModuleDict)
    ]
    assert lora and all(isinstance(d, nn.Dropout) and d.p == 0.3 for d in lora)
    assert attention and all(m.attention_dropout == 0.0 for m in attention)
    others = [m for m in model.modules() if isinstance(m, nn.Dropout) and all(m is not d for d in lora)]
    assert all(m.p == 0.0 for m in others)

    kept = load(tiny_model_path, lora_dropout=0.3).model
    prepare_model(kept, dpo_config(tmp_path, disable_dropout=False))
    assert all(
        m.lora_dropout["default"].p == 0.3
        for m in kept.modules()
        if isinstance(getattr(m, "lora_dropout", None), nn.ModuleDict)
    )


def test_preparation_runs_once_per_model(tiny_model_path, tmp_path):
    loaded = load(tiny_model_path, lora_dropout=0.3)
    prepare_model(loaded.model, dpo_config(tmp_path))
    lora = next(
        m.lora_dropout["default"]
        for m in loaded.model.modules()
        if isinstance(getattr(m, "lora_dropout", None), nn.ModuleDict)
    )
    lora.p = 0.5  # the user changes it after a first trainer was built
    prepare_model(loaded.model, dpo_config(tmp_path))  # a second trainer on the same model
    assert lora.p == 0.5
    prepare_model(
        loaded.model, dpo_config(tmp_path, padding_free=True)
    )  # but padding-free attention is per trainer
    assert loaded.model.config._attn_implementation == "hf_dpo_varlen"


def test_a_fresh_adapter_is_recognised(tiny_model_path):
    loaded = load(tiny_model_path)
    assert is_fresh_adapter(loaded.model)
    with torch.no_grad():
        next(p for n, p in loaded.model.named_parameters() if "lora_B" in n).add_(1e-3)
    assert not is_fresh_adapter(loaded.model)


def test_describe_quantization(tiny_model_path):
    assert describe_quantization(load(tiny_model_path).model) == "4-bit nf4 (compute float32)"
    assert describe_quantization(load(tiny_model_path, load_in_4bit=False).model) == "none (float32)"
    assert describe_quantization(load(tiny_model_path, load_in_4bit=False, load_in_8bit=True).model) == (
        "8-bit (bitsandbytes LLM.int8)"
    )
