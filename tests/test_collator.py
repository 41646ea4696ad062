"""Collator tests: exact tensors for hand-built rows, padded and padding-free."""

from __future__ import annotations

import json

import pytest
import torch

from hf_dpo.collator import PreferenceCollator
from hf_dpo.data import load_preference_data, tokenize_preference_dataset

# Two rows, K = 2. Sequences in completion-major order: A0 B0 A1 B1 (chosen A, chosen B, rejected A, rejected B).
ROW_A = {"prompt_input_ids": [1, 5, 6], "completion_input_ids": [[7, 2], [8, 9, 2]], "source_line": 3}
ROW_B = {"prompt_input_ids": [1, 5], "completion_input_ids": [[10, 2], [11, 2]], "source_line": 7}


def test_padded_batch_exact_tensors():
    batch = PreferenceCollator(pad_token_id=0)([ROW_A, ROW_B])
    assert set(batch) == {"input_ids", "attention_mask", "completion_mask", "response_mask", "source_line"}
    torch.testing.assert_close(
        batch["input_ids"],
        torch.tensor(
            [
                [1, 5, 6, 7, 2, 0],  # A chosen
                [1, 5, 10, 2, 0, 0],  # B chosen
                [1, 5, 6, 8, 9, 2],  # A rejected
                [1, 5, 11, 2, 0, 0],  # B rejected
            ]
        ),
    )
    torch.testing.assert_close(
        batch["attention_mask"],
        torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]]),
    )
    torch.testing.assert_close(
        batch["completion_mask"],
        torch.tensor([[0, 0, 0, 1, 1, 0], [0, 0, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 0, 0]]),
    )
    torch.testing.assert_close(batch["response_mask"], torch.ones(2, 2, dtype=torch.bool))
    torch.testing.assert_close(batch["source_line"], torch.tensor([3, 7]))
    for key in ("input_ids", "attention_mask", "completion_mask", "source_line"):
        assert batch[key].dtype == torch.long, key


def test_pad_to_multiple_of_and_pad_token():
    batch = PreferenceCollator(pad_token_id=99, pad_to_multiple_of=8)([ROW_A, ROW_B])
    assert batch["input_ids"].shape == (4, 8)
    assert batch["input_ids"][1].tolist() == [1, 5, 10, 2, 99, 99, 99, 99]
    assert batch["completion_mask"][:, 6:].sum() == 0 and batch["attention_mask"][:, 6:].sum() == 0
    assert PreferenceCollator(pad_token_id=0, pad_to_multiple_of=3)([ROW_A, ROW_B])["input_ids"].shape == (
        4,
        6,
    )


def test_rows_with_fewer_responses_get_masked_empty_completions_and_ref_logps():
    ranked = {
        "prompt_input_ids": [1, 4],
        "completion_input_ids": [[5, 2], [6, 2], [7, 7, 2]],
        "source_line": 1,
        "ref_logps": [-1.0, -2.0, -3.0],
    }
    pair = {**ROW_B, "ref_logps": [-0.5, -0.25]}
    batch = PreferenceCollator(pad_token_id=0)([ranked, pair])
    assert batch["input_ids"].shape == (6, 5)
    assert batch["response_mask"].tolist() == [[True, True, True], [True, True, False]]
    # sequence 2*B + 1 is the missing third response of the pair row: its prompt alone, no completion tokens
    assert batch["input_ids"][5].tolist() == [1, 5, 0, 0, 0]
    assert batch["attention_mask"][5].tolist() == [1, 1, 0, 0, 0]
    assert batch["completion_mask"][5].sum() == 0
    assert batch["input_ids"][4].tolist() == [1, 4, 7, 7, 2]
    assert batch["ref_logps"].dtype == torch.float32
    torch.testing.assert_close(batch["ref_logps"], torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.25, 0.0]]))


def test_padding_free_packs_one_row_with_restarting_positions():
    batch = PreferenceCollator(pad_token_id=0, padding_free=True)([ROW_A, ROW_B])
    assert "attention_mask" not in batch
    assert batch["input_ids"].tolist() == [[1, 5, 6, 7, 2, 1, 5, 10, 2, 1, 5, 6, 8, 9, 2, 1, 5, 11, 2]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 0, 1, 2, 3]]
    assert batch["completion_mask"].tolist() == [[0, 0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 0, 1, 1, 1, 0, 0, 1, 1]]
    assert batch["seq_lens"].tolist() == [5, 4, 6, 4] and batch["seq_lens"].dtype == torch.long
    for key in ("cu_seq_lens_q", "cu_seq_lens_k"):
        assert batch[key].tolist() == [0, 5, 9, 15, 19] and batch[key].dtype == torch.int32
    assert batch["max_length_q"] == batch["max_length_k"] == 6
    assert batch["response_mask"].tolist() == [[True, True], [True, True]]
    assert batch["source_line"].tolist() == [3, 7]


def test_padding_free_matches_the_padded_tokens():
    rows = [ROW_A, ROW_B, {**ROW_A, "completion_input_ids": [[4, 4, 4, 2]]}]
    padded = PreferenceCollator(pad_token_id=0)(rows)
    packed = PreferenceCollator(pad_token_id=0, padding_free=True)(rows)
    real = padded["attention_mask"].bool()
    assert padded["input_ids"][real].tolist() == packed["input_ids"][0].tolist()
    assert padded["completion_mask"][real].tolist() == packed["completion_mask"][0].tolist()
    assert padded["attention_mask"].sum(1).tolist() == packed["seq_lens"].tolist()
    assert torch.equal(padded["response_mask"], packed["response_mask"])


def test_invalid_settings_and_batches():
    with pytest.raises(ValueError, match="padding_free"):
        PreferenceCollator(pad_token_id=0, pad_to_multiple_of=8, padding_free=True)
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        PreferenceCollator(pad_token_id=0, pad_to_multiple_of=0)
    with pytest.raises(ValueError, match="empty batch"):
        PreferenceCollator(pad_token_id=0)([])
    with pytest.raises(ValueError, match="ref_logps"):
        PreferenceCollator(pad_token_id=0)([{**ROW_A, "ref_logps": [0.0, 0.0]}, ROW_B])


def test_real_pairs_put_chosen_first(tmp_path, tiny_tokenizer):
    rows = [{"prompt": f"Q{i}:", "chosen": " yes", "rejected": " no"} for i in range(3)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dataset = tokenize_preference_dataset(
        load_preference_data(path, cache_dir=tmp_path / "cache")["train"], tiny_tokenizer
    )
    batch = PreferenceCollator(pad_token_id=tiny_tokenizer.pad_token_id)(list(dataset))
    texts = [
        tiny_tokenizer.decode(seq[mask.bool()])
        for seq, mask in zip(batch["input_ids"], batch["completion_mask"])
    ]
    assert texts == [" yes</s>"] * 3 + [" no</s>"] * 3
    assert batch["source_line"].tolist() == [1, 2, 3]


# ---------------------------------------------------------------------------------- prompt sharing
def test_shared_padded_batch_exact_tensors():
    """One sequence per row, [prompt | chosen | rejected]; both completions continue the prompt's positions."""
    batch = PreferenceCollator(pad_token_id=0, share_prompt=True)([ROW_A, ROW_B])
    assert set(batch) == {
        "input_ids",
        "attention_mask",
        "position_ids",
        "completion_mask",
        "shared_layout",
        "response_mask",
        "source_line",
    }
    assert batch["input_ids"].tolist() == [[1, 5, 6, 7, 2, 8, 9, 2], [1, 5, 10, 2, 11, 2, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1] * 8, [1, 1, 1, 1, 1, 1, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3, 4, 5], [0, 1, 2, 3, 2, 3, 0, 0]]
    assert batch["completion_mask"].tolist() == [[0, 0, 0, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 0, 0]]
    assert batch["shared_layout"].tolist() == [[3, 2, 3], [2, 2, 2]]
    assert batch["response_mask"].tolist() == [[True, True], [True, True]]
    assert batch["source_line"].tolist() == [3, 7]
    for key in ("input_ids", "attention_mask", "position_ids", "completion_mask", "shared_layout"):
        assert batch[key].dtype == torch.long, key
    padded = PreferenceCollator(pad_token_id=0, share_prompt=True, pad_to_multiple_of=5)([ROW_A, ROW_B])
    assert padded["input_ids"].shape == (2, 10) and padded["attention_mask"][:, 8:].sum() == 0


def test_shared_packed_batch_exact_tensors():
    batch = PreferenceCollator(pad_token_id=0, padding_free=True, share_prompt=True)([ROW_A, ROW_B])
    assert "attention_mask" not in batch and "cu_seq_lens_q" not in batch  # no varlen kernel may take it
    assert batch["input_ids"].tolist() == [[1, 5, 6, 7, 2, 8, 9, 2, 1, 5, 10, 2, 11, 2]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3, 4, 5, 0, 1, 2, 3, 2, 3]]
    assert batch["completion_mask"].tolist() == [[0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1]]
    assert batch["shared_layout"].tolist() == [[3, 2, 3], [2, 2, 2]]


def test_shared_rows_with_missing_responses_and_ref_logps():
    ranked = {
        "prompt_input_ids": [1, 4],
        "completion_input_ids": [[5, 2], [6, 2], [7, 7, 2]],
        "source_line": 1,
        "ref_logps": [-1.0, -2.0, -3.0],
    }
    pair = {**ROW_B, "ref_logps": [-0.5, -0.25]}
    batch = PreferenceCollator(pad_token_id=0, share_prompt=True)([ranked, pair])
    assert batch["shared_layout"].tolist() == [
        [2, 2, 2, 3],
        [2, 2, 2, 0],
    ]  # the pair's third response: no tokens
    assert batch["input_ids"].tolist() == [[1, 4, 5, 2, 6, 2, 7, 7, 2], [1, 5, 10, 2, 11, 2, 0, 0, 0]]
    assert batch["response_mask"].tolist() == [[True, True, True], [True, True, False]]
    torch.testing.assert_close(batch["ref_logps"], torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.25, 0.0]]))


def test_shared_layout_holds_every_unshared_sequence():
    """Prompt + completion k of row b, read out of the shared rows through the layout, is unshared sequence
    k*B + b, with its positions."""
    from hf_dpo.collator import SharedPromptLayout

    rows = [ROW_A, ROW_B, {**ROW_A, "completion_input_ids": [[4, 4, 4, 2]]}]
    unshared = PreferenceCollator(pad_token_id=0)(rows)
    for padding_free in (False, True):
        shared = PreferenceCollator(pad_token_id=0, padding_free=padding_free, share_prompt=True)(rows)
        layout = SharedPromptLayout.from_batch(shared)
        assert layout.packed is padding_free and layout.num_rows == 3 and layout.num_completions == 2
        found = {}
        for b, row, start, prompt, parts in layout.segments():
            ids, positions = shared["input_ids"][row], shared["position_ids"][row]
            for k, begin, length in parts:
                span = list(range(start, start + prompt)) + list(range(begin, begin + length))
                found[k * 3 + b] = (ids[span].tolist(), positions[span].tolist())
        for sequence in range(6):
            real = unshared["attention_mask"][sequence].bool()
            if unshared["completion_mask"][sequence].sum() == 0:
                assert sequence not in found  # the missing response of the third row
                continue
            expected = unshared["input_ids"][sequence][real].tolist()
            assert found[sequence] == (expected, list(range(len(expected)))), sequence
