"""Batches of preference rows for one policy forward: padded, or packed without padding.

B rows with K completions each become B*K sequences (prompt + completion) in completion-major order,
``[completion 0 of rows 1..B; completion 1 of rows 1..B; ...]``; for pairs that is
``[chosen_1..chosen_B; rejected_1..rejected_B]``, so ``logps.view(K, B)`` gives one completion per row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PreferenceCollator:
    """Collate tokenised preference rows (see `hf_dpo.data.tokenize_preference_dataset`) into tensors.

    Padded (default): ``input_ids``, ``attention_mask``, ``completion_mask`` of shape (B*K, T), right-padded
    with `pad_token_id` to the longest sequence (rounded up to `pad_to_multiple_of`).
    ``padding_free=True``: the B*K sequences concatenated into one row, ``input_ids``, ``position_ids``,
    ``completion_mask`` of shape (1, N), with ``seq_lens`` and flash-attention varlen arguments
    (``cu_seq_lens_q/k``, ``max_length_q/k``) instead of an attention mask.
    Both: ``response_mask`` (B, K) bool (False for the empty completions that fill rows with fewer than
    K responses), ``source_line`` (B,), and ``ref_logps`` (B, K) float32 when the rows carry it.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    padding_free: bool = False

    def __post_init__(self):
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1, got {self.pad_to_multiple_of}")
        if self.padding_free and self.pad_to_multiple_of is not None:
            raise ValueError("pad_to_multiple_of has no effect with padding_free=True; leave it None")

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor | int]:
        if not features:
            raise ValueError("cannot collate an empty batch")
        batch_size = len(features)
        num_completions = max(len(f["completion_input_ids"]) for f in features)
        if num_completions == 0:
            raise ValueError("every row has no completions")

        response_mask = torch.zeros(batch_size, num_completions, dtype=torch.bool)
        prompts, completions = [], []  # sequence k*B + b is completion k of row b
        for k in range(num_completions):
            for b, feature in enumerate(features):
                prompts.append(list(feature["prompt_input_ids"]))
                if k < len(feature["completion_input_ids"]):
                    completions.append(list(feature["completion_input_ids"][k]))
                    response_mask[b, k] = True
                else:  # a missing response: the prompt alone, masked out of the loss
                    completions.append([])

        batch = (
            self._packed(prompts, completions) if self.padding_free else self._padded(prompts, completions)
        )
        batch["response_mask"] = response_mask
        batch["source_line"] = torch.tensor(
            [int(f.get("source_line", -1)) for f in features], dtype=torch.long
        )
        with_ref = ["ref_logps" in f and f["ref_logps"] is not None for f in features]
        if any(with_ref):
            if not all(with_ref):
                raise ValueError("some rows have ref_logps and some do not")
            ref = torch.zeros(batch_size, num_completions, dtype=torch.float32)
            for b, feature in enumerate(features):
                values = list(feature["ref_logps"])
                ref[b, : len(values)] = torch.tensor(values, dtype=torch.float32)
            batch["ref_logps"] = ref
        return batch

    def _padded(self, prompts: list[list[int]], completions: list[list[int]]) -> dict[str, torch.Tensor]:
        length = max(len(p) + len(c) for p, c in zip(prompts, completions))
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        n = len(prompts)
        input_ids = torch.full((n, length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros(n, length, dtype=torch.long)
        completion_mask = torch.zeros(n, length, dtype=torch.long)
        for i, (p, c) in enumerate(zip(prompts, completions)):
            total = len(p) + len(c)
            input_ids[i, :total] = torch.tensor(p + c, dtype=torch.long)
            attention_mask[i, :total] = 1
            completion_mask[i, len(p) : total] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}

    def _packed(
        self, prompts: list[list[int]], completions: list[list[int]]
    ) -> dict[str, torch.Tensor | int]:
        ids, positions, mask, lengths = [], [], [], []
        for p, c in zip(prompts, completions):
            ids.extend(p + c)
            positions.extend(range(len(p) + len(c)))
            mask.extend([0] * len(p) + [1] * len(c))
            lengths.append(len(p) + len(c))
        seq_lens = torch.tensor(lengths, dtype=torch.long)
        cu_seq_lens = torch.zeros(len(lengths) + 1, dtype=torch.int32)
        cu_seq_lens[1:] = torch.cumsum(seq_lens, dim=0).to(torch.int32)
        max_len = max(lengths)
        return {
            "input_ids": torch.tensor([ids], dtype=torch.long),
            "position_ids": torch.tensor([positions], dtype=torch.long),
            "completion_mask": torch.tensor([mask], dtype=torch.long),
            "seq_lens": seq_lens,
            "cu_seq_lens_q": cu_seq_lens,
            "cu_seq_lens_k": cu_seq_lens.clone(),
            "max_length_q": max_len,
            "max_length_k": max_len,
        }
