"""Arguments from flags, a YAML file, or a YAML file plus flags that override it."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from transformers import HfArgumentParser


def yaml_to_flags(path: str | Path) -> list[str]:
    """Turn a flat YAML mapping into `--key value` flags (lists become several values, dicts JSON)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of argument names to values, got {type(data).__name__}")
    flags: list[str] = []
    for key, value in data.items():
        if value is None:
            continue
        flags.append(f"--{key}")
        if isinstance(value, bool):
            flags.append(str(value).lower())
        elif isinstance(value, list):
            flags.extend(str(v) for v in value)
        elif isinstance(value, dict):
            flags.append(json.dumps(value))
        else:
            flags.append(str(value))
    return flags


def parse_args(parser: HfArgumentParser, argv: list[str]):
    """Parse `[config.yaml] [--flags]`; flags given after the file override its values."""
    argv = list(argv)
    if argv and argv[0].endswith((".yaml", ".yml")):
        config_path = argv.pop(0)
        if not Path(config_path).is_file():
            raise FileNotFoundError(f"config file not found: {config_path}")
        known = {a.dest for a in parser._actions}
        flags = yaml_to_flags(config_path)
        unknown = [f[2:] for f in flags if f.startswith("--") and f[2:] not in known]
        if unknown:
            raise ValueError(f"{config_path}: unknown argument(s): {', '.join(unknown)}")
        argv = flags + argv
    return parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
