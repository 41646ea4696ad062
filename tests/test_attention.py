"""hf_dpo_varlen attention: per-sequence sdpa for packed rows, plain sdpa for everything else."""

from __future__ import annotations

import copy

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
