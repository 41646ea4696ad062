"""The `hf-dpo` command (train, eval, push, merge) and the one table of exit codes of every entry point.

`hf-dpo eval --adapter DIR [--flags]`: the DPO metrics of an adapter against its base model (the adapter is
frozen, so the reference is the base), as JSON on stdout and in OUT/eval_results.json (OUT: --output_dir,
default DIR). DPO settings default to the run's hf_dpo_run.json; flags override them. Rows: --dataset_test_split,
else the rows the recipe held out (same --dataset_test_size and seed), else the train split (bundled data).
"""

import argparse
import contextlib
import json
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from . import __version__

# (module, error, exit code, message prefix); run_guarded imports nothing, so a push starts without torch.
EXIT_CODES = (
    ("hf_dpo.data.sources", "PreferenceDataError", 2, "bad preference data: "),
    ("hf_dpo.cli", "UsageError", 2, ""),
    ("hf_dpo.hub", "PushRefusedError", 2, ""),  # nothing was sent: a bad repo id, a token in a file, ...
    ("hf_dpo.callbacks", "NonFiniteLossError", 3, ""),
    ("hf_dpo.hub", "HubPushError", 4, ""),  # the files are kept; the message ends with the retry command
    ("hf_dpo.callbacks", "SaveError", 5, ""),
)
EVAL_USAGE = (
    "usage: hf-dpo eval --adapter DIR [--dataset_name D] [--dataset_test_split S | --dataset_test_size N] "
    "[--output_dir O] [other ModelArguments/DataArguments/DPOConfig flags]"
)


class UsageError(Exception):
    """A mistake in the arguments, config file, model name or data, found before training started."""


@contextlib.contextmanager
def usage_errors() -> Iterator[None]:
    """Turn the errors a user can fix before training (ValueError, OSError) into UsageError."""
    from .data import PreferenceDataError

    try:
        yield
    except PreferenceDataError:
        raise
    except (ValueError, OSError) as err:
        raise UsageError(str(err)) from err


def run_guarded(main, argv) -> int:
    """main(argv), with an error a user can act on printed as one line on stderr and its exit code (a bug
    keeps its traceback). An error of a module that was never imported cannot have been raised."""
    try:
        return main(argv)
    except Exception as err:
        for module, name, code, prefix in EXIT_CODES:
            kind = getattr(sys.modules.get(module), name, None)
            if kind is not None and isinstance(err, kind):
                print(f"error: {prefix}{err}", file=sys.stderr)
                return code
        raise


def _adapter(path) -> tuple[Path, str | None]:
    """The adapter folder and the base model its adapter_config.json names."""
    config = Path(path) / "adapter_config.json"
    if not config.is_file():
        raise UsageError(f"{path} holds no adapter_config.json: not a LoRA adapter")
    return Path(path), json.loads(config.read_text()).get("base_model_name_or_path")


def cmd_push(args: argparse.Namespace) -> int:
    from .hub import push_run  # no torch: a push starts in a second

    options = {name: getattr(args, name) for name in ("token", "private", "revision")}
    url = push_run(args.output_dir, args.repo_id, **options)
    print(f"pushed {args.output_dir} to {url}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from .modeling import load_tokenizer
    from .tiny import resolve_model_path

    (adapter, recorded_base), out = _adapter(args.adapter), Path(args.out)
    if out.resolve() == adapter.resolve():
        raise UsageError("--out must be a new folder, not the adapter's own")
    base_name = args.base or recorded_base
    if not base_name:
        raise UsageError("the adapter does not name its base model; pass --base")
    try:
        base = AutoModelForCausalLM.from_pretrained(resolve_model_path(base_name), dtype=args.dtype)
    except OSError as err:
        raise UsageError(f"cannot load the base model {base_name!r}: {err}; pass --base") from err
    PeftModel.from_pretrained(base, str(adapter)).merge_and_unload().save_pretrained(out)
    has_tokenizer = (adapter / "tokenizer_config.json").exists()
    load_tokenizer(str(adapter) if has_tokenizer else base_name).save_pretrained(out)
    print(f"merged model saved in {out}")
    return 0


def cmd_eval(argv: list[str]) -> int:
    """Exit 0 with the metrics on stdout; 2 with one line on stderr for a bad adapter, flag or data."""
    from transformers import HfArgumentParser

    from .config import DataArguments, DPOConfig, ModelArguments
    from .modeling import load_model
    from .recipe import load_splits
    from .trainer import DPOTrainer
    from .yaml_args import flag_name, parse_args

    with usage_errors(), tempfile.TemporaryDirectory(prefix="hf_dpo_eval_") as scratch:
        if "--adapter" in argv[:-1]:
            at = argv.index("--adapter")
            folder, rest = argv[at + 1], argv[:at] + argv[at + 2 :]
        elif argv and not argv[0].startswith("-"):
            folder, rest = argv[0], argv[1:]
        else:
            raise UsageError(f"which adapter? pass --adapter DIR\n{EVAL_USAGE}")
        adapter, recorded_base = _adapter(folder)
        parser = HfArgumentParser((ModelArguments, DataArguments, DPOConfig))
        flags = ["--output_dir", scratch, *rest, *_run_settings(adapter, rest), "--report_to", "none"]
        model_args, data_args, args = parse_args(parser, flags)
        write_to = Path(args.output_dir) if args.output_dir != scratch else adapter
        if "model_name_or_path" not in map(flag_name, rest):
            model_args.model_name_or_path = recorded_base or model_args.model_name_or_path
        model_args.adapter_name_or_path = str(adapter)
        loaded = load_model(model_args, use_cpu=args.use_cpu)
        loaded.model.requires_grad_(False)  # evaluated, not trained: the reference is then the base model
        splits = load_splits(data_args, args.seed)
        rows = splits.get("test", splits["train"])
        trainer = DPOTrainer(loaded.model, args=args, eval_dataset=rows, processing_class=loaded.tokenizer)
        with contextlib.redirect_stdout(sys.stderr):  # progress and log lines: stdout is the JSON alone
            metrics = trainer.evaluate()
    print(json.dumps(metrics, indent=2))
    write_to.mkdir(parents=True, exist_ok=True)
    (write_to / "eval_results.json").write_text(json.dumps(metrics, indent=2))
    return 0


def _run_settings(adapter: Path, argv: list[str]) -> list[str]:
    """Flags for the DPO settings recorded in the run's hf_dpo_run.json that argv does not set."""
    from .config import LOSS_OPTIONS
    from .yaml_args import flag_name, value_flags

    try:
        training = json.loads((adapter / "hf_dpo_run.json").read_text(encoding="utf-8"))["training"]
        assert isinstance(training, dict)
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        return []  # not an hf_dpo run folder (e.g. an adapter from elsewhere): the defaults apply
    names = ("loss_type", "loss_weights", *LOSS_OPTIONS, "max_length", "max_prompt_length")
    given = set(map(flag_name, argv))
    return [flag for name in names if name not in given for flag in value_flags(name, training.get(name))]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-dpo",
        description="Direct Preference Optimization with QLoRA: train, evaluate, publish and merge adapters.",
    )
    parser.add_argument("--version", action="version", version=f"hf_dpo {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, summary in (
        ("train", "run the QLoRA DPO recipe: hf-dpo train [config.yaml] [--flags]"),
        ("eval", "evaluate an adapter: hf-dpo eval --adapter DIR [--dataset_name ...]"),
    ):
        sub.add_parser(name, help=summary, add_help=False)  # flags: ModelArguments, DataArguments, DPOConfig
    push = sub.add_parser("push", help="publish a finished run to the Hub")
    push.add_argument("output_dir")
    push.add_argument("--repo-id", required=True, help="namespace/name on the Hub")
    push.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the saved login)")
    push.add_argument("--private", action="store_true", default=None, help="create the repo private")
    push.add_argument("--revision", default=None, help="branch to push to")
    merge = sub.add_parser("merge", help="merge an adapter into its base model (full precision)")
    merge.add_argument("adapter", help="folder with adapter_config.json")
    merge.add_argument("--out", required=True, help="folder for the merged model")
    merge.add_argument("--base", default=None, help="base model (default: the one the adapter names)")
    merge.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:
        from .recipe import cli

        return cli(argv[1:])
    if argv[:1] == ["eval"]:
        if argv[1:2] in (["-h"], ["--help"]):
            print(EVAL_USAGE)
            return 0
        return run_guarded(cmd_eval, argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in ("push", "merge"):
        return run_guarded({"push": cmd_push, "merge": cmd_merge}[args.command], args)
    parser.print_help()
    return 0 if not argv else 2


if __name__ == "__main__":
    sys.exit(main())
