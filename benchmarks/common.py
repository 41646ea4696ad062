"""Shared machinery of the benchmarks: shapes, synthetic models and data, one measured training run, and
the parent-side orchestration (fresh subprocess per measurement, alternating implementations).

Every measurement runs in a fresh subprocess (``python benchmarks/common.py SPEC.json OUT.json``), so the
peak memory of one run is not inherited from another and every run starts from the same state. The
parent builds the model folder once (random weights, ``save_pretrained``), then starts the workers in an
alternating order (A B, B A, A B, ...) so that slow drifts of a shared, noisy machine hit both sides alike,
and reports ratios.

What a worker measures, between ``on_step_begin`` and ``on_step_end`` of the transformers Trainer (data
loading and collation excluded; forward, backward, optimizer step and zero_grad included):
  - the wall time of each training step (first ``warmup_steps`` steps discarded);
  - the non-padding tokens of each step (prompt + completion, chosen and rejected), counted by wrapping
    the trainer's collator;
  - the peak memory of the training loop: on CPU the peak RSS (VmHWM, reset through
    /proc/self/clear_refs right before ``train()``; falls back to ``ru_maxrss``) and its growth over the
    RSS at that moment; on CUDA ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.

Implementations a worker can run ("impl"):
  - ``hf``: hf_dpo's DPOTrainer on a model from ``hf_dpo.modeling.load_model``;
  - ``trl``: TRL's DPOTrainer on the same folder, loaded the TRL way (``from_pretrained`` with the same
    ``BitsAndBytesConfig``, LoRA through ``peft_config``); fed the same token ids (tokenisation skipped);
  - ``plain``: a plain transformers Trainer doing causal-LM fine-tuning (forward with labels, backward,
    optimizer step) on the same model, LoRA and concatenated [chosen; rejected] padded rows;
  - ``plain-lean``: the same, with the loss computed on the completion positions only through hf_dpo's
    fused, chunked LM head (the head work of one DPO policy pass).
TRL is only ever imported here, inside the ``trl`` worker, never from hf_dpo.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"

# Token ids 0..3 are <pad>, <s>, </s>, <unk> in the tiny tokenizer every shape uses.
PAD_ID, BOS_ID, EOS_ID, FIRST_ORDINARY_ID = 0, 1, 2, 4


# --------------------------------------------------------------------------------------------- shapes
@dataclass
class Shape:
    """A model architecture (random weights) plus the default batch and max length used with it."""

    name: str
    arch: str  # "llama" or "qwen2"
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    max_length: int
    batch_size: int
    tie_word_embeddings: bool = False


SHAPES: dict[str, Shape] = {
    # hf_dpo's own tiny smoke-test architecture (hf_dpo.tiny.build_tiny_model), recipe batch and length.
    "tiny": Shape("tiny", "llama", 512, 64, 2, 4, 2, 128, max_length=256, batch_size=8),
    # A vocabulary large enough for the LM head + log-softmax to dominate memory.
    "large-vocab": Shape("large-vocab", "llama", 32000, 256, 4, 4, 2, 512, max_length=512, batch_size=4),
    # Qwen2.5-0.5B's architecture (random weights): for --device cuda.
    "qwen2.5-0.5b": Shape(
        "qwen2.5-0.5b",
        "qwen2",
        151936,
        896,
        24,
        14,
        2,
        4864,
        max_length=1024,
        batch_size=4,
        tie_word_embeddings=True,
    ),
}


def build_model_dir(shape: Shape, path: Path, seed: int = 0) -> Path:
    """Save a randomly initialised causal LM of `shape` and the tiny tokenizer into `path` (fp32)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    from hf_dpo.tiny import build_tiny_tokenizer

    common = dict(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        max_position_embeddings=max(4096, shape.max_length),
        tie_word_embeddings=shape.tie_word_embeddings,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )
    config = LlamaConfig(**common) if shape.arch == "llama" else Qwen2Config(**common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    build_tiny_tokenizer().save_pretrained(path)
    return path


# ----------------------------------------------------------------------------------------------- data
@dataclass
class DataSpec:
    """Synthetic preference rows of random token ids (no text, no tokenizer: both trainers get the same ids).

    Lengths are drawn uniformly in the inclusive ranges; a completion is cut so that prompt + completion
    fits `max_length`. A prompt starts with BOS; every completion ends with EOS (counted in its length).
    """

    num_rows: int
    vocab_size: int
    max_length: int
    prompt_len: tuple[int, int]
    completion_len: tuple[int, int]
    seed: int = 0
    num_completions: int = 2  # responses per prompt; more than 2 are ranked rows (hf_dpo only)


def make_rows(spec: DataSpec) -> list[dict]:
    """[{prompt, chosen, rejected, completions}] as lists of token ids (completions: all K, best first)."""
    rng = random.Random(spec.seed)
    rows = []
    for _ in range(spec.num_rows):
        p_len = rng.randint(*spec.prompt_len)
        prompt = [BOS_ID] + [rng.randrange(FIRST_ORDINARY_ID, spec.vocab_size) for _ in range(p_len - 1)]
        completions = []
        for _ in range(spec.num_completions):
            c_len = min(rng.randint(*spec.completion_len), spec.max_length - p_len)
            completions.append(
                [rng.randrange(FIRST_ORDINARY_ID, spec.vocab_size) for _ in range(c_len - 1)] + [EOS_ID]
            )
        rows.append(
            {
                "prompt": prompt,
                "chosen": completions[0],
                "rejected": completions[1],
                "completions": completions,
            }
        )
    return rows


def default_data_spec(shape: Shape, num_rows: int, max_length: int | None = None, seed: int = 0) -> DataSpec:
    """Prompts of 1/16..1/4 of max_length, completions of 1/8..3/4 (so batches carry some padding)."""
    length = max_length or shape.max_length
    return DataSpec(
        num_rows=num_rows,
        vocab_size=shape.vocab_size,
        max_length=length,
        prompt_len=(max(2, length // 16), length // 4),
        completion_len=(max(2, length // 8), 3 * length // 4),
        seed=seed,
    )


# ----------------------------------------------------------------------------------------- run spec
@dataclass
class RunSpec:
    """Everything one worker needs; JSON-serialisable."""

    impl: str  # "hf", "trl", "plain" or "plain-lean"
    model_dir: str
    shape: dict
    data: dict
    batch_size: int
    max_length: int
    steps: int  # measured steps
    warmup_steps: int = 2
    device: str = "cpu"
    threads: int = 1
    seed: int = 0
    learning_rate: float = 1e-4
    beta: float = 0.1
    lora_r: int = 16
    lora_alpha: int = 32
    precompute_ref_log_probs: bool = False
    padding_free: bool = False
    share_prompt: bool | None = None  # None: DPOConfig's default
    loss_type: str = "sigmoid"  # hf impl only: plackett_luce for ranked rows
    gradient_checkpointing: bool = False
    bf16: bool = False
    compute_dtype: str = "float32"
    trl_lora_dtype: str = "float32"  # "float32" (same as hf_dpo) or "bfloat16" (TRL's own QLoRA default)
    logp_chunk_size: int | None = None
    label: str = ""
    extra: dict = field(default_factory=dict)


def make_spec(args, model_dir, shape, data, batch_size: int, max_length: int, **fields) -> RunSpec:
    """A RunSpec with what every benchmark sets alike: device, threads and seed from the command line, and
    bf16 compute on CUDA (fp32 on CPU). `fields` gives the rest (impl, steps, label, ...)."""
    on_cuda = args.device == "cuda"
    return RunSpec(
        model_dir=str(model_dir),
        shape=asdict(shape),
        data=asdict(data),
        batch_size=batch_size,
        max_length=max_length,
        device=args.device,
        threads=args.threads,
        seed=args.seed,
        bf16=on_cuda,
        compute_dtype="bfloat16" if on_cuda else "float32",
        **fields,
    )


# --------------------------------------------------------------------------------------------- memory
def _proc_status_kib(key: str) -> int | None:
    try:
        match = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process; False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def current_rss_mib() -> float:
    kib = _proc_status_kib("VmRSS")
    if kib is None:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    return kib / 1024


def peak_rss_mib() -> float:
    kib = _proc_status_kib("VmHWM")
    if kib is None:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return kib / 1024


def touch_tensors(model) -> None:
    """Read every byte of every parameter and buffer of `model` (makes lazily mapped weights resident)."""
    import torch

    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            data = tensor.detach()
            if data.device.type == "cpu" and data.is_contiguous() and data.numel():
                data.reshape(-1).view(torch.uint8).sum()


# --------------------------------------------------------------------------------------------- worker
def _set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)
    with contextlib.suppress(RuntimeError):  # already set in this process
        torch.set_num_interop_threads(1)


def plain_lm_batch(collator, features, lean: bool) -> dict:
    """The [chosen; rejected] rows of `collator` as a causal-LM batch: labels on completion tokens only
    (`completion_mask` kept for the lean trainer)."""
    batch = collator(features)
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    out = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": labels}
    if lean:
        out["completion_mask"] = batch["completion_mask"]
    return out


def interleaved_setup(spec: RunSpec):
    """The start of a worker that interleaves trainers on one model: threads, the spec's rows as a dataset,
    the seeded model (`load_hf_model`), and a scratch output folder."""
    from transformers import set_seed

    _set_threads(spec.threads)
    data = {**spec.data, "prompt_len": tuple(spec.data["prompt_len"])}
    data["completion_len"] = tuple(spec.data["completion_len"])
    dataset = _datasets_for("hf", make_rows(DataSpec(**data)))
    set_seed(spec.seed)
    return dataset, load_hf_model(spec), tempfile.mkdtemp(prefix="hf_dpo_bench_out_")


def timed_step(trainer, model, batch, params, optimizer, on_cuda: bool) -> tuple[float, float]:
    """One interleaved step: the trainer's own `training_step`, gradient clipping, the optimizer step and
    zero_grad; returns (wall seconds, CPU seconds)."""
    import torch

    if on_cuda:
        torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), time.process_time()
    trainer.training_step(model, batch)
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if on_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0, time.process_time() - c0


def _datasets_for(impl: str, rows: list[dict]):
    from datasets import Dataset

    if impl == "trl":
        return Dataset.from_list(
            [
                {"prompt_ids": r["prompt"], "chosen_ids": r["chosen"], "rejected_ids": r["rejected"]}
                for r in rows
            ]
        )
    return Dataset.from_list(
        [
            {
                "prompt_input_ids": r["prompt"],
                "completion_input_ids": r["completions"],
                "source_line": i + 1,
            }
            for i, r in enumerate(rows)
        ]
    )


def _tokens_of_features(features: list[dict]) -> int:
    total = 0
    for f in features:
        if "completion_input_ids" in f:
            total += sum(len(f["prompt_input_ids"]) + len(c) for c in f["completion_input_ids"])
        else:
            total += 2 * len(f["prompt_ids"]) + len(f["chosen_ids"]) + len(f["rejected_ids"])
    return total


class _CountingCollator:
    """Wraps a collator: records each batch's non-padding tokens and its tensor size (rows x length)."""

    def __init__(self, inner):
        self.inner = inner
        self.tokens: list[int] = []
        self.slots: list[int] = []

    def __call__(self, features):
        batch = self.inner(features)
        self.tokens.append(_tokens_of_features(features))
        self.slots.append(int(batch["input_ids"].numel()))
        return batch


def _training_args_common(spec: RunSpec, output_dir: str) -> dict:
    return dict(
        output_dir=output_dir,
        per_device_train_batch_size=spec.batch_size,
        per_device_eval_batch_size=spec.batch_size,
        gradient_accumulation_steps=1,
        max_steps=spec.warmup_steps + spec.steps,
        learning_rate=spec.learning_rate,
        lr_scheduler_type="constant",
        warmup_steps=0,
        logging_strategy="steps",
        logging_steps=1,  # logged after on_step_end: outside the timed window
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        use_cpu=spec.device == "cpu",
        seed=spec.seed,
        data_seed=spec.seed,
        disable_tqdm=True,
        dataloader_num_workers=0,
        gradient_checkpointing=spec.gradient_checkpointing,
        bf16=spec.bf16,
        max_grad_norm=1.0,
    )


def _bnb_config(spec: RunSpec):
    import torch
    from transformers import BitsAndBytesConfig

    compute = getattr(torch, spec.compute_dtype)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_use_double_quant=False,
        bnb_4bit_quant_storage=compute if spec.device == "cuda" else torch.uint8,
    )


def _lora_config(spec: RunSpec):
    from peft import LoraConfig

    return LoraConfig(
        r=spec.lora_r,
        lora_alpha=spec.lora_alpha,
        lora_dropout=0.0,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )


def load_hf_model(spec: RunSpec):
    """The spec's model folder in 4-bit NF4 with a fresh LoRA (dropout 0), as hf_dpo loads it."""
    from hf_dpo.config import ModelArguments
    from hf_dpo.modeling import load_model

    return load_model(
        ModelArguments(
            model_name_or_path=spec.model_dir,
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=spec.compute_dtype,
            lora_r=spec.lora_r,
            lora_alpha=spec.lora_alpha,
            lora_dropout=0.0,
            attn_implementation=spec.extra.get("attn_implementation"),
        ),
        use_cpu=spec.device == "cpu",
        gradient_checkpointing=spec.gradient_checkpointing,
    )


def _build_hf(spec: RunSpec, dataset, output_dir: str):
    from hf_dpo.config import DPOConfig
    from hf_dpo.trainer import DPOTrainer

    loaded = load_hf_model(spec)
    args = DPOConfig(
        **_training_args_common(spec, output_dir),
        beta=spec.beta,
        loss_type=spec.loss_type,
        max_length=spec.max_length,
        max_prompt_length=spec.max_length // 2,
        precompute_ref_log_probs=spec.precompute_ref_log_probs,
        padding_free=spec.padding_free,
        logp_chunk_size=spec.logp_chunk_size,
        disable_dropout=True,
        **({} if spec.share_prompt is None else {"share_prompt": spec.share_prompt}),
    )
    return DPOTrainer(model=loaded.model, args=args, train_dataset=dataset, processing_class=loaded.tokenizer)


def _build_trl(spec: RunSpec, dataset, output_dir: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig as TRLDPOConfig
    from trl import DPOTrainer as TRLDPOTrainer

    from hf_dpo.modeling import guard_cpu_4bit_repacking

    class PreTokenizedTRLDPOTrainer(TRLDPOTrainer):
        """TRL's DPOTrainer fed token ids: its own tokenisation is skipped (rows are already prompt_ids/...)."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            if "prompt_ids" in dataset.column_names:
                return dataset
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    tokenizer = AutoTokenizer.from_pretrained(spec.model_dir)
    model = AutoModelForCausalLM.from_pretrained(
        spec.model_dir,
        quantization_config=_bnb_config(spec),
        dtype=getattr(torch, spec.compute_dtype),
        device_map={"": spec.device if spec.device == "cpu" else 0},
        **(
            {"attn_implementation": spec.extra["attn_implementation"]}
            if spec.extra.get("attn_implementation")
            else {}
        ),
    )
    model.config.use_cache = False
    # Same bitsandbytes CPU kernels as hf_dpo (no repacking in eval mode, e.g. during TRL's precompute).
    guard_cpu_4bit_repacking(model)
    args = TRLDPOConfig(
        **_training_args_common(spec, output_dir),
        beta=spec.beta,
        loss_type=["sigmoid"],
        max_length=spec.max_length,
        precompute_ref_log_probs=spec.precompute_ref_log_probs,
        padding_free=False,  # disabled in TRL 1.16 (it warns and pads)
        disable_dropout=True,
    )
    trainer = PreTokenizedTRLDPOTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=_lora_config(spec),
    )
    guard_cpu_4bit_repacking(trainer.model)
    lora_dtype = getattr(torch, spec.trl_lora_dtype)
    # TRL casts QLoRA adapters to bf16; cast them back if asked (fp32: the same adapters as hf_dpo's).
    for param in trainer.model.parameters():
        if param.requires_grad and param.dtype != lora_dtype:
            param.data = param.data.to(lora_dtype)
    return trainer


def _build_plain(spec: RunSpec, dataset, output_dir: str, lean: bool = False):
    """Causal-LM fine-tuning on the same [chosen; rejected] padded rows: labels on completion tokens.

    lean=False: transformers' own loss (logits at every position). lean=True: see `_LeanLMTrainer`."""
    from transformers import Trainer, TrainingArguments

    from hf_dpo.collator import PreferenceCollator

    loaded = load_hf_model(spec)
    inner = PreferenceCollator(pad_token_id=loaded.tokenizer.pad_token_id)

    def collate(features):
        return plain_lm_batch(inner, features, lean)

    args = TrainingArguments(**_training_args_common(spec, output_dir), remove_unused_columns=False)
    trainer_class = _LeanLMTrainer() if lean else Trainer
    return trainer_class(model=loaded.model, args=args, train_dataset=dataset, data_collator=collate)


def _LeanLMTrainer():
    """A Trainer whose loss is the mean NLL of the completion tokens, computed like hf_dpo computes log-probs:
    the LM head applied (chunked, fused) to the completion positions only. The same head work as one DPO
    policy pass, so DPO-live / this is the reference forward's cost alone."""
    from transformers import Trainer

    from hf_dpo.logps import fusable_lm_head, lm_head_returns_hidden_states, sequence_logps_from_hidden

    class LeanLMTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            head = fusable_lm_head(model)
            with lm_head_returns_hidden_states(head):
                hidden = model(
                    input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False
                ).logits
            out = sequence_logps_from_hidden(
                hidden, head.weight, inputs["input_ids"], inputs["completion_mask"], lm_head_bias=head.bias
            )
            return -out.logps.sum() / out.token_counts.sum().clamp(min=1)

    return LeanLMTrainer


def run_worker(spec: RunSpec) -> dict:
    """Build the trainer of `spec.impl`, train warmup + measured steps, return the measurements."""
    _set_threads(spec.threads)
    import torch
    from transformers import TrainerCallback, set_seed

    rows = make_rows(
        DataSpec(
            **{
                **spec.data,
                "prompt_len": tuple(spec.data["prompt_len"]),
                "completion_len": tuple(spec.data["completion_len"]),
            }
        )
    )
    dataset = _datasets_for(spec.impl, rows)
    on_cuda = spec.device == "cuda"

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []
            self._start = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            if on_cuda:
                torch.cuda.synchronize()
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if on_cuda:
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self._start)

    with tempfile.TemporaryDirectory(prefix="hf_dpo_bench_out_") as output_dir:
        set_seed(spec.seed)
        t_build = time.perf_counter()
        builder = {
            "hf": _build_hf,
            "trl": _build_trl,
            "plain": _build_plain,
            "plain-lean": lambda *a: _build_plain(*a, lean=True),
        }[spec.impl]
        trainer = builder(spec, dataset, output_dir)
        build_s = time.perf_counter() - t_build
        counter = _CountingCollator(trainer.data_collator)
        trainer.data_collator = counter
        timer = StepTimer()
        trainer.add_callback(timer)

        if on_cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base_mem = torch.cuda.memory_allocated() / 2**20
        # The fp32 weights (embeddings, LM head, norms) may still be pages of the mmapped safetensors file: read
        # them all now, so the growth measured below is the training loop's memory, not first touches.
        touch_tensors(trainer.model)
        if getattr(trainer, "ref_model", None) is not None:
            touch_tensors(trainer.ref_model)
        rss_resettable = reset_peak_rss()
        base_rss = current_rss_mib()
        trainer.train()
        peak_rss = peak_rss_mib()
        result = {
            "impl": spec.impl,
            "label": spec.label,
            "build_s": build_s,
            "step_times": timer.times,
            "tokens": counter.tokens,
            "slots": counter.slots,
            "warmup_steps": spec.warmup_steps,
            "rss_base_mib": base_rss,
            "rss_peak_mib": peak_rss,
            "rss_peak_is_training_only": rss_resettable,
            "log_history": [
                {k: v for k, v in entry.items() if isinstance(v, (int, float))}
                for entry in trainer.state.log_history
            ],
            "num_threads": torch.get_num_threads(),
        }
        if on_cuda:
            result["cuda_base_mib"] = base_mem
            result["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        return result


# --------------------------------------------------------------------------------------------- parent
def worker_env(threads: int) -> dict:
    env = dict(os.environ)
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[key] = str(threads)
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["TQDM_DISABLE"] = "1"
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_VERBOSITY"] = "error"
    env["PYTHONWARNINGS"] = "ignore"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def run_subprocess(spec: RunSpec, scratch: Path, verbose: bool = False, script: str | None = None) -> dict:
    """Run one measurement in a fresh Python process; return its result dict (raises on failure).

    The worker is this module, or `script --worker` for a script with a worker of its own."""
    scratch.mkdir(parents=True, exist_ok=True)
    fd, spec_path = tempfile.mkstemp(suffix=".json", dir=scratch)
    os.close(fd)
    out_path = spec_path.replace(".json", ".out.json")
    Path(spec_path).write_text(json.dumps(asdict(spec)))
    env = worker_env(spec.threads)
    # Each worker's HF_DPO_CACHE is private: a precomputed reference is computed, never read from a cache.
    env["HF_DPO_CACHE"] = str(scratch / f"cache_{Path(spec_path).stem}")
    t0 = time.perf_counter()
    worker = [str(Path(script).resolve()), "--worker"] if script else [str(Path(__file__).resolve())]
    proc = subprocess.run(
        [sys.executable, *worker, spec_path, out_path],
        env=env,
        cwd=str(REPO_ROOT),
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"worker {spec.impl} ({spec.label}) failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    result = json.loads(Path(out_path).read_text())
    result["wall_s"] = time.perf_counter() - t0
    if verbose:
        print(f"    {spec.label or spec.impl}: {summarize(result)}", flush=True)
    return result


def summarize(result: dict) -> str:
    s = run_stats(result)
    text = (
        f"median step {s['median_step_s'] * 1000:.1f} ms, {s['tokens_per_s']:.0f} tok/s, "
        f"peak RSS {s['rss_peak_mib']:.0f} MiB (+{s['rss_growth_mib']:.0f}), run {result.get('wall_s', 0):.0f} s"
    )
    if "cuda_peak_mib" in s:
        text += f", CUDA peak {s['cuda_peak_mib']:.0f} MiB"
    return text


def run_stats(result: dict) -> dict:
    """Per-run figures from the measured (post-warm-up) steps."""
    w = result["warmup_steps"]
    times = result["step_times"][w:]
    tokens = result["tokens"][w : w + len(times)]
    slots = result["slots"][w : w + len(times)]
    stats = {
        "median_step_s": statistics.median(times),
        "mean_step_s": sum(times) / len(times),
        # The median over steps of (step tokens / step time): robust to a step slowed by a noisy neighbour.
        "tokens_per_s": statistics.median(t / s for t, s in zip(tokens, times)),
        "tokens_per_step": sum(tokens) / len(tokens),
        "padding_fraction": 1 - sum(tokens) / max(1, sum(slots)),
        "rss_peak_mib": result["rss_peak_mib"],
        "rss_growth_mib": result["rss_peak_mib"] - result["rss_base_mib"],
        "token_sequence": result["tokens"],
    }
    if "cuda_peak_mib" in result:
        stats["cuda_peak_mib"] = result["cuda_peak_mib"]
        stats["cuda_growth_mib"] = result["cuda_peak_mib"] - result["cuda_base_mib"]
    return stats


def alternate(order: list[str], repeat: int) -> list[list[str]]:
    """A B C, C B A, A B C, ...: every implementation runs early and late equally often."""
    return [order if r % 2 == 0 else list(reversed(order)) for r in range(repeat)]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def spread(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}" if values else "-"


def machine_line(device: str) -> str:
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = f"CPU {cpu} ({os.cpu_count()} logical cores), torch {torch.__version__}"
    if device == "cuda" and torch.cuda.is_available():
        text += f", GPU {torch.cuda.get_device_name(0)}"
    return text


def versions_line() -> str:
    from importlib.metadata import version

    names = ("transformers", "peft", "bitsandbytes", "trl", "accelerate")
    parts = []
    for name in names:
        try:
            parts.append(f"{name} {version(name)}")
        except Exception:  # noqa: BLE001 - a missing package is reported, not fatal
            parts.append(f"{name} (missing)")
    return ", ".join(parts)


def write_result(name: str, text: str) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / name
    path.write_text(text)
    return path


def main(argv: list[str]) -> int:
    spec_path, out_path = argv[1], argv[2]
    raw = json.loads(Path(spec_path).read_text())
    spec = RunSpec(**raw)
    result = run_worker(spec)
    Path(out_path).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
