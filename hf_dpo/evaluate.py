"""`hf-dpo eval --adapter DIR [--flags]`: DPO metrics of a trained adapter against its base model.

The policy is the adapter, the reference is the base model (adapter disabled), and the metrics are those
of training (eval_loss, eval_rewards/accuracies, eval_rewards/margins, ...), printed as JSON on stdout and
written to OUT/eval_results.json (OUT is --output_dir, by default the adapter folder). The adapter folder
may also come first without `--adapter`. An untrained adapter is the base model itself, so its eval_loss is
ln 2 and its rewards 0.

The DPO settings (loss_type, beta, label_smoothing, reference_free, logp_reduction, max_length,
max_prompt_length) default to those the adapter was trained with (its hf_dpo_run.json); flags override them.

The rows evaluated: `--dataset_test_split S` of the data; else, with `--dataset_test_size`, the rows the
recipe held out with the same value and seed; else every row of `--dataset_train_split` (the bundled data by
default).
"""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
from pathlib import Path

from transformers import HfArgumentParser

from .cli import run_guarded, usage_errors
from .config import DataArguments, DPOConfig, ModelArguments

USAGE = (
    "usage: hf-dpo eval --adapter DIR [--model_name_or_path BASE] [--dataset_name D] [--dataset_test_split S | --dataset_test_size N] "
    "[--output_dir O] [--per_device_eval_batch_size N] [other ModelArguments/DPOConfig flags]"
)


def evaluate_cli(argv: list[str]) -> int:
    """Exit 0 with the metrics on stdout; 2 with one line on stderr for a bad adapter, flag or data."""
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    return run_guarded(_evaluate_main, list(argv))


def _evaluate_main(argv: list[str]) -> int:
    from .yaml_args import parse_args

    with usage_errors():
        if "--adapter" in argv[:-1]:
            at = argv.index("--adapter")
            adapter_dir, rest = Path(argv[at + 1]), argv[:at] + argv[at + 2 :]
        elif not argv[0].startswith("-"):
            adapter_dir, rest = Path(argv[0]), argv[1:]
        else:
            raise ValueError(f"which adapter? pass --adapter DIR\n{USAGE}")
        config_file = adapter_dir / "adapter_config.json"
        if not config_file.is_file():
            raise ValueError(f"{adapter_dir} holds no adapter_config.json: not a LoRA adapter")
        rest = [*rest, *_run_settings(adapter_dir, rest)]
        write_to = rest[rest.index("--output_dir") + 1] if "--output_dir" in rest[:-1] else str(adapter_dir)
        with tempfile.TemporaryDirectory(prefix="hf_dpo_eval_") as scratch:
            if "--output_dir" not in rest:
                rest = [*rest, "--output_dir", scratch]  # the Trainer's own scratch; results go to write_to
            parser = HfArgumentParser((ModelArguments, DataArguments, DPOConfig))
            model_args, data_args, args = parse_args(parser, rest)
            if "--model_name_or_path" not in rest:
                base = json.loads(config_file.read_text()).get("base_model_name_or_path")
                model_args.model_name_or_path = base or model_args.model_name_or_path
            model_args.adapter_name_or_path = str(adapter_dir)
            args.report_to = []
            metrics = evaluate_adapter(model_args, data_args, args)
    print(json.dumps(metrics, indent=2))
    Path(write_to).mkdir(parents=True, exist_ok=True)
    (Path(write_to) / "eval_results.json").write_text(json.dumps(metrics, indent=2))
    return 0


# The DPO settings an adapter was trained with, reused by `hf-dpo eval` unless given on its command line: the
# loss of an IPO adapter or one trained with beta 0.01 means something else under the defaults.
RUN_SETTINGS = (
    "loss_type",
    "loss_weights",
    "f_divergence_type",
    "f_alpha_divergence_coef",
    "ld_alpha",
    "use_weighting",
    "discopop_tau",
    "simpo_gamma",
    "beta",
    "label_smoothing",
    "reference_free",
    "logp_reduction",
    "max_length",
    "max_prompt_length",
)


def _run_settings(adapter_dir: Path, argv: list[str]) -> list[str]:
    """Flags for the settings recorded in the run's hf_dpo_run.json (written at save) that argv does not set."""
    try:
        training = json.loads((adapter_dir / "hf_dpo_run.json").read_text(encoding="utf-8"))["training"]
    except (OSError, ValueError, KeyError, TypeError):
        return []  # not an hf_dpo run folder (e.g. an adapter from elsewhere): the defaults apply
    flags = []
    for name in RUN_SETTINGS:
        value = training.get(name) if isinstance(training, dict) else None
        if value is None or f"--{name}" in argv or any(a.startswith(f"--{name}=") for a in argv):
            continue
        values = value if isinstance(value, list) else [value]
        flags += [f"--{name}", *(str(v).lower() if isinstance(v, bool) else str(v) for v in values)]
    return flags


def evaluate_adapter(model_args: ModelArguments, data_args: DataArguments, args: DPOConfig) -> dict:
    """Load base + adapter (trainable weights untouched), pick the rows to evaluate, and return the metrics."""
    from .data import bundled_data_path, load_preference_data
    from .modeling import load_model
    from .trainer import DPOTrainer

    loaded = load_model(model_args, use_cpu=args.use_cpu)
    loaded.model.requires_grad_(False)  # evaluated, not trained: the reference is then the base model
    source = data_args.dataset_name or str(bundled_data_path())
    common = dict(
        dataset_config=data_args.dataset_config,
        prompt_field=data_args.prompt_field,
        chosen_field=data_args.chosen_field,
        rejected_field=data_args.rejected_field,
        ranked_mode=data_args.ranked_mode,
    )
    if data_args.dataset_test_split:
        rows = load_preference_data(source, split=data_args.dataset_test_split, **common)["train"]
    elif data_args.dataset_test_size:
        splits = load_preference_data(
            source,
            split=data_args.dataset_train_split,
            test_size=data_args.dataset_test_size,
            seed=args.seed,
            **common,
        )
        rows = splits["test"]
    else:
        rows = load_preference_data(source, split=data_args.dataset_train_split, **common)["train"]
    trainer = DPOTrainer(model=loaded.model, args=args, eval_dataset=rows, processing_class=loaded.tokenizer)
    with contextlib.redirect_stdout(sys.stderr):  # progress and log lines: stdout is the JSON alone
        return trainer.evaluate()
