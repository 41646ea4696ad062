"""Reading preference data into raw `datasets.Dataset` parts, one per file or source split. JSON Lines is read
by hand into a cached Dataset, so that messages name the exact line (1-based, blank lines counted); the rest
goes through `datasets.load_dataset` / `load_from_disk`, and its rows are named "row N" (1-based)."""

import codecs
import itertools
import json
import os
import re
from collections import namedtuple
from pathlib import Path

import datasets
import pyarrow.compute as pc
from datasets.data_files import DataFilesDict, get_data_patterns

from ..resources import bundled_file

FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
RawPart = namedtuple("RawPart", "dataset name kind")  # kind "row": its own columns; "line": LINE_FEATURES
_BYTES, _LINE, _TEXT = datasets.Value("binary"), datasets.Value("int64"), datasets.Value("string")
LINE_FEATURES = datasets.Features({"json": [_BYTES], "source_line": [_LINE]})
# A row's origin, as plain columns: they survive map, filter, shuffle, save/load and concatenate_datasets.
SOURCE_FEATURES = datasets.Features({"source_line": _LINE, "source_name": _TEXT, "source_kind": _TEXT})


class PreferenceDataError(ValueError):
    """Bad preference data; the message names the source (`path`), `line` ("line" or "row") and `field`."""

    def __init__(self, reason: str, path=None, line: int | None = None, field=None, line_kind="line"):
        self.reason, self.path, self.line, self.field, self.line_kind = reason, path, line, field, line_kind
        self.path = None if path is None else str(path)
        where = [self.path or "<unknown source>"] + [f"{line_kind} {line}"] * (line is not None)
        super().__init__(", ".join(where + [f"field {field!r}"] * (field is not None)) + f": {reason}")

    def __reduce__(self):  # keeps the attributes when raised in a `datasets` worker process
        return (type(self), (self.reason, self.path, self.line, self.field, self.line_kind))


def bundled_data_path() -> Path:
    """The bundled sample data (seed format), data/dpo_data.jsonl."""
    return bundled_file("data/dpo_data.jsonl")


def _lines(path: str, stamp: str):
    """Rows of LINE_FEATURES from a JSON Lines file (`stamp`, its size and mtime, keys the `datasets` cache)."""
    with open(path, "rb") as handle:
        lines = ((n, raw.removeprefix(codecs.BOM_UTF8) if n == 1 else raw) for n, raw in enumerate(handle, 1))
        kept = ((n, raw) for n, raw in lines if raw.strip())
        while chunk := list(itertools.islice(kept, 1000)):
            yield {"json": [raw for _, raw in chunk], "source_line": [n for n, _ in chunk]}


def _innermost(error: BaseException) -> str:
    while error.__cause__ or error.__context__:
        error = error.__cause__ or error.__context__
    return f"{type(error).__name__}: {error}"


def _json_document_field(path: Path) -> str | None:
    """For a .json file: None if it holds JSON Lines, else the key holding its records ("" for an array)."""
    with path.open("rb") as handle:
        head = handle.read(4096).removeprefix(codecs.BOM_UTF8).decode("utf-8", "replace").lstrip()
        handle.seek(0)
        first = next((line for line in handle if line.strip()), b"").removeprefix(codecs.BOM_UTF8)
    if head.startswith("["):
        return ""
    try:
        one_line = json.loads(first)
    except (ValueError, RecursionError):
        one_line = None  # a pretty-printed document
    key = re.match(r'\{\s*("(?:[^"\\]|\\.)*")\s*:\s*\[', head)  # {"data": [...]}: one key holding the rows
    return None if key is None or (isinstance(one_line, dict) and len(one_line) > 1) else json.loads(key[1])


def parse_json(data: bytes, name: str, line: int | None = None):
    """JSON from a line of a JSON Lines file (`line`) or a whole document; errors name their line."""
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        at, reason = data.count(b"\n", 0, e.start) + 1, f"not valid UTF-8 ({e.reason} at byte {e.start}"
        reason += " of the line)" if line else ")"
    except json.JSONDecodeError as e:
        at, reason = e.lineno, f"invalid JSON at column {e.colno}: {e.msg}"
    except (ValueError, RecursionError) as e:  # e.g. integers over the digit limit, nesting too deep
        at, reason = None, f"invalid JSON: {type(e).__name__}: {e}"
    raise PreferenceDataError(reason, name, line or at) from None


def _file(path: Path, cache_dir: str | None) -> RawPart:
    suffix = path.suffix.lower()
    field = _json_document_field(path) if suffix == ".json" else None
    if suffix == ".jsonl" or (suffix == ".json" and field is None):  # JSON Lines, read by hand
        stamp = f"{path.stat().st_size}:{path.stat().st_mtime_ns}"
        options = {"gen_kwargs": {"path": str(path.resolve()), "stamp": stamp}, "writer_batch_size": 1}
        try:  # datasets wraps a failing generator (unreadable file, disk full) in its own error
            dataset = datasets.Dataset.from_generator(_lines, LINE_FEATURES, cache_dir, **options)
        except Exception as e:
            if any(True for _ in _lines(str(path), "")):
                raise PreferenceDataError(f"cannot read the file: {_innermost(e)}", path) from e
            dataset = datasets.Dataset.from_dict({"json": [], "source_line": []}, LINE_FEATURES)  # no lines
        return RawPart(dataset, str(path), "line")
    builder = FILE_BUILDERS[suffix]  # CSV: values beyond the header are dropped (a deep pandas index is slow)
    kwargs = {"field": field} if field else ({"index_col": False} if builder == "csv" else {})
    try:
        dataset = datasets.load_dataset(builder, data_files=str(path), cache_dir=cache_dir, **kwargs)["train"]
    except Exception as e:  # pyarrow, pandas and datasets raise many types: all are reported as one
        if builder == "json":  # name the line of a syntax error
            parse_json(path.read_bytes().removeprefix(codecs.BOM_UTF8), str(path))
        raise PreferenceDataError(f"cannot read as {builder}: {_innermost(e)}", path) from e
    return RawPart(dataset, str(path), "row")


def _folder(path: Path, cache_dir: str | None) -> dict:
    """A folder of data files, split as `datasets` infers it from the file names (train.jsonl, ...)."""
    try:
        files = DataFilesDict.from_patterns(get_data_patterns(str(path)), str(path))
    except Exception as e:  # datasets raises its own EmptyDatasetError and friends
        raise PreferenceDataError(f"no data files found: {_innermost(e)}", path) from e
    ours = {str(n): [Path(f) for f in sorted(names)] for n, names in files.items()}
    splits = {n: [p for p in paths if p.suffix.lower() in FILE_BUILDERS] for n, paths in ours.items()}
    if not any(splits.values()):
        raise PreferenceDataError(f"no {'/'.join(FILE_BUILDERS)} files in the folder", path)
    return {n: (lambda paths=ps: [_file(p, cache_dir) for p in paths]) for n, ps in splits.items() if ps}


def _splits(loaded, name: str | None, single: str) -> dict:
    """{split: () -> [RawPart]} for a Dataset (the split `single`) or a DatasetDict ("<name> (split)")."""
    if isinstance(loaded, datasets.Dataset):
        return {single: lambda: [RawPart(loaded, name or f"<{single} dataset>", "row")]}
    label = (lambda n: f"<{n} dataset>") if name is None else (lambda n: f"{name} ({n})")
    return {str(n): (lambda ds=ds, n=n: [RawPart(ds, label(n), "row")]) for n, ds in loaded.items()}


def read_source(source, split: str, test_split: str | None, dataset_config: str | None, cache_dir=None):
    """{"train": [RawPart, ...]} (and "test" when `test_split` is set); only the wanted splits are read."""
    path = Path(source).expanduser() if isinstance(source, (str, os.PathLike)) else None
    label = str(path) if path else f"<{type(source).__name__}>"
    hub_id = isinstance(source, str) and re.fullmatch(r"[^./~\\][^/\\]*(/[^/\\]+)?", source) is not None
    if isinstance(source, (datasets.Dataset, datasets.DatasetDict)):
        available = _splits(source, None, split)
    elif path is None:
        reason = f"expected a file, folder, dataset id or datasets.Dataset, got {type(source).__name__}"
        raise PreferenceDataError(reason, repr(source))
    elif path.is_file():
        if path.suffix.lower() not in FILE_BUILDERS:
            reason = f"unsupported file type {path.suffix!r}; use one of {tuple(FILE_BUILDERS)}"
            raise PreferenceDataError(reason, path)
        available = {split: lambda: [_file(path, cache_dir)]}
    elif (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        try:
            available = _splits(datasets.load_from_disk(str(path)), label, split)
        except Exception as e:  # corrupt folders raise many types; report them as data errors
            raise PreferenceDataError(f"cannot load the saved dataset: {_innermost(e)}", path) from e
    elif path.is_dir():
        available = _folder(path, cache_dir)
    elif hub_id and not source.lower().endswith(tuple(FILE_BUILDERS)):  # "name" or "owner/name"
        try:  # the user's cache and offline mode apply
            available, label = _splits(datasets.load_dataset(source, dataset_config), source, "train"), source
        except Exception as e:  # network, missing dataset, bad config: all reported as one error type
            raise PreferenceDataError(f"cannot load dataset: {type(e).__name__}: {e}", source) from e
    else:
        raise PreferenceDataError("file not found", path)
    wanted = {"train": split} if test_split is None else {"train": split, "test": test_split}
    for name, source_split in wanted.items():
        if source_split not in available:
            reason = f"no split {source_split!r}; the source has {sorted(available)}"
            raise PreferenceDataError(reason, label, field="test_split" if name == "test" else "split")
    return {name: available[source_split]() for name, source_split in wanted.items()}


def describe_rows(dataset: datasets.Dataset, source_lines) -> str:
    """Rows of a normalised or tokenised dataset by `source_line`: "data.jsonl lines 3, 7; x.csv row 4"."""
    lines, found = sorted({int(n) for n in source_lines}), {}
    if set(SOURCE_FEATURES) <= set(dataset.column_names):
        table = dataset.select_columns(list(SOURCE_FEATURES)).with_format("arrow")[:]
        for row in table.filter(pc.field("source_line").isin(lines)).to_pylist():
            found.setdefault((row["source_name"], row["source_kind"]), set()).add(row["source_line"])
    found = found or {("<dataset>", "row"): lines}  # rows built without source columns: their source_line
    numbers = {where: ", ".join(map(str, sorted(ns))) for where, ns in found.items()}
    return "; ".join(f"{name} {kind}{'s' * (',' in ns)} {ns}" for (name, kind), ns in numbers.items())
