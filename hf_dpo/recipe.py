"""QLoRA DPO recipe: align a causal LM with Direct Preference Optimization on one GPU (or CPU).

    accelerate launch recipes/qlora_dpo.py [config.yaml] [--flag value ...]
    hf-dpo train [config.yaml] [--flag value ...]     # the same recipe
    python recipes/qlora_dpo.py                       # the embedded default: bundled data + a tiny local model

Supports a 4-bit (NF4/FP4, nested), 8-bit or full-precision base with a new LoRA adapter or one to continue;
every loss of `hf_dpo.losses`; reference-free, live or precomputed reference; padding-free batches, resume,
data parallel, all of `transformers.TrainingArguments` (push_to_hub, ...). Assumes a causal LM whose tokenizer
knows its special tokens (and a chat template for chat data), and data in a format of DESIGN.md.

Exit codes (hf_dpo.cli.EXIT_CODES): 0 success; 2 bad arguments or data; 3 non-finite loss; 4 training finished
but the push failed; 5 a file could not be written (disk full, permissions).
"""

import contextlib
import logging
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path

import datasets
import transformers
from transformers import HfArgumentParser, set_seed

from .callbacks import SaveError, resolve_resume_checkpoint
from .cli import UsageError, run_guarded, usage_errors
from .config import DataArguments, DPOConfig, ModelArguments
from .data import bundled_data_path, check_pairs_for_loss, load_preference_data
from .modeling import load_model
from .resources import bundled_file
from .trainer import DPOTrainer
from .yaml_args import check_report_to, parse_args, without_option

logger = logging.getLogger("hf_dpo.recipe")


def main(argv: list[str] | None = None) -> int:
    with usage_errors():  # a mistake in the flags, config, model or data stops the run here, before training
        # 1. Parse: flags, a YAML file, or a YAML file plus flags that override it; no arguments -> tiny.yaml.
        argv = list(sys.argv[1:] if argv is None else argv)
        argv = argv or [str(bundled_file("recipes/configs/tiny.yaml"))]
        parser = HfArgumentParser((ModelArguments, DataArguments, DPOConfig))
        model_args, data_args, training_args = parse_args(parser, argv)
        check_report_to(training_args.report_to)
        resume = resolve_resume_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir)
        setup_logging(training_args)
        set_seed(training_args.seed)

        # 2. Data, before the model so a bad row fails in seconds; the trainer tokenises (cached by datasets).
        splits = load_splits(data_args, training_args.seed)
        for split in splits.values():  # ranked rows (K > 2) need plackett_luce or ranked_mode=pairs
            check_pairs_for_loss(split, training_args.loss_type)

        # 3. Model (quantised base + LoRA) and trainer; the trainer also publishes and writes the model card.
        loaded = load_model(
            model_args,
            use_cpu=training_args.use_cpu,
            gradient_checkpointing=training_args.gradient_checkpointing,
            gradient_checkpointing_kwargs=training_args.gradient_checkpointing_kwargs,
        )
        trainer = DPOTrainer(
            model=loaded.model,
            args=training_args,
            train_dataset=splits["train"],
            eval_dataset=splits.get("test"),
            processing_class=loaded.tokenizer,
        )

    with resume_hint(argv):  # a full disk while saving: exit 5 with the command that resumes
        # 4. Train (resuming from the last complete checkpoint if asked), evaluate on the held-out split.
        train_result = trainer.train(resume_from_checkpoint=resume)
        trainer.log_metrics("train", train_result.metrics)
        trainer.save_metrics("train", train_result.metrics)
        if trainer.eval_dataset is not None:
            metrics = trainer.evaluate()
            trainer.log_metrics("eval", metrics)
            trainer.save_metrics("eval", metrics)

        # 5. Save the adapter, tokenizer and model card (README.md + training_curves.png); trainer_state.json
        # holds the whole log history. With push_to_hub, save_model publishes it all (HubPushError -> exit 4).
        trainer.save_state()
        for failure in trainer.hub_push_failures:
            print(f"warning: a push failed: {failure}", file=sys.stderr)
        trainer.save_model(training_args.output_dir)
    logger.info("adapter, tokenizer and model card saved in %s", training_args.output_dir)
    return 0


@contextlib.contextmanager
def resume_hint(argv: list[str]) -> Iterator[None]:
    """Add the exact command that resumes the run to a SaveError's message."""
    try:
        yield
    except SaveError as err:
        if err.last_checkpoint is None:
            raise
        program = sys.argv[0]
        command = ["python", program] if program.endswith(".py") else [Path(program).name, "train"]
        command += [*without_option(argv, "resume_from_checkpoint"), "--resume_from_checkpoint", "true"]
        raise SaveError(f"{err} Resume with: {shlex.join(command)}", err.last_checkpoint) from err


def load_splits(data_args: DataArguments, seed: int):
    """ "train", and "test" when a test split or test size is given, from the data arguments."""
    same_names = ("dataset_config", "prompt_field", "chosen_field", "rejected_field", "ranked_mode")
    options = {name: getattr(data_args, name) for name in same_names}
    options.update(split=data_args.dataset_train_split, test_split=data_args.dataset_test_split)
    source = data_args.dataset_name or str(bundled_data_path())
    return load_preference_data(source, test_size=data_args.dataset_test_size, seed=seed, **options)


def setup_logging(training_args: DPOConfig) -> None:
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", stream=sys.stdout
    )
    level = training_args.get_process_log_level()
    # The recipe's own milestones (data summary, where files went, the push) show on the main process.
    logging.getLogger("hf_dpo").setLevel(min(level, logging.INFO) if training_args.should_log else level)
    datasets.utils.logging.set_verbosity(level)
    transformers.utils.logging.set_verbosity(level)


def cli(argv: list[str] | None = None) -> int:
    """main() with every error a user can fix turned into one line and its documented exit code."""
    return run_guarded(main, argv)


__all__ = ["main", "cli", "UsageError"]
