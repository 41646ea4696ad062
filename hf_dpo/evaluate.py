"""`hf-dpo eval ADAPTER_DIR [--flags]`: DPO metrics of a trained adapter against its base model.

The policy is the adapter, the reference is the base model (adapter disabled), and the metrics are those
of training (eval_loss, eval_rewards/accuracies, eval_rewards/margins, ...), printed as JSON and, with
--output_dir, written to eval_results.json there.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from transformers import HfArgumentParser

from .config import DataArguments, DPOConfig, ModelArguments


def evaluate_cli(argv: list[str]) -> int:
    from .data import PreferenceDataError, bundled_data_path, load_preference_data
    from .modeling import load_model
    from .trainer import DPOTrainer

    if not argv or argv[0].startswith("-"):
        print(
            "usage: hf-dpo eval ADAPTER_DIR [--dataset_name D] [--dataset_test_split S] [--output_dir O] "
            "[--per_device_eval_batch_size N] [DPOConfig flags]",
            file=sys.stderr,
        )
        return 2
    adapter_dir = Path(argv[0])
    config_file = adapter_dir / "adapter_config.json"
    if not config_file.is_file():
        print(f"error: {adapter_dir} holds no adapter_config.json", file=sys.stderr)
        return 2
    rest = argv[1:]
    write_to = None
    if "--output_dir" in rest:
        write_to = rest[rest.index("--output_dir") + 1]
    else:
        rest += ["--output_dir", tempfile.mkdtemp(prefix="hf_dpo_eval_")]
    parser = HfArgumentParser((ModelArguments, DataArguments, DPOConfig))
    model_args, data_args, args = parser.parse_args_into_dataclasses(args=rest, look_for_args_file=False)
    if "--model_name_or_path" not in rest:
        model_args.model_name_or_path = json.loads(config_file.read_text()).get(
            "base_model_name_or_path", model_args.model_name_or_path
        )
    model_args.adapter_name_or_path = str(adapter_dir)
    args.report_to = []
    try:
        loaded = load_model(model_args, use_cpu=args.use_cpu, adapter_is_reference=False)
        splits = load_preference_data(
            data_args.dataset_name or str(bundled_data_path()),
            split=data_args.dataset_test_split or data_args.dataset_train_split,
            dataset_config=data_args.dataset_config,
            prompt_field=data_args.prompt_field,
            chosen_field=data_args.chosen_field,
            rejected_field=data_args.rejected_field,
            ranked_mode=data_args.ranked_mode,
        )
    except PreferenceDataError as err:
        print(f"error: bad preference data: {err}", file=sys.stderr)
        return 2
    trainer = DPOTrainer(
        model=loaded.model, args=args, eval_dataset=splits["train"], processing_class=loaded.tokenizer
    )
    metrics = trainer.evaluate()
    print(json.dumps(metrics, indent=2))
    if write_to:
        Path(write_to).mkdir(parents=True, exist_ok=True)
        (Path(write_to) / "eval_results.json").write_text(json.dumps(metrics, indent=2))
    return 0
