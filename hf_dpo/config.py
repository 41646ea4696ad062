"""Argument dataclasses: ModelArguments, DataArguments and DPOConfig (a transformers.TrainingArguments).

Names follow TRL and alignment-handbook so configs carry over; each field's help says what it does and
which way to turn it. Everything not defined here is `transformers.TrainingArguments`, unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from .losses import LOSS_TYPES
from .tiny import TINY_MODEL_NAME


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
        default=0.05, metadata={"help": "Dropout on the LoRA input (0 with disable_dropout)."}
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
    loss_type: str = field(
        default="sigmoid", metadata={"help": f"Preference loss: one of {', '.join(LOSS_TYPES)}."}
    )
    label_smoothing: float = field(
        default=0.0,
        metadata={
            "help": "Assumed label-noise rate eps for sigmoid (cDPO) and robust losses; 0 is plain DPO."
        },
    )
    reference_free: bool = field(
        default=False, metadata={"help": "Take the reference log-probs as 0 (no reference model)."}
    )
    logp_reduction: str = field(
        default="sum",
        metadata={"help": "Sequence log-prob: 'sum' over completion tokens (the paper) or 'mean' per token."},
    )
    max_length: int | None = field(
        default=1024, metadata={"help": "Max tokens of prompt + completion; longer rows are truncated."}
    )
    max_prompt_length: int | None = field(
        default=512,
        metadata={"help": "When a row is too long, the prompt is first cut from the left to this."},
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
        default=True, metadata={"help": "Set every dropout to 0 so policy and reference passes agree."}
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
        super().__post_init__()
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r}")
        if self.logp_reduction not in ("sum", "mean"):
            raise ValueError(f"logp_reduction must be 'sum' or 'mean', got {self.logp_reduction!r}")
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.nonfinite_action not in ("stop", "skip"):
            raise ValueError(f"nonfinite_action must be 'stop' or 'skip', got {self.nonfinite_action!r}")
        if (
            self.max_length is not None
            and self.max_prompt_length is not None
            and (self.max_prompt_length >= self.max_length)
        ):
            raise ValueError(
                f"max_prompt_length ({self.max_prompt_length}) must be smaller than max_length ({self.max_length})"
            )
        if self.padding_free and self.pad_to_multiple_of is not None:
            raise ValueError(
                "pad_to_multiple_of has no effect with padding_free=True (nothing is padded); unset one"
            )
        if self.gradient_checkpointing and self.gradient_checkpointing_kwargs is None:
            # Non-reentrant checkpointing works with frozen 4-bit weights and LoRA.
            self.gradient_checkpointing_kwargs = {"use_reentrant": False}
