"""Argument dataclasses: ModelArguments, DataArguments and DPOConfig (a transformers.TrainingArguments).

Names follow TRL and alignment-handbook so configs carry over; each field's help says what it does and
which way to turn it. Everything not defined here is `transformers.TrainingArguments`, unchanged.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from transformers import TrainingArguments

from .losses import LOSS_TYPES, validate_loss_options
from .tiny import TINY_MODEL_NAME

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    """Which base model to load, how to quantise it, and the LoRA adapter to train."""

    model_name_or_path: str = field(
        default=TINY_MODEL_NAME,
        metadata={
            "help": f"Base causal LM: a Hub id or a local folder. '{TINY_MODEL_NAME}' builds a tiny local "
            "smoke-test model (no network)."
        },
    )
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer to use; defaults to the model's own."}
    )
    adapter_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Continue from this LoRA adapter (e.g. an SFT adapter). It is then also the frozen reference "
            "policy, instead of the bare base model."
        },
    )
    model_revision: str = field(
        default="main", metadata={"help": "Branch, tag or commit of the model on the Hub."}
    )
    load_in_4bit: bool = field(
        default=True, metadata={"help": "Quantise the base model to 4 bits with bitsandbytes (QLoRA)."}
    )
    load_in_8bit: bool = field(
        default=False, metadata={"help": "Quantise the base model to 8 bits instead (turns 4-bit off)."}
    )
    bnb_4bit_quant_type: str = field(
        default="nf4", metadata={"help": "4-bit data type: 'nf4' (QLoRA paper; better) or 'fp4'."}
    )
    bnb_4bit_compute_dtype: str = field(
        default="auto",
        metadata={
            "help": "dtype of 4-bit matmuls: bfloat16, float16, float32, or auto (bf16 on GPUs that have it, "
            "else fp32)."
        },
    )
    use_bnb_nested_quant: bool = field(
        default=False, metadata={"help": "Also quantise the quantisation constants (saves ~0.4 bit/param)."}
    )
    torch_dtype: str = field(
        default="auto",
        metadata={
            "help": "dtype of the non-quantised weights: auto (the compute dtype), bfloat16, float16, float32."
        },
    )
    attn_implementation: str | None = field(
        default=None,
        metadata={"help": "Attention kernel: eager, sdpa, flash_attention_2; default: the model's."},
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank: higher adapts more, costs more memory."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(
        default=0.05,
        metadata={"help": "Dropout on the input of the trained LoRA adapter (kept under disable_dropout)."},
    )
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Module names to adapt; default: all linear layers except the LM head ('all-linear')."
        },
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Run model code from the Hub repo. Off unless you trust the repo."}
    )


@dataclass
class DataArguments:
    """Where the preference data comes from and how its columns are named."""

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "A datasets id, a local file (.jsonl/.json/.parquet/.csv) or folder; default: the bundled "
            "data/dpo_data.jsonl."
        },
    )
    dataset_config: str | None = field(default=None, metadata={"help": "The datasets config (subset) name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str | None = field(default=None, metadata={"help": "Split to evaluate on, if any."})
    dataset_test_size: float | None = field(
        default=None,
        metadata={
            "help": "Hold out this fraction (< 1) or count (>= 1) of the train split for evaluation, fixed seed."
        },
    )
    prompt_field: str = field(default="prompt", metadata={"help": "Column holding the prompt."})
    chosen_field: str | None = field(
        default=None, metadata={"help": "Column holding the preferred text; default 'chosen' or 'chose'."}
    )
    rejected_field: str = field(
        default="rejected", metadata={"help": "Column holding the dispreferred text."}
    )
    ranked_mode: str = field(
        default="plackett_luce",
        metadata={
            "help": "Ranked rows (prompt, responses[K]): keep K-way for plackett_luce, or 'pairs' to expand "
            "into all ordered pairs."
        },
    )


@dataclass
class DPOConfig(TrainingArguments):
    """TrainingArguments plus the DPO settings. Every TrainingArguments field works unchanged."""

    beta: float = field(
        default=0.1,
        metadata={"help": "KL strength: higher keeps the policy closer to the reference (typ. 0.01-0.5)."},
    )
    # ---- the loss (see hf_dpo.losses.LOSSES for which loss reads which option)
    loss_type: list[str] = field(
        default_factory=lambda: ["sigmoid"],
        metadata={
            "help": "Preference loss, or several combined with loss_weights (`--loss_type sigmoid sft`): "
            f"{', '.join(LOSS_TYPES)}."
        },
    )
    loss_weights: list[float] | None = field(
        default=None,
        metadata={"help": "One weight per loss_type entry (the loss is their weighted sum); default 1 each."},
    )
    label_smoothing: float = field(
        default=0.0,
        metadata={
            "help": "Label noise eps in [0, 0.5): cDPO for sigmoid, sigmoid_norm, simpo, aot, "
            "aot_unpaired; the flip rate for robust; EXO's eps for exo_pair (needed there, e.g. 1e-3). "
            "0 is plain DPO."
        },
    )
    f_divergence_type: str = field(
        default="reverse_kl",
        metadata={
            "help": "Divergence from the reference (f-DPO): reverse_kl (DPO), forward_kl, js_divergence, "
            "alpha_divergence; other than reverse_kl only for losses on the chosen-rejected score."
        },
    )
    f_alpha_divergence_coef: float = field(
        default=0.5,
        metadata={"help": "alpha in (0, 1) of alpha_divergence: towards 0 reverse KL, towards 1 forward KL."},
    )
    ld_alpha: float | None = field(
        default=None,
        metadata={
            "help": "LD-DPO: weight in [0, 1] of the tokens beyond the shorter completion (policy and "
            "reference); lower counts length less. None (default) is 1."
        },
    )
    use_weighting: bool = field(
        default=False,
        metadata={"help": "WPO: weight each pair by how likely the policy is to produce its completions."},
    )
    discopop_tau: float = field(
        default=0.05, metadata={"help": "Temperature of the discopop loss (paper: 0.05)."}
    )
    simpo_gamma: float = field(
        default=0.5,
        metadata={"help": "Target reward margin of the simpo loss (with beta ~2 as in the SimPO paper)."},
    )
    # ---- end of the loss block
    reference_free: bool = field(
        default=False, metadata={"help": "Take the reference log-probs as 0 (no reference model)."}
    )
    logp_reduction: str = field(
        default="sum",
        metadata={"help": "Sequence log-prob: 'sum' over completion tokens (the paper) or 'mean' per token."},
    )
    max_length: int | None = field(
        default=1024,
        metadata={
            "help": "Max tokens of prompt + longest completion; longer rows are cut (the prompt from the left, then "
            "the completions from the right). None: no limit."
        },
    )
    max_prompt_length: int | None = field(
        default=None,
        metadata={
            "help": "Prompt tokens kept (its end) when a row is over max_length. Unset: the prompt is cut only as far "
            "as the completions need, never below max_length // 2."
        },
    )
    precompute_ref_log_probs: bool = field(
        default=False,
        metadata={
            "help": "Compute reference log-probs once before training (cached on disk); steps then run no "
            "reference forward."
        },
    )
    padding_free: bool = field(
        default=False,
        metadata={
            "help": "Pack the batch's sequences into one row (no compute on padding; attention stays per sequence)."
        },
    )
    precompute_ref_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Batch size of the precompute pass (no gradients: can be larger); default: the eval batch."
        },
    )
    pad_token: str | None = field(
        default=None,
        metadata={
            "help": "Token to pad with; default: the tokenizer's pad token, else its EOS (padding is masked)."
        },
    )
    share_prompt: bool = field(
        default=True,
        metadata={
            "help": "Read each prompt once for all its completions ([prompt | chosen | rejected] in one sequence, "
            "each completion attending to the prompt and itself): same log-probs, faster the longer the prompts "
            "and the more responses per prompt. Off by itself where the model's attention cannot do it (one "
            "log line says why); --share_prompt false turns it off."
        },
    )
    disable_dropout: bool = field(
        default=True,
        metadata={
            "help": "Set the model's dropout to 0 so policy and reference passes agree (the trained adapter keeps "
            "lora_dropout: the reference never runs it)."
        },
    )
    ref_adapter_name: str | None = field(
        default=None,
        metadata={
            "help": "Use this adapter of the model (loaded with model.load_adapter) as the frozen reference "
            "policy. Default: the base model for a fresh adapter, a frozen copy for an already trained one."
        },
    )
    pad_to_multiple_of: int | None = field(
        default=None, metadata={"help": "Round padded batch length up to a multiple of this (e.g. 8)."}
    )
    dataset_num_proc: int | None = field(default=None, metadata={"help": "Processes for tokenisation."})
    logp_chunk_size: int | None = field(
        default=None,
        metadata={
            "help": "Positions per chunk of the LM head + log-softmax; lower saves memory. Default: 64 MiB "
            "of fp32 per chunk."
        },
    )
    nonfinite_action: str = field(
        default="stop",
        metadata={
            "help": "On a non-finite loss or gradient: 'stop' the run (keeping the last checkpoint) or 'skip' "
            "the batch (counted in the logs)."
        },
    )
    model_card_template: str | None = field(
        default=None,
        metadata={"help": "Path to your own model card template; default: model_card_template.md."},
    )
    # Defaults that differ from TrainingArguments: our batches carry columns the model does not know.
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep dataset columns (the collator needs them)."}
    )
    logging_steps: float = field(default=10, metadata={"help": "Log every N update steps."})

    def __post_init__(self):
        if _launched_processes() > 1 and not self.use_cpu and not _has_accelerator():
            # torchrun / accelerate launch on a machine without GPUs: one data-parallel job on CPU (gloo), never
            # N independent runs writing the same output_dir.
            logger.info(
                "%d processes and no GPU: training data-parallel on CPU (use_cpu)", _launched_processes()
            )
            self.use_cpu = True
        super().__post_init__()
        refuse_ignored_options(self)
        if self.gradient_checkpointing and self.gradient_checkpointing_kwargs is None:
            # Non-reentrant checkpointing works with frozen 4-bit weights and LoRA.
            self.gradient_checkpointing_kwargs = {"use_reentrant": False}


def _launched_processes() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def _has_accelerator() -> bool:
    import torch

    return torch.accelerator.is_available()


def refuse_ignored_options(args: DPOConfig) -> None:
    """Raise ValueError naming the options for a setting that would be ignored or cannot work together.
    Which loss reads which option is losses.py's knowledge (validate_loss_options)."""
    args.loss_type = validate_loss_options(
        args.loss_type,
        args.loss_weights,
        beta=args.beta,
        label_smoothing=args.label_smoothing,
        reference_free=args.reference_free,
        f_divergence_type=args.f_divergence_type,
        f_alpha_divergence_coef=args.f_alpha_divergence_coef,
        ld_alpha=args.ld_alpha,
        use_weighting=args.use_weighting,
        discopop_tau=args.discopop_tau,
        simpo_gamma=args.simpo_gamma,
        logp_reduction=args.logp_reduction,
        precompute_ref_log_probs=args.precompute_ref_log_probs,
    )
    choices = {"logp_reduction": ("sum", "mean"), "nonfinite_action": ("stop", "skip")}
    for name, allowed in choices.items():
        if getattr(args, name) not in allowed:
            raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(args, name)!r}")
    for name in ("max_length", "max_prompt_length", "pad_to_multiple_of", "logp_chunk_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"{name} must be a positive number or unset, got {value}")
    if args.max_prompt_length is not None and args.max_length is None:
        raise ValueError(
            "max_prompt_length has no effect without max_length (nothing is cut); set max_length"
        )
    if args.max_prompt_length is not None and args.max_prompt_length >= args.max_length:
        raise ValueError(
            f"max_prompt_length ({args.max_prompt_length}) must be smaller than max_length ({args.max_length}), "
            "or unset it: the prompt is then cut only as far as the completions need"
        )
    conflicts = [
        (
            args.padding_free and args.pad_to_multiple_of is not None,
            "pad_to_multiple_of",
            "padding_free",
            "nothing is padded",
        ),
        (
            args.reference_free and args.precompute_ref_log_probs,
            "precompute_ref_log_probs",
            "reference_free",
            "there is no reference",
        ),
        (
            args.reference_free and args.ref_adapter_name is not None,
            "ref_adapter_name",
            "reference_free",
            "there is no reference",
        ),
    ]
    for conflict, ignored, setting, why in conflicts:
        if conflict:
            raise ValueError(f"{ignored} has no effect with {setting} ({why}); unset one of them")
