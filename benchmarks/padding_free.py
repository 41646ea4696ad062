"""Padding-free (packed) against padded batches in hf_dpo, on data whose completion lengths vary 4:1.

Padded: the 2B sequences of a step are right-padded to the longest. Padding-free (`padding_free=True`):
they are concatenated into one row with restarting position_ids, so no compute is spent on padding (with
flash-attention's varlen kernel when the model uses it; otherwise hf_dpo switches the model to its own
varlen sdpa, `hf_dpo.attention`, which attends within each sequence of the row). Same model, rows, order, seed and live reference in both. Target: >= 1.3x tokens/s.

    OMP_NUM_THREADS=1 python benchmarks/padding_free.py                 # tiny shape, CPU
    OMP_NUM_THREADS=1 python benchmarks/padding_free.py --shape large-vocab --steps 4 --repeat 3
    python benchmarks/padding_free.py --device cuda --shape qwen2.5-0.5b --attn flash_attention_2

Writes benchmarks/results/padding_free_<shape>.md and prints it.
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

TARGET = 1.3
DEFAULT_STEPS = {"tiny": 12, "large-vocab": 4, "qwen2.5-0.5b": 10}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", default="tiny", choices=sorted(common.SHAPES))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeat", type=int, default=4)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--max-length", type=int, default=None)
    parser.add_argument("--reference", default="live", choices=["live", "precomputed"])
    parser.add_argument(
        "--attn", default=None, help="attn_implementation for both (default: the model's, sdpa)"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-warmup-run", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default=str(common.RESULTS_DIR))
    return parser.parse_args(argv)


def varied_data(shape: common.Shape, num_rows: int, max_length: int, seed: int) -> common.DataSpec:
    """Short prompts (1/32..1/8 of max_length) and completions of 3/16..3/4 of max_length: 4:1."""
    return common.DataSpec(
        num_rows=num_rows,
        vocab_size=shape.vocab_size,
        max_length=max_length,
        prompt_len=(max(2, max_length // 32), max_length // 8),
        completion_len=(3 * max_length // 16, 3 * max_length // 4),
        seed=seed,
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    shape = common.SHAPES[args.shape]
    batch = args.batch_size or shape.batch_size
    max_length = args.max_length or shape.max_length
    steps = args.steps or DEFAULT_STEPS.get(shape.name, 10)
    scratch = Path(tempfile.mkdtemp(prefix="hf_dpo_bench_"))
    t0 = time.perf_counter()
    try:
        model_dir = common.build_model_dir(shape, scratch / "model", seed=args.seed)
        data = varied_data(shape, batch * (args.warmup_steps + steps), max_length, args.seed)

        def spec(packed: bool, label: str, n_steps: int = steps, warmup: int = args.warmup_steps):
            return common.make_spec(
                args,
                model_dir,
                shape,
                data,
                batch,
                max_length,
                impl="hf",
                steps=n_steps,
                warmup_steps=warmup,
                precompute_ref_log_probs=args.reference == "precomputed",
                padding_free=packed,
                label=label,
                extra={"attn_implementation": args.attn} if args.attn else {},
            )

        configs = {"padded": False, "padding-free": True}
        if not args.no_warmup_run:
            print("warm-up runs (discarded)", flush=True)
            for name, packed in configs.items():
                common.run_subprocess(spec(packed, f"warm-up {name}", 1, 1), scratch, verbose=True)
        results: dict[str, list[dict]] = {name: [] for name in configs}
        for r, order in enumerate(common.alternate(list(configs), args.repeat)):
            print(f"round {r + 1}/{args.repeat}", flush=True)
            for name in order:
                results[name].append(
                    common.run_subprocess(spec(configs[name], f"{name} #{r + 1}"), scratch, verbose=True)
                )
        text = report(args, shape, batch, max_length, steps, data, results)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    path = (
        Path(args.out_dir)
        / f"padding_free_{shape.name}{'' if args.device == 'cpu' else '_' + args.device}.md"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(text)
    print(f"written {path}\ntotal {time.perf_counter() - t0:.0f} s")
    return 0


def report(args, shape, batch, max_length, steps, data, results) -> str:
    stats = {name: [common.run_stats(r) for r in runs] for name, runs in results.items()}
    rows = [
        ("median step time (ms)", "median_step_s", 1000.0, "lower"),
        ("tokens/s", "tokens_per_s", 1.0, "higher"),
        ("peak RSS growth during training (MiB)", "rss_growth_mib", 1.0, "lower"),
    ]
    if args.device == "cuda":
        rows.append(("peak CUDA memory allocated (MiB)", "cuda_peak_mib", 1.0, "lower"))
    lines, ratios = [], {}
    for title, key, scale, better in rows:
        free = [s[key] for s in stats["padding-free"]]
        padded = [s[key] for s in stats["padded"]]
        ratio = common.median(free) / common.median(padded)
        ratios[key] = ratio
        paired = [f / p for f, p in zip(free, padded)]
        lines.append(
            f"| {title} | {common.median(padded) * scale:,.1f} | {common.median(free) * scale:,.1f} | **{ratio:.2f}** | "
            f"{common.spread(paired)} | {better} |"
        )
    r = ratios["tokens_per_s"]
    met = r >= TARGET
    verdict = f"- padding-free tokens/s >= {TARGET}x padded: **{'met' if met else 'missed'}** ({r:.2f}x" + (
        ")" if met else f", short by {TARGET - r:.2f})"
    )
    padded0 = stats["padded"][0]
    same = all(s["token_sequence"] == padded0["token_sequence"] for v in stats.values() for s in v)
    first = {
        name: next((e for e in runs[0]["log_history"] if "loss" in e), {}) for name, runs in results.items()
    }
    command = " ".join(["OMP_NUM_THREADS=1", "python", "benchmarks/padding_free.py", *sys.argv[1:]])
    return f"""# hf_dpo padding-free vs padded: `{shape.name}` ({args.device}, {args.reference} reference)

Command: `{command}`

- Model: {shape.arch}, vocab {shape.vocab_size}, hidden {shape.hidden_size}, {shape.num_layers} layers, random weights,
  4-bit NF4; LoRA r=16 on all linear layers; attention: {args.attn or "the model default (sdpa)"} padded, {args.attn if args.attn and "flash" in args.attn else "hf_dpo_varlen (per-sequence sdpa)"} padding-free.
- Data: {batch} pairs per step, prompts of {data.prompt_len[0]}-{data.prompt_len[1]} tokens, completions of
  {data.completion_len[0]}-{data.completion_len[1]} tokens (4:1), {padded0["tokens_per_step"]:,.0f} non-padding tokens per step;
  the padded batches are {padded0["padding_fraction"]:.0%} padding. Same rows, same order (identical per-step token
  counts: {"yes" if same else "NO"}).
- Sanity check, first step: logps/chosen padded {first["padded"].get("logps/chosen", float("nan")):.4f} / padding-free
  {first["padding-free"].get("logps/chosen", float("nan")):.4f}.
- Runs: {args.repeat} per configuration, alternating, fresh process each; {args.warmup_steps} warm-up + {steps} measured
  steps; torch threads {args.threads}.
- Machine: {common.machine_line(args.device)}; {common.versions_line()}.

| metric | padded | padding-free | padding-free / padded | paired (min-max) | better |
|---|---:|---:|---:|---:|---|
{chr(10).join(lines)}

{verdict}
"""


if __name__ == "__main__":
    sys.exit(main())
