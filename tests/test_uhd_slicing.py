"""LLaVA-UHD v2 adaptive slicing (spec section 1) and token accounting (section 5).

Expected values are worked out by hand from the spec's algorithm in the comments next to them; a straightforward
re-derivation (`_reference_plan`) written here independently checks a sweep of sizes.
"""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from multigran.pipelines.uhd import (
    best_resize,
    count_uhd_tokens,
    plan_slices,
    preprocess_uhd_image,
    slice_separators,
)

S, P = 336, 14
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def test_spec_example_1008x672():
    # r = 1008*672 / 336^2 = 6 -> n0 = 6; candidates 5, 6, 7; log(1008/672) = log(1.5) = log(3/2) -> grid 3x2 (error 0).
    # cell = 336x336 -> slices 336x336. Overview: h = floor(336/sqrt(1.5)) = 274, w = floor(274*1.5) = 411,
    # floored to 14: 406x266.
    for max_slices in (7, 9):
        plan = plan_slices(1008, 672, max_slices)
        assert plan["grid"] == (3, 2)
        assert plan["slice_size"] == (336, 336)
        assert plan["refine_size"] == (1008, 672)
        assert plan["overview_size"] == (406, 266)


def test_spec_example_1024_square():
    # r = 1024^2 / 336^2 = 9.29 -> ceil 10.
    # N_max 9: n0 = 9, candidates 8, 9 -> 3x3 has error 0. cell = floor(1024/3) = 341 -> 336x336 slices.
    plan = plan_slices(1024, 1024, 9)
    assert plan["grid"] == (3, 3)
    assert plan["slice_size"] == (336, 336)
    assert plan["overview_size"] == (336, 336)  # h = floor(336/1) = 336
    # N_max 7: n0 = 7, candidates 6, 7; 2x3 and 3x2 tie mathematically (|log 2/3| = |log 3/2|); in float64
    # |log(2/3)| = 0.40546510810816444 > log(3/2) = 0.4054651081081644, so 3x2 wins as in the release (and the spec).
    assert abs(math.log(2 / 3)) > abs(math.log(3 / 2))
    plan = plan_slices(1024, 1024, 7)
    assert plan["grid"] == (3, 2)
    # cell = (1023/3) x (1024/2) = 341x512, rho = 0.666: h = floor(336/sqrt(0.666)) = 411, w = floor(411*0.666) = 273
    # -> floored to 14: 266x406 (a non-square slice, 19x29 patches).
    assert plan["slice_size"] == (266, 406)
    assert plan["refine_size"] == (3 * 266, 2 * 406)


def test_small_images_are_not_sliced_and_resized_at_their_aspect_ratio():
    # 200x100: r = 0.18 -> no slicing; rho = 2: h = floor(336/sqrt 2) = 237, w = 474 -> 462x224 (an upscale).
    assert plan_slices(200, 100, 7) == dict(grid=None, slice_size=None, refine_size=None, overview_size=(462, 224))
    # 100x50 has the same aspect ratio -> same size.
    assert plan_slices(100, 50, 7)["overview_size"] == (462, 224)
    # exactly S^2: r = 1 -> not sliced, 336x336.
    assert plan_slices(336, 336, 7)["overview_size"] == (336, 336)
    # 1x1: rho = 1 -> 336x336.
    assert plan_slices(1, 1, 9)["overview_size"] == (336, 336)
    # max_slices = 1 forces the no-slicing branch even for a big image, which is then resized DOWN: 1008x672 -> 406x266.
    assert plan_slices(1008, 672, 1) == dict(grid=None, slice_size=None, refine_size=None, overview_size=(406, 266))


def test_just_above_s_squared_slices_in_two():
    # 337x336: r = 1.003 -> n0 = 2; candidates 2, 3; log(337/336) ~ 0.003 -> 2x1 (error 0.69) beats 1x2 (0.696).
    # cell = floor(337/2) = 168 x 336, rho 0.5: h = floor(336/sqrt .5) = 475, w = 237 -> 224x462.
    # overview: rho = 1.003: h = floor(335.5) = 335, w = floor(335.997) = 335 -> 322x322 (downscaled, not 336).
    plan = plan_slices(337, 336, 7)
    assert plan["grid"] == (2, 1)
    assert plan["slice_size"] == (224, 462)
    assert plan["overview_size"] == (322, 322)


def test_extreme_aspect_ratios():
    # 100x2000 (1:20): r = 1.77 -> n0 = 2; candidates 2, 3; log(0.05) = -3.00: 1x3 (error 1.90) beats 1x2 (2.30).
    # cell = 100 x floor(2000/3) = 100x666, rho 0.150: h = floor(867.1) = 867, w = floor(130.2) = 130 -> 126x854.
    # overview: rho 0.05: h = floor(1502.6) = 1502, w = floor(75.1) = 75 -> 70x1498.
    plan = plan_slices(100, 2000, 7)
    assert plan["grid"] == (1, 3)
    assert plan["slice_size"] == (126, 854)
    assert plan["refine_size"] == (126, 3 * 854)
    assert plan["overview_size"] == (70, 1498)
    # 2000x100 (20:1): grid 3x1; cell 666x100, rho 6.66: h = floor(130.2) = 130, w = floor(865.8) = 865 -> 854x126.
    # overview: rho 20: h = floor(75.1) = 75, w = 1500 -> 1498x70.
    plan = plan_slices(2000, 100, 7)
    assert plan["grid"] == (3, 1)
    assert plan["slice_size"] == (854, 126)
    assert plan["overview_size"] == (1498, 70)
    # 20000x10 (2000:1): r = 1.77 -> grid 3x1; cell 6666x10, rho 666.6: h = floor(13.01) = 13, w = floor(8665.8) = 8665
    # -> 8652 x 14 (13 floors to 0, clamped to one patch).
    # Overview: rho 2000: h = floor(7.51) = 7, w = 14000 -> 14000x14.
    plan = plan_slices(20000, 10, 7)
    assert plan["grid"] == (3, 1)
    assert plan["slice_size"] == (8652, 14)
    assert plan["overview_size"] == (14000, 14)
    # 10x20000 with N_max 9 is the mirror image.
    plan = plan_slices(10, 20000, 9)
    assert plan["grid"] == (1, 3)
    assert min(plan["slice_size"]) == 14 and min(plan["overview_size"]) == 14


def _reference_plan(width, height, max_slices):
    """The spec's algorithm, written out plainly."""
    def fit(w, h):  # area ~S^2 at aspect w/h, floored to multiples of P, at least P
        rho = w / h
        new_h = int(S / math.sqrt(rho))
        new_w = int(new_h * rho)
        return max(new_w // P * P, P), max(new_h // P * P, P)

    n0 = min(math.ceil(width * height / S**2), max_slices)
    if n0 <= 1:
        return None, None, fit(width, height)
    grids = []
    for n in (n0 - 1, n0, n0 + 1):
        if n == 1 or n > max_slices:
            continue
        grids += [(m, n // m) for m in range(1, n + 1) if n % m == 0]
    errors = [abs(math.log(width / height) - math.log(c / r)) for c, r in grids]
    cols, rows = grids[errors.index(min(errors))]
    cell_w = max(width // cols * cols, cols) / cols
    cell_h = max(height // rows * rows, rows) / rows
    return (cols, rows), fit(cell_w, cell_h), fit(width, height)  # sliced images are > S^2: overview is a downscale


@pytest.mark.parametrize("max_slices", [2, 4, 7, 9])
def test_sweep_against_reference(max_slices):
    rng = np.random.default_rng(max_slices)
    sizes = [(int(w), int(h)) for w, h in rng.integers(1, 3000, size=(150, 2))]
    sizes += [(1, 3000), (3000, 1), (336, 337), (672, 672), (1344, 336)]
    for w, h in sizes:
        plan = plan_slices(w, h, max_slices)
        grid, slice_size, overview = _reference_plan(w, h, max_slices)
        assert (plan["grid"], plan["slice_size"], plan["overview_size"]) == (grid, slice_size, overview), (w, h)
        assert all(side % P == 0 and side >= P for side in overview)
        if grid is not None:
            assert 2 <= grid[0] * grid[1] <= max_slices
            assert all(side % P == 0 and side >= P for side in slice_size)
            assert plan["refine_size"] == (slice_size[0] * grid[0], slice_size[1] * grid[1])
            assert overview[0] <= w and overview[1] <= h  # never upscaled when slicing


def test_best_resize_never_upscales_without_permission():
    assert best_resize(100, 50) == (98, 42)  # only floored to multiples of 14
    assert best_resize(5, 5) == (14, 14)  # never zero
    assert best_resize(100, 50, allow_upscale=True) == (462, 224)


@pytest.mark.parametrize(
    "args, error",
    [
        ((1008, 672, 0), ValueError),
        ((1008, 672, -3), ValueError),
        ((0, 672, 7), ValueError),
        ((1008, -1, 7), ValueError),
        ((1008.0, 672, 7), TypeError),
        ((1008, 672, 7.5), TypeError),
    ],
)
def test_plan_slices_rejects_bad_input(args, error):
    with pytest.raises(error, match="plan_slices"):
        plan_slices(*args)


def _pattern_image(width, height):
    ys, xs = np.mgrid[0:height, 0:width]
    rgb = np.stack([(xs * 7 + ys) % 256, (ys * 5) % 256, (xs * ys) % 256], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb, "RGB")


def _normalize(image):
    x = torch.tensor(np.array(image), dtype=torch.float64).permute(2, 0, 1) / 255
    return ((x - torch.tensor(CLIP_MEAN, dtype=torch.float64)[:, None, None])
            / torch.tensor(CLIP_STD, dtype=torch.float64)[:, None, None]).float()


def test_preprocess_slices_and_overview():
    image = _pattern_image(1008, 672)
    out = preprocess_uhd_image(image, 7, CLIP_MEAN, CLIP_STD)
    assert out["grid"] == (3, 2)
    assert len(out["slices"]) == 6
    assert out["overview"].shape == (3, 266, 406)
    assert out["patch_grids"] == [(24, 24)] * 6 + [(19, 29)]
    # slice k = crop (col*336, row*336) of the image resized to 1008x672 (here: unchanged size), raster order
    refined = image.resize((1008, 672), Image.Resampling.BICUBIC)
    for k, tensor in enumerate(out["slices"]):
        row, col = divmod(k, 3)
        crop = refined.crop((col * 336, row * 336, col * 336 + 336, row * 336 + 336))
        torch.testing.assert_close(tensor, _normalize(crop), rtol=0, atol=1e-5)
    expected_overview = _normalize(image.resize((406, 266), Image.Resampling.BICUBIC))
    torch.testing.assert_close(out["overview"], expected_overview, rtol=0, atol=1e-5)


def test_preprocess_no_slicing_and_pre_resize():
    small = _pattern_image(200, 100)
    out = preprocess_uhd_image(small, 7, CLIP_MEAN, CLIP_STD)
    assert out["grid"] is None and out["slices"] == []
    assert out["overview"].shape == (3, 224, 462)
    assert out["patch_grids"] == [(16, 33)]
    # evaluation pre-resize: long side 1024 (also upscales) -> 1024x512, r = 4.64 -> n0 = 5; candidates 4, 5, 6 with
    # log(2) = 0.69: 2x2 and 4x1 err 0.69, 5x1 0.92, 3x2 0.29 (best), 2x3 1.10.
    out = preprocess_uhd_image(small, 7, CLIP_MEAN, CLIP_STD, pre_resize_long_side=1024)
    assert out["image_size"] == (1024, 512)
    assert out["grid"] == (3, 2)
    # tall image: the height becomes the long side
    tall = preprocess_uhd_image(_pattern_image(100, 300), 7, CLIP_MEAN, CLIP_STD, pre_resize_long_side=1024)
    assert tall["image_size"] == (341, 1024)  # int(1024 / 300 * 100) = 341


def test_preprocess_rejects_bad_input():
    with pytest.raises(TypeError, match="PIL"):
        preprocess_uhd_image(np.zeros((10, 10, 3), np.uint8), 7, CLIP_MEAN, CLIP_STD)
    with pytest.raises(ValueError, match="mean"):
        preprocess_uhd_image(_pattern_image(10, 10), 7, CLIP_MEAN[:2], CLIP_STD)
    with pytest.raises(ValueError, match="max_slices"):
        preprocess_uhd_image(_pattern_image(10, 10), 0, CLIP_MEAN, CLIP_STD)


def test_token_count_and_separators():
    assert count_uhd_tokens(None) == 144  # not sliced: the overview's 144 tokens only
    assert count_uhd_tokens((3, 2)) == 1014  # spec: 145 * 6 + 144
    assert count_uhd_tokens((3, 3)) == 145 * 9 + 144
    assert count_uhd_tokens((1, 3), tokens_per_image=4) == 5 * 3 + 4
    assert slice_separators(None) == []
    assert slice_separators((3, 2)) == [",", ",", "\n", ",", ",", "\n"]
    assert slice_separators((1, 3)) == ["\n", "\n", "\n"]
    with pytest.raises(TypeError, match="grid"):
        count_uhd_tokens((3, 2, 1))
    with pytest.raises(ValueError, match="grid rows"):
        count_uhd_tokens((3, 0))
