"""What adding the sft (RPO) term to the DPO loss costs: step time of `sigmoid + sft` over `sigmoid`.

sft reuses the policy log-probs of the same forward (the chosen completions' token log-prob sums and
counts), so it adds no pass: the difference should be a few scalar ops, i.e. within noise. Target: the
ratio (sigmoid + sft) / sigmoid under 1.03.

A third configuration, sigmoid without the per-token statistics (entropy, top-1 accuracy, log sum p^2,
which the trainer computes in the chunked LM head for its `entropy` and `mean_token_accuracy` metrics),
shows what those metrics cost; it is for information, with no target.

Each of --repeat fresh processes loads the model once, builds one DPOTrainer per configuration on it, and
runs their steps round-robin (the order rotates every round) on the same batch each round, after
--warmup-steps rounds. A step is the trainer's own `training_step` (policy forward, reference forward,
loss, backward) + gradient clipping + AdamW step + zero_grad. Ratios are medians over rounds of
(configuration / sigmoid) within the same round, so a noisy neighbour slows both sides alike.

    OMP_NUM_THREADS=1 python benchmarks/sft_overhead.py                 # tiny shape, CPU
    OMP_NUM_THREADS=1 python benchmarks/sft_overhead.py --repeat 5 --steps 60

Writes benchmarks/results/sft_overhead_<shape>.md and prints it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

CONFIGS = {
    # name: (loss_type, loss_weights, token statistics, label)
    "sigmoid": (["sigmoid"], None, True, "sigmoid"),
    "sigmoid+sft": (["sigmoid", "sft"], [1.0, 0.2], True, "sigmoid + 0.2 sft"),
    "no-stats": (["sigmoid"], None, False, "sigmoid, no per-token statistics"),
}
TARGET = 1.03  # sigmoid + sft over sigmoid


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", default="tiny", choices=sorted(common.SHAPES))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeat", type=int, default=3, help="fresh processes")
    parser.add_argument("--steps", type=int, default=40, help="measured rounds per process")
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--max-length", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default=str(common.RESULTS_DIR))
    return parser.parse_args(argv)


def worker(spec: common.RunSpec) -> dict:
    """One process: one model, one trainer per configuration, their steps round-robin on the same batch."""
    common._set_threads(spec.threads)
    import torch

    from hf_dpo.config import DPOConfig
    from hf_dpo.trainer import DPOTrainer

    on_cuda = spec.device == "cuda"
    dataset, loaded, out = common.interleaved_setup(spec)
    model = loaded.model
    trainers = {}
    for name, (loss_type, weights, _, _) in CONFIGS.items():
        args = DPOConfig(
            **common._training_args_common(spec, out),
            beta=spec.beta,
            loss_type=loss_type,
            loss_weights=weights,
            max_length=spec.max_length,
            max_prompt_length=spec.max_length // 2,
        )
        trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=loaded.tokenizer)
        trainer.current_gradient_accumulation_steps = 1
        if not CONFIGS[name][2]:  # the same step without the statistics in the chunked head
            trainer.sequence_logps = _without_stats(trainer)
        trainers[name] = trainer
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec.learning_rate)
    names = list(trainers)
    times: dict[str, list[float]] = {name: [] for name in names}
    collate = trainers["sigmoid"].data_collator
    for r in range(spec.warmup_steps + spec.steps):
        indices = range(r * spec.batch_size, (r + 1) * spec.batch_size)
        batch = collate([dataset[i] for i in indices])
        for name in names[r % len(names) :] + names[: r % len(names)]:
            wall, _ = common.timed_step(trainers[name], model, dict(batch), params, optimizer, on_cuda)
            times[name].append(wall)
    shutil.rmtree(out, ignore_errors=True)
    return {"times": times, "warmup_steps": spec.warmup_steps}


def _without_stats(trainer):
    """The trainer's policy log-probs computed without per-token statistics (zeros stand in for the two
    metrics that read them, so that everything else in the step stays the same)."""
    import dataclasses

    original = trainer.sequence_logps  # the bound method, taken before the instance attribute replaces it

    def sequence_logps(model, inputs, with_stats=True):  # the reference pass asks for none anyway
        out = original(model, inputs, with_stats=False)
        zeros = out.token_counts.new_zeros(out.token_counts.shape)
        return dataclasses.replace(out, entropy_sums=zeros, top1_hits=zeros)

    return sequence_logps


def _quartiles(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values)
    return ordered[len(ordered) // 4], ordered[(3 * len(ordered)) // 4]


def report(args, shape, batch, max_length, results) -> str:
    w = args.warmup_steps
    lines = []
    ratios = {}
    for name, (_, _, _, label) in CONFIGS.items():
        per_round = [
            c / s for res in results for c, s in zip(res["times"][name][w:], res["times"]["sigmoid"][w:])
        ]
        per_process = [
            common.median(res["times"][name][w:]) / common.median(res["times"]["sigmoid"][w:])
            for res in results
        ]
        step_ms = common.median([t for res in results for t in res["times"][name][w:]]) * 1000
        ratios[name] = common.median(per_round)
        q1, q3 = _quartiles(per_round)
        lines.append(
            f"| {label} | {step_ms:,.1f} | **{ratios[name]:.3f}** | {q1:.3f}-{q3:.3f} | "
            f"{common.spread(per_process)} |"
        )
    ratio = ratios["sigmoid+sft"]
    verdict = "met" if ratio < TARGET else f"missed by {ratio - TARGET:.3f}"
    command = " ".join(["OMP_NUM_THREADS=1", "python", "benchmarks/sft_overhead.py", *sys.argv[1:]])
    return f"""# sft (RPO) term on top of sigmoid: `{shape.name}` ({args.device})

Command: `{command}`

- Model: {shape.arch}, vocab {shape.vocab_size}, hidden {shape.hidden_size}, {shape.num_layers} layers; random weights in
  4-bit NF4; LoRA r=16 on all linear layers; one model shared by the trainers. Live reference (adapter off).
- Data: {batch} pairs = {2 * batch} rows per step, max_length {max_length}; every round gives all
  configurations the same batch. {args.repeat} processes x {args.steps} measured rounds (after {w} warm-up
  rounds), the order rotating every round; torch threads {args.threads}.
- A step: `training_step` (forward, reference forward, loss, backward) + clipping + AdamW + zero_grad.
- Machine: {common.machine_line(args.device)}; {common.versions_line()}.

| configuration | median step (ms) | / sigmoid (median over rounds) | interquartile | per-process ratio of medians |
|---|---:|---:|---:|---:|
{chr(10).join(lines)}

- sigmoid + 0.2 sft: {ratio:.3f}x the sigmoid step, target < {TARGET:.2f}: **{verdict}**.
- The per-token statistics (entropy, top-1, log sum p^2 in the chunked head): the sigmoid step is
  {1 / ratios["no-stats"]:.3f}x the step without them.
"""


def main(argv=None) -> int:
    args = parse_args(argv)
    shape = common.SHAPES[args.shape]
    batch = args.batch_size or shape.batch_size
    max_length = args.max_length or shape.max_length
    scratch = Path(tempfile.mkdtemp(prefix="hf_dpo_bench_"))
    t0 = time.perf_counter()
    try:
        model_dir = common.build_model_dir(shape, scratch / "model", seed=args.seed)
        data = common.default_data_spec(
            shape, batch * (args.warmup_steps + args.steps), max_length, seed=args.seed
        )
        results = []
        for r in range(args.repeat):
            spec = common.make_spec(
                args,
                model_dir,
                shape,
                data,
                batch,
                max_length,
                impl="sft_overhead",
                steps=args.steps,
                warmup_steps=args.warmup_steps,
                label=f"process {r + 1}",
            )
            results.append(common.run_subprocess(spec, scratch, script=__file__))
            print(f"  process {r + 1}/{args.repeat} done", flush=True)
        text = report(args, shape, batch, max_length, results)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    suffix = "" if args.device == "cpu" else "_" + args.device
    path = Path(args.out_dir) / f"sft_overhead_{shape.name}{suffix}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(text)
    print(f"written {path}\ntotal {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        worker_spec = common.RunSpec(**json.loads(Path(sys.argv[2]).read_text()))
        Path(sys.argv[3]).write_text(json.dumps(worker(worker_spec)))
        sys.exit(0)
    sys.exit(main())
