"""hf_dpo against TRL's DPOTrainer: same model, tokenizer, rows, LoRA, batch, max length, steps and seed.

Both trainers get the same 4-bit NF4 model folder (random weights, saved once), the same token ids (TRL's
own tokenisation is skipped), LoRA r=16 / alpha=32 / dropout 0 on all linear layers, sigmoid DPO loss with
beta 0.1, live reference (the same model with the adapter disabled) unless --reference precomputed, no
gradient checkpointing and fp32 on CPU. Each measurement is a fresh subprocess; hf_dpo and TRL alternate
(hf TRL, TRL hf, ...) --repeat times after a short warm-up run of each. Reported: median step time,
tokens/s (non-padding prompt + completion tokens of chosen and rejected per second of training step),
peak memory, and hf_dpo / TRL for each.

    OMP_NUM_THREADS=1 python benchmarks/vs_trl.py                       # tiny and large-vocab, CPU
    OMP_NUM_THREADS=1 python benchmarks/vs_trl.py --shape tiny --repeat 5 --steps 20
    python benchmarks/vs_trl.py --device cuda --shape qwen2.5-0.5b        # real-size architecture on a GPU

Writes benchmarks/results/vs_trl_<shape>[_<reference>][_<device>].md and prints it.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

DEFAULT_STEPS = {"tiny": 10, "large-vocab": 4, "qwen2.5-0.5b": 10}
TARGETS = {
    "tokens_per_s": ("tokens/s with live reference >= 1.3x TRL", lambda r: r >= 1.3),
    "peak_memory_large_vocab": ("peak memory on large-vocab <= 0.6x TRL", lambda r: r <= 0.6),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--shape",
        nargs="+",
        default=None,
        choices=sorted(common.SHAPES),
        help="shapes to run (default: tiny large-vocab on CPU, qwen2.5-0.5b on CUDA)",
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeat", type=int, default=3, help="runs of each implementation per shape")
    parser.add_argument("--steps", type=int, default=None, help="measured steps per run (default per shape)")
    parser.add_argument(
        "--warmup-steps", type=int, default=2, help="steps discarded at the start of each run"
    )
    parser.add_argument("--batch-size", type=int, default=None, help="pairs per step (default per shape)")
    parser.add_argument("--max-length", type=int, default=None, help="default per shape")
    parser.add_argument("--reference", default="live", choices=["live", "precomputed"])
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads per worker (keep 1 on a shared CPU)"
    )
    parser.add_argument(
        "--trl-lora-dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help="TRL casts QLoRA adapters to bf16; auto keeps that on CUDA and uses fp32 (as hf_dpo) on CPU",
    )
    parser.add_argument(
        "--gradient-checkpointing",
        default=None,
        action=argparse.BooleanOptionalAction,
        help="both trainers (default: off on CPU, on on CUDA as in TRL's defaults)",
    )
    parser.add_argument("--no-warmup-run", action="store_true", help="skip the discarded warm-up run of each")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default=str(common.RESULTS_DIR))
    return parser.parse_args(argv)


def run_shape(args, shape: common.Shape, scratch: Path) -> str:
    on_cuda = args.device == "cuda"
    batch = args.batch_size or shape.batch_size
    max_length = args.max_length or shape.max_length
    steps = args.steps or DEFAULT_STEPS.get(shape.name, 10)
    model_dir = scratch / f"model_{shape.name}"
    if not model_dir.exists():
        print(f"[{shape.name}] building the random-weight model folder", flush=True)
        common.build_model_dir(shape, model_dir, seed=args.seed)
    data = common.default_data_spec(
        shape, num_rows=batch * (args.warmup_steps + steps), max_length=max_length, seed=args.seed
    )
    trl_lora = (
        args.trl_lora_dtype if args.trl_lora_dtype != "auto" else ("bfloat16" if on_cuda else "float32")
    )
    checkpointing = args.gradient_checkpointing if args.gradient_checkpointing is not None else on_cuda

    def spec(impl: str, label: str, n_steps: int = steps, warmup: int = args.warmup_steps) -> common.RunSpec:
        return common.make_spec(
            args,
            model_dir,
            shape,
            data,
            batch,
            max_length,
            impl=impl,
            steps=n_steps,
            warmup_steps=warmup,
            precompute_ref_log_probs=args.reference == "precomputed",
            gradient_checkpointing=checkpointing,
            trl_lora_dtype=trl_lora,
            label=label,
        )

    if not args.no_warmup_run:
        print(f"[{shape.name}] warm-up runs (discarded)", flush=True)
        for impl in ("hf", "trl"):
            common.run_subprocess(spec(impl, f"warm-up {impl}", n_steps=1, warmup=0), scratch, verbose=True)

    results: dict[str, list[dict]] = {"hf": [], "trl": []}
    for r, order in enumerate(common.alternate(["hf", "trl"], args.repeat)):
        print(f"[{shape.name}] round {r + 1}/{args.repeat}: {' then '.join(order)}", flush=True)
        for impl in order:
            results[impl].append(common.run_subprocess(spec(impl, f"{impl} #{r + 1}"), scratch, verbose=True))

    return report(args, shape, batch, max_length, steps, trl_lora, checkpointing, results)


def report(args, shape, batch, max_length, steps, trl_lora, checkpointing, results) -> str:
    stats = {impl: [common.run_stats(r) for r in runs] for impl, runs in results.items()}
    on_cuda = args.device == "cuda"
    rows = [
        ("median step time (ms)", "median_step_s", 1000.0, "lower"),
        ("tokens/s", "tokens_per_s", 1.0, "higher"),
    ]
    if on_cuda:
        rows += [
            ("peak CUDA memory allocated (MiB)", "cuda_peak_mib", 1.0, "lower"),
            ("peak CUDA memory above pre-train (MiB)", "cuda_growth_mib", 1.0, "lower"),
        ]
    rows += [
        ("peak RSS of the process (MiB)", "rss_peak_mib", 1.0, "lower"),
        ("peak RSS growth during training (MiB)", "rss_growth_mib", 1.0, "lower"),
    ]
    lines = []
    ratios = {}
    for title, key, scale, better in rows:
        hf_vals = [s[key] for s in stats["hf"]]
        trl_vals = [s[key] for s in stats["trl"]]
        hf_med, trl_med = common.median(hf_vals), common.median(trl_vals)
        paired = [h / t for h, t in zip(hf_vals, trl_vals) if t]
        ratio = hf_med / trl_med if trl_med else float("nan")
        ratios[key] = ratio
        lines.append(
            f"| {title} | {hf_med * scale:,.1f} | {trl_med * scale:,.1f} | **{ratio:.2f}** | "
            f"{common.spread(paired)} | {better} |"
        )
    same_tokens = all(
        s["token_sequence"] == stats["hf"][0]["token_sequence"] for s in stats["hf"] + stats["trl"]
    )
    first = {
        impl: next((e for e in runs[0]["log_history"] if "loss" in e), {}) for impl, runs in results.items()
    }
    tokens_per_step = stats["hf"][0]["tokens_per_step"]
    padding = stats["hf"][0]["padding_fraction"]

    memory_key = "cuda_peak_mib" if on_cuda else "rss_peak_mib"
    verdicts = []
    if args.reference == "live":
        name, check = TARGETS["tokens_per_s"]
        r = ratios["tokens_per_s"]
        verdicts.append(f"- {name}: **{'met' if check(r) else 'missed'}** ({r:.2f}x)")
    if shape.name == "large-vocab":
        name, check = TARGETS["peak_memory_large_vocab"]
        for key in (memory_key, "rss_growth_mib" if not on_cuda else "cuda_growth_mib"):
            r = ratios[key]
            verdicts.append(f"- {name} ({key}): **{'met' if check(r) else 'missed'}** ({r:.2f}x)")

    device_text = common.machine_line(args.device)
    command = " ".join(["OMP_NUM_THREADS=1", "python", "benchmarks/vs_trl.py", *sys.argv[1:]])
    text = f"""# hf_dpo vs TRL DPOTrainer: `{shape.name}` ({args.device}, {args.reference} reference)

Command: `{command}`

- Model: {shape.arch}, vocab {shape.vocab_size}, hidden {shape.hidden_size}, {shape.num_layers} layers,
  {shape.num_heads} heads / {shape.num_kv_heads} KV heads, intermediate {shape.intermediate_size}; random weights,
  4-bit NF4, compute {"bf16" if on_cuda else "fp32"}; LoRA r=16, alpha=32, dropout 0, all linear layers
  (TRL adapters in {trl_lora}).
- Data: {batch} pairs per step, max_length {max_length}, {tokens_per_step:,.0f} non-padding tokens per step on
  average ({padding:.0%} of the padded batch is padding); the same token ids in the same order for both
  (identical per-step token counts: {"yes" if same_tokens else "NO"}).
- Runs: {args.repeat} per implementation, alternating, each a fresh process; {args.warmup_steps} warm-up + {steps}
  measured steps per run; torch threads {args.threads}; gradient checkpointing {"on" if checkpointing else "off"};
  hf_dpo with its defaults (prompt sharing on; prompts are 1/16 to 1/4 of max_length here, so it gains little).
- Sanity check, first step (same weights, same rows): loss hf_dpo {first["hf"].get("loss", float("nan")):.6f} /
  TRL {first["trl"].get("loss", float("nan")):.6f}; logps/chosen hf_dpo {first["hf"].get("logps/chosen", float("nan")):.4f} /
  TRL {first["trl"].get("logps/chosen", float("nan")):.4f}.
- Machine: {device_text}; {common.versions_line()}.

| metric | hf_dpo | TRL | hf_dpo / TRL | paired ratios (min-max) | better |
|---|---:|---:|---:|---:|---|
{chr(10).join(lines)}

Medians over runs. A run's step time is the median of its measured steps, its tokens/s the median over
its steps of (non-padding tokens / step time). "Paired ratios" are hf_dpo / TRL of runs made back to back. "Peak RSS growth" is the peak during `train()` above the RSS just before it (model loaded,
trainer built, reference precomputed if asked): the training loop's own memory.

{chr(10).join(verdicts) if verdicts else ""}
"""
    return text


def main(argv=None) -> int:
    args = parse_args(argv)
    shapes = args.shape or (["qwen2.5-0.5b"] if args.device == "cuda" else ["tiny", "large-vocab"])
    scratch = Path(tempfile.mkdtemp(prefix="hf_dpo_bench_"))
    t0 = time.perf_counter()
    try:
        for name in shapes:
            text = run_shape(args, common.SHAPES[name], scratch)
            suffix = "" if args.reference == "live" else f"_{args.reference}"
            suffix += "" if args.device == "cpu" else f"_{args.device}"
            out = Path(args.out_dir)
            out.mkdir(parents=True, exist_ok=True)
            path = out / f"vs_trl_{name}{suffix}.md"
            path.write_text(text)
            print(text)
            print(f"written {path}", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"total {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
