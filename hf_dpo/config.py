"""Argument dataclasses: ModelArguments, DataArguments and DPOConfig (a transformers.TrainingArguments).

Names follow TRL and alignment-handbook so configs carry over; all else is `transformers.TrainingArguments`.
"""

import logging
import os
from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments

from .losses import LOSS_TYPES, validate_loss_options
from .tiny import TINY_MODEL_NAME

logger = logging.getLogger(__name__)


def _arg(default, help: str):
    """A field with its --help text (a list default is copied for each instance)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class ModelArguments:
    """Which base model to load, how to quantise it, and the LoRA adapter to train."""

    model_name_or_path: str = _arg(
        TINY_MODEL_NAME, f"Base causal LM: a Hub id or a folder; '{TINY_MODEL_NAME}' builds a tiny local one."
    )
    tokenizer_name_or_path: str | None = _arg(None, "Tokenizer to use; defaults to the model's own.")
    adapter_name_or_path: str | None = _arg(None, "LoRA adapter to continue; a frozen copy is the reference.")
    model_revision: str = _arg("main", "Branch, tag or commit of the model on the Hub.")
    load_in_4bit: bool = _arg(True, "Quantise the base model to 4 bits with bitsandbytes (QLoRA).")
    load_in_8bit: bool = _arg(False, "Quantise the base model to 8 bits instead (turns 4-bit off).")
    bnb_4bit_quant_type: str = _arg("nf4", "4-bit data type: 'nf4' (QLoRA paper; better) or 'fp4'.")
    bnb_4bit_compute_dtype: str = _arg(
        "auto", "dtype of 4-bit matmuls: bfloat16, float16, float32, or auto (bf16 on GPUs that have it)."
    )
    use_bnb_nested_quant: bool = _arg(False, "Quantise the quantisation constants too (~0.4 bit/param less).")
    torch_dtype: str = _arg("auto", "dtype of the other weights: auto (the compute dtype), bfloat16, ...")
    attn_implementation: str | None = _arg(None, "eager, sdpa, flash_attention_2; default: the model's.")
    lora_r: int = _arg(16, "LoRA rank: higher adapts more, costs more memory.")
    lora_alpha: int = _arg(32, "LoRA scaling numerator (scale = alpha / r).")
    lora_dropout: float = _arg(0.05, "Dropout on the trained adapter's input (kept under disable_dropout).")
    lora_target_modules: list[str] | None = _arg(None, "Modules to adapt; default: all linears but the head.")
    trust_remote_code: bool = _arg(False, "Run model code from the Hub repo. Off unless you trust the repo.")


@dataclass
class DataArguments:
    """Where the preference data comes from and how its columns are named."""

    dataset_name: str | None = _arg(
        None, "A datasets id, a .jsonl/.json/.parquet/.csv file or a folder; default: the bundled sample."
    )
    dataset_config: str | None = _arg(None, "The datasets config (subset) name.")
    dataset_train_split: str = _arg("train", "Split to train on.")
    dataset_test_split: str | None = _arg(None, "Split to evaluate on, if any.")
    dataset_test_size: float | None = _arg(None, "Seeded eval hold-out of train: a fraction (< 1) or count.")
    prompt_field: str = _arg("prompt", "Column holding the prompt.")
    chosen_field: str | None = _arg(None, "Column holding the preferred text; default 'chosen' or 'chose'.")
    rejected_field: str = _arg("rejected", "Column holding the dispreferred text.")
    ranked_mode: str = _arg("plackett_luce", "Ranked rows: K-way (plackett_luce) or expanded to all 'pairs'.")


@dataclass
class DPOConfig(TrainingArguments):
    """TrainingArguments plus the DPO settings. Every TrainingArguments field works unchanged."""

    beta: float = _arg(0.1, "KL strength: higher keeps the policy closer to the reference (typ. 0.01-0.5).")
    # ---- the loss (hf_dpo.losses.LOSSES says which loss reads which option)
    loss_type: list[str] = _arg(
        ["sigmoid"], f"Loss(es), summed with loss_weights (--loss_type sigmoid sft): {', '.join(LOSS_TYPES)}."
    )
    loss_weights: list[float] | None = _arg(None, "One weight per loss_type entry; default 1 each.")
    label_smoothing: float = _arg(
        0.0,
        "Label noise eps in [0, 0.5): cDPO for sigmoid, sigmoid_norm, simpo, aot(_unpaired); the flip rate for "
        "robust; EXO's eps for exo_pair (needed there, e.g. 1e-3). 0 is plain DPO.",
    )
    f_divergence_type: str = _arg(
        "reverse_kl", "f-DPO divergence: reverse_kl (DPO), forward_kl, js_divergence, alpha_divergence."
    )
    f_alpha_divergence_coef: float = _arg(0.5, "alpha_divergence's alpha in (0, 1): 0 reverse KL, 1 forward.")
    ld_alpha: float | None = _arg(
        None, "LD-DPO: weight in [0, 1] of the tokens beyond the shorter completion; None is 1 (plain DPO)."
    )
    use_weighting: bool = _arg(False, "WPO: weight each pair by how likely the policy is to produce it.")
    discopop_tau: float = _arg(0.05, "Temperature of the discopop loss (paper: 0.05).")
    simpo_gamma: float = _arg(0.5, "Target reward margin of the simpo loss (with beta ~2, as in SimPO).")
    reference_free: bool = _arg(False, "Take the reference log-probs as 0 (no reference model).")
    logp_reduction: str = _arg("sum", "Sequence log-prob: 'sum' over completion tokens (paper) or 'mean'.")
    # ---- lengths and batches
    max_length: int | None = _arg(
        1024,
        "Max tokens of prompt + longest completion; longer rows are cut (prompt from the left, then "
        "completions from the right). None: no limit.",
    )
    max_prompt_length: int | None = _arg(
        None,
        "Prompt tokens kept (its end) when a row is over max_length. Unset: the prompt is cut only as far "
        "as the completions need, never below max_length // 2.",
    )
    padding_free: bool = _arg(False, "Pack a batch into one row (attention per sequence): no padding cost.")
    pad_to_multiple_of: int | None = _arg(None, "Round the padded length up to a multiple of this (e.g. 8).")
    pad_token: str | None = _arg(None, "Token to pad with; default: the tokenizer's pad token, else EOS.")
    share_prompt: bool = _arg(
        True,
        "Read each prompt once for all its completions ([prompt | chosen | rejected]): same log-probs, faster "
        "the longer the prompt. Off by itself, with one log line, where the model's attention cannot do it.",
    )
    dataset_num_proc: int | None = _arg(None, "Processes for tokenisation.")
    logp_chunk_size: int | None = _arg(None, "Positions per LM-head chunk; lower saves memory (64 MiB).")
    # ---- the reference
    precompute_ref_log_probs: bool = _arg(
        False, "Compute reference log-probs once up front (cached on disk): no reference forward in steps."
    )
    precompute_ref_batch_size: int | None = _arg(None, "Precompute batch size; default: the eval batch size.")
    ref_adapter_name: str | None = _arg(
        None,
        "Adapter of the model (model.load_adapter) to use as the frozen reference; default: the base "
        "model for a fresh adapter, a frozen copy for an already trained one.",
    )
    disable_dropout: bool = _arg(True, "Dropout 0 so policy and reference passes agree; lora_dropout stays.")
    # ---- faults and publishing
    nonfinite_action: str = _arg("stop", "Non-finite loss or gradient: 'stop' the run or 'skip' the batch.")
    model_card_template: str | None = _arg(None, "A model card template; default: model_card_template.md.")
    # Defaults that differ from TrainingArguments: our batches carry columns the model does not know.
    remove_unused_columns: bool = _arg(False, "Keep dataset columns (the collator needs them).")
    logging_steps: float = _arg(10, "Log every N update steps.")

    def __post_init__(self):
        launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if launched > 1 and not self.use_cpu and not torch.accelerator.is_available():
            # A launcher without GPUs: one data-parallel job over gloo, never N runs writing one output_dir.
            logger.info("%d processes and no GPU: training data-parallel on CPU (use_cpu)", launched)
            self.use_cpu = True
        super().__post_init__()
        refuse_ignored_options(self)
        if self.gradient_checkpointing and self.gradient_checkpointing_kwargs is None:
            # Non-reentrant checkpointing works with frozen 4-bit weights and LoRA.
            self.gradient_checkpointing_kwargs = {"use_reentrant": False}


# The options of the loss; which loss reads which is losses.py's knowledge (validate_loss_options).
LOSS_OPTIONS = ("beta", "label_smoothing", "reference_free", "f_divergence_type", "f_alpha_divergence_coef")
LOSS_OPTIONS += ("ld_alpha", "use_weighting", "discopop_tau", "simpo_gamma", "logp_reduction")
CHOICES = {"logp_reduction": ("sum", "mean"), "nonfinite_action": ("stop", "skip")}
POSITIVE_OR_UNSET = ("max_length", "max_prompt_length", "pad_to_multiple_of", "logp_chunk_size")
CONFLICTS = (  # (the option that would be ignored, the setting that makes it so, why)
    ("pad_to_multiple_of", "padding_free", "nothing is padded"),
    ("precompute_ref_log_probs", "reference_free", "there is no reference"),
    ("ref_adapter_name", "reference_free", "there is no reference"),
)


def refuse_ignored_options(args: DPOConfig) -> None:
    """Raise ValueError naming the options for a setting that would be ignored or cannot work together."""
    options = {name: getattr(args, name) for name in (*LOSS_OPTIONS, "precompute_ref_log_probs")}
    args.loss_type = validate_loss_options(args.loss_type, args.loss_weights, **options)
    for name, allowed in CHOICES.items():
        if getattr(args, name) not in allowed:
            raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(args, name)!r}")
    for name in POSITIVE_OR_UNSET:
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"{name} must be a positive number or unset, got {getattr(args, name)}")
    if args.max_prompt_length is not None and args.max_length is None:
        raise ValueError(
            "max_prompt_length has no effect without max_length (nothing is cut); set max_length"
        )
    if args.max_prompt_length is not None and args.max_prompt_length >= args.max_length:
        raise ValueError(
            f"max_prompt_length ({args.max_prompt_length}) must be smaller than max_length ({args.max_length}), "
            "or unset it: the prompt is then cut only as far as the completions need"
        )
    for ignored, setting, why in CONFLICTS:
        if getattr(args, setting) and getattr(args, ignored):
            raise ValueError(f"{ignored} has no effect with {setting} ({why}); unset one")
