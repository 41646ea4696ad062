"""Batches of preference rows for one policy forward: padded, or packed without padding, with the prompt
repeated before every completion or shared by all of them.

B rows with K completions each are B*K sequences (prompt + completion) in completion-major order,
``[completion 0 of rows 1..B; completion 1 of rows 1..B; ...]``; for pairs that is
``[chosen_1..chosen_B; rejected_1..rejected_B]``, so ``logps.view(K, B)`` gives one completion per row.

Prompt sharing (Wang et al. 2024, "Accelerating Direct Preference Optimization with Prefix Sharing"): each row
becomes ONE sequence ``[prompt | completion 0 | ... | completion K-1]`` whose completions continue the prompt's
positions and attend to the prompt and to themselves only (`hf_dpo.attention`), so the prompt is read once
instead of K times and every completion sees exactly what it would see after its own copy of the prompt.
The sequences of the batch keep their completion-major numbering: sequence k*B + b is completion k of row b.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SharedPromptLayout:
    """Where the prompt and the completions of every row lie in a prompt-shared batch.

    lengths: per row b, ``(prompt length, completion 0 length, ..., completion K-1 length)`` (0 for a
        missing completion).
    packed: the rows' shared sequences lie back to back in one row (padding-free); otherwise row b of the
        tensors holds row b's shared sequence from position 0, right-padded.
    Built once per forward (`from_batch`); `cache` holds what attention derives from it (masks), so every
    layer, and a gradient-checkpointed recomputation, reuses them.
    """

    lengths: tuple[tuple[int, ...], ...]
    packed: bool
    cache: dict = field(default_factory=dict, compare=False, repr=False, hash=False)

    @classmethod
    def from_batch(cls, batch: dict) -> SharedPromptLayout:
        lengths = batch["shared_layout"]
        rows = batch["input_ids"].shape[0]
        if rows not in (1, lengths.shape[0]):
            raise ValueError(
                f"shared_layout describes {lengths.shape[0]} rows but input_ids has {rows}: not a prompt-shared batch"
            )
        return cls(lengths=tuple(map(tuple, lengths.tolist())), packed=rows != lengths.shape[0])

    @property
    def num_rows(self) -> int:
        return len(self.lengths)

    @property
    def num_completions(self) -> int:
        return len(self.lengths[0]) - 1

    def segments(self):
        """Per row b: (b, tensor row, prompt start, prompt length, [(k, completion start, length), ...]),
        positions along the tensor row; completions of length 0 are left out."""
        offset = 0
        for b, (prompt, *completions) in enumerate(self.lengths):
            start = offset if self.packed else 0
            cursor, parts = start + prompt, []
            for k, length in enumerate(completions):
                if length:
                    parts.append((k, cursor, length))
                cursor += length
            yield b, 0 if self.packed else b, start, prompt, parts
            offset = cursor


@dataclass
class PreferenceCollator:
    """Collate tokenised preference rows (see `hf_dpo.data.tokenize_preference_dataset`) into tensors.

    Padded (default): ``input_ids``, ``attention_mask``, ``completion_mask`` of shape (B*K, T), right-padded
    with `pad_token_id` to the longest sequence (rounded up to `pad_to_multiple_of`).
    ``padding_free=True``: the B*K sequences concatenated into one row, ``input_ids``, ``position_ids``,
    ``completion_mask`` of shape (1, N), with ``seq_lens`` and flash-attention varlen arguments
    (``cu_seq_lens_q/k``, ``max_length_q/k``) instead of an attention mask.
    ``share_prompt=True``: one sequence per row, ``[prompt | completion 0 | ... | completion K-1]``, padded
    to (B, T) (with ``attention_mask``) or packed into (1, N); ``input_ids``, ``position_ids`` (each completion
    continues from the end of its prompt), ``completion_mask``, and ``shared_layout`` (B, 1 + K) long: each
    row's prompt length and completion lengths (see `SharedPromptLayout`). No varlen arguments: attention
    must keep completions apart, which only `hf_dpo.attention` does.
    All: ``response_mask`` (B, K) bool (False for the empty completions that fill rows with fewer than
    K responses), ``source_line`` (B,), and ``ref_logps`` (B, K) float32 when the rows carry it.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    padding_free: bool = False
    share_prompt: bool = False

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

        if self.share_prompt:
            batch = self._shared(features, num_completions)
        else:
            batch = self._unshared(features, num_completions)
        batch["response_mask"] = torch.tensor(
            [[k < len(f["completion_input_ids"]) for k in range(num_completions)] for f in features],
            dtype=torch.bool,
        )
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

    def _unshared(self, features: list[dict], num_completions: int) -> dict[str, torch.Tensor | int]:
        prompts, completions = [], []  # sequence k*B + b is completion k of row b
        for k in range(num_completions):
            for feature in features:
                prompts.append(list(feature["prompt_input_ids"]))
                if k < len(feature["completion_input_ids"]):
                    completions.append(list(feature["completion_input_ids"][k]))
                else:  # a missing response: the prompt alone, masked out of the loss
                    completions.append([])
        if self.padding_free:
            return self._packed(prompts, completions)
        return self._padded(prompts, completions)

    def _shared(self, features: list[dict], num_completions: int) -> dict[str, torch.Tensor]:
        """One sequence per row: the prompt once, then every completion, each positioned right after the
        prompt (positions P, P+1, ... for every completion of a prompt of P tokens)."""
        rows, layout = [], []
        for feature in features:
            prompt = list(feature["prompt_input_ids"])
            completions = [list(c) for c in feature["completion_input_ids"]]
            completions += [[]] * (num_completions - len(completions))  # missing responses: no tokens
            ids, positions, mask = list(prompt), list(range(len(prompt))), [0] * len(prompt)
            for c in completions:
                ids += c
                positions += range(len(prompt), len(prompt) + len(c))
                mask += [1] * len(c)
            rows.append((ids, positions, mask))
            layout.append([len(prompt), *map(len, completions)])
        if self.padding_free:
            batch = {
                name: torch.tensor([[v for row in rows for v in row[i]]], dtype=torch.long)
                for i, name in enumerate(("input_ids", "position_ids", "completion_mask"))
            }
        else:
            length = max(len(ids) for ids, _, _ in rows)
            if self.pad_to_multiple_of:
                length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
            batch = {
                "input_ids": torch.full((len(rows), length), self.pad_token_id, dtype=torch.long),
                "attention_mask": torch.zeros(len(rows), length, dtype=torch.long),
                "position_ids": torch.zeros(len(rows), length, dtype=torch.long),
                "completion_mask": torch.zeros(len(rows), length, dtype=torch.long),
            }
            for b, (ids, positions, mask) in enumerate(rows):
                batch["input_ids"][b, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                batch["attention_mask"][b, : len(ids)] = 1
                batch["position_ids"][b, : len(ids)] = torch.tensor(positions, dtype=torch.long)
                batch["completion_mask"][b, : len(ids)] = torch.tensor(mask, dtype=torch.long)
        batch["shared_layout"] = torch.tensor(layout, dtype=torch.long)
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
