"""hf_dpo's attention for packed and prompt-shared rows, where plain sdpa/eager would be slow or wrong.

Packed rows (padding-free): one row holds all 2B sequences back to back. Flash-attention's varlen kernels
attend within each sequence; plain sdpa/eager would instead build an N x N block-diagonal mask and spend
N^2 work on a row of N tokens, which is slower than padding. `hf_dpo_varlen` runs causal sdpa on each
sequence of the row separately (sum of L_i^2 work, no mask) when the batch carries `cu_seq_lens_q`.

Prompt-shared rows (`hf_dpo.collator.SharedPromptLayout`): ``[prompt | completion 0 | completion 1 | ...]``,
where a completion attends to the prompt and, causally, to itself, never to another completion. With the
layout passed as the `shared_prompt_layout` forward kwarg, `hf_dpo_varlen` runs, per completion, one sdpa of
its queries over [prompt keys; its own keys] (`shared_prompt_sdpa`): never more attention work than the
unshared rows, much less when prompts are long. On CUDA it runs FlexAttention instead, with one BlockMask
per forward built from document and completion ids.

Otherwise (padded batches, generation with a cache) it is plain sdpa, so the same model serves every batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .collator import SharedPromptLayout

VARLEN_ATTENTION = "hf_dpo_varlen"
SHARED_LAYOUT_KWARG = "shared_prompt_layout"

# Architectures whose attention is the standard one of transformers (q/k/v projections, RoPE from
# position_ids, one call of the attention interface per layer with no score modification), checked by hand.
SHARED_PROMPT_MODEL_TYPES = frozenset(
    {
        "llama",
        "mistral",
        "mixtral",
        "qwen2",
        "qwen2_moe",
        "qwen3",
        "qwen3_moe",
        "phi3",
        "gemma",
        "granite",
        "olmo2",
    }
)
# Attention implementations hf_dpo_varlen may replace: the same math, computed another way.
_REPLACEABLE = frozenset({"sdpa", "eager", "flex_attention", VARLEN_ATTENTION})


def varlen_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """query (R, H, T, D), key/value (R, H_kv, T, D) -> (R, T, H, D), None.

    Prompt-shared rows (kwarg `shared_prompt_layout`), packed sequences (kwarg `cu_seq_lens_q`, one row), or
    plain sdpa."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    layout = kwargs.get(SHARED_LAYOUT_KWARG)
    if layout is not None:
        _check_shared_call(layout, query, key, kwargs)
        dropout_p = dropout if module.training else 0.0
        return shared_prompt_attention(query, key, value, layout, scaling, dropout_p, module.training), None
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
    """Switch a model on sdpa/eager to `hf_dpo_varlen` for padding-free and prompt-shared batches;
    flash-attention models keep their own varlen kernels (and cannot share prompts). Returns True if the
    model now uses hf_dpo_varlen."""
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


# ------------------------------------------------------------------------------------ prompt sharing
def can_share_prompt(models: dict, max_length: int | None) -> bool:
    """Whether every named model ({"model": ..., "ref_model": ...}) can read each prompt once; if not, one log
    line says why (the run then repeats the prompt before every completion, as without share_prompt)."""
    import logging

    for name, model in models.items():
        reason = None if model is None else prompt_sharing_unsupported(model, max_length)
        if reason is not None:
            logging.getLogger("hf_dpo.trainer").warning(
                "share_prompt is off for this run: the %s cannot share prompts: %s", name, reason
            )
            return False
    return True


def prompt_sharing_unsupported(model: torch.nn.Module, max_length: int | None) -> str | None:
    """Why `model` cannot run prompt-shared rows exactly, or None if it can (after `use_varlen_attention`).

    max_length: the longest prompt + completion the data may hold (None: unbounded); a sliding window at least
    that long never cuts a sequence, so it is no obstacle."""
    config = getattr(model, "config", None)
    if config is None:
        return "the model has no transformers config"
    implementation = str(getattr(config, "_attn_implementation", None) or "eager")
    if implementation not in _REPLACEABLE:
        return (
            f"attn_implementation={implementation!r} cannot keep the completions of a row apart (hf_dpo "
            "shares prompts with sdpa, eager or flex_attention models)"
        )
    model_type = getattr(config, "model_type", None)
    if model_type not in SHARED_PROMPT_MODEL_TYPES:
        return (
            f"model type {model_type!r} is not one whose attention hf_dpo has checked for shared prompts "
            f"({', '.join(sorted(SHARED_PROMPT_MODEL_TYPES))})"
        )
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None) or []
    windowed = any(t != "full_attention" for t in layer_types) or (not layer_types and window is not None)
    if windowed and window is not None and (max_length is None or max_length > window):
        return (
            f"its sliding-window attention ({window} tokens) would cut sequences longer than that "
            f"(max_length {max_length})"
        )
    if windowed and window is None:
        return f"its layer types {sorted(set(layer_types))} are not all full attention"
    if getattr(config, "attn_logit_softcapping", None) is not None:
        return "it modifies attention scores (attn_logit_softcapping)"
    return None


def require_shared_attention(model: torch.nn.Module) -> None:
    """Raise unless `model` attends with hf_dpo_varlen, the only attention that reads a shared layout (any
    other would let every completion see the others: silently wrong log-probs)."""
    from .modeling import unwrap

    implementation = getattr(getattr(unwrap(model), "config", None), "_attn_implementation", None)
    if implementation != VARLEN_ATTENTION:
        raise ValueError(
            f"a prompt-shared batch needs attn_implementation={VARLEN_ATTENTION!r} (hf_dpo.attention."
            f"use_varlen_attention), but the model uses {implementation!r}; build the trainer with "
            "share_prompt=True so it switches the model, or collate without share_prompt"
        )


def _check_shared_call(layout: SharedPromptLayout, query, key, kwargs) -> None:
    expected = (1, sum(sum(row) for row in layout.lengths)) if layout.packed else (layout.num_rows, None)
    if query.shape[0] != expected[0] or (expected[1] is not None and query.shape[2] != expected[1]):
        raise ValueError(f"query of shape {tuple(query.shape)} does not match the shared-prompt layout")
    if key.shape[2] != query.shape[2]:
        raise ValueError("a shared-prompt batch cannot run with a key/value cache")
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise ValueError("shared prompts cannot run attention with softcapping or sinks")
    window = kwargs.get("sliding_window")
    if window is not None:
        longest = max(prompt + max(completions, default=0) for prompt, *completions in layout.lengths)
        if longest > window:
            raise ValueError(
                f"a sequence of {longest} tokens is longer than the sliding window ({window}): share_prompt=False"
            )


def shared_prompt_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: SharedPromptLayout,
    scaling: float | None = None,
    dropout_p: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """Attention over prompt-shared rows: query (R, H, T, D), key/value (R, H_kv, T, D) -> (R, T, H, D).

    FlexAttention on CUDA (without dropout, which it lacks); per-segment sdpa elsewhere."""
    if query.device.type == "cuda" and dropout_p == 0.0 and _has_flex_attention():
        return shared_prompt_flex(query, key, value, layout, scaling, training)
    return shared_prompt_sdpa(query, key, value, layout, scaling, dropout_p)


def shared_prompt_sdpa(query, key, value, layout: SharedPromptLayout, scaling=None, dropout_p=0.0):
    """Per row, per completion: its queries over [prompt; its own] keys, each in the cheaper of two ways.

    - causal sdpa over the queries [prompt; completion] ((P + L)^2 / 2 work, the unshared cost): the prompt's
      outputs come out of it too, so the row's first completion, which follows the prompt (one slice: no
      copy), always goes this way;
    - its L queries alone over the P + L keys with an (L, P + L) mask (L (P + L) work: the kernel cannot
      skip the masked triangle), cheaper for the other completions when L < P.
    Every call takes 4D (1, H, L, D) slices: on CPU, sdpa's flash kernel (which takes a mask) only runs on
    4D inputs, and 3D ones fall back to the slower math kernel. Padding positions (padded rows) get zeros:
    no query reads them and nothing is scored there."""
    from transformers.integrations.sdpa_attention import repeat_kv
    from transformers.utils.import_utils import is_torch_greater_or_equal

    gqa = {}
    if query.shape[1] != key.shape[1]:
        if is_torch_greater_or_equal(
            "2.5"
        ):  # sdpa reads grouped keys itself: no copy (its CPU flash kernel too)
            gqa["enable_gqa"] = True
        else:
            groups = query.shape[1] // key.shape[1]
            key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    width = query.shape[2]

    def attend(queries, keys, values, mask=None):
        return F.scaled_dot_product_attention(
            queries,
            keys,
            values,
            attn_mask=mask,
            dropout_p=dropout_p,
            scale=scaling,
            is_causal=mask is None,
            **gqa,
        )

    rows, heads, dim = query.shape[0], query.shape[1], query.shape[3]
    pieces: list[torch.Tensor] = []  # (1, L, H, D), in the order of the flattened (R * T) positions
    filled = 0  # flattened positions covered by `pieces` so far
    for _, row, start, prompt, parts in layout.segments():
        q, k, v = query[row : row + 1], key[row : row + 1], value[row : row + 1]  # (1, H, T, D)
        span = slice(start, start + prompt)
        outputs = []
        for _, begin, length in parts:
            own = slice(begin, begin + length)
            if not outputs:  # the first completion follows the prompt: [prompt; completion] is one slice
                whole = slice(start, begin + length)
                out = attend(q[:, :, whole], k[:, :, whole], v[:, :, whole])
                outputs += [out[:, :, :prompt], out[:, :, prompt:]]
                continue
            keys = torch.cat([k[:, :, span], k[:, :, own]], dim=2)
            values = torch.cat([v[:, :, span], v[:, :, own]], dim=2)
            if length >= prompt:
                out = attend(torch.cat([q[:, :, span], q[:, :, own]], dim=2), keys, values)
                outputs.append(out[:, :, prompt:])
            else:
                mask = _completion_mask(layout, prompt, length, query.device)
                outputs.append(attend(q[:, :, own], keys, values, mask))
        if not outputs and prompt:  # a row without completions
            outputs.append(attend(q[:, :, span], k[:, :, span], v[:, :, span]))
        offset = row * width + start
        if offset > filled:  # the padding of the row before
            pieces.append(query.new_zeros(1, offset - filled, heads, dim))
        pieces += [out.transpose(1, 2) for out in outputs if out.shape[2]]
        filled = offset + sum(out.shape[2] for out in outputs)
    if filled < rows * width:
        pieces.append(query.new_zeros(1, rows * width - filled, heads, dim))
    # One copy into the (R, T, H, D) output, as the unshared path's transpose + contiguous.
    return torch.cat(pieces, dim=1).view(rows, width, heads, dim)


def _completion_mask(layout: SharedPromptLayout, prompt: int, length: int, device) -> torch.Tensor:
    """(L, P + L) bool: a completion's token i sees the whole prompt and its own tokens 0..i."""
    key = ("completion_mask", prompt, length, str(device))
    if key not in layout.cache:
        layout.cache[key] = torch.ones(length, prompt + length, dtype=torch.bool, device=device).tril(prompt)
    return layout.cache[key]


def shared_prompt_token_ids(
    layout: SharedPromptLayout, width: int, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, T) document ids (the row's index b; -1 on padding) and segment ids (0 prompt, k + 1 completion k,
    -1 padding) of every position of the batch's tensors."""
    rows = 1 if layout.packed else layout.num_rows
    documents = torch.full((rows, width), -1, dtype=torch.long)
    segments = torch.full((rows, width), -1, dtype=torch.long)
    for b, row, start, prompt, parts in layout.segments():
        end = start + prompt + sum(layout.lengths[b][1:])
        documents[row, start:end] = b
        segments[row, start : start + prompt] = 0
        for k, begin, length in parts:
            segments[row, begin : begin + length] = k + 1
    return documents.to(device), segments.to(device)


def shared_prompt_visible(documents, segments, batch, q_index, kv_index):
    """Whether query position q_index may attend to key position kv_index in tensor row `batch`: same
    document, not later, and the key is in the prompt or in the query's own completion. Padding (-1) sees
    earlier padding of its row only, so no query is left with nothing to attend to."""
    same_document = documents[batch, q_index] == documents[batch, kv_index]
    key_segment = segments[batch, kv_index]
    return (
        same_document
        & (kv_index <= q_index)
        & ((key_segment == 0) | (key_segment == segments[batch, q_index]))
    )


def shared_prompt_dense_mask(layout: SharedPromptLayout, width: int, device=None) -> torch.Tensor:
    """(R, T, T) bool: the full mask of `shared_prompt_visible` (for tests and for a single masked sdpa)."""
    documents, segments = shared_prompt_token_ids(layout, width, device)
    positions = torch.arange(width, device=documents.device)
    batch = torch.arange(documents.shape[0], device=documents.device)[:, None, None]
    return shared_prompt_visible(
        documents, segments, batch, positions[None, :, None], positions[None, None, :]
    )


def shared_prompt_block_mask(layout: SharedPromptLayout, width: int, device):
    """FlexAttention BlockMask of `shared_prompt_visible`, built once per layout and device."""
    from torch.nn.attention.flex_attention import create_block_mask

    key = ("block_mask", width, str(device))
    if key not in layout.cache:
        documents, segments = shared_prompt_token_ids(layout, width, device)

        def mask_mod(batch, head, q_index, kv_index):
            return shared_prompt_visible(documents, segments, batch, q_index, kv_index)

        layout.cache[key] = create_block_mask(
            mask_mod, B=documents.shape[0], H=None, Q_LEN=width, KV_LEN=width, device=device
        )
    return layout.cache[key]


def shared_prompt_flex(query, key, value, layout: SharedPromptLayout, scaling=None, training=False):
    """FlexAttention with the shared-prompt BlockMask: compiled (transformers' wrapper) on CUDA; eager
    elsewhere, which runs forward only (PyTorch has no FlexAttention backward on CPU)."""
    from torch.nn.attention.flex_attention import flex_attention

    block_mask = shared_prompt_block_mask(layout, query.shape[2], query.device)
    kwargs = dict(block_mask=block_mask, scale=scaling, enable_gqa=query.shape[1] != key.shape[1])
    if query.device.type == "cuda":
        from transformers.integrations.flex_attention import compile_friendly_flex_attention

        out = compile_friendly_flex_attention(query, key, value, training=training, **kwargs)
    else:
        out = flex_attention(query, key, value, **kwargs)
    return out.transpose(1, 2).contiguous()


def _has_flex_attention() -> bool:
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True
