"""The `hf-dpo` command: train (the recipe), eval, push, merge."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path

from . import __version__


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


# The one table of exit codes, for every entry point (hf-dpo train/eval/push, recipes/qlora_dpo.py): an
# error of a module that was never imported cannot have been raised, so the table imports nothing (a push
# starts without torch).
EXIT_CODES = (
    ("hf_dpo.data", "PreferenceDataError", 2, "bad preference data: "),
    ("hf_dpo.cli", "UsageError", 2, ""),
    ("hf_dpo.hub", "PushRefusedError", 2, ""),  # nothing was sent: a bad repo id, a token in a file, ...
    ("hf_dpo.callbacks", "NonFiniteLossError", 3, ""),
    (
        "hf_dpo.hub",
        "HubPushError",
        4,
        "",
    ),  # training finished; the message ends with the command that retries
    ("hf_dpo.callbacks", "SaveError", 5, ""),
)


def exit_code(err: BaseException) -> tuple[int, str] | None:
    """(exit code, one-line message) for an error a user can act on; None for a bug (keep the traceback)."""
    for module, name, code, prefix in EXIT_CODES:
        kind = getattr(sys.modules.get(module), name, None)
        if kind is not None and isinstance(err, kind):
            return code, prefix + str(err)
    return None


def run_guarded(main, argv) -> int:
    """main(argv), with an error a user can act on printed as one line on stderr and its exit code."""
    try:
        return main(argv)
    except Exception as err:
        known = exit_code(err)
        if known is None:
            raise
        print(f"error: {known[1]}", file=sys.stderr)
        return known[0]


def cmd_train(rest: list[str]) -> int:
    from .recipe import cli

    return cli(rest)


def cmd_push(args: argparse.Namespace) -> int:
    """Publish a finished run: exit 0, 2 when there is nothing valid to push, 4 when the Hub fails."""
    from .hub import push_run  # no torch: a push starts in a second

    def push(_):
        url = push_run(
            args.output_dir, args.repo_id, token=args.token, private=args.private, revision=args.revision
        )
        print(f"pushed {args.output_dir} to {url}")
        return 0

    return run_guarded(push, None)


def cmd_merge(args: argparse.Namespace) -> int:
    """Merge the adapter into a copy of the base model in `--dtype` (no quantisation) and save it."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from .modeling import load_tokenizer
    from .tiny import resolve_model_path

    adapter_dir = Path(args.adapter)
    config_file = adapter_dir / "adapter_config.json"
    if not config_file.is_file():
        print(f"error: {adapter_dir} holds no adapter_config.json: not a LoRA adapter", file=sys.stderr)
        return 2
    out = Path(args.out)
    if out.resolve() == adapter_dir.resolve():
        print("error: --out must be a new folder, not the adapter's own", file=sys.stderr)
        return 2
    config = json.loads(config_file.read_text())
    base_name = args.base or config.get("base_model_name_or_path")
    if not base_name:
        print("error: the adapter does not name its base model; pass --base", file=sys.stderr)
        return 2
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[args.dtype]
    try:
        base = AutoModelForCausalLM.from_pretrained(resolve_model_path(base_name), dtype=dtype)
    except OSError as err:
        print(f"error: cannot load the base model {base_name!r}: {err}; pass --base", file=sys.stderr)
        return 2
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(out)
    has_tokenizer = (adapter_dir / "tokenizer_config.json").exists()
    load_tokenizer(str(adapter_dir) if has_tokenizer else base_name).save_pretrained(out)
    print(f"merged model saved in {out}")
    return 0


def cmd_eval(rest: list[str]) -> int:
    from .evaluate import evaluate_cli

    return evaluate_cli(rest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-dpo",
        description="Direct Preference Optimization with QLoRA: train, evaluate, publish and merge adapters.",
    )
    parser.add_argument("--version", action="version", version=f"hf_dpo {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser(
        "train", help="run the QLoRA DPO recipe: hf-dpo train [config.yaml] [--flags]", add_help=False
    )
    sub.add_parser(
        "eval", help="evaluate an adapter: hf-dpo eval ADAPTER_DIR [--dataset_name ...]", add_help=False
    )
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
    if argv and argv[0] == "train":
        return cmd_train(argv[1:])
    if argv and argv[0] == "eval":
        return cmd_eval(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "push":
        return cmd_push(args)
    if args.command == "merge":
        return cmd_merge(args)
    parser.print_help()
    return 0 if not argv else 2


if __name__ == "__main__":
    sys.exit(main())
