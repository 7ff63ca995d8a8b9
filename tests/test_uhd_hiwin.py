"""LLaVA-UHD v2 hierarchical window attention (Hiwin projector)."""

import math

import pytest
import torch
import torch.nn.functional as F

from multigran.pipelines.uhd_hiwin import (
    HiwinProjector,
    pooling_size,
    sincos_2d_position_embedding,
    window_boxes,
)

LEVEL_FACTORS = {1: 1, 2: 2, 4: 4}


def pyramid(generator, channels, height, width, mask, dtype=torch.float32):
    """Random level maps (C, f*h, f*w) for the levels of `mask`, in order 1x, 2x, 4x."""
    return [
        torch.randn(channels, f * height, f * width, generator=generator, dtype=dtype)
        for bit, f in LEVEL_FACTORS.items()
        if mask & bit
    ]


def tiny(**overrides):
    torch.manual_seed(0)
    settings = dict(embed_dim=32, vision_dim=8, num_heads=2)
    settings.update(overrides)
    return HiwinProjector(**settings)


# ----------------------------------------------------------------------------------------------------------------------
# shapes, sizes, parameters


def test_output_shapes_for_several_aspect_ratios_and_mixed_batch():
    model = tiny().eval()
    generator = torch.Generator().manual_seed(0)
    sizes = [(12, 12), (13, 11), (10, 15), (6, 15), (12, 12)]
    slices = [pyramid(generator, 8, h, w, 7) for h, w in sizes]
    with torch.no_grad():
        out = model(slices)
        assert out.shape == (len(sizes), 144, 32)
        assert torch.isfinite(out).all()
        # a batch of mixed sizes (different key counts L, padded and masked) equals each slice on its own
        for i, levels in enumerate(slices):
            torch.testing.assert_close(out[i], model([levels])[0], rtol=1e-5, atol=1e-5)
        # (S, C, h, w) entries: a stack of same-size slices
        stacked = [torch.stack([slices[0][l], slices[4][l]]) for l in range(3)]
        torch.testing.assert_close(model([stacked, slices[1]]), out[[0, 4, 1]], rtol=1e-5, atol=1e-5)


def expected_parameter_count(d, vision_dim=1024, queries=144):
    """Independent count from the spec's layer list (llava-uhd-v2.md section 5 / section 8 keys)."""
    query_sets = 4 * queries * d
    level_embeddings = 3 * d
    level_projectors = 3 * (vision_dim * d + d)
    attention = 3 * d * d + 3 * d + d * d + d  # in_proj weight/bias, out_proj weight/bias
    layer_norms = 4 * 2 * d
    cat_proj = 4 * d * d + d
    proj = d * d
    return query_sets + level_embeddings + level_projectors + attention + layer_norms + cat_proj + proj


def test_real_size_parameter_count_on_meta():
    with torch.device("meta"):
        model = HiwinProjector(4096)
    assert model.attn.num_heads == 32
    count = sum(p.numel() for p in model.parameters())
    assert count == expected_parameter_count(4096) == 166_014_976
    # The spec's ~175M is the release module, which also holds unused extras: an 8x level (projector + embedding),
    # the single-set `query`, `kv_proj` Linear(1024 -> D, no bias), and the frozen pos_embed parameter.
    d = 4096
    release_extras = (1024 * d + d) + d + 144 * d + 1024 * d + 144 * d
    assert abs(count + release_extras - 175e6) / 175e6 < 0.01
    # pos_embed is saved with the weights but is not trainable
    assert "pos_embed" in model.state_dict() and all(name != "pos_embed" for name, _ in model.named_parameters())


def test_state_dict_keys_match_release_list():
    d = 32
    model = tiny()
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    want = {f"query_{k}": (144, d) for k in range(1, 5)}
    want["pos_embed"] = (144, d)
    for level in ("1x", "2x", "4x"):
        want[f"feature_{level}_embedding"] = (1, 1, d)
        want[f"features_{level}_projector.weight"] = (d, 8)
        want[f"features_{level}_projector.bias"] = (d,)
    want.update({"attn.in_proj_weight": (3 * d, d), "attn.in_proj_bias": (3 * d,)})
    want.update({"attn.out_proj.weight": (d, d), "attn.out_proj.bias": (d,)})
    for norm in ("ln_q", "ln_kv", "ln_proj", "ln_post"):
        want.update({f"{norm}.weight": (d,), f"{norm}.bias": (d,)})
    want.update({"cat_proj.weight": (d, 4 * d), "cat_proj.bias": (d,), "proj": (d, d)})
    assert shapes == want


def test_initialisation():
    d = 256
    model = HiwinProjector(d, vision_dim=16)
    assert model.attn.num_heads == 2
    for level in ("1x", "2x", "4x"):
        assert torch.count_nonzero(getattr(model, f"feature_{level}_embedding")) == 0
        assert torch.count_nonzero(getattr(model, f"features_{level}_projector").bias) == 0
    queries = torch.cat([getattr(model, f"query_{k}").flatten() for k in range(1, 5)])
    assert abs(queries.std().item() - 0.02) < 0.002
    assert abs(model.proj.std().item() - d**-0.5) < 0.05 * d**-0.5
    assert abs(model.cat_proj.weight.std().item() - 0.02) < 0.002
    assert abs(model.attn.out_proj.weight.std().item() - 0.02) < 0.003
    assert model.ln_post.eps == 1e-6 and torch.all(model.ln_post.weight == 1)
    assert not model.pos_embed.requires_grad


def test_sincos_table_hand_values():
    d, g = 8, 12
    table = sincos_2d_position_embedding(d, g)
    assert table.shape == (144, 8)
    omega = [1.0, 1.0 / 100.0]  # 10000^(-i / (d/4)) for i = 0, 1
    row, col = 5, 7
    want = [math.sin(col * w) for w in omega] + [math.cos(col * w) for w in omega]
    want += [math.sin(row * w) for w in omega] + [math.cos(row * w) for w in omega]
    torch.testing.assert_close(table[row * g + col], torch.tensor(want))


def test_window_boxes():
    boxes = window_boxes(25, 22)
    assert boxes.shape == (144, 4)
    # window (row 2, column 11): x from 11 * 22/12 to 22, y from 2 * 25/12 to 3 * 25/12
    want = torch.tensor([11 * 22 / 12, 2 * 25 / 12, 22.0, 3 * 25 / 12])
    torch.testing.assert_close(boxes[2 * 12 + 11], want)
    torch.testing.assert_close(window_boxes(8, 8, 4)[5], torch.tensor([2.0, 2.0, 4.0, 4.0]))


def test_compat_pooling_size_table():
    # (height, width) of the map -> (rows, columns) of each window's pooled grid, nearest in log(w / h)
    table = {
        (24, 24): (3, 3),
        (24, 48): (2, 4),  # w/h = 2
        (48, 24): (4, 2),
        (20, 30): (2, 3),  # 1.5
        (30, 20): (3, 2),
        (30, 40): (3, 4),  # 4/3
        (40, 30): (4, 3),
        (10, 40): (2, 4),  # 4: beyond the widest candidate
        (25, 22): (3, 3),  # a real 308x350 slice
        (19, 29): (2, 3),  # 1.53: the 406x266 overview of a 1008x672 image
        (20, 24): (3, 4),  # 1.2: log 0.182 is nearer log(4/3)=0.288 than 0
        (20, 22): (3, 3),  # 1.1
    }
    for (h, w), want in table.items():
        assert pooling_size(h, w) == want, (h, w)
        assert pooling_size(h, w, level_factor=4) == want  # compat: the same at every level
        assert pooling_size(h, w, level_factor=2, compat=False) == (2 * want[0], 2 * want[1])


@pytest.mark.parametrize(
    "mask, compat, want_len",
    [(1, True, 9), (5, True, 18), (7, True, 27), (3, True, 18), (5, False, 9 + 144), (7, False, 9 + 36 + 144)],
)
def test_key_count_per_window(mask, compat, want_len):
    model = tiny(feature_scale_mask=mask, compat=compat, grid_size=4)
    generator = torch.Generator().manual_seed(1)
    levels = [level[None] for level in pyramid(generator, 8, 8, 8, mask)]
    with torch.no_grad():
        keys, values = model.window_keys_values(levels)
        assert keys.shape == values.shape == (16, want_len, 32)
        assert model([pyramid(generator, 8, 8, 8, mask)]).shape == (1, 16, 32)


def test_bad_input():
    with pytest.raises(ValueError, match="feature_scale_mask"):
        HiwinProjector(32, vision_dim=8, num_heads=2, feature_scale_mask=8)
    with pytest.raises(ValueError, match="num_heads"):
        HiwinProjector(96, vision_dim=8)
    model = tiny(feature_scale_mask=5)
    generator = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match=r"slice 0: feature_scale_mask 5 expects 2 levels"):
        model([pyramid(generator, 8, 8, 8, 7)])
    with pytest.raises(ValueError, match=r"slice 1, level 4x: expected 8 channels"):
        model([pyramid(generator, 8, 8, 8, 5), [torch.randn(8, 8, 8), torch.randn(3, 32, 32)]])
    with pytest.raises(ValueError, match="sequence of 2 level maps"):
        model(pyramid(generator, 8, 8, 8, 5))  # a single pyramid, not wrapped in a list of slices


# ----------------------------------------------------------------------------------------------------------------------
# behaviour


def test_token_depends_only_on_its_window():
    model = tiny(grid_size=4).eval()
    generator = torch.Generator().manual_seed(2)
    levels = pyramid(generator, 8, 8, 12, 7)  # 1x map 8x12: windows of 2x3 at 1x, 4x6 at 2x, 8x12 at 4x
    row, col = 1, 2  # window index 6
    perturbed = []
    for f, level in zip((1, 2, 4), levels):
        level = level.clone()
        win_h, win_w = 2 * f, 3 * f
        # bilinear samples of the window read at most one row/column past its edges: leave a 1-pixel margin
        outside = torch.ones(level.shape[1:], dtype=torch.bool)
        rows = slice(max(row * win_h - 1, 0), (row + 1) * win_h + 1)
        cols = slice(max(col * win_w - 1, 0), (col + 1) * win_w + 1)
        outside[rows, cols] = False
        perturbed.append(level + 5.0 * outside * torch.randn(level.shape, generator=generator))
    with torch.no_grad():
        before, after = model([levels])[0], model([perturbed])[0]
    torch.testing.assert_close(after[row * 4 + col], before[row * 4 + col], rtol=1e-5, atol=1e-5)
    others = torch.ones(16, dtype=torch.bool)
    others[row * 4 + col] = False
    assert (after[others] - before[others]).abs().amax(dim=1).min() > 1e-3  # every other token did change


def bilinear(feature, y, x):
    """torchvision's bilinear_interpolate on a (H, W, D) map (python floats)."""
    height, width, _ = feature.shape
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return torch.zeros(feature.shape[-1], dtype=feature.dtype)
    y, x = max(y, 0.0), max(x, 0.0)
    y0, x0 = min(int(y), height - 1), min(int(x), width - 1)
    y1, x1 = min(y0 + 1, height - 1), min(x0 + 1, width - 1)
    ly = 0.0 if y0 == height - 1 else y - y0  # at the last row/column the kernel reads it with weight 1
    lx = 0.0 if x0 == width - 1 else x - x0
    return (
        (1 - ly) * (1 - lx) * feature[y0, x0]
        + (1 - ly) * lx * feature[y0, x1]
        + ly * (1 - lx) * feature[y1, x0]
        + ly * lx * feature[y1, x1]
    )


def window_samples(feature, x1, y1, x2, y2, out_h, out_w):
    """RoIAlign (aligned=False, adaptive grid) of one window -> (out_h * out_w, D), cell by cell, sample by sample."""
    roi_w, roi_h = max(x2 - x1, 1.0), max(y2 - y1, 1.0)
    bin_h, bin_w = roi_h / out_h, roi_w / out_w
    grid_h, grid_w = math.ceil(roi_h / out_h), math.ceil(roi_w / out_w)
    cells = []
    for p in range(out_h):
        for q in range(out_w):
            total = 0
            for i in range(grid_h):
                for j in range(grid_w):
                    y = y1 + p * bin_h + (i + 0.5) * bin_h / grid_h
                    x = x1 + q * bin_w + (j + 0.5) * bin_w / grid_w
                    total = total + bilinear(feature, y, x)
            cells.append(total / (grid_h * grid_w))
    return torch.stack(cells)


def hiwin_reference(model, levels, pooled_sizes):
    """Window by window: keys/values sampled from that window only, then plain softmax attention written out."""
    g = model.grid_size
    d = model.embed_dim
    heads = model.attn.num_heads
    head_dim = d // heads
    layer_norm = lambda x, ln: F.layer_norm(x, (d,), ln.weight, ln.bias, ln.eps)  # noqa: E731
    maps = []
    for bit, level in zip(model.active_levels, levels):
        name = {1: "1x", 2: "2x", 4: "4x"}[bit]
        projector = getattr(model, f"features_{name}_projector")
        value = layer_norm(level.permute(1, 2, 0) @ projector.weight.T + projector.bias, model.ln_kv)  # (h, w, D)
        height, width = value.shape[:2]
        # resized in float32 (the release), in float64 for a float64 model
        table = model.pos_embed.to(torch.promote_types(model.pos_embed.dtype, torch.float32))
        table = table.reshape(1, g, g, d).permute(0, 3, 1, 2)
        pe = F.interpolate(table, size=(height, width), mode="bicubic", align_corners=False)[0].permute(1, 2, 0)
        key = value + pe.to(value.dtype) + getattr(model, f"feature_{name}_embedding")[0, 0]
        maps.append((key, value))
    w_q, w_k, w_v = model.attn.in_proj_weight.chunk(3)
    b_q, b_k, b_v = model.attn.in_proj_bias.chunk(3)
    tokens = []
    for row in range(g):
        for col in range(g):
            window_keys, window_values = [], []
            for (key, value), (out_h, out_w) in zip(maps, pooled_sizes):
                height, width = key.shape[:2]
                box = (col * width / g, row * height / g, (col + 1) * width / g, (row + 1) * height / g)
                window_keys.append(window_samples(key, *box, out_h, out_w))
                window_values.append(window_samples(value, *box, out_h, out_w))
            k = torch.cat(window_keys) @ w_k.T + b_k  # (L, D)
            v = torch.cat(window_values) @ w_v.T + b_v
            outputs = []
            for s in range(1, 5):
                index = row * g + col
                query = layer_norm(getattr(model, f"query_{s}")[index], model.ln_q) + model.pos_embed[index]
                q = query @ w_q.T + b_q  # (D,)
                heads_out = []
                for h in range(heads):
                    part = slice(h * head_dim, (h + 1) * head_dim)
                    scores = (k[:, part] @ q[part]) / math.sqrt(head_dim)
                    weights = torch.exp(scores - scores.max())
                    heads_out.append((weights / weights.sum()) @ v[:, part])
                attended = torch.cat(heads_out) @ model.attn.out_proj.weight.T + model.attn.out_proj.bias
                outputs.append(layer_norm(attended, model.ln_proj))
            merged = torch.cat(outputs) @ model.cat_proj.weight.T + model.cat_proj.bias
            tokens.append(layer_norm(merged, model.ln_post) @ model.proj)
    return torch.stack(tokens)


@pytest.mark.parametrize("impl", ["fused", "reference"])
@pytest.mark.parametrize("mask, compat, shapes", [(7, True, [(8, 8), (6, 10)]), (5, False, [(6, 10)])])
def test_matches_slow_per_window_reference(mask, compat, shapes, impl):
    model = tiny(grid_size=4, feature_scale_mask=mask, compat=compat, impl=impl).double().eval()
    with torch.no_grad():  # non-trivial level embeddings and biases
        for name in ("1x", "2x", "4x"):
            getattr(model, f"feature_{name}_embedding").normal_()
        model.attn.in_proj_bias.normal_()
    generator = torch.Generator().manual_seed(3)
    # window edges exact in float32: 1x maps 8x8 (windows 2x2) and 6x10 (windows 1.5x2.5)
    slices = [pyramid(generator, 8, h, w, mask, torch.float64) for h, w in shapes]
    with torch.no_grad():
        out = model(slices)
        for i, (levels, (h, w)) in enumerate(zip(slices, shapes)):
            # hand table: square -> 3x3; w/h = 5/3 -> log 0.51, nearest 2x3 (0.405) before 2x4 (0.693)
            base = (3, 3) if h == w else (2, 3)
            factors = [f for bit, f in LEVEL_FACTORS.items() if mask & bit]
            sizes = [base if compat else (base[0] * f, base[1] * f) for f in factors]
            torch.testing.assert_close(out[i], hiwin_reference(model, levels, sizes), rtol=1e-9, atol=1e-9)


def test_gradients_reach_every_trainable_parameter():
    model = tiny(grid_size=4)
    generator = torch.Generator().manual_seed(4)
    levels = [level.requires_grad_() for level in pyramid(generator, 8, 8, 8, 7)]
    model([levels]).square().sum().backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert all(level.grad.abs().sum() > 0 for level in levels)


@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_bfloat16_runs_and_is_close_to_float32(impl):
    model = tiny(grid_size=4, impl=impl).eval()
    generator = torch.Generator().manual_seed(5)
    levels = pyramid(generator, 8, 8, 8, 7)
    with torch.no_grad():
        want = model([levels])
        got = model.to(torch.bfloat16)([[level.bfloat16() for level in levels]])
    assert got.dtype == torch.bfloat16
    assert (got.float() - want).abs().max() < 0.1 * want.abs().max()


@pytest.mark.parametrize("compat", [True, False])
def test_window_boxes_rounded_to_working_dtype_in_compat(compat, monkeypatch):
    import multigran.pipelines.uhd_hiwin as hiwin_module

    seen = []

    def recording_roi_align(features, rois, *args):
        seen.append(rois.clone())
        return real_roi_align(features, rois, *args)

    real_roi_align = hiwin_module.roi_align
    monkeypatch.setattr(hiwin_module, "roi_align", recording_roi_align)
    model = tiny(feature_scale_mask=1, compat=compat).to(torch.bfloat16)
    with torch.no_grad():
        model([[torch.randn(8, 25, 22, dtype=torch.bfloat16)]])
    exact = window_boxes(25, 22)
    # x edge of column 11 starts at 11 * 22/12 = 20.1667, which bf16 (8 significant bits) stores as 20.125
    assert exact[11, 0].item() == pytest.approx(20.1667, abs=1e-4)
    want = exact.bfloat16().float() if compat else exact
    for rois in seen:
        assert torch.equal(rois[:, 1:].float(), want)


# ----------------------------------------------------------------------------------------------------------------------
# the fused path (impl="fused", default) against the release's order of operations (impl="reference")


@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_more_than_256_same_size_bfloat16_slices(impl):
    """The RoIAlign slice index stays exact in bf16 compat mode (bf16 integers are exact only up to 256)."""
    model = tiny(grid_size=4, feature_scale_mask=1, impl=impl).eval().to(torch.bfloat16)
    maps = torch.randn(300, 8, 8, 8, generator=torch.Generator().manual_seed(17)).bfloat16()
    with torch.no_grad():
        batched = model([[maps]])
        for i in (0, 256, 257, 299):
            torch.testing.assert_close(batched[i], model([[maps[i : i + 1]]])[0], rtol=0.02, atol=0.02)


def randomised(model, seed=0):
    """Non-trivial LayerNorms, level embeddings and biases: every term of the fused path matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float64).to(tensor.dtype)
            if name.startswith("ln_") and name.endswith("weight"):
                tensor.copy_(1 + 0.5 * noise)
            elif name.endswith("bias") or name.endswith("embedding") or name.startswith("ln_"):
                tensor.copy_(0.5 * noise)
            else:
                tensor.add_(0.1 * tensor.std() * noise)
    return model


def mixed_batch(generator, mask, dtype):
    """Square, wide (w/h = 2 -> 2x4 pooling) and tall slices, a stack of two same-size slices, and a 1x map smaller
    than the 4x4 window grid (windows clamped to 1 pixel: some samples fall off the map, RoIAlign of ones < 1)."""
    entries = [pyramid(generator, 8, h, w, mask, dtype) for h, w in [(8, 8), (6, 12), (12, 6), (3, 3)]]
    stacked = [torch.stack(pair) for pair in zip(*[pyramid(generator, 8, 6, 10, mask, dtype) for _ in range(2)])]
    return entries + [stacked, pyramid(generator, 8, 8, 8, mask, dtype)]


def both(model, slices):
    outputs = {}
    for impl in ("reference", "fused"):
        model.impl = impl
        outputs[impl] = model(slices)
    model.impl = "fused"
    return outputs["fused"], outputs["reference"]


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("compat", [True, False])
@pytest.mark.parametrize("mask", [1, 5, 7])
def test_fused_equals_reference(mask, compat, dtype, tolerance):
    model = randomised(tiny(grid_size=4, feature_scale_mask=mask, compat=compat).to(dtype)).eval()
    slices = mixed_batch(torch.Generator().manual_seed(10 + mask), mask, dtype)
    with torch.no_grad():
        fused, reference = both(model, slices)
    assert fused.shape == (7, 16, 32)
    torch.testing.assert_close(fused, reference, rtol=tolerance, atol=tolerance * reference.abs().max().item())


def test_fused_equals_reference_at_the_release_grid():
    """12 x 12 windows, 3 levels, a 24x24 slice, a 19x29 overview (2x3 pooling) and a 25x22 slice in one batch."""
    model = randomised(HiwinProjector(64, vision_dim=8, num_heads=2).double()).eval()
    generator = torch.Generator().manual_seed(11)
    slices = [pyramid(generator, 8, h, w, 7, torch.float64) for h, w in [(24, 24), (19, 29), (25, 22)]]
    with torch.no_grad():
        fused, reference = both(model, slices)
    torch.testing.assert_close(fused, reference, rtol=1e-10, atol=1e-10 * reference.abs().max().item())


@pytest.mark.parametrize("mask, compat", [(7, True), (5, False)])
def test_fused_gradients_equal_reference(mask, compat):
    model = randomised(tiny(grid_size=4, feature_scale_mask=mask, compat=compat).double())
    generator = torch.Generator().manual_seed(12)
    slices = [[level.requires_grad_() for level in entry] for entry in mixed_batch(generator, mask, torch.float64)[:4]]
    inputs = [level for entry in slices for level in entry]
    weights = torch.randn(4, 16, 32, generator=generator, dtype=torch.float64)
    grads = {}
    for impl in ("reference", "fused"):
        model.impl = impl
        model.zero_grad()
        loss = (model(slices).sin() * weights).sum()
        names, tensors = zip(*model.named_parameters())
        grads[impl] = dict(zip(names + tuple(range(len(inputs))),
                               torch.autograd.grad(loss, tensors + tuple(inputs), allow_unused=True)))
    unused = {name for name, grad in grads["reference"].items() if grad is None}
    assert unused == {name for name, grad in grads["fused"].items() if grad is None}
    assert unused == ({"feature_2x_embedding", "features_2x_projector.weight", "features_2x_projector.bias"}
                      if mask == 5 else set())  # the parameters of the levels outside the mask
    for name, want in grads["reference"].items():
        if want is None:
            continue
        scale = want.abs().max().item()
        torch.testing.assert_close(grads["fused"][name], want, rtol=1e-9, atol=1e-9 * max(scale, 1e-3), msg=str(name))


def test_fused_cache_follows_the_weights():
    model = randomised(tiny(grid_size=4).double()).eval()
    slices = mixed_batch(torch.Generator().manual_seed(13), 7, torch.float64)[:3]

    def fresh_reference():
        model.impl = "reference"
        with torch.no_grad():
            out = model(slices)
        model.impl = "fused"
        return out

    def check():
        with torch.no_grad():
            got = model(slices)
        torch.testing.assert_close(got, fresh_reference(), rtol=1e-10, atol=1e-10)

    with torch.no_grad():
        first = model(slices)
        folded = model._fused_cache[1]
        torch.testing.assert_close(model(slices), first, rtol=0, atol=0)
        assert model._fused_cache[1] is folded  # reused
    check()
    with torch.no_grad():  # in-place edits bump the version counters
        model.ln_kv.weight.mul_(2)
    check()
    with torch.no_grad():
        model.features_4x_projector.weight.add_(0.1)
        model.attn.in_proj_weight[: model.embed_dim].mul_(-1)  # W_q through a view
        model.query_3.add_(1.0)
        model.feature_2x_embedding.add_(1.0)
    check()
    with torch.inference_mode():
        model.ln_q.bias.add_(0.5)
    check()
    other = randomised(tiny(grid_size=4).double(), seed=1)
    model.load_state_dict(other.state_dict())
    check()
    model.features_1x_projector.weight.data.mul_(3)  # .data bypasses the version counter: clear by hand
    model.clear_fused_cache()
    check()
    model.train()
    assert model._fused_cache is None
    # with autograd recording nothing is cached and gradients reach the folded weights
    out = model(slices)
    assert model._fused_cache is None
    out.sum().backward()
    assert model.ln_kv.weight.grad is not None and model.features_4x_projector.weight.grad.abs().sum() > 0


def test_fused_cache_in_inference_mode_and_after_to():
    model = randomised(tiny(grid_size=4)).eval()
    slices = mixed_batch(torch.Generator().manual_seed(14), 7, torch.float32)[:2]
    with torch.inference_mode():
        first = model(slices)
        assert model._fused_cache is not None
    with torch.no_grad():  # a cache built in inference mode serves no_grad calls
        torch.testing.assert_close(model(slices), first, rtol=0, atol=0)
    model.double()
    assert model._fused_cache is None
    with torch.no_grad():
        fused, reference = both(model, [[level.double() for level in entry] for entry in slices])
    torch.testing.assert_close(fused, reference, rtol=1e-10, atol=1e-10)


def test_fused_bfloat16_close_to_float32_reference():
    model = randomised(tiny(grid_size=4)).eval()
    slices = mixed_batch(torch.Generator().manual_seed(15), 7, torch.float32)
    with torch.no_grad():
        model.impl = "reference"
        want = model(slices)
        model.impl = "fused"
        got = model.to(torch.bfloat16)([[level.bfloat16() for level in entry] for entry in slices])
    assert got.dtype == torch.bfloat16
    error = (got.float() - want).norm() / want.norm()
    assert error < 0.03, error


def test_fused_under_cpu_autocast_close_to_float32_reference():
    """Mixed-precision training runs a float32 module under bf16 autocast; the fused path keeps its LN statistics and
    weight folding in float32 there."""
    model = randomised(tiny(grid_size=4))
    slices = mixed_batch(torch.Generator().manual_seed(16), 7, torch.float32)
    model.impl = "reference"
    with torch.no_grad():
        want = model(slices)
    model.impl = "fused"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = model(slices)
        got.float().sum().backward()
    assert model.ln_kv.weight.grad is not None
    error = (got.float() - want).norm() / want.norm()
    assert error < 0.03, error


def test_impl_setting():
    from multigran.pipelines.uhd import UhdSettings

    with pytest.raises(ValueError, match="impl must be one of"):
        HiwinProjector(32, vision_dim=8, num_heads=2, impl="fast")
    with pytest.raises(ValueError, match="hiwin_impl must be one of"):
        UhdSettings(hiwin_impl="fast")
    assert UhdSettings().hiwin_impl == "fused" and tiny().impl == "fused"
