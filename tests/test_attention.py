"""hf_dpo_varlen attention: per-sequence sdpa for packed rows, plain sdpa for everything else."""

from __future__ import annotations

import copy

import pytest
import torch

from hf_dpo.attention import VARLEN_ATTENTION, use_varlen_attention
from hf_dpo.tiny import build_tiny_model


def _pair():
    sdpa = build_tiny_model(vocab_size=96, seed=3).eval()
    sdpa.config._attn_implementation = "sdpa"
    varlen = copy.deepcopy(sdpa)
    assert use_varlen_attention(varlen)
    assert varlen.config._attn_implementation == VARLEN_ATTENTION
    return sdpa, varlen


def test_packed_row_equals_each_sequence_run_alone(monkeypatch):
    """Three sequences back to back in one row, positions restarting: each one's logits are those of the
    sequence run by itself (no attention across the cut), and attention runs per sequence (L_i x L_i), never
    over the whole row (N x N with a block-diagonal mask)."""
    sdpa, varlen = _pair()
    sdpa_kernel, calls = torch.nn.functional.scaled_dot_product_attention, []

    def recording(query, key, value, *args, **kwargs):
        calls.append((query.shape[2], kwargs.get("attn_mask") is None))
        return sdpa_kernel(query, key, value, *args, **kwargs)

    lengths = [5, 9, 3]
    seqs = [torch.randint(3, 96, (n,)) for n in lengths]
    cu = torch.tensor([0, 5, 14, 17], dtype=torch.int32)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    with torch.no_grad():
        packed = varlen(
            input_ids=torch.cat(seqs)[None],
            position_ids=torch.cat([torch.arange(n) for n in lengths])[None],
            cu_seq_lens_q=cu,
            cu_seq_lens_k=cu,
            max_length_q=max(lengths),
            max_length_k=max(lengths),
        ).logits[0]
        assert calls == [(n, True) for n in lengths] * varlen.config.num_hidden_layers
        alone = [sdpa(input_ids=s[None]).logits[0] for s in seqs]
    torch.testing.assert_close(packed, torch.cat(alone), atol=1e-5, rtol=1e-5)


def test_padded_batches_and_cached_generation_are_plain_sdpa():
    """Without cu_seq_lens the switched model is the sdpa model: padded batches with a mask, and greedy
    generation with a KV cache, give the same logits and tokens."""
    sdpa, varlen = _pair()
    ids = torch.randint(3, 96, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    with torch.no_grad():
        torch.testing.assert_close(
            varlen(input_ids=ids, attention_mask=mask).logits,
            sdpa(input_ids=ids, attention_mask=mask).logits,
        )
    prompt = ids[:1]
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(varlen.generate(prompt, **kwargs), sdpa.generate(prompt, **kwargs))


def test_flash_attention_models_keep_their_own_kernel():
    model = build_tiny_model(vocab_size=96)
    model.config._attn_implementation = "flash_attention_2"
    assert not use_varlen_attention(model)
    assert model.config._attn_implementation == "flash_attention_2"


# ---------------------------------------------------------------------------------- prompt sharing
def _shared_rows():
    """Two rows: prompts of 6 and 3 tokens, completions of (4, 2) and (5, 0: a missing response)."""
    g = torch.Generator().manual_seed(5)
    ids = lambda n: torch.randint(3, 96, (n,), generator=g).tolist()  # noqa: E731
    return [
        {"prompt_input_ids": ids(6), "completion_input_ids": [ids(4), ids(2)]},
        {"prompt_input_ids": ids(3), "completion_input_ids": [ids(5)]},
    ]


def test_shared_rows_equal_each_completion_after_its_own_prompt(monkeypatch):
    """Each completion's logits in a shared row (padded rows, and one packed row) equal those of [prompt |
    completion] run alone; attention runs per completion, never over the whole row: row 0's first completion
    causally over [prompt; completion] (which gives the prompt's outputs too), its second (2 tokens after a
    prompt of 6) with a (2, 8) mask; row 1's only completion causally."""
    from hf_dpo.attention import SHARED_LAYOUT_KWARG
    from hf_dpo.collator import PreferenceCollator, SharedPromptLayout

    sdpa, varlen = _pair()
    rows = _shared_rows()
    sdpa_kernel, calls = torch.nn.functional.scaled_dot_product_attention, []

    def recording(query, key, value, *args, **kwargs):
        calls.append((query.shape[2], key.shape[2], kwargs.get("attn_mask") is not None))
        return sdpa_kernel(query, key, value, *args, **kwargs)

    with torch.no_grad():
        alone = {}
        for b, row in enumerate(rows):
            for k, completion in enumerate(row["completion_input_ids"]):
                logits = sdpa(input_ids=torch.tensor([row["prompt_input_ids"] + completion])).logits[0]
                alone[(b, k)] = logits[len(row["prompt_input_ids"]) :]
        for padding_free in (False, True):
            batch = PreferenceCollator(pad_token_id=0, padding_free=padding_free, share_prompt=True)(rows)
            layout = SharedPromptLayout.from_batch(batch)
            calls.clear()
            monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
            logits = varlen(
                input_ids=batch["input_ids"],
                position_ids=batch["position_ids"],
                **{SHARED_LAYOUT_KWARG: layout},
            ).logits
            monkeypatch.undo()
            per_layer = [(10, 10, False), (2, 8, True), (8, 8, False)]
            assert calls == per_layer * varlen.config.num_hidden_layers
            for b, row, _, _, parts in layout.segments():
                for k, begin, length in parts:
                    torch.testing.assert_close(
                        logits[row, begin : begin + length], alone[(b, k)], atol=1e-5, rtol=1e-5
                    )


def test_shared_prompt_mask_by_hand():
    """Row 0: prompt 2, completions 2 and 1; row 1: prompt 1, completion 1, then padding (width 5)."""
    from hf_dpo.attention import shared_prompt_dense_mask
    from hf_dpo.collator import SharedPromptLayout

    layout = SharedPromptLayout(lengths=((2, 2, 1), (1, 1, 0)), packed=False)
    mask = shared_prompt_dense_mask(layout, width=5).int().tolist()
    assert mask[0] == [
        [1, 0, 0, 0, 0],  # prompt
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],  # completion 0
        [1, 1, 1, 1, 0],
        [1, 1, 0, 0, 1],  # completion 1: the prompt and itself, not completion 0
    ]
    assert mask[1] == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 0, 1, 0, 0],  # padding sees earlier padding of its row only (never an empty row)
        [0, 0, 1, 1, 0],
        [0, 0, 1, 1, 1],
    ]
    packed = SharedPromptLayout(lengths=((2, 1, 1), (1, 1, 0)), packed=True)
    dense = shared_prompt_dense_mask(packed, width=6)[0].int()
    assert dense[4].tolist() == [0, 0, 0, 0, 1, 0] and dense[5].tolist() == [0, 0, 0, 0, 1, 1]  # row 1 alone


def _real_positions(layout, width: int) -> torch.Tensor:
    """(R, T) bool: False on the padding of padded rows."""
    if layout.packed:
        return torch.ones(1, width, dtype=torch.bool)
    lengths = torch.tensor([[sum(row)] for row in layout.lengths])
    return torch.arange(width)[None] < lengths


def _random_attention_inputs(layout, width, rows, device="cpu", requires_grad=False):
    g = torch.Generator().manual_seed(11)
    shape = lambda heads: (rows, heads, width, 8)  # noqa: E731
    tensors = [torch.randn(shape(h), generator=g) for h in (4, 2, 2)]  # GQA: 4 query heads, 2 key/value heads
    return [t.to(device).requires_grad_(requires_grad) for t in tensors]


@pytest.mark.parametrize("packed", [False, True])
def test_per_segment_sdpa_equals_one_masked_sdpa(packed):
    """The per-segment path equals a single sdpa over the whole rows with the dense shared-prompt mask
    (outputs and gradients, on every non-padding position)."""
    from transformers.integrations.sdpa_attention import repeat_kv

    from hf_dpo.attention import shared_prompt_dense_mask, shared_prompt_sdpa
    from hf_dpo.collator import SharedPromptLayout

    layout = SharedPromptLayout(lengths=((5, 3, 4), (2, 6, 0), (4, 1, 2)), packed=packed)
    width, rows = (sum(map(sum, layout.lengths)), 1) if packed else (13, 3)
    q, k, v = _random_attention_inputs(layout, width, rows, requires_grad=True)
    out = shared_prompt_sdpa(q, k, v, layout, scaling=0.3)
    mask = shared_prompt_dense_mask(layout, width)[:, None]
    full = torch.nn.functional.scaled_dot_product_attention(
        q, repeat_kv(k, 2), repeat_kv(v, 2), attn_mask=mask, scale=0.3
    ).transpose(1, 2)
    real = _real_positions(layout, width)
    torch.testing.assert_close(out[real], full[real], atol=1e-6, rtol=1e-5)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)) * real[..., None, None]
    grads = torch.autograd.grad((out * weights).sum(), (q, k, v))
    full_grads = torch.autograd.grad((full * weights).sum(), (q, k, v))
    for g, f in zip(grads, full_grads):
        torch.testing.assert_close(g, f, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("packed", [False, True])
def test_flex_attention_block_mask_equals_sdpa_path_on_cpu(packed):
    """FlexAttention with the shared-prompt BlockMask (forward: PyTorch has no FlexAttention backward on
    CPU; the CUDA test below covers gradients) gives the per-segment sdpa path's outputs."""
    from hf_dpo.attention import shared_prompt_flex, shared_prompt_sdpa
    from hf_dpo.collator import SharedPromptLayout

    layout = SharedPromptLayout(lengths=((70, 30, 41), (9, 100, 0), (130, 1, 2)), packed=packed)
    width, rows = (sum(map(sum, layout.lengths)), 1) if packed else (141, 3)
    q, k, v = _random_attention_inputs(layout, width, rows)
    with torch.no_grad():
        flex = shared_prompt_flex(q, k, v, layout, scaling=0.25)
        sdpa = shared_prompt_sdpa(q, k, v, layout, scaling=0.25)
    real = _real_positions(layout, width)
    torch.testing.assert_close(flex[real], sdpa[real], atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("packed", [False, True])
def test_flex_attention_path_on_cuda_equals_sdpa_path_with_gradients(packed):
    from hf_dpo.attention import shared_prompt_attention, shared_prompt_sdpa
    from hf_dpo.collator import SharedPromptLayout

    layout = SharedPromptLayout(lengths=((70, 30, 41), (9, 100, 0), (130, 1, 2)), packed=packed)
    width, rows = (sum(map(sum, layout.lengths)), 1) if packed else (141, 3)
    inputs = _random_attention_inputs(layout, width, rows, device="cuda", requires_grad=True)
    flex = shared_prompt_attention(*inputs, layout, scaling=0.25)  # CUDA: the FlexAttention path
    sdpa = shared_prompt_sdpa(*inputs, layout, scaling=0.25)
    real = _real_positions(layout, width).cuda()
    torch.testing.assert_close(flex[real], sdpa[real], atol=1e-5, rtol=1e-5)
    weights = torch.randn(flex.shape, device="cuda") * real[..., None, None]
    for g, s in zip(
        torch.autograd.grad((flex * weights).sum(), inputs),
        torch.autograd.grad((sdpa * weights).sum(), inputs),
    ):
        torch.testing.assert_close(g, s, atol=1e-4, rtol=1e-4)


def test_shared_rows_refuse_what_they_cannot_compute():
    """A sliding window shorter than a sequence, or a key/value cache, raise instead of computing wrong."""
    from hf_dpo.attention import varlen_sdpa_attention
    from hf_dpo.collator import SharedPromptLayout

    layout = SharedPromptLayout(lengths=((5, 3, 4),), packed=False)
    module = torch.nn.Module()
    q, k, v = _random_attention_inputs(layout, 12, 1)
    kwargs = {"shared_prompt_layout": layout}
    varlen_sdpa_attention(module, q, k, v, None, sliding_window=9, **kwargs)  # 5 + 4 fits in 9
    with pytest.raises(ValueError, match="sliding window"):
        varlen_sdpa_attention(module, q, k, v, None, sliding_window=8, **kwargs)
    with pytest.raises(ValueError, match="cache"):
        varlen_sdpa_attention(module, q[:, :, -1:], k, v, None, **kwargs)
