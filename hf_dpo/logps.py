"""Per-sequence log-probs of completion tokens, computed in chunks.

The DPO loss needs log pi(y|x) = sum_t log p(y_t | x, y_<t) over the completion tokens only (paper,
Eq. 7). Naively that is a log-softmax over a [rows, tokens, vocab] fp32 tensor, which is what runs a
single GPU out of memory on long sequences and large vocabularies. Here only the positions that predict a
completion token are taken, and they are processed `chunk_size` at a time, in forward and in backward
(the backward recomputes each chunk's softmax from the saved log-sum-exp), so the peak extra memory is one
[chunk, vocab] fp32 block. `sequence_logps_from_hidden` goes one step further and fuses the LM head, so
the [tokens, vocab] logits are never materialised at all.

The same chunks give per-token statistics of the next-token distribution on request (`with_stats`): its
entropy, whether its top-1 token is the completion token, and log sum_v p_v^2 (WPO). They are computed in
place in the chunk's block, so the memory bound holds, and summed per sequence without gradients.
LD-DPO (`ld_alpha`) weighs the tokens beyond the shortest completion of the same prompt by alpha when the
per-sequence sums are formed, for the policy and the reference alike.

Position convention: `input_ids[:, t]` is predicted by the output at position t - 1. `completion_mask`
marks completion tokens in input positions (1 on the completion tokens and their EOS; 0 on the prompt
and padding). For packed (padding-free) rows, `position_ids` restarts at 0 for each sequence. In a
prompt-shared row ``[prompt | completion 0 | completion 1 | ...]`` (`hf_dpo.collator.SharedPromptLayout`)
the first token of EVERY completion is predicted by the prompt's last position, the others by the position
before them (`shared_completion_positions`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch

if TYPE_CHECKING:
    from .collator import SharedPromptLayout

DEFAULT_CHUNK_ELEMENTS = 1 << 24  # fp32 elements per chunk (64 MiB): [chunk_size, vocab] at most.


@dataclass
class SequenceLogps:
    """Per-sequence results: (S,) tensors, S the number of sequences, or (B, K) after `by_row`.

    logps: sum (or mean, with reduction="mean") of completion-token log-probs; with ld_alpha, the tokens
        beyond the shortest completion of the same prompt weigh ld_alpha (LD-DPO). What the losses compare.
    token_counts: number of completion tokens.
    logit_sums: sum over completion tokens of the vocab-mean logit (for the `logits/*` metrics).
    token_logp_sums: the plain sum of completion-token log-probs (no mean, no LD weighting), with gradients;
        the same tensor as `logps` when reduction="sum" and ld_alpha is None. The sft loss reads it.
    With with_stats=True (detached, else None), sums over completion tokens of:
    entropy_sums: the entropy of the next-token distribution, -sum_v p_v log p_v.
    top1_hits: 1 where the most likely token is the completion token (ties: the first maximum).
    log_sum_sq_prob_sums: log sum_v p_v^2 (WPO's per-token normaliser).
    """

    logps: torch.Tensor
    token_counts: torch.Tensor
    logit_sums: torch.Tensor
    token_logp_sums: torch.Tensor | None = None
    entropy_sums: torch.Tensor | None = None
    top1_hits: torch.Tensor | None = None
    log_sum_sq_prob_sums: torch.Tensor | None = None

    def by_row(self, num_rows: int) -> SequenceLogps:
        """(K*B,) completion-major values -> (B, K): column k holds the k-th response of each prompt."""
        return SequenceLogps(
            **{
                name: None if value is None else value.view(-1, num_rows).t()
                for name, value in vars(self).items()
            }
        )


class TokenLogps(NamedTuple):
    """Per-position results of `token_logps`, each (M,) fp32; the statistics are None unless requested."""

    logps: torch.Tensor  # log p(target), with gradients
    mean_logits: torch.Tensor  # the vocab-mean logit
    entropy: torch.Tensor | None = None
    top1: torch.Tensor | None = None  # 1.0 where argmax == target
    log_sum_sq_probs: torch.Tensor | None = None  # log sum_v p_v^2


def default_chunk_size(vocab_size: int) -> int:
    return max(1, DEFAULT_CHUNK_ELEMENTS // max(1, vocab_size))


class _ChunkedTokenLogps(torch.autograd.Function):
    """log p(target) for M positions, from hidden states and an optional LM head, chunk by chunk.

    forward(hidden (M, H), weight (V, H) or None, bias (V,) or None, targets (M,), chunk_size, with_stats)
        -> (token_logps (M,) fp32, stats (M, 1) or (M, 4) fp32, non-differentiable)
    stats columns: the vocab-mean logit, then with_stats: entropy, top-1 hit, log sum_v p_v^2.
    With weight None, `hidden` already holds the logits (M, V).
    """

    @staticmethod
    def _logits(hidden_chunk, weight, bias):
        """A fresh fp32 [chunk, vocab] tensor that the caller may overwrite."""
        if weight is None:
            return hidden_chunk.to(torch.float32, copy=True)  # never an alias of the saved input
        logits = hidden_chunk @ weight.t()
        if bias is not None:
            logits = logits + bias
        return logits.float()

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, with_stats):
        num = hidden.shape[0]
        token_logps = hidden.new_empty(num, dtype=torch.float32)
        stats = hidden.new_empty(num, 4 if with_stats else 1, dtype=torch.float32)
        lse = hidden.new_empty(num, dtype=torch.float32)
        for start in range(0, num, chunk_size):
            end = min(start + chunk_size, num)
            chunk_targets = targets[start:end]
            logits = _ChunkedTokenLogps._logits(hidden[start:end], weight, bias)
            chunk_lse = torch.logsumexp(logits, dim=-1)
            token_logps[start:end] = logits.gather(1, chunk_targets[:, None]).squeeze(1) - chunk_lse
            stats[start:end, 0] = logits.mean(-1)
            lse[start:end] = chunk_lse
            if with_stats:
                stats[start:end, 2] = logits.argmax(-1) == chunk_targets
                # In place, so that the chunk's one [chunk, vocab] block is all the memory these take:
                # logits -> probabilities p, then p log p.
                probs = logits.sub_(chunk_lse[:, None]).exp_()
                stats[start:end, 3] = 2 * torch.linalg.vector_norm(probs, 2, dim=-1).log()
                stats[start:end, 1] = -probs.xlogy_(probs).sum(-1)
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk_size = chunk_size
        ctx.mark_non_differentiable(stats)
        return token_logps, stats

    @staticmethod
    def backward(ctx, grad_logps, _grad_stats):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if need_bias else None
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            end = min(start + ctx.chunk_size, hidden.shape[0])
            logits = _ChunkedTokenLogps._logits(hidden[start:end], weight, bias)
            # d log p(y) / d logits = onehot(y) - softmax(logits), scaled by the incoming gradient.
            # In place: the chunk's logits become its gradient, so one [chunk, vocab] fp32 block is alive.
            grad_logits = logits.sub_(lse[start:end, None]).exp_().mul_(-grad_logps[start:end, None])
            grad_logits.scatter_add_(1, targets[start:end, None], grad_logps[start:end, None])
            if weight is None:
                if need_hidden:
                    grad_hidden[start:end] = grad_logits.to(hidden.dtype)
                continue
            grad_logits = grad_logits.to(hidden.dtype)
            if need_hidden:
                grad_hidden[start:end] = grad_logits @ weight
            if need_weight:
                grad_weight += (grad_logits.t() @ hidden[start:end]).float()
            if need_bias:
                grad_bias += grad_logits.float().sum(0)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None


def token_logps(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    chunk_size: int | None = None,
    with_stats: bool = False,
) -> TokenLogps:
    """log p(targets) for M positions: (M, H) hidden states (or (M, V) logits when weight is None).

    Returns `TokenLogps`, (M,) fp32 tensors; only `logps` carries gradients. with_stats=True adds the
    per-token entropy, top-1 hit and log sum_v p_v^2, from the same chunks (no second pass, no extra block).
    """
    vocab = hidden.shape[-1] if weight is None else weight.shape[0]
    chunk = chunk_size or default_chunk_size(vocab)
    logps, stats = _ChunkedTokenLogps.apply(hidden, weight, bias, targets, chunk, with_stats)
    if not with_stats:
        return TokenLogps(logps, stats[:, 0])
    return TokenLogps(logps, stats[:, 0], stats[:, 1], stats[:, 2], stats[:, 3])


def completion_positions(
    input_ids: torch.Tensor, completion_mask: torch.Tensor, position_ids: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Which output positions predict a completion token, and which sequence each belongs to.

    Args:
        input_ids, completion_mask: (R, T); R rows (padded) or 1 row of packed sequences.
        position_ids: (R, T) for packed rows (restarting at 0 per sequence); None for padded rows.
    Returns:
        predictor_mask (R, T-1) bool: output position t predicts input token t+1, a completion token.
        targets (M,): the predicted token ids, M = predictor_mask.sum().
        sequence_index (M,): the sequence each predicted token belongs to.
        num_sequences: S (R for padded rows; the number of packed sequences otherwise).
    """
    predictor_mask = completion_mask[:, 1:].bool()
    if position_ids is None:
        sequence_of_position = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None].expand(
            -1, input_ids.shape[1]
        )
        num_sequences = input_ids.shape[0]
    else:
        starts = position_ids == 0
        # A sequence's first token has no predictor inside that sequence: never score it.
        predictor_mask = predictor_mask & ~starts[:, 1:]
        sequence_of_position = starts.flatten().cumsum(0).view_as(position_ids) - 1
        num_sequences = int(starts.sum())
    targets = input_ids[:, 1:][predictor_mask]
    sequence_index = sequence_of_position[:, 1:][predictor_mask]
    return predictor_mask, targets, sequence_index, num_sequences


def length_desensitized_weights(
    sequence_index: torch.Tensor, token_counts: torch.Tensor, sequence_group: torch.Tensor, ld_alpha: float
) -> torch.Tensor:
    """LD-DPO token weights (Liu et al. 2024, "Length Desensitization in DPO"): 1 for a sequence's first n
    completion tokens, n the length of the shortest non-empty completion of its prompt, ld_alpha after.

    Args:
        sequence_index: (M,) the sequence of each scored token; a sequence's tokens come in order.
        token_counts: (S,) completion tokens per sequence. sequence_group: (S,) the prompt of each
            sequence, an id in [0, S).
    Returns:
        (M,) weights, detached.
    """
    counts = token_counts.long()
    order = torch.argsort(sequence_index, stable=True)  # tokens grouped by sequence, in order within each
    first_slot = counts.cumsum(0) - counts
    position = torch.empty_like(sequence_index)
    position[order] = torch.arange(order.numel(), device=order.device) - first_slot[sequence_index[order]]
    no_limit = torch.iinfo(counts.dtype).max
    # One slot per sequence bounds the number of prompts, and needs no device sync to size.
    shared = torch.full((sequence_group.numel(),), no_limit, dtype=counts.dtype, device=counts.device)
    shared = shared.scatter_reduce(0, sequence_group, counts.masked_fill(counts == 0, no_limit), "amin")
    within = position < shared[sequence_group[sequence_index]]
    return torch.where(within, 1.0, ld_alpha).to(torch.float32)


def shared_completion_positions(
    input_ids: torch.Tensor, layout: SharedPromptLayout
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Which output positions predict a completion token in a prompt-shared batch, and whose token it is.

    Args:
        input_ids: (R, T): B padded rows or 1 packed row, laid out as `layout` says.
    Returns:
        predictor_index (M,): flat positions in (R*T) whose output predicts each completion token; the prompt's
            last position appears once per completion of its row.
        targets (M,): the predicted token ids.
        sequence_index (M,): completion k of row b is sequence k*B + b (the unshared numbering).
        num_sequences: S = B*K.
    A completion after an empty prompt has no predictor for its first token, which is then not scored (as
    in `completion_positions`).
    """
    width, rows = input_ids.shape[1], layout.num_rows
    predictors, positions, sequences = [], [], []
    for b, row, start, prompt, parts in layout.segments():
        base = row * width
        for k, begin, length in parts:
            first = 0 if prompt else 1  # with no prompt, nothing predicts the first completion token
            if first >= length:
                continue
            own = torch.arange(begin + first, begin + length)  # input positions of the scored tokens
            before = own - 1
            if prompt:
                before[0] = start + prompt - 1  # the first token follows the prompt, not what precedes it
            predictors.append(before + base)
            positions.append(own + base)
            sequences.append(torch.full((length - first,), k * rows + b))
    device = input_ids.device
    if not positions:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return empty, empty, empty, rows * layout.num_completions
    positions_ = torch.cat(positions).to(device)
    targets = input_ids.reshape(-1)[positions_]
    return (
        torch.cat(predictors).to(device),
        targets,
        torch.cat(sequences).to(device),
        rows * layout.num_completions,
    )


def _reduce(
    tokens: TokenLogps,
    sequence_index: torch.Tensor,
    num_sequences: int,
    reduction: str,
    ld_alpha: float | None = None,
    sequence_group: torch.Tensor | None = None,
) -> SequenceLogps:
    if reduction not in ("sum", "mean"):
        raise ValueError(f"logp_reduction must be 'sum' or 'mean', got {reduction!r}")
    per_token = tokens.logps
    zeros = per_token.new_zeros(num_sequences)

    def detached_sums(values):
        return None if values is None else zeros.detach().index_add(0, sequence_index, values.detach())

    counts = detached_sums(torch.ones_like(per_token))
    token_logp_sums = zeros.index_add(0, sequence_index, per_token)
    logps = token_logp_sums
    if ld_alpha is not None:
        if sequence_group is None:
            raise ValueError("ld_alpha needs sequence_group: the prompt (row) of each sequence")
        weights = length_desensitized_weights(sequence_index, counts, sequence_group, ld_alpha)
        logps = zeros.index_add(0, sequence_index, per_token * weights)
    if reduction == "mean":
        # The seed's option: average per completion token (the paper sums).
        logps = logps / counts.clamp(min=1)
    return SequenceLogps(
        logps=logps,
        token_counts=counts,
        logit_sums=detached_sums(tokens.mean_logits),
        token_logp_sums=token_logp_sums,
        entropy_sums=detached_sums(tokens.entropy),
        top1_hits=detached_sums(tokens.top1),
        log_sum_sq_prob_sums=detached_sums(tokens.log_sum_sq_probs),
    )


def _completion_inputs(states, input_ids, completion_mask, position_ids, shared_layout):
    """(M, D) rows of `states` (R, T, D) that predict a completion token, their targets (M,), the sequence of
    each (M,) and the number of sequences S; `shared_layout` for a prompt-shared batch."""
    if shared_layout is not None:
        index, targets, sequence_index, num_sequences = shared_completion_positions(input_ids, shared_layout)
        return states.flatten(0, 1)[index], targets, sequence_index, num_sequences
    predictor_mask, targets, sequence_index, num_sequences = completion_positions(
        input_ids, completion_mask, position_ids
    )
    return states[:, :-1][predictor_mask], targets, sequence_index, num_sequences


def sequence_logps(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    reduction: str = "sum",
    chunk_size: int | None = None,
    position_ids: torch.Tensor | None = None,
    with_stats: bool = False,
    ld_alpha: float | None = None,
    sequence_group: torch.Tensor | None = None,
    shared_layout: SharedPromptLayout | None = None,
) -> SequenceLogps:
    """Per-sequence completion log-probs from full logits.

    Args:
        logits: (R, T, V), any float dtype; upcast to fp32 one chunk at a time.
        input_ids, completion_mask: (R, T). position_ids: (R, T) for packed rows, else None.
        reduction: "sum" (the paper) or "mean" (divide by the completion length).
        chunk_size: positions per chunk; default keeps one chunk at <= 64 MiB fp32.
        with_stats: also the per-sequence entropy, top-1 and log sum p^2 sums (see `SequenceLogps`).
        ld_alpha: LD-DPO weight of the tokens beyond the shortest completion of the same prompt; None: 1.
        sequence_group: (S,) the prompt of each sequence, ids in [0, S) (needed with ld_alpha); for the
            collator's completion-major batches of B prompts, ``arange(S) % B``.
        shared_layout: for a prompt-shared batch, its layout (then completion_mask and position_ids are
            not read).
    Returns:
        SequenceLogps with (S,) tensors.
    """
    selected, targets, sequence_index, num_sequences = _completion_inputs(
        logits, input_ids, completion_mask, position_ids, shared_layout
    )
    tokens = token_logps(selected, targets, chunk_size=chunk_size, with_stats=with_stats)
    return _reduce(tokens, sequence_index, num_sequences, reduction, ld_alpha, sequence_group)


def sequence_logps_from_hidden(
    hidden_states: torch.Tensor,
    lm_head_weight: torch.Tensor,
    input_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    reduction: str = "sum",
    chunk_size: int | None = None,
    position_ids: torch.Tensor | None = None,
    lm_head_bias: torch.Tensor | None = None,
    with_stats: bool = False,
    ld_alpha: float | None = None,
    sequence_group: torch.Tensor | None = None,
    shared_layout: SharedPromptLayout | None = None,
) -> SequenceLogps:
    """Per-sequence completion log-probs from the final hidden states, with the LM head fused in.

    Args:
        hidden_states: (R, T, H) after the model's final norm. lm_head_weight: (V, H); lm_head_bias: (V,).
        Others as in `sequence_logps`.
    Only the M completion-predicting positions go through the head, chunk by chunk, so neither the
    [R, T, V] logits nor their fp32 log-softmax ever exist in full, in forward or backward.
    """
    selected, targets, sequence_index, num_sequences = _completion_inputs(
        hidden_states, input_ids, completion_mask, position_ids, shared_layout
    )
    tokens = token_logps(selected, targets, lm_head_weight, lm_head_bias, chunk_size, with_stats)
    return _reduce(tokens, sequence_index, num_sequences, reduction, ld_alpha, sequence_group)


# ----------------------------------------------------------------------------------- one forward of a model


def batch_logps(
    model: torch.nn.Module,
    batch: dict,
    *,
    reduction: str = "sum",
    chunk_size: int | None = None,
    with_stats: bool = False,
    ld_alpha: float | None = None,
) -> SequenceLogps:
    """Completion log-probs of every sequence of a collated batch (`hf_dpo.collator`) from ONE forward of
    `model`: padded rows, one packed row (padding-free), or prompt-shared rows. The LM head is fused in
    (`fusable_lm_head`) wherever its weight is a plain local tensor, else the model's logits are used."""
    from .attention import SHARED_LAYOUT_KWARG, require_shared_attention
    from .collator import SharedPromptLayout

    forward_kwargs = {"input_ids": batch["input_ids"], "use_cache": False}
    shared = SharedPromptLayout.from_batch(batch) if "shared_layout" in batch else None
    packed = shared is None and "attention_mask" not in batch
    if shared is not None:  # one sequence per row: [prompt | completion 0 | ...]
        require_shared_attention(model)
        forward_kwargs.update({"position_ids": batch["position_ids"], SHARED_LAYOUT_KWARG: shared})
    elif packed:  # sequence boundaries for flash-attention's varlen kernels or hf_dpo.attention's varlen sdpa
        keys = ("position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
        forward_kwargs.update({key: batch[key] for key in keys if key in batch})
    else:
        forward_kwargs["attention_mask"] = batch["attention_mask"]
    common = dict(
        input_ids=batch["input_ids"],
        completion_mask=batch["completion_mask"],
        reduction=reduction,
        chunk_size=chunk_size,
        position_ids=batch["position_ids"] if packed else None,
        with_stats=with_stats,
        shared_layout=shared,
    )
    if ld_alpha is not None:  # LD-DPO needs each sequence's row (completion-major order)
        rows, k = batch["response_mask"].shape
        group = torch.arange(rows * k, device=batch["input_ids"].device) % rows
        common.update(ld_alpha=ld_alpha, sequence_group=group)
    head = fusable_lm_head(model)
    if head is None:
        return sequence_logps(model(**forward_kwargs).logits, **common)
    with lm_head_returns_hidden_states(head):
        hidden = model(**forward_kwargs).logits
    return sequence_logps_from_hidden(hidden, head.weight, lm_head_bias=head.bias, **common)


# Model configs whose logits are post-processed after the LM head: the fused head would skip that.
_LOGIT_POSTPROCESSING = (
    "final_logit_softcapping",
    "logit_scale",
    "logits_scaling",
    "output_multiplier_scale",
)


def fusable_lm_head(model: torch.nn.Module) -> torch.nn.Linear | None:
    """The plain Linear LM head whose input may be taken instead of the logits, or None.

    The head's weight is applied after the model's forward. That is only right when the weight is a whole,
    local tensor outside the forward: never under DeepSpeed ZeRO-3 (a weight exists only inside its module's
    forward) or FSDP (a shard, a DTensor or a view into a flat parameter), so the real logits are used there.
    """
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    chain = [model]  # the wrappers, the peft model and its base model (the head's parent)
    while isinstance(getattr(chain[-1], "module", None), torch.nn.Module):
        chain.append(chain[-1].module)
    inner = chain[-1]
    if hasattr(inner, "get_base_model"):
        chain += [inner.base_model, inner.get_base_model()]
    if is_deepspeed_zero3_enabled() or any(isinstance(module, _fsdp_types()) for module in chain):
        return None
    config = getattr(inner, "config", None)
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in _LOGIT_POSTPROCESSING):
        return None
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if type(head) is not torch.nn.Linear:  # a LoRA-wrapped, quantised or FSDP2-wrapped head: real logits
        return None
    if any(_is_sharded(tensor) for tensor in (head.weight, head.bias) if tensor is not None):
        return None
    return head


def _fsdp_types() -> tuple[type, ...]:
    """FSDP1's wrapper class and FSDP2's `fully_shard` marker class (empty without distributed support)."""
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    except ImportError:
        return ()
    return (FullyShardedDataParallel, FSDPModule)


def _is_sharded(tensor: torch.Tensor) -> bool:
    """A DTensor (FSDP2, tensor parallel), an FSDP1 flat parameter, or a DeepSpeed ZeRO-3 partitioned one."""
    if hasattr(tensor, "ds_id") or type(tensor).__name__ == "FlatParameter":
        return True
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(tensor, DTensor)


@contextlib.contextmanager
def lm_head_returns_hidden_states(head: torch.nn.Linear) -> Iterator[None]:
    """Make the LM head the identity for one forward, so the model's `logits` are its final hidden states.

    The forward still goes through the (possibly DDP-wrapped) model, so hooks and gradient sync are intact;
    the head is then applied chunked, to the completion positions only.
    """
    head.forward = lambda hidden_states: hidden_states  # instance attribute shadows the class method
    try:
        yield
    finally:
        del head.forward
