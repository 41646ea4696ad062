"""QLoRA DPO recipe: align a causal LM with Direct Preference Optimization on one GPU (or CPU).

    accelerate launch recipes/qlora_dpo.py [config.yaml] [--flag value ...]
    python recipes/qlora_dpo.py            # the embedded default: bundled data + a tiny local model

Supports:
    - base model in 4-bit (NF4/FP4, nested), 8-bit or full precision, with a new LoRA adapter or one to
      continue (`adapter_name_or_path`, which then is also the frozen reference policy);
    - losses sigmoid (DPO / cDPO), ipo, hinge, robust, plackett_luce (ranked data), reference-free;
    - the reference from the same model with the adapter disabled, or precomputed once and cached;
    - padded or padding-free batches, gradient accumulation and checkpointing, resume, DDP via accelerate;
    - everything in `transformers.TrainingArguments` (report_to, save/eval strategies, ...);
    - publishing with push_to_hub, hub_model_id, hub_strategy (end, every_save, checkpoint,
      all_checkpoints), hub_private_repo, hub_token: adapter, tokenizer, card and results, never optimizer
      states, tokens or local paths. If the Hub fails, every local file stays and the run exits 4 with the
      `hf-dpo push` command that retries.
Assumes:
    - a causal LM whose tokenizer knows its special tokens (and a chat template for conversational data);
    - preference data in one of the formats of DESIGN.md (seed `chose`/`rejected`, explicit, chat, ranked).

Exit codes: 0 success; 2 bad arguments or data; 3 non-finite loss; 4 training finished but the push failed.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import datasets
import transformers
from transformers import HfArgumentParser, set_seed

from hf_dpo.config import DataArguments, DPOConfig, ModelArguments
from hf_dpo.data import PreferenceDataError, bundled_data_path, check_pairs_for_loss, load_preference_data
from hf_dpo.hub import HubPushError, check_repo_id
from hf_dpo.modeling import load_model
from hf_dpo.publish import HubStrategyCallback, publish
from hf_dpo.trainer import DPOTrainer, NonFiniteLossError, resolve_resume_checkpoint
from hf_dpo.yaml_args import check_report_to, parse_args

logger = logging.getLogger("hf_dpo.recipe")

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "tiny.yaml"


def main(argv: list[str] | None = None) -> int:
    with usage_errors():  # a mistake in the flags, config, model or data stops the run here, before training
        # 1. Parse: flags, a YAML file, or a YAML file plus flags that override it; no arguments -> tiny.yaml.
        argv = list(sys.argv[1:] if argv is None else argv)
        if not argv and DEFAULT_CONFIG.exists():
            argv = [str(DEFAULT_CONFIG)]
        parser = HfArgumentParser((ModelArguments, DataArguments, DPOConfig))
        model_args, data_args, training_args = parse_args(parser, argv)
        check_report_to(training_args.report_to)
        repo_id = hub_repo_id(training_args) if training_args.push_to_hub else None
        if repo_id is not None:
            check_repo_id(repo_id)  # now, not after hours of training
        setup_logging(training_args)
        set_seed(training_args.seed)
        resume = resolve_resume_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir)

        # 2. Data: read, normalise and split (before the model, so a bad row fails in seconds, not after
        # minutes of loading); the trainer tokenises (cached by `datasets`).
        dataset_name = data_args.dataset_name or str(bundled_data_path())
        splits = load_preference_data(
            dataset_name,
            split=data_args.dataset_train_split,
            test_split=data_args.dataset_test_split,
            test_size=data_args.dataset_test_size,
            seed=training_args.seed,
            dataset_config=data_args.dataset_config,
            prompt_field=data_args.prompt_field,
            chosen_field=data_args.chosen_field,
            rejected_field=data_args.rejected_field,
            ranked_mode=data_args.ranked_mode,
        )
        line_kind = "line" if dataset_name.endswith(".jsonl") else "row"
        for split in splits.values():  # ranked rows (K > 2) need plackett_luce or ranked_mode=pairs
            check_pairs_for_loss(split, training_args.loss_type, dataset_name, line_kind)

        # 3. Model: quantised base + LoRA, and its tokenizer.
        loaded = load_model(
            model_args,
            use_cpu=training_args.use_cpu,
            gradient_checkpointing=training_args.gradient_checkpointing,
            gradient_checkpointing_kwargs=training_args.gradient_checkpointing_kwargs,
        )

        # 4. Trainer; with hub_strategy other than "end", it also pushes at every save.
        trainer = DPOTrainer(
            model=loaded.model,
            args=training_args,
            train_dataset=splits["train"],
            eval_dataset=splits.get("test"),
            processing_class=loaded.tokenizer,
            run_info=run_info(model_args, loaded, dataset_name),
        )
        hub_callback = None
        if repo_id is not None and training_args.hub_strategy != "end":
            hub_callback = HubStrategyCallback(trainer, repo_id, training_args.hub_strategy)
            trainer.add_callback(hub_callback)

    # 5. Train (resuming if asked), then save the metrics.
    train_result = trainer.train(resume_from_checkpoint=resume)
    trainer.log_metrics("train", train_result.metrics)
    trainer.save_metrics("train", train_result.metrics)

    # 6. Evaluate on the held-out split.
    if trainer.eval_dataset is not None:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)

    # 7. Save the adapter and tokenizer; the model card (README.md + training_curves.png) is rendered with
    # them, and trainer_state.json holds the whole log history, the final evaluation included.
    trainer.save_model(training_args.output_dir)
    trainer.save_state()
    logger.info("adapter, tokenizer and model card saved in %s", training_args.output_dir)

    # 8. Publish. A failed push keeps every local file and exits 4 with the command that retries it.
    if repo_id is not None and training_args.should_save:
        if hub_callback is not None and hub_callback.failures:
            print(
                f"warning: {len(hub_callback.failures)} push(es) during training failed:\n  "
                + "\n  ".join(hub_callback.failures),
                file=sys.stderr,
            )
        try:
            url = publish(
                training_args.output_dir,
                repo_id,
                token=trainer.hub_token,
                private=training_args.hub_private_repo,
                revision=training_args.hub_revision,
            )
        except HubPushError as err:
            print(f"error: {err}", file=sys.stderr)  # says the files are kept; ends with `hf-dpo push ...`
            return 4
        logger.info("pushed %s to %s", training_args.output_dir, url)
    return 0


def run_info(model_args: ModelArguments, loaded, dataset_name: str) -> dict:
    """What the model card says about the model and data (the card keeps only the names of local paths)."""
    return {
        "base_model": loaded.base_model_name,
        "datasets": [dataset_name],
        "quantization": loaded.quantization,
        "lora_r": model_args.lora_r,
        "lora_alpha": model_args.lora_alpha,
        "lora_dropout": model_args.lora_dropout,
        "lora_target_modules": ",".join(model_args.lora_target_modules or ["all-linear"]),
        "reference": "the loaded adapter, frozen"
        if loaded.has_reference_adapter
        else "base model with the LoRA adapter disabled",
    }


def hub_repo_id(training_args: DPOConfig) -> str:
    """hub_model_id, or the output_dir's name (the Hub puts a bare name in the token owner's namespace)."""
    return training_args.hub_model_id or Path(training_args.output_dir).resolve().name


def setup_logging(training_args: DPOConfig) -> None:
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    level = training_args.get_process_log_level()
    # The recipe's own milestones (data summary, where files went, the push) show on the main process.
    logging.getLogger("hf_dpo").setLevel(min(level, logging.INFO) if training_args.should_log else level)
    datasets.utils.logging.set_verbosity(level)
    transformers.utils.logging.set_verbosity(level)


class UsageError(Exception):
    """A mistake in the arguments, config file, model name or data, found before training started."""


@contextlib.contextmanager
def usage_errors() -> Iterator[None]:
    """Turn the errors a user can fix (ValueError, OSError) into UsageError; data errors keep their type."""
    try:
        yield
    except PreferenceDataError:
        raise
    except (ValueError, OSError) as err:
        raise UsageError(str(err)) from err


def cli(argv: list[str] | None = None) -> int:
    """main() with the errors a user can fix turned into one clear message and a non-zero exit."""
    try:
        return main(argv)
    except PreferenceDataError as err:
        print(f"error: bad preference data: {err}", file=sys.stderr)
        return 2
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(cli())
