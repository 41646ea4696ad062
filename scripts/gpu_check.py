"""One command that settles hf_dpo's CUDA path: correctness first, then speed and memory against TRL, then the
longest sequence that fits, then FSDP. It prints one summary table and writes it, with every figure, as JSON.

    python scripts/gpu_check.py                          # one CUDA GPU: under 8 minutes on an H200
    python scripts/gpu_check.py --device cpu --smoke     # every stage at toy size on CPU (CI runs it)

No network: every model is built here from a transformers config with random weights (a Qwen2.5-0.5B-shaped
model, a 4-layer slice of it, a 2-layer slice of Llama-2-7B), with random token ids as data. Stages, in order
of value; each check is guarded, so a failure is recorded and the next check still runs:

1. correctness (4-bit NF4, bf16 compute on CUDA): step-0 loss ln 2 with zero rewards; LoRA gradients equal to
   those of a dequantised twin, after an evaluation pass and after precomputing the reference; the fused LM
   head against full logits; padding-free against padded (hf_dpo's varlen sdpa, and flash-attention's varlen
   kernels if flash_attn is installed); prompt sharing against unshared (where DPOConfig has `share_prompt`);
   the paged 8-bit AdamW step against torch's AdamW; a recipe run killed with SIGKILL mid-run and resumed
   ends with the adapter of an uninterrupted run.
2. speed: hf_dpo and TRL's DPOTrainer side by side (benchmarks/common.py: same model folder, token ids, LoRA,
   batch, length, steps), reference live and precomputed: tokens/s and peak memory.
3. longest: the longest max_length at which one training step of one pair fits in --memory_budget_gib (hf_dpo
   and TRL, same model and budget): doubling, then bisection, each try a full step.
4. fsdp: on 2+ GPUs the recipe under recipes/accelerate_configs/fsdp_qlora.yaml against one process; on 1 GPU
   the same FSDP path unsharded; on CPU (where accelerate cannot run FSDP) scripts/fsdp_check.py's 2-process
   FSDP2 run against one process.

The JSON (--out) is rewritten after every check, so a run cut short still leaves what it found. Exit code 0 when
no check failed or raised. --time_budget_s (default 450) bounds stages 3-4: the search gets what stages 1-2 left.

The smoke run calls the same functions at toy sizes in fp32 (--dtype bfloat16 runs the bf16 paths on CPU), and
in-process where the GPU run starts a fresh process per measurement (tests/test_gpu_check.py runs those process
paths on CPU too). Written without a GPU: the CUDA-only branches (memory figures, flash-attention, paged
optimizer states, FSDP over GPUs) have not run yet.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gc
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import common  # noqa: E402  benchmarks/common.py: shapes, model folders, synthetic rows, measured runs

LN2 = math.log(2.0)
RECIPE = REPO / "recipes" / "qlora_dpo.py"
FSDP_QLORA_CONFIG = REPO / "recipes" / "accelerate_configs" / "fsdp_qlora.yaml"
FSDP_CHECK = REPO / "scripts" / "fsdp_check.py"

# Models. The GPU run uses real shapes; the smoke run toy ones of the same two architectures.
QWEN_05B = common.SHAPES["qwen2.5-0.5b"]  # hidden 896, 24 layers, 14/2 heads, vocab 151,936, tied
QWEN_05B_SLICE = dataclasses.replace(QWEN_05B, name="qwen2.5-0.5b-4-layers", num_layers=4, max_length=512)
LLAMA2_7B_SLICE = common.Shape(
    "llama-2-7b-2-layers", "llama", 32000, 4096, 2, 32, 32, 11008, max_length=256, batch_size=2
)
QWEN_TOY = common.Shape(
    "qwen2-toy", "qwen2", 512, 64, 2, 4, 2, 128, max_length=64, batch_size=4, tie_word_embeddings=True
)
LLAMA_TOY = common.Shape("llama-toy", "llama", 512, 64, 2, 4, 4, 176, max_length=64, batch_size=2)


@dataclasses.dataclass
class Plan:
    """Everything that differs between the GPU run and the CPU smoke run: device, dtypes, sizes, bounds."""

    device: str
    smoke: bool
    correctness_shapes: list
    speed_shape: common.Shape
    speed_batch: int
    speed_max_length: int
    speed_steps: int
    speed_warmup: int
    search_start: int
    search_cap: int  # lengths above this are not tried (and count as not fitting)
    search_granularity: int
    memory_budget_gib: float
    time_budget_s: float
    threads: int
    # True: every measurement (speed run, length search, reference run) in a fresh process, so that peak memory
    # and any out-of-memory error stay its own. The smoke run calls the same functions in-process instead: its
    # figures mean nothing, and each process start costs ~6 s of CPU on a small shared machine.
    isolate: bool
    dtype: str = (
        "float32"  # compute dtype of stage 1 and the recipe runs (4-bit matmuls; Trainer bf16 with bf16)
    )
    seed: int = 0

    @property
    def on_cuda(self) -> bool:
        return self.device == "cuda"

    @property
    def compute_dtype(self) -> str:
        return self.dtype

    @property
    def bf16(self) -> bool:
        return self.dtype == "bfloat16"

    @property
    def bounds(self) -> dict[str, float]:
        """Pass bounds (relative errors unless named otherwise). fp32: rounding only. bf16: the CPU bf16 run
        (--device cpu --smoke --dtype bfloat16) measures 5e-3 for the twin, fused-head and padding-free
        gradients; the bounds leave 6x. Bit-identical resume only on CPU: CUDA kernels (flash/sdpa backward)
        accumulate in a varying order. 8-bit optimizer states: under 1% of the update on CPU."""
        bounds = {"ln2": 1e-6, "optimizer": 0.05, "fsdp2_cpu": 1e-4, "fsdp_qlora": 5e-2}
        if self.bf16:
            bounds.update(twin=3e-2, fused_logps=2e-3, fused_grads=3e-2, packed=3e-2, shared=3e-2)
        else:
            bounds.update(twin=1e-4, fused_logps=1e-5, fused_grads=1e-4, packed=1e-4, shared=1e-4)
        bounds["resume"] = 2e-2 if self.on_cuda else 0.0
        return bounds


def make_plan(args) -> Plan:
    if args.smoke:
        plan = Plan(
            device=args.device,
            smoke=True,
            correctness_shapes=[QWEN_TOY, LLAMA_TOY],
            speed_shape=common.SHAPES["tiny"],
            speed_batch=2,
            speed_max_length=64,
            speed_steps=2,
            speed_warmup=1,
            search_start=16,
            search_cap=100,
            search_granularity=8,
            memory_budget_gib=4.0,
            time_budget_s=900.0,  # a guard only: the smoke run must run every check
            threads=1,
            isolate=False,
        )
    else:
        plan = Plan(
            device=args.device,
            smoke=False,
            correctness_shapes=[QWEN_05B_SLICE, LLAMA2_7B_SLICE],
            speed_shape=QWEN_05B,
            speed_batch=4,
            speed_max_length=1024,
            speed_steps=6,
            speed_warmup=2,
            search_start=4096,
            search_cap=262144,
            search_granularity=512,
            memory_budget_gib=24.0,
            time_budget_s=450.0,
            threads=4,
            isolate=True,
        )
    plan.dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if args.device == "cuda" else "float32")
    if args.memory_budget_gib is not None:
        plan.memory_budget_gib = args.memory_budget_gib
    if args.time_budget_s is not None:
        plan.time_budget_s = args.time_budget_s
    plan.seed = args.seed
    return plan


# ------------------------------------------------------------------------------------------ the report
class Report:
    """The JSON report, rewritten after every check, and the rows of the summary table."""

    def __init__(self, path: Path, plan: Plan, started: float):
        self.path = path
        self.plan = plan
        self.started = started
        self.data = {
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "plan": {
                "device": plan.device,
                "smoke": plan.smoke,
                "compute_dtype": plan.compute_dtype,
                "memory_budget_gib": plan.memory_budget_gib,
                "time_budget_s": plan.time_budget_s,
                "bounds": plan.bounds,
            },
            "environment": environment(plan.device),
            "stages": {},
        }
        self.write()

    def seconds_left(self) -> float:
        return self.plan.time_budget_s - (time.perf_counter() - self.started)

    def check(self, stage: str, name: str, fn, *args, **kwargs) -> dict:
        """Run one check; an exception becomes an `error` entry and the run goes on."""
        checks = self.data["stages"].setdefault(stage, {"checks": {}})["checks"]
        t0 = time.perf_counter()
        try:
            result = fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - recorded, so that the next check still runs
            result = {
                "status": "error",
                "summary": f"{type(err).__name__}: {str(err)[:160]}",
                "error": f"{type(err).__name__}: {err}"[:2000],
                "traceback": traceback.format_exc()[-4000:],
            }
        result["seconds"] = round(time.perf_counter() - t0, 2)
        checks[name] = result
        release_memory()
        self.write()
        print(
            f"[{stage}] {name}: {result['status']} - {result.get('summary', '')} ({result['seconds']} s)",
            flush=True,
        )
        return result

    def skip(self, stage: str, name: str, reason: str) -> None:
        self.check(stage, name, lambda: {"status": "skipped", "reason": reason, "summary": reason})

    def finish(self) -> int:
        statuses = [c["status"] for s in self.data["stages"].values() for c in s["checks"].values()]
        self.data["total_s"] = round(time.perf_counter() - self.started, 1)
        self.data["passed"] = not any(s in ("fail", "error") for s in statuses)
        self.data["counts"] = {s: statuses.count(s) for s in sorted(set(statuses))}
        self.write()
        print(self.table())
        return 0 if self.data["passed"] else 1

    def table(self) -> str:
        env = self.data["environment"]
        lines = [
            f"hf_dpo GPU check on {env.get('gpu') or env['cpu']} ({self.plan.device}, "
            f"{'smoke' if self.plan.smoke else 'full'}): {self.data['total_s']} s, "
            f"{'all passed' if self.data['passed'] else 'FAILURES'} {self.data['counts']}",
            f"torch {env['torch']} (CUDA {env['cuda']}), transformers {env['transformers']}, peft {env['peft']}, "
            f"bitsandbytes {env['bitsandbytes']}, trl {env['trl']}, flash_attn {env['flash_attn']}",
            "",
            "| stage | check | status | figures | s |",
            "|---|---|---|---|---:|",
        ]
        for stage, body in self.data["stages"].items():
            for name, c in body["checks"].items():
                summary = str(c.get("summary", "")).replace("|", "/")
                lines.append(f"| {stage} | {name} | {c['status']} | {summary} | {c['seconds']} |")
        return "\n".join(lines)

    def write(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)


def environment(device: str) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    import torch

    def package(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    env = {
        "python": platform.python_version(),
        "cpu": common.machine_line("cpu").split(" (")[0].removeprefix("CPU "),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "gpu_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "gpu": None,
        **{name: package(name) for name in ("transformers", "peft", "bitsandbytes", "trl", "accelerate")},
        "flash_attn": package("flash_attn") or package("flash-attn"),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(
            gpu=torch.cuda.get_device_name(0),
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            compute_capability=f"{props.major}.{props.minor}",
            cudnn=torch.backends.cudnn.version(),
            bf16_supported=torch.cuda.is_bf16_supported(),
        )
    return env


def release_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def verdict(ok: bool) -> str:
    return "pass" if ok else "fail"


def load_script(path: Path):
    """A script of this repository as a module (scripts/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------- models and data
def build_model_dir(shape: common.Shape, scratch: Path, seed: int) -> Path:
    """A saved random-weight model of `shape` plus the tiny tokenizer (ids < 512), built once per run."""
    path = scratch / f"model_{shape.name}"
    if not (path / "config.json").exists():
        common.build_model_dir(shape, path, seed=seed)
    return path


def token_rows(shape: common.Shape, n: int, max_length: int, seed: int):
    """n pairs of random token ids (prompt 1/16..1/4 of max_length, completions 1/8..3/4), tokenised rows."""
    from datasets import Dataset

    rows = common.make_rows(common.default_data_spec(shape, n, max_length=max_length, seed=seed))
    return Dataset.from_list(
        [
            {
                "prompt_input_ids": r["prompt"],
                "completion_input_ids": [r["chosen"], r["rejected"]],
                "source_line": i + 1,
            }
            for i, r in enumerate(rows)
        ]
    )


def load(plan: Plan, model_dir: Path, seed: int = 0, **overrides):
    """The folder in 4-bit NF4 (compute in the plan's dtype) with a fresh LoRA (r 16, dropout 0), via load_model."""
    import torch

    from hf_dpo.config import ModelArguments
    from hf_dpo.modeling import load_model

    torch.manual_seed(seed)
    model_args = dict(
        model_name_or_path=str(model_dir),
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=plan.compute_dtype,
        lora_r=16,
        lora_alpha=32,
        lora_dropout=0.0,
    )
    model_args.update(overrides)
    return load_model(ModelArguments(**model_args), use_cpu=not plan.on_cuda)


def dpo_fields() -> set[str]:
    from hf_dpo.config import DPOConfig

    return {f.name for f in dataclasses.fields(DPOConfig)}


def make_trainer(plan: Plan, loaded, dataset, output_dir: Path, max_length: int, **config):
    from hf_dpo.config import DPOConfig
    from hf_dpo.trainer import DPOTrainer

    settings = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        learning_rate=5e-3,
        lr_scheduler_type="constant",
        max_steps=2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=not plan.on_cuda,
        bf16=plan.bf16,
        seed=plan.seed,
        data_seed=plan.seed,
        disable_tqdm=True,
        max_length=max_length,
        max_prompt_length=max_length // 2,
    )
    settings.update(config)
    return DPOTrainer(
        model=loaded.model,
        args=DPOConfig(**settings),
        train_dataset=dataset,
        eval_dataset=dataset,
        processing_class=loaded.tokenizer,
    )


def batch_of(trainer, n: int = 4, collator=None) -> dict:
    """The first n rows of the train set, collated by `collator` (default: the trainer's), on its device."""
    import torch

    features = [trainer.train_dataset[i] for i in range(n)]
    batch = (collator or trainer.data_collator)(features)
    return {k: v.to(trainer.args.device) if torch.is_tensor(v) else v for k, v in batch.items()}


def loss_and_grads(trainer, model, batch):
    """(loss, LoRA gradients as one fp32 vector) of one compute_loss + backward, as in a training step."""
    import torch

    model.train()
    model.zero_grad(set_to_none=True)
    with trainer.compute_loss_context_manager():
        loss = trainer.compute_loss(model, batch)
    loss.backward()
    grads = [
        (p.grad if p.grad is not None else torch.zeros_like(p)).detach().float().flatten()
        for p in model.parameters()
        if p.requires_grad
    ]
    model.zero_grad(set_to_none=True)
    return loss.detach().float(), torch.cat(grads)


def relative_difference(a, b) -> float:
    """||a - b|| / ||b|| (over all elements, fp32)."""
    a, b = a.detach().float(), b.detach().float()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def dequantized_twin(peft_model, dtype):
    """A copy of a 4-bit peft model in which every bitsandbytes Linear4bit is a plain nn.Linear holding the
    dequantised weight, in `dtype`, on the same device; LoRA weights are copied. Its gradients are the ground
    truth for the 4-bit model's (tests/trainer_helpers.py has the fp32 CPU version)."""
    import bitsandbytes as bnb
    import torch
    from bitsandbytes.functional import dequantize_4bit

    twin = copy.deepcopy(peft_model)
    for module in list(twin.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, bnb.nn.Linear4bit):
                weight = dequantize_4bit(child.weight.data, child.weight.quant_state).to(dtype)
                linear = torch.nn.Linear(
                    child.in_features,
                    child.out_features,
                    bias=child.bias is not None,
                    device=weight.device,
                    dtype=dtype,
                )
                linear.weight.data.copy_(weight)
                linear.weight.requires_grad_(False)
                if child.bias is not None:
                    linear.bias.data.copy_(child.bias.data.to(dtype))
                    linear.bias.requires_grad_(False)
                setattr(module, child_name, linear)
    return twin


# ------------------------------------------------------------------------------- stage 1: correctness
def check_step0(plan: Plan, trainer) -> dict:
    """A fresh LoRA (B = 0): policy == reference, so the loss is ln 2 and every reward is 0."""
    import torch

    loss, _ = loss_and_grads(trainer, trainer.model, batch_of(trainer))
    metrics = trainer.evaluate()
    rewards = {k: metrics[f"eval_rewards/{k}"] for k in ("chosen", "rejected", "margins", "accuracies")}
    deviation = max(abs(loss.item() - LN2), abs(metrics["eval_loss"] - LN2))
    ok = deviation <= plan.bounds["ln2"] and max(abs(v) for v in rewards.values()) <= plan.bounds["ln2"]
    assert torch.isfinite(loss)
    return {
        "status": verdict(ok),
        "loss": loss.item(),
        "eval_loss": metrics["eval_loss"],
        "ln2_deviation": deviation,
        "rewards": rewards,
        "summary": f"loss - ln 2 = {deviation:.1e}, rewards {max(abs(v) for v in rewards.values()):.1e}",
    }


def check_twin(plan: Plan, trainer, when: str) -> dict:
    """LoRA gradients of the 4-bit model against its dequantised twin (same compute dtype), on a trained
    adapter (so lora_A gets gradients too), after `when` (an evaluation pass or the reference precompute)."""
    import torch

    model = trainer.model
    batch = batch_of(trainer)
    loss, grads = loss_and_grads(trainer, model, batch)
    twin = dequantized_twin(model, getattr(torch, plan.compute_dtype))
    twin_loss, twin_grads = loss_and_grads(trainer, twin, batch)
    del twin
    error = relative_difference(grads, twin_grads)
    ok = error <= plan.bounds["twin"] and torch.isfinite(grads).all().item() and twin_grads.norm() > 0
    return {
        "status": verdict(ok),
        "after": when,
        "gradient_relative_error": error,
        "loss": loss.item(),
        "twin_loss": twin_loss.item(),
        "gradient_norm": twin_grads.norm().item(),
        "summary": f"after {when}: |g - g_twin| / |g_twin| = {error:.1e} (loss {loss.item():.4f})",
    }


def check_fused_head(plan: Plan, trainer) -> dict:
    """hf_dpo.logps' fused LM head against full logits: sequence log-probs and LoRA gradients, on the model as
    trained; with the peak memory of each on CUDA."""
    import torch

    from hf_dpo.collator import PreferenceCollator
    from hf_dpo.logps import (
        fusable_lm_head,
        lm_head_returns_hidden_states,
        sequence_logps,
        sequence_logps_from_hidden,
    )

    model = trainer.model
    batch = batch_of(trainer, collator=PreferenceCollator(pad_token_id=trainer.processing_class.pad_token_id))
    head = fusable_lm_head(model)
    if head is None:
        return {"status": "fail", "summary": "fusable_lm_head(model) is None: the fused head is never used"}
    ids, mask = batch["input_ids"], batch["completion_mask"]
    results = {}
    for path in ("full", "fused"):
        model.train()
        model.zero_grad(set_to_none=True)
        if plan.on_cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        with trainer.compute_loss_context_manager():
            if path == "full":
                logits = model(input_ids=ids, attention_mask=batch["attention_mask"], use_cache=False).logits
                out = sequence_logps(logits, ids, mask)
            else:
                with lm_head_returns_hidden_states(head):
                    hidden = model(
                        input_ids=ids, attention_mask=batch["attention_mask"], use_cache=False
                    ).logits
                out = sequence_logps_from_hidden(hidden, head.weight, ids, mask, lm_head_bias=head.bias)
        out.logps.sum().backward()
        grads = torch.cat([p.grad.detach().float().flatten() for p in model.parameters() if p.requires_grad])
        peak = torch.cuda.max_memory_allocated() / 2**20 if plan.on_cuda else None
        results[path] = (out.logps.detach().float(), grads, peak)
        model.zero_grad(set_to_none=True)
        del out
    (full_logps, full_grads, full_peak), (fused_logps, fused_grads, fused_peak) = (
        results["full"],
        results["fused"],
    )
    logps_error = ((fused_logps - full_logps).abs().max() / full_logps.abs().max()).item()
    grads_error = relative_difference(fused_grads, full_grads)
    ok = logps_error <= plan.bounds["fused_logps"] and grads_error <= plan.bounds["fused_grads"]
    summary = f"logps rel {logps_error:.1e}, grads rel {grads_error:.1e}"
    if plan.on_cuda:
        summary += f", peak {fused_peak:.0f} vs {full_peak:.0f} MiB"
    return {
        "status": verdict(ok),
        "logps_relative_error": logps_error,
        "gradient_relative_error": grads_error,
        "peak_mib_full_logits": full_peak,
        "peak_mib_fused": fused_peak,
        "summary": summary,
    }


def compare_batches(plan: Plan, pairs, bound: float) -> dict:
    """pairs: [(trainer, batch)] for the baseline then the variant, on the same weights: log-probs, loss and LoRA
    gradients of the variant relative to the baseline."""
    import torch

    out = []
    for trainer, batch in pairs:
        with torch.no_grad(), trainer.compute_loss_context_manager():
            trainer.model.train()
            logps = trainer.sequence_logps(trainer.model, batch).logps.float()
        loss, grads = loss_and_grads(trainer, trainer.model, batch)
        out.append((logps, loss, grads))
    (logps_a, loss_a, grads_a), (logps_b, loss_b, grads_b) = out
    logps_error = ((logps_b - logps_a).abs().max() / logps_a.abs().max()).item()
    loss_error = abs(loss_b.item() - loss_a.item())
    grads_error = relative_difference(grads_b, grads_a)
    ok = max(logps_error, grads_error) <= bound and loss_error <= bound
    return {
        "status": verdict(ok),
        "logps_relative_error": logps_error,
        "loss_difference": loss_error,
        "gradient_relative_error": grads_error,
        "summary": f"logps rel {logps_error:.1e}, loss {loss_error:.1e}, grads rel {grads_error:.1e}",
    }


def check_padding_free(plan: Plan, ctx, attention: str) -> dict:
    """Packed rows (one row, varlen attention) against padded rows, same weights (the trained adapter, copied
    into a freshly loaded model with `attention`: a model is prepared for DPO once, by its first trainer, and
    this one's first trainer is the padding-free one)."""
    import torch

    from hf_dpo.attention import VARLEN_ATTENTION

    loaded = load(plan, ctx["model_dir"], attn_implementation=attention)
    adapter = {k for k in loaded.model.state_dict() if "lora_" in k}
    trained = {k: v.detach().clone() for k, v in ctx["loaded"].model.state_dict().items() if k in adapter}
    if trained.keys() != adapter:
        raise KeyError(
            f"adapter weights missing from the trained model: {sorted(adapter - trained.keys())[:3]}"
        )
    with torch.no_grad():
        loaded.model.load_state_dict(trained, strict=False)
    no_sharing = {"share_prompt": False} if "share_prompt" in dpo_fields() else {}
    scratch, max_length = ctx["scratch"], ctx["max_length"]
    packed = make_trainer(
        plan, loaded, ctx["dataset"], scratch / "packed", max_length, padding_free=True, **no_sharing
    )
    padded = make_trainer(plan, loaded, ctx["dataset"], scratch / "padded", max_length, **no_sharing)
    kernel = loaded.model.config._attn_implementation
    expected = "flash_attention_2" if attention == "flash_attention_2" else VARLEN_ATTENTION
    packed_batch = batch_of(packed)
    result = compare_batches(
        plan, [(padded, batch_of(padded)), (packed, packed_batch)], plan.bounds["packed"]
    )
    if packed_batch["input_ids"].shape[0] != 1 or kernel != expected:
        result["status"] = "fail"
    result.update(attention_kernel=kernel)
    result["summary"] = f"{kernel}: {result['summary']}"
    return result


def check_share_prompt(plan: Plan, ctx) -> dict:
    """[prompt | chosen | rejected] in one sequence against the prompt repeated before each completion."""
    if "share_prompt" not in dpo_fields():
        return {
            "status": "skipped",
            "reason": "not available",
            "summary": "not available (no DPOConfig.share_prompt)",
        }
    loaded = ctx["loaded"]
    unshared = make_trainer(
        plan, loaded, ctx["dataset"], ctx["scratch"] / "unshared", ctx["max_length"], share_prompt=False
    )
    shared = make_trainer(
        plan, loaded, ctx["dataset"], ctx["scratch"] / "shared", ctx["max_length"], share_prompt=True
    )
    shared_batch = batch_of(shared)
    result = compare_batches(
        plan, [(unshared, batch_of(unshared)), (shared, shared_batch)], plan.bounds["shared"]
    )
    rows = shared_batch["input_ids"].shape[0]
    result["rows_per_forward"] = rows
    if rows != 4:  # one sequence per pair, not two: otherwise sharing silently did not happen
        result["status"] = "fail"
        result["summary"] = f"{rows} rows for 4 pairs (sharing is off); " + result["summary"]
    return result


def check_paged_adamw_8bit(plan: Plan, ctx) -> dict:
    """Two steps with optim paged_adamw_8bit against two with torch's AdamW from the same adapter: the LoRA
    updates agree to a few percent (8-bit states; bitsandbytes keeps tensors under 4,096 elements, e.g. the toy
    model's LoRA weights, in 32-bit), are finite, and the base weights do not move."""
    import torch

    loaded = ctx["loaded"]
    model = loaded.model
    start = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
    frozen = {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" not in k}
    deltas, described, paged = {}, {}, {}
    for optim in ("adamw_torch", "paged_adamw_8bit"):
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in start:
                    param.copy_(start[name])
        trainer = make_trainer(
            plan, loaded, ctx["dataset"], ctx["scratch"] / optim, ctx["max_length"], optim=optim
        )
        trainer.train()
        optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # inside accelerate's wrapper
        states = [s for s in optimizer.state.values() if "state1" in s or "exp_avg" in s]
        state_dtypes = sorted(
            {str(s.get("state1", s.get("exp_avg")).dtype).removeprefix("torch.") for s in states}
        )
        described[optim] = (
            f"{type(optimizer).__module__}.{type(optimizer).__name__} (states {', '.join(state_dtypes)})"
        )
        # bitsandbytes marks the state buffers it put in paged (unified) memory: on CUDA those of tensors of
        # 100,000 elements or more (LoRA r 16 on the 0.5B shape has none); on CPU none (it falls back).
        paged[optim] = (sum(bool(getattr(s.get("state1"), "is_paged", False)) for s in states), len(states))
        deltas[optim] = torch.cat(
            [(p.detach() - start[k]).float().flatten() for k, p in model.named_parameters() if k in start]
        )
        del trainer
    error = relative_difference(deltas["paged_adamw_8bit"], deltas["adamw_torch"])
    base_moved = any(not torch.equal(frozen[k], v) for k, v in model.state_dict().items() if k in frozen)
    finite = torch.isfinite(deltas["paged_adamw_8bit"]).all().item()
    ok = (
        error <= plan.bounds["optimizer"]
        and finite
        and not base_moved
        and deltas["paged_adamw_8bit"].norm() > 0
    )
    return {
        "status": verdict(ok),
        "update_relative_difference": error,
        "optimizers": described,
        "paged_state_tensors": paged["paged_adamw_8bit"][0],
        "state_tensors": paged["paged_adamw_8bit"][1],
        "base_weights_moved": base_moved,
        "summary": f"{described['paged_adamw_8bit']}, {paged['paged_adamw_8bit'][0]} of {paged['paged_adamw_8bit'][1]} paged: update vs torch AdamW rel {error:.1e}, base weights unchanged {not base_moved}",
    }


def run_correctness_model(
    plan: Plan, report: Report, shape: common.Shape, scratch: Path, first: bool
) -> dict:
    """Every stage-1 check on one model (each recorded on its own); the first model also gets the padding-free,
    sharing and optimizer checks. Passes if the model could be built and loaded; holds its folder."""
    stage = "correctness"
    model_dir = build_model_dir(shape, scratch, plan.seed)
    max_length = shape.max_length
    dataset = token_rows(shape, 16, max_length, plan.seed)
    ctx = {
        "model_dir": model_dir,
        "dataset": dataset,
        "max_length": max_length,
        "scratch": scratch / shape.name,
    }
    name = shape.name
    ctx["loaded"] = loaded = load(plan, model_dir)
    main = make_trainer(plan, loaded, dataset, ctx["scratch"] / "main", max_length)
    report.check(stage, f"{name}: step-0 loss ln 2, rewards 0", check_step0, plan, main)

    def after_evaluation():
        main.train()  # a trained adapter: lora_A gets gradients too
        main.evaluate()
        return check_twin(plan, main, "an evaluation pass")

    def after_precompute():
        # Precomputed on the trained adapter: the reference is the adapter-disabled model all the same.
        ctx["trainer"] = make_trainer(
            plan, loaded, dataset, ctx["scratch"] / "pre", max_length, precompute_ref_log_probs=True
        )
        ctx["trainer"].train()
        return check_twin(plan, ctx["trainer"], "the reference precompute")

    report.check(stage, f"{name}: LoRA gradients = dequantised twin (after eval)", after_evaluation)
    report.check(stage, f"{name}: LoRA gradients = dequantised twin (after precompute)", after_precompute)
    report.check(
        stage, f"{name}: fused LM head = full logits", check_fused_head, plan, ctx.pop("trainer", main)
    )
    if first:
        report.check(
            stage,
            f"{name}: padding-free = padded (hf_dpo varlen sdpa)",
            check_padding_free,
            plan,
            ctx,
            "sdpa",
        )
        if not plan.on_cuda:
            report.skip(stage, f"{name}: padding-free = padded (flash-attention varlen)", "needs CUDA")
        elif not report.data["environment"]["flash_attn"]:
            report.skip(
                stage, f"{name}: padding-free = padded (flash-attention varlen)", "flash_attn not installed"
            )
        else:
            report.check(
                stage, f"{name}: padding-free = padded (flash-attention varlen)", check_padding_free, plan, ctx,
                "flash_attention_2",
            )  # fmt: skip
        report.check(stage, f"{name}: prompt sharing = unshared", check_share_prompt, plan, ctx)
        report.check(stage, f"{name}: paged_adamw_8bit step", check_paged_adamw_8bit, plan, ctx)
    ctx.pop("loaded")
    return {
        "status": "pass",
        "model_dir": model_dir,
        "summary": f"{shape.name}: {shape.num_layers} layers, hidden {shape.hidden_size}, vocab {shape.vocab_size:,}",
    }


# ------------------------------------------------------------------------- recipe runs (subprocesses)
def recipe_data(scratch: Path, rows: int = 48) -> Path:
    """The first `rows` records of the bundled sample (its text tokenises to ids < 512)."""
    from hf_dpo.data import bundled_data_path

    path = scratch / "prefs.jsonl"
    lines = bundled_data_path().read_text(encoding="utf-8").splitlines(keepends=True)[:rows]
    path.write_text("".join(lines), encoding="utf-8")
    return path


def recipe_flags(plan: Plan, model_dir: Path, data: Path, out: Path, **overrides) -> list[str]:
    settings = dict(
        model_name_or_path=model_dir,
        dataset_name=data,
        output_dir=out,
        max_steps=6,
        per_device_train_batch_size=4,
        learning_rate=5e-3,
        lora_r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        max_length=128,
        max_prompt_length=64,
        logging_steps=1,
        save_strategy="steps",
        save_steps=1,
        report_to="none",
        seed=plan.seed,
        disable_tqdm=True,
        bnb_4bit_compute_dtype=plan.compute_dtype,
        optim="paged_adamw_8bit",  # what the shipped GPU configs use: its 8-bit states are checkpointed too
        use_cpu=not plan.on_cuda,
        bf16=plan.bf16,
    )
    settings.update(overrides)
    flags = []
    for key, value in settings.items():
        flags += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return flags


def recipe_env(plan: Plan, root: Path) -> dict:
    env = common.worker_env(plan.threads)
    for name, folder in (
        ("HF_DPO_CACHE", "hf_dpo"),
        ("HF_HOME", "hf_home"),
        ("HF_DATASETS_CACHE", "datasets"),
    ):
        env[name] = str(root / "caches" / folder)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_recipe(command: list, env: dict, log: Path, timeout: float) -> None:
    with open(log, "w") as handle:
        result = subprocess.run(
            [str(c) for c in command],
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            timeout=timeout,
        )
    if result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(map(str, command[:4]))} ... exited {result.returncode}:\n{log.read_text()[-3000:]}"
        )


def adapter_of(folder: Path) -> dict:
    from safetensors.torch import load_file

    path = folder / "adapter_model.safetensors"
    if not path.exists():
        names = sorted(p.name for p in folder.iterdir()) if folder.exists() else []
        raise FileNotFoundError(f"no adapter_model.safetensors in {folder} (it holds {names})")
    return load_file(str(path))


def train_logs(folder: Path) -> list[dict]:
    return [e for e in json.loads((folder / "trainer_state.json").read_text())["log_history"] if "loss" in e]


def adapter_difference(a: dict, b: dict) -> tuple[float, float]:
    """(max |a - b| over all adapter tensors, the same over the lora_B tensors / max |lora_B of a|).

    lora_B starts at 0, so it holds what training wrote and nothing else; lora_A's random start would hide a
    training difference in a relative figure."""
    if a.keys() != b.keys():
        raise ValueError(f"adapters hold different tensors: {sorted(a.keys() ^ b.keys())[:4]}")
    diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    trained = [k for k in a if "lora_B" in k] or list(a)
    scale = max(a[k].float().abs().max().item() for k in trained)
    relative = max((a[k].float() - b[k].float()).abs().max().item() for k in trained) / max(scale, 1e-30)
    return diff, relative


def check_resume_after_kill(plan: Plan, ctx, scratch: Path) -> dict:
    """The recipe, SIGKILLed right after checkpoint-3 is complete and resumed with --resume_from_checkpoint true,
    against the same recipe run uninterrupted (started alongside), 6 steps with a checkpoint at each: same adapter
    (bit-identical on CPU), every step logged once."""
    from hf_dpo.callbacks import CHECKPOINT_COMPLETE

    root = scratch / "resume"
    root.mkdir(parents=True, exist_ok=True)
    data = recipe_data(root)
    env = recipe_env(plan, root)
    straight_out, killed_out = root / "straight", root / "killed"

    def command(out):
        return [sys.executable, RECIPE, *recipe_flags(plan, ctx["model_dir"], data, out, max_steps=6)]

    trigger = killed_out / "checkpoint-3" / CHECKPOINT_COMPLETE
    logs = {name: open(root / f"{name}.log", "w") for name in ("straight", "killed")}  # noqa: SIM115
    try:
        straight = subprocess.Popen(
            [str(c) for c in command(straight_out)],
            env=env,
            stdout=logs["straight"],
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
        killed = subprocess.Popen(
            [str(c) for c in command(killed_out)],
            env=env,
            stdout=logs["killed"],
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
        try:
            deadline = time.monotonic() + 300
            while not trigger.exists():
                if killed.poll() is not None:
                    raise RuntimeError(
                        f"the run ended before checkpoint-3:\n{(root / 'killed.log').read_text()[-3000:]}"
                    )
                if time.monotonic() > deadline:
                    raise TimeoutError("no checkpoint-3 within 300 s")
                time.sleep(0.005)
            killed.send_signal(signal.SIGKILL)
            killed.wait()
            if (killed_out / "adapter_model.safetensors").exists():
                raise RuntimeError("the run finished before the kill: nothing was interrupted")
            straight.wait(timeout=300)
        finally:
            for process in (straight, killed):
                if process.poll() is None:
                    process.kill()
                    process.wait()
    finally:
        for handle in logs.values():
            handle.close()
    if straight.returncode != 0:
        raise RuntimeError(
            f"uninterrupted run exited {straight.returncode}:\n{(root / 'straight.log').read_text()[-3000:]}"
        )
    run_recipe(
        [*command(killed_out), "--resume_from_checkpoint", "true"], env, root / "resumed.log", timeout=300
    )
    diff, relative = adapter_difference(adapter_of(straight_out), adapter_of(killed_out))
    steps = [e["step"] for e in train_logs(killed_out)]
    ok = (
        killed.returncode == -signal.SIGKILL
        and steps == list(range(1, 7))
        and (
            relative <= plan.bounds["resume"] if plan.bounds["resume"] else diff == 0.0
        )  # CPU: bit-identical
    )
    return {
        "status": verdict(ok),
        "killed_with": killed.returncode,
        "logged_steps": steps,
        "adapter_max_abs_difference": diff,
        "adapter_relative_difference": relative,
        "bit_identical": diff == 0.0,
        "summary": f"killed after checkpoint-3 of 6, resumed: adapter max diff {diff:.1e} ({relative:.1e} rel), steps 1..6 once: {steps == list(range(1, 7))}",
    }


# ---------------------------------------------------------------------------------------- stage 2: speed
def speed_args(plan: Plan):
    return argparse.Namespace(device=plan.device, threads=plan.threads, seed=plan.seed)


def speed_specs(plan: Plan, scratch: Path, reference: str) -> dict:
    """The RunSpecs of hf_dpo and TRL for one reference mode (live: hf_dpo first; precomputed: TRL first)."""
    model_dir = build_model_dir(plan.speed_shape, scratch, plan.seed)
    steps, warmup = plan.speed_steps, plan.speed_warmup
    data = common.default_data_spec(
        plan.speed_shape,
        num_rows=plan.speed_batch * (steps + warmup),
        max_length=plan.speed_max_length,
        seed=plan.seed,
    )
    return {
        impl: common.make_spec(
            speed_args(plan),
            model_dir,
            plan.speed_shape,
            data,
            plan.speed_batch,
            plan.speed_max_length,
            impl=impl,
            steps=steps,
            warmup_steps=warmup,
            precompute_ref_log_probs=reference == "precomputed",
            gradient_checkpointing=plan.on_cuda,
            trl_lora_dtype="bfloat16" if plan.on_cuda else "float32",
            label=f"{impl} {reference}",
        )
        for impl in (("hf", "trl") if reference == "live" else ("trl", "hf"))
    }


def measure(plan: Plan, spec, scratch: Path) -> dict:
    """One measured run: in a fresh process (benchmarks/common.run_subprocess) or, in the smoke run, here."""
    if plan.isolate:
        return common.run_subprocess(spec, scratch / "speed")
    try:
        return common.run_worker(spec)
    finally:
        release_memory()


def check_speed(plan: Plan, scratch: Path, reference: str) -> dict:
    """hf_dpo and TRL on the same model folder, rows, LoRA, batch, length and steps; each run a fresh process
    (benchmarks/common.py). Gradient checkpointing on for both on CUDA (TRL's default), off on CPU."""
    results = {
        impl: measure(plan, spec, scratch) for impl, spec in speed_specs(plan, scratch, reference).items()
    }
    stats = {impl: common.run_stats(r) for impl, r in results.items()}
    first_loss = {
        impl: next(e["loss"] for e in r["log_history"] if "loss" in e) for impl, r in results.items()
    }
    memory_key = "cuda_peak_mib" if plan.on_cuda else "rss_peak_mib"
    figures = {
        impl: {
            "tokens_per_s": s["tokens_per_s"],
            "median_step_s": s["median_step_s"],
            "peak_memory_mib": s[memory_key],
            "memory_measure": memory_key,
            "first_step_loss": first_loss[impl],
        }
        for impl, s in stats.items()
    }
    speed = figures["hf"]["tokens_per_s"] / figures["trl"]["tokens_per_s"]
    memory = figures["hf"]["peak_memory_mib"] / figures["trl"]["peak_memory_mib"]
    ok = all(abs(loss - LN2) <= 1e-4 for loss in first_loss.values())
    return {
        "status": verdict(ok),
        "reference": reference,
        "shape": plan.speed_shape.name,
        "batch_size": plan.speed_batch,
        "max_length": plan.speed_max_length,
        "steps": plan.speed_steps,
        "hf_dpo": figures["hf"],
        "trl": figures["trl"],
        "tokens_per_s_ratio": speed,
        "peak_memory_ratio": memory,
        "summary": (
            f"{plan.speed_shape.name}: hf_dpo {figures['hf']['tokens_per_s']:,.0f} vs TRL {figures['trl']['tokens_per_s']:,.0f} "
            f"tok/s ({speed:.2f}x); peak {figures['hf']['peak_memory_mib']:,.0f} vs {figures['trl']['peak_memory_mib']:,.0f} MiB "
            f"({memory:.2f}x)"
        ),
    }


# -------------------------------------------------------------------------------------- stage 3: longest
def is_out_of_memory(err: BaseException) -> bool:
    import torch

    if isinstance(err, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def search_longest(try_length, start: int, cap: int, granularity: int, out_of_time=lambda: False) -> dict:
    """The longest length L (a multiple of `granularity`) for which try_length(L) is "fits": doubling from `start`
    until a failure, then bisection down to max(granularity, L / 16). try_length(L) -> "fits" or a failure reason;
    lengths above `cap` are not tried (reason "above the cap"). Stops early, with the bracket, when
    out_of_time()."""
    tries: list[dict] = []

    def attempt(length: int) -> bool:
        outcome = "above the cap" if length > cap else try_length(length)
        tries.append({"length": length, "outcome": outcome})
        return outcome == "fits"

    def result(lo, hi, stopped=None):
        limit = next((t["outcome"] for t in tries if t["length"] == hi), None) if hi is not None else None
        return {"longest": lo, "first_failure": hi, "limited_by": limit, "stopped": stopped, "tries": tries}

    lo, hi, length = None, None, start
    while hi is None:
        if out_of_time():
            return result(lo, hi, "time budget")
        if attempt(length):
            lo, length = length, length * 2
        else:
            hi = length
    if lo is None:
        return result(None, hi)
    while hi - lo > max(granularity, lo // 16):
        mid = (lo + hi) // 2 // granularity * granularity
        if mid <= lo:
            break
        if out_of_time():
            return result(lo, hi, "time budget")
        if attempt(mid):
            lo = mid
        else:
            hi = mid
    return result(lo, hi)


def longest_worker(config_path: str) -> int:
    """One implementation's search, in its own process (an out-of-memory error or a leak cannot reach the
    parent); each try is a full training step of one pair at exactly max_length tokens per sequence, through
    benchmarks/common.run_worker. The JSON at config["out"] is rewritten after every try."""
    import torch

    config = json.loads(Path(config_path).read_text())
    plan_fields = config["plan"]
    shape = common.Shape(**config["shape"])
    out = Path(config["out"])
    budget_mib = config["memory_budget_gib"] * 1024
    on_cuda = plan_fields["device"] == "cuda"
    if on_cuda:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget_mib * 2**20 / total))
    state = {"impl": config["impl"], "memory_budget_gib": config["memory_budget_gib"], "runs": []}
    last_try_s = [0.0]

    def try_length(length: int) -> str:
        prompt = max(2, length // 4)
        data = common.DataSpec(
            1,
            shape.vocab_size,
            length,
            (prompt, prompt),
            (length - prompt, length - prompt),
            plan_fields["seed"],
        )
        spec = common.make_spec(
            argparse.Namespace(**plan_fields), config["model_dir"], shape, data, 1, length,
            impl=config["impl"], steps=1, warmup_steps=0, gradient_checkpointing=on_cuda,
            trl_lora_dtype="bfloat16" if on_cuda else "float32", label=f"{config['impl']} {length}",
        )  # fmt: skip
        t0 = time.perf_counter()
        run = {"length": length}
        try:
            measured = common.run_worker(spec)
            peak = (
                measured["cuda_peak_mib"] if on_cuda else measured["rss_peak_mib"] - measured["rss_base_mib"]
            )
            run.update(
                peak_mib=peak, loss=next((e["loss"] for e in measured["log_history"] if "loss" in e), None)
            )
            outcome = "fits" if peak <= budget_mib else "over the budget"
        except Exception as err:  # noqa: BLE001
            if not is_out_of_memory(err):
                run["error"] = f"{type(err).__name__}: {err}"[:1000]
                outcome = "error"
            else:
                outcome = "out of memory"
        release_memory()
        run.update(outcome=outcome, seconds=round(time.perf_counter() - t0, 1))
        if on_cuda:
            run["allocated_after_mib"] = (
                torch.cuda.memory_allocated() / 2**20
            )  # stays flat unless a try leaks
        last_try_s[0] = time.perf_counter() - t0
        state["runs"].append(run)
        out.write_text(json.dumps(state))
        return outcome

    deadline = config["deadline"]
    found = search_longest(
        try_length, plan_fields["search_start"], plan_fields["search_cap"], plan_fields["search_granularity"],
        out_of_time=lambda: time.time() + 2 * last_try_s[0] > deadline,
    )  # fmt: skip
    state.update(found)
    out.write_text(json.dumps(state))
    return 0


def search_in_worker(plan: Plan, scratch: Path, impl: str, seconds: float) -> dict:
    """One implementation's longest-sequence search (longest_worker), in its own process unless the smoke run."""
    model_dir = build_model_dir(plan.speed_shape, scratch, plan.seed)
    fields = dict(device=plan.device, threads=plan.threads, seed=plan.seed, search_start=plan.search_start,
                  search_cap=plan.search_cap, search_granularity=plan.search_granularity)  # fmt: skip
    out = scratch / f"longest_{impl}.json"
    config = {
        "impl": impl, "plan": fields, "shape": dataclasses.asdict(plan.speed_shape), "model_dir": str(model_dir),
        "memory_budget_gib": plan.memory_budget_gib, "out": str(out), "deadline": time.time() + seconds,
    }  # fmt: skip
    config_path = scratch / f"longest_{impl}.config.json"
    config_path.write_text(json.dumps(config))
    log = scratch / f"longest_{impl}.log"
    if not plan.isolate:
        longest_worker(str(config_path))
    else:
        # On a timeout the partial JSON says how far it got.
        with open(log, "w") as handle, contextlib.suppress(subprocess.TimeoutExpired):
            subprocess.run([sys.executable, __file__, "--longest-worker", str(config_path)], cwd=REPO,
                           env=common.worker_env(plan.threads), stdout=handle, stderr=subprocess.STDOUT,
                           timeout=seconds + 120)  # fmt: skip
    if not out.exists():
        raise RuntimeError(
            f"the {impl} search wrote nothing:\n{log.read_text()[-3000:] if log.exists() else ''}"
        )
    return json.loads(out.read_text())


def check_longest(plan: Plan, scratch: Path, seconds: float) -> dict:
    """hf_dpo and TRL, each searched in its own process under the same memory budget and half the time."""
    found = {impl: search_in_worker(plan, scratch, impl, seconds / 2) for impl in ("hf", "trl")}
    ok = all(f.get("longest") and not any(r["outcome"] == "error" for r in f["runs"]) for f in found.values())

    def describe(f):
        if f.get("longest") is None:
            return "nothing fits" if "tries" in f else "no result"
        text = f"{f['longest']:,}"
        if f.get("stopped"):
            text += (
                f" (stopped by the {f['stopped']}; fails at {f['first_failure']:,})"
                if f.get("first_failure")
                else f" (stopped by the {f['stopped']})"
            )
        elif f.get("limited_by") != "out of memory":
            text += f" ({f.get('limited_by')} at {f['first_failure']:,})"
        return text

    return {
        "status": verdict(ok),
        "shape": plan.speed_shape.name,
        "memory_budget_gib": plan.memory_budget_gib,
        "hf_dpo": found["hf"],
        "trl": found["trl"],
        "summary": f"{plan.speed_shape.name}, 1 pair, {plan.memory_budget_gib:g} GiB: hf_dpo {describe(found['hf'])} vs TRL {describe(found['trl'])} tokens",
    }


# ------------------------------------------------------------------------------------------ stage 4: fsdp
def check_fsdp2_cpu(plan: Plan, scratch: Path) -> dict:
    """scripts/fsdp_check.py: FSDP2 over 2 processes (gloo) against 1 process unsharded, metrics and adapter."""
    import torch

    root = scratch / "fsdp2"
    root.mkdir(parents=True, exist_ok=True)
    env = recipe_env(plan, root)
    env["OMP_NUM_THREADS"] = "1"
    from hf_dpo.tiny import ensure_tiny_model

    model = ["--model", str(ensure_tiny_model(root / "tiny"))]  # built once, here, not by two ranks at once
    reports = {}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    run_recipe(
        [*torchrun, FSDP_CHECK, *model, "--out", root / "two.json"], env, root / "two.log", timeout=300
    )
    reports["two"] = json.loads((root / "two.json").read_text())
    if plan.isolate:
        command = [sys.executable, FSDP_CHECK, *model, "--out", root / "one.json"]
        run_recipe(command, env, root / "one.log", timeout=300)
        reports["one"] = json.loads((root / "one.json").read_text())
    else:  # the unsharded run is fsdp_check.run in this process
        fsdp_check = load_script(FSDP_CHECK)
        reports["one"] = fsdp_check.run(fsdp_check.parse_args([*model, "--out", str(root / "one.json")]))
    one, two = reports["one"], reports["two"]
    metric_diff = max(abs(a[k] - b[k]) for a, b in zip(one["logs"], two["logs"]) for k in a if k != "step")
    a = {k: torch.tensor(v) for k, v in one["adapter"].items()}
    b = {k: torch.tensor(v) for k, v in two["adapter"].items()}
    diff, _ = adapter_difference(a, b)
    ok = max(metric_diff, diff) <= plan.bounds["fsdp2_cpu"] and one["fused_head"] and not two["fused_head"]
    return {
        "status": verdict(ok),
        "metric_max_abs_difference": metric_diff,
        "adapter_max_abs_difference": diff,
        "fused_head": {"one": one["fused_head"], "two": two["fused_head"]},
        "summary": f"2 x FSDP2 vs 1 process: metrics {metric_diff:.1e}, adapter {diff:.1e}; fused head off when sharded: {not two['fused_head']}",
    }


def check_fsdp_qlora(plan: Plan, ctx, scratch: Path, processes: int) -> dict:
    """The recipe under recipes/accelerate_configs/fsdp_qlora.yaml (4-bit weights stored in bf16, FSDP1) on
    `processes` GPUs against one plain process with the same global batch: logged metrics and the final adapter."""
    root = scratch / f"fsdp_qlora_{processes}"
    root.mkdir(parents=True, exist_ok=True)
    data = recipe_data(root)
    env = recipe_env(plan, root)
    flags = dict(max_steps=4, save_strategy="no", optim="adamw_torch", learning_rate=1e-3)
    plain_out, fsdp_out = root / "plain", root / "fsdp"
    run_recipe(
        [sys.executable, RECIPE, *recipe_flags(plan, ctx["model_dir"], data, plain_out, **flags)],
        env,
        root / "plain.log",
        600,
    )
    accelerate = Path(sys.executable).with_name("accelerate")
    launcher = [
        accelerate,
        "launch",
        "--config_file",
        FSDP_QLORA_CONFIG,
        "--num_processes",
        processes,
        "--main_process_port",
        0,
    ]
    per_device = 4 // processes
    run_recipe(
        [*launcher, RECIPE, *recipe_flags(plan, ctx["model_dir"], data, fsdp_out, per_device_train_batch_size=per_device, **flags)],
        env, root / "fsdp.log", 600,
    )  # fmt: skip
    plain_logs, fsdp_logs = train_logs(plain_out), train_logs(fsdp_out)
    keys = ("loss", "logps/chosen", "logps/rejected")  # margins start at 0: no relative figure there
    metric_rel = max(
        abs(a[k] - b[k]) / max(abs(a[k]), 1e-3) for a, b in zip(plain_logs, fsdp_logs) for k in keys
    )
    diff, relative = adapter_difference(adapter_of(plain_out), adapter_of(fsdp_out))
    ok = len(plain_logs) == len(fsdp_logs) == 4 and max(metric_rel, relative) <= plan.bounds["fsdp_qlora"]
    return {
        "status": verdict(ok),
        "processes": processes,
        "metric_max_relative_difference": metric_rel,
        "adapter_max_abs_difference": diff,
        "adapter_relative_difference": relative,
        "summary": f"FSDP on {processes} GPU(s) vs 1 plain process: metrics rel {metric_rel:.1e}, lora_B rel {relative:.1e}",
    }


def run_fsdp_stage(plan: Plan, report: Report, scratch: Path, ctx: dict | None) -> None:
    two_gpus = "FSDP-QLoRA recipe, 2 GPUs = 1 process"
    if not plan.on_cuda:
        report.check("fsdp", "FSDP2, 2 processes (CPU, gloo) = 1 process", check_fsdp2_cpu, plan, scratch)
        report.skip("fsdp", two_gpus, "needs 2 GPUs (accelerate runs FSDP configs as DDP on CPU)")
        return
    import torch

    if report.seconds_left() < 45:
        report.skip("fsdp", two_gpus, "time budget spent")
        return
    ctx = ctx or {"model_dir": build_model_dir(plan.correctness_shapes[0], scratch, plan.seed)}
    if torch.cuda.device_count() >= 2:
        report.check("fsdp", two_gpus, check_fsdp_qlora, plan, ctx, scratch, 2)
    else:
        report.skip("fsdp", two_gpus, "needs 2 GPUs")
        one_gpu = "FSDP-QLoRA recipe, 1 GPU (FSDP wrapping, no sharding) = plain"
        report.check("fsdp", one_gpu, check_fsdp_qlora, plan, ctx, scratch, 1)


# ------------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--smoke", action="store_true", help="toy sizes (the CPU run CI makes; ~1 minute)")
    parser.add_argument("--out", default="gpu_check.json", help="the JSON report (default gpu_check.json)")
    parser.add_argument(
        "--memory_budget_gib", type=float, default=None,
        help="memory for the longest-sequence search (default 24 on CUDA: a 24 GB card; 4 of RSS growth in smoke)",
    )  # fmt: skip
    parser.add_argument("--time_budget_s", type=float, default=None, help="default 450 (GPU), 240 (smoke)")
    parser.add_argument(
        "--stages", default="correctness,speed,longest,fsdp", help="comma-separated subset, in this order"
    )
    parser.add_argument(
        "--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
        help="compute dtype of the correctness checks and recipe runs (auto: bf16 on CUDA, fp32 on CPU); "
        "--device cpu --smoke --dtype bfloat16 runs the bf16 code paths on CPU",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (models, logs)")
    parser.add_argument("--longest-worker", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.longest_worker:
        return longest_worker(args.longest_worker)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --device cpu --smoke for the CPU smoke run", file=sys.stderr)
        return 2
    plan = make_plan(args)
    torch.set_num_threads(plan.threads)
    started = time.perf_counter()
    scratch = Path(tempfile.mkdtemp(prefix="hf_dpo_gpu_check_"))
    # Caches in the scratch folder unless the caller chose: nothing of this run is worth keeping.
    os.environ.setdefault("HF_DPO_CACHE", str(scratch / "cache" / "hf_dpo"))
    os.environ.setdefault("HF_DATASETS_CACHE", str(scratch / "cache" / "datasets"))
    report = Report(Path(args.out).resolve(), plan, started)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    print(f"hf_dpo GPU check: {plan.device}{' smoke' if plan.smoke else ''}, scratch {scratch}", flush=True)
    try:
        resume_ctx = None
        if "correctness" in stages:
            for index, shape in enumerate(plan.correctness_shapes):
                ctx = report.check(
                    "correctness", f"{shape.name}: built, loaded and trained", run_correctness_model, plan, report, shape,
                    scratch, first=index == 0,
                )  # fmt: skip
                if resume_ctx is None and ctx["status"] == "pass":
                    resume_ctx = ctx
            if resume_ctx is not None:
                report.check(
                    "correctness",
                    "resume after SIGKILL = uninterrupted run",
                    check_resume_after_kill,
                    plan,
                    resume_ctx,
                    scratch,
                )
        if "speed" in stages:
            for reference in ("live", "precomputed"):
                report.check(
                    "speed", f"hf_dpo vs TRL, {reference} reference", check_speed, plan, scratch, reference
                )
        fsdp_reserve = 90.0 if "fsdp" in stages else 0.0
        if "longest" in stages:
            seconds = report.seconds_left() - fsdp_reserve
            if seconds < 30:
                report.skip("longest", "longest sequence that fits", "time budget spent")
            else:
                report.check("longest", "longest sequence that fits", check_longest, plan, scratch, seconds)
        if "fsdp" in stages:
            run_fsdp_stage(plan, report, scratch, resume_ctx)
    finally:
        if not args.keep:
            import shutil

            shutil.rmtree(scratch, ignore_errors=True)
    return report.finish()


if __name__ == "__main__":
    sys.exit(main())
