"""AVG-LLaVA granularity router: layer sizes and key names, forward vs a written-out computation, text filter,
instruction masks, granularity choice (spec: avg-llava.md)."""

import math

import pytest
import torch
import torch.nn.functional as F

from multigran.pipelines.granularity import (
    AvgRouter,
    choose_granularity,
    filter_instruction_tokens,
    select_instruction_tokens,
)

# A tiny geometry: a 4x4 patch grid gives levels 1/2/4/8/16 tokens; 3 filtered text tokens -> 34 tokens per crop.
GRID = 4
LEVELS = [1, 2, 4, 8, 16]
TOP_K = 3
DIM = 16  # 8 heads of size 2


def tiny_router(compat, seed=0):
    torch.manual_seed(seed)
    router = AvgRouter(DIM, level_tokens=LEVELS, top_k=TOP_K, compat=compat).double().eval()
    with torch.no_grad():  # non-trivial LayerNorm affines, so that a wrong norm would show
        for norm in (router.merger.norm1, router.merger.norm2, router.norm):
            norm.weight.normal_(1.0, 0.3)
            norm.bias.normal_(0.0, 0.3)
    return router


# ---------------------------------------------------------------------------------------------------------------------
# sizes and names


def test_real_size_parameter_count_and_release_keys():
    with torch.device("meta"):
        router = AvgRouter(4096)
    d, levels, sequence = 4096, 5, 36 + 72 + 144 + 288 + 576 + 32
    by_hand = (
        3 * d * d + 3 * d  # merger.self_attn.in_proj (packed Q;K;V)
        + d * d + d  # merger.self_attn.out_proj
        + d * d + d  # merger.linear1 (dim_feedforward = D)
        + d * d + d  # merger.linear2
        + 2 * d + 2 * d  # merger.norm1, merger.norm2
        + d * d + d  # router.0
        + levels * d + levels  # router.2
        + sequence  # voter
        + 2 * levels  # norm
    )
    total = sum(p.numel() for p in router.parameters())
    assert total == by_hand == 117_507_211
    shapes = {name: tuple(p.shape) for name, p in router.state_dict().items()}
    assert shapes == {
        "merger.self_attn.in_proj_weight": (3 * d, d),
        "merger.self_attn.in_proj_bias": (3 * d,),
        "merger.self_attn.out_proj.weight": (d, d),
        "merger.self_attn.out_proj.bias": (d,),
        "merger.linear1.weight": (d, d),
        "merger.linear1.bias": (d,),
        "merger.linear2.weight": (d, d),
        "merger.linear2.bias": (d,),
        "merger.norm1.weight": (d,),
        "merger.norm1.bias": (d,),
        "merger.norm2.weight": (d,),
        "merger.norm2.bias": (d,),
        "router.0.weight": (d, d),
        "router.0.bias": (d,),
        "router.2.weight": (levels, d),
        "router.2.bias": (levels,),
        "voter": (1148, 1),
        "norm.weight": (levels,),
        "norm.bias": (levels,),
    }
    # PyTorch defaults of the released layer
    assert router.merger.self_attn.num_heads == 8 and router.merger.self_attn.batch_first is False
    assert router.merger.dropout.p == 0.1 and router.merger.norm_first is False
    assert router.merger.activation is F.relu and router.merger.norm1.eps == 1e-5
    # real-size shapes through the whole forward (meta tensors: no compute): 5 crops of 576 tokens, 40 prompt tokens
    with torch.device("meta"):
        crops, text = torch.empty(5, 576, d), torch.empty(40, d)
        for compat in (True, False):
            router.compat = compat
            assert router.crop_votes(crops, text).shape == (5, levels)
            assert router(crops, text, torch.ones(40, dtype=torch.bool)).shape == (levels,)


def test_initialisation():
    torch.manual_seed(0)
    router = AvgRouter(256, compat=True)
    # Kaiming normal (fan_in, gain sqrt(2)): std sqrt(2 / 256); voter N(0, 1)
    assert abs(router.router[0].weight.std().item() - math.sqrt(2 / 256)) < 0.005
    assert abs(router.router[2].weight.std().item() - math.sqrt(2 / 256)) < 0.03
    assert abs(router.voter.std().item() - 1) < 0.1 and router.voter.shape == (1148, 1)


# ---------------------------------------------------------------------------------------------------------------------
# forward vs a written-out computation


def slow_pool(crop, kernel_rows, kernel_cols):
    """(GRID*GRID, D) -> pooled tokens in raster order, window sums in loops."""
    grid = crop.view(GRID, GRID, -1)
    tokens = []
    for r in range(0, GRID, kernel_rows):
        for c in range(0, GRID, kernel_cols):
            tokens.append(grid[r : r + kernel_rows, c : c + kernel_cols].reshape(-1, crop.shape[-1]).mean(0))
    return torch.stack(tokens)


def slow_text_filter(visual, text, mask, k):
    """Cosine similarities one pair at a time, mean over visual rows, valid tokens by score then masked by position."""
    scores = []
    for j in range(text.shape[0]):
        sims = []
        for i in range(visual.shape[0]):
            dot = sum(visual[i, d].item() * text[j, d].item() for d in range(text.shape[1]))
            norm_v = max(math.sqrt(sum(x * x for x in visual[i].tolist())), 1e-8)
            norm_t = max(math.sqrt(sum(x * x for x in text[j].tolist())), 1e-8)
            sims.append(dot / (norm_v * norm_t))
        scores.append(sum(sims) / len(sims))
    valid = [j for j in range(text.shape[0]) if mask[j]]
    masked = [j for j in range(text.shape[0]) if not mask[j]]
    order = sorted(valid, key=lambda j: -scores[j]) + masked
    out = torch.zeros(k, text.shape[1], dtype=text.dtype)
    for slot, j in enumerate(order[:k]):
        out[slot] = text[j]
    return out


def layer_norm(x, weight, bias, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def slow_encoder_layer(sequence, layer):
    """One post-LN Transformer encoder layer on ONE sequence (S, D): 8-head attention, ReLU FFN."""
    length, dim = sequence.shape
    heads = 8
    head_dim = dim // heads
    w_q, w_k, w_v = layer.self_attn.in_proj_weight.chunk(3)
    b_q, b_k, b_v = layer.self_attn.in_proj_bias.chunk(3)
    q, k, v = sequence @ w_q.T + b_q, sequence @ w_k.T + b_k, sequence @ w_v.T + b_v
    attended = torch.zeros(length, dim, dtype=sequence.dtype)
    for h in range(heads):
        cols = slice(h * head_dim, (h + 1) * head_dim)
        scores = q[:, cols] @ k[:, cols].T / math.sqrt(head_dim)  # (S, S)
        weights = (scores - scores.max(dim=-1, keepdim=True).values).exp()
        weights = weights / weights.sum(dim=-1, keepdim=True)
        attended[:, cols] = weights @ v[:, cols]
    attended = attended @ layer.self_attn.out_proj.weight.T + layer.self_attn.out_proj.bias
    x = layer_norm(sequence + attended, layer.norm1.weight, layer.norm1.bias, 1e-5)
    hidden = torch.clamp(x @ layer.linear1.weight.T + layer.linear1.bias, min=0)
    ffn = hidden @ layer.linear2.weight.T + layer.linear2.bias
    return layer_norm(x + ffn, layer.norm2.weight, layer.norm2.bias, 1e-5)


def slow_router(router, crops, text, mask, across_crops):
    kernels = [(4, 4), (2, 4), (2, 2), (1, 2), (1, 1)]
    filtered = slow_text_filter(crops[0], text, mask, TOP_K)
    sequences = torch.stack(
        [torch.cat([slow_pool(crop, *kernel) for kernel in kernels] + [filtered]) for crop in crops]
    )  # (crops, 34, D)
    fused = torch.zeros_like(sequences)
    with torch.no_grad():
        if across_crops:  # the released reading: for each token position, a sequence over the crops
            for t in range(sequences.shape[1]):
                fused[:, t] = slow_encoder_layer(sequences[:, t], router.merger)
        else:
            for c in range(sequences.shape[0]):
                fused[c] = slow_encoder_layer(sequences[c], router.merger)
        w1, b1 = router.router[0].weight, router.router[0].bias
        w2, b2 = router.router[2].weight, router.router[2].bias
        hidden = fused @ w1.T + b1
        hidden = 0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2)))  # exact GELU
        token_logits = hidden @ w2.T + b2  # (crops, 34, 5)
        votes = torch.zeros(sequences.shape[0], 5, dtype=crops.dtype)
        for c in range(sequences.shape[0]):
            for t in range(sequences.shape[1]):
                votes[c] += router.voter[t, 0] * token_logits[c, t]
        return votes, layer_norm(votes.mean(0), router.norm.weight, router.norm.bias, 1e-5)


@pytest.mark.parametrize("compat", [True, False])
def test_forward_equals_the_written_out_computation(compat):
    router = tiny_router(compat)
    torch.manual_seed(1)
    crops = torch.randn(3, GRID * GRID, DIM, dtype=torch.float64)
    text = torch.randn(6, DIM, dtype=torch.float64)
    mask = torch.tensor([True, False, True, True, False, True])
    expected_votes, expected_logits = slow_router(router, crops, text, mask, across_crops=compat)
    with torch.no_grad():
        torch.testing.assert_close(router.crop_votes(crops, text, mask), expected_votes, rtol=1e-9, atol=1e-10)
        logits = router(crops, text, mask)
    assert logits.shape == (5,)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-9, atol=1e-10)
    # the other reading of the layer gives a different answer: the two modes really differ
    _, other = slow_router(router, crops, text, mask, across_crops=not compat)
    assert not torch.allclose(logits, other, atol=1e-4)


def test_compat_attends_across_crops_and_corrected_does_not():
    torch.manual_seed(2)
    crops = torch.randn(4, GRID * GRID, DIM, dtype=torch.float64)
    text = torch.randn(5, DIM, dtype=torch.float64)
    changed = crops.clone()
    changed[2] += torch.randn(GRID * GRID, DIM, dtype=torch.float64)  # a tile, not the base crop (text filter input)
    for compat in (True, False):
        router = tiny_router(compat)
        with torch.no_grad():
            before, after = router.crop_votes(crops, text), router.crop_votes(changed, text)
        crop_1_moved = not torch.allclose(before[1], after[1], rtol=0, atol=1e-9)
        assert crop_1_moved == compat
        assert not torch.allclose(before[2], after[2])


def test_text_filter_matches_the_slow_reference_and_fill_rules():
    torch.manual_seed(3)
    visual = torch.randn(16, DIM, dtype=torch.float64)
    text = torch.randn(10, DIM, dtype=torch.float64)
    cases = [
        (torch.ones(10, dtype=torch.bool), 4),  # plenty of valid tokens: top 4 by score
        (torch.tensor([0, 1, 0, 0, 1, 0, 0, 0, 1, 0], dtype=torch.bool), 6),  # 3 valid, L >= k: masked fill
        (torch.tensor([0, 1, 0, 0, 1, 0, 0, 0, 1, 0], dtype=torch.bool), 13),  # L < k: masked, then zero rows
        (torch.zeros(10, dtype=torch.bool), 5),  # nothing valid: masked in position order
    ]
    for mask, k in cases:
        out = filter_instruction_tokens(visual, text, mask, k)
        torch.testing.assert_close(out, slow_text_filter(visual, text, mask, k), rtol=0, atol=0)
    # the fill rules written out for the second and third case
    mask = cases[1][0]
    out = filter_instruction_tokens(visual, text, mask, 6)
    assert {tuple(row.tolist()) for row in out[:3]} == {tuple(text[j].tolist()) for j in (1, 4, 8)}
    assert torch.equal(out[3:], text[[0, 2, 3]])
    out = filter_instruction_tokens(visual, text, mask, 13)
    assert torch.equal(out[3:10], text[[0, 2, 3, 5, 6, 7, 9]]) and not out[10:].any()
    # scores as the release computes them (F.cosine_similarity, mean over visual rows): same top-4 order
    scores = F.cosine_similarity(visual[:, None], text[None], dim=-1).mean(0)
    assert torch.equal(filter_instruction_tokens(visual, text, None, 4), text[scores.argsort(descending=True)[:4]])
    # no text at all: zero rows
    assert not filter_instruction_tokens(visual, text[:0], torch.zeros(0, dtype=torch.bool), 3).any()
    with pytest.raises(ValueError, match="same D"):
        filter_instruction_tokens(visual, torch.randn(3, DIM + 1), None, 2)
    with pytest.raises(ValueError, match="text_mask must have shape"):
        filter_instruction_tokens(visual, text, torch.ones(9, dtype=torch.bool), 2)


def test_instruction_mask_training_vs_inference():
    image = 99
    #               sys  sys  img  img  usr  usr  role ans  ans  eos  pad
    input_ids = torch.tensor([1, 5, image, image, 7, 8, 9, 20, 21, 2, 0])
    attention = torch.tensor([1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0])
    labels = torch.tensor([-100, -100, -100, -100, -100, -100, -100, 20, 21, 2, -100])
    keep, valid = select_instruction_tokens(input_ids, image, attention)  # inference: every attended prompt token
    assert keep.tolist() == [0, 1, 4, 5, 6, 7, 8, 9]  # image placeholders and the batch's padding removed
    assert valid.tolist() == [True] * 8
    # A prompt routes as it does alone: the same tokens whatever padding the batch gave it (left or right).
    alone, _ = select_instruction_tokens(input_ids[:10], image, attention[:10])
    left = torch.cat([torch.tensor([0, 0]), input_ids[:10]])
    shifted, _ = select_instruction_tokens(left, image, torch.cat([torch.tensor([0, 0]), attention[:10]]))
    assert input_ids[keep].tolist() == input_ids[:10][alone].tolist() == left[shifted].tolist()
    keep, valid = select_instruction_tokens(input_ids, image, attention, labels)  # training: answers excluded
    assert keep.tolist() == [0, 1, 4, 5, 6, 7, 8, 9, 10]
    assert valid.tolist() == [True, True, True, True, True, False, False, False, False]
    with pytest.raises(ValueError, match="one sample"):
        select_instruction_tokens(input_ids[None], image)


def test_route_images_gives_each_image_its_own_decision():
    router = tiny_router(compat=True)
    torch.manual_seed(4)
    images = [torch.randn(n, GRID * GRID, DIM, dtype=torch.float64) for n in (3, 1, 5)]
    sample_text = [torch.randn(7, DIM, dtype=torch.float64), torch.randn(4, DIM, dtype=torch.float64)]
    masks = [torch.ones(7, dtype=torch.bool), torch.tensor([True, True, False, True])]
    image_to_sample = [0, 0, 1]  # two images in sample 0, both routed with sample 0's instruction
    with torch.no_grad():
        logits = router.route_images(
            images, [sample_text[s] for s in image_to_sample], [masks[s] for s in image_to_sample]
        )
        expected = torch.stack([router(images[i], sample_text[s], masks[s]) for i, s in enumerate(image_to_sample)])
    assert logits.shape == (3, 5)
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)
    assert not torch.allclose(logits[0], logits[1])
    with pytest.raises(ValueError, match="one instruction per image"):
        router.route_images(images, sample_text)


def test_router_checks_its_geometry_and_runs_in_bf16():
    router = AvgRouter(DIM, level_tokens=LEVELS, top_k=TOP_K)
    with pytest.raises(ValueError, match="built for"):
        router(torch.randn(2, 64, DIM), torch.randn(3, DIM))  # an 8x8 grid gives 4/8/16/32/64
    with pytest.raises(ValueError, match=r"\(crops, n\*n, D\)"):
        router(torch.randn(16, DIM), torch.randn(3, DIM))
    router = router.to(torch.bfloat16)
    logits = router(torch.randn(2, 16, DIM, dtype=torch.bfloat16), torch.randn(3, DIM, dtype=torch.bfloat16))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()
    logits.float().sum().backward()  # trainable in stage 4
    assert router.voter.grad is not None and router.merger.linear1.weight.grad is not None


# ---------------------------------------------------------------------------------------------------------------------
# choosing a granularity


def test_choose_granularity_argmax_budget_and_bias():
    levels = [36, 72, 144, 288, 576]
    logits = torch.tensor([0.0, 1.0, 3.0, 2.0, 0.5])
    counts = [192, 228, 744, 888, 2928]  # 672x672 image, compat counts
    index, granularity, probs = choose_granularity(logits, levels)
    assert (index, granularity) == (2, 144)
    exps = [math.exp(x) for x in logits.tolist()]
    torch.testing.assert_close(probs, torch.tensor([e / sum(exps) for e in exps]))
    # a budget of 500 tokens leaves levels 0 (192) and 1 (228); level 1 has the larger logit
    assert choose_granularity(logits, levels, max_visual_tokens=500, token_counts=counts)[:2] == (1, 72)
    assert choose_granularity(logits, levels, max_visual_tokens=888, token_counts=counts)[:2] == (2, 144)
    with pytest.raises(ValueError, match="below the coarsest level"):
        choose_granularity(logits, levels, max_visual_tokens=191, token_counts=counts)
    # bias 1 nat per 1000 tokens: scores (up to a constant) 0-0.192, 1-0.228, 3-0.744, 2-0.888, 0.5-2.928 -> level 2
    assert choose_granularity(logits, levels, granularity_bias=1.0, token_counts=counts)[0] == 2
    # bias 5: -0.96, -0.14, -0.72, -2.44, -14.14 -> level 1
    assert choose_granularity(logits, levels, granularity_bias=5.0, token_counts=counts)[0] == 1
    # bias 20: -3.84, -3.56, -11.88, ... -> level 1 still beats level 0 (1 nat of logit > 0.72 nat of cost)
    assert choose_granularity(logits, levels, granularity_bias=20.0, token_counts=counts)[0] == 1
    # bias 40: -7.68, -8.12 -> level 0
    assert choose_granularity(logits, levels, granularity_bias=40.0, token_counts=counts)[0] == 0
    with pytest.raises(ValueError, match="need token_counts"):
        choose_granularity(logits, levels, max_visual_tokens=500)
    with pytest.raises(ValueError, match="mode must be"):
        choose_granularity(logits, levels, mode="top2")
    with pytest.raises(ValueError, match="do not match 4 levels"):
        choose_granularity(logits, levels[:4])


def test_choose_granularity_batched_and_sampled():
    levels = [36, 72, 144, 288, 576]
    logits = torch.tensor([[0.0, 1.0, 3.0, 2.0, 0.5], [4.0, 0.0, 0.0, 0.0, 5.0]])
    counts = [[192, 228, 744, 888, 2928], [114, 150, 444, 588, 1752]]  # 672x672 and 1000x500
    index, granularity, probs = choose_granularity(logits, levels, max_visual_tokens=600, token_counts=counts)
    assert index.tolist() == [1, 0] and granularity.tolist() == [72, 36] and probs.shape == (2, 5)
    generator = torch.Generator().manual_seed(0)
    picks = [
        choose_granularity(logits[0], levels, mode="sample", max_visual_tokens=800, token_counts=counts[0],
                           generator=generator)[0]
        for _ in range(300)
    ]
    assert set(picks) == {0, 1, 2}  # never a level over budget; every level that fits gets drawn
    assert picks.count(2) > picks.count(1) > picks.count(0)  # probabilities e^3 : e^1 : e^0
