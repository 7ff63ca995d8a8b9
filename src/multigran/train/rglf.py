"""AVG-LLaVA training losses: RGLF (stage 4, router only) and the stage-3 multi-granularity loss.

RGLF ("Ranking Granularity to align LMM Feedback"): the frozen LMM answers the same sample once per granularity
(no grad); the router is taught to rank the granularities as the LMM's answer NLL does.
Formulas: shared/spec/avg-llava.md; weights from the release stage-4 script (ce 0.1, rank 1.0, margin 1.0).
"""

import torch
import torch.nn.functional as F

# Released stage-4 config (zhibinlan/AVG-LLaVA): ce_loss_weight, rank_loss_weight, margin.
CE_WEIGHT = 0.1
RANK_WEIGHT = 1.0
MARGIN_SCALE = 1.0


def answer_nll(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean NLL over each sample's answer tokens: (B, T, V) causal-LM logits, (B, T) labels -> (B,).

    Tokens < t predict t (logits shifted by one); positions with label == ignore_index do not count.
    A sample with no answer token gets NaN (0/0), which the caller should not feed to `rglf_loss`.
    """
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    token_nll = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
        ignore_index=ignore_index, reduction="none",
    ).view(shift_labels.shape)
    return token_nll.sum(dim=1) / (shift_labels != ignore_index).sum(dim=1)


def rglf_loss(
    router_logits: torch.Tensor,
    nll: torch.Tensor,
    ce_weight: float = CE_WEIGHT,
    rank_weight: float = RANK_WEIGHT,
    margin_scale: float = MARGIN_SCALE,
    return_parts: bool = False,
):
    """L = alpha * L_ce + beta * L_rank from router logits z (B, N) and the LMM's per-granularity answer NLL l (B, N).

    sigma_b = argsort(l_b) ascending (sigma_b(1) = the LMM's best granularity), s_{b,k} = log_softmax(z_b)[sigma_b(k)].
    L_ce   = -(1/B) sum_b s_{b,1}
    L_rank = sum_{j=1}^{N-1} 1/(B (N-j)) sum_b sum_{k=1}^{N-j}
             max(0, s_{b,k+j} - s_{b,k} + gamma j (l_{b,sigma(k+j)} - l_{b,sigma(k)}))
    with alpha = ce_weight, beta = rank_weight, gamma = margin_scale. Each offset j is averaged on its own, then summed.

    The NLL is a target: no gradient reaches it. Ties in l are ordered by granularity index (stable sort); a tied
    pair has margin 0, so it only costs when the later-ranked one scores higher. Computed in float32.
    Returns the scalar loss, or dict(loss, ce, rank) with return_parts=True.
    """
    if router_logits.dim() != 2 or router_logits.shape != nll.shape:
        raise ValueError(
            f"rglf_loss: router_logits and nll must both be (batch, granularities), got "
            f"{tuple(router_logits.shape)} and {tuple(nll.shape)}"
        )
    nll = nll.detach().float()
    order = torch.argsort(nll, dim=1, stable=True)  # sigma_b, best granularity first
    scores = router_logits.float().log_softmax(dim=-1).gather(1, order)  # s_{b,k}
    ranked_nll = nll.gather(1, order)  # l_{b,sigma_b(k)}, ascending
    ce = -scores[:, 0].mean()
    rank = scores.new_zeros(())
    for offset in range(1, scores.shape[1]):
        margin = margin_scale * offset * (ranked_nll[:, offset:] - ranked_nll[:, :-offset])  # >= 0
        rank = rank + (scores[:, offset:] - scores[:, :-offset] + margin).clamp_min(0).mean()
    loss = ce_weight * ce + rank_weight * rank
    if return_parts:
        return {"loss": loss, "ce": ce, "rank": rank}
    return loss


def mean_granularity_loss(per_level_losses) -> torch.Tensor:
    """Stage 3: the answer CE averaged over the granularities (one forward per granularity, every crop at it)."""
    if not torch.is_tensor(per_level_losses):
        per_level_losses = list(per_level_losses)
        if not per_level_losses:
            raise ValueError("mean_granularity_loss: no per-granularity losses given")
        per_level_losses = torch.stack(per_level_losses)
    if per_level_losses.numel() == 0:
        raise ValueError("mean_granularity_loss: no per-granularity losses given")
    return per_level_losses.mean()
