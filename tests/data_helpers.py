"""Shared builders for the data tests (sources, formats, tokenize).

Golden token sequences are written as the tiny tokenizer's token strings ("Ġ" is a space) and compared as
ids through the vocabulary, so they are exact and still readable.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import datasets

from hf_dpo.data import NORMALISED_FEATURES, load_preference_data

BOS, EOS = 1, 2

SEED_ROW = {
    "chose": "Question: What is 2+2? Answer: 4",
    "rejected": "Question: What is 2+2? Answer: I am not sure.",
}
PROMPT_TOKENS = ["<s>", "Question", ":", "ĠWhat", "Ġis", "Ġ2", "+", "2", "?", "ĠAnswer", ":"]
EXPLICIT = [{"prompt": f"Q{i}:", "chosen": f" right {i}", "rejected": f" wrong {i}"} for i in range(10)]
EXPECTED = [[f" right {i}", f" wrong {i}"] for i in range(10)]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def load_rows(tmp_path: Path, rows: list, name: str = "data.jsonl", **kwargs) -> datasets.Dataset:
    return load_preference_data(write_jsonl(tmp_path / name, rows), **kwargs)["train"]


def ids(tok, tokens: list[str]) -> list[int]:
    out = tok.convert_tokens_to_ids(tokens)
    assert tok.unk_token_id not in out, tokens
    return out


def in_memory(rows: list[dict]) -> datasets.Dataset:
    """A normalised split built directly (no loader, so no source columns): prompt/completions text rows."""
    columns = {
        "prompt": [r["prompt"] for r in rows],
        "completions": [r["completions"] for r in rows],
        "source_line": list(range(1, len(rows) + 1)),
        "messages_json": [r.get("messages_json", "") for r in rows],
    }
    return datasets.Dataset.from_dict(columns, features=NORMALISED_FEATURES)


def error_pattern(path: Path | str, line: int | None, field: str | None, kind: str = "line") -> str:
    pattern = re.escape(str(path))
    if line is not None:
        pattern += re.escape(f", {kind} {line}")
    if field is not None:
        pattern += re.escape(f", field {field!r}")
    return pattern
