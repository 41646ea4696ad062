"""DPOTrainer: a transformers.Trainer whose loss is DPO, wired through transformers' public hooks only.

A step runs ONE policy forward over the batch (logps.batch_logps), the reference under no_grad
(modeling.reference_policy, or precomputed columns), and losses.preference_loss on the two.
"""

import copy
import dataclasses
import logging
import os
import shutil
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn
from transformers import Trainer, TrainingArguments

from . import card, curves, data, hub, modeling, reference_cache, tiny
from .attention import can_share_prompt, use_varlen_attention
from .callbacks import CheckpointMarker, HubPushAtSave, NonFiniteGuard, resolve_resume_checkpoint, save_faults
from .collator import PreferenceCollator
from .config import DPOConfig, ModelArguments
from .logps import SequenceLogps, batch_logps
from .losses import LOSSES, LossSpec, metric_means, metric_sums, preference_loss

logger = logging.getLogger(__name__)

_CARD_SETTINGS = (  # the DPOConfig fields of the card's settings table, in order  # noqa: SIM905
    "loss_type beta label_smoothing reference_free logp_reduction learning_rate lr_scheduler_type optim "
    "num_train_epochs max_steps per_device_train_batch_size gradient_accumulation_steps max_length "
    "max_prompt_length precompute_ref_log_probs padding_free gradient_checkpointing seed"
).split()


class DPOTrainer(Trainer):
    """Direct Preference Optimization on a (4-bit) base model with a LoRA adapter, from a transformers setup.

    model: a peft model, a plain causal LM (with `peft_config`, `ref_model`, or neither for full fine-tuning
        against a frozen copy), or a model id / path (loaded with `hf_dpo.load_model`).
    ref_model: a separate reference model; default: the one `modeling.choose_reference` picks for `model`.
    args: a DPOConfig or TrainingArguments (DPO defaults); never modified: the trainer's copy holds no token.
    train_dataset / eval_dataset: rows in any hf_dpo record format (tokenised with `processing_class`, default
        the model's tokenizer) or tokenised rows; eval_dataset may be a dict of named splits.
    peft_config: a peft LoraConfig to attach to a plain model (a quantised one is prepared for it first).
    """

    def __init__(
        self,
        model: nn.Module | str,
        ref_model: nn.Module | None = None,
        args: DPOConfig | TrainingArguments | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        callbacks=None,
        peft_config=None,
        **kwargs,
    ):
        if isinstance(ref_model, TrainingArguments) and args is None:  # Trainer(model, args) positional
            args, ref_model = ref_model, None
        args = _private_copy(args)
        # The Hub token stays in memory only: never in training_args.bin or anything else written to disk.
        self._hub_token, args.hub_token = args.hub_token, None
        # Every push goes through push_to_hub / HubPushAtSave (transformers' own would add training_args.bin).
        hub_strategy, args.hub_strategy = str(getattr(args.hub_strategy, "value", args.hub_strategy)), "end"
        if not torch.accelerator.is_available():
            args.dataloader_pin_memory = False  # nothing to pin to on CPU (and no warning at every epoch)
        if args.ddp_find_unused_parameters is None:  # every trained (LoRA) weight takes part in every forward
            args.ddp_find_unused_parameters = False

        checkpointing = (args.gradient_checkpointing, args.gradient_checkpointing_kwargs)
        if isinstance(model, str):
            loaded = modeling.load_model(
                ModelArguments(model_name_or_path=model),
                peft_config=peft_config,
                use_cpu=args.use_cpu,
                gradient_checkpointing=checkpointing[0],
                gradient_checkpointing_kwargs=checkpointing[1],
            )
            model, processing_class = loaded.model, processing_class or loaded.tokenizer
        elif peft_config is not None:
            model = modeling.attach_adapter(model, peft_config, *checkpointing)
        modeling.prepare_model(model, args)
        if ref_model is not None:
            modeling.prepare_model(ref_model, args, is_reference=True).requires_grad_(False)
        self.loss_spec = LossSpec.from_config(args)
        self.reference = modeling.choose_reference(model, args, ref_model)
        # Rows [prompt | completion 0 | ...] where the attention allows it (hf_dpo's keeps completions apart).
        models = {"model": model, "ref_model": ref_model}
        self.share_prompt = args.share_prompt and can_share_prompt(models, args.max_length)
        if self.share_prompt:
            for candidate in (model, self.reference.model):
                if candidate is not None:
                    use_varlen_attention(candidate)
        tokenizer = processing_class or modeling.load_tokenizer(_model_name(model))
        # The main process tokenises first (filling the `datasets` cache); the others then read that cache.
        with args.main_process_first(desc="tokenising the preference data"):
            train_dataset = _tokenize(train_dataset, tokenizer, args, "train")
            eval_dataset = _each_split(eval_dataset, lambda ds, name: _tokenize(ds, tokenizer, args, name))
        data_collator = data_collator or PreferenceCollator(
            pad_token_id=_pad_token_id(tokenizer, args.pad_token),
            pad_to_multiple_of=args.pad_to_multiple_of,
            padding_free=args.padding_free,
            share_prompt=self.share_prompt,
        )
        super().__init__(
            model, args, data_collator, train_dataset, eval_dataset, tokenizer, callbacks=callbacks, **kwargs
        )
        launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if launched > 1 and self.args.world_size != launched:
            raise ValueError(
                f"{launched} processes were launched but transformers set up {self.args.world_size}: they would "
                "train independently. On a machine without GPUs pass --use_cpu true (DDP over gloo); otherwise "
                "check the launcher's --num_processes."
            )
        self.datasets_used = _dataset_names(train_dataset)
        self.guard = NonFiniteGuard(self.accelerator, self._describe_rows)
        hub_push = HubPushAtSave(self._publish, hub_strategy if args.push_to_hub else "end")
        self.hub_push_failures = hub_push.failures  # the pushes at each save, then the one at the end
        for callback in (self.guard, CheckpointMarker(), hub_push):
            self.add_callback(callback)
        # compute_loss returns the mean over the micro-batch; the Trainer divides by the accumulation steps.
        self.loss_is_scaled_for_ga = False
        self.model_accepts_loss_kwargs = False
        if self.reference.kind == "model" and self.reference.model is not self.model:
            self.reference.model = self.accelerator.prepare_model(self.reference.model, evaluation_mode=True)
        self._metric_sums = {"train": defaultdict(float), "eval": defaultdict(float)}
        if args.precompute_ref_log_probs and self.loss_spec.needs_reference:
            precompute = reference_cache.precompute_reference_logps
            self.train_dataset = precompute(self, self.train_dataset)
            self.eval_dataset = _each_split(self.eval_dataset, lambda ds, _: precompute(self, ds))

    @property
    def ref_model(self) -> nn.Module | None:
        """The separate reference model, as in TRL (None when the reference is an adapter of the model)."""
        return self.reference.model if self.reference.kind == "model" else None

    # ---------------------------------------------------------------- forward passes
    def sequence_logps(self, model: nn.Module, inputs: dict, with_stats: bool = True) -> SequenceLogps:
        """(B*K,) completion log-probs (per-token statistics too if `with_stats`) from ONE `model` forward."""
        args = self.args
        options = dict(reduction=args.logp_reduction, chunk_size=args.logp_chunk_size, ld_alpha=args.ld_alpha)
        return batch_logps(model, inputs, with_stats=with_stats, **options)

    def reference_logps(self, model: nn.Module, inputs: dict) -> torch.Tensor | None:
        """(B, K) reference log-probs, precomputed or by the reference policy; None if no loss needs them."""
        if not self.loss_spec.needs_reference:
            return None
        if "ref_logps" in inputs:
            return inputs["ref_logps"]
        with torch.no_grad(), modeling.reference_policy(model, self.reference) as reference_model:
            out = self.sequence_logps(reference_model, inputs, with_stats=False)
        return out.by_row(inputs["response_mask"].shape[0]).logps.detach()

    # ---------------------------------------------------------------- loss and metrics
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if model.training else "eval"
        response_mask = inputs["response_mask"]
        policy = self.sequence_logps(model, inputs).by_row(response_mask.shape[0])
        reference = self.reference_logps(model, inputs)
        losses, rewards, loss_metrics = preference_loss(self.loss_spec, policy, reference, response_mask)
        loss = losses.mean()
        if mode == "train":
            self.guard.observe(loss, inputs.get("source_line"))
        if mode == "eval" or torch.isfinite(loss.detach()):  # a non-finite batch would make every metric NaN
            sums = self._metric_sums[mode]
            for key, value in metric_sums(policy, rewards, response_mask, loss_metrics).items():
                sums[key] = sums[key] + value
        return (loss, {"policy_logps": policy.logps.detach(), "rewards": rewards}) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode, prefix = ("train", "") if "loss" in logs else ("eval", "eval_")
        sums, self._metric_sums[mode] = self._metric_sums[mode], defaultdict(float)
        if sums:  # this logging window's means, over every rank (losses.metric_means)
            keys = sorted(sums)
            stacked = torch.stack([torch.as_tensor(sums[k], device=self.args.device).float() for k in keys])
            means = metric_means(dict(zip(keys, self.accelerator.reduce(stacked, reduction="sum").tolist())))
            logs.update({f"{prefix}{k}": v for k, v in means.items()})  # in place: evaluate() returns these
        if mode == "train" and self.guard.skipped:
            logs["nonfinite_batches_skipped"] = self.guard.skipped
        super().log(logs, start_time)

    def _describe_rows(self, lines: list[int]) -> str:
        return data.describe_rows(self.train_dataset, lines) if lines else "data rows unknown"

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.accelerator.sync_gradients:  # the last micro-batch: clipping and the update come next
            self.guard.end_of_step(self.args, self.state, model)
        return loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    # ---------------------------------------------------------------- training, saving, publishing
    def train(self, resume_from_checkpoint=None, trial=None, **kwargs):
        """transformers' train(), resuming only from complete checkpoints; a machine fault while saving raises
        SaveError. With push_to_hub, the end publishes adapter and card (failures: `hub_push_failures`)."""
        resume = resolve_resume_checkpoint(resume_from_checkpoint, self.args.output_dir)
        with save_faults(self):
            output = super().train(resume_from_checkpoint=resume, trial=trial, **kwargs)
        if self.args.push_to_hub:
            try:
                self.push_to_hub(commit_message="End of training")
            except hub.HubPushError as err:
                logger.error("%s", err)
                self.hub_push_failures.append(f"end of training: {str(err).splitlines()[0]}")
        return output

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """transformers' save_model, then hf_dpo's card beside the adapter; pushes as transformers does."""
        output_dir = output_dir or self.args.output_dir
        with save_faults(self):
            super().save_model(output_dir, _internal_call=True)
            if self.args.should_save:
                # The frozen reference copy is not part of the result (peft saves every adapter).
                if self.reference.adapter == modeling.REFERENCE_ADAPTER:
                    shutil.rmtree(Path(output_dir) / modeling.REFERENCE_ADAPTER, ignore_errors=True)
                self.write_model_card(output_dir)
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save")

    def init_hf_repo(self, token: str | None = None, private: bool | None = None) -> None:
        """The repo is created by the first push, not here: a Hub outage must not stop a run before it starts."""
        hub.check_repo_id(self.hub_repo_id)

    @property
    def hub_repo_id(self) -> str:
        """hub_model_id, or the output_dir's name (the Hub puts a bare name in the token owner's namespace)."""
        return self.args.hub_model_id or Path(self.args.output_dir).absolute().name

    def create_model_card(self, license=None, model_name=None, dataset=None, dataset_name=None, **_):
        """hf_dpo's card and curves in output_dir; license, model_name, dataset / dataset_name feed it."""
        if self.is_world_process_zero():
            datasets = [dataset_name or dataset] if (dataset_name or dataset) else None
            self.write_model_card(self.args.output_dir, license, model_name, datasets)

    def push_to_hub(
        self, commit_message="End of training", blocking=True, token=None, revision=None, private=None, **card
    ):
        """Publish adapter, tokenizer, hf_dpo's card (`card`: create_model_card keywords), curves and results
        (never the token, local paths, training_args.bin or optimizer states); returns the commit URL, raises
        HubPushError (with a retry)."""
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        self.save_model(_internal_call=True)
        if not self.is_world_process_zero():
            return None
        self.create_model_card(**card)
        return self._publish(self.args.output_dir, None, commit_message, token, revision, private)

    def _publish(self, folder, path_in_repo, commit_message, token=None, revision=None, private=None) -> str:
        return hub.push_folder(
            folder,
            self.hub_repo_id,
            token=token or self._hub_token,
            private=self.args.hub_private_repo if private is None else private,
            revision=revision or self.args.hub_revision,
            commit_message=commit_message or "End of training",
            path_in_repo=path_in_repo,
        )

    def write_model_card(self, output_dir, license=None, model_name=None, datasets=None) -> Path:
        """Render README.md and training_curves.png into output_dir from the run's settings and log history."""
        curves.plot_training_curves(self.state.log_history, Path(output_dir) / curves.CURVES_FILE)
        inputs = {
            "base_model": _model_name(self.model),
            "datasets": datasets or self.datasets_used,
            "training": self.card_settings(),
            "results": _final_results(self.state.log_history),
            "hub_model_id": self.hub_repo_id if self.args.push_to_hub else self.args.hub_model_id,
            "license": license,
            "model_name": model_name,
            "reference": self.reference.description,
            "losses": [
                {"name": name, "weight": weight, "paper": LOSSES[name].paper}
                for name, weight in zip(self.loss_spec.loss_types, self.loss_spec.weights)
            ],
        }
        return card.write_card(output_dir, inputs, template_path=self.args.model_card_template)

    def card_settings(self) -> dict:
        """The flat settings table of the card (no secrets, no local paths)."""
        args = self.args
        shown_when = {  # loss options, in the table only where they take part
            "loss_weights": args.loss_weights is not None,
            "f_divergence_type": args.f_divergence_type != "reverse_kl",
            "f_alpha_divergence_coef": args.f_divergence_type == "alpha_divergence",
            "ld_alpha": args.ld_alpha is not None,
            "use_weighting": args.use_weighting,
            "discopop_tau": "discopop" in args.loss_type,
            "simpo_gamma": "simpo" in args.loss_type,
        }
        names = [*_CARD_SETTINGS, *(name for name, shown in shown_when.items() if shown)]
        settings = {name: getattr(args, name) for name in names}
        # The values in effect:
        settings.update(share_prompt=self.share_prompt, global_step=self.state.global_step)
        settings.update(world_size=args.world_size, quantization=modeling.describe_quantization(self.model))
        peft_model = modeling.unwrap(self.model)
        lora = getattr(peft_model, "peft_config", {}).get(getattr(peft_model, "active_adapter", None))
        if lora is not None:
            layers = lora.target_modules  # a regex, or a set of module names
            settings.update(lora_r=lora.r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout)
            settings["lora_target_modules"] = layers if isinstance(layers, str) else ",".join(sorted(layers))
        return settings


def _tokenize(dataset, tokenizer, args: DPOConfig, split: str):
    if dataset is None:
        return None
    if "prompt_input_ids" not in dataset.column_names:
        if "completions" not in dataset.column_names:  # raw rows: normalised as load_preference_data does
            dataset = data.load_preference_data(dataset, split=split)["train"]
        lengths = {"max_length": args.max_length, "max_prompt_length": args.max_prompt_length}
        dataset = data.tokenize_preference_dataset(
            dataset, tokenizer, **lengths, num_proc=args.dataset_num_proc, split_name=split
        )
    data.check_pairs_for_loss(dataset, args.loss_type, f"<{split} dataset>")
    return dataset


def _each_split(dataset, function):
    """function(split, name) on a dataset, or on each split of a dict of named eval splits."""
    if isinstance(dataset, dict):
        return {name: function(split, name) for name, split in dataset.items()}
    return None if dataset is None else function(dataset, "eval")


def _pad_token_id(tokenizer, pad_token: str | None) -> int:
    """`pad_token`'s id, else the tokenizer's pad or EOS id (padding is masked out: any id works)."""
    if pad_token is not None:
        return tokenizer.convert_tokens_to_ids(pad_token)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token: pass pad_token=...")
    return pad


def _private_copy(args) -> DPOConfig:
    """The trainer's own DPOConfig: a copy of `args`, or a TrainingArguments given the DPO defaults."""
    if args is None or isinstance(args, DPOConfig):
        return copy.copy(args) if args is not None else DPOConfig()
    if not isinstance(args, TrainingArguments):
        kind = type(args).__name__
        raise TypeError(f"args must be a DPOConfig or transformers.TrainingArguments, got {kind}")
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainingArguments) if f.init}
    values["remove_unused_columns"] = False  # the collator needs the preference columns
    logger.info(
        "args is a transformers TrainingArguments: using it as a DPOConfig with the DPO defaults (beta 0.1, "
        "sigmoid loss, max_length 1024); pass a DPOConfig to change them"
    )
    return DPOConfig(**values)


def _model_name(model: nn.Module) -> str:
    """The base model's name or path (a Hub id, a local folder, or the tiny model's name)."""
    config = getattr(modeling.unwrap(model), "config", None)  # a PeftModel's is its base model's
    name = str(getattr(config, "_name_or_path", "") or "")
    if name and (Path(name) / "hf_dpo_tiny.json").is_file():
        return tiny.TINY_MODEL_NAME
    return name or "a causal language model"


def _dataset_names(dataset) -> list[str]:
    """The files or dataset ids the rows came from (their `source_name`; in-memory rows name none)."""
    if dataset is None or "source_name" not in dataset.column_names:
        return []
    return sorted(name for name in dataset.unique("source_name") if not name.startswith("<"))


def _final_results(log_history: list[dict]) -> dict:
    """The last logged value of every train and eval metric (train_* summary keys excluded)."""
    skip = ("_runtime", "_per_second", "total_flos")
    return {
        key: value
        for entry in log_history
        for key, value in entry.items()
        if key not in ("step", "epoch")
        and isinstance(value, (int, float))
        and not key.startswith("train_")
        and not key.endswith(skip)
    }
