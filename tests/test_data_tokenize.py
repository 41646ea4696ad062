"""hf_dpo.data.tokenize: the tokenisation contract as exact token ids, the length rule, the cache."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import datasets
import pytest
from data_helpers import (
    BOS,
    EOS,
    EXPLICIT,
    PROMPT_TOKENS,
    SEED_ROW,
    error_pattern,
    ids,
    in_memory,
    load_rows,
    write_jsonl,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_dpo.collator import PreferenceCollator
from hf_dpo.data import PreferenceDataError, load_preference_data, tokenize_preference_dataset
from hf_dpo.data import formats as formats_module
from hf_dpo.data import tokenize as tokenize_module


def test_seed_format_implicit_prompt_and_golden_ids(tmp_path, tiny_tokenizer):
    train = load_rows(tmp_path, [SEED_ROW])
    assert train[0] == {
        "prompt": "Question: What is 2+2? Answer:",
        "completions": [" 4", " I am not sure."],
        "source_line": 1,
        "messages_json": "",
        "source_name": str(tmp_path / "data.jsonl"),
        "source_kind": "line",
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


def test_eos_already_in_the_completion_is_not_doubled(tmp_path, tiny_tokenizer):
    rows = [{"prompt": "Add 12 and 30:", "chosen": " 42</s>", "rejected": " 41"}]
    row = tokenize_preference_dataset(load_rows(tmp_path, rows), tiny_tokenizer)[0]
    assert row["completion_input_ids"] == [
        ids(tiny_tokenizer, ["Ġ42", "</s>"]),
        ids(tiny_tokenizer, ["Ġ", "4", "1", "</s>"]),
    ]


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
        PreferenceDataError, match=error_pattern(tmp_path / "data.jsonl", 2, "chosen") + ".*does not start"
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
    with caplog.at_level(logging.INFO, logger="hf_dpo.data"):  # 11 prompt tokens cut to 10: no room left
        out, stats = tokenize_preference_dataset(
            dataset, tiny_tokenizer, max_length=10, max_prompt_length=10, return_stats=True
        )
    assert out["source_line"] == [2]
    assert (stats.read, stats.kept, stats.truncated) == (2, 1, 1)
    assert stats.dropped == {"completion empty after truncation": 1}
    assert (
        "tokenized split 'train': read 2 rows, kept 1, truncated 1, dropped 1 (completion empty after truncation: 1)"
        in caplog.text
    )


# The length rule with max_prompt_length=None. A prompt "Question:" + " is" * k is k + 3 tokens (<s> Question :
# then one "Ġis" per word) and a completion " is" * m is m + 1 (EOS), so counts are exact. Rows: (L, k, m) ->
# (prompt kept P', chosen kept): P = k + 3, C = m + 1 (the longest: rejected is " is" * 10, 11 tokens);
# over L, P' = max(L - C, min(P, L // 2)) and completions keep L - P'.
LENGTH_RULE = [
    (64, 200, 100, 32, 32),  # P 203, C 101: max(-37, min(203, 32)) = 32; 64 - 32 = 32
    (64, 10, 100, 13, 51),  # P 13, C 101: max(-37, min(13, 32)) = 13, the prompt untouched; 64 - 13 = 51
    (64, 100, 10, 53, 11),  # P 103, C 11: max(53, min(103, 32)) = 53; 11 fit in 64 - 53
    (101, 200, 100, 50, 51),  # odd L: max(0, min(203, 50)) = 50; 101 - 50 = 51
    (512, 600, 300, 256, 256),  # P 603, C 301: max(211, min(603, 256)) = 256; 512 - 256 = 256
    (512, 500, 50, 461, 51),  # P 503, C 51: max(461, min(503, 256)) = 461; 51 fit in 512 - 461
    (512, 20, 1000, 23, 489),  # P 23, C 1001: max(-489, min(23, 256)) = 23; 512 - 23 = 489
    (512, 400, 50, 403, 51),  # P 403, C 51: 454 <= 512, untouched
]


@pytest.mark.parametrize(("max_length", "k", "m", "prompt_kept", "chosen_kept"), LENGTH_RULE)
def test_without_max_prompt_length_the_prompt_is_cut_only_as_far_as_needed(
    tiny_tokenizer, max_length, k, m, prompt_kept, chosen_kept
):
    dataset = in_memory([{"prompt": "Question:" + " is" * k, "completions": [" is" * m, " is" * 10]}])
    full = tokenize_preference_dataset(dataset, tiny_tokenizer, max_length=None)[0]
    assert len(full["prompt_input_ids"]) == k + 3 and len(full["completion_input_ids"][0]) == m + 1
    row, stats = tokenize_preference_dataset(
        dataset, tiny_tokenizer, max_length=max_length, return_stats=True
    )
    row = row[0]
    assert len(row["prompt_input_ids"]) == prompt_kept and len(row["completion_input_ids"][0]) == chosen_kept
    assert row["prompt_input_ids"] == full["prompt_input_ids"][len(full["prompt_input_ids"]) - prompt_kept :]
    assert row["completion_input_ids"] == [
        c[: max_length - prompt_kept] for c in full["completion_input_ids"]
    ]
    assert len(row["completion_input_ids"][1]) == 11 and prompt_kept + chosen_kept <= max_length
    assert stats.truncated == (k + m + 4 > max_length) and stats.dropped == {}


def test_max_prompt_length_needs_max_length(tiny_tokenizer):
    dataset = in_memory([{"prompt": "Hi", "completions": [" 4", " 5"]}])
    with pytest.raises(
        PreferenceDataError, match="field 'max_prompt_length': .* no effect without max_length"
    ):
        tokenize_preference_dataset(dataset, tiny_tokenizer, max_length=None, max_prompt_length=8)
    for bad in (0, -1, True, 2.5):
        with pytest.raises(PreferenceDataError, match="max_length must be a positive int"):
            tokenize_preference_dataset(dataset, tiny_tokenizer, max_length=bad)


@settings(max_examples=30, deadline=None)
@given(texts=st.lists(st.text(max_size=40), min_size=1, max_size=6), special=st.booleans())
def test_the_direct_rust_encoding_equals_the_tokenizers_own_call(tiny_tokenizer, texts, special):
    """The encoder calls the Rust tokenizer directly for a plain fast tokenizer; ids are tokenizer(texts)'s."""
    expected = tiny_tokenizer(texts, add_special_tokens=special)["input_ids"]
    assert tokenize_module._encoder(tiny_tokenizer)(texts, special) == expected
    truncating = copy.deepcopy(tiny_tokenizer)
    truncating.backend_tokenizer.enable_truncation(max_length=3)  # __call__ would undo this: take its path
    assert tokenize_module._encoder(truncating)(texts, special) == expected


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


def test_second_load_and_tokenize_are_cache_hits(tmp_path, tiny_tokenizer, monkeypatch):
    path = write_jsonl(tmp_path / "d.jsonl", EXPLICIT)
    cache = tmp_path / "cache"
    first = load_preference_data(path, cache_dir=cache)["train"]
    assert first.cache_files and Path(first.cache_files[0]["filename"]).is_relative_to(cache)

    normalised, tokenized = [], []
    real_normalise, real_tokenize = formats_module._normalise_batch, tokenize_module._tokenize_batch
    monkeypatch.setattr(
        formats_module, "_normalise_batch", lambda *a, **k: normalised.append(1) or real_normalise(*a, **k)
    )
    monkeypatch.setattr(
        tokenize_module, "_tokenize_batch", lambda *a, **k: tokenized.append(1) or real_tokenize(*a, **k)
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


def test_empty_inputs(tiny_tokenizer):
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
