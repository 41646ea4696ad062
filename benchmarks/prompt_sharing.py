"""Prompt sharing against the prompt repeated before every completion, in hf_dpo, on three data shapes.

Shared (`share_prompt=True`): each row is one sequence [prompt | completion 0 | ... | completion K-1] whose
completions attend to the prompt and to themselves only, so the prompt is read once per row instead of K
times (policy pass with gradients and live reference pass alike). Unshared (`share_prompt=False`): the K
sequences [prompt | completion k], padded. Same model, rows, order, seed and live reference in both; the
log-probs agree to float rounding (tests/test_prompt_sharing.py).

Tokens/s counts the LOGICAL tokens of a step, the prompt once per completion, as the unshared path reads
them, so the ratio is the speed-up for the same data. Every measurement is a fresh process; shared and
unshared alternate (A B, B A, ...), so drifts of a shared machine hit both sides alike.

    OMP_NUM_THREADS=1 python benchmarks/prompt_sharing.py                          # large-vocab, CPU, 3 shapes
    OMP_NUM_THREADS=1 python benchmarks/prompt_sharing.py --cases long-prompt --repeat 4
    OMP_NUM_THREADS=1 python benchmarks/prompt_sharing.py --cases short-prompt     # where sharing gains least
    python benchmarks/prompt_sharing.py --device cuda --shape qwen2.5-0.5b

Writes benchmarks/results/prompt_sharing.md (prompt_sharing_<shape>_<device>.md for other shapes/devices)
and prints it.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


@dataclass
class Case:
    """Fixed lengths: every row has a prompt of `prompt` tokens and K completions of `completion` tokens."""

    name: str
    prompt: int
    completion: int
    num_completions: int
    target: float  # tokens/s shared / unshared
    bound: float  # the same if time were proportional to the tokens read

    @property
    def loss_type(self) -> str:
        return "sigmoid" if self.num_completions == 2 else "plackett_luce"


def _bound(prompt: int, completion: int, k: int) -> float:
    return k * (prompt + completion) / (prompt + k * completion)


CASES = {
    c.name: c
    for c in (
        Case("long-prompt", 384, 64, 2, 1.4, _bound(384, 64, 2)),
        Case("ultrafeedback-like", 160, 240, 2, 1.12, _bound(160, 240, 2)),
        Case("ranked-k4", 256, 64, 4, 1.8, _bound(256, 64, 4)),
        # Not a target: where the rule of thumb says sharing gains little (prompt << completions).
        Case("short-prompt", 16, 240, 2, 1.0, _bound(16, 240, 2)),
    )
}
DEFAULT_CASES = ["long-prompt", "ultrafeedback-like", "ranked-k4"]
CONFIGS = {"unshared": False, "shared": True}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", default="large-vocab", choices=sorted(common.SHAPES))
    parser.add_argument("--cases", nargs="+", default=DEFAULT_CASES, choices=sorted(CASES))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeat", type=int, default=3, help="runs per configuration and case")
    parser.add_argument("--steps", type=int, default=3, help="measured steps per run")
    parser.add_argument("--warmup-steps", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--padding-free", action="store_true", help="pack both sides (padding-free)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-warmup-run", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default=str(common.RESULTS_DIR))
    return parser.parse_args(argv)


def case_data(case: Case, shape: common.Shape, num_rows: int, seed: int) -> common.DataSpec:
    return common.DataSpec(
        num_rows=num_rows,
        vocab_size=shape.vocab_size,
        max_length=case.prompt + case.completion,
        prompt_len=(case.prompt, case.prompt),
        completion_len=(case.completion, case.completion),
        seed=seed,
        num_completions=case.num_completions,
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    shape = common.SHAPES[args.shape]
    batch = args.batch_size or shape.batch_size
    scratch = Path(tempfile.mkdtemp(prefix="hf_dpo_bench_"))
    t0 = time.perf_counter()
    results: dict[str, dict[str, list[dict]]] = {}
    try:
        model_dir = common.build_model_dir(shape, scratch / "model", seed=args.seed)
        for name in args.cases:
            case = CASES[name]
            data = case_data(case, shape, batch * (args.warmup_steps + args.steps), args.seed)

            def spec(shared: bool, label: str, n_steps: int, warmup: int, case=case, data=data):
                return common.make_spec(
                    args,
                    model_dir,
                    shape,
                    data,
                    batch,
                    case.prompt + case.completion,
                    impl="hf",
                    steps=n_steps,
                    warmup_steps=warmup,
                    padding_free=args.padding_free,
                    share_prompt=shared,
                    loss_type=case.loss_type,
                    label=f"{case.name} {label}",
                )

            if not args.no_warmup_run:
                print(f"{case.name}: warm-up runs (discarded)", flush=True)
                for config, shared in CONFIGS.items():
                    common.run_subprocess(spec(shared, f"warm-up {config}", 1, 1), scratch, verbose=True)
            results[name] = {config: [] for config in CONFIGS}
            for r, order in enumerate(common.alternate(list(CONFIGS), args.repeat)):
                print(f"{case.name}: round {r + 1}/{args.repeat}", flush=True)
                for config in order:
                    run = spec(CONFIGS[config], f"{config} #{r + 1}", args.steps, args.warmup_steps)
                    results[name][config].append(common.run_subprocess(run, scratch, verbose=True))
        text = report(args, shape, batch, results)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    suffix = "" if (shape.name, args.device) == ("large-vocab", "cpu") else f"_{shape.name}_{args.device}"
    suffix += "_padding_free" if args.padding_free else ""
    path = Path(args.out_dir) / f"prompt_sharing{suffix}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(text)
    print(f"written {path}\ntotal {time.perf_counter() - t0:.0f} s")
    return 0


def report(args, shape, batch, results) -> str:
    memory_key = "cuda_peak_mib" if args.device == "cuda" else "rss_peak_mib"
    memory_name = "peak CUDA memory" if args.device == "cuda" else "peak RSS"
    rows, verdicts, sanity = [], [], []
    for name, runs in results.items():
        case = CASES[name]
        stats = {config: [common.run_stats(r) for r in runs[config]] for config in CONFIGS}
        speed = [s["tokens_per_s"] / u["tokens_per_s"] for s, u in zip(stats["shared"], stats["unshared"])]
        memory = [s[memory_key] / u[memory_key] for s, u in zip(stats["shared"], stats["unshared"])]
        growth_key = "cuda_growth_mib" if args.device == "cuda" else "rss_growth_mib"
        tokens = common.median([s["tokens_per_s"] for s in stats["shared"]]) / common.median(
            [s["tokens_per_s"] for s in stats["unshared"]]
        )
        peak = {c: common.median([s[memory_key] for s in stats[c]]) for c in CONFIGS}
        growth = {c: common.median([s[growth_key] for s in stats[c]]) for c in CONFIGS}
        step = {c: common.median([s["median_step_s"] for s in stats[c]]) for c in CONFIGS}
        rows.append(
            f"| {name} | {case.prompt} / {case.num_completions} x {case.completion} | "
            f"{step['unshared'] * 1000:,.0f} / {step['shared'] * 1000:,.0f} | **{tokens:.2f}** | "
            f"{common.spread(speed)} | {case.bound:.2f} | {case.target:.2f} | "
            f"{peak['unshared']:,.0f} / {peak['shared']:,.0f} ({common.spread(memory)}) | "
            f"{growth['unshared']:,.0f} / {growth['shared']:,.0f} |"
        )
        if name in DEFAULT_CASES:
            met = tokens >= case.target
            verdicts.append(
                f"- {name}: tokens/s shared / unshared >= {case.target}: **{'met' if met else 'missed'}** "
                f"({tokens:.2f}x{'' if met else f', short by {case.target - tokens:.2f}'}); {memory_name} "
                f"{'not higher' if peak['shared'] <= peak['unshared'] else 'HIGHER'} "
                f"({peak['shared'] / peak['unshared']:.2f}x)"
            )
        first = {
            c: next((e for e in runs[c][0]["log_history"] if "loss" in e), {}).get(
                "logps/chosen", float("nan")
            )
            for c in CONFIGS
        }
        same = all(
            s["token_sequence"] == stats["unshared"][0]["token_sequence"] for v in stats.values() for s in v
        )
        sanity.append(
            f"- {name}: first-step logps/chosen unshared {first['unshared']:.4f} / shared {first['shared']:.4f}; "
            f"same logical tokens per step on both sides: {'yes' if same else 'NO'}"
        )
    command = " ".join(["OMP_NUM_THREADS=1", "python", "benchmarks/prompt_sharing.py", *sys.argv[1:]])
    layout = "packed (padding-free)" if args.padding_free else "padded"
    return f"""# hf_dpo prompt sharing: shared vs unshared, `{shape.name}` ({args.device}, live reference, {layout})

Command: `{command}`

- Model: {shape.arch}, vocab {shape.vocab_size}, hidden {shape.hidden_size}, {shape.num_layers} layers, random weights,
  4-bit NF4; LoRA r=16 on all linear layers; DPOTrainer training steps (policy forward + backward, live
  reference forward with the adapter disabled, optimizer step); sigmoid loss for pairs, plackett_luce for K = 4.
- Data: {batch} rows per step of random token ids, every prompt and completion exactly the stated length.
- Runs: {args.repeat} per configuration and case, alternating, fresh process each; {args.warmup_steps} warm-up +
  {args.steps} measured steps; torch threads {args.threads}.
- Tokens/s counts logical tokens (the prompt once per completion, as unshared reads them): the ratio is the
  speed-up on the same data. "bound": (K (P + L)) / (P + K L), the ratio if time were proportional to the
  tokens read. Paired: each round's shared / unshared.
- Machine: {common.machine_line(args.device)}; {common.versions_line()}.

| case | prompt / completions | median step ms unshared / shared | tokens/s shared / unshared | paired (min-max) | bound | target | {memory_name} MiB unshared / shared (paired ratio) | growth in training MiB unshared / shared |
|---|---|---:|---:|---:|---:|---:|---:|---:|
{chr(10).join(rows)}

{chr(10).join(verdicts)}

Sanity checks:
{chr(10).join(sanity)}
"""


if __name__ == "__main__":
    sys.exit(main())
