"""Sequence log-prob tests: against a per-position loop, in chunks, with and without the fused head."""

import math

import pytest
import torch
import torch.nn.functional as F

from hf_dpo.logps import (
    SequenceLogps,
    length_desensitized_weights,
    sequence_logps,
    sequence_logps_from_hidden,
    token_logps,
)


def loop_reference(logits, input_ids, completion_mask, reduction="sum"):
    """The definition, one position at a time: sum_t log softmax(logits[t-1])[input_ids[t]] over completion t."""
    out = []
    for r in range(input_ids.shape[0]):
        total, count = 0.0, 0
        for t in range(1, input_ids.shape[1]):
            if completion_mask[r, t]:
                total = total + torch.log_softmax(logits[r, t - 1].double(), -1)[input_ids[r, t]]
                count += 1
        out.append(total / count if reduction == "mean" else total)
    return torch.stack([torch.as_tensor(x, dtype=torch.float64) for x in out])


def seed_compute_logprobs(logits, labels, mask):
    """The seed document's sketch, verbatim in substance (gathers with labels.unsqueeze(1))."""
    labels = labels[:, 1:].clone()
    logits = logits[:, :-1, :]
    logps = F.log_softmax(logits, dim=-1)
    select = torch.gather(input=logps, dim=-1, index=labels.unsqueeze(1)).squeeze(1)
    mask = mask[:, 1:].clone()
    return (select * mask).sum(-1) / mask.sum(-1)


def _batch(rows=3, length=9, vocab=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, length, vocab, generator=g) * 3
    input_ids = torch.randint(0, vocab, (rows, length), generator=g)
    mask = torch.zeros(rows, length, dtype=torch.long)
    mask[0, 3:9] = 1  # prompt of 3, completion to the end
    mask[1, 5:7] = 1  # prompt of 5, completion 2, padding after
    if rows > 2:
        mask[2, 1:4] = 1
    return logits, input_ids, mask


def test_hand_value_uniform_logits():
    """Uniform logits over V=4: every token has log-prob -ln 4; 3 completion tokens -> sum -3 ln 4, mean -ln 4."""
    logits = torch.zeros(1, 5, 4)
    ids = torch.tensor([[1, 2, 3, 0, 0]])
    mask = torch.tensor([[0, 1, 1, 1, 0]])
    out = sequence_logps(logits, ids, mask)
    assert out.logps.item() == pytest.approx(-3 * math.log(4), abs=1e-6)
    assert out.token_counts.item() == 3
    assert sequence_logps(logits, ids, mask, reduction="mean").logps.item() == pytest.approx(-math.log(4))


def test_shift_hand_value():
    """Position t-1 predicts token t: logits at position 0 put all mass (log-prob 0) on token 2, uniform
    elsewhere. Input [1, 2, 3] with completion [2, 3]: log p(2)=0 (from position 0) + log p(3) = -ln 4."""
    logits = torch.zeros(1, 3, 4)
    logits[0, 0, 2] = 1e4
    out = sequence_logps(logits, torch.tensor([[1, 2, 3]]), torch.tensor([[0, 1, 1]]))
    assert out.logps.item() == pytest.approx(-math.log(4), abs=1e-5)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("chunk_size", [None, 1, 2, 5])
def test_matches_loop_in_chunks(reduction, chunk_size):
    logits, ids, mask = _batch()
    out = sequence_logps(logits, ids, mask, reduction=reduction, chunk_size=chunk_size)
    torch.testing.assert_close(
        out.logps.double(), loop_reference(logits, ids, mask, reduction), atol=1e-6, rtol=0
    )


def test_seed_sketch_bug_is_caught():
    """The seed's `labels.unsqueeze(1)` gathers every label from position 0's distribution: it disagrees with
    the definition, while ours agrees (same reduction: mean)."""
    logits, ids, mask = _batch(seed=3)
    ref = loop_reference(logits, ids, mask, "mean")
    seed = seed_compute_logprobs(logits, ids, mask).double()
    ours = sequence_logps(logits, ids, mask, reduction="mean").logps.double()
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)
    assert (seed - ref).abs().max() > 1e-2


def test_gradients_match_naive_autograd():
    logits, ids, mask = _batch(rows=4, length=12, vocab=17, seed=5)
    mask = torch.ones_like(mask)
    mask[:, :4] = 0
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    weights = torch.tensor([0.3, -1.0, 2.0, 0.5])
    (sequence_logps(a, ids, mask, chunk_size=3).logps * weights).sum().backward()
    naive = torch.log_softmax(b[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    ((naive * mask[:, 1:]).sum(-1) * weights).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=0)


def test_fused_head_matches_logits_path_with_gradients():
    torch.manual_seed(0)
    rows, length, hidden_size, vocab = 4, 10, 8, 37
    hidden = torch.randn(rows, length, hidden_size, dtype=torch.float64)
    weight = torch.randn(vocab, hidden_size, dtype=torch.float64)
    bias = torch.randn(vocab, dtype=torch.float64)
    ids = torch.randint(0, vocab, (rows, length))
    mask = torch.zeros(rows, length, dtype=torch.long)
    mask[:, 4:] = 1
    mask[2, 7:] = 0
    h1, w1, b1 = (t.clone().requires_grad_(True) for t in (hidden, weight, bias))
    h2, w2, b2 = (t.clone().requires_grad_(True) for t in (hidden, weight, bias))
    fused = sequence_logps_from_hidden(h1, w1, ids, mask, chunk_size=4, lm_head_bias=b1)
    plain = sequence_logps(h2 @ w2.t() + b2, ids, mask)
    torch.testing.assert_close(fused.logps.double(), plain.logps.double(), atol=1e-6, rtol=0)
    torch.testing.assert_close(fused.logit_sums, plain.logit_sums, atol=1e-5, rtol=0)
    fused.logps.sum().backward()
    plain.logps.sum().backward()
    for x, y in ((h1, h2), (w1, w2), (b1, b2)):
        torch.testing.assert_close(x.grad, y.grad, atol=1e-5, rtol=0)


def test_packed_rows_equal_padded_rows():
    """Two sequences packed into one row with restarting position ids give the padded result."""
    logits, ids, mask = _batch(rows=2, length=6, vocab=7, seed=9)
    mask[0] = torch.tensor([0, 0, 1, 1, 1, 1])
    mask[1] = torch.tensor([0, 1, 1, 1, 0, 0])
    padded = sequence_logps(logits, ids, mask)
    lens = [6, 4]
    packed_logits = torch.cat([logits[0, :6], logits[1, :4]])[None]
    packed_ids = torch.cat([ids[0, :6], ids[1, :4]])[None]
    packed_mask = torch.cat([mask[0, :6], mask[1, :4]])[None]
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    packed = sequence_logps(packed_logits, packed_ids, packed_mask, position_ids=pos)
    torch.testing.assert_close(packed.logps, padded.logps)
    torch.testing.assert_close(packed.token_counts, padded.token_counts)


def test_chunking_bounds_peak_memory_of_backward():
    """With chunk 8 over M = 4096 positions and V = 4096, no fp32 [M, V] temporary is saved for backward:
    the saved tensors are the input and per-position vectors only."""
    torch.manual_seed(0)
    x = torch.randn(4096, 64, requires_grad=True)
    w = torch.randn(4096, 64)
    targets = torch.randint(0, 4096, (4096,))
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = token_logps(x, targets, w, chunk_size=8).logps
    assert max(saved) <= 4096 * 64  # never 4096 x 4096
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_rejects_unknown_reduction():
    logits, ids, mask = _batch()
    with pytest.raises(ValueError, match="logp_reduction"):
        sequence_logps(logits, ids, mask, reduction="avg")


def test_sum_and_mean_differ_exactly_by_the_completion_length():
    logits, ids, mask = _batch(rows=3, length=9, vocab=11, seed=7)
    total = sequence_logps(logits, ids, mask, reduction="sum")
    mean = sequence_logps(logits, ids, mask, reduction="mean")
    lengths = mask[:, 1:].sum(-1).float()
    torch.testing.assert_close(total.token_counts, lengths)
    torch.testing.assert_close(mean.logps * lengths, total.logps, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------- per-token stats


def naive_stats(logits, input_ids, completion_mask):
    """From full fp64 logits, per sequence: entropy sum, top-1 hits, log sum p^2 sum, token log-prob sum."""
    logp = torch.log_softmax(logits[:, :-1].double(), -1)
    mask = completion_mask[:, 1:].bool()
    targets = input_ids[:, 1:]
    entropy = -(logp.exp() * logp).sum(-1)
    top1 = (logits[:, :-1].argmax(-1) == targets).double()
    log_sum_sq = torch.logsumexp(2 * logp, -1)
    token = logp.gather(-1, targets[..., None]).squeeze(-1)
    return [(x * mask).sum(-1) for x in (entropy, top1, log_sum_sq, token)]


def test_hand_value_stats_of_uniform_and_peaked_logits():
    """V = 4. Uniform logits: entropy ln 4 = 1.386294, log sum p^2 = log(4 / 16) = -ln 4, top-1 the first
    maximum (token 0). Logits [ln 3, 0, 0, 0] at the second position: p = (1/2, 1/6, 1/6, 1/6), entropy
    = 0.5 ln 2 + 3/6 ln 6 = 0.346574 + 0.895880 = 1.242453; sum p^2 = 1/4 + 3/36 = 1/3 -> -ln 3 = -1.098612;
    the target 0 is its top-1."""
    logits = torch.zeros(1, 3, 4)
    logits[0, 1, 0] = math.log(3)
    ids = torch.tensor([[1, 2, 0]])
    out = sequence_logps(logits, ids, torch.tensor([[0, 1, 1]]), with_stats=True)
    assert out.entropy_sums.item() == pytest.approx(math.log(4) + 1.242453, abs=1e-5)
    assert out.log_sum_sq_prob_sums.item() == pytest.approx(-math.log(4) - 1.098612, abs=1e-5)
    assert out.top1_hits.item() == 1.0  # target 2 misses (uniform: the first maximum is token 0); 0 hits
    assert out.logps.item() == pytest.approx(-math.log(4) + math.log(0.5), abs=1e-6)


@pytest.mark.parametrize("chunk_size", [None, 1, 3])
def test_stats_match_full_logits(chunk_size):
    logits, ids, mask = _batch(rows=3, length=9, vocab=11, seed=4)
    ids[0, 5] = logits[0, 4].argmax()  # at least one top-1 hit
    out = sequence_logps(logits, ids, mask, chunk_size=chunk_size, with_stats=True)
    entropy, top1, log_sum_sq, token = naive_stats(logits, ids, mask)
    torch.testing.assert_close(out.entropy_sums.double(), entropy, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.top1_hits.double(), top1, atol=0, rtol=0)
    torch.testing.assert_close(out.log_sum_sq_prob_sums.double(), log_sum_sq, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.token_logp_sums.double(), token, atol=1e-5, rtol=0)
    assert top1.sum() >= 1
    plain = sequence_logps(logits, ids, mask, chunk_size=chunk_size)
    assert torch.equal(plain.logps, out.logps)  # the statistics do not touch the log-probs
    assert plain.entropy_sums is None and plain.top1_hits is None and plain.log_sum_sq_prob_sums is None


def test_stats_with_the_fused_head_and_packed_rows():
    torch.manual_seed(1)
    hidden = torch.randn(2, 7, 5)
    weight, bias = torch.randn(13, 5), torch.randn(13)
    ids = torch.randint(0, 13, (2, 7))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 0, 0]])
    fused = sequence_logps_from_hidden(
        hidden, weight, ids, mask, chunk_size=2, lm_head_bias=bias, with_stats=True
    )
    logits = hidden @ weight.t() + bias
    for got, want in zip(
        (fused.entropy_sums, fused.top1_hits, fused.log_sum_sq_prob_sums), naive_stats(logits, ids, mask)
    ):
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)
    # the same two sequences packed into one row
    lens = [7, 5]
    packed = sequence_logps(
        torch.cat([logits[0], logits[1, :5]])[None],
        torch.cat([ids[0], ids[1, :5]])[None],
        torch.cat([mask[0], mask[1, :5]])[None],
        position_ids=torch.cat([torch.arange(n) for n in lens])[None],
        with_stats=True,
    )
    torch.testing.assert_close(packed.entropy_sums, fused.entropy_sums, atol=1e-5, rtol=0)
    torch.testing.assert_close(packed.top1_hits, fused.top1_hits)


def test_stats_stay_within_one_chunk_block_in_forward_and_backward():
    """Every tensor any op produces, in forward (with statistics) and backward, has at most chunk * V
    elements (or the size of an input): the statistics add no [M, V] tensor and no second block per op."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class LargestOutput(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for value in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(value, torch.Tensor):
                    self.largest = max(self.largest, value.numel())
            return out

    torch.manual_seed(0)
    m, h, v, chunk = 512, 16, 1024, 8
    x = torch.randn(m, h, requires_grad=True)
    w = torch.randn(v, h)
    targets = torch.randint(0, v, (m,))
    with LargestOutput() as mode:
        result = token_logps(x, targets, w, chunk_size=chunk, with_stats=True)
        (result.logps.sum() + 0 * result.entropy.sum()).backward()
    assert mode.largest <= max(chunk * v, v * h, m * h)
    assert torch.isfinite(x.grad).all()


def test_stats_carry_no_gradient():
    logits, ids, mask = _batch()
    out = sequence_logps(logits.clone().requires_grad_(True), ids, mask, with_stats=True)
    assert out.logps.requires_grad and out.token_logp_sums.requires_grad
    assert not any(t.requires_grad for t in (out.entropy_sums, out.top1_hits, out.log_sum_sq_prob_sums))


# ---------------------------------------------------------------------------------------------- LD-DPO


def test_ld_alpha_hand_value():
    """Uniform logits over V = 4 (every token -ln 4). Prompt 0 has completions of 3 and 5 tokens: shared
    length 3. alpha 0.5: chosen -3 ln 4 = -4.158883; rejected (3 + 0.5 * 2)(-ln 4) = -4 ln 4 = -5.545177.
    The plain sums (token_logp_sums) stay -3 ln 4 and -5 ln 4."""
    logits = torch.zeros(2, 7, 4)
    ids = torch.ones(2, 7, dtype=torch.long)
    mask = torch.tensor([[0, 1, 1, 1, 0, 0, 0], [0, 1, 1, 1, 1, 1, 0]])
    out = sequence_logps(logits, ids, mask, ld_alpha=0.5, sequence_group=torch.tensor([0, 0]))
    ln4 = math.log(4)
    torch.testing.assert_close(out.logps, torch.tensor([-3 * ln4, -4 * ln4]))
    torch.testing.assert_close(out.token_logp_sums, torch.tensor([-3 * ln4, -5 * ln4]))


def test_ld_alpha_one_is_plain_and_zero_keeps_the_shared_prefix():
    logits, ids, mask = _batch(rows=4, length=9, vocab=11, seed=6)
    mask[2] = torch.tensor([0, 0, 1, 1, 1, 1, 0, 0, 0])
    mask[3] = torch.tensor([0, 0, 1, 0, 0, 0, 0, 0, 0])
    group = torch.tensor([0, 1, 0, 1])  # completion-major: sequences 0, 2 answer prompt 0; 1, 3 prompt 1
    plain = sequence_logps(logits, ids, mask)
    one = sequence_logps(logits, ids, mask, ld_alpha=1.0, sequence_group=group)
    torch.testing.assert_close(one.logps, plain.logps)
    zero = sequence_logps(logits, ids, mask, ld_alpha=0.0, sequence_group=group)
    # completions of 6 and 4 tokens (prompt 0), 2 and 1 (prompt 1): keep the first 4, resp. 1, tokens
    shared = {0: 4, 1: 1}
    expected = []
    for r in range(4):
        positions = [t for t in range(1, 9) if mask[r, t]][: shared[int(group[r])]]
        expected.append(sum(torch.log_softmax(logits[r, t - 1].double(), -1)[ids[r, t]] for t in positions))
    torch.testing.assert_close(zero.logps.double(), torch.stack(expected), atol=1e-6, rtol=0)


def test_ld_weights_skip_empty_responses_and_follow_packed_order():
    """Three responses to one prompt, one empty (a padding response): the shared length is the shortest
    non-empty one. Tokens of a sequence may come in any interleaving with other sequences' tokens."""
    sequence_index = torch.tensor([2, 0, 0, 2, 0, 2, 2])  # seq 0 has 3 tokens, seq 2 has 4, seq 1 none
    counts = torch.tensor([3.0, 0.0, 4.0])
    weights = length_desensitized_weights(sequence_index, counts, torch.tensor([0, 0, 0]), ld_alpha=0.25)
    # shared length 3: the 4th token of sequence 2 (its last occurrence, index 6) weighs 0.25
    torch.testing.assert_close(weights, torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.25]))


def test_ld_alpha_needs_the_groups():
    logits, ids, mask = _batch()
    with pytest.raises(ValueError, match="sequence_group"):
        sequence_logps(logits, ids, mask, ld_alpha=0.5)


def test_by_row_is_completion_major():
    """S = K * B sequences, completion-major: sequence k * B + b is response k of prompt b."""
    values = torch.arange(6.0)
    rows = SequenceLogps(values, values + 10, values + 20, token_logp_sums=values, top1_hits=None).by_row(3)
    torch.testing.assert_close(rows.logps, torch.tensor([[0.0, 3.0], [1.0, 4.0], [2.0, 5.0]]))
    torch.testing.assert_close(rows.token_counts[:, 1], torch.tensor([13.0, 14.0, 15.0]))
    assert rows.top1_hits is None


def test_mean_reduction_keeps_plain_sums_for_sft():
    logits, ids, mask = _batch(seed=8)
    total = sequence_logps(logits, ids, mask)
    mean = sequence_logps(logits, ids, mask, reduction="mean")
    torch.testing.assert_close(mean.token_logp_sums, total.logps)
    assert total.token_logp_sums is total.logps  # no extra tensor in the default case
