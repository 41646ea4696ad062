"""Peak training memory against sequence length, hf_dpo and TRL, on the large-vocab shape.

Every row is exactly max_length tokens (prompt 1/4, completions 3/4), for max_length 256, 512, 1024, 2048,
so a step holds 2 x batch x max_length tokens with no padding. A straight line fitted to the peak memory
of the training loop against the tokens of a step gives the memory per token of each trainer. An fp32
[tokens, vocab] log-softmax (or logits) term would add vocab x 4 bytes per token (125 KiB at vocab 32000),
plus as much again for its gradient; hf_dpo is meant to have no such term beyond one chunk, so its slope
should be the backbone's activations alone and should not change with the vocabulary (--vocabs shows that).

    OMP_NUM_THREADS=1 python benchmarks/length_sweep.py
    OMP_NUM_THREADS=1 python benchmarks/length_sweep.py --lengths 256 512 1024 2048 4096 --impls hf
    OMP_NUM_THREADS=1 python benchmarks/length_sweep.py --impls hf --vocabs 8000 32000 128000

Writes benchmarks/results/length_sweep_<shape>.md and prints it.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

NAMES = {"hf": "hf_dpo", "trl": "TRL"}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", default="large-vocab", choices=sorted(common.SHAPES))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.add_argument("--batch-size", type=int, default=2, help="pairs per step")
    parser.add_argument("--impls", nargs="+", default=["hf", "trl"], choices=["hf", "trl"])
    parser.add_argument(
        "--vocabs",
        type=int,
        nargs="+",
        default=None,
        help="vocabulary sizes to sweep (default: the shape's own)",
    )
    parser.add_argument("--steps", type=int, default=1, help="measured steps per run (after 1 warm-up step)")
    parser.add_argument(
        "--logp-chunk-size", type=int, default=None, help="hf_dpo's logp_chunk_size (default: 64 MiB of fp32)"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default=str(common.RESULTS_DIR))
    return parser.parse_args(argv)


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares (intercept, slope)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if n < 2 or sxx == 0:
        return my, float("nan")
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return my - slope * mx, slope


def main(argv=None) -> int:
    args = parse_args(argv)
    base_shape = common.SHAPES[args.shape]
    on_cuda = args.device == "cuda"
    vocabs = args.vocabs or [base_shape.vocab_size]
    scratch = Path(tempfile.mkdtemp(prefix="hf_dpo_bench_"))
    t0 = time.perf_counter()
    results: dict[tuple[int, str], list[dict]] = {}
    try:
        for vocab in vocabs:
            shape = dataclasses.replace(base_shape, vocab_size=vocab, max_length=max(args.lengths))
            model_dir = common.build_model_dir(shape, scratch / f"model_{vocab}", seed=args.seed)
            for i, length in enumerate(args.lengths):
                data = common.DataSpec(
                    num_rows=args.batch_size * (1 + args.steps),
                    vocab_size=vocab,
                    max_length=length,
                    prompt_len=(length // 4, length // 4),
                    completion_len=(length - length // 4, length - length // 4),
                    seed=args.seed,
                )
                order = args.impls if i % 2 == 0 else list(reversed(args.impls))
                for impl in order:
                    spec = common.RunSpec(
                        impl=impl,
                        model_dir=str(model_dir),
                        shape=asdict(shape),
                        data=asdict(data),
                        batch_size=args.batch_size,
                        max_length=length,
                        steps=args.steps,
                        warmup_steps=1,
                        device=args.device,
                        threads=args.threads,
                        seed=args.seed,
                        bf16=on_cuda,
                        compute_dtype="bfloat16" if on_cuda else "float32",
                        trl_lora_dtype="bfloat16" if on_cuda else "float32",
                        logp_chunk_size=args.logp_chunk_size,
                        label=f"{impl} vocab {vocab} max_length {length}",
                    )
                    results.setdefault((vocab, impl), []).append(
                        common.run_subprocess(spec, scratch, verbose=True)
                    )
        text = report(args, base_shape, vocabs, results)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    suffix = ("" if args.device == "cpu" else f"_{args.device}") + ("_vocabs" if args.vocabs else "")
    suffix += "" if args.logp_chunk_size is None else f"_chunk{args.logp_chunk_size}"
    path = Path(args.out_dir) / f"length_sweep_{base_shape.name}{suffix}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(text)
    print(f"written {path}\ntotal {time.perf_counter() - t0:.0f} s")
    return 0


def report(args, shape, vocabs, results) -> str:
    on_cuda = args.device == "cuda"
    growth_key = "cuda_growth_mib" if on_cuda else "rss_growth_mib"
    peak_key = "cuda_peak_mib" if on_cuda else "rss_peak_mib"
    header = "| vocab | max_length | tokens/step |"
    sep = "|---:|---:|---:|"
    for impl in args.impls:
        header += f" {NAMES[impl]} peak (MiB) | {NAMES[impl]} growth (MiB) | {NAMES[impl]} step (s) |"
        sep += "---:|---:|---:|"
    if len(args.impls) == 2:
        header += " growth hf_dpo / TRL |"
        sep += "---:|"
    lines = [header, sep]
    fits = []
    for vocab in vocabs:
        stats = {impl: [common.run_stats(r) for r in results[(vocab, impl)]] for impl in args.impls}
        for i, length in enumerate(args.lengths):
            tokens = stats[args.impls[0]][i]["tokens_per_step"]
            line = f"| {vocab} | {length} | {tokens:,.0f} |"
            for impl in args.impls:
                s = stats[impl][i]
                line += f" {s[peak_key]:,.0f} | {s[growth_key]:,.0f} | {s['median_step_s']:.2f} |"
            if len(args.impls) == 2:
                a, b = (stats[impl][i][growth_key] for impl in args.impls)
                line += f" {a / b:.2f} |"
            lines.append(line)
        for impl in args.impls:
            xs = [s["tokens_per_step"] for s in stats[impl]]
            ys = [s[growth_key] for s in stats[impl]]
            intercept, slope = fit_line(xs, ys)
            per_token_kib = slope * 1024
            vocab_row_kib = vocab * 4 / 1024
            fits.append(
                f"| {NAMES[impl]} | {vocab} | {per_token_kib:,.1f} | {intercept:,.0f} | {vocab_row_kib:,.0f} | "
                f"{per_token_kib / vocab_row_kib:.2f} |"
            )
    command = " ".join(["OMP_NUM_THREADS=1", "python", "benchmarks/length_sweep.py", *sys.argv[1:]])
    what = "peak CUDA memory allocated" if on_cuda else "peak RSS"
    return f"""# Peak memory against sequence length: `{shape.name}` ({args.device})

Command: `{command}`

- Model: {shape.arch}, hidden {shape.hidden_size}, {shape.num_layers} layers, intermediate {shape.intermediate_size}, random
  weights in 4-bit NF4; LoRA r=16 on all linear layers; live reference; no gradient checkpointing.
- Data: {args.batch_size} pairs per step, every sequence exactly max_length tokens (prompt 1/4, completion 3/4): no
  padding. 1 warm-up + {args.steps} measured step(s) per run, one fresh process per cell.
- "peak" is the {what} of the process during `train()`; "growth" is that peak minus the memory just
  before `train()` (model loaded, trainer built): the training loop's own memory.
- Machine: {common.machine_line(args.device)}; {common.versions_line()}.

{chr(10).join(lines)}

Straight-line fit of the growth against tokens per step:

| trainer | vocab | slope (KiB per token) | intercept (MiB) | one fp32 vocab row (KiB) | slope / vocab row |
|---|---:|---:|---:|---:|---:|
{chr(10).join(fits)}

A trainer that kept the fp32 [tokens, vocab] logits or log-softmax of a step would have a slope of at least
one vocab row per token (twice that with its gradient), on top of the backbone's activations.
"""


if __name__ == "__main__":
    sys.exit(main())
