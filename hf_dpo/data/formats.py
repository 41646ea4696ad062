"""The four record formats (DESIGN.md, "Record formats") normalised into one schema by one batched map; then
rows without a preference are dropped and counted, the test split held out, and ranked rows paired on request."""

import itertools
import json
import logging
import math
import os
from collections import namedtuple
from dataclasses import dataclass, field

import datasets
import pyarrow.compute as pc

from .sources import SOURCE_FEATURES, PreferenceDataError, RawPart, parse_json, read_source

logger = logging.getLogger(__name__)

_TEXT = datasets.Value("string")
NORMALISED_FEATURES = datasets.Features(
    {"prompt": _TEXT, "completions": [_TEXT], "source_line": datasets.Value("int64"), "messages_json": _TEXT}
)
_EXTRA = {"_drop": _TEXT, "_scores": [datasets.Value("float64")]}  # why dropped ("" if kept); ranked scores
_MAP_FEATURES = datasets.Features({**NORMALISED_FEATURES, **SOURCE_FEATURES, **_EXTRA})
FORMAT_VERSION = "1"  # part of the cache key: bump it when normalised rows change
RANKED_MODES = ("plackett_luce", "pairs")
DROP_IDENTICAL = "chosen identical to rejected"
_RANKED_FIX = "pass --loss_type plackett_luce, or --ranked_mode pairs to expand ranked rows into pairs"
_MAX_DROP_WARNINGS = 10  # per split: the first few dropped rows are named, the rest only counted
Fields = namedtuple("Fields", "prompt chosen rejected responses scores")  # chosen None: "chosen" or "chose"


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
        reasons = " (" + ", ".join(f"{reason}: {n}" for reason, n in sorted(self.dropped.items())) + ")"
        line = f"{what} split {self.split!r}: read {self.read} rows, kept {self.kept}"
        line += f" (as {self.rows} rows)" * (self.rows != self.kept)
        line += f", truncated {self.truncated}" * (what == "tokenized")
        return line + f", dropped {sum(self.dropped.values())}" + reasons * bool(self.dropped)


class Where(namedtuple("Where", "name kind line")):
    """A row's place: "data.jsonl, line 3" or "<train dataset>, row 4"; `of(row)` reads a row's source columns."""

    @classmethod
    def of(cls, row: dict, name: str = "<dataset>", kind: str = "source_line") -> "Where":
        return cls(row.get("source_name", name), row.get("source_kind", kind), row.get("source_line"))

    def error(self, field: str | None, reason: str) -> PreferenceDataError:
        return PreferenceDataError(reason, self.name, self.line, field, self.kind)


def _expect(value, kind: type, what: str, field: str | None, where: Where):
    if not isinstance(value, kind):
        raise where.error(field, f"expected {what}, got {'null' if value is None else type(value).__name__}")
    return value


def _completion(text: str, prompt: str, field: str, where: Where) -> str:
    text = text.removeprefix(prompt)
    if not text.strip():
        raise where.error(field, "empty completion text")
    return text


def _messages(value, field: str, where: Where) -> list[dict[str, str]]:
    for i, message in enumerate(_expect(value, list, "a list of messages", field, where)):
        _expect(message, dict, "a message object", f"{field}[{i}]", where)
        for key in ("role", "content"):
            _expect(message.get(key), str, "a string", f"{field}[{i}].{key}", where)
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _normalise(value, where: Where, fields: Fields) -> tuple | str:
    """(prompt, completions best first, messages_json, scores), or why the record is dropped."""
    _expect(value, dict, "an object with fields", None, where)
    if value.get(fields.responses) is not None:
        return _ranked(value, where, fields)
    present = [k for k in ("chosen", "chose") if k in value] or ["chosen"]  # the seed wrote "chose"
    chosen_key = fields.chosen or next((k for k in present if value.get(k) is not None), present[0])
    for key in (chosen_key, fields.rejected):
        if key not in value:
            shown = ", ".join(repr(k[:40]) for k in sorted(value)[:20]) + ", ..." * (len(value) > 20)
            alias = " (or 'chose')" if key == "chosen" and fields.chosen is None else ""
            raise where.error(key, f"missing field {key!r}{alias}; the row has fields: [{shown}]")
        if value[key] is None:
            raise where.error(key, f"field {key!r} is null")
    chosen, rejected, prompt = value[chosen_key], value[fields.rejected], value.get(fields.prompt)
    if any(isinstance(v, list) for v in (chosen, rejected, prompt)):
        return _conversation(prompt, [(chosen_key, chosen), (fields.rejected, rejected)], where, fields)
    chosen = _expect(chosen, str, "a string", chosen_key, where)
    rejected = _expect(rejected, str, "a string", fields.rejected, where)
    if prompt is None:  # seed format: the prompt is the common start up to its last whitespace (as in TRL)
        if chosen == rejected:
            return DROP_IDENTICAL
        common = os.path.commonprefix([chosen, rejected])
        prompt = common[: max((i for i, char in enumerate(common) if char.isspace()), default=0)]
        if not prompt:
            reason = "share no prefix ending at whitespace, so there is no implicit prompt (add a 'prompt')"
            raise where.error(chosen_key, f"{chosen_key!r} and {fields.rejected!r} {reason}")
    prompt = _expect(prompt, str, "a string", fields.prompt, where)
    chosen = _completion(chosen, prompt, chosen_key, where)
    rejected = _completion(rejected, prompt, fields.rejected, where)
    return DROP_IDENTICAL if chosen == rejected else (prompt, [chosen, rejected], "", None)


def _conversation(prompt, sides: list, where: Where, fields: Fields) -> tuple | str:
    sides = [(key, _messages(value, key, where)) for key, value in sides]
    for key, msgs in sides:
        if not msgs:
            raise where.error(key, "empty completion: no messages")
        if msgs[-1]["role"] != "assistant":
            reason = f"the last message must be from the assistant, got role {msgs[-1]['role']!r}"
            raise where.error(f"{key}[{len(msgs) - 1}].role", reason)
    (chosen_key, first), (_, second) = sides
    if first == second:
        return DROP_IDENTICAL
    if prompt is None:  # the prompt is the shared leading messages; each side keeps at least one message
        pairs = list(zip(first[:-1], second[:-1]))
        prompt = first[: next((i for i, (a, b) in enumerate(pairs) if a != b), len(pairs))]
        if not prompt:
            reason = "share no leading prompt messages (add a 'prompt')"
            raise where.error(chosen_key, f"{chosen_key!r} and {fields.rejected!r} {reason}")
    elif isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    elif not (prompt := _messages(prompt, fields.prompt, where)):
        raise where.error(fields.prompt, "empty prompt: no messages")
    completions = [msgs[len(prompt) :] if msgs[: len(prompt)] == prompt else msgs for _, msgs in sides]
    for (key, _), msgs in zip(sides, completions):
        if not any(m["content"].strip() for m in msgs):
            raise where.error(key, "empty completion text")
    if completions[0] == completions[1]:
        return DROP_IDENTICAL
    messages = json.dumps({"prompt": prompt, "chosen": completions[0], "rejected": completions[1]})
    # prompt/completions hold readable text for inspection; tokenisation renders messages_json.
    return prompt[-1]["content"], ["\n".join(m["content"] for m in c) for c in completions], messages, None


def _ranked(value: dict, where: Where, fields: Fields) -> tuple | str:
    if value.get(fields.prompt) is None:
        raise where.error(fields.prompt, f"a ranked row (with {fields.responses!r}) needs a prompt")
    prompt = _expect(value[fields.prompt], str, "a string", fields.prompt, where)
    responses = _expect(value[fields.responses], list, "a list of strings", fields.responses, where)
    if len(responses) < 2:
        raise where.error(fields.responses, f"a ranked row needs at least 2 responses, got {len(responses)}")
    keys = [f"{fields.responses}[{i}]" for i in range(len(responses))]
    texts = [_expect(r, str, "a string", k, where) for k, r in zip(keys, responses)]
    texts = [_completion(text, prompt, k, where) for k, text in zip(keys, texts)]
    if (scores := value.get(fields.scores)) is not None:
        _expect(scores, list, "a list of numbers", fields.scores, where)
        if len(scores) != len(texts):
            reason = f"has {len(scores)} scores for {len(texts)} {fields.responses!r}; lengths must match"
            raise where.error(fields.scores, reason)
        for i, score in enumerate(scores):
            if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
                raise where.error(f"{fields.scores}[{i}]", f"expected a finite number, got {score!r:.40}")
        order = sorted(range(len(texts)), key=lambda i: -scores[i])  # stable: ties keep their order
        texts, scores = [texts[i] for i in order], [float(scores[i]) for i in order]
    kept = list(dict.fromkeys(texts))  # a duplicate response keeps its best rank
    scores = None if scores is None else [scores[texts.index(text)] for text in kept]
    if len(kept) < 2:
        return "fewer than 2 distinct responses"
    return "all scores tied" if scores and len(set(scores)) == 1 else (prompt, kept, "", scores)


def _normalise_batch(batch: dict, indices: list[int], name: str, kind: str, fields: Fields) -> dict:
    """The map: raw records (hand-read JSON lines, or a dataset's own columns) -> _MAP_FEATURES rows."""
    if kind == "line":  # rows of many lines (see LINE_FEATURES)
        lines, raws = [n for ns in batch["source_line"] for n in ns], [r for rs in batch["json"] for r in rs]
        records = (parse_json(raw, name, n) for raw, n in zip(raws, lines))
    else:  # rows are numbered from 1 as the dataset presents them
        lines, records = [i + 1 for i in indices], (dict(zip(batch, row)) for row in zip(*batch.values()))
    rows = [_normalise(record, Where(name, kind, line), fields) for record, line in zip(records, lines)]
    rows = [("", [], "", None, row) if isinstance(row, str) else (*row, "") for row in rows]
    out = dict(zip(("prompt", "completions", "messages_json", "_scores", "_drop"), map(list, zip(*rows))))
    return {**out, "source_line": lines, "source_name": [name] * len(rows), "source_kind": [kind] * len(rows)}


def _normalise_part(part: RawPart, fields: Fields) -> datasets.Dataset:
    dataset, kwargs = part.dataset, {"name": part.name, "kind": part.kind, "fields": fields}
    if not len(dataset):  # map would return a dataset without columns
        return datasets.Dataset.from_dict({key: [] for key in _MAP_FEATURES}, _MAP_FEATURES)
    key = datasets.fingerprint.Hasher.hash(("normalise", FORMAT_VERSION, dataset._fingerprint, kwargs))
    options = {"batched": True, "with_indices": True, "features": _MAP_FEATURES, "desc": "Normalising"}
    options.update(remove_columns=dataset.column_names, new_fingerprint=key)
    options["batch_size"] = 1 if part.kind == "line" else 1000  # a row of "line" parts holds 1000 lines
    return dataset.map(_normalise_batch, fn_kwargs=kwargs, **options)


def drop_marked(dataset: datasets.Dataset, num_proc: int | None = None) -> tuple[datasets.Dataset, dict]:
    """The rows a map did not mark in `_drop` (a reason), and the counts by reason; logs the first few."""
    drops = dataset.with_format("arrow")["_drop"]
    counts = {v["values"]: v["counts"] for v in pc.value_counts(drops).to_pylist() if v["values"]}
    for i, row in enumerate(dataset.select(pc.indices_nonzero(pc.not_equal(drops, ""))[:_MAX_DROP_WARNINGS])):
        more = " (further drops only counted)" if i == _MAX_DROP_WARNINGS - 1 else ""
        logger.warning("%s, %s %s: dropping the row: %s%s", *Where.of(row), row["_drop"], more)
    if counts:
        kwargs = {"input_columns": "_drop", "batched": True, "num_proc": num_proc}
        kept = datasets.fingerprint.Hasher.hash((dataset._fingerprint, "kept"))
        dataset = dataset.filter(lambda drops: [not d for d in drops], new_fingerprint=kept, **kwargs)
    return dataset.remove_columns("_drop"), counts


def _expand_pairs(batch: dict) -> dict:
    """All K(K-1)/2 (better, worse) pairs of each ranked row; pairs with equal scores carry no preference."""
    out: dict[str, list] = {key: [] for key in batch}
    for i, (texts, scores) in enumerate(zip(batch["completions"], batch["_scores"])):
        for a, b in itertools.combinations(range(len(texts)), 2):
            if scores is None or scores[a] != scores[b]:
                for key in batch:
                    out[key].append([texts[a], texts[b]] if key == "completions" else batch[key][i])
    return out


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
    """A file, folder, saved dataset, `datasets` id or in-memory dataset -> "train" and, with `test_split` (a
    source split) or `test_size` (a fraction or count of the kept rows, held out with `seed`), "test": prompt,
    completions (best first), messages_json and the source columns. `ranked_mode="pairs"` pairs ranked rows
    after the split; cached by `datasets` (under `cache_dir`); `return_stats`: also {split: SplitStats}."""
    label = str(source) if isinstance(source, (str, os.PathLike)) else f"<{type(source).__name__}>"
    if ranked_mode not in RANKED_MODES:
        reason = f"ranked_mode must be one of {RANKED_MODES}, got {ranked_mode!r}"
        raise PreferenceDataError(reason, label, field="ranked_mode")
    if test_split is not None and test_size is not None:
        raise PreferenceDataError("give test_split or test_size, not both", label, field="test_size")
    if isinstance(test_size, float) and test_size >= 1 and test_size.is_integer():
        test_size = int(test_size)  # a count given as a float, as a command line parses it (20.0)
    count = isinstance(test_size, int) and not isinstance(test_size, bool) and test_size >= 1
    fraction = isinstance(test_size, float) and 0 < test_size < 1
    if test_size is not None and not (count or fraction):
        reason = f"test_size must be a fraction in (0, 1) or a row count >= 1, got {test_size!r}"
        raise PreferenceDataError(reason, label, field="test_size")
    fields = Fields(prompt_field, chosen_field, rejected_field, responses_field, scores_field)
    splits, stats, names = {}, {}, {}
    for name, parts in read_source(source, split, test_split, dataset_config, cache_dir).items():
        normalised = [_normalise_part(part, fields) for part in parts]
        joined = normalised[0] if len(normalised) == 1 else datasets.concatenate_datasets(normalised)
        splits[name], dropped = drop_marked(joined)
        stats[name] = SplitStats(name, read=len(joined), kept=len(splits[name]), dropped=dropped)
        names[name] = parts[0].name if len(parts) == 1 else label
    if test_size is not None:
        train, st = splits["train"], stats["train"]
        n_test = math.ceil(test_size * st.kept - 1e-9) if fraction else test_size
        if not 0 < n_test < st.kept:
            reason = f"test_size={test_size!r} leaves no rows in train or test ({st.kept} rows to split)"
            raise PreferenceDataError(reason, names["train"], field="test_size")
        splits = train.train_test_split(test_size=n_test, seed=seed)
        stats["train"] = SplitStats("train", st.read - n_test, st.kept - n_test, dropped=st.dropped)
        stats["test"], names["test"] = SplitStats("test", n_test, n_test), names["train"]
    for name, dataset in splits.items():
        if ranked_mode == "pairs":
            key = datasets.fingerprint.Hasher.hash((dataset._fingerprint, "pairs"))
            dataset = dataset.map(_expand_pairs, batched=True, new_fingerprint=key, desc="Expanding pairs")
        st = stats[name]
        if not len(dataset):  # an empty split is always a mistake: say so here, not as a crash in the trainer
            why = f"all {st.read} rows were dropped ({st.dropped})" if st.read else "the source has no rows"
            if set(st.dropped) == {DROP_IDENTICAL}:
                why += ": in every pair, chosen is identical to rejected, so there is no preference to learn"
            raise PreferenceDataError(f"split {name!r} has no preference rows: {why}", names[name])
        splits[name], st.rows = dataset.remove_columns("_scores"), len(dataset)
        logger.info(st.summary())
    return (datasets.DatasetDict(splits), stats) if return_stats else datasets.DatasetDict(splits)


def check_pairs_for_loss(dataset: datasets.Dataset, loss_type: str | list[str], source=None, line_kind=None):
    """Raise PreferenceDataError naming the first row with K > 2 responses if `loss_type` needs pairs. Rows
    (normalised or tokenised) name their own source; `source`/`line_kind` name rows without source columns."""
    from ..losses import accepts_ranked

    col = "completions" if "completions" in dataset.column_names else "completion_input_ids"
    if accepts_ranked(loss_type) or col not in dataset.column_names:
        return
    # In batches, so that memory stays bounded on a filtered dataset.
    for n, batch in enumerate(dataset.select_columns([col]).with_format("arrow").iter(10_000)):
        counts = pc.list_value_length(batch[col])
        if pc.max(counts).as_py() > 2:
            row = dataset[n * 10_000 + pc.index(pc.greater(counts, 2), True).as_py()]
            names = [loss_type] if isinstance(loss_type, str) else loss_type
            pairwise = next(name for name in names if not accepts_ranked(name))
            reason = f"a ranked row with {len(row[col])} responses, but loss_type={pairwise!r} takes pairs"
            where = Where.of(row, source or "<dataset>", line_kind or "row")
            raise where.error("responses", f"{reason}: {_RANKED_FIX}")
