"""AVG-LLaVA granularity scaler: pyramid pooling, merge at a granularity, token counts (spec: avg-llava.md)."""

import math
import random
from types import SimpleNamespace

import pytest
import torch
from transformers.image_processing_utils import select_best_resolution
from transformers.models.llava_next.modeling_llava_next import LlavaNextModel, unpad_image

from multigran.pipelines.avg import count_tokens_at_granularity, merge_at_granularity
from multigran.pipelines.granularity import granularity_levels, pool_level

# CLIP-L/336 geometry: 24x24 patches per 336 px tile; LLaVA-NeXT pinpoints in (height, width) order.
GRID = 24
TILE = 336
PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
DIM = 3  # tiny feature width: the merge only moves vectors around


def crops_for(image_size, tokens, dim=DIM, tile=TILE, pinpoints=PINPOINTS, dtype=torch.float64, seed=0):
    height, width = select_best_resolution(list(image_size), pinpoints)
    num_crops = (height // tile) * (width // tile) + 1
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(num_crops, tokens, dim, generator=generator, dtype=dtype)


def hf_pack(features, image_size, newline, grid=GRID, tile=TILE, pinpoints=PINPOINTS):
    """Hugging Face's LlavaNextModel.pack_image_features on one image (it only reads these config fields)."""
    fake_model = SimpleNamespace(
        config=SimpleNamespace(
            vision_config=SimpleNamespace(image_size=tile, patch_size=tile // grid), image_grid_pinpoints=pinpoints
        )
    )
    packed, lengths = LlavaNextModel.pack_image_features(
        fake_model, [features], torch.tensor([list(image_size)]), "default", image_newline=newline
    )
    assert lengths.tolist() == [packed[0].shape[0]]
    return packed[0]


def loop_pool(grid_tensor, kernel_rows, kernel_cols):
    """Slow average pooling of one (rows, cols, D) grid, window by window."""
    rows, cols, dim = grid_tensor.shape
    out = torch.zeros(rows // kernel_rows, cols // kernel_cols, dim, dtype=grid_tensor.dtype)
    for r in range(rows // kernel_rows):
        for c in range(cols // kernel_cols):
            total = torch.zeros(dim, dtype=grid_tensor.dtype)
            for dr in range(kernel_rows):
                for dc in range(kernel_cols):
                    total += grid_tensor[r * kernel_rows + dr, c * kernel_cols + dc]
            out[r, c] = total / (kernel_rows * kernel_cols)
    return out


def random_sizes(count, seed):
    rng = random.Random(seed)
    sizes = [(rng.randint(20, 2200), rng.randint(20, 2200)) for _ in range(count)]
    # wide and tall extremes, exact pinpoint shapes and the spec's table images
    return sizes + [(672, 672), (500, 1000), (1000, 500), (336, 1008), (1008, 336), (30, 2000), (2000, 30), (337, 673)]


# ---------------------------------------------------------------------------------------------------------------------
# pyramid


def test_levels_scale_with_the_patch_grid():
    assert granularity_levels(24) == [
        (36, (4, 4), (6, 6)),
        (72, (2, 4), (12, 6)),
        (144, (2, 2), (12, 12)),
        (288, (1, 2), (24, 12)),
        (576, (1, 1), (24, 24)),
    ]
    assert [tokens for tokens, _, _ in granularity_levels(12)] == [9, 18, 36, 72, 144]
    for n in (8, 16, 32):
        assert [t for t, _, _ in granularity_levels(n)] == [n * n // 16, n * n // 8, n * n // 4, n * n // 2, n * n]
        for tokens, _, (rows, cols) in granularity_levels(n):
            assert rows * cols == tokens
    for bad in (0, 6, 27, -8, 24.0):
        with pytest.raises(ValueError, match="multiple of 4"):
            granularity_levels(bad)


@pytest.mark.parametrize("grid", [24, 8])
def test_pool_level_equals_a_slow_window_average_in_raster_order(grid):
    features = torch.randn(2, grid * grid, 3, dtype=torch.float64)
    for tokens, (kernel_rows, kernel_cols), (rows, cols) in granularity_levels(grid):
        pooled = pool_level(features, (kernel_rows, kernel_cols))
        assert pooled.shape == (2, tokens, 3)
        for crop in range(2):
            expected = loop_pool(features[crop].view(grid, grid, 3), kernel_rows, kernel_cols)
            # raster order of the pooled grid: token r*cols + c is window (r, c)
            torch.testing.assert_close(pooled[crop].view(rows, cols, 3), expected, rtol=0, atol=1e-12)


def test_levels_equal_alternately_stacked_1x2_and_2x1_pools():
    # The paper: "sequentially stacks 1x2 and 2x1 average pooling layers" 576 -> 288 -> 144 -> 72 -> 36.
    features = torch.randn(1, 576, 4, dtype=torch.float64)
    p36, p72, p144, p288, p576 = (pool_level(features, k)[0] for _, k, _ in granularity_levels(24))
    torch.testing.assert_close(p576, features[0], rtol=0, atol=0)
    step = loop_pool(features[0].view(24, 24, 4), 1, 2)  # 24x12
    torch.testing.assert_close(p288.view(24, 12, 4), step, rtol=0, atol=1e-12)
    step = loop_pool(step, 2, 1)  # 12x12
    torch.testing.assert_close(p144.view(12, 12, 4), step, rtol=0, atol=1e-12)
    step = loop_pool(step, 1, 2)  # 12x6
    torch.testing.assert_close(p72.view(12, 6, 4), step, rtol=0, atol=1e-12)
    step = loop_pool(step, 2, 1)  # 6x6
    torch.testing.assert_close(p36.view(6, 6, 4), step, rtol=0, atol=1e-12)


def test_pool_level_rejects_bad_shapes():
    with pytest.raises(ValueError, match="crops, n\\*n, D"):
        pool_level(torch.zeros(576, 4), (2, 2))
    with pytest.raises(ValueError, match="not a square grid"):
        pool_level(torch.zeros(1, 575, 4), (1, 1))
    with pytest.raises(ValueError, match="divisible by the kernel"):
        pool_level(torch.zeros(1, 36, 4), (4, 4))  # 6x6 grid, kernel 4


# ---------------------------------------------------------------------------------------------------------------------
# merge and counts


# Spec table (compat = released code; "corrected" values in parentheses in the spec):
#   672x672 -> best resolution 672x672, 2x2 tiles. 1000x500 (width x height) -> image_size (h, w) = (500, 1000),
#   best resolution (336, 672), 1 row x 2 cols of tiles.
# Tokens = g (base crop) + H_u * (W_u + 1).
COMPAT_TABLE = {
    # 576: 48x48 grid, square image, nothing removed: 576 + 48*49 = 2928
    # 288: 48x24 grid; the released unpad sees aspect 24/48 = 0.5 < 1 and keeps 672*24/672 = 24 rows: 288 + 24*25 = 888
    # 144: 24x24: 144 + 24*25 = 744;  72: 24x12 grid -> 12 rows kept: 72 + 12*13 = 228;  36: 12x12: 36 + 12*13 = 192
    (672, 672): [192, 228, 744, 888, 2928],
    # 576: 24x48 grid, aspect 2 = image aspect, nothing removed: 576 + 24*49 = 1752
    # 288: 24x24 grid; aspect 1 < 2 -> keeps 500*24/1000 = 12 rows: 288 + 12*25 = 588
    # 144: 12x24: 144 + 12*25 = 444;  72: 12x12 -> 6 rows: 72 + 6*13 = 150;  36: 6x12: 36 + 6*13 = 114
    (500, 1000): [114, 150, 444, 588, 1752],
}
CORRECTED_TABLE = {
    # 288: 48x24 grid holds the whole square image: 288 + 48*25 = 1488;  72: 24x12: 72 + 24*13 = 384 (spec)
    (672, 672): [192, 384, 744, 1488, 2928],
    # 1000x500 fills its 1x2 tile canvas exactly, so nothing is padding at any level:
    # 288: 24x24 grid: 288 + 24*25 = 888;  72: 12x12 grid: 72 + 12*13 = 228
    (500, 1000): [114, 228, 444, 888, 1752],
}


@pytest.mark.parametrize("compat, table", [(True, COMPAT_TABLE), (False, CORRECTED_TABLE)])
def test_token_count_table(compat, table):
    levels = granularity_levels(GRID)
    for image_size, expected in table.items():
        counts = [count_tokens_at_granularity(image_size, PINPOINTS, TILE, GRID, i, compat) for i in range(5)]
        assert counts == expected, (image_size, compat)
        for index, (tokens, _, level_grid) in enumerate(levels):
            crops = crops_for(image_size, tokens)
            merged = merge_at_granularity(crops, image_size, PINPOINTS, TILE, level_grid, torch.ones(DIM), compat)
            assert merged.shape == (expected[index], DIM)


@pytest.mark.parametrize("compat", [True, False])
def test_finest_level_is_hugging_face_pack_image_features(compat):
    newline = torch.randn(DIM, dtype=torch.float64)
    for image_size in random_sizes(25, seed=1):
        features = crops_for(image_size, GRID * GRID, seed=image_size[0])
        ours = merge_at_granularity(features, image_size, PINPOINTS, TILE, (GRID, GRID), newline, compat)
        assert torch.equal(ours, hf_pack(features, image_size, newline)), image_size


def test_finest_level_is_hugging_face_at_another_tower_grid():
    # a 12x12 tower (168 px tiles, patch 14): levels 9/18/36/72/144
    pinpoints = [[h // 2, w // 2] for h, w in PINPOINTS]
    newline = torch.randn(DIM, dtype=torch.float64)
    for image_size in random_sizes(10, seed=2):
        features = crops_for(image_size, 144, tile=168, pinpoints=pinpoints)
        ours = merge_at_granularity(features, image_size, pinpoints, 168, (12, 12), newline)
        assert torch.equal(ours, hf_pack(features, image_size, newline, grid=12, tile=168, pinpoints=pinpoints))
        for index, (tokens, _, level_grid) in enumerate(granularity_levels(12)):
            merged = merge_at_granularity(crops_for(image_size, tokens, tile=168, pinpoints=pinpoints),
                                          image_size, pinpoints, 168, level_grid, newline)
            assert merged.shape[0] == count_tokens_at_granularity(image_size, pinpoints, 168, 12, index)


def slow_merge_with_hf_unpad(crops, image_size, level_grid, newline):
    """Reference for compat at every level: stitch tile by tile, HF's unpad_image, newline per row, loops."""
    h, w = level_grid
    best_h, best_w = select_best_resolution(list(image_size), PINPOINTS)
    rows, cols = best_h // TILE, best_w // TILE
    dim = crops.shape[-1]
    stitched = torch.zeros(dim, rows * h, cols * w, dtype=crops.dtype)
    for tile in range(rows * cols):
        tile_row, tile_col = divmod(tile, cols)
        for token in range(h * w):
            r, c = divmod(token, w)
            stitched[:, tile_row * h + r, tile_col * w + c] = crops[1 + tile, token]
    kept = unpad_image(stitched, list(image_size))
    out = [crops[0, t] for t in range(h * w)]
    for r in range(kept.shape[1]):
        out += [kept[:, r, c] for c in range(kept.shape[2])] + [newline]
    return torch.stack(out)


def test_compat_is_the_released_unpad_on_the_pooled_grid_at_every_level():
    newline = torch.randn(DIM, dtype=torch.float64)
    for image_size in [(672, 672), (500, 1000), (1000, 500), (300, 800), (900, 350), (1234, 567)]:
        for tokens, _, level_grid in granularity_levels(GRID):
            crops = crops_for(image_size, tokens)
            ours = merge_at_granularity(crops, image_size, PINPOINTS, TILE, level_grid, newline, compat=True)
            expected = slow_merge_with_hf_unpad(crops, image_size, level_grid, newline)
            assert torch.equal(ours, expected), (image_size, tokens)


def test_corrected_unpad_follows_the_image_geometry():
    # Reference: each axis is unpadded by HF's unpad_image on a canvas of square cells of that axis' own size:
    # rows against (rows*h) x (cols*h), columns against (rows*w) x (cols*w).
    for image_size in random_sizes(60, seed=3):
        best_h, best_w = select_best_resolution(list(image_size), PINPOINTS)
        rows, cols = best_h // TILE, best_w // TILE
        # the processor's resized content inside the padded canvas, in pixels (HF get_patch_output_size)
        scale_w, scale_h = best_w / image_size[1], best_h / image_size[0]
        if scale_w < scale_h:
            content_h, content_w = min(math.ceil(image_size[0] * scale_w), best_h), best_w
        else:
            content_h, content_w = best_h, min(math.ceil(image_size[1] * scale_h), best_w)
        for index, (tokens, _, (h, w)) in enumerate(granularity_levels(GRID)):
            kept_rows = unpad_image(torch.zeros(1, rows * h, cols * h), list(image_size)).shape[1]
            kept_cols = unpad_image(torch.zeros(1, rows * w, cols * w), list(image_size)).shape[2]
            expected = tokens + kept_rows * (kept_cols + 1)
            assert count_tokens_at_granularity(image_size, PINPOINTS, TILE, GRID, index, compat=False) == expected
            # and the kept tokens cover the image content to within two token cells on each axis
            assert abs(kept_rows * TILE / h - content_h) <= 2 * TILE / h, (image_size, tokens)
            assert abs(kept_cols * TILE / w - content_w) <= 2 * TILE / w, (image_size, tokens)
            if h == w:  # square levels: both modes agree
                assert expected == count_tokens_at_granularity(image_size, PINPOINTS, TILE, GRID, index, compat=True)


def test_corrected_merge_keeps_the_central_rows_and_columns():
    # index features: feature 0 = stitched row, feature 1 = stitched column, so the kept region is visible
    image_size = (1000, 300)  # tall: 3 rows x 1 col of tiles (1008x336), columns are padding on both sides
    for compat in (True, False):
        for tokens, _, (h, w) in granularity_levels(GRID):
            rows, cols = 3, 1
            crops = torch.zeros(1 + rows * cols, tokens, 2)
            for tile in range(rows * cols):
                for token in range(tokens):
                    r, c = divmod(token, w)
                    crops[1 + tile, token] = torch.tensor([tile * h + r, c], dtype=torch.float32)
            merged = merge_at_granularity(crops, image_size, PINPOINTS, TILE, (h, w), torch.full((2,), -1.0), compat)
            body = merged[tokens:]
            newline_at = (body[:, 0] == -1).nonzero().squeeze(1)
            width = newline_at[0].item()  # W_u: tokens before the first newline
            body = body.view(-1, width + 1, 2)[:, :width].long()  # (H_u, W_u, 2)
            kept_rows = body[:, 0, 0].tolist()
            kept_cols = body[0, :, 1].tolist()
            assert kept_cols == list(range(kept_cols[0], kept_cols[0] + width))  # contiguous, centred
            assert kept_cols[0] == w - 1 - kept_cols[-1]
            if not compat or h == w:
                # corrected (and square levels): every image row kept; 300/1000 of the 1008 px canvas width is image
                assert kept_rows == list(range(rows * h))
                assert abs(width - round(300 * (1008 / 1000) / TILE * w)) <= 1
            assert kept_rows == list(range(kept_rows[0], kept_rows[0] + len(kept_rows)))


@pytest.mark.parametrize("compat", [True, False])
def test_counts_equal_merged_lengths(compat):
    newline = torch.zeros(2)
    levels = granularity_levels(GRID)
    for image_size in random_sizes(80, seed=4):
        for index, (tokens, _, level_grid) in enumerate(levels):
            crops = crops_for(image_size, tokens, dim=2, dtype=torch.float32)
            merged = merge_at_granularity(crops, image_size, PINPOINTS, TILE, level_grid, newline, compat)
            assert merged.shape[0] == count_tokens_at_granularity(image_size, PINPOINTS, TILE, GRID, index, compat)


def test_single_crop_gets_one_newline_at_every_level():
    newline = torch.randn(DIM, dtype=torch.float64)
    for index, (tokens, _, level_grid) in enumerate(granularity_levels(GRID)):
        crop = torch.randn(1, tokens, DIM, dtype=torch.float64)
        merged = merge_at_granularity(crop, (500, 700), PINPOINTS, TILE, level_grid, newline)
        assert torch.equal(merged, torch.cat([crop[0], newline[None]]))
        assert count_tokens_at_granularity((500, 700), None, TILE, GRID, index) == tokens + 1
    crop = torch.randn(1, 576, DIM, dtype=torch.float64)
    assert torch.equal(merge_at_granularity(crop, (500, 700), PINPOINTS, TILE, (24, 24), newline),
                       hf_pack(crop, (500, 700), newline))


def test_merge_keeps_dtype_and_device():
    crops = crops_for((500, 1000), 288, dtype=torch.bfloat16)
    merged = merge_at_granularity(crops, (500, 1000), PINPOINTS, TILE, (24, 12), torch.ones(DIM), compat=False)
    assert merged.dtype == torch.bfloat16 and merged.shape == (888, DIM)
    assert pool_level(torch.randn(2, 576, 4, dtype=torch.bfloat16), (2, 4)).dtype == torch.bfloat16


def test_merge_and_count_reject_bad_input():
    newline = torch.zeros(DIM)
    crops = crops_for((672, 672), 144)
    with pytest.raises(ValueError, match="needs 2x2 tiles"):
        merge_at_granularity(crops[:3], (672, 672), PINPOINTS, TILE, (12, 12), newline)
    with pytest.raises(ValueError, match="does not hold 144 tokens"):
        merge_at_granularity(crops, (672, 672), PINPOINTS, TILE, (24, 12), newline)
    with pytest.raises(ValueError, match="image_newline must have shape"):
        merge_at_granularity(crops, (672, 672), PINPOINTS, TILE, (12, 12), torch.zeros(DIM + 1))
    with pytest.raises(ValueError, match="crops, g, D"):
        merge_at_granularity(crops[0], (672, 672), PINPOINTS, TILE, (12, 12), newline)
    with pytest.raises(ValueError, match="level_index 5 outside"):
        count_tokens_at_granularity((672, 672), PINPOINTS, TILE, GRID, 5)
