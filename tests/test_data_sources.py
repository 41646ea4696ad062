"""hf_dpo.data.sources: every file type and source kind, exact line (JSON Lines) and row numbers, describe_rows."""

from __future__ import annotations

import importlib.util
import json
import pickle
import re

import datasets
import pytest
from data_helpers import EXPECTED, EXPLICIT, SEED_ROW, error_pattern, write_jsonl

from hf_dpo.data import (
    PreferenceDataError,
    bundled_data_path,
    describe_rows,
    load_preference_data,
    tokenize_preference_dataset,
)

BAD_THIRD = EXPLICIT[:2] + [{"prompt": "Q", "chosen": 1, "rejected": "x"}] + EXPLICIT[3:5]


def test_blank_lines_are_skipped_and_line_numbers_kept(tmp_path):
    path = tmp_path / "blank.jsonl"
    path.write_text(
        "\n" + json.dumps(SEED_ROW) + "\n   \n\n" + json.dumps(SEED_ROW) + "\n\n", encoding="utf-8"
    )
    train = load_preference_data(path)["train"]
    assert train["source_line"] == [2, 5]
    assert set(train["source_kind"]) == {"line"} and set(train["source_name"]) == {str(path)}


def test_json_array_object_and_json_lines(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(EXPLICIT))
    (tmp_path / "b.json").write_text(json.dumps({"data": EXPLICIT}))
    (tmp_path / "p.json").write_text(json.dumps({"data": EXPLICIT}, indent=2))  # pretty-printed
    write_jsonl(tmp_path / "c.json", EXPLICIT)
    for name, kind in (("a.json", "row"), ("b.json", "row"), ("p.json", "row"), ("c.json", "line")):
        train = load_preference_data(tmp_path / name)["train"]
        assert train["completions"] == EXPECTED and train["source_line"] == list(range(1, 11))
        assert set(train["source_kind"]) == {kind}
    (tmp_path / "bad.json").write_text(
        json.dumps(EXPLICIT[:1] + [{"prompt": "Q", "chosen": 1, "rejected": "x"}])
    )
    with pytest.raises(PreferenceDataError, match=error_pattern(tmp_path / "bad.json", 2, "chosen", "row")):
        load_preference_data(tmp_path / "bad.json")
    (tmp_path / "broken.json").write_text('[\n{"prompt": "Q",\n "chosen": }]')
    with pytest.raises(
        PreferenceDataError, match=error_pattern(tmp_path / "broken.json", 3, None) + ": invalid JSON"
    ):
        load_preference_data(tmp_path / "broken.json")


def test_json_file_holding_json_lines_reports_exact_lines(tmp_path):
    """A .json file of JSON Lines is read by hand: 1-based lines, blank lines counted, as for .jsonl."""
    path = tmp_path / "lines.json"
    path.write_text(
        "\n".join(["", json.dumps(EXPLICIT[0]), "", json.dumps(EXPLICIT[1]), ""]), encoding="utf-8"
    )
    assert load_preference_data(path)["train"]["source_line"] == [2, 4]
    path.write_text(
        "\n".join([json.dumps(EXPLICIT[0]), "", "", json.dumps({"prompt": "Q", "chosen": "a"})]),
        encoding="utf-8",
    )
    with pytest.raises(
        PreferenceDataError, match=error_pattern(path, 4, "rejected") + ": missing field"
    ) as info:
        load_preference_data(path)
    assert (info.value.line, info.value.line_kind) == (4, "line")
    path.write_text(json.dumps(EXPLICIT[0]) + "\n" + '{"prompt": "Q", "chosen": \n', encoding="utf-8")
    with pytest.raises(PreferenceDataError, match=error_pattern(path, 2, None) + ": invalid JSON"):
        load_preference_data(path)


def _third_record_is_bad(tmp_path):
    """The same five records, the third one bad, in every source that is not JSON Lines: {name: (source, reason)}."""
    (tmp_path / "a.json").write_text(json.dumps(BAD_THIRD))  # an int 'chosen' (JSON keeps it)
    typed = datasets.Dataset.from_list(
        [{**r, "chosen": None if r["chosen"] == 1 else r["chosen"]} for r in BAD_THIRD]
    )
    typed.to_csv(str(tmp_path / "d.csv"), index=False)  # an empty cell
    typed.to_parquet(str(tmp_path / "d.parquet"))
    typed.save_to_disk(str(tmp_path / "saved"))
    null = "field 'chosen' is null"
    return {
        str(tmp_path / "a.json"): (tmp_path / "a.json", "expected a string, got int"),
        str(tmp_path / "d.csv"): (tmp_path / "d.csv", null),
        str(tmp_path / "d.parquet"): (tmp_path / "d.parquet", null),
        str(tmp_path / "saved"): (tmp_path / "saved", null),
        "<train dataset>": (typed, null),
    }


def test_rows_of_other_sources_are_numbered_from_one(tmp_path):
    for name, (source, reason) in _third_record_is_bad(tmp_path).items():
        with pytest.raises(
            PreferenceDataError, match=error_pattern(name, 3, "chosen", "row") + ": " + reason
        ) as info:
            load_preference_data(source)
        assert (info.value.path, info.value.line, info.value.line_kind) == (name, 3, "row")
    good = datasets.Dataset.from_list(EXPLICIT)
    good.to_csv(str(tmp_path / "good.csv"), index=False)
    good.to_parquet(str(tmp_path / "good.parquet"))
    for source in (tmp_path / "good.csv", tmp_path / "good.parquet", good):
        train = load_preference_data(source)["train"]
        assert train["source_line"] == list(range(1, 11)) and set(train["source_kind"]) == {"row"}


def test_parquet_with_text_and_conversational_rows(tmp_path):
    datasets.Dataset.from_list(EXPLICIT).to_parquet(str(tmp_path / "d.parquet"))
    train = load_preference_data(tmp_path / "d.parquet")["train"]
    assert train["completions"] == EXPECTED and train["source_line"] == list(range(1, 11))
    user = {"role": "user", "content": "hi"}
    conv = [
        {
            "chosen": [user, {"role": "assistant", "content": f"a{i}"}],
            "rejected": [user, {"role": "assistant", "content": "b"}],
        }
        for i in range(3)
    ]
    datasets.Dataset.from_list(conv).to_parquet(str(tmp_path / "c.parquet"))
    train = load_preference_data(tmp_path / "c.parquet")["train"]
    assert [json.loads(m)["chosen"][0]["content"] for m in train["messages_json"]] == ["a0", "a1", "a2"]
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(
        PreferenceDataError, match=re.escape(str(tmp_path / "junk.parquet")) + ": cannot read as parquet"
    ):
        load_preference_data(tmp_path / "junk.parquet")


def test_csv_explicit_and_seed_formats(tmp_path):
    datasets.Dataset.from_list(EXPLICIT).to_csv(str(tmp_path / "d.csv"), index=False)
    train = load_preference_data(tmp_path / "d.csv")["train"]
    assert train["completions"] == EXPECTED and train["source_line"] == list(range(1, 11))
    (tmp_path / "seed.csv").write_text(
        'chose,rejected\n"Q: 1, 2? A: yes","Q: 1, 2? A: no"\nx,y\n', encoding="utf-8"
    )
    with pytest.raises(
        PreferenceDataError,
        match=error_pattern(tmp_path / "seed.csv", 2, "chose", "row") + ".*share no prefix",
    ):
        load_preference_data(tmp_path / "seed.csv")
    (tmp_path / "seed.csv").write_text(
        'chose,rejected\n"Q: 1, 2? A: yes","Q: 1, 2? A: no"\nx,\n', encoding="utf-8"
    )
    with pytest.raises(  # an empty CSV cell is a null value
        PreferenceDataError,
        match=error_pattern(tmp_path / "seed.csv", 2, "rejected", "row") + ": field 'rejected' is null",
    ):
        load_preference_data(tmp_path / "seed.csv")


def test_saved_dataset_dict_and_dataset_folders(tmp_path):
    full = datasets.Dataset.from_list(EXPLICIT)
    datasets.DatasetDict(
        {"train": full.select(range(7)), "validation": full.select(range(7, 10))}
    ).save_to_disk(str(tmp_path / "dict"))
    dd = load_preference_data(tmp_path / "dict", test_split="validation")
    assert dd["train"]["completions"] == EXPECTED[:7] and dd["test"]["completions"] == EXPECTED[7:]
    assert dd["test"]["source_line"] == [1, 2, 3]
    assert set(dd["test"]["source_name"]) == {f"{tmp_path / 'dict'} (validation)"}
    full.save_to_disk(str(tmp_path / "single"))
    assert load_preference_data(tmp_path / "single")["train"]["completions"] == EXPECTED
    with pytest.raises(
        PreferenceDataError, match=r"field 'test_split'.*no split 'test'.*\['train', 'validation'\]"
    ):
        load_preference_data(tmp_path / "dict", test_split="test")


def test_folder_of_data_files_and_in_memory_datasets(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", EXPLICIT[:6])
    write_jsonl(folder / "test.jsonl", EXPLICIT[6:])
    (folder / "README.md").write_text("# not data")
    dd = load_preference_data(folder, test_split="test")
    assert dd["train"]["completions"] == EXPECTED[:6] and dd["test"]["completions"] == EXPECTED[6:]
    write_jsonl(folder / "test.jsonl", [{"prompt": "Q", "chosen": "a"}])
    with pytest.raises(PreferenceDataError, match=error_pattern(folder / "test.jsonl", 1, "rejected")):
        load_preference_data(folder, test_split="test")
    in_mem = datasets.DatasetDict({"train": datasets.Dataset.from_list(EXPLICIT)})
    assert load_preference_data(in_mem)["train"]["completions"] == EXPECTED
    assert load_preference_data(in_mem["train"])["train"]["completions"] == EXPECTED


def test_a_split_of_several_files_of_several_types_names_each_file(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    write_jsonl(folder / "train-00000-of-00002.jsonl", EXPLICIT[:4])
    datasets.Dataset.from_list(EXPLICIT[4:]).to_parquet(str(folder / "train-00001-of-00002.parquet"))
    train = load_preference_data(folder)["train"]
    assert train["completions"] == EXPECTED and train["source_line"] == [1, 2, 3, 4, 1, 2, 3, 4, 5, 6]
    assert train["source_kind"] == ["line"] * 4 + ["row"] * 6
    first, second = folder / "train-00000-of-00002.jsonl", folder / "train-00001-of-00002.parquet"
    assert describe_rows(train, [2]) == f"{first} line 2; {second} row 2"
    write_jsonl(first, EXPLICIT[:1] + [{"prompt": "Q", "chosen": " a", "rejected": None}])
    with pytest.raises(
        PreferenceDataError, match=error_pattern(first, 2, "rejected") + ": field 'rejected' is null"
    ):
        load_preference_data(folder)


def test_dataset_id_goes_through_load_dataset(monkeypatch):
    calls = []

    def fake_load_dataset(name, config=None, **kwargs):
        calls.append((name, config))
        if name == "someone/missing":
            raise FileNotFoundError("Dataset 'someone/missing' doesn't exist on the Hub")
        return datasets.DatasetDict({"train_prefs": datasets.Dataset.from_list(EXPLICIT)})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    dd = load_preference_data("someone/prefs", split="train_prefs", dataset_config="default")
    assert calls == [("someone/prefs", "default")] and dd["train"]["completions"] == EXPECTED
    assert set(dd["train"]["source_name"]) == {"someone/prefs (train_prefs)"}
    with pytest.raises(PreferenceDataError, match=r"someone/missing: cannot load dataset: FileNotFoundError"):
        load_preference_data("someone/missing")


def test_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(SEED_ROW).encode() + b'\n{"chose": "caf\xe9 x", "rejected": "caf\xe9 y"}\n')
    with pytest.raises(PreferenceDataError, match=error_pattern(path, 2, None) + ": not valid UTF-8"):
        load_preference_data(path)


def test_missing_file_and_unsupported_source(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(PreferenceDataError, match=re.escape(str(missing)) + ": file not found"):
        load_preference_data(missing)
    with pytest.raises(PreferenceDataError, match="file not found"):
        load_preference_data(str(tmp_path / "sub" / "dir"))
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(PreferenceDataError, match="unsupported file type"):
        load_preference_data(tmp_path / "notes.txt")
    with pytest.raises(PreferenceDataError, match="expected a file"):
        load_preference_data(42)


def test_huge_and_deeply_nested_lines(tmp_path):
    huge = "word " * 400_000  # a 2 MB line
    path = write_jsonl(tmp_path / "huge.jsonl", [{"prompt": "P:", "chosen": huge, "rejected": " no"}])
    assert len(load_preference_data(path)["train"][0]["completions"][0]) == len(huge)
    deep = tmp_path / "deep.jsonl"
    deep.write_text('{"chose": ' + "[" * 200_000 + "\n", encoding="utf-8")
    with pytest.raises(PreferenceDataError, match=error_pattern(deep, 1, None) + ": invalid JSON"):
        load_preference_data(deep)
    bigint = tmp_path / "bigint.jsonl"
    bigint.write_text('{"prompt": "P", "responses": [" a", " b"], "scores": [' + "9" * 5000 + ", 1]}\n")
    try:  # Python's int-digit limit makes this invalid JSON; without it, an int score is fine
        load_preference_data(bigint)
    except PreferenceDataError as e:
        assert e.line == 1


def test_describe_rows_names_files_and_kinds_through_every_transform(tmp_path, tiny_tokenizer):
    a = write_jsonl(tmp_path / "a.jsonl", EXPLICIT)
    b = tmp_path / "b.csv"
    datasets.Dataset.from_list(EXPLICIT).to_csv(str(b), index=False)
    normalised = load_preference_data(a)["train"]
    assert describe_rows(normalised, [7, 3]) == f"{a} lines 3, 7"
    tokenized = tokenize_preference_dataset(normalised, tiny_tokenizer)
    assert describe_rows(tokenized, [3]) == f"{a} line 3"
    moved = tokenized.shuffle(seed=0).filter(lambda row: row["source_line"] != 5).select(range(4))
    assert describe_rows(moved, moved["source_line"][:2]) == f"{a} lines " + ", ".join(
        map(str, sorted(moved["source_line"][:2]))
    )
    both = datasets.concatenate_datasets([normalised, load_preference_data(b)["train"]])
    assert describe_rows(both, [4, 4, 9]) == f"{a} lines 4, 9; {b} rows 4, 9"
    in_memory = load_preference_data(datasets.Dataset.from_list(EXPLICIT))["train"]
    assert describe_rows(in_memory, [4, 9]) == "<train dataset> rows 4, 9"
    by_hand = datasets.Dataset.from_dict({"source_line": [1, 2]})
    assert describe_rows(by_hand, [2]) == "<dataset> row 2"


def test_bundled_file_loads_with_at_least_200_rows(tiny_tokenizer):
    dd, stats = load_preference_data(bundled_data_path(), return_stats=True)
    train = dd["train"]
    assert len(train) >= 200 and stats["train"].dropped == {}
    assert all(p.startswith("Question: ") and p.endswith("Answer:") for p in train["prompt"])
    assert all(c[0].startswith(" ") and c[1].startswith(" ") for c in train["completions"])
    assert all(c[0] != c[1] and c[0].strip() and c[1].strip() for c in train["completions"])
    tokenized = tokenize_preference_dataset(train, tiny_tokenizer)
    assert len(tokenized) == len(train)


def test_make_dpo_data_regenerates_the_bundled_file_exactly():
    spec = importlib.util.spec_from_file_location(
        "make_dpo_data", bundled_data_path().parent / "make_dpo_data.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    expected = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in module.build_rows())
    assert bundled_data_path().read_text(encoding="utf-8") == expected


def test_errors_survive_pickling_with_their_attributes():
    error = pickle.loads(pickle.dumps(PreferenceDataError("bad", "f.csv", 3, "chosen", "row")))
    assert (str(error), error.path, error.line, error.field, error.line_kind) == (
        "f.csv, row 3, field 'chosen': bad",
        "f.csv",
        3,
        "chosen",
        "row",
    )
