"""Preference data: read any supported source, normalise it to one schema, tokenise it.

Four record formats load (DESIGN.md, "Record formats"): the seed's ``{"chose", "rejected"}`` with an
implicit prompt, explicit ``{"prompt", "chosen", "rejected"}``, conversational (lists of
``{"role", "content"}`` messages) and ranked ``{"prompt", "responses"[, "scores"]}``. Every row becomes

    prompt (str), completions (list[str], best first), source_line (int), messages_json (str)

and tokenisation follows DESIGN.md, "Tokenisation contract". Bad input raises one exception type,
:class:`PreferenceDataError`, whose message names the file, the line (or row) and the field.
Rows whose chosen and rejected completions are identical are dropped with a warning and counted.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
import logging
import math
import os
import random
import shutil
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import datasets

logger = logging.getLogger(__name__)

FILE_EXTENSIONS = (".jsonl", ".json", ".parquet", ".csv")
RANKED_MODES = ("plackett_luce", "pairs")

NORMALISED_FEATURES = datasets.Features(
    {
        "prompt": datasets.Value("string"),
        "completions": datasets.List(datasets.Value("string")),
        "source_line": datasets.Value("int64"),
        "messages_json": datasets.Value("string"),
    }
)
TOKENIZED_FEATURES = datasets.Features(
    {
        "prompt_input_ids": datasets.List(datasets.Value("int32")),
        "completion_input_ids": datasets.List(datasets.List(datasets.Value("int32"))),
        "source_line": datasets.Value("int64"),
    }
)
# Bookkeeping columns written by the tokenising map and removed before the dataset is returned.
_STATUS_FEATURES = {"_truncated": datasets.Value("bool"), "_drop_reason": datasets.Value("string")}

DROP_IDENTICAL = "chosen identical to rejected"
DROP_FEWER_THAN_TWO = "fewer than 2 distinct responses"
DROP_SCORES_TIED = "all scores tied"
DROP_EMPTY_AFTER_TRUNCATION = "completion empty after truncation"
DROP_EMPTY_PROMPT = "prompt has no tokens"
DROP_NO_COMPLETIONS = "no completions"

_MAX_DROP_WARNINGS = 10  # per split: the first few dropped rows are named, the rest only counted


def bundled_data_path() -> Path:
    """The bundled sample data (seed format), data/dpo_data.jsonl."""
    from .resources import bundled_file

    return bundled_file("data/dpo_data.jsonl")


class PreferenceDataError(ValueError):
    """Bad preference data. The message names the file (``path``), line or row (``line``) and ``field``.

    ``line`` is 1-based for .jsonl files and JSON parse errors, a 0-based row index otherwise.
    """

    def __init__(
        self,
        reason: str,
        path: str | os.PathLike | None = None,
        line: int | None = None,
        field: str | None = None,
        line_kind: str = "line",
    ):
        self.reason = reason
        self.path = None if path is None else str(path)
        self.line = line
        self.field = field
        self.line_kind = line_kind
        where = [self.path if self.path is not None else "<unknown source>"]
        if line is not None:
            where.append(f"{line_kind} {line}")
        if field is not None:
            where.append(f"field {field!r}")
        super().__init__(f"{', '.join(where)}: {reason}")

    def __reduce__(self):  # keeps the attributes when raised in a `datasets` worker process
        return (type(self), (self.reason, self.path, self.line, self.field, self.line_kind))


@dataclass
class SplitStats:
    """What happened to one split: rows read, rows kept, rows written, truncated, dropped by reason."""

    split: str
    read: int = 0
    kept: int = 0
    rows: int = 0
    truncated: int = 0
    dropped: dict[str, int] = field(default_factory=dict)

    def summary(self, what: str = "loaded") -> str:
        dropped = sum(self.dropped.values())
        reasons = ", ".join(f"{reason}: {n}" for reason, n in sorted(self.dropped.items()))
        line = f"{what} split {self.split!r}: read {self.read} rows, kept {self.kept}"
        if self.rows != self.kept:
            line += f" (as {self.rows} rows)"
        if what == "tokenized":
            line += f", truncated {self.truncated}"
        line += f", dropped {dropped}" + (f" ({reasons})" if reasons else "")
        return line


# --------------------------------------------------------------------------------------------------
# Reading sources: each reader yields (path, line_kind, line, value) for every record.

_Record = tuple[str, str, int, Any]


@dataclass
class _SplitReader:
    label: str  # shown in messages
    identity: Callable[[], str]  # what the cache key depends on
    records: Callable[[], Iterator[_Record]]


def _read_text(path: Path) -> str:
    """The whole file as UTF-8 (a BOM is dropped); a bad byte is reported with its line."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise PreferenceDataError(f"cannot read the file: {e.strerror or e}", path) from e
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise PreferenceDataError(f"not valid UTF-8 ({e.reason} at byte {e.start})", path, line) from None
    return text.removeprefix("\ufeff")


def _parse_json(text: str, path: Path, line: int, line_kind: str = "line") -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise PreferenceDataError(
            f"invalid JSON at column {e.colno}: {e.msg}", path, line, None, line_kind
        ) from None
    except (ValueError, RecursionError) as e:  # e.g. integers over the digit limit, nesting too deep
        raise PreferenceDataError(
            f"invalid JSON: {type(e).__name__}: {e}", path, line, None, line_kind
        ) from None


def _iter_jsonl(path: Path) -> Iterator[_Record]:
    """Parse line by line, so that a bad line is named exactly; blank lines are skipped."""
    try:
        handle = path.open("rb")
    except OSError as e:
        raise PreferenceDataError(f"cannot read the file: {e.strerror or e}", path) from e
    with handle:
        for number, raw in enumerate(handle, start=1):
            if number == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8) :]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise PreferenceDataError(
                    f"not valid UTF-8 ({e.reason} at byte {e.start} of the line)", path, number
                ) from None
            if text.strip():
                yield str(path), "line", number, _parse_json(text, path, number)


def _iter_json(path: Path) -> Iterator[_Record]:
    """A JSON array of records, an object with one key holding that array, or JSON Lines named .json."""
    text = _read_text(path)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # several JSON values: JSON Lines in a .json file
            yield from _iter_jsonl(path)
            return
        raise PreferenceDataError(f"invalid JSON at column {e.colno}: {e.msg}", path, e.lineno) from None
    except (ValueError, RecursionError) as e:
        raise PreferenceDataError(f"invalid JSON: {type(e).__name__}: {e}", path) from None
    if isinstance(value, dict) and len(value) == 1 and isinstance(next(iter(value.values())), list):
        value = next(iter(value.values()))
    if not isinstance(value, list):
        raise PreferenceDataError(
            f"expected a JSON array of records (or an object with one key holding it), got {_type_name(value)}",
            path,
        )
    for index, item in enumerate(value):
        yield str(path), "row", index, item


def _iter_csv(path: Path) -> Iterator[_Record]:
    text = _read_text(path)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    index = 0
    try:
        for row in reader:
            row.pop(None, None)  # values beyond the header
            yield str(path), "row", index, row
            index += 1
    except csv.Error as e:
        raise PreferenceDataError(f"invalid CSV: {e}", path, index, None, "row") from None


def _iter_parquet(path: Path) -> Iterator[_Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    index = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                yield str(path), "row", index, row
                index += 1
    except (pa.ArrowException, OSError, ValueError) as e:
        raise PreferenceDataError(f"cannot read as Parquet: {e}", path, index, None, "row") from None


_FILE_READERS = {".jsonl": _iter_jsonl, ".json": _iter_json, ".csv": _iter_csv, ".parquet": _iter_parquet}


def _iter_dataset(dataset: datasets.Dataset, label: str) -> Iterator[_Record]:
    index = 0
    for batch in dataset.iter(batch_size=1000):
        columns = list(batch)
        for values in zip(*(batch[c] for c in columns)):
            yield label, "row", index, dict(zip(columns, values))
            index += 1


@lru_cache(maxsize=64)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _files_identity(files: list[Path]) -> str:
    parts = []
    for path in files:
        try:
            stat = path.stat()
            parts.append(f"{path.resolve()}:{_file_digest(str(path), stat.st_size, stat.st_mtime_ns)}")
        except OSError as e:
            raise PreferenceDataError(f"cannot read the file: {e.strerror or e}", path) from e
    return "|".join(parts)


def _files_reader(files: list[Path], label: str) -> _SplitReader:
    def records() -> Iterator[_Record]:
        for path in files:
            yield from _FILE_READERS[path.suffix.lower()](path)

    return _SplitReader(label, lambda: "files:" + _files_identity(files), records)


def _dataset_reader(dataset: datasets.Dataset, label: str) -> _SplitReader:
    return _SplitReader(
        label, lambda: f"dataset:{dataset._fingerprint}", lambda: _iter_dataset(dataset, label)
    )


def _pick_splits(
    available: dict[str, Callable[[], _SplitReader]], label: str, split: str, test_split: str | None
) -> dict[str, _SplitReader]:
    wanted = {"train": split} if test_split is None else {"train": split, "test": test_split}
    readers = {}
    for name, source_split in wanted.items():
        if source_split not in available:
            raise PreferenceDataError(
                f"no split {source_split!r}; the source has {sorted(available)}",
                label,
                field="test_split" if name == "test" else "split",
            )
        readers[name] = available[source_split]()
    return readers


def _open_source(
    source: Any, split: str, test_split: str | None, dataset_config: str | None
) -> dict[str, _SplitReader]:
    """Resolve `source` into one reader per output split ("train", and "test" when `test_split` is set)."""
    if isinstance(source, datasets.DatasetDict):
        available = {
            name: (lambda ds=ds, n=name: _dataset_reader(ds, f"<dataset split {n}>"))
            for name, ds in source.items()
        }
        return _pick_splits(available, "<DatasetDict>", split, test_split)
    if isinstance(source, datasets.Dataset):
        return _pick_splits(
            {split: lambda: _dataset_reader(source, "<Dataset>")}, "<Dataset>", split, test_split
        )
    if not isinstance(source, (str, os.PathLike)):
        raise PreferenceDataError(
            f"expected a file, folder, dataset id or datasets.Dataset, got {_type_name(source)}", repr(source)
        )

    path = Path(source).expanduser()
    label = str(path)
    if path.is_file():
        if path.suffix.lower() not in _FILE_READERS:
            raise PreferenceDataError(
                f"unsupported file type {path.suffix!r}; use one of {FILE_EXTENSIONS}", path
            )
        return _pick_splits({split: lambda: _files_reader([path], label)}, label, split, test_split)
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            try:
                loaded = datasets.load_from_disk(str(path))
            except Exception as e:  # corrupt folders raise many types; report them as data errors
                raise PreferenceDataError(
                    f"cannot load the saved dataset: {type(e).__name__}: {e}", path
                ) from e
            if isinstance(loaded, datasets.Dataset):
                loaded = datasets.DatasetDict({split: loaded})
            available = {name: (lambda ds=ds: _dataset_reader(ds, label)) for name, ds in loaded.items()}
            return _pick_splits(available, label, split, test_split)
        return _pick_splits(_folder_splits(path), label, split, test_split)
    if not _looks_like_hub_id(source):
        raise PreferenceDataError("file not found", path)
    return _pick_splits(_hub_splits(str(source), dataset_config), str(source), split, test_split)


def _looks_like_hub_id(source: str | os.PathLike) -> bool:
    """True for "name" or "owner/name"; a path-like source that does not exist is a missing file instead."""
    text = str(source)
    return (
        isinstance(source, str)
        and text.count("/") <= 1
        and not text.startswith((".", "/", "~"))
        and "\\" not in text
        and not text.lower().endswith(FILE_EXTENSIONS)
        and all(text.split("/"))
    )


def _folder_splits(path: Path) -> dict[str, Callable[[], _SplitReader]]:
    """A folder of data files; split names come from file names as `datasets` infers them (train.jsonl ...)."""
    from datasets.data_files import DataFilesDict, get_data_patterns

    try:
        patterns = get_data_patterns(str(path))
        files = DataFilesDict.from_patterns(patterns, base_path=str(path))
    except Exception as e:  # datasets raises its own EmptyDatasetError and friends
        raise PreferenceDataError(f"no data files found: {type(e).__name__}: {e}", path) from e
    available = {}
    for name, names in files.items():
        split_files = sorted(Path(f) for f in names if Path(f).suffix.lower() in _FILE_READERS)
        if split_files:
            available[str(name)] = lambda fs=split_files, n=name: _files_reader(fs, f"{path} ({n})")
    if not available:
        raise PreferenceDataError(f"no {'/'.join(FILE_EXTENSIONS)} files in the folder", path)
    return available


def _hub_splits(name: str, dataset_config: str | None) -> dict[str, Callable[[], _SplitReader]]:
    """A `datasets` id, loaded with `datasets.load_dataset` so the user's cache and offline mode apply."""
    try:
        loaded = datasets.load_dataset(name, dataset_config)
    except Exception as e:  # network, missing dataset, bad config: all reported as one error type
        raise PreferenceDataError(f"cannot load dataset: {type(e).__name__}: {e}", name) from e
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    return {str(n): (lambda ds=ds, n=n: _dataset_reader(ds, f"{name} ({n})")) for n, ds in loaded.items()}


# --------------------------------------------------------------------------------------------------
# Normalising one record.


@dataclass(frozen=True)
class _Fields:
    prompt: str
    chosen: str | None
    rejected: str
    responses: str
    scores: str


@dataclass
class _Row:
    prompt: str
    completions: list[str]
    source_line: int
    messages_json: str = ""
    scores: list[float] | None = None  # kept only to skip tied pairs when expanding


class _Where:
    def __init__(self, path: str, line_kind: str, line: int):
        self.path, self.line_kind, self.line = path, line_kind, line

    def error(self, field: str | None, reason: str) -> PreferenceDataError:
        return PreferenceDataError(reason, self.path, self.line, field, self.line_kind)

    def __str__(self) -> str:
        return f"{self.path}, {self.line_kind} {self.line}"


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _present(row: dict, key: str) -> bool:
    return key in row and row[key] is not None


def _implicit_prompt(first: str, second: str) -> str:
    """Longest common prefix, cut back to its last whitespace so that no word is split.

    The whitespace itself starts the completions (as in TRL's prompt extraction): BPE and SentencePiece
    tokenizers attach a space to the word after it, so "Answer:" + " 4" tokenises as the full text does.
    """
    common = os.path.commonprefix([first, second])
    for i in range(len(common) - 1, -1, -1):
        if common[i].isspace():
            return common[:i]
    return ""


def _strip_prefix(text: str, prefix: str) -> str:
    return text[len(prefix) :] if prefix and text.startswith(prefix) else text


def _require_text(value: Any, field: str, where: _Where) -> str:
    if not isinstance(value, str):
        raise where.error(field, f"expected a string, got {_type_name(value)}")
    return value


def _require_completion(text: str, field: str, where: _Where) -> str:
    if not text.strip():
        raise where.error(field, "empty completion text")
    return text


def _messages(value: Any, field: str, where: _Where) -> list[dict[str, str]]:
    if not isinstance(value, list):
        raise where.error(field, f"expected a list of messages, got {_type_name(value)}")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise where.error(f"{field}[{i}]", f"expected a message object, got {_type_name(message)}")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                raise where.error(
                    f"{field}[{i}].{key}", f"expected a string, got {_type_name(message.get(key))}"
                )
        messages.append({"role": message["role"], "content": message["content"]})
    return messages


def _normalise(value: Any, where: _Where, fields: _Fields) -> _Row | str:
    """One record -> a row in the common schema, or the reason it is dropped (a str). Raises on bad data."""
    if not isinstance(value, dict):
        raise where.error(None, f"expected an object with fields, got {_type_name(value)}")
    if _present(value, fields.responses):
        return _normalise_ranked(value, where, fields)

    chosen_key = fields.chosen or (
        "chosen" if _present(value, "chosen") or not _present(value, "chose") else "chose"
    )
    missing = [k for k in (chosen_key, fields.rejected) if not _present(value, k)]
    if missing:
        keys = sorted(str(k) for k in value)
        shown = ", ".join(repr(k[:40]) for k in keys[:20]) + (", ..." if len(keys) > 20 else "")
        alias = " (or 'chose')" if missing[0] == "chosen" and fields.chosen is None else ""
        raise where.error(missing[0], f"missing field {missing[0]!r}{alias}; the row has fields: [{shown}]")
    chosen, rejected = value[chosen_key], value[fields.rejected]
    prompt = value[fields.prompt] if _present(value, fields.prompt) else None

    if any(isinstance(v, list) for v in (chosen, rejected, prompt)):
        return _normalise_conversation(prompt, chosen, rejected, chosen_key, where, fields)

    chosen = _require_text(chosen, chosen_key, where)
    rejected = _require_text(rejected, fields.rejected, where)
    if prompt is None:  # the seed's format: the prompt is the shared start of both texts
        if chosen == rejected:
            return DROP_IDENTICAL
        prompt = _implicit_prompt(chosen, rejected)
        if not prompt:
            raise where.error(
                chosen_key,
                f"{chosen_key!r} and {fields.rejected!r} share no prefix ending at whitespace, "
                "so there is no implicit prompt (add a 'prompt' field)",
            )
        chosen, rejected = chosen[len(prompt) :], rejected[len(prompt) :]
    else:
        prompt = _require_text(prompt, fields.prompt, where)
        chosen, rejected = _strip_prefix(chosen, prompt), _strip_prefix(rejected, prompt)
    _require_completion(chosen, chosen_key, where)
    _require_completion(rejected, fields.rejected, where)
    if chosen == rejected:
        return DROP_IDENTICAL
    return _Row(prompt, [chosen, rejected], where.line)


def _normalise_conversation(
    prompt: Any, chosen: Any, rejected: Any, chosen_key: str, where: _Where, fields: _Fields
) -> _Row | str:
    chosen_msgs = _messages(chosen, chosen_key, where)
    rejected_msgs = _messages(rejected, fields.rejected, where)
    for key, msgs in ((chosen_key, chosen_msgs), (fields.rejected, rejected_msgs)):
        if not msgs:
            raise where.error(key, "empty completion: no messages")
        if msgs[-1]["role"] != "assistant":
            raise where.error(
                f"{key}[{len(msgs) - 1}].role",
                f"the last message must be from the assistant, got role {msgs[-1]['role']!r}",
            )
    if chosen_msgs == rejected_msgs:
        return DROP_IDENTICAL
    if prompt is None:  # the prompt is the shared leading messages; each side keeps at least one message
        shared = 0
        limit = min(len(chosen_msgs), len(rejected_msgs)) - 1
        while shared < limit and chosen_msgs[shared] == rejected_msgs[shared]:
            shared += 1
        if shared == 0:
            raise where.error(
                chosen_key,
                f"{chosen_key!r} and {fields.rejected!r} share no leading prompt messages (add a 'prompt')",
            )
        prompt_msgs = chosen_msgs[:shared]
    elif isinstance(prompt, str):
        prompt_msgs = [{"role": "user", "content": prompt}]
    else:
        prompt_msgs = _messages(prompt, fields.prompt, where)
        if not prompt_msgs:
            raise where.error(fields.prompt, "empty prompt: no messages")
    n = len(prompt_msgs)
    completions = []
    for key, msgs in ((chosen_key, chosen_msgs), (fields.rejected, rejected_msgs)):
        if msgs[:n] == prompt_msgs:  # the conversation repeats the prompt: strip it once
            msgs = msgs[n:]
        if not msgs or not any(m["content"].strip() for m in msgs):
            raise where.error(key, "empty completion text")
        completions.append(msgs)
    if completions[0] == completions[1]:
        return DROP_IDENTICAL
    messages_json = json.dumps(
        {"prompt": prompt_msgs, "chosen": completions[0], "rejected": completions[1]}, ensure_ascii=False
    )
    # prompt/completions hold readable text for inspection; tokenisation renders messages_json.
    preview = ["\n".join(m["content"] for m in msgs) for msgs in completions]
    return _Row(prompt_msgs[-1]["content"], preview, where.line, messages_json)


def _normalise_ranked(value: dict, where: _Where, fields: _Fields) -> _Row | str:
    if not _present(value, fields.prompt):
        raise where.error(fields.prompt, f"a ranked row (with {fields.responses!r}) needs a prompt")
    prompt = _require_text(value[fields.prompt], fields.prompt, where)
    responses = value[fields.responses]
    if not isinstance(responses, list):
        raise where.error(fields.responses, f"expected a list of strings, got {_type_name(responses)}")
    if len(responses) < 2:
        raise where.error(fields.responses, f"a ranked row needs at least 2 responses, got {len(responses)}")
    texts = []
    for i, response in enumerate(responses):
        key = f"{fields.responses}[{i}]"
        texts.append(
            _require_completion(_strip_prefix(_require_text(response, key, where), prompt), key, where)
        )
    scores = None
    if _present(value, fields.scores):
        scores = value[fields.scores]
        if not isinstance(scores, list):
            raise where.error(fields.scores, f"expected a list of numbers, got {_type_name(scores)}")
        if len(scores) != len(texts):
            raise where.error(
                fields.scores,
                f"has {len(scores)} scores for {len(texts)} {fields.responses!r}; lengths must match",
            )
        for i, score in enumerate(scores):
            if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
                raise where.error(f"{fields.scores}[{i}]", f"expected a finite number, got {score!r:.40}")
        order = sorted(range(len(texts)), key=lambda i: -scores[i])  # stable: ties keep their order
        texts, scores = [texts[i] for i in order], [float(scores[i]) for i in order]
    kept, kept_scores = [], []
    for i, text in enumerate(texts):  # a duplicate response keeps its best rank
        if text not in kept:
            kept.append(text)
            kept_scores.append(scores[i] if scores is not None else None)
    if len(kept) < 2:
        return DROP_FEWER_THAN_TWO
    if scores is not None and len(set(kept_scores)) == 1:
        return DROP_SCORES_TIED
    return _Row(prompt, kept, where.line, "", kept_scores if scores is not None else None)


def _expand_pairs(row: _Row) -> list[_Row]:
    """All K(K-1)/2 (better, worse) pairs of a ranked row; pairs with equal scores carry no preference."""
    pairs = []
    for i in range(len(row.completions)):
        for j in range(i + 1, len(row.completions)):
            if row.scores is None or row.scores[i] != row.scores[j]:
                pairs.append(
                    _Row(
                        row.prompt,
                        [row.completions[i], row.completions[j]],
                        row.source_line,
                        row.messages_json,
                    )
                )
    return pairs


# --------------------------------------------------------------------------------------------------
# Loading.


@lru_cache(maxsize=1)
def _code_version() -> str:
    """Cached results depend on this file's code: any edit invalidates them."""
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


def _hash(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _split_indices(n: int, test_size: float | int, seed: int, label: str) -> tuple[list[int], list[int]]:
    n_test = math.ceil(test_size * n - 1e-9) if isinstance(test_size, float) else int(test_size)
    if not 0 < n_test < n:
        raise PreferenceDataError(
            f"test_size={test_size!r} leaves no rows in train or test ({n} rows to split)",
            label,
            field="test_size",
        )
    order = list(range(n))
    random.Random(seed).shuffle(order)
    test = set(order[:n_test])
    return [i for i in range(n) if i not in test], sorted(test)


def load_preference_data(
    source: str | os.PathLike | datasets.Dataset | datasets.DatasetDict,
    *,
    split: str = "train",
    test_split: str | None = None,
    test_size: float | int | None = None,
    seed: int = 42,
    dataset_config: str | None = None,
    prompt_field: str = "prompt",
    chosen_field: str | None = None,
    rejected_field: str = "rejected",
    responses_field: str = "responses",
    scores_field: str = "scores",
    ranked_mode: str = "plackett_luce",
    cache_dir: str | os.PathLike | None = None,
    return_stats: bool = False,
) -> datasets.DatasetDict | tuple[datasets.DatasetDict, dict[str, SplitStats]]:
    """Read preference data from a file, folder, saved dataset or `datasets` id into a normalised DatasetDict.

    Returns splits "train" and, with `test_split` (a split of the source) or `test_size` (a fraction or a
    row count split off "train" with `seed`), "test"; columns: prompt, completions (best first),
    source_line, messages_json. `ranked_mode="pairs"` expands ranked rows into all (better, worse) pairs
    (after the test split, so the pairs of one prompt stay together). With `return_stats`, also returns
    {split: SplitStats}. The result is written under `cache_dir` (default: the `datasets` cache) and
    memory-mapped from there, so that tokenising it is cached on disk too; a later call with the same
    source bytes and options reads it back without parsing.
    """
    label = str(source) if isinstance(source, (str, os.PathLike)) else f"<{type(source).__name__}>"
    if ranked_mode not in RANKED_MODES:
        raise PreferenceDataError(
            f"ranked_mode must be one of {RANKED_MODES}, got {ranked_mode!r}", label, field="ranked_mode"
        )
    if test_split is not None and test_size is not None:
        raise PreferenceDataError("give test_split or test_size, not both", label, field="test_size")
    if isinstance(test_size, float) and test_size >= 1 and test_size.is_integer():
        test_size = int(test_size)  # a count given as a float, as a command line parses it (20.0)
    if test_size is not None and (
        isinstance(test_size, bool)
        or not isinstance(test_size, (int, float))
        or (isinstance(test_size, float) and not 0.0 < test_size < 1.0)
        or (isinstance(test_size, int) and test_size < 1)
    ):
        raise PreferenceDataError(
            f"test_size must be a fraction in (0, 1) or a row count >= 1, got {test_size!r}",
            label,
            field="test_size",
        )
    fields = _Fields(prompt_field, chosen_field, rejected_field, responses_field, scores_field)
    readers = _open_source(source, split, test_split, dataset_config)

    cache_path = None
    if datasets.is_caching_enabled():
        root = (
            Path(cache_dir) if cache_dir is not None else Path(datasets.config.HF_DATASETS_CACHE) / "hf_dpo"
        )
        key = _hash(
            "preferences",
            _code_version(),
            {name: r.identity() for name, r in readers.items()},
            fields.__dict__,
            ranked_mode,
            test_size,
            seed,
            split,
            test_split,
        )
        cache_path = root / f"preferences-{key}"
        cached = _load_cached(cache_path)
        if cached is not None:
            result, stats = cached
            for s in stats.values():
                logger.info("%s (cached in %s)", s.summary(), cache_path)
            return (result, stats) if return_stats else result

    results: dict[str, list[_Row | str]] = {}
    for name, reader in readers.items():
        results[name] = []
        warned = 0
        for path, line_kind, line, value in reader.records():
            where = _Where(path, line_kind, line)
            row = _normalise(value, where, fields)
            if isinstance(row, str) and warned < _MAX_DROP_WARNINGS:
                warned += 1
                logger.warning(
                    "%s: dropping the row: %s%s",
                    where,
                    row,
                    " (further drops only counted)" if warned == _MAX_DROP_WARNINGS else "",
                )
            results[name].append(row)
    if test_size is not None:  # hold out kept rows only, so that a count is exact; drops stay with train
        everything = results["train"]
        kept = [i for i, row in enumerate(everything) if not isinstance(row, str)]
        held_out = {kept[j] for j in _split_indices(len(kept), test_size, seed, readers["train"].label)[1]}
        results = {
            "train": [row for i, row in enumerate(everything) if i not in held_out],
            "test": [everything[i] for i in sorted(held_out)],
        }

    splits, stats = {}, {}
    for name, rows in results.items():
        st = SplitStats(name, read=len(rows))
        out: list[_Row] = []
        for row in rows:
            if isinstance(row, str):
                st.dropped[row] = st.dropped.get(row, 0) + 1
                continue
            st.kept += 1
            out.extend(_expand_pairs(row) if ranked_mode == "pairs" else [row])
        st.rows = len(out)
        stats[name] = st
        if not out:  # an empty split is always a mistake: say so here, not as a crash in the trainer
            why = (
                f"all {st.read} rows were dropped ({st.dropped})" if st.read else "the source has no records"
            )
            label = readers[name].label if name in readers else readers["train"].label
            raise PreferenceDataError(f"split {name!r} has no preference rows: {why}", label)
        columns = {
            "prompt": [r.prompt for r in out],
            "completions": [r.completions for r in out],
            "source_line": [r.source_line for r in out],
            "messages_json": [r.messages_json for r in out],
        }
        splits[name] = datasets.Dataset.from_dict(columns, features=NORMALISED_FEATURES, split=name)
        logger.info(st.summary())
    result = datasets.DatasetDict(splits)
    if cache_path is not None:
        result = _store_cached(cache_path, result, stats)
    return (result, stats) if return_stats else result


_STATS_FILE = "hf_dpo_stats.json"


def _load_cached(path: Path) -> tuple[datasets.DatasetDict, dict[str, SplitStats]] | None:
    if not (path / _STATS_FILE).is_file():
        return None
    try:
        stats = {name: SplitStats(**s) for name, s in json.loads((path / _STATS_FILE).read_text()).items()}
        return datasets.load_from_disk(str(path)), stats
    except Exception as e:  # a damaged cache is rebuilt, never trusted
        logger.warning("ignoring unreadable cache %s: %s", path, e)
        return None


def _store_cached(
    path: Path, result: datasets.DatasetDict, stats: dict[str, SplitStats]
) -> datasets.DatasetDict:
    """Save, then move into place in one rename so concurrent processes never see half a cache entry."""
    tmp = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex}")
    bars_were_on = not datasets.utils.are_progress_bars_disabled()
    try:
        datasets.utils.disable_progress_bars()  # a cache write is not worth a progress bar per split
        result.save_to_disk(str(tmp))
        (tmp / _STATS_FILE).write_text(json.dumps({n: s.__dict__ for n, s in stats.items()}))
        try:
            os.rename(tmp, path)
        except OSError:  # another process stored the same entry first
            if not (path / _STATS_FILE).is_file():
                raise
        return datasets.load_from_disk(str(path))
    except OSError as e:
        logger.warning("could not cache preference data in %s (%s); keeping it in memory", path, e)
        return result
    finally:
        if bars_were_on:
            datasets.utils.enable_progress_bars()
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# Tokenisation.


def _tokenizer_identity(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        core = backend.to_str()
    else:
        from datasets.fingerprint import Hasher

        core = Hasher.hash(tokenizer)
    probe = tokenizer("hf_dpo probe: Hello, world!\n").input_ids  # catches Python-side special-token logic
    return _hash(
        type(tokenizer).__qualname__,
        core,
        getattr(tokenizer, "chat_template", None),
        tokenizer.bos_token,
        tokenizer.eos_token,
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        probe,
    )


def _render_conversation(messages_json: str, tokenizer, where: _Where) -> tuple[str, list[str], bool]:
    """Chat-template texts: (prompt, completions, add_special_tokens) for a conversational row."""
    data = json.loads(messages_json)
    try:
        prompt = tokenizer.apply_chat_template(data["prompt"], add_generation_prompt=True, tokenize=False)
    except Exception as e:  # no chat template, or a template that rejects the messages
        raise where.error("prompt", f"cannot render with the chat template: {type(e).__name__}: {e}") from e
    completions = []
    for key in ("chosen", "rejected"):
        try:
            full = tokenizer.apply_chat_template(data["prompt"] + data[key], tokenize=False)
        except Exception as e:
            raise where.error(key, f"cannot render with the chat template: {type(e).__name__}: {e}") from e
        if not full.startswith(prompt):
            raise where.error(
                key,
                "the rendered conversation does not start with the rendered prompt (chat template "
                "with add_generation_prompt=True is not a prefix of the full conversation)",
            )
        text = full[len(prompt) :]
        eos = tokenizer.eos_token
        if eos and text.rstrip().endswith(eos):  # the template's newline after EOS is not part of the answer
            text = text.rstrip()
        completions.append(text)
    add_special_tokens = not (tokenizer.bos_token and tokenizer.bos_token in prompt)
    return prompt, completions, add_special_tokens


def _truncate_left(ids: list[int], length: int) -> list[int]:
    """Keep the last `length` tokens (the contract, as in TRL: a leading BOS goes with the cut)."""
    if len(ids) <= length:
        return ids
    return ids[len(ids) - length :] if length > 0 else []


def _encode_all(tokenizer, texts: list[str], add_special: list[bool]) -> list[list[int]]:
    """Encode many texts in at most two batched calls (with and without the tokenizer's special tokens)."""
    out: list[list[int]] = [[] for _ in texts]
    for flag in (True, False):
        idx = [i for i, a in enumerate(add_special) if a is flag]
        if idx:
            encoded = tokenizer([texts[i] for i in idx], add_special_tokens=flag)["input_ids"]
            for i, ids in zip(idx, encoded):
                out[i] = list(ids)
    return out


def _tokenize_batch(
    batch: dict[str, list], tokenizer, max_length: int | None, max_prompt_length: int | None, split_name: str
) -> dict[str, list]:
    n = len(batch["prompt"])
    messages = batch.get("messages_json") or [""] * n
    prompts, completions, add_special = [], [], []
    for i in range(n):
        if messages[i]:
            where = _Where(f"<dataset split {split_name!r}>", "line", batch["source_line"][i])
            prompt, comps, add = _render_conversation(messages[i], tokenizer, where)
        else:
            prompt, comps, add = batch["prompt"][i], list(batch["completions"][i]), True
        prompts.append(prompt)
        completions.append(comps)
        add_special.append(add)

    # prompt_ids = tok(prompt); full_ids = tok(prompt + completion); completion = full minus prompt
    texts, flags = [], []
    for i in range(n):
        texts += [prompts[i]] + [prompts[i] + c for c in completions[i]]
        flags += [add_special[i]] * (1 + len(completions[i]))
    encoded = iter(_encode_all(tokenizer, texts, flags))
    prompt_ids, raw_completions = [], [[] for _ in range(n)]
    fallback: list[tuple[int, int, str]] = []
    for i in range(n):
        p = next(encoded)
        prompt_ids.append(p)
        for k, c in enumerate(completions[i]):
            full = next(encoded)
            if full[: len(p)] == p:
                raw_completions[i].append(full[len(p) :])
            else:  # BPE merged across the boundary: encode the completion on its own
                raw_completions[i].append(None)
                fallback.append((i, k, c))
    if fallback:
        encoded_fb = _encode_all(tokenizer, [c for _, _, c in fallback], [False] * len(fallback))
        for (i, k, _), ids in zip(fallback, encoded_fb):
            raw_completions[i][k] = ids

    eos_id = tokenizer.eos_token_id
    out: dict[str, list] = {name: [] for name in (*TOKENIZED_FEATURES, *_STATUS_FEATURES)}
    for i in range(n):
        p = prompt_ids[i]
        comps = [c if eos_id is None or (c and c[-1] == eos_id) else c + [eos_id] for c in raw_completions[i]]
        truncated = False
        if comps and max_length is not None and len(p) + max(map(len, comps)) > max_length:
            truncated = True
            if max_prompt_length is not None:
                p = _truncate_left(p, max_prompt_length)
            comps = [c[: max(max_length - len(p), 0)] for c in comps]
        if not comps:
            reason = DROP_NO_COMPLETIONS
        elif not p:
            reason = DROP_EMPTY_PROMPT
        elif not all(comps):
            reason = DROP_EMPTY_AFTER_TRUNCATION
        else:
            reason = ""
        out["prompt_input_ids"].append(p)
        out["completion_input_ids"].append(comps)
        out["source_line"].append(batch["source_line"][i])
        out["_truncated"].append(truncated)
        out["_drop_reason"].append(reason)
    return out


def _keep(reasons: list[str]) -> list[bool]:
    return [not r for r in reasons]


def _pairwise_name(loss_type) -> str:
    from .losses import accepts_ranked

    names = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    return next(name for name in names if not accepts_ranked(name))


def check_pairs_for_loss(
    dataset: datasets.Dataset,
    loss_type: str,
    source: str | os.PathLike = "<dataset>",
    line_kind: str = "line",
) -> None:
    """Raise PreferenceDataError, naming the first such row, if a pairwise loss meets a row with K > 2
    responses (ranked data). Works on normalised (`completions`) and tokenised (`completion_input_ids`) rows."""
    import pyarrow.compute as pc

    from .losses import accepts_ranked

    column = "completions" if "completions" in dataset.column_names else "completion_input_ids"
    if accepts_ranked(loss_type) or column not in dataset.column_names or len(dataset) == 0:
        return
    arrow = dataset.select_columns([column, "source_line"]).with_format("arrow")
    for batch in arrow.iter(batch_size=10_000):
        counts = pc.list_value_length(batch[column])
        if pc.max(counts).as_py() > 2:
            at = pc.index(pc.greater(counts, 2), True).as_py()
            raise PreferenceDataError(
                f"a ranked row with {counts[at].as_py()} responses, but loss_type={_pairwise_name(loss_type)!r} "
                "takes pairs: "
                "pass --loss_type plackett_luce, or --ranked_mode pairs to expand ranked rows into pairs",
                source,
                batch["source_line"][at].as_py(),
                "responses",
                line_kind,
            )


def tokenize_preference_dataset(
    dataset: datasets.Dataset,
    tokenizer,
    *,
    max_length: int | None = 1024,
    max_prompt_length: int | None = 512,
    num_proc: int | None = None,
    split_name: str = "train",
    return_stats: bool = False,
) -> datasets.Dataset | tuple[datasets.Dataset, SplitStats]:
    """Tokenise a normalised split into prompt_input_ids, completion_input_ids (K, best first), source_line.

    Follows DESIGN.md's tokenisation contract: EOS ends every completion once; over `max_length` the
    prompt is cut from the left to its last `max_prompt_length` tokens, then completions from
    the right; rows left with an empty completion are dropped and counted. Uses `Dataset.map`, so a
    file-backed dataset (e.g. from `load_preference_data`) is tokenised once and read from the
    `datasets` cache afterwards. With `return_stats`, also returns a SplitStats.
    """
    missing = {"prompt", "completions", "source_line"} - set(dataset.column_names)
    if missing:
        raise PreferenceDataError(
            f"not a normalised preference dataset: missing columns {sorted(missing)} "
            "(load it with load_preference_data)",
            f"<dataset split {split_name!r}>",
            field=sorted(missing)[0],
        )
    for name, value in (("max_length", max_length), ("max_prompt_length", max_prompt_length)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise PreferenceDataError(f"{name} must be a positive int or None, got {value!r}", field=name)

    if len(dataset) == 0:
        empty = datasets.Dataset.from_dict({k: [] for k in TOKENIZED_FEATURES}, features=TOKENIZED_FEATURES)
        return (empty, SplitStats(split_name)) if return_stats else empty
    fingerprint = _hash(
        "tokenize",
        _code_version(),
        dataset._fingerprint,
        _tokenizer_identity(tokenizer),
        max_length,
        max_prompt_length,
        split_name,
    )
    mapped = dataset.map(
        _tokenize_batch,
        batched=True,
        num_proc=num_proc,
        remove_columns=dataset.column_names,
        fn_kwargs={
            "tokenizer": tokenizer,
            "max_length": max_length,
            "max_prompt_length": max_prompt_length,
            "split_name": split_name,
        },
        features=datasets.Features({**TOKENIZED_FEATURES, **_STATUS_FEATURES}),
        new_fingerprint=fingerprint,
        desc=f"Tokenizing {split_name}",
    )
    reasons = Counter(r for r in mapped["_drop_reason"] if r)
    stats = SplitStats(
        split_name, read=len(dataset), truncated=int(sum(mapped["_truncated"])), dropped=dict(reasons)
    )
    if reasons:
        mapped = mapped.filter(
            _keep,
            input_columns="_drop_reason",
            batched=True,
            num_proc=num_proc,
            new_fingerprint=_hash(fingerprint, "filter"),
        )
    mapped = mapped.remove_columns(list(_STATUS_FEATURES))
    stats.kept = stats.rows = len(mapped)
    (logger.warning if reasons else logger.info)(stats.summary("tokenized"))
    return (mapped, stats) if return_stats else mapped
