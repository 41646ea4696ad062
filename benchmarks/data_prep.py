"""Time to the first training step on a large preference file: hf_dpo against TRL 1.16's DPOTrainer.

Both read the same JSON Lines file (100k explicit rows by default, written deterministically into a temp
folder: prompts of ~60 words, completions of ~40), tokenise it in one process (`dataset_num_proc` unset),
and train one step on the same tiny model (`hf_dpo.tiny`, 4-bit NF4 with fp32 compute, LoRA r=16 / alpha=32
/ dropout 0 on all linear layers, batch 8, max_length 512: no row is truncated by either). hf_dpo:
`load_preference_data` + `DPOTrainer`; TRL: `datasets.load_dataset("json")` + its `DPOTrainer`, which
tokenises in its constructor. Each measured run is a whole fresh process: its wall time and peak RSS
(`ru_maxrss` from `os.wait4`). "cold" starts from an empty `datasets` cache; "warm" is the next run of the
same implementation on the cache the cold run left. hf_dpo and TRL alternate (hf TRL, TRL hf, ...) and every
ratio is taken within one pair, so that drifts of a shared machine hit both sides alike.

    OMP_NUM_THREADS=1 python benchmarks/data_prep.py                  # 100k rows, 2 pairs (~15 min here)
    OMP_NUM_THREADS=1 python benchmarks/data_prep.py --rows 20000 --repeat 3

Writes benchmarks/results/data_prep.md and prints it. Each worker also reports where its time went
(imports, reading, tokenising inside the trainer's constructor, model loading, the first step).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

PHASES = ("import", "read", "model", "trainer", "first_step")


def write_rows(path: Path, rows: int, seed: int = 0) -> Path:
    """Explicit rows of words from the tiny tokenizer's corpus: prompts ~60 words, completions ~40."""
    from hf_dpo.tiny import tiny_corpus

    words = sorted({w for line in tiny_corpus() for w in line.split()})
    rng = random.Random(seed)

    def text(n: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n))

    with path.open("w", encoding="utf-8") as handle:
        for i in range(rows):
            row = {
                "prompt": f"Question {i}: {text(58)}? Answer:",
                "chosen": " " + text(40),
                "rejected": " " + text(40),
            }
            handle.write(json.dumps(row) + "\n")
    return path


def _spec(model_dir: str) -> common.RunSpec:
    return common.RunSpec(
        impl="", model_dir=model_dir, shape={}, data={}, batch_size=8, max_length=512, steps=1, warmup_steps=0
    )


def worker(impl: str, data: str, model_dir: str, out: str) -> None:
    """One measured run: import, read, load the model, build the trainer (tokenises), train one step."""
    marks, start = {}, time.perf_counter()

    def mark(name: str) -> None:
        marks[name] = time.perf_counter() - start - sum(marks.values())

    spec = _spec(model_dir)
    scratch = tempfile.mkdtemp(prefix="data_prep_run_")
    if impl == "hf":
        from hf_dpo.config import DPOConfig
        from hf_dpo.data import load_preference_data
        from hf_dpo.trainer import DPOTrainer

        mark("import")
        rows = load_preference_data(data)["train"]
        mark("read")
        loaded = common.load_hf_model(spec)
        model, tokenizer, extra = loaded.model, loaded.tokenizer, {"max_prompt_length": None}
        mark("model")
        args = DPOConfig(
            **common._training_args_common(spec, scratch), max_length=512, loss_type="sigmoid", **extra
        )
        trainer = DPOTrainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer)
    else:
        import datasets
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from trl import DPOConfig, DPOTrainer

        from hf_dpo.modeling import guard_cpu_4bit_repacking

        mark("import")
        rows = datasets.load_dataset("json", data_files=data, split="train")
        mark("read")
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(
            model_dir,
            quantization_config=common._bnb_config(spec),
            dtype=torch.float32,
            device_map={"": "cpu"},
        )
        model.config.use_cache = False
        guard_cpu_4bit_repacking(model)  # the same bitsandbytes CPU kernels as hf_dpo
        mark("model")
        args = DPOConfig(**common._training_args_common(spec, scratch), max_length=512, loss_type=["sigmoid"])
        trainer = DPOTrainer(
            model=model,
            args=args,
            train_dataset=rows,
            processing_class=tokenizer,
            peft_config=common._lora_config(spec),
        )
        guard_cpu_4bit_repacking(trainer.model)
        for (
            param
        ) in trainer.model.parameters():  # TRL casts QLoRA adapters to bf16: train fp32 ones, as hf_dpo
            if param.requires_grad:
                param.data = param.data.float()
    mark("trainer")
    trainer.train()
    mark("first_step")
    Path(out).write_text(json.dumps({"phases": marks, "rows": len(trainer.train_dataset)}))
    shutil.rmtree(scratch, ignore_errors=True)


def run(impl: str, data: Path, model_dir: Path, cache: Path, scratch: Path) -> dict:
    """Start one worker process on the `datasets` cache `cache`; return its wall time, peak RSS and phases."""
    env = common.worker_env(1)
    env.update(HF_DATASETS_CACHE=str(cache), HF_DPO_CACHE=str(scratch / "hf_dpo_cache"))
    out = scratch / f"{impl}.json"
    command = [sys.executable, __file__, "--worker", impl, str(data), str(model_dir), str(out)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        command, env=env, cwd=common.REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if status != 0:
        raise RuntimeError(f"{impl} worker failed:\n{output.decode(errors='replace')[-4000:]}")
    result = json.loads(out.read_text())
    return {
        **result,
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "rss_mib": usage.ru_maxrss / 1024,
    }


def _ratio_line(label: str, ratios: list[float], target: str) -> str:
    return f"| {label} | {statistics.median(ratios):.2f} | {min(ratios):.2f}-{max(ratios):.2f} | {target} |"


MEASURES = {"wall_s": "wall time", "cpu_s": "CPU time (user + sys)", "rss_mib": "peak RSS"}
TARGETS = {"cold": {"wall_s": "<= 0.7", "cpu_s": "<= 0.7", "rss_mib": "<= 1.0"}}
TARGETS["warm"] = {"wall_s": "<= 1.0", "cpu_s": "<= 1.0", "rss_mib": "<= 1.0"}


def report(runs: list[dict], rows: int) -> str:
    """Markdown: per-pair ratios hf/TRL (median and spread), absolute medians, and the phase breakdown."""
    pairs = {}
    for r in runs:
        pairs.setdefault(r["pair"], {})[(r["impl"], r["cache"])] = r
    lines = [
        "# Data preparation: time to the first training step, hf_dpo vs TRL",
        "",
        f"{rows} explicit rows (prompt ~60 words, completions ~40), tiny model in 4-bit NF4 + LoRA r=16,",
        f"batch 8, max_length 512, 1 step, one tokenising process; {len(pairs)} alternating pairs.",
        f"Machine: {common.machine_line('cpu')}; {common.versions_line()}.",
        "",
        "| hf_dpo / TRL | median | spread (pairs) | target |",
        "|---|---:|---:|---|",
    ]
    for cache in ("cold", "warm"):
        for what, label in MEASURES.items():
            ratios = [p[("hf", cache)][what] / p[("trl", cache)][what] for p in pairs.values()]
            lines.append(_ratio_line(f"{cache} cache: {label}", ratios, TARGETS[cache][what]))
    lines += [
        "",
        "| run | wall s | CPU s | peak RSS MiB | " + " | ".join(f"{p} s" for p in PHASES) + " |",
        "|---|---:|---:|---:|" + "---:|" * len(PHASES),
    ]
    for impl in ("hf", "trl"):
        for cache in ("cold", "warm"):
            mine = [r for r in runs if (r["impl"], r["cache"]) == (impl, cache)]
            cells = [statistics.median(r[k] for r in mine) for k in MEASURES]
            phases = [statistics.median(r["phases"].get(p, 0.0) for r in mine) for p in PHASES]
            name = "hf_dpo" if impl == "hf" else "TRL"
            row = [f"{cells[0]:.1f}", f"{cells[1]:.1f}", f"{cells[2]:.0f}", *(f"{c:.1f}" for c in phases)]
            lines.append(f"| {name} {cache} | " + " | ".join(row) + " |")
    lines += [
        "",
        "Medians over the runs. Phases are measured inside each worker: `import` (hf_dpo's or TRL's trainer",
        "stack), `read` (load_preference_data / load_dataset), `model` (4-bit base, tokenizer), `trainer` (the",
        "trainer's constructor: tokenisation, LoRA for TRL), `first_step` (trainer.train() with max_steps=1).",
        "The wall time also counts interpreter start-up and exit. CPU time (user + sys of the worker, from",
        "`os.wait4`) is the steadier measure on a shared machine: other processes slow the wall clock, not it.",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument(
        "--repeat", type=int, default=2, help="alternating (hf, TRL) pairs, each cold then warm"
    )
    parser.add_argument("--out", default="data_prep.md", help="file name under benchmarks/results")
    parser.add_argument("--worker", nargs=4, metavar=("IMPL", "DATA", "MODEL", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(*args.worker)
        return 0
    from hf_dpo.tiny import ensure_tiny_model

    root = Path(tempfile.mkdtemp(prefix="data_prep_"))
    try:
        data = write_rows(root / "prefs.jsonl", args.rows)
        model_dir = ensure_tiny_model(root / "model")
        runs = []
        for pair in range(args.repeat):
            for impl in ("hf", "trl") if pair % 2 == 0 else ("trl", "hf"):
                cache = root / f"cache_{impl}_{pair}"  # empty: the cold run fills it, the warm run reads it
                for state in ("cold", "warm"):
                    result = run(impl, data, model_dir, cache, root)
                    runs.append({**result, "impl": impl, "cache": state, "pair": pair})
                    print(
                        f"  pair {pair} {impl} {state}: {result['wall_s']:.1f} s (CPU {result['cpu_s']:.1f} s), {result['rss_mib']:.0f} MiB, "
                        + ", ".join(f"{k} {v:.1f}" for k, v in result["phases"].items()),
                        flush=True,
                    )
                shutil.rmtree(cache, ignore_errors=True)
        text = report(runs, args.rows)
        print(text)
        print(f"written to {common.write_result(args.out, text)}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
