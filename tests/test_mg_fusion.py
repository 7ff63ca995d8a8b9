"""MG-LLaVA components: preprocessing, Conv-Gate fusion, projectors, object tokens (pipelines/mg.py)."""

import importlib
import logging
import math

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from multigran.ops.roi_align import roi_align
from multigran.pipelines.mg import ConvGateFusion, MLPProjector, ObjectTokens, pool_box_features, preprocess_mg_image


def gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def randomise(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return module


# --- Conv-Gate fusion -----------------------------------------------------------------------------------------------


def reference_fusion(m, low, high):
    """Spec formula written with einsums and an explicit 7x7 depthwise loop."""
    b, n, d = low.shape
    s = int(math.isqrt(n))
    hid = torch.einsum("bchw,oc->bohw", high, m.slow_conv.weight[:, :, 0, 0]) + m.slow_conv.bias[:, None, None]
    hid = torch.einsum("bchw,oc->bohw", gelu(hid), m.slow_proj.weight[:, :, 0, 0]) + m.slow_proj.bias[:, None, None]
    H = hid.reshape(b, d, n).transpose(1, 2)  # (B, N, D)
    grid = low.reshape(b, s, s, d)  # token t = row * s + col
    padded = torch.nn.functional.pad(grid, (0, 0, 3, 3, 3, 3))  # pad cols and rows by 3
    dw = torch.zeros_like(grid) + m.fast_conv.bias
    for dy in range(7):
        for dx in range(7):
            dw = dw + padded[:, dy : dy + s, dx : dx + s, :] * m.fast_conv.weight[:, 0, dy, dx]
    fast = torch.einsum("bhwc,oc->bhwo", gelu(dw), m.fast_proj.weight[:, :, 0, 0]) + m.fast_proj.bias
    L = (grid + fast).reshape(b, n, d)
    pooled = torch.cat([L, H], dim=-1).mean(1)  # (B, 2D)
    g = gelu(pooled @ m.gate[0].weight.T + m.gate[0].bias) @ m.gate[2].weight.T + m.gate[2].bias  # (B, 1)
    return L + torch.tanh(g)[:, :, None] * H


def test_fusion_identity_at_init_real_size():
    torch.manual_seed(0)
    fusion = ConvGateFusion()  # 1024 / 1536, the release sizes
    low = torch.randn(1, 576, 1024)
    out = fusion(low, torch.randn(1, 1536, 24, 24))
    assert out.shape == (1, 576, 1024)
    assert torch.equal(out, low)  # zero-initialised slow_proj / fast_proj: exactly the CLIP features
    for name in ("slow_proj", "fast_proj"):
        assert not getattr(fusion, name).weight.any() and not getattr(fusion, name).bias.any()
    assert not fusion.slow_conv.bias.any() and not fusion.fast_conv.bias.any()  # release zeroes the conv biases
    # Xavier-uniform bound sqrt(6 / (fan_in + fan_out)); the default Kaiming init would have a different bound.
    assert fusion.slow_conv.weight.abs().max() <= math.sqrt(6 / (1536 + 1536))
    assert fusion.slow_conv.weight.abs().max() > 0.9 * math.sqrt(6 / (1536 + 1536))
    # Depthwise (1024, 1, 7, 7): fan_in 1 * 49, fan_out 1024 * 49.
    bound = math.sqrt(6 / (49 + 1024 * 49))
    assert 0.9 * bound < fusion.fast_conv.weight.abs().max() <= bound


def test_fusion_matches_reference_formula():
    fusion = randomise(ConvGateFusion(low_res_dim=8, high_res_dim=12))
    g = torch.Generator().manual_seed(1)
    low, high = torch.randn(3, 16, 8, generator=g), torch.randn(3, 12, 4, 4, generator=g)
    torch.testing.assert_close(fusion(low, high), reference_fusion(fusion, low, high), rtol=1e-5, atol=1e-5)


def test_gate_is_one_scalar_per_image():
    fusion = randomise(ConvGateFusion(low_res_dim=8, high_res_dim=12), seed=3)
    g = torch.Generator().manual_seed(2)
    low, high = torch.randn(3, 16, 8, generator=g), torch.randn(3, 12, 4, 4, generator=g)
    out = fusion(low, high)
    high2 = high.clone()
    high2[1] += torch.randn(12, 4, 4, generator=g)
    out2 = fusion(low, high2)
    assert torch.equal(out[0], out2[0]) and torch.equal(out[2], out2[2])
    assert not torch.allclose(out[1], out2[1])
    # (out - L) / H is the same tanh(gate) for every token and channel of an image, and differs across images.
    with torch.no_grad():
        H = fusion.slow_proj(gelu(fusion.slow_conv(high))).flatten(2).transpose(1, 2)
        grid = low.transpose(1, 2).reshape(3, 8, 4, 4)
        L = low + fusion.fast_proj(gelu(fusion.fast_conv(grid))).flatten(2).transpose(1, 2)
    scale = ((out - L) * H).sum((1, 2)) / (H * H).sum((1, 2))  # least-squares tanh(gate) per image
    torch.testing.assert_close(out - L, scale[:, None, None] * H, rtol=1e-5, atol=1e-5)
    assert scale.unique().numel() == 3 and scale.abs().min() > 1e-3


def test_fusion_real_size_parameter_count_and_keys():
    with torch.device("meta"):
        fusion = ConvGateFusion(low_res_dim=1024, high_res_dim=1536)
    expected = {  # spec layer table
        "slow_conv": 1536 * 1536 + 1536,  # Conv2d(1536->1536, 1x1)
        "slow_proj": 1536 * 1024 + 1024,  # Conv2d(1536->1024, 1x1)
        "fast_conv": 1024 * 7 * 7 + 1024,  # depthwise 7x7
        "fast_proj": 1024 * 1024 + 1024,  # Conv2d(1024->1024, 1x1)
        "gate": (2048 * 512 + 512) + (512 * 1 + 1),  # Linear(2048->512), GELU, Linear(512->1)
    }
    for name, count in expected.items():
        assert sum(p.numel() for p in getattr(fusion, name).parameters()) == count, name
    assert sum(p.numel() for p in fusion.parameters()) == sum(expected.values()) == 6_085_121
    shapes = {k: tuple(v.shape) for k, v in fusion.state_dict().items()}
    assert shapes == {  # release checkpoint keys `fuse_module.*`
        "slow_conv.weight": (1536, 1536, 1, 1), "slow_conv.bias": (1536,),
        "slow_proj.weight": (1024, 1536, 1, 1), "slow_proj.bias": (1024,),
        "fast_conv.weight": (1024, 1, 7, 7), "fast_conv.bias": (1024,),
        "fast_proj.weight": (1024, 1024, 1, 1), "fast_proj.bias": (1024,),
        "gate.0.weight": (512, 2048), "gate.0.bias": (512,), "gate.2.weight": (1, 512), "gate.2.bias": (1,),
    }


def test_grid_mismatch_resample_logs_once(caplog):
    fusion = randomise(ConvGateFusion(low_res_dim=8, high_res_dim=12, grid_mismatch="resample"))
    g = torch.Generator().manual_seed(4)
    low, high = torch.randn(2, 16, 8, generator=g), torch.randn(2, 12, 6, 6, generator=g)
    with caplog.at_level(logging.WARNING, logger="multigran.pipelines.mg"):
        out = fusion(low, high)
        fusion(low, high)
    assert len([r for r in caplog.records if "resampling" in r.getMessage()]) == 1
    assert "(6, 6)" in caplog.text and "(4, 4)" in caplog.text
    # Resampling = bilinear (align_corners=False) of the 6x6 map to 4x4, written as interpolation matrices.
    A = torch.zeros(4, 6)
    for i in range(4):
        src = max((i + 0.5) * 6 / 4 - 0.5, 0.0)
        i0 = int(math.floor(src))
        A[i, i0] += 1 - (src - i0)
        A[i, min(i0 + 1, 5)] += src - i0
    resized = torch.einsum("ih,bchw,jw->bcij", A, high, A)
    torch.testing.assert_close(out, reference_fusion(fusion, low, resized), rtol=1e-5, atol=1e-5)


def test_grid_mismatch_error_names_both_grids():
    fusion = ConvGateFusion(low_res_dim=8, high_res_dim=12, grid_mismatch="error")
    with pytest.raises(ValueError, match=r"\(6, 6\).*\(4, 4\)"):
        fusion(torch.randn(1, 16, 8), torch.randn(1, 12, 6, 6))
    with pytest.raises(ValueError, match="grid_mismatch"):
        ConvGateFusion(grid_mismatch="crop")


def test_fusion_bad_inputs():
    fusion = ConvGateFusion(low_res_dim=8, high_res_dim=12)
    with pytest.raises(ValueError, match="17 tokens, not a square grid"):
        fusion(torch.randn(1, 17, 8), torch.randn(1, 12, 4, 4))
    with pytest.raises(ValueError, match=r"low_res_feat must be \(B, N, 8\)"):
        fusion(torch.randn(1, 16, 9), torch.randn(1, 12, 4, 4))
    with pytest.raises(ValueError, match=r"high_res_feat must be \(B, 12, h, w\)"):
        fusion(torch.randn(1, 16, 8), torch.randn(1, 13, 4, 4))
    with pytest.raises(ValueError, match="batch sizes differ"):
        fusion(torch.randn(2, 16, 8), torch.randn(1, 12, 4, 4))


# --- projectors and object tokens -----------------------------------------------------------------------------------


def test_projector_keys_and_real_size_counts():
    with torch.device("meta"):
        projector = MLPProjector(1024, 4096)
        objects = ObjectTokens(feature_dim=2880, hidden_size=4096)
    assert {k: tuple(v.shape) for k, v in projector.state_dict().items()} == {
        "model.0.weight": (4096, 1024), "model.0.bias": (4096,), "model.2.weight": (4096, 4096), "model.2.bias": (4096,)
    }
    assert {k: tuple(v.shape) for k, v in objects.state_dict().items()} == {
        "bbox_projector.model.0.weight": (4096, 2880), "bbox_projector.model.0.bias": (4096,),
        "bbox_projector.model.2.weight": (4096, 4096), "bbox_projector.model.2.bias": (4096,),
    }
    assert sum(p.numel() for p in objects.parameters()) == 2880 * 4096 + 4096 + 4096 * 4096 + 4096


def linear_maps(batch, size=48):
    """Channel 0 = x + 100 b, channel 1 = y - 50 b: bilinear sampling of a linear map is exact, so RoI means are
    the mean sample position, computable by hand."""
    xs = torch.arange(size, dtype=torch.float32)
    maps = torch.zeros(batch, 2, size, size)
    for b in range(batch):
        maps[b, 0] = xs[None, :] + 100 * b
        maps[b, 1] = xs[:, None] - 50 * b
    return maps


def test_pool_box_features_hand_values():
    maps = linear_maps(2)  # 48x48 map for a 192-pixel image: spatial_scale 0.25
    boxes = [
        torch.tensor([[40.0, 20.0, 120.0, 100.0], [40.0, 40.0, 41.0, 41.0]]),
        torch.tensor([[8.0, 60.0, 64.0, 92.0]]),
    ]
    pooled = pool_box_features(maps, boxes, image_size=192, output_size=7)
    # Box 0: mean sample position = box centre * 0.25 = (20, 15).
    torch.testing.assert_close(pooled[0][0], torch.tensor([20.0, 15.0]))
    # Box 1 is 0.25 map pixels wide: aligned=False clamps the roi size to 1, so samples cover [10, 11] -> mean 10.5
    # (the centre would be 10.125; aligned=True would give 9.625).
    torch.testing.assert_close(pooled[0][1], torch.tensor([10.5, 10.5]))
    # Second image: its own map (batch index 1): x-centre 9 + 100, y-centre 19 - 50.
    torch.testing.assert_close(pooled[1][0], torch.tensor([109.0, -31.0]))


def test_object_tokens_equal_full_roi_align_mean_chunked_or_not(monkeypatch):
    g = torch.Generator().manual_seed(5)
    maps = torch.randn(2, 6, 24, 24, generator=g)
    boxes = [torch.rand(7, 2, generator=g) * 60, torch.rand(3, 2, generator=g) * 60]
    boxes = [torch.cat([b, b + 1 + torch.rand(b.shape, generator=g) * 40], dim=1) for b in boxes]  # x2 > x1, y2 > y1
    module = randomise(ObjectTokens(feature_dim=6, hidden_size=5, image_size=96, output_size=8))
    tokens = module(maps, boxes)
    assert [t.shape for t in tokens] == [(7, 5), (3, 5)]
    # Unchunked reference: the full (K, C, 8, 8) RoIAlign output (spatial scale 24 / 96), averaged, then Linear ->
    # GELU -> Linear written out.
    proj = module.bbox_projector.model
    for i, image_boxes in enumerate(boxes):
        rois = torch.cat([torch.full((len(image_boxes), 1), float(i)), image_boxes], dim=1)
        pooled = roi_align(maps, rois, 8, 0.25, sampling_ratio=-1, aligned=False).mean((2, 3))
        expected = gelu(pooled @ proj[0].weight.T + proj[0].bias) @ proj[2].weight.T + proj[2].bias
        torch.testing.assert_close(tokens[i], expected, rtol=1e-5, atol=1e-5)
    # Chunked: one box per matmul inside the op gives the same tokens.
    # (`multigran.ops.roi_align` the attribute is the function: fetch the module itself.)
    monkeypatch.setattr(importlib.import_module("multigran.ops.roi_align"), "CHUNK_ELEMENTS", 1)
    for a, b in zip(module(maps, boxes), tokens):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_object_tokens_empty_and_bad_boxes():
    module = ObjectTokens(feature_dim=2, hidden_size=3, image_size=192, output_size=4)
    out = module(linear_maps(2), [torch.zeros(0, 4), torch.tensor([[0.0, 0.0, 10.0, 10.0]])])
    assert [t.shape for t in out] == [(0, 3), (1, 3)]
    with pytest.raises(ValueError, match=r"boxes\[0\] must be \(K, 4\)"):
        module(linear_maps(1), [torch.zeros(2, 5)])
    with pytest.raises(ValueError, match="boxes for 1 images but features for 2"):
        module(linear_maps(2), [torch.zeros(1, 4)])
    with pytest.raises(ValueError, match="square map"):
        module(torch.zeros(1, 2, 8, 9), [torch.zeros(1, 4)])


def test_object_tokens_follow_projector_dtype():
    module = ObjectTokens(feature_dim=2, hidden_size=3, image_size=192, output_size=4).to(torch.bfloat16)
    out = module(linear_maps(1).to(torch.bfloat16), [torch.tensor([[0.0, 0.0, 50.0, 60.0]])])
    assert out[0].dtype == torch.bfloat16


# --- preprocessing ------------------------------------------------------------------------------------------------


def _random_image(width, height, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


def test_preprocess_high_res_matches_clip_processor_on_padded_image():
    image = _random_image(40, 30)
    low, high, info = preprocess_mg_image(image)
    assert low.shape == (3, 336, 336) and high.shape == (3, 768, 768)
    assert (info.original_width, info.original_height, info.side, info.pad_left, info.pad_top) == (40, 30, 40, 0, 5)
    # Independent padding: mean colour as truncated 0-255 ints, image centred vertically.
    canvas = Image.new("RGB", (40, 40), (122, 116, 104))
    canvas.paste(image, (0, 5))
    processor = CLIPImageProcessorPil(size={"shortest_edge": 768}, crop_size={"height": 768, "width": 768})
    expected = torch.as_tensor(np.asarray(processor(canvas, return_tensors="np")["pixel_values"][0]))
    torch.testing.assert_close(high, expected, rtol=0, atol=1e-5)
    # The top padding band (5 px of 40 -> 96 rows of 768, minus the bicubic reach of 2 px = 38 rows) is exactly the
    # normalised mean colour.
    colour = (torch.tensor([122, 116, 104]) / 255.0 - torch.tensor(OPENAI_CLIP_MEAN)) / torch.tensor(OPENAI_CLIP_STD)
    torch.testing.assert_close(high[:, :56, :], colour[:, None, None].expand(3, 56, 768), rtol=0, atol=1e-6)


def test_preprocess_tall_image_pad_info():
    _, high, info = preprocess_mg_image(_random_image(30, 41, seed=1))
    assert (info.original_width, info.original_height, info.side, info.pad_left, info.pad_top) == (30, 41, 41, 5, 0)
    assert high.shape == (3, 768, 768)
    with pytest.raises(TypeError, match="PIL image"):
        preprocess_mg_image(np.zeros((4, 4, 3), dtype=np.uint8))


def test_low_res_is_plain_bilinear_of_normalised_high_res():
    low, high, _ = preprocess_mg_image(_random_image(33, 33, seed=2))
    # Bilinear with half-pixel centres and no antialias, as an explicit (336, 768) interpolation matrix.
    A = torch.zeros(336, 768, dtype=torch.float64)
    for i in range(336):
        src = max((i + 0.5) * 768 / 336 - 0.5, 0.0)
        i0 = int(math.floor(src))
        A[i, i0] += 1 - (src - i0)
        A[i, min(i0 + 1, 767)] += src - i0
    expected = torch.einsum("ih,chw,jw->cij", A, high.double(), A).float()
    torch.testing.assert_close(low, expected, rtol=0, atol=5e-5)  # antialias=True differs by ~0.05
