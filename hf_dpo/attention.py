"""Variable-length attention for padding-free batches without flash-attention (CPU, or GPUs without it).

A padding-free batch is one row holding all 2B sequences back to back. Flash-attention's varlen kernels
attend within each sequence; plain sdpa/eager would instead build an N x N block-diagonal mask and spend
N^2 work on a row of N tokens, which is slower than padding. `hf_dpo_varlen` runs causal sdpa on each
sequence of the row separately (sum of L_i^2 work, no mask) when the batch carries `cu_seq_lens_q`, and is
plain sdpa otherwise, so the same model serves padded batches unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

VARLEN_ATTENTION = "hf_dpo_varlen"


def varlen_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """query (1, H, N, D), key/value (1, H_kv, N, D) -> (1, N, H, D), None; sequences given by cu_seq_lens_q."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    cu_seq_lens = kwargs.get("cu_seq_lens_q")
    if cu_seq_lens is None or query.shape[0] != 1 or attention_mask is not None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    dropout_p = dropout if module.training else 0.0
    bounds = cu_seq_lens.tolist()
    pieces = [
        F.scaled_dot_product_attention(
            query[:, :, start:end],
            key[:, :, start:end],
            value[:, :, start:end],
            dropout_p=dropout_p,
            scale=scaling,
            is_causal=True,
        )
        for start, end in zip(bounds[:-1], bounds[1:])
        if end > start
    ]
    return torch.cat(pieces, dim=2).transpose(1, 2).contiguous(), None


def varlen_mask(
    batch_size: int, q_length: int, kv_length: int, *args, attention_mask=None, **kwargs
) -> torch.Tensor | None:
    """No mask for a packed row (one row, no padding mask, no cache: the sequences are cut by cu_seq_lens);
    sdpa's own mask otherwise (padded batches, generation with a cache)."""
    from transformers.masking_utils import sdpa_mask

    no_cache = kwargs.get("q_offset", 0) == 0 and kwargs.get("kv_offset", 0) == 0
    if attention_mask is None and batch_size == 1 and q_length == kv_length and no_cache:
        return None
    return sdpa_mask(batch_size, q_length, kv_length, *args, attention_mask=attention_mask, **kwargs)


def register_varlen_attention() -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN_ATTENTION, varlen_sdpa_attention)
    AttentionMaskInterface.register(VARLEN_ATTENTION, varlen_mask)
    return VARLEN_ATTENTION


def use_varlen_attention(model: torch.nn.Module) -> bool:
    """Switch a model on sdpa/eager to `hf_dpo_varlen` for padding-free batches; flash-attention models
    keep their own varlen kernels. Returns True if the model now uses hf_dpo_varlen."""
    config = getattr(model, "config", None)
    current = str(getattr(config, "_attn_implementation", "") or "")
    if "flash" in current or current == VARLEN_ATTENTION:
        return current == VARLEN_ATTENTION
    register_varlen_attention()
    for module in model.modules():
        module_config = getattr(module, "config", None)
        if module_config is not None and hasattr(module_config, "_attn_implementation"):
            module_config._attn_implementation = VARLEN_ATTENTION
    return True
