"""RGLF loss (AVG-LLaVA stage 4) and the stage-3 multi-granularity loss, against the spec's formula written as loops."""

import math

import pytest
import torch

from multigran.train.rglf import answer_nll, mean_granularity_loss, rglf_loss


def loop_rglf(logits, nll, alpha=0.1, beta=1.0, gamma=1.0):
    """The spec's formula with plain Python numbers and loops; ties in nll broken by granularity index."""
    batch, levels = len(logits), len(logits[0])
    ce, rank = 0.0, 0.0
    s_all, l_all = [], []
    for b in range(batch):
        log_norm = math.log(sum(math.exp(z) for z in logits[b]))
        log_probs = [z - log_norm for z in logits[b]]
        sigma = sorted(range(levels), key=lambda g: (nll[b][g], g))
        s_all.append([log_probs[sigma[k]] for k in range(levels)])
        l_all.append([nll[b][sigma[k]] for k in range(levels)])
        ce -= s_all[b][0] / batch
    for j in range(1, levels):
        total = 0.0
        for b in range(batch):
            for k in range(levels - j):
                total += max(0.0, s_all[b][k + j] - s_all[b][k] + gamma * j * (l_all[b][k + j] - l_all[b][k]))
        rank += total / (batch * (levels - j))
    return alpha * ce + beta * rank, ce, rank


def test_closed_form_two_granularities():
    # z = (0, 0): log_softmax = (-ln 2, -ln 2). l = (1, 3): sigma = (0, 1).
    # L_ce = ln 2. L_rank (j = 1, one pair) = max(0, -ln2 + ln2 + 1 * 1 * (3 - 1)) = 2. L = 0.1 ln 2 + 2.
    parts = rglf_loss(torch.zeros(1, 2), torch.tensor([[1.0, 3.0]]), return_parts=True)
    assert parts["ce"].item() == pytest.approx(math.log(2), abs=1e-7)
    assert parts["rank"].item() == pytest.approx(2.0, abs=1e-7)
    assert parts["loss"].item() == pytest.approx(0.1 * math.log(2) + 2.0, abs=1e-7)


def test_hand_written_batch_of_two():
    logits = [[2.0, 1.0, 0.5, -1.0, 0.0], [0.3, -0.2, 1.5, 0.0, 0.7]]
    # sample 0: best granularity index 1 (0.9), then 4 (1.1), 0 (1.2), 2 (1.5), 3 (2.0)
    # sample 1: a tie 0.8 / 0.8 between index 0 and 1 (index 0 first), best is index 2 (0.6)
    nll = [[1.2, 0.9, 1.5, 2.0, 1.1], [0.8, 0.8, 0.6, 1.9, 1.0]]
    expected, expected_ce, expected_rank = loop_rglf(logits, nll)
    parts = rglf_loss(torch.tensor(logits), torch.tensor(nll), return_parts=True)
    assert parts["loss"].item() == pytest.approx(expected, rel=1e-6)
    assert parts["ce"].item() == pytest.approx(expected_ce, rel=1e-6)
    assert parts["rank"].item() == pytest.approx(expected_rank, rel=1e-6)
    # L_ce by hand: -(log_softmax(z_0)[1] + log_softmax(z_1)[2]) / 2
    lse0 = math.log(sum(math.exp(z) for z in logits[0]))
    lse1 = math.log(sum(math.exp(z) for z in logits[1]))
    assert parts["ce"].item() == pytest.approx(-((1.0 - lse0) + (1.5 - lse1)) / 2, rel=1e-6)
    # other weights
    expected, _, _ = loop_rglf(logits, nll, alpha=0.5, beta=2.0, gamma=0.3)
    got = rglf_loss(torch.tensor(logits), torch.tensor(nll), ce_weight=0.5, rank_weight=2.0, margin_scale=0.3)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_random_batches_match_the_loops():
    generator = torch.Generator().manual_seed(0)
    for batch in (1, 3, 7):
        logits = torch.randn(batch, 5, generator=generator, dtype=torch.float64) * 2
        nll = torch.rand(batch, 5, generator=generator, dtype=torch.float64) * 3
        expected, ce, rank = loop_rglf(logits.tolist(), nll.tolist())
        parts = rglf_loss(logits, nll, return_parts=True)
        assert parts["loss"].item() == pytest.approx(expected, rel=1e-6)
        assert parts["loss"].item() == pytest.approx(0.1 * parts["ce"].item() + parts["rank"].item(), rel=1e-6)
        assert parts["ce"].item() == pytest.approx(ce, rel=1e-6)
        assert parts["rank"].item() == pytest.approx(rank, rel=1e-6)


def test_ties_use_index_order_and_zero_margin():
    # all granularities equally good: sigma = identity, every margin 0; the loss only penalises later levels
    # scoring higher than earlier ones
    logits = [[0.0, 1.0, 2.0, 3.0, 4.0]]
    nll = [[1.0] * 5]
    expected, _, rank = loop_rglf(logits, nll)
    parts = rglf_loss(torch.tensor(logits), torch.tensor(nll), return_parts=True)
    assert parts["loss"].item() == pytest.approx(expected, rel=1e-6)
    # by hand: s_{k+j} - s_k = j, summed over the N-j pairs then averaged -> j; sum over j = 1+2+3+4 = 10
    assert parts["rank"].item() == pytest.approx(10.0, rel=1e-6) and rank == pytest.approx(10.0)
    # decreasing logits under the same ties: every pair is already in order and the margin is 0 -> no rank loss
    in_order = rglf_loss(torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]), torch.tensor(nll), return_parts=True)
    assert in_order["rank"].item() == 0


def test_gradient_reaches_only_the_logits():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0], [0.3, -0.2, 1.5, 0.0, 0.7]], requires_grad=True)
    nll = torch.tensor([[1.2, 0.9, 1.5, 2.0, 1.1], [0.8, 0.8, 0.6, 1.9, 1.0]], requires_grad=True)
    rglf_loss(logits, nll).backward()
    assert nll.grad is None
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    # log_softmax gradients sum to zero over the granularities of each sample
    torch.testing.assert_close(logits.grad.sum(dim=1), torch.zeros(2), atol=1e-6, rtol=0)
    # and match a finite-difference derivative of the loop formula
    eps = 1e-4
    base = logits.detach().tolist()
    for b, g in [(0, 0), (1, 2), (1, 4)]:
        up = [row[:] for row in base]
        down = [row[:] for row in base]
        up[b][g] += eps
        down[b][g] -= eps
        numeric = (loop_rglf(up, nll.tolist())[0] - loop_rglf(down, nll.tolist())[0]) / (2 * eps)
        assert logits.grad[b, g].item() == pytest.approx(numeric, abs=1e-3)


def test_bf16_logits_and_bad_shapes():
    loss = rglf_loss(torch.randn(2, 5, dtype=torch.bfloat16), torch.rand(2, 5))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    with pytest.raises(ValueError, match="both be \\(batch, granularities\\)"):
        rglf_loss(torch.randn(2, 5), torch.rand(2, 4))
    with pytest.raises(ValueError, match="both be \\(batch, granularities\\)"):
        rglf_loss(torch.randn(5), torch.rand(5))


def test_answer_nll_is_the_mean_over_answer_tokens():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 6, 11, generator=generator)
    labels = torch.tensor([[-100, -100, 3, 7, -100, -100], [-100, 5, 5, 1, 0, 9]])
    got = answer_nll(logits, labels)
    for b in range(2):
        terms = []
        for t in range(1, 6):  # logits at t-1 predict the label at t
            if labels[b, t] != -100:
                log_probs = logits[b, t - 1].log_softmax(-1)
                terms.append(-log_probs[labels[b, t]].item())
        assert got[b].item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)


def test_mean_granularity_loss():
    losses = [torch.tensor(1.0), torch.tensor(2.0), torch.tensor(4.5)]
    assert mean_granularity_loss(losses).item() == pytest.approx(7.5 / 3)
    assert mean_granularity_loss(torch.tensor([1.0, 3.0])).item() == pytest.approx(2.0)
    parts = [torch.tensor(2.0, requires_grad=True), torch.tensor(6.0, requires_grad=True)]
    mean_granularity_loss(parts).backward()
    assert [p.grad.item() for p in parts] == [0.5, 0.5]
    with pytest.raises(ValueError, match="no per-granularity losses"):
        mean_granularity_loss([])
    with pytest.raises(ValueError, match="no per-granularity losses"):
        mean_granularity_loss(torch.tensor([]))
