"""FSDP: the fused LM head is off under any FSDP wrapping, and a 2-process FSDP2 run on CPU (gloo) trains what
one unsharded process trains.

The fused head reads `lm_head.weight` after the model's forward. Under FSDP that is a shard, a DTensor or a view
into a flat parameter, depending on the FSDP version and on whether the root resharded after its forward: with
`reshard_after_forward=True` on the root (what accelerate's FSDP2 plugin passes) the fused matmul fails with
"aten.mm.default got mixed torch.Tensor and DTensor"; with torch's default it happens to read the unsharded
weight. `hf_dpo.logps.fusable_lm_head` therefore answers None for any FSDP-managed model.

accelerate 1.15 cannot run FSDP on CPU (an FSDP config becomes plain gloo data parallel there, with no error)
and torch's FSDP1 wrapper refuses CPU, so the 2-process run is scripts/fsdp_check.py: FSDP2 `fully_shard` applied
as accelerate's plugin applies it, driving DPOTrainer.compute_loss (see its docstring). The accelerate +
FSDP1 + QLoRA path (recipes/accelerate_configs/fsdp_qlora.yaml) is the `fsdp` stage of scripts/gpu_check.py
on GPUs; tests/test_gpu.py checks `fusable_lm_head` on an FSDP1 wrapper there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from hf_dpo.logps import fusable_lm_head
from hf_dpo.losses import METRIC_NAMES
from hf_dpo.tiny import build_tiny_model

REPO = Path(__file__).resolve().parents[1]
FSDP_CHECK = REPO / "scripts" / "fsdp_check.py"
TOLERANCE = 1e-4


@pytest.fixture
def one_process_group(tmp_path):
    """A 1-process gloo group through a file store (no port), torn down after the test."""
    if dist.is_initialized():
        pytest.fail("a process group is already initialised in this test process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_fusable_lm_head_is_none_for_fsdp2_wrapped_models(one_process_group):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    plain = build_tiny_model(vocab_size=64)
    assert fusable_lm_head(plain) is plain.lm_head  # the control: an unwrapped model's head is fused

    whole = build_tiny_model(vocab_size=64)
    for layer in whole.model.layers:
        fully_shard(layer)
    fully_shard(whole)  # as accelerate's FSDP2 plugin: each decoder layer, then the root
    assert isinstance(whole.lm_head.weight, DTensor)
    assert fusable_lm_head(whole) is None

    head_only = build_tiny_model(vocab_size=64)
    fully_shard(head_only.lm_head)  # the head is its own FSDP unit; nothing above it is wrapped
    assert fusable_lm_head(head_only) is None

    layers_only = build_tiny_model(vocab_size=64)
    fully_shard(layers_only.model.layers[0])  # FSDP manages a layer, not the head: its weight stays whole
    assert not isinstance(layers_only.lm_head.weight, DTensor)
    assert fusable_lm_head(layers_only) is layers_only.lm_head


def test_fusable_lm_head_sees_fsdp2_around_a_peft_model(one_process_group, tiny_model_path):
    """accelerate shards the model it is given: for hf_dpo, the peft model (the root of the chain to the head)."""
    from torch.distributed.fsdp import fully_shard
    from trainer_helpers import load

    model = load(tiny_model_path, load_in_4bit=False).model
    assert fusable_lm_head(model) is not None
    fully_shard(model)
    assert fusable_lm_head(model) is None


def test_fusable_lm_head_is_none_for_a_dtensor_head_weight(one_process_group):
    """A head whose weight is a DTensor (tensor parallel, or FSDP2 bookkeeping) with no FSDP module around it."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    model = build_tiny_model(vocab_size=64)
    mesh = init_device_mesh("cpu", (1,))
    model.lm_head.weight = nn.Parameter(distribute_tensor(model.lm_head.weight.data, mesh, [Replicate()]))
    assert fusable_lm_head(model) is None


def test_fsdp2_wrapped_peft_model_gives_the_unwrapped_log_probs(one_process_group, tiny_model_path, tmp_path):
    """Through DPOTrainer.sequence_logps, an FSDP2-wrapped model (real logits, no fused head) gives the log-probs
    the same model gives unwrapped (fused head), in the forward the policy and the reference both use."""
    from torch.distributed.fsdp import fully_shard
    from trainer_helpers import dpo_config, load, tokenised_rows

    from hf_dpo.collator import PreferenceCollator
    from hf_dpo.trainer import DPOTrainer

    loaded = load(tiny_model_path, load_in_4bit=False)
    trainer = DPOTrainer(
        model=loaded.model,
        args=dpo_config(tmp_path),
        train_dataset=tokenised_rows(loaded.tokenizer),
        processing_class=loaded.tokenizer,
    )
    batch = PreferenceCollator(pad_token_id=0)([trainer.train_dataset[i] for i in range(4)])
    model = trainer.model
    with torch.no_grad():
        assert fusable_lm_head(model) is not None
        unwrapped = trainer.sequence_logps(model, batch).logps
        for layer in model.get_base_model().model.layers:
            fully_shard(layer, reshard_after_forward=True)
        fully_shard(model, reshard_after_forward=True)
        assert fusable_lm_head(model) is None
        wrapped = trainer.sequence_logps(model, batch).logps
    torch.testing.assert_close(wrapped, unwrapped, atol=1e-5, rtol=1e-6)


def _fsdp_check(command: list, out: Path, env: dict) -> dict:
    result = subprocess.run(
        [str(c) for c in [*command, FSDP_CHECK, "--out", out, "--model"]] + [env["TINY_MODEL"]],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_two_process_fsdp2_gives_the_metrics_and_adapter_of_one_process(tiny_model_path, tmp_path):
    """4 steps of 8 pairs: 2 processes x 4 pairs, FSDP2-sharded, against 1 process x 8 pairs unsharded; every
    logged metric and the final adapter agree to 1e-4, and only the unsharded run fuses the LM head."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TINY_MODEL=tiny_model_path)
    env["HF_DPO_CACHE"] = str(tmp_path / "cache")
    one = _fsdp_check([sys.executable], tmp_path / "one.json", env)
    two = _fsdp_check(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
        tmp_path / "two.json",
        env,
    )
    assert (one["world_size"], one["sharded"], one["fused_head"]) == (1, False, True)
    assert (two["world_size"], two["sharded"], two["fused_head"]) == (2, True, False)
    assert [e["step"] for e in one["logs"]] == [e["step"] for e in two["logs"]] == [1, 2, 3, 4]
    assert one["logs"][0]["loss"] == pytest.approx(0.6931472, abs=1e-6)  # a fresh adapter: ln 2
    metric_diff = max(
        abs(a[k] - b[k])
        for a, b in zip(one["logs"], two["logs"])
        for k in ("loss", "grad_norm", *METRIC_NAMES)
    )
    a = {k: torch.tensor(v) for k, v in one["adapter"].items()}
    b = {k: torch.tensor(v) for k, v in two["adapter"].items()}
    assert a.keys() == b.keys() and a
    adapter_diff = max((a[k] - b[k]).abs().max().item() for k in a)
    print(
        f"FSDP2 2 processes vs 1: max abs difference {metric_diff:.2e} in metrics, {adapter_diff:.2e} in adapter"
    )
    assert metric_diff <= TOLERANCE and adapter_diff <= TOLERANCE
    assert min(a[k].abs().max().item() for k in a if "lora_B" in k) > 10 * TOLERANCE  # lora_B starts at 0


def test_fsdp_qlora_config_saves_a_full_state_dict():
    """Under FSDP, transformers' Trainer.save_model writes the model only with a FULL_STATE_DICT: with
    SHARDED_STATE_DICT a run under recipes/accelerate_configs/fsdp_qlora.yaml would end without
    adapter_model.safetensors. Checked through accelerate launch's own parsing (the variables its workers get)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    config = REPO / "recipes" / "accelerate_configs" / "fsdp_qlora.yaml"
    args = launch_command_parser().parse_args(["--config_file", str(config), str(FSDP_CHECK)])
    args, _, _ = _validate_launch_command(args)
    env = prepare_multi_gpu_env(args)
    assert env["FSDP_STATE_DICT_TYPE"] == "FULL_STATE_DICT"
    assert (env["FSDP_SHARDING_STRATEGY"], env["FSDP_USE_ORIG_PARAMS"]) == ("FULL_SHARD", "false")
