"""Arguments from flags, a YAML file, or a YAML file plus flags that override it.

Every mistake becomes an ArgumentsError (a ValueError) whose message names the file, line and field where the
value came from, so the command line prints one line and exits 2 instead of a usage dump or a traceback.
"""

import difflib
import json
import re
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser

CONFIG_SUFFIXES = (".yaml", ".yml")
# transformers 4 names that configs written for it (TRL, alignment-handbook) still use -> transformers 5 names.
# warmup_steps takes a float in [0, 1) as a ratio of the total steps, which is what warmup_ratio was.
RENAMED = {"warmup_ratio": "warmup_steps"}


class ArgumentsError(ValueError):
    """A bad flag, config file or value; the message says where it came from and, if it can, what was meant."""


def read_yaml_config(path: str | Path) -> list[tuple[str, Any, int]]:
    """(key, value, 1-based line) of each setting of a flat YAML mapping, in file order."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        values = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ArgumentsError(f"{path}{where}: not valid YAML: {problem}") from err
    if root is None:
        return []
    if not isinstance(root, yaml.MappingNode) or not isinstance(values, dict):
        raise ArgumentsError(
            f"{path}, line {root.start_mark.line + 1}: expected a mapping of argument names to values "
            f"(`beta: 0.1`), got {type(values).__name__}"
        )
    settings, seen = [], {}  # seen: the line of each key so far
    for key_node, _ in root.value:
        key, line = str(key_node.value), key_node.start_mark.line + 1
        if key in seen:
            raise ArgumentsError(f"{path}, line {line}: {key!r} is set twice (also on line {seen[key]})")
        seen[key] = line
        settings.append((key, values[key_node.value], line))
    return settings


def value_flags(key: str, value: Any) -> list[str]:
    """`key: value` -> `--key value` (None: no flag; bools lower-case, lists as several values, dicts as JSON)."""
    if isinstance(value, bool):
        value = str(value).lower()
    elif isinstance(value, list) and key == "report_to":  # a single-string flag in transformers 5
        value = ",".join(str(v) for v in value)
    elif isinstance(value, dict):
        value = json.dumps(value)
    values = value if isinstance(value, list) else [value]
    return [] if value is None else [f"--{key}", *(str(v) for v in values)]


def flag_name(arg: str) -> str | None:
    """The option an argument sets, as argparse reads it ("--max-length=9" -> "max_length"); None for a value."""
    return arg[2:].split("=", 1)[0].replace("-", "_") if arg.startswith("--") else None


def without_option(argv: list[str], name: str) -> list[str]:
    """`argv` less every `--name value` and `--name=value` (either spelling of the name)."""
    kept, args = [], iter(argv)
    for arg in args:
        if flag_name(arg) != name:
            kept.append(arg)
        elif "=" not in arg:
            next(args, None)  # its value
    return kept


def parse_args(parser: HfArgumentParser, argv: list[str]):
    """Parse `[config.yaml] [--flags]` into the parser's dataclasses; flags after the file override its values.
    FileNotFoundError for a missing file; ArgumentsError naming the file and line, or the flag, for a bad one."""
    for old, new in RENAMED.items():  # --old and --old=value
        argv = [re.sub(rf"^--{re.escape(old)}(?=\Z|=)", f"--{new}", arg) for arg in argv]
    config_path, settings = None, []
    if argv and argv[0].endswith(CONFIG_SUFFIXES):
        config_path, argv = argv[0], argv[1:]
        settings = [(RENAMED.get(k, k), v, line) for k, v, line in read_yaml_config(config_path)]
    known = {action.dest for action in parser._actions}
    overridden = {flag_name(arg) for arg in argv}
    origin = {}  # where each value came from, for messages: the config's line unless a flag overrides it
    for key, _, line in settings:
        if key not in known:
            raise ArgumentsError(
                f"{config_path}, line {line}: unknown argument {key!r}" + _did_you_mean(key, known)
            )
        if key not in overridden:
            origin[key] = f"{config_path}, line {line}, field {key!r}"

    def error(message: str):  # replaces argparse's usage dump + exit(2)
        match = re.search(r"argument --(\w+)", message)
        where = origin.get(match.group(1)) if match else None
        raise ArgumentsError(f"{where}: {message}" if where else message)

    flags = [flag for key, value, _ in settings for flag in value_flags(key, value)] + argv
    parser.error = error
    try:
        *parsed, remaining = parser.parse_args_into_dataclasses(
            args=flags, return_remaining_strings=True, look_for_args_file=False
        )
    except ArgumentsError:
        raise
    except (ValueError, TypeError) as err:  # a dataclass __post_init__ refusing a value
        message = str(err)
        sources = [where for key, where in origin.items() if re.search(rf"\b{re.escape(key)}\b", message)]
        raise ArgumentsError(f"{sources[0]}: {message}" if sources else message) from err
    finally:
        del parser.error
    if remaining:
        raise ArgumentsError(_unknown_flags_message(remaining, known))
    for args in parsed:
        # transformers parses report_to as one string: "wandb,tensorboard" (or a YAML list) names several.
        report_to = getattr(args, "report_to", None)
        if isinstance(report_to, list) and len(report_to) == 1 and "," in report_to[0]:
            args.report_to = [name.strip() for name in report_to[0].split(",") if name.strip()]
    return tuple(parsed)


def _unknown_flags_message(remaining: list[str], known: set[str]) -> str:
    configs = [arg for arg in remaining if arg.endswith(CONFIG_SUFFIXES)]
    if configs:
        return f"a config file must come first, before any flag: {configs[0]} [--flags]"
    flags = [arg for arg in remaining if arg.startswith("-")]
    if not flags:
        return f"unexpected argument(s) {' '.join(remaining)}: every value follows its --flag"
    name = flags[0].lstrip("-").split("=", 1)[0]
    return f"unknown argument {flags[0]}" + _did_you_mean(name, known, prefix="--")


def _did_you_mean(name: str, known: set[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.75)
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


# Integrations whose package (of the same name) transformers checks for.
_REPORT_TO_PACKAGES = {"comet_ml", "dagshub", "dvclive", "mlflow", "neptune", "tensorboard", "wandb"}
_REPORT_TO_PACKAGES |= {"codecarbon", "clearml", "swanlab", "trackio"}


def check_report_to(report_to: list[str]) -> None:
    """Fail early, with the fix, when `report_to` names an unknown integration or one that is not installed
    (transformers would raise at Trainer init, after the model is loaded, or with a less helpful message)."""
    from transformers.integrations import INTEGRATION_TO_CALLBACK, get_available_reporting_integrations

    names = [name for name in report_to if name not in ("none", "all")]  # a parsed TrainingArguments' list
    available = set(get_available_reporting_integrations())
    for name in names:
        if name not in INTEGRATION_TO_CALLBACK:
            raise ArgumentsError(
                f"report_to: unknown integration {name!r}"
                + _did_you_mean(name, set(INTEGRATION_TO_CALLBACK))
                + f"; choose none, all, or any of {', '.join(sorted(INTEGRATION_TO_CALLBACK))}"
            )
        if name in _REPORT_TO_PACKAGES and name not in available:
            raise ArgumentsError(
                f"report_to: {name} is not installed; `pip install {name}`, or pass --report_to none"
            )
