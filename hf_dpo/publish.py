"""What a run leaves behind and publishes: results files, the model card with its curves, and the push.

The trainer calls `write_run_card` at every save; the recipe and `hf-dpo push` call `publish`. A push
that fails never takes local artifacts with it: the caller reports the retry command and exits non-zero.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from transformers import TrainerCallback

logger = logging.getLogger(__name__)


def training_settings(trainer) -> dict:
    """The flat settings table of the card (no secrets, no local paths)."""
    args = trainer.args
    info = trainer.run_info
    settings = {
        "loss_type": args.loss_type,
        "beta": args.beta,
        "label_smoothing": args.label_smoothing,
        "reference_free": args.reference_free,
        "logp_reduction": args.logp_reduction,
        "learning_rate": args.learning_rate,
        "lr_scheduler_type": str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
        "optim": str(getattr(args.optim, "value", args.optim)),
        "num_train_epochs": args.num_train_epochs,
        "max_steps": args.max_steps,
        "global_step": trainer.state.global_step,
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "world_size": args.world_size,
        "max_length": args.max_length,
        "max_prompt_length": args.max_prompt_length,
        "precompute_ref_log_probs": args.precompute_ref_log_probs,
        "padding_free": args.padding_free,
        "gradient_checkpointing": args.gradient_checkpointing,
        "seed": args.seed,
    }
    for key in ("quantization", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules"):
        if key in info:
            settings[key] = info[key]
    return settings


def final_results(log_history: list[dict]) -> dict:
    """The last logged value of every train and eval metric (train_* summary keys excluded)."""
    results: dict = {}
    for entry in log_history:
        for key, value in entry.items():
            if key in ("step", "epoch") or not isinstance(value, (int, float)):
                continue
            if key.startswith("train_") or key.endswith(("_runtime", "_per_second", "total_flos")):
                continue
            results[key] = value
    return results


def _model_name(model) -> str:
    from .modeling import unwrap

    model = unwrap(model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return str(getattr(getattr(base, "config", None), "_name_or_path", "") or "a causal language model")


def write_run_card(trainer, output_dir: str | os.PathLike) -> Path:
    """Render README.md (and training_curves.png) into `output_dir` from the trainer's state."""
    from .card import write_card
    from .curves import plot_training_curves

    output_dir = Path(output_dir)
    plot_training_curves(trainer.state.log_history, output_dir)
    info = trainer.run_info
    inputs = {
        "base_model": info.get("base_model") or _model_name(trainer.model),
        "datasets": list(info.get("datasets", [])),
        "training": training_settings(trainer),
        "results": final_results(trainer.state.log_history),
        "hub_model_id": trainer.args.hub_model_id,
        "license": info.get("license"),
        "reference": info.get("reference"),
    }
    return write_card(output_dir, inputs, template_path=trainer.args.model_card_template)


def publish(
    output_dir: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    path_in_repo: str | None = None,
) -> str:
    """Push a finished run's adapter, tokenizer, card and results (into `path_in_repo` if given, else the
    repo root); returns the commit URL, raises hub.HubPushError on failure."""
    from .hub import push_run

    kwargs = {"token": token, "private": private, "revision": revision, "path_in_repo": path_in_repo}
    if commit_message:
        kwargs["commit_message"] = commit_message
    return push_run(output_dir, repo_id, **kwargs)


HUB_STRATEGIES = ("end", "every_save", "checkpoint", "all_checkpoints")


class HubStrategyCallback(TrainerCallback):
    """Pushes during training as transformers' `hub_strategy` does, minus what must never be published.

    At every save: "every_save" pushes the saved model (adapter, config, tokenizer, card, curves) to the
    repo root; "checkpoint" does that and also pushes the checkpoint into the repo's `last-checkpoint`
    folder (replacing the previous one); "all_checkpoints" does that and pushes every checkpoint into its
    own `checkpoint-N` folder. "end" pushes nothing here: the recipe publishes once at the end. Checkpoint
    folders go up without optimizer, scheduler or RNG states and training_args.bin (they are not needed to
    use the adapter, and pickles can carry local paths). A failed push is logged and remembered; training
    goes on and the final push publishes everything.
    """

    def __init__(self, trainer, repo_id: str, strategy: str):
        strategy = str(getattr(strategy, "value", strategy))
        if strategy not in HUB_STRATEGIES:
            raise ValueError(f"hub_strategy must be one of {', '.join(HUB_STRATEGIES)}, got {strategy!r}")
        self.trainer = trainer
        self.repo_id = repo_id
        self.strategy = strategy
        self.failures: list[str] = []

    def on_save(self, args, state, control, **kwargs):
        if self.strategy == "end" or not args.should_save:
            return
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not checkpoint.is_dir():
            logger.warning("no %s to push at step %d", checkpoint, state.global_step)
            return
        if args.save_strategy == "epoch":  # transformers' commit messages
            message = f"Training in progress, epoch {int(state.epoch)}"
        else:
            message = f"Training in progress, step {state.global_step}"
        self._push(args, state, checkpoint, None, message)  # the latest saved model, at the repo root
        if self.strategy == "checkpoint":
            self._push(args, state, checkpoint, "last-checkpoint", message + ", checkpoint")
        elif self.strategy == "all_checkpoints":
            self._push(args, state, checkpoint, checkpoint.name, message + ", checkpoint")

    def _push(self, args, state, folder: Path, path_in_repo: str | None, message: str) -> None:
        from .hub import HubPushError

        try:
            publish(
                folder,
                self.repo_id,
                token=self.trainer.hub_token,
                private=args.hub_private_repo,
                revision=args.hub_revision,
                commit_message=message,
                path_in_repo=path_in_repo,
            )
        except HubPushError as err:
            what = f"{path_in_repo}/" if path_in_repo else "the model"
            first_line = str(err).splitlines()[0]
            logger.warning("push of %s at step %d failed: %s", what, state.global_step, first_line)
            self.failures.append(f"step {state.global_step} ({what}): {first_line}")
