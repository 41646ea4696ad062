"""Sequence log-prob tests: against a per-position loop, in chunks, with and without the fused head."""

import math

import pytest
import torch
import torch.nn.functional as F

from hf_dpo.logps import sequence_logps, sequence_logps_from_hidden, token_logps


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
        out, _ = token_logps(x, targets, w, chunk_size=8)
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
