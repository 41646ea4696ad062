"""Data tests: every record format, every file type, the tokenisation contract, every error.

Golden token sequences are written as the tiny tokenizer's token strings ("Ġ" is a space) and compared as
ids through the vocabulary, so they are exact and still readable.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import pickle
import re
from pathlib import Path

import datasets
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hf_dpo import data as data_module
from hf_dpo.collator import PreferenceCollator
from hf_dpo.data import (
    NORMALISED_FEATURES,
    PreferenceDataError,
    bundled_data_path,
    load_preference_data,
    tokenize_preference_dataset,
)

BOS, EOS = 1, 2


@pytest.fixture(scope="module", autouse=True)
def _datasets_cache(tmp_path_factory):
    """Keep everything these tests cache (loader output, tokenised maps) out of the user's cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf_datasets_cache")))
        yield


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
    """A normalised split built directly (no loader): prompt/completions text rows."""
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


# ----------------------------------------------------------------------------------------------------
# Formats: normalisation and golden token ids.

SEED_ROW = {
    "chose": "Question: What is 2+2? Answer: 4",
    "rejected": "Question: What is 2+2? Answer: I am not sure.",
}
PROMPT_TOKENS = ["<s>", "Question", ":", "ĠWhat", "Ġis", "Ġ2", "+", "2", "?", "ĠAnswer", ":"]


def test_seed_format_implicit_prompt_and_golden_ids(tmp_path, tiny_tokenizer):
    train = load_rows(tmp_path, [SEED_ROW])
    assert train[0] == {
        "prompt": "Question: What is 2+2? Answer:",
        "completions": [" 4", " I am not sure."],
        "source_line": 1,
        "messages_json": "",
    }
    row = tokenize_preference_dataset(train, tiny_tokenizer)[0]
    assert row["prompt_input_ids"] == ids(tiny_tokenizer, PROMPT_TOKENS)
    # the space starts the completion, so the completion ids are those of the full text (no boundary merge)
    full = tiny_tokenizer("Question: What is 2+2? Answer: I am not sure.").input_ids
    assert row["completion_input_ids"][1] == full[len(PROMPT_TOKENS) :] + [EOS]
    assert tiny_tokenizer.convert_ids_to_tokens(row["completion_input_ids"][1])[0] == "ĠI"
    assert row["completion_input_ids"][0] == tiny_tokenizer("Question: What is 2+2? Answer: 4").input_ids[
        len(PROMPT_TOKENS) :
    ] + [EOS]
    assert row["source_line"] == 1


def test_seed_format_accepts_chosen_and_cuts_prompt_back_to_whitespace(tmp_path):
    # The common prefix "... sum is 4" would split the answer; the prompt stops at the space, which
    # starts the completions.
    train = load_rows(
        tmp_path, [{"chosen": "Add 12 and 30: the sum is 42", "rejected": "Add 12 and 30: the sum is 41"}]
    )
    assert train[0]["prompt"] == "Add 12 and 30: the sum is"
    assert train[0]["completions"] == [" 42", " 41"]


def test_boundary_merge_uses_the_fallback_encoding(tmp_path, tiny_tokenizer):
    """'...Answer: ' + 'I' tokenises as 'ĠI' together: full ids do not start with the prompt's ids."""
    prompt, completion = "Question: What is 2+2? Answer: ", "I am not sure."
    prompt_ids = tiny_tokenizer(prompt).input_ids
    full_ids = tiny_tokenizer(prompt + completion).input_ids
    assert full_ids[: len(prompt_ids)] != prompt_ids  # the merge is real: the fallback path must be taken
    assert tiny_tokenizer.convert_ids_to_tokens(full_ids)[len(prompt_ids) - 1] == "ĠI"
    # ...while "4" does not merge with the space: that completion takes the direct path.
    assert tiny_tokenizer(prompt + "4").input_ids[: len(prompt_ids)] == prompt_ids

    explicit = {"prompt": prompt, "chosen": "4", "rejected": completion}
    row = tokenize_preference_dataset(load_rows(tmp_path, [explicit]), tiny_tokenizer)[0]
    fallback = tiny_tokenizer(completion, add_special_tokens=False).input_ids + [EOS]
    assert row["completion_input_ids"][1] == fallback
    assert row["completion_input_ids"][0] == tiny_tokenizer(prompt + "4").input_ids[len(prompt_ids) :] + [EOS]


def test_explicit_format_strips_a_repeated_prompt_once(tmp_path, tiny_tokenizer):
    rows = [
        {
            "prompt": "Translate hello into Spanish:",
            "chosen": "Translate hello into Spanish: hola",
            "rejected": " merci",
        }
    ]
    train = load_rows(tmp_path, rows)
    assert train[0]["prompt"] == "Translate hello into Spanish:"
    assert train[0]["completions"] == [" hola", " merci"]
    row = tokenize_preference_dataset(train, tiny_tokenizer)[0]
    assert row["prompt_input_ids"] == ids(
        tiny_tokenizer, ["<s>", "Translate", "Ġhel", "lo", "Ġinto", "ĠS", "pan", "ish", ":"]
    )
    assert row["completion_input_ids"] == [
        ids(tiny_tokenizer, ["Ġho", "la", "</s>"]),
        ids(tiny_tokenizer, ["Ġm", "erci", "</s>"]),
    ]


def test_conversational_format_renders_with_the_chat_template(tmp_path, tiny_tokenizer):
    user = {"role": "user", "content": "Sort 3, 1, 2."}
    rows = [
        {
            "chosen": [user, {"role": "assistant", "content": "1, 2, 3"}],
            "rejected": [user, {"role": "assistant", "content": "I am not sure."}],
        }
    ]
    train = load_rows(tmp_path, rows)
    assert json.loads(train[0]["messages_json"]) == {
        "prompt": [user],
        "chosen": [{"role": "assistant", "content": "1, 2, 3"}],
        "rejected": [{"role": "assistant", "content": "I am not sure."}],
    }
    row = tokenize_preference_dataset(train, tiny_tokenizer)[0]
    # "<s><|user|>\nSort 3, 1, 2.\n<|assistant|>\n": the template's BOS only, not a second one.
    assert row["prompt_input_ids"] == ids(
        tiny_tokenizer,
        ["<s>", "<", "|", "user", "|", ">", "Ċ", "Sort", "Ġ3", ",", "Ġ1", ",", "Ġ2", ".", "Ċ"]
        + ["<", "|", "a", "ssistant", "|", ">", "Ċ"],
    )
    assert row["prompt_input_ids"].count(BOS) == 1
    # The template writes "1, 2, 3</s>\n": the completion ends at its EOS (one EOS, no trailing newline).
    assert row["completion_input_ids"] == [
        ids(tiny_tokenizer, ["1", ",", "Ġ2", ",", "Ġ3", "</s>"]),
        ids(tiny_tokenizer, ["I", "Ġam", "Ġnot", "Ġsure", ".", "</s>"]),
    ]


def test_conversational_explicit_prompt_and_multi_turn(tmp_path, tiny_tokenizer):
    turns = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "Add 12 and 30"},
    ]
    rows = [
        {  # chosen repeats the prompt (stripped once), rejected does not
            "prompt": turns,
            "chosen": turns + [{"role": "assistant", "content": "42"}],
            "rejected": [{"role": "assistant", "content": "41"}],
        },
        {  # no prompt: the shared leading messages are the prompt
            "chosen": turns + [{"role": "assistant", "content": "42"}],
            "rejected": turns + [{"role": "assistant", "content": "41"}],
        },
        {
            "prompt": "Add 12 and 30",
            "chosen": [{"role": "assistant", "content": "42"}],
            "rejected": [{"role": "assistant", "content": "41"}],
        },
    ]
    train = load_rows(tmp_path, rows)
    first, second, third = (json.loads(m) for m in train["messages_json"])
    assert first == second
    assert first["prompt"] == turns and first["chosen"] == [{"role": "assistant", "content": "42"}]
    assert third["prompt"] == [{"role": "user", "content": "Add 12 and 30"}]
    tokenized = tokenize_preference_dataset(train, tiny_tokenizer)
    rendered_prompt = tiny_tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
    assert (
        tokenized[0]["prompt_input_ids"]
        == tiny_tokenizer(rendered_prompt, add_special_tokens=False).input_ids
    )
    assert tokenized[0] == {**tokenized[1], "source_line": 1}
    assert tiny_tokenizer.decode(tokenized[0]["completion_input_ids"][0]) == "42</s>"


def test_ranked_rows_sorted_by_score_and_kept_whole(tmp_path, tiny_tokenizer):
    rows = [
        {"prompt": "Add 12 and 30:", "responses": [" 41", " 42", " 40"], "scores": [0.5, 2, -1]},
        {"prompt": "Add 1 and 1:", "responses": [" 2", " 3", " 11"]},  # already best first
    ]
    train = load_rows(tmp_path, rows)
    assert train["completions"] == [[" 42", " 41", " 40"], [" 2", " 3", " 11"]]
    row = tokenize_preference_dataset(train, tiny_tokenizer)[0]
    assert row["prompt_input_ids"] == ids(
        tiny_tokenizer, ["<s>", "A", "dd", "Ġ1", "2", "Ġand", "Ġ3", "0", ":"]
    )
    assert row["completion_input_ids"] == [
        ids(tiny_tokenizer, ["Ġ42", "</s>"]),
        ids(tiny_tokenizer, ["Ġ", "4", "1", "</s>"]),
        ids(tiny_tokenizer, ["Ġ", "4", "0", "</s>"]),
    ]


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


def test_eos_already_in_the_completion_is_not_doubled(tmp_path, tiny_tokenizer):
    rows = [{"prompt": "Add 12 and 30:", "chosen": " 42</s>", "rejected": " 41"}]
    row = tokenize_preference_dataset(load_rows(tmp_path, rows), tiny_tokenizer)[0]
    assert row["completion_input_ids"] == [
        ids(tiny_tokenizer, ["Ġ42", "</s>"]),
        ids(tiny_tokenizer, ["Ġ", "4", "1", "</s>"]),
    ]


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


def test_blank_lines_are_skipped_and_line_numbers_kept(tmp_path):
    path = tmp_path / "blank.jsonl"
    path.write_text(
        "\n" + json.dumps(SEED_ROW) + "\n   \n\n" + json.dumps(SEED_ROW) + "\n\n", encoding="utf-8"
    )
    assert load_preference_data(path)["train"]["source_line"] == [2, 5]


# ----------------------------------------------------------------------------------------------------
# Errors: one exception type, naming file, line and field.


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
    assert set(tokenized.column_names) == {"prompt_input_ids", "completion_input_ids", "source_line"}


def test_chat_template_that_is_not_a_prefix_raises_naming_the_row(tmp_path, tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}[assistant]...{% endif %}"
    )
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    rows = [
        SEED_ROW,
        {"chosen": conversation, "rejected": conversation[:1] + [{"role": "assistant", "content": "no"}]},
    ]
    train = load_rows(tmp_path, rows)
    with pytest.raises(
        PreferenceDataError, match=error_pattern("<dataset split 'train'>", 2, "chosen") + ".*does not start"
    ):
        tokenize_preference_dataset(train, tok)


# ----------------------------------------------------------------------------------------------------
# Truncation.


def test_prompt_cut_from_the_left_then_completions_from_the_right(tiny_tokenizer):
    prompt = "Question: What is 2+2? Answer:"  # <s> Question : ĠWhat Ġis Ġ2 + 2 ? ĠAnswer : (11 tokens)
    dataset = in_memory([{"prompt": prompt, "completions": [" hola hola", " no"]}])
    row = tokenize_preference_dataset(dataset, tiny_tokenizer, max_length=8, max_prompt_length=5)[0]
    # the last 5 prompt tokens: the BOS at the far left is cut with the rest
    assert row["prompt_input_ids"] == ids(tiny_tokenizer, ["+", "2", "?", "ĠAnswer", ":"])
    assert row["prompt_input_ids"] == tiny_tokenizer(prompt).input_ids[-5:]
    full = tokenize_preference_dataset(dataset, tiny_tokenizer, max_length=None)[0]["completion_input_ids"]
    assert full[0] == ids(tiny_tokenizer, ["Ġho", "la", "Ġho", "la", "</s>"])
    assert row["completion_input_ids"] == [full[0][:3], full[1]]  # 8 - 5 = 3 tokens; EOS cut off the first


def test_no_truncation_when_the_row_fits_even_with_a_long_prompt(tiny_tokenizer):
    dataset = in_memory([{"prompt": "Question: What is 2+2? Answer:", "completions": [" 4", " 5"]}])
    untouched = tokenize_preference_dataset(dataset, tiny_tokenizer, max_length=None)[0]
    row, stats = tokenize_preference_dataset(
        dataset, tiny_tokenizer, max_length=16, max_prompt_length=4, return_stats=True
    )
    assert row[0] == untouched and stats.truncated == 0


def test_rows_left_with_an_empty_completion_are_dropped_and_counted(tiny_tokenizer, caplog):
    dataset = in_memory(
        [
            {"prompt": "Question: What is 2+2? Answer:", "completions": [" 4", " 5"]},  # 11-token prompt
            {"prompt": "Hi", "completions": [" 4", " 5"]},
        ]
    )
    with caplog.at_level(logging.INFO, logger="hf_dpo.data"):
        out, stats = tokenize_preference_dataset(
            dataset, tiny_tokenizer, max_length=10, max_prompt_length=None, return_stats=True
        )
    assert out["source_line"] == [2]
    assert (stats.read, stats.kept, stats.truncated) == (2, 1, 1)
    assert stats.dropped == {"completion empty after truncation": 1}
    assert (
        "tokenized split 'train': read 2 rows, kept 1, truncated 1, dropped 1 (completion empty after truncation: 1)"
        in caplog.text
    )


# ----------------------------------------------------------------------------------------------------
# Property: the completion mask covers exactly the completion tokens.

TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=40)


@settings(max_examples=40, deadline=None)
@given(rows=st.lists(st.tuples(TEXT, TEXT.filter(str.strip), TEXT.filter(str.strip)), min_size=1, max_size=4))
def test_completion_mask_covers_exactly_the_completion(tiny_tokenizer, rows):
    dataset = in_memory([{"prompt": p, "completions": [c, r]} for p, c, r in rows])
    tokenized = tokenize_preference_dataset(dataset, tiny_tokenizer, max_length=None)
    features = list(tokenized)
    batch = PreferenceCollator(pad_token_id=0)(features)
    batch_size = len(rows)
    for k in range(2):
        for b, (prompt, *completions) in enumerate(rows):
            seq, mask = batch["input_ids"][k * batch_size + b], batch["completion_mask"][k * batch_size + b]
            completion_ids = seq[mask.bool()].tolist()
            assert completion_ids == features[b]["completion_input_ids"][k]
            assert completion_ids[-1] == EOS and completion_ids.count(EOS) >= 1
            expected = completions[k] if completions[k].endswith("</s>") else completions[k] + "</s>"
            assert tiny_tokenizer.decode(completion_ids) == expected
            n_prompt = len(features[b]["prompt_input_ids"])
            assert mask[:n_prompt].sum() == 0 and tiny_tokenizer.decode(seq[:n_prompt]) == "<s>" + prompt


# ----------------------------------------------------------------------------------------------------
# Sources: file types, folders, saved datasets, dataset ids, splits.

EXPLICIT = [{"prompt": f"Q{i}:", "chosen": f" right {i}", "rejected": f" wrong {i}"} for i in range(10)]
EXPECTED = [[f" right {i}", f" wrong {i}"] for i in range(10)]


def test_json_array_object_and_json_lines(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(EXPLICIT))
    (tmp_path / "b.json").write_text(json.dumps({"data": EXPLICIT}))
    write_jsonl(tmp_path / "c.json", EXPLICIT)
    for name, first_line in (("a.json", 0), ("b.json", 0), ("c.json", 1)):
        train = load_preference_data(tmp_path / name)["train"]
        assert train["completions"] == EXPECTED and train["source_line"][0] == first_line
    (tmp_path / "bad.json").write_text(
        json.dumps(EXPLICIT[:1] + [{"prompt": "Q", "chosen": 1, "rejected": "x"}])
    )
    with pytest.raises(PreferenceDataError, match=error_pattern(tmp_path / "bad.json", 1, "chosen", "row")):
        load_preference_data(tmp_path / "bad.json")
    (tmp_path / "broken.json").write_text('[\n{"prompt": "Q",\n "chosen": }]')
    with pytest.raises(
        PreferenceDataError, match=error_pattern(tmp_path / "broken.json", 3, None) + ": invalid JSON"
    ):
        load_preference_data(tmp_path / "broken.json")


def test_parquet_with_text_and_conversational_rows(tmp_path):
    datasets.Dataset.from_list(EXPLICIT).to_parquet(str(tmp_path / "d.parquet"))
    train = load_preference_data(tmp_path / "d.parquet")["train"]
    assert train["completions"] == EXPECTED and train["source_line"] == list(range(10))
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
    with pytest.raises(PreferenceDataError, match=re.escape(str(tmp_path / "junk.parquet"))):
        load_preference_data(tmp_path / "junk.parquet")


def test_csv_explicit_and_seed_formats(tmp_path):
    datasets.Dataset.from_list(EXPLICIT).to_csv(str(tmp_path / "d.csv"), index=False)
    train = load_preference_data(tmp_path / "d.csv")["train"]
    assert train["completions"] == EXPECTED and train["source_line"] == list(range(10))
    (tmp_path / "seed.csv").write_text(
        'chose,rejected\n"Q: 1, 2? A: yes","Q: 1, 2? A: no"\nx,\n', encoding="utf-8"
    )
    with pytest.raises(
        PreferenceDataError,
        match=error_pattern(tmp_path / "seed.csv", 1, "chose", "row") + ".*share no prefix",
    ):
        load_preference_data(tmp_path / "seed.csv")


def test_saved_dataset_dict_and_dataset_folders(tmp_path):
    full = datasets.Dataset.from_list(EXPLICIT)
    datasets.DatasetDict(
        {"train": full.select(range(7)), "validation": full.select(range(7, 10))}
    ).save_to_disk(str(tmp_path / "dict"))
    dd = load_preference_data(tmp_path / "dict", test_split="validation")
    assert dd["train"]["completions"] == EXPECTED[:7] and dd["test"]["completions"] == EXPECTED[7:]
    assert dd["test"]["source_line"] == [0, 1, 2]
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
    with pytest.raises(PreferenceDataError, match=r"someone/missing: cannot load dataset: FileNotFoundError"):
        load_preference_data("someone/missing")


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


# ----------------------------------------------------------------------------------------------------
# Caching: the loader's output is file-backed, so tokenisation is a cache hit the second time.


def test_second_load_and_tokenize_are_cache_hits(tmp_path, tiny_tokenizer, monkeypatch):
    path = write_jsonl(tmp_path / "d.jsonl", EXPLICIT)
    cache = tmp_path / "cache"
    first = load_preference_data(path, cache_dir=cache)["train"]
    assert first.cache_files and Path(first.cache_files[0]["filename"]).is_relative_to(cache)

    normalised, tokenized = [], []
    real_normalise, real_tokenize = data_module._normalise, data_module._tokenize_batch
    monkeypatch.setattr(data_module, "_normalise", lambda *a: normalised.append(1) or real_normalise(*a))
    monkeypatch.setattr(
        data_module, "_tokenize_batch", lambda *a, **k: tokenized.append(1) or real_tokenize(*a, **k)
    )

    second = load_preference_data(path, cache_dir=cache)["train"]
    assert (
        normalised == []
        and second.cache_files == first.cache_files
        and second._fingerprint == first._fingerprint
    )

    out1 = tokenize_preference_dataset(second, tiny_tokenizer)
    assert tokenized and out1.cache_files[0]["filename"] != second.cache_files[0]["filename"]
    tokenized.clear()
    out2 = tokenize_preference_dataset(second, copy.deepcopy(tiny_tokenizer))  # an equal tokenizer
    assert tokenized == [] and out2.cache_files == out1.cache_files and out2[:] == out1[:]
    tokenize_preference_dataset(second, tiny_tokenizer, max_length=12)  # other settings: tokenised again
    assert tokenized

    path.write_text(path.read_text().replace("right 0", "right zero"))  # new bytes: parsed again
    assert load_preference_data(path, cache_dir=cache)["train"][0]["completions"][0] == " right zero"
    assert normalised


def test_num_proc_gives_the_same_rows(tmp_path, tiny_tokenizer):
    train = load_preference_data(write_jsonl(tmp_path / "d.jsonl", EXPLICIT))["train"]
    assert (
        tokenize_preference_dataset(train, tiny_tokenizer, num_proc=2)[:]
        == tokenize_preference_dataset(train, tiny_tokenizer)[:]
    )


def test_missing_chat_template_is_a_data_error(tmp_path, tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = None
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    rows = [{"chosen": conversation, "rejected": conversation[:1] + [{"role": "assistant", "content": "no"}]}]
    with pytest.raises(
        PreferenceDataError, match=r"line 1, field 'prompt': cannot render with the chat template"
    ):
        tokenize_preference_dataset(load_rows(tmp_path, rows), tok)


def test_errors_survive_pickling_with_their_attributes():
    error = pickle.loads(pickle.dumps(PreferenceDataError("bad", "f.jsonl", 3, "chosen")))
    assert (str(error), error.path, error.line, error.field) == (
        "f.jsonl, line 3, field 'chosen': bad",
        "f.jsonl",
        3,
        "chosen",
    )


def test_empty_inputs(tmp_path, tiny_tokenizer):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(
        PreferenceDataError, match=r"empty\.jsonl: split 'train' has no preference rows: the source has no"
    ):
        load_preference_data(tmp_path / "empty.jsonl")
    write_jsonl(tmp_path / "dups.jsonl", [{"prompt": "P", "chosen": " a", "rejected": " a"}])
    with pytest.raises(PreferenceDataError, match="all 1 rows were dropped"):
        load_preference_data(tmp_path / "dups.jsonl")
    none, stats = tokenize_preference_dataset(
        in_memory([{"prompt": "P", "completions": []}]), tiny_tokenizer, return_stats=True
    )
    assert len(none) == 0 and stats.dropped == {"no completions": 1}
    empty = tokenize_preference_dataset(in_memory([]), tiny_tokenizer)
    assert len(empty) == 0 and empty.column_names == [
        "prompt_input_ids",
        "completion_input_ids",
        "source_line",
    ]


def test_tokenize_rejects_unnormalised_datasets(tiny_tokenizer):
    with pytest.raises(PreferenceDataError, match="missing columns"):
        tokenize_preference_dataset(datasets.Dataset.from_list(EXPLICIT), tiny_tokenizer)
