"""hf_dpo's DPO step under FSDP2 (`fully_shard`) across the processes of one launch, for comparison with one
process that trains the same rows unsharded.

    python -m torch.distributed.run --standalone --nproc_per_node 2 scripts/fsdp_check.py --out two.json
    python scripts/fsdp_check.py --out one.json

Why not the recipe under `accelerate launch`: accelerate 1.15 runs an FSDP config on CPU as plain gloo data
parallel (`_prepare_backend(cpu=True)` yields MULTI_CPU, and only the accelerator branches switch to FSDP), and
torch's FSDP1 wrapper refuses CPU ("FSDP needs a non-CPU accelerator device"). FSDP2 does run on CPU, so this
script applies it the way accelerate's FSDP2 plugin does (each decoder layer, then the root, parameters resharded
after forward) and drives `DPOTrainer.compute_loss` itself: a plain AdamW step on the global mean loss, the
gradient norm clipped to 1 as the Trainer does, and the metrics logged through `DPOTrainer.log` (summed across
ranks). Under torchrun the model is sharded; run with plain `python` it is not (the ground truth). Each process
takes its contiguous share of every global batch, so the ranks together see the one-process batch.

The model is the tiny Llama in full precision with a fresh LoRA (4-bit weights cannot be sharded on CPU; what
is checked here concerns the LM head, which is never quantised). Rank 0 writes the JSON report (per-step logs,
the final adapter gathered to full tensors, whether the trainer fused the LM head) to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="JSON report (written by rank 0)")
    parser.add_argument("--model", default="hf_dpo/tiny-llama", help="model id or folder (default: tiny)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--global_batch", type=int, default=8, help="pairs per step over all processes")
    # Adam moves a weight whose gradient is near 0 by up to lr on rounding noise alone: keep lr small enough that
    # a 1e-4 comparison of the adapters measures the sharding, not that.
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def decoder_layers(model):
    """The modules accelerate's TRANSFORMER_BASED_WRAP would shard on their own: the model's `_no_split_modules`."""
    base = model.get_base_model()
    names = set(getattr(base, "_no_split_modules", None) or [])
    return [m for m in base.modules() if type(m).__name__ in names]


def full(tensor):
    """The whole tensor on every rank (a collective for DTensors: every rank must call it)."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def run(args) -> dict | None:
    """Train as described above; the report on rank 0 (None on the others)."""
    import torch
    import torch.distributed as dist

    sharded = "WORLD_SIZE" in os.environ  # launched by torchrun
    if sharded:
        dist.init_process_group("gloo" if args.device == "cpu" else "nccl")
    rank, world = (dist.get_rank(), dist.get_world_size()) if sharded else (0, 1)
    if args.global_batch % world:
        raise SystemExit(f"--global_batch {args.global_batch} is not divisible by {world} processes")

    from torch.distributed.fsdp import fully_shard

    from hf_dpo.config import DPOConfig, ModelArguments
    from hf_dpo.data import bundled_data_path, load_preference_data
    from hf_dpo.logps import fusable_lm_head
    from hf_dpo.losses import METRIC_NAMES
    from hf_dpo.modeling import load_model
    from hf_dpo.tiny import resolve_model_path
    from hf_dpo.trainer import DPOTrainer

    if sharded and rank > 0:
        dist.barrier()  # rank 0 builds the tiny model (if asked for) first; the others then read its files
    model_path = resolve_model_path(args.model)
    if sharded and rank == 0:
        dist.barrier()
    torch.manual_seed(args.seed)  # the same fresh LoRA on every rank and in the one-process run
    loaded = load_model(
        ModelArguments(
            model_name_or_path=model_path, load_in_4bit=False, lora_r=4, lora_alpha=8, lora_dropout=0.0
        ),
        use_cpu=args.device == "cpu",
    )
    model = loaded.model
    rows = load_preference_data(bundled_data_path())["train"].select(range(args.steps * args.global_batch))
    with tempfile.TemporaryDirectory(prefix="hf_dpo_fsdp_") as output_dir:
        trainer = DPOTrainer(
            model=model,
            args=DPOConfig(
                output_dir=output_dir,
                use_cpu=args.device == "cpu",
                max_length=128,
                max_prompt_length=64,
                logging_steps=1,
                report_to=[],
                save_strategy="no",
                disable_tqdm=True,
                seed=args.seed,
            ),
            train_dataset=rows,
            processing_class=loaded.tokenizer,
        )
        if sharded:
            for layer in decoder_layers(model):
                fully_shard(layer, reshard_after_forward=True)
            fully_shard(model, reshard_after_forward=True)
        fused_head = fusable_lm_head(model) is not None

        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=0.0)
        per_rank = args.global_batch // world
        model.train()
        logs = []
        for step in range(1, args.steps + 1):
            first = (step - 1) * args.global_batch + rank * per_rank
            features = [trainer.train_dataset[i] for i in range(first, first + per_rank)]
            batch = {
                k: v.to(trainer.args.device) if torch.is_tensor(v) else v
                for k, v in trainer.data_collator(features).items()
            }
            loss = trainer.compute_loss(model, batch)
            loss.backward()  # FSDP2 averages the gradients over the ranks, as DDP does
            grad_norm = full(torch.nn.utils.clip_grad_norm_(params, max_norm=1.0))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            mean_loss = loss.detach().clone()
            if sharded:
                dist.all_reduce(mean_loss)
            trainer.state.global_step = step
            trainer.log({"loss": mean_loss.item() / world, "grad_norm": grad_norm.item()})
            logged = trainer.state.log_history[-1]
            logs.append({k: logged[k] for k in ("step", "loss", "grad_norm", *METRIC_NAMES)})

        adapter = {
            name: full(p.detach()).cpu().tolist() for name, p in model.named_parameters() if "lora_" in name
        }
    report = {
        "world_size": world,
        "sharded": sharded,
        "fused_head": fused_head,
        "logs": logs,
        "adapter": adapter,
        "torch": torch.__version__,
    }
    if sharded:
        dist.barrier()
        dist.destroy_process_group()
    return report if rank == 0 else None


def main(argv=None) -> int:
    import torch

    args = parse_args(argv)
    torch.set_num_threads(1)
    report = run(args)
    if report is not None:
        Path(args.out).write_text(json.dumps(report))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
