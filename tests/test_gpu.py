"""The CUDA path: bf16 compute on 4-bit NF4 weights, the fused head in bf16, flash-attention varlen, the paged
8-bit optimizer, FSDP1's wrapper. Marked `gpu`; skipped without CUDA ("needs CUDA"). Each names its CPU twin.

Not yet run on a GPU. They call the checks of scripts/gpu_check.py (the one-command GPU check), on a toy Qwen2
(hidden 256, so LoRA weights reach the 4,096 elements from which bitsandbytes keeps 8-bit optimizer states;
intermediate 8,192, so the MLP's lora_B reaches the 100,000 from which it pages them), so the tests and that
command measure the same thing; the bounds asserted here are written out.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
LN2 = math.log(2.0)
HAS_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None


def needs_cuda(test):
    test = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")(test)
    return pytest.mark.gpu(test)


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def shape(gpu_check):
    # vocab 512, hidden 256, 2 layers, 4 heads / 2 KV heads, intermediate 8,192
    return gpu_check.common.Shape(
        "qwen2-gpu-toy", "qwen2", 512, 256, 2, 4, 2, 8192, 64, 4, tie_word_embeddings=True
    )


@pytest.fixture(scope="module")
def model_dir(gpu_check, shape, tmp_path_factory):
    return gpu_check.build_model_dir(shape, tmp_path_factory.mktemp("gpu_models"), seed=0)


def context(gpu_check, shape, model_dir, scratch: Path, device: str) -> dict:
    """What gpu_check's checks take: the plan (bf16 on CUDA, fp32 on CPU), a loaded model, rows, a folder."""
    plan = gpu_check.make_plan(gpu_check.parse_args(["--device", device, "--smoke"]))
    return {
        "plan": plan,
        "loaded": gpu_check.load(plan, model_dir),
        "model_dir": model_dir,
        "dataset": gpu_check.token_rows(shape, 16, shape.max_length, seed=0),
        "max_length": shape.max_length,
        "scratch": scratch,
    }


@pytest.fixture
def cuda(gpu_check, shape, model_dir, tmp_path) -> dict:
    return context(gpu_check, shape, model_dir, tmp_path, "cuda")


def trained(gpu_check, ctx, **config):
    """A trainer after 2 steps (a non-zero adapter, so lora_A gets gradients and policy != reference)."""
    trainer = gpu_check.make_trainer(
        ctx["plan"], ctx["loaded"], ctx["dataset"], ctx["scratch"] / "t", ctx["max_length"], **config
    )
    trainer.train()
    return trainer


@needs_cuda
def test_bf16_4bit_step0_loss_is_ln2_with_zero_rewards(gpu_check, cuda):
    # CPU twin: tests/test_trainer.py::test_step0_loss_is_ln2_with_zero_rewards
    import bitsandbytes as bnb

    plan, model = cuda["plan"], cuda["loaded"].model
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(m.weight.device.type == "cuda" for m in layers)
    assert {m.compute_dtype for m in layers} == {torch.bfloat16}
    assert {m.weight.dtype for m in layers} == {torch.bfloat16}  # quant storage: what FSDP shards
    trainer = gpu_check.make_trainer(
        plan, cuda["loaded"], cuda["dataset"], cuda["scratch"], cuda["max_length"]
    )
    result = gpu_check.check_step0(plan, trainer)
    assert abs(result["loss"] - LN2) <= 1e-6 and abs(result["eval_loss"] - LN2) <= 1e-6
    assert result["rewards"] == {"chosen": 0.0, "rejected": 0.0, "margins": 0.0, "accuracies": 0.0}


@needs_cuda
def test_bf16_4bit_lora_gradients_match_dequantized_twin(gpu_check, cuda):
    # CPU twin: tests/test_trainer.py::test_lora_gradients_match_dequantized_twin_after_eval_passes
    trainer = trained(gpu_check, cuda)
    trainer.evaluate()
    result = gpu_check.check_twin(cuda["plan"], trainer, "an evaluation pass")
    assert result["gradient_norm"] > 0
    assert result["gradient_relative_error"] <= 3e-2, result


@needs_cuda
def test_fused_head_in_bf16_matches_full_logits(gpu_check, cuda):
    # CPU twin: tests/test_logps.py::test_fused_head_matches_logits_path_with_gradients
    result = gpu_check.check_fused_head(cuda["plan"], trained(gpu_check, cuda))
    assert result["logps_relative_error"] <= 2e-3, result
    assert result["gradient_relative_error"] <= 3e-2, result
    assert result["peak_mib_fused"] <= result["peak_mib_full_logits"]


@needs_cuda
@pytest.mark.parametrize("attention", ["sdpa", "flash_attention_2"])
def test_padding_free_equals_padded_on_cuda(gpu_check, cuda, attention):
    # CPU twin: tests/test_trainer.py::test_padding_free_gives_the_padded_losses_and_gradients
    if attention == "flash_attention_2" and not HAS_FLASH_ATTN:
        pytest.skip("flash_attn not installed")
    trained(gpu_check, cuda)
    result = gpu_check.check_padding_free(cuda["plan"], cuda, attention)
    assert result["attention_kernel"] == ("flash_attention_2" if attention != "sdpa" else "hf_dpo_varlen")
    assert result["logps_relative_error"] <= 3e-2 and result["gradient_relative_error"] <= 3e-2, result
    assert result["status"] == "pass", result


@needs_cuda
def test_paged_adamw_8bit_step_on_cuda(gpu_check, cuda):
    # CPU twin: test_paged_adamw_8bit_step_on_cpu below
    result = gpu_check.check_paged_adamw_8bit(cuda["plan"], cuda)
    assert "uint8" in result["optimizers"]["paged_adamw_8bit"], result  # 8-bit states, not a 32-bit fallback
    assert (
        result["paged_state_tensors"] > 0
    )  # the MLP's lora_B (8,192 x 16) is over bitsandbytes' paging size
    assert result["update_relative_difference"] <= 0.05 and result["base_weights_moved"] is False


def test_paged_adamw_8bit_step_on_cpu(gpu_check, shape, model_dir, tmp_path):
    """On CPU bitsandbytes runs the paged 8-bit AdamW unpaged (with a warning): 8-bit states for the LoRA weights
    of 4,096 elements or more, updates within 5% of torch's AdamW (0.6% measured), base weights untouched."""
    ctx = context(gpu_check, shape, model_dir, tmp_path, "cpu")
    result = gpu_check.check_paged_adamw_8bit(ctx["plan"], ctx)
    assert "bitsandbytes" in result["optimizers"]["paged_adamw_8bit"]
    assert "uint8" in result["optimizers"]["paged_adamw_8bit"], result
    assert 0 < result["update_relative_difference"] <= 0.05, result  # 8-bit states round: not exactly AdamW
    assert result["paged_state_tensors"] == 0 and result["base_weights_moved"] is False


@needs_cuda
def test_fsdp1_wrapped_model_has_no_fused_head(tmp_path):
    # CPU twin: tests/test_fsdp.py (FSDP2; torch's FSDP1 wrapper refuses CPU)
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel

    from hf_dpo.logps import fusable_lm_head
    from hf_dpo.tiny import build_tiny_model

    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        plain = build_tiny_model(vocab_size=64).cuda()
        assert fusable_lm_head(plain) is plain.lm_head
        wrapped = FullyShardedDataParallel(
            build_tiny_model(vocab_size=64), device_id=0, use_orig_params=False
        )
        assert fusable_lm_head(wrapped) is None
        wrapped(input_ids=torch.randint(0, 64, (2, 8), device="cuda")).logits.sum().backward()
        assert fusable_lm_head(wrapped) is None  # after a forward and backward too
    finally:
        dist.destroy_process_group()
