"""What DPO costs over plain fine-tuning: hf_dpo's step time divided by a causal-LM fine-tuning step.

The baseline is a plain transformers Trainer on the same 4-bit model, the same LoRA and the same
concatenated [chosen; rejected] padded rows: forward with labels (on completion tokens), backward,
optimizer step. One DPO step with a live reference does that plus a no-grad reference forward (adapter
disabled), so its physical limit is about 4/3 of the baseline (forward 1 + backward 2, plus forward 1);
with precomputed reference log-probs the limit is 1.0. Targets: <= 1.45 live, <= 1.10 precomputed.

A second baseline, "completion-only fused head", applies the LM head to the completion positions only
(hf_dpo's chunked head), i.e. the head work of one DPO policy pass; DPO / it isolates the reference pass.

--mode interleaved (default): each of --repeat fresh processes loads the model ONCE, builds the four
trainers on it, and runs their training steps round-robin (plain, lean, live, precomputed; the order
rotates every round) on the same batch each round, after --warmup-steps rounds. A step is the trainer's
own `training_step` (forward, loss, backward) + gradient clipping + AdamW step + zero_grad. Ratios are the
median over rounds of (configuration / plain) within the same round, so a noisy neighbour slows both
sides of a ratio alike.
--mode processes: every configuration runs `Trainer.train()` in its own fresh process, alternating.

    OMP_NUM_THREADS=1 python benchmarks/overhead.py                      # tiny shape, CPU
    OMP_NUM_THREADS=1 python benchmarks/overhead.py --shape large-vocab --steps 6 --repeat 1
    OMP_NUM_THREADS=1 python benchmarks/overhead.py --mode processes --repeat 5

Writes benchmarks/results/overhead_<shape>.md and prints it.
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

CONFIGS = {
    # name: (impl, precompute, label)
    "plain": ("plain", False, "plain causal-LM step"),
    "plain-lean": ("plain-lean", False, "plain step, completion-only fused head"),
    "live": ("hf", False, "hf_dpo, live reference"),
    "precomputed": ("hf", True, "hf_dpo, precomputed reference"),
}
TARGETS = {"live": (1.45, 4 / 3), "precomputed": (1.10, 1.0)}
DEFAULT_STEPS = {"tiny": 15, "large-vocab": 4, "qwen2.5-0.5b": 10}
DEFAULT_ROUNDS = {"tiny": 40, "large-vocab": 6, "qwen2.5-0.5b": 20}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", default="tiny", choices=sorted(common.SHAPES))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--mode", default="interleaved", choices=["interleaved", "processes"])
    parser.add_argument(
        "--repeat", type=int, default=None, help="processes (default: 3 interleaved, 5 processes)"
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="measured steps (rounds) per process (default per shape)"
    )
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--max-length", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-warmup-run", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default=str(common.RESULTS_DIR))
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.mode == "interleaved":
        return main_interleaved(args)
    args.repeat = args.repeat or 5
    shape = common.SHAPES[args.shape]
    batch = args.batch_size or shape.batch_size
    max_length = args.max_length or shape.max_length
    steps = args.steps or DEFAULT_STEPS.get(shape.name, 10)
    scratch = Path(tempfile.mkdtemp(prefix="hf_dpo_bench_"))
    t0 = time.perf_counter()
    try:
        model_dir = common.build_model_dir(shape, scratch / "model", seed=args.seed)
        data = common.default_data_spec(
            shape, batch * (args.warmup_steps + steps), max_length, seed=args.seed
        )

        def spec(name: str, label: str, n_steps: int = steps, warmup: int = args.warmup_steps):
            impl, precompute, _ = CONFIGS[name]
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
                precompute_ref_log_probs=precompute,
                label=label,
            )

        if not args.no_warmup_run:
            print("warm-up runs (discarded)", flush=True)
            for name in CONFIGS:
                common.run_subprocess(spec(name, f"warm-up {name}", 1, 1), scratch, verbose=True)
        results: dict[str, list[dict]] = {name: [] for name in CONFIGS}
        for r, order in enumerate(common.alternate(list(CONFIGS), args.repeat)):
            print(f"round {r + 1}/{args.repeat}", flush=True)
            for name in order:
                results[name].append(
                    common.run_subprocess(spec(name, f"{name} #{r + 1}"), scratch, verbose=True)
                )
        text = report(args, shape, batch, max_length, steps, results)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    path = Path(args.out_dir) / f"overhead_{shape.name}{'' if args.device == 'cpu' else '_' + args.device}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(text)
    print(f"written {path}\ntotal {time.perf_counter() - t0:.0f} s")
    return 0


def report(args, shape, batch, max_length, steps, results) -> str:
    stats = {name: [common.run_stats(r) for r in runs] for name, runs in results.items()}
    step = {name: common.median([s["median_step_s"] for s in runs]) for name, runs in stats.items()}
    lines = []
    verdicts = []
    for name, (_, _, label) in CONFIGS.items():
        vals = [s["median_step_s"] for s in stats[name]]
        paired = [v / p for v, p in zip(vals, [s["median_step_s"] for s in stats["plain"]])]
        paired_lean = [v / p for v, p in zip(vals, [s["median_step_s"] for s in stats["plain-lean"]])]
        ratio, ratio_lean = step[name] / step["plain"], step[name] / step["plain-lean"]
        limit = TARGETS.get(name)
        target = f"<= {limit[0]:.2f} (limit ~{limit[1]:.2f})" if limit else "-"
        lines.append(
            f"| {label} | {step[name] * 1000:,.1f} | {common.spread([v * 1000 for v in vals])} | **{ratio:.2f}** | "
            f"{common.spread(paired)} | {ratio_lean:.2f} | {common.spread(paired_lean)} | {target} |"
        )
        if limit:
            verdicts.append(_verdict(label, ratio, ratio_lean, limit))
    tokens_per_step = stats["plain"][0]["tokens_per_step"]
    padding = stats["plain"][0]["padding_fraction"]
    command = " ".join(["OMP_NUM_THREADS=1", "python", "benchmarks/overhead.py", *sys.argv[1:]])
    compute = "bf16" if args.device == "cuda" else "fp32"
    return f"""# DPO step vs plain causal-LM step: `{shape.name}` ({args.device})

Command: `{command}`

- Model: {shape.arch}, vocab {shape.vocab_size}, hidden {shape.hidden_size}, {shape.num_layers} layers; random weights in
  4-bit NF4 (compute {compute}); LoRA r=16, alpha=32 on all linear layers.
- Data: {batch} pairs = {2 * batch} rows per step, max_length {max_length}, {tokens_per_step:,.0f} non-padding tokens per
  step ({padding:.0%} padding), the same rows in the same order for every configuration.
- Baselines, both a plain transformers Trainer on the same padded [chosen; rejected] rows with labels on the
  completion tokens: "plain causal-LM step" uses the model's own loss (logits at every position, the usual
  fine-tuning step); "completion-only fused head" applies the LM head to completion positions only, through
  hf_dpo's chunked head, i.e. exactly the head work of one DPO policy pass, so DPO / it isolates the cost of
  the reference pass and the preference loss.
- Runs: {args.repeat} per configuration, alternating, fresh process each; {args.warmup_steps} warm-up + {steps} measured
  steps per run; torch threads {args.threads}.
- Machine: {common.machine_line(args.device)}; {common.versions_line()}.

| configuration | median step (ms) | run medians (min-max) | / plain | paired (min-max) | / completion-only | paired (min-max) | target (/ plain) |
|---|---:|---:|---:|---:|---:|---:|---|
{chr(10).join(lines)}

{chr(10).join(verdicts)}
"""


# ------------------------------------------------------------------------------------ interleaved mode
def interleaved_worker(spec: common.RunSpec) -> dict:
    """One process: one model, four trainers on it, their steps round-robin on the same batch each round."""
    common._set_threads(spec.threads)
    import torch
    from transformers import Trainer, TrainingArguments

    from hf_dpo.collator import PreferenceCollator
    from hf_dpo.config import DPOConfig
    from hf_dpo.trainer import DPOTrainer

    on_cuda = spec.device == "cuda"
    dataset, loaded, out = common.interleaved_setup(spec)
    model = loaded.model
    common_args = common._training_args_common(spec, out)

    def dpo(precompute: bool):
        args = DPOConfig(
            **common_args,
            beta=spec.beta,
            max_length=spec.max_length,
            max_prompt_length=spec.max_length // 2,
            precompute_ref_log_probs=precompute,
        )
        return DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=loaded.tokenizer)

    inner = PreferenceCollator(pad_token_id=loaded.tokenizer.pad_token_id)

    plain_args = TrainingArguments(**common_args, remove_unused_columns=False)
    trainers = {
        "plain": Trainer(model=model, args=plain_args, train_dataset=dataset),
        "plain-lean": common._LeanLMTrainer()(model=model, args=plain_args, train_dataset=dataset),
        "live": dpo(False),
        "precomputed": dpo(True),
    }
    collate = {
        "plain": lambda f: common.plain_lm_batch(inner, f, False),
        "plain-lean": lambda f: common.plain_lm_batch(inner, f, True),
        "live": trainers["live"].data_collator,
        "precomputed": trainers["precomputed"].data_collator,
    }
    for trainer in trainers.values():
        trainer.current_gradient_accumulation_steps = 1
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec.learning_rate)
    names = list(trainers)
    times: dict[str, list[float]] = {name: [] for name in names}
    batch_size = spec.batch_size
    rounds = spec.warmup_steps + spec.steps
    tokens = []
    for r in range(rounds):
        indices = range(r * batch_size, (r + 1) * batch_size)  # the dataset holds exactly `rounds` batches
        tokens.append(common._tokens_of_features([dataset[i] for i in indices]))
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            source = trainers["precomputed"].train_dataset if name == "precomputed" else dataset
            batch = collate[name]([source[i] for i in indices])
            wall, _ = common.timed_step(trainers[name], model, batch, params, optimizer, on_cuda)
            times[name].append(wall)
    shutil.rmtree(out, ignore_errors=True)
    return {"times": times, "warmup_steps": spec.warmup_steps, "tokens": tokens}


def _verdict(label: str, ratio: float, ratio_lean: float, limit: tuple[float, float]) -> str:
    """One report line: the ratio to the plain step against its target, and to the completion-only step."""
    met = ratio <= limit[0]
    return (
        f"- {label}: {ratio:.2f}x the plain step, target <= {limit[0]:.2f}: **{'met' if met else 'missed'}**"
        + ("" if met else f" by {ratio - limit[0]:.2f}")
        + f"; {ratio_lean:.2f}x the completion-only plain step (physical limit ~{limit[1]:.2f})."
    )


def main_interleaved(args) -> int:
    shape = common.SHAPES[args.shape]
    batch = args.batch_size or shape.batch_size
    max_length = args.max_length or shape.max_length
    rounds = args.steps or DEFAULT_ROUNDS.get(shape.name, 20)
    repeat = args.repeat or 3
    scratch = Path(tempfile.mkdtemp(prefix="hf_dpo_bench_"))
    t0 = time.perf_counter()
    try:
        model_dir = common.build_model_dir(shape, scratch / "model", seed=args.seed)
        data = common.default_data_spec(
            shape, batch * (args.warmup_steps + rounds), max_length, seed=args.seed
        )
        results = []
        for r in range(repeat):
            spec = common.make_spec(
                args,
                model_dir,
                shape,
                data,
                batch,
                max_length,
                impl="interleaved",
                steps=rounds,
                warmup_steps=args.warmup_steps,
                label=f"process {r + 1}",
            )
            results.append(common.run_subprocess(spec, scratch, script=__file__))
            print(f"  process {r + 1}/{repeat} done", flush=True)
        text = report_interleaved(args, shape, batch, max_length, rounds, repeat, results)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    path = Path(args.out_dir) / f"overhead_{shape.name}{'' if args.device == 'cpu' else '_' + args.device}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(text)
    print(f"written {path}\ntotal {time.perf_counter() - t0:.0f} s")
    return 0


def report_interleaved(args, shape, batch, max_length, rounds, repeat, results) -> str:
    names = list(CONFIGS)
    w = args.warmup_steps
    measured = {name: [t for res in results for t in res["times"][name][w:]] for name in names}
    per_round = {  # configuration / plain within the same round
        name: [c / p for res in results for c, p in zip(res["times"][name][w:], res["times"]["plain"][w:])]
        for name in names
    }
    per_round_lean = {
        name: [
            c / p for res in results for c, p in zip(res["times"][name][w:], res["times"]["plain-lean"][w:])
        ]
        for name in names
    }
    per_process = {
        name: [
            common.median(res["times"][name][w:]) / common.median(res["times"]["plain"][w:])
            for res in results
        ]
        for name in names
    }
    tokens = [t for res in results for t in res["tokens"][w:]]
    lines, verdicts = [], []
    for name in names:
        label = CONFIGS[name][2]
        ratio = common.median(per_round[name])
        ratio_lean = common.median(per_round_lean[name])
        q1, q3 = _quartiles(per_round[name])
        limit = TARGETS.get(name)
        target = f"<= {limit[0]:.2f} (limit ~{limit[1]:.2f})" if limit else "-"
        lines.append(
            f"| {label} | {common.median(measured[name]) * 1000:,.1f} | **{ratio:.2f}** | {q1:.2f}-{q3:.2f} | "
            f"{common.spread(per_process[name])} | {ratio_lean:.2f} | {target} |"
        )
        if limit:
            verdicts.append(_verdict(label, ratio, ratio_lean, limit))
    command = " ".join(["OMP_NUM_THREADS=1", "python", "benchmarks/overhead.py", *sys.argv[1:]])
    compute = "bf16" if args.device == "cuda" else "fp32"
    return f"""# DPO step vs plain causal-LM step: `{shape.name}` ({args.device}, interleaved)

Command: `{command}`

- Model: {shape.arch}, vocab {shape.vocab_size}, hidden {shape.hidden_size}, {shape.num_layers} layers; random weights in
  4-bit NF4 (compute {compute}); LoRA r=16, alpha=32 on all linear layers; one model shared by all four trainers.
- Data: {batch} pairs = {2 * batch} rows per step, max_length {max_length}, {sum(tokens) / len(tokens):,.0f} non-padding
  tokens per step on average; every round gives all four configurations the same batch.
- Baselines, both a plain transformers Trainer on the same padded [chosen; rejected] rows with labels on the
  completion tokens: "plain causal-LM step" uses the model's own loss (logits at every position, the usual
  fine-tuning step); "completion-only fused head" applies the LM head to completion positions only, through
  hf_dpo's chunked head: exactly the head work of one DPO policy pass.
- A step: the trainer's `training_step` (forward, loss, backward) + gradient clipping + AdamW step +
  zero_grad, timed with `time.perf_counter`. {repeat} processes x {rounds} measured rounds (after {w} warm-up
  rounds), the order of the four rotating every round; torch threads {args.threads}.
- Machine: {common.machine_line(args.device)}; {common.versions_line()}.

| configuration | median step (ms) | / plain (median over rounds) | interquartile | per-process ratio of medians | / completion-only | target (/ plain) |
|---|---:|---:|---:|---:|---:|---|
{chr(10).join(lines)}

{chr(10).join(verdicts)}
"""


def _quartiles(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values)
    if not ordered:
        return float("nan"), float("nan")
    return ordered[len(ordered) // 4], ordered[(3 * len(ordered)) // 4]


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        import json

        worker_spec = common.RunSpec(**json.loads(Path(sys.argv[2]).read_text()))
        Path(sys.argv[3]).write_text(json.dumps(interleaved_worker(worker_spec)))
        sys.exit(0)
    sys.exit(main())
