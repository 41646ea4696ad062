"""Prompt sharing against the prompt repeated before every completion, in hf_dpo, on three data shapes.

Shared (`share_prompt=True`): each row is one sequence [prompt | completion 0 | ... | completion K-1] whose
completions attend to the prompt and to themselves only, so the prompt is read once per row instead of K
times (policy pass with gradients and live reference pass alike). Unshared (`share_prompt=False`): the K
sequences [prompt | completion k], padded. Same model, rows, order, seed and live reference in both; the
log-probs agree to float rounding (tests/test_prompt_sharing.py).

Tokens/s counts the LOGICAL tokens of a step, the prompt once per completion, as the unshared path reads
them: both sides process the same tokens, so the tokens/s ratio is the step-time ratio.

Speed (interleaved): each of --repeat fresh processes loads the model once, builds a shared and an
unshared DPOTrainer on it and runs their training steps (the trainer's `training_step`: forward, loss,
backward with the live reference; gradient clipping, AdamW step, zero_grad) alternately on the same batch
each round, the order swapping every round, so a noisy neighbour slows both sides of a round alike. The
ratio is the median over rounds of (unshared step / shared step), in wall time and in process CPU time (the
CPU time is what contention for the shared cores disturbs least).
Memory: one fresh process per configuration (alternating) runs `Trainer.train()` for a few steps; peak RSS
(VmHWM) of the process and its growth during training.

    OMP_NUM_THREADS=1 python benchmarks/prompt_sharing.py                          # large-vocab, CPU, 3 shapes
    OMP_NUM_THREADS=1 python benchmarks/prompt_sharing.py --cases short-prompt     # where sharing gains least
    OMP_NUM_THREADS=1 python benchmarks/prompt_sharing.py --padding-free           # both sides packed
    python benchmarks/prompt_sharing.py --device cuda --shape qwen2.5-0.5b

Writes benchmarks/results/prompt_sharing.md (prompt_sharing_<shape>_<device>.md for other shapes/devices,
with _padding_free and _<cases> suffixes for other runs) and prints it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
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
    parser.add_argument("--repeat", type=int, default=2, help="interleaved processes per case")
    parser.add_argument("--rounds", type=int, default=6, help="measured rounds per interleaved process")
    parser.add_argument("--warmup-rounds", type=int, default=1)
    parser.add_argument("--memory-steps", type=int, default=2, help="training steps of each memory run")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--padding-free", action="store_true", help="pack both sides (padding-free)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default=str(common.RESULTS_DIR))
    parser.add_argument("--worker", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
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
    if args.worker:
        spec = common.RunSpec(**json.loads(Path(args.worker[0]).read_text()))
        Path(args.worker[1]).write_text(json.dumps(interleaved_worker(spec)))
        return 0
    shape = common.SHAPES[args.shape]
    batch = args.batch_size or shape.batch_size
    scratch = Path(tempfile.mkdtemp(prefix="hf_dpo_bench_"))
    t0 = time.perf_counter()
    results: dict[str, dict] = {}
    try:
        model_dir = common.build_model_dir(shape, scratch / "model", seed=args.seed)
        for name in args.cases:
            case = CASES[name]
            rounds = args.warmup_rounds + args.rounds
            data = case_data(case, shape, batch * max(rounds, 1 + args.memory_steps), args.seed)

            def spec(
                impl: str, label: str, share: bool | None, steps: int, warmup: int, case=case, data=data
            ):
                return common.make_spec(
                    args,
                    model_dir,
                    shape,
                    data,
                    batch,
                    case.prompt + case.completion,
                    impl=impl,
                    steps=steps,
                    warmup_steps=warmup,
                    padding_free=args.padding_free,
                    share_prompt=share,
                    loss_type=case.loss_type,
                    label=f"{case.name} {label}",
                )

            speed = []
            for r in range(args.repeat):
                run = spec("interleaved", f"interleaved #{r + 1}", None, args.rounds, args.warmup_rounds)
                speed.append(common.run_subprocess(run, scratch, script=__file__))
                print(f"{case.name}: interleaved process {r + 1}/{args.repeat}: {summarize_speed(speed[-1])}")
            memory = {config: [] for config in CONFIGS}
            for config in CONFIGS if len(results) % 2 == 0 else reversed(CONFIGS):
                run = spec("hf", f"memory {config}", CONFIGS[config], args.memory_steps, 1)
                memory[config].append(common.run_subprocess(run, scratch, verbose=True))
            results[name] = {"speed": speed, "memory": memory}
        text = report(args, shape, batch, results)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    suffix = "" if (shape.name, args.device) == ("large-vocab", "cpu") else f"_{shape.name}_{args.device}"
    suffix += "_padding_free" if args.padding_free else ""
    suffix += "" if args.cases == DEFAULT_CASES else "_" + "_".join(args.cases)
    path = Path(args.out_dir) / f"prompt_sharing{suffix}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(text)
    print(f"written {path}\ntotal {time.perf_counter() - t0:.0f} s")
    return 0


# ------------------------------------------------------------------------------------------- speed
def interleaved_worker(spec: common.RunSpec) -> dict:
    """One process, one model, a shared and an unshared DPOTrainer on it; their steps alternate on the same
    batch each round (order swapped every round)."""
    common._set_threads(spec.threads)
    import torch

    from hf_dpo.config import DPOConfig
    from hf_dpo.trainer import DPOTrainer

    on_cuda = spec.device == "cuda"
    dataset, loaded, out = common.interleaved_setup(spec)
    model = loaded.model
    trainers = {}
    for name, share in CONFIGS.items():
        args = DPOConfig(
            **common._training_args_common(spec, out),
            beta=spec.beta,
            loss_type=spec.loss_type,
            max_length=spec.max_length,
            max_prompt_length=spec.max_length - 1,
            padding_free=spec.padding_free,
            share_prompt=share,
        )
        trainers[name] = DPOTrainer(
            model=model, args=args, train_dataset=dataset, processing_class=loaded.tokenizer
        )
        trainers[name].current_gradient_accumulation_steps = 1
        assert trainers[name].data_collator.share_prompt is share
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec.learning_rate)
    wall: dict[str, list[float]] = {name: [] for name in CONFIGS}
    cpu: dict[str, list[float]] = {name: [] for name in CONFIGS}
    tokens, slots = [], {name: [] for name in CONFIGS}
    for r in range(spec.warmup_steps + spec.steps):
        features = [dataset[i] for i in range(r * spec.batch_size, (r + 1) * spec.batch_size)]
        tokens.append(common._tokens_of_features(features))
        for name in CONFIGS if r % 2 == 0 else reversed(CONFIGS):
            batch = trainers[name].data_collator(features)
            slots[name].append(int(batch["input_ids"].numel()))
            seconds = common.timed_step(trainers[name], model, batch, params, optimizer, on_cuda)
            wall[name].append(seconds[0])
            cpu[name].append(seconds[1])
    shutil.rmtree(out, ignore_errors=True)
    return {"wall": wall, "cpu": cpu, "tokens": tokens, "slots": slots, "warmup_steps": spec.warmup_steps}


def round_ratios(result: dict, clock: str) -> list[float]:
    """unshared step / shared step of each measured round (= tokens/s shared / unshared: same tokens)."""
    w = result["warmup_steps"]
    return [u / s for u, s in zip(result[clock]["unshared"][w:], result[clock]["shared"][w:])]


def summarize_speed(result: dict) -> str:
    w = result["warmup_steps"]
    shared, unshared = result["wall"]["shared"][w:], result["wall"]["unshared"][w:]
    return (
        f"median step unshared {common.median(unshared) * 1000:,.0f} ms / shared {common.median(shared) * 1000:,.0f} ms; "
        f"ratio wall {common.median(round_ratios(result, 'wall')):.2f}, cpu {common.median(round_ratios(result, 'cpu')):.2f}"
    )


# ------------------------------------------------------------------------------------------- report
def _quartiles(values: list[float]) -> str:
    if len(values) < 4:
        return common.spread(values)
    q = statistics.quantiles(values, n=4)
    return f"{q[0]:.2f}-{q[2]:.2f}"


def report(args, shape, batch, results) -> str:
    memory_key = "cuda_peak_mib" if args.device == "cuda" else "rss_peak_mib"
    growth_key = "cuda_growth_mib" if args.device == "cuda" else "rss_growth_mib"
    memory_name = "peak CUDA memory" if args.device == "cuda" else "peak RSS"
    rows, verdicts, notes = [], [], []
    for name, result in results.items():
        case = CASES[name]
        wall = [x for res in result["speed"] for x in round_ratios(res, "wall")]
        cpu = [x for res in result["speed"] for x in round_ratios(res, "cpu")]
        w = result["speed"][0]["warmup_steps"]
        step = {c: common.median([t for res in result["speed"] for t in res["wall"][c][w:]]) for c in CONFIGS}
        mem = {c: common.run_stats(result["memory"][c][0]) for c in CONFIGS}
        peak = {c: mem[c][memory_key] for c in CONFIGS}
        growth = {c: mem[c][growth_key] for c in CONFIGS}
        speed0 = result["speed"][0]
        tokens = common.median(speed0["tokens"][w:])
        slots = {c: common.median(speed0["slots"][c][w:]) for c in CONFIGS}
        rows.append(
            f"| {name} | {case.prompt} / {case.num_completions} x {case.completion} | {tokens:,.0f} | "
            f"{slots['unshared']:,.0f} / {slots['shared']:,.0f} | "
            f"{step['unshared'] * 1000:,.0f} / {step['shared'] * 1000:,.0f} | **{common.median(wall):.2f}** "
            f"({_quartiles(wall)}) | **{common.median(cpu):.2f}** ({_quartiles(cpu)}) | {case.bound:.2f} | "
            f"{case.target:.2f} | {peak['unshared']:,.0f} / {peak['shared']:,.0f} "
            f"(**{peak['shared'] / peak['unshared']:.2f}**) | {growth['unshared']:,.0f} / {growth['shared']:,.0f} |"
        )
        if name in DEFAULT_CASES:
            ratio, cpu_ratio = common.median(wall), common.median(cpu)
            met = ratio >= case.target
            verdicts.append(
                f"- {name}: tokens/s shared / unshared >= {case.target}: **{'met' if met else 'missed'}** "
                f"({ratio:.2f}x wall{'' if met else f', short by {case.target - ratio:.2f}'}; {cpu_ratio:.2f}x CPU "
                f"time); {memory_name} {'not higher' if peak['shared'] <= peak['unshared'] else '**HIGHER**'} "
                f"({peak['shared'] / peak['unshared']:.2f}x)"
            )
        first = {
            c: next((e for e in result["memory"][c][0]["log_history"] if "loss" in e), {}).get(
                "logps/chosen", float("nan")
            )
            for c in CONFIGS
        }
        notes.append(
            f"- {name}: first-step logps/chosen unshared {first['unshared']:.4f} / shared {first['shared']:.4f}"
        )
    command = " ".join(["OMP_NUM_THREADS=1", "python", "benchmarks/prompt_sharing.py", *sys.argv[1:]])
    layout = "packed (padding-free)" if args.padding_free else "padded"
    return f"""# hf_dpo prompt sharing: shared vs unshared, `{shape.name}` ({args.device}, live reference, {layout})

Command: `{command}`

- Model: {shape.arch}, vocab {shape.vocab_size}, hidden {shape.hidden_size}, {shape.num_layers} layers, random weights,
  4-bit NF4; LoRA r=16 on all linear layers; DPOTrainer training steps (policy forward + backward, live
  reference forward with the adapter disabled, gradient clipping, AdamW step); sigmoid loss for pairs,
  plackett_luce for K = 4.
- Data: {batch} rows per step of random token ids, every prompt and completion exactly the stated length.
- Speed: {args.repeat} interleaved process(es) per case, {args.warmup_rounds} warm-up + {args.rounds} measured rounds
  each; a round is one shared and one unshared step on the same batch, order swapped every round. Ratio =
  median over all measured rounds of (unshared step time / shared step time) = tokens/s shared / unshared
  (both sides process the same logical tokens: the prompt once per completion); in brackets the
  interquartile range over rounds (min-max under 4 rounds). "CPU": the same with process CPU time.
- Memory: one fresh process per configuration and case, {args.memory_steps} training steps after 1 warm-up;
  {memory_name} of the process (model loaded) and its growth during training.
- "bound": K (P + L) / (P + K L), the ratio if the step time were proportional to the tokens read.
- Machine: {common.machine_line(args.device)}; {common.versions_line()}; torch threads {args.threads}.

| case | prompt / completions | logical tokens per step | tensor slots unshared / shared | median step ms unshared / shared | tokens/s shared / unshared, wall (IQR) | CPU time (IQR) | bound | target | {memory_name} MiB unshared / shared (ratio) | growth in training MiB unshared / shared |
|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|
{chr(10).join(rows)}

{chr(10).join(verdicts)}

Sanity check (memory runs, same rows, same order): {"; ".join(n[2:] for n in notes)}.
"""


if __name__ == "__main__":
    sys.exit(main())
