"""hf_dpo.data.formats: the four record formats, drops and their counts, splits, ranked pairs, every error."""

from __future__ import annotations

import json
import logging

import datasets
import pytest
from data_helpers import EXPLICIT, SEED_ROW, error_pattern, load_rows, write_jsonl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hf_dpo.data import (
    PreferenceDataError,
    check_pairs_for_loss,
    load_preference_data,
    tokenize_preference_dataset,
)


def test_seed_format_accepts_chosen_and_cuts_prompt_back_to_whitespace(tmp_path):
    # The common prefix "... sum is 4" would split the answer; the prompt stops at the space, which
    # starts the completions.
    train = load_rows(
        tmp_path, [{"chosen": "Add 12 and 30: the sum is 42", "rejected": "Add 12 and 30: the sum is 41"}]
    )
    assert train[0]["prompt"] == "Add 12 and 30: the sum is"
    assert train[0]["completions"] == [" 42", " 41"]


def test_ranked_pairs_mode_expands_k3_into_three_ordered_pairs(tmp_path):
    rows = [{"prompt": "P:", "responses": [" b", " a", " c"], "scores": [2, 3, 1]}]
    train = load_rows(tmp_path, rows, ranked_mode="pairs")
    assert train["completions"] == [[" a", " b"], [" a", " c"], [" b", " c"]]
    assert train["prompt"] == ["P:"] * 3 and train["source_line"] == [1, 1, 1]


def test_ranked_ties_duplicates_and_stable_order(tmp_path):
    rows = [
        {"prompt": "P:", "responses": [" x", " y", " z"], "scores": [1, 1, 0]},  # tie keeps input order
        {"prompt": "P:", "responses": [" x", " x", " y"]},  # duplicate keeps its best rank
        {"prompt": "P:", "responses": [" x", " x"]},  # one distinct response: dropped
        {"prompt": "P:", "responses": [" x", " y"], "scores": [1.0, 1]},  # no preference: dropped
    ]
    path = write_jsonl(tmp_path / "ranked.jsonl", rows)
    dd, stats = load_preference_data(path, return_stats=True)
    assert dd["train"]["completions"] == [[" x", " y", " z"], [" x", " y"]]
    assert stats["train"].dropped == {"fewer than 2 distinct responses": 1, "all scores tied": 1}
    pairs = load_preference_data(path, ranked_mode="pairs")["train"]
    assert pairs["completions"] == [
        [" x", " z"],
        [" y", " z"],
        [" x", " y"],
    ]  # the tied (x, y) pair is skipped


def test_custom_field_names(tmp_path):
    rows = [{"question": "Q: 2+2?", "good": " 4", "bad": " 5", "chosen": "ignored"}]
    train = load_rows(tmp_path, rows, prompt_field="question", chosen_field="good", rejected_field="bad")
    assert train[0]["prompt"] == "Q: 2+2?" and train[0]["completions"] == [" 4", " 5"]
    ranked = [{"question": "Q:", "answers": [" a", " b"], "ratings": [0, 1]}]
    train = load_rows(
        tmp_path,
        ranked,
        "r.jsonl",
        prompt_field="question",
        responses_field="answers",
        scores_field="ratings",
    )
    assert train[0]["completions"] == [" b", " a"]


def test_identical_pairs_are_dropped_with_a_warning_and_counted(tmp_path, caplog):
    rows = [
        SEED_ROW,
        {"chose": "Question: x? Answer: same", "rejected": "Question: x? Answer: same"},
        {"prompt": "Q", "chosen": "Q yes", "rejected": " yes"},  # identical once the prompt is stripped
    ]
    path = write_jsonl(tmp_path / "dups.jsonl", rows)
    with caplog.at_level(logging.INFO, logger="hf_dpo.data"):
        dd, stats = load_preference_data(path, return_stats=True)
    assert len(dd["train"]) == 1 and dd["train"]["source_line"] == [1]
    assert stats["train"].read == 3 and stats["train"].kept == 1
    assert stats["train"].dropped == {"chosen identical to rejected": 2}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("line 2" in m and "identical" in m for m in warnings)
    assert any("line 3" in m for m in warnings)
    summary = [r.getMessage() for r in caplog.records if "read 3 rows" in r.getMessage()]
    assert summary == [
        "loaded split 'train': read 3 rows, kept 1, dropped 2 (chosen identical to rejected: 2)"
    ]


@pytest.mark.parametrize(
    ("lines", "line", "field", "reason"),
    [
        ([json.dumps(SEED_ROW), "", '{"chose": "a b", "rejected": '], 3, None, "invalid JSON"),
        ([json.dumps(SEED_ROW), "[1, 2]"], 2, None, "expected an object"),
        (
            [json.dumps({"prompt": "x", "answer": "y"})],
            1,
            "chosen",
            r"missing field 'chosen'.*'answer', 'prompt'",
        ),
        ([json.dumps({"prompt": "x", "chosen": "y"})], 1, "rejected", "missing field 'rejected'"),
        ([json.dumps({"chose": 3, "rejected": "a b"})], 1, "chose", "expected a string, got int"),
        (
            [json.dumps({"prompt": 3, "chosen": "a", "rejected": "b"})],
            1,
            "prompt",
            "expected a string, got int",
        ),
        ([json.dumps({"prompt": "Q", "chosen": "Q", "rejected": "x"})], 1, "chosen", "empty completion"),
        ([json.dumps({"prompt": "Q", "chosen": "a", "rejected": "  "})], 1, "rejected", "empty completion"),
        ([json.dumps({"chose": "Paris.", "rejected": "Rome."})], 1, "chose", "share no prefix"),
        ([json.dumps({"chose": "Q: Paris", "rejected": "Q: "})], 1, "rejected", "empty completion"),
        (
            [
                json.dumps(
                    {
                        "chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                        "rejected": [{"role": "user", "content": "a"}, {"role": "user", "content": "c"}],
                    }
                )
            ],
            1,
            "rejected[1].role",
            "last message must be from the assistant",
        ),  # fmt: skip
        (
            [
                json.dumps(
                    {
                        "chosen": [{"role": "assistant", "content": 5}],
                        "rejected": [{"role": "assistant", "content": "x"}],
                    }
                )
            ],
            1,
            "chosen[0].content",
            "expected a string",
        ),  # fmt: skip
        (
            [
                json.dumps(
                    {
                        "chosen": [{"role": "assistant", "content": "a"}],
                        "rejected": [{"role": "assistant", "content": "b"}],
                    }
                )
            ],
            1,
            "chosen",
            "share no leading prompt messages",
        ),  # fmt: skip
        (
            [json.dumps({"prompt": "P", "chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"})],
            1,
            "rejected",
            "expected a list of messages",
        ),
        ([json.dumps({"prompt": "P", "responses": [" only"]})], 1, "responses", "at least 2 responses"),
        ([json.dumps({"prompt": "P", "responses": " a b"})], 1, "responses", "expected a list"),
        ([json.dumps({"prompt": "P", "responses": [" a", 7]})], 1, "responses[1]", "expected a string"),
        (
            [json.dumps({"prompt": "P", "responses": [" a", " b"], "scores": [1]})],
            1,
            "scores",
            "lengths must match",
        ),
        (
            [json.dumps({"prompt": "P", "responses": [" a", " b"], "scores": [1, "x"]})],
            1,
            "scores[1]",
            "finite number",
        ),
        ([json.dumps({"responses": [" a", " b"]})], 1, "prompt", "needs a prompt"),
    ],
)
def test_bad_rows_raise_naming_file_line_and_field(tmp_path, lines, line, field, reason):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(PreferenceDataError, match=error_pattern(path, line, field) + ".*" + reason) as info:
        load_preference_data(path)
    assert (info.value.path, info.value.line, info.value.field) == (str(path), line, field)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
KEYS = st.sampled_from(["chose", "chosen", "rejected", "prompt", "responses", "scores", "role", "content"])
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system", 3]), "content": st.text(max_size=12)}
)
FIELD_VALUES = st.one_of(
    JSON_VALUES,
    st.text(max_size=30),
    st.lists(MESSAGE, max_size=3),
    st.lists(st.text(max_size=8), max_size=4),
)
SHORT = st.text(min_size=1, max_size=12)
# Rows near the valid formats, so that the fuzz also reaches normalisation and tokenisation.
NEAR_VALID = st.one_of(
    st.builds(lambda p, a, b: {"chose": f"{p} {a}", "rejected": f"{p} {b}"}, SHORT, SHORT, SHORT),
    st.fixed_dictionaries({"prompt": SHORT, "chosen": SHORT, "rejected": SHORT}),
    st.builds(
        lambda p, a, b: {
            "chosen": [*p, {"role": "assistant", "content": a}],
            "rejected": [*p, {"role": "assistant", "content": b}],
        },
        st.lists(MESSAGE, min_size=1, max_size=2),
        SHORT,
        SHORT,
    ),
    st.fixed_dictionaries(
        {"prompt": SHORT, "responses": st.lists(SHORT, max_size=4)},
        optional={"scores": st.lists(st.integers(-3, 3) | st.floats(allow_nan=True), max_size=4)},
    ),
)
ROWS = st.one_of(st.dictionaries(KEYS, FIELD_VALUES, max_size=5), NEAR_VALID, NEAR_VALID)
LINES = st.one_of(
    st.binary(max_size=200),
    st.lists(JSON_VALUES.map(json.dumps), max_size=4).map(lambda ls: "\n".join(ls).encode()),
    st.lists(ROWS.map(json.dumps), min_size=1, max_size=4).map(lambda ls: "\n".join(ls).encode()),
    st.lists(NEAR_VALID.map(json.dumps), min_size=1, max_size=4).map(lambda ls: "\n".join(ls).encode()),
    st.lists(ROWS.map(json.dumps), min_size=1, max_size=4).map(lambda ls: "\n".join(ls).encode("utf-16")),
)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(content=LINES, ranked_mode=st.sampled_from(["plackett_luce", "pairs"]))
def test_fuzz_loader_raises_only_preference_data_error(
    tmp_path_factory, tiny_tokenizer, content, ranked_mode
):
    path = tmp_path_factory.mktemp("fuzz") / "fuzz.jsonl"
    path.write_bytes(content)
    try:
        dd = load_preference_data(path, ranked_mode=ranked_mode)
    except PreferenceDataError as e:
        assert e.path == str(path)
        return
    tokenized = tokenize_preference_dataset(dd["train"], tiny_tokenizer, max_length=64, max_prompt_length=32)
    assert set(tokenized.column_names) == {
        "prompt_input_ids",
        "completion_input_ids",
        "source_line",
        "source_name",
        "source_kind",
    }


def test_test_size_fraction_and_count_are_seeded_and_disjoint(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", EXPLICIT)
    dd = load_preference_data(path, test_size=0.3, seed=1)
    assert (len(dd["train"]), len(dd["test"])) == (7, 3)
    assert sorted([*dd["train"]["source_line"], *dd["test"]["source_line"]]) == list(range(1, 11))
    assert (
        load_preference_data(path, test_size=0.3, seed=1)["test"]["source_line"] == dd["test"]["source_line"]
    )
    assert (
        load_preference_data(path, test_size=0.3, seed=2)["test"]["source_line"] != dd["test"]["source_line"]
    )
    assert len(load_preference_data(path, test_size=4)["test"]) == 4
    assert len(load_preference_data(path, test_size=4.0)["test"]) == 4  # a count parsed from the command line
    with_drops = write_jsonl(
        tmp_path / "drops.jsonl", EXPLICIT + [{"prompt": "P", "chosen": " a", "rejected": " a"}] * 2
    )
    dd, stats = load_preference_data(with_drops, test_size=4, return_stats=True)
    assert (len(dd["train"]), len(dd["test"])) == (6, 4)  # held out from kept rows: the count is exact
    assert (stats["train"].read, stats["train"].kept, stats["train"].dropped) == (
        8,
        6,
        {"chosen identical to rejected": 2},
    )
    assert (stats["test"].read, stats["test"].kept) == (4, 4)
    for bad in (0.0, 1.5, 0, 10, True, "0.1"):
        with pytest.raises(PreferenceDataError, match="test_size"):
            load_preference_data(path, test_size=bad)
    with pytest.raises(PreferenceDataError, match="not both"):
        load_preference_data(path, test_size=0.5, test_split="test")


def test_pairs_of_one_prompt_stay_in_one_split(tmp_path):
    rows = [{"prompt": f"P{i}:", "responses": [" a", " b", " c"]} for i in range(8)]
    dd = load_preference_data(write_jsonl(tmp_path / "r.jsonl", rows), ranked_mode="pairs", test_size=0.25)
    assert (len(dd["train"]), len(dd["test"])) == (18, 6)
    assert not set(dd["train"]["prompt"]) & set(dd["test"]["prompt"])


def test_empty_inputs(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(
        PreferenceDataError, match=r"empty\.jsonl: split 'train' has no preference rows: the source has no"
    ):
        load_preference_data(tmp_path / "empty.jsonl")
    write_jsonl(tmp_path / "dups.jsonl", [{"prompt": "P", "chosen": " a", "rejected": " a"}])
    with pytest.raises(PreferenceDataError, match="all 1 rows were dropped"):
        load_preference_data(tmp_path / "dups.jsonl")


def test_a_split_where_every_pair_is_identical_is_refused_saying_so(tmp_path):
    rows = [{"prompt": "P", "chosen": " a", "rejected": " a"}, {"chose": "Q: yes", "rejected": "Q: yes"}]
    path = write_jsonl(tmp_path / "same.jsonl", rows)
    with pytest.raises(
        PreferenceDataError,
        match=r"same\.jsonl: split 'train' has no preference rows: all 2 rows were dropped .*"
        "in every pair, chosen is identical to rejected",
    ):
        load_preference_data(path)
    mixed = write_jsonl(tmp_path / "mixed.jsonl", rows + [{"prompt": "P", "responses": [" x", " x"]}])
    with pytest.raises(PreferenceDataError, match="all 3 rows were dropped") as info:
        load_preference_data(mixed)
    assert "every pair" not in str(info.value)  # one row was dropped for another reason


def test_a_null_field_is_named_as_null_not_missing(tmp_path):
    for row, field in (
        ({"prompt": "x", "chosen": None, "rejected": "y"}, "chosen"),
        ({"prompt": "x", "chosen": "y", "rejected": None}, "rejected"),
        ({"chose": None, "rejected": "Q: y"}, "chose"),
        ({"prompt": "x", "good": None, "rejected": "y"}, "good"),
    ):
        path = write_jsonl(
            tmp_path / "null.jsonl", [{"prompt": "p", "chosen": " a", "good": " a", "rejected": " b"}, row]
        )
        with pytest.raises(PreferenceDataError) as info:
            load_preference_data(path, chosen_field="good" if field == "good" else None)
        assert str(info.value) == f"{path}, line 2, field {field!r}: field {field!r} is null"


def test_pairwise_losses_refuse_ranked_rows_naming_the_row(tmp_path, tiny_tokenizer):
    rows = [EXPLICIT[0], {"prompt": "P:", "responses": [" a", " b", " c"]}]
    path = write_jsonl(tmp_path / "ranked.jsonl", rows)
    train = load_preference_data(path)["train"]
    fixes = "pass --loss_type plackett_luce, or --ranked_mode pairs"
    expected = (
        error_pattern(path, 2, "responses") + ": a ranked row with 3 responses, but loss_type='sigmoid'"
    )
    for rows_of_some_kind in (train, tokenize_preference_dataset(train, tiny_tokenizer)):
        with pytest.raises(PreferenceDataError, match=expected + ".*" + fixes) as info:
            check_pairs_for_loss(
                rows_of_some_kind, "sigmoid", "ignored.jsonl", "row"
            )  # the rows name themselves
        assert (info.value.path, info.value.line, info.value.line_kind) == (str(path), 2, "line")
    with pytest.raises(PreferenceDataError, match=r"loss_type='sigmoid' takes pairs"):
        check_pairs_for_loss(train, ["sigmoid", "plackett_luce"])
    check_pairs_for_loss(train, "plackett_luce")
    check_pairs_for_loss(train, ["plackett_luce"])
    check_pairs_for_loss(load_preference_data(path, ranked_mode="pairs")["train"], "sigmoid")
    typed = [{"responses": None, **rows[0]}, {"chosen": None, "rejected": None, **rows[1]}]  # one schema
    in_memory = load_preference_data(datasets.Dataset.from_list(typed))["train"]
    with pytest.raises(PreferenceDataError, match=r"<train dataset>, row 2, field 'responses'"):
        check_pairs_for_loss(in_memory, "ipo")
    by_hand = datasets.Dataset.from_dict(
        {"completion_input_ids": [[[1], [2]], [[1], [2], [3]]], "source_line": [4, 9]}
    )
    with pytest.raises(PreferenceDataError, match=r"<eval dataset>, source_line 9, field 'responses'"):
        check_pairs_for_loss(by_hand, "hinge", "<eval dataset>", "source_line")


def test_cached_normalisation_is_reused_and_tracks_the_options(tmp_path):
    """Normalised rows come from the `datasets` cache the second time, and other options miss it."""
    path = write_jsonl(tmp_path / "d.jsonl", EXPLICIT)
    first = load_preference_data(path, cache_dir=tmp_path / "cache")["train"]
    again = load_preference_data(path, cache_dir=tmp_path / "cache")["train"]
    assert again.cache_files == first.cache_files and again._fingerprint == first._fingerprint
    renamed = load_preference_data(path, cache_dir=tmp_path / "cache", responses_field="answers")["train"]
    assert renamed._fingerprint != first._fingerprint
