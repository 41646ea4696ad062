"""DPOTrainer: a transformers.Trainer whose loss is DPO.

One training step runs ONE policy forward over the concatenated [chosen; rejected] rows (B*K rows for K
ranked responses), then gets the reference log-probs from the same model with the LoRA adapter disabled
under no_grad (or from a frozen reference adapter, a separate `ref_model`, or precomputed columns). The
loss itself is `losses.preference_loss`; this module only wires data, model and metrics together.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections import defaultdict

import torch
from torch import nn
from transformers import Trainer
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

from .attention import (
    SHARED_LAYOUT_KWARG,
    prompt_sharing_unsupported,
    require_shared_attention,
    use_varlen_attention,
)
from .collator import PreferenceCollator, SharedPromptLayout
from .config import DPOConfig
from .data import check_pairs_for_loss
from .logps import SequenceLogps, sequence_logps, sequence_logps_from_hidden
from .losses import preference_loss
from .modeling import (
    disable_dropout,
    fusable_lm_head,
    guard_cpu_4bit_repacking,
    lm_head_returns_hidden_states,
    reference_policy,
)
from .reference_cache import precompute_reference_logps

logger = logging.getLogger(__name__)

METRIC_NAMES = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "logits/chosen",
    "logits/rejected",
)


CHECKPOINT_COMPLETE = "hf_dpo_checkpoint_complete"


class NonFiniteLossError(RuntimeError):
    """A step produced a non-finite loss or gradient (the message names the step and the data rows)."""


class DPOTrainer(Trainer):
    """Direct Preference Optimization on a (4-bit) base model with a LoRA adapter.

    Args:
        model: a peft model (see `hf_dpo.modeling.load_model`), or any causal LM with `ref_model` given.
        args: DPOConfig.
        train_dataset / eval_dataset: tokenised rows (`prompt_input_ids`, `completion_input_ids`, `source_line`),
            or normalised rows from `load_preference_data` (tokenised here with `processing_class`).
        processing_class: the tokenizer.
        ref_model: optional separate reference model; default: the same model with the adapter disabled.
        run_info: optional dict for the model card (base_model, datasets, quantization, lora settings).
    """

    def __init__(
        self,
        model: nn.Module,
        args: DPOConfig,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        ref_model: nn.Module | None = None,
        data_collator=None,
        callbacks=None,
        run_info: dict | None = None,
        **kwargs,
    ):
        if not isinstance(args, DPOConfig):
            raise TypeError(f"args must be a hf_dpo.DPOConfig, got {type(args).__name__}")
        if processing_class is None:
            raise ValueError("processing_class (the tokenizer) is required")
        # The Hub token stays in memory only: never in training_args.bin or anything else written to disk.
        self.hub_token = args.hub_token
        self.push_requested = args.push_to_hub
        args.hub_token = None
        args.push_to_hub = (
            False  # hf_dpo publishes itself (hf_dpo.publish), so a Hub outage cannot stop a run
        )
        if args.ddp_find_unused_parameters is None:
            # Every LoRA weight takes part in every forward (frozen weights are not DDP's business), so
            # DDP need not walk the autograd graph looking for unused ones each step.
            args.ddp_find_unused_parameters = False

        if args.disable_dropout:
            disable_dropout(model)
            if ref_model is not None:
                disable_dropout(ref_model)
        guard_cpu_4bit_repacking(model)
        share_prompt = args.share_prompt and _can_share_prompt(model, ref_model, args.max_length)
        if args.padding_free or share_prompt:
            # sdpa/eager would attend across the whole packed row (N^2), or let completions see each other;
            # hf_dpo's attention keeps each sequence (each completion) to itself.
            use_varlen_attention(model)
            if ref_model is not None:
                use_varlen_attention(ref_model)
        self.ref_model = ref_model
        self.run_info = dict(run_info or {})

        # Under several processes the main one tokenises (and fills the `datasets` cache) first; the others
        # then read its cache instead of racing to write the same files.
        with args.main_process_first(desc="tokenising the preference data"):
            train_dataset = self._tokenize(train_dataset, processing_class, args, "train")
            if isinstance(eval_dataset, dict):
                eval_dataset = {
                    k: self._tokenize(v, processing_class, args, k) for k, v in eval_dataset.items()
                }
            else:
                eval_dataset = self._tokenize(eval_dataset, processing_class, args, "eval")
        for name, split in [("train", train_dataset), *_named_splits(eval_dataset)]:
            if split is not None:  # a pairwise loss cannot take ranked rows: say so now, not at their step
                check_pairs_for_loss(split, args.loss_type, f"<{name} dataset>", "source_line")
        if data_collator is None:
            data_collator = PreferenceCollator(
                pad_token_id=processing_class.pad_token_id,
                pad_to_multiple_of=args.pad_to_multiple_of,
                padding_free=args.padding_free,
                share_prompt=share_prompt,
            )
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            **kwargs,
        )
        # compute_loss returns the mean over the micro-batch; the Trainer divides by the accumulation steps.
        self.loss_is_scaled_for_ga = False
        self.model_accepts_loss_kwargs = False
        if self.ref_model is not None:
            self.ref_model = self.accelerator.prepare_model(self.ref_model, evaluation_mode=True)
        self._metric_sums: dict[str, dict[str, torch.Tensor]] = {
            "train": defaultdict(float),
            "eval": defaultdict(float),
        }
        self.nonfinite_skipped = 0
        self._step_fault: str | None = None  # "loss" or "gradient": what went non-finite in this step
        self._step_rows: list[int] = []  # data lines of the micro-batches of the step in progress
        self._last_step_rows: list[int] = []  # ... and of the last finished step

        if args.precompute_ref_log_probs and not args.reference_free:
            self.train_dataset = self._precompute(self.train_dataset)
            if isinstance(self.eval_dataset, dict):
                self.eval_dataset = {k: self._precompute(v) for k, v in self.eval_dataset.items()}
            elif self.eval_dataset is not None:
                self.eval_dataset = self._precompute(self.eval_dataset)

    # ---------------------------------------------------------------- data
    @staticmethod
    def _tokenize(dataset, tokenizer, args: DPOConfig, split: str):
        if dataset is None or "prompt_input_ids" in dataset.column_names:
            return dataset
        from .data import load_preference_data, tokenize_preference_dataset

        if "completions" not in dataset.column_names:
            # Raw rows ({"chose", "rejected"}, {"prompt", "chosen", "rejected"}, conversations, ranked
            # responses): normalise them as load_preference_data does, with its row-level error messages.
            dataset = load_preference_data(dataset)["train"]

        return tokenize_preference_dataset(
            dataset,
            tokenizer,
            max_length=args.max_length,
            max_prompt_length=args.max_prompt_length,
            num_proc=args.dataset_num_proc,
            split_name=split,
        )

    def _precompute(self, dataset):
        if dataset is None or "ref_logps" in dataset.column_names:
            return dataset
        return precompute_reference_logps(self, dataset)

    # ---------------------------------------------------------------- forward passes
    def sequence_logps(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> SequenceLogps:
        """Completion log-probs of every sequence in the batch from ONE forward of `model`: (B*K,) tensors."""
        forward_kwargs = {"input_ids": inputs["input_ids"], "use_cache": False}
        position_ids = inputs.get("position_ids")
        shared = SharedPromptLayout.from_batch(inputs) if "shared_layout" in inputs else None
        if shared is not None:  # one sequence per row: [prompt | completion 0 | ... ] (hf_dpo.collator)
            require_shared_attention(model)
            forward_kwargs["position_ids"] = position_ids
            forward_kwargs[SHARED_LAYOUT_KWARG] = shared
        elif self.args.padding_free:
            forward_kwargs["position_ids"] = position_ids
            # Sequence boundaries for flash-attention's varlen kernels or hf_dpo.attention's varlen sdpa.
            for key in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"):
                if key in inputs:
                    forward_kwargs[key] = inputs[key]
        else:
            forward_kwargs["attention_mask"] = inputs["attention_mask"]
        # Under DeepSpeed ZeRO-3 a weight exists only inside its module's forward: no fused head then.
        head = None if is_deepspeed_zero3_enabled() else fusable_lm_head(model)
        with lm_head_returns_hidden_states(head) if head is not None else contextlib.nullcontext():
            outputs = model(**forward_kwargs)
        common = dict(
            input_ids=inputs["input_ids"],
            completion_mask=inputs["completion_mask"],
            reduction=self.args.logp_reduction,
            chunk_size=self.args.logp_chunk_size,
            position_ids=position_ids if self.args.padding_free else None,
            shared_layout=shared,
        )
        if head is not None:
            return sequence_logps_from_hidden(outputs.logits, head.weight, lm_head_bias=head.bias, **common)
        return sequence_logps(outputs.logits, **common)

    def reference_logps(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Reference log-probs, shape (B, K): precomputed, from ref_model, or the same model without adapter."""
        if self.args.reference_free:
            return None
        if "ref_logps" in inputs:
            return inputs["ref_logps"]
        with torch.no_grad():
            if self.ref_model is not None:
                out = self.sequence_logps(self.ref_model, inputs)
            else:
                with reference_policy(model):
                    out = self.sequence_logps(model, inputs)
        return _by_row(out.logps, inputs["response_mask"]).detach()

    # ---------------------------------------------------------------- loss and metrics
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if model.training else "eval"
        policy = self.sequence_logps(model, inputs)
        response_mask = inputs["response_mask"]
        policy_logps = _by_row(policy.logps, response_mask)
        reference = self.reference_logps(model, inputs)
        losses, rewards = preference_loss(
            self.args.loss_type,
            policy_logps,
            reference,
            beta=self.args.beta,
            label_smoothing=self.args.label_smoothing,
            reference_free=self.args.reference_free,
            response_mask=response_mask if response_mask.shape[1] > 2 else None,
        )
        loss = losses.mean()
        if mode == "train" and not torch.isfinite(loss.detach()):
            # Decided in training_step once the step's gradients are in, on every rank at once.
            self._step_fault = self._step_fault or "loss"
        else:  # a non-finite batch would turn every metric of its logging window into NaN
            self._store_metrics(mode, policy, policy_logps, rewards, response_mask)
        if return_outputs:
            return loss, {"policy_logps": policy_logps.detach(), "rewards": rewards}
        return loss

    def _store_metrics(self, mode, policy: SequenceLogps, policy_logps, rewards, response_mask) -> None:
        """Accumulate sums and counts (not means), so averages over accumulation steps, logging steps and
        ranks weight every pair equally and every token equally."""
        with torch.no_grad():
            chosen_rewards = rewards[:, 0]
            if rewards.shape[1] > 2:  # K-way: the best response against the mean of the others
                others = response_mask[:, 1:].float()
                rejected_rewards = (rewards[:, 1:] * others).sum(1) / others.sum(1).clamp(min=1)
                rejected_logps = (policy_logps[:, 1:].detach() * others).sum(1) / others.sum(1).clamp(min=1)
            else:
                rejected_rewards = rewards[:, 1]
                rejected_logps = policy_logps[:, 1].detach()
            margins = chosen_rewards - rejected_rewards
            rows = response_mask.shape[0]
            counts = _by_row(policy.token_counts, response_mask)
            logit_sums = _by_row(policy.logit_sums, response_mask)
            sums = self._metric_sums[mode]
            values = {
                "rewards/chosen": chosen_rewards.sum(),
                "rewards/rejected": rejected_rewards.sum(),
                "rewards/accuracies": (margins > 0).float().sum(),  # a tie is not a correct ranking
                "rewards/margins": margins.sum(),
                "logps/chosen": policy_logps[:, 0].detach().sum(),
                "logps/rejected": rejected_logps.sum(),
                "logits/chosen": logit_sums[:, 0].sum(),
                "logits/rejected": logit_sums[:, 1:].sum(),
            }
            for key, value in values.items():
                sums[key] = sums[key] + value.float()
            sums["_pairs"] = sums["_pairs"] + float(rows)
            sums["_tokens/chosen"] = sums["_tokens/chosen"] + counts[:, 0].sum().float()
            sums["_tokens/rejected"] = sums["_tokens/rejected"] + counts[:, 1:].sum().float()

    def _reduced_metrics(self, mode: str) -> dict[str, float]:
        sums = self._metric_sums[mode]
        if not sums:
            return {}
        keys = sorted(sums)
        device = self.args.device
        stacked = torch.stack([torch.as_tensor(sums[k], dtype=torch.float32, device=device) for k in keys])
        stacked = self.accelerator.reduce(stacked, reduction="sum")  # gathered across ranks before logging
        total = dict(zip(keys, stacked.tolist()))
        self._metric_sums[mode] = defaultdict(float)
        pairs = max(total.pop("_pairs"), 1.0)
        tokens = {side: max(total.pop(f"_tokens/{side}"), 1.0) for side in ("chosen", "rejected")}
        metrics = {}
        for key in METRIC_NAMES:
            if key.startswith("logits/"):
                metrics[key] = total[key] / tokens[key.split("/")[1]]
            else:
                metrics[key] = total[key] / pairs
        return metrics

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if "loss" in logs else "eval"
        prefix = "eval_" if mode == "eval" else ""
        metrics = self._reduced_metrics(mode)
        # In place, so evaluate() returns these too (and they reach eval_results.json).
        logs.update({f"{prefix}{k}": v for k, v in metrics.items()})
        if mode == "train" and self.nonfinite_skipped:
            logs["nonfinite_batches_skipped"] = self.nonfinite_skipped
        super().log(logs, start_time)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    # ---------------------------------------------------------------- faults
    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        lines = inputs.get("source_line")
        self._step_rows.extend(lines.tolist() if lines is not None else [])
        grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
        if not _all_finite(grads):
            self._step_fault = self._step_fault or "gradient"
        if self.accelerator.sync_gradients:  # the last micro-batch: the optimizer steps next
            self._end_of_step_fault_check(model)
        return loss

    def _end_of_step_fault_check(self, model) -> None:
        """Stop (or skip the update) if any rank saw a non-finite loss or gradient in this step.

        The ranks agree first: one rank raising while the others wait in a gradient all-reduce would hang.
        """
        fault, rows = self._step_fault, self._step_rows
        self._step_fault, self._step_rows, self._last_step_rows = None, [], rows
        if self.accelerator.num_processes > 1:
            flag = torch.tensor([0.0 if fault is None else 1.0], device=self.args.device)
            if self.accelerator.reduce(flag, reduction="sum").item() > 0:
                gathered = [None] * self.accelerator.num_processes
                torch.distributed.all_gather_object(gathered, (fault, rows))
                fault = next((f for f, _ in gathered if f == "loss"), "gradient")
                rows = [row for _, rank_rows in gathered for row in rank_rows]
        if fault is None:
            return
        where = f"step {self.state.global_step + 1}, data rows (line numbers) {rows or 'unknown'}"
        if self.args.nonfinite_action == "skip":
            self.nonfinite_skipped += 1
            model.zero_grad(set_to_none=True)  # no gradient: the optimizer leaves every weight as it is
            logger.warning(
                "non-finite %s at %s: batch skipped (%d so far)", fault, where, self.nonfinite_skipped
            )
            return
        raise NonFiniteLossError(
            f"non-finite {fault} at {where}. The run stopped before this update; checkpoints saved so far "
            "are kept. Check those rows, lower the learning rate, or set nonfinite_action=skip to skip such "
            "batches."
        )

    def _maybe_log_save_evaluate(self, *args, **kwargs):
        # Before anything is logged or saved: an update can itself overflow (e.g. a learning rate of inf)
        # from finite gradients; such weights must never reach a checkpoint.
        if self.args.nonfinite_action == "stop":
            weights = [p for p in self.model.parameters() if p.requires_grad]
            if not _all_finite(weights):
                raise NonFiniteLossError(
                    f"non-finite weights after the update of step {self.state.global_step}, data rows (line "
                    f"numbers) {self._last_step_rows or 'unknown'} (learning rate {self._get_learning_rate()}). "
                    "The run stopped before saving them; checkpoints saved so far are kept. Lower the learning "
                    "rate."
                )
        return super()._maybe_log_save_evaluate(*args, **kwargs)

    # ---------------------------------------------------------------- saving and resuming
    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            # Written last: a checkpoint without it was cut short and is never resumed from.
            folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
            if os.path.isdir(folder):
                mark_checkpoint_complete(folder)

    def train(self, resume_from_checkpoint=None, trial=None, **kwargs):
        resume_from_checkpoint = resolve_resume_checkpoint(resume_from_checkpoint, self.args.output_dir)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial, **kwargs)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        super()._save(output_dir, state_dict)
        if self.args.should_save:
            from .publish import write_run_card

            write_run_card(self, output_dir or self.args.output_dir)


def mark_checkpoint_complete(folder: str) -> None:
    path = os.path.join(folder, CHECKPOINT_COMPLETE)
    with open(path + ".tmp", "w") as handle:
        handle.write("complete\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(path + ".tmp", path)


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The newest checkpoint-N in output_dir whose save finished (half-written ones are skipped)."""
    if not os.path.isdir(output_dir):
        return None
    steps = []
    for name in os.listdir(output_dir):
        match = re.fullmatch(r"checkpoint-(\d+)", name)
        if match and os.path.isfile(os.path.join(output_dir, name, CHECKPOINT_COMPLETE)):
            steps.append(int(match.group(1)))
    return os.path.join(output_dir, f"checkpoint-{max(steps)}") if steps else None


def resolve_resume_checkpoint(resume, output_dir: str):
    """True / "true" / "last" -> the last complete checkpoint; a path -> itself, if complete; else None."""
    if resume in (None, False, "", "false", "False", "no"):
        return None
    if resume is True or str(resume).lower() in ("true", "last", "auto"):
        found = last_complete_checkpoint(output_dir)
        if found is None:
            raise ValueError(f"resume_from_checkpoint: no complete checkpoint in {output_dir}")
        logger.info("resuming from %s", found)
        return found
    if not os.path.isfile(os.path.join(resume, CHECKPOINT_COMPLETE)):
        latest = last_complete_checkpoint(os.path.dirname(os.path.abspath(resume)))
        raise ValueError(
            f"resume_from_checkpoint: {resume} is not a complete hf_dpo checkpoint (its save was cut short or it "
            f"is not a checkpoint); the last complete one is {latest}"
        )
    return resume


def _can_share_prompt(model, ref_model, max_length: int | None) -> bool:
    """Whether the policy (and a separate reference model) can read each prompt once; if not, says why in
    one log line (the run then repeats the prompt before every completion, as without share_prompt)."""
    for name, candidate in (("model", model), ("ref_model", ref_model)):
        reason = None if candidate is None else prompt_sharing_unsupported(candidate, max_length)
        if reason is not None:
            logger.warning("share_prompt is off for this run: the %s cannot share prompts: %s", name, reason)
            return False
    return True


def _named_splits(eval_dataset) -> list[tuple[str, object]]:
    if isinstance(eval_dataset, dict):
        return [(f"eval {name}", split) for name, split in eval_dataset.items()]
    return [("eval", eval_dataset)]


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    """True if every element of every tensor is finite; one device sync, however many tensors."""
    if not tensors:
        return True
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def _by_row(per_sequence: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """(K*B,) completion-major per-sequence values -> (B, K) with column k the k-th response of each row."""
    rows, k = response_mask.shape
    return per_sequence.view(k, rows).t()
