"""Memory soak: train the tiny model for many steps and report how the process's resident memory grows.

    python scripts/memory_soak.py                       # 2,000 steps, RSS at step 200 against step 2,000
    python scripts/memory_soak.py --steps 1000 --json soak.json

The run is a real DPOTrainer run on the bundled data (4-bit base, LoRA, the reference from the same model
with the adapter disabled), one pair per step, with logging every 10 steps and an evaluation every 250, so
every per-step path (metric sums, logging, evaluation, the data loader's epochs) is exercised many times.
RSS is read inside a TrainerCallback after a garbage collection. A leak of even a few KB per step shows as
growth between the two measurements; allocator noise stays well under 1%.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time


def rss_bytes() -> int:
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:  # /proc/self/statm: pages, the second field is resident
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--baseline_step", type=int, default=200)
    parser.add_argument("--model", default="hf_dpo/tiny-llama", help="model id or folder (default: tiny)")
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--eval_steps", type=int, default=250)
    parser.add_argument("--probe_every", type=int, default=100, help="also record RSS every N steps")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    if not 0 < args.baseline_step < args.steps:
        parser.error("need 0 < --baseline_step < --steps")

    import torch
    from transformers import TrainerCallback

    from hf_dpo import DPOConfig, DPOTrainer, ModelArguments, load_model, load_preference_data
    from hf_dpo.data import bundled_data_path

    torch.manual_seed(0)
    loaded = load_model(
        ModelArguments(model_name_or_path=args.model, lora_r=8, lora_alpha=16, lora_dropout=0.0), use_cpu=True
    )
    data = load_preference_data(bundled_data_path(), test_size=0.1, seed=0)

    class RssProbe(TrainerCallback):
        def __init__(self):
            self.rss: dict[int, int] = {}

        def on_step_end(self, _args, state, control, **kwargs):
            step = state.global_step
            if step in (args.baseline_step, args.steps) or step % args.probe_every == 0:
                gc.collect()
                self.rss[step] = rss_bytes()

    probe = RssProbe()
    with tempfile.TemporaryDirectory(prefix="hf_dpo_soak_") as out:
        config = DPOConfig(
            output_dir=out,
            max_steps=args.steps,
            per_device_train_batch_size=args.batch_size,
            per_device_eval_batch_size=16,
            learning_rate=1e-4,
            logging_steps=10,
            eval_strategy="steps",
            eval_steps=args.eval_steps,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            seed=0,
            disable_tqdm=True,
            max_length=256,
            max_prompt_length=128,
        )
        trainer = DPOTrainer(
            model=loaded.model,
            args=config,
            train_dataset=data["train"],
            eval_dataset=data["test"],
            processing_class=loaded.tokenizer,
            callbacks=[probe],
        )
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start

    before, after = probe.rss[args.baseline_step], probe.rss[args.steps]
    figures = {
        "steps": args.steps,
        "baseline_step": args.baseline_step,
        "rss_baseline_mib": before / 2**20,
        "rss_end_mib": after / 2**20,
        "growth_percent": 100.0 * (after - before) / before,
        "growth_bytes_per_step": (after - before) / (args.steps - args.baseline_step),
        "seconds": seconds,
        "rss_mib_by_step": {step: rss / 2**20 for step, rss in sorted(probe.rss.items())},
    }
    print(
        f"RSS {figures['rss_baseline_mib']:.1f} MiB at step {args.baseline_step}, "
        f"{figures['rss_end_mib']:.1f} MiB at step {args.steps}: {figures['growth_percent']:+.2f}% "
        f"({figures['growth_bytes_per_step']:.0f} bytes/step; {seconds:.0f} s)"
    )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(figures, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
