"""multigran.ops.roi_align against a slow, obvious transcription of torchvision's RoIAlign kernel."""

import importlib
import math

import pytest
import torch

from multigran.ops import roi_align, roi_align_mean

# the package re-exports the function under the submodule's name, so fetch the module itself
roi_align_module = importlib.import_module("multigran.ops.roi_align")


def bilinear_reference(feature, y, x):
    """torchvision's bilinear_interpolate for one sample point on a (C, H, W) map (python floats)."""
    _, height, width = feature.shape
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return torch.zeros(feature.shape[0], dtype=feature.dtype)
    y = max(y, 0.0)
    x = max(x, 0.0)
    y_low, x_low = int(y), int(x)
    if y_low >= height - 1:
        y_high = y_low = height - 1
        y = float(y_low)
    else:
        y_high = y_low + 1
    if x_low >= width - 1:
        x_high = x_low = width - 1
        x = float(x_low)
    else:
        x_high = x_low + 1
    ly, lx = y - y_low, x - x_low
    hy, hx = 1.0 - ly, 1.0 - lx
    return (
        hy * hx * feature[:, y_low, x_low]
        + hy * lx * feature[:, y_low, x_high]
        + ly * hx * feature[:, y_high, x_low]
        + ly * lx * feature[:, y_high, x_high]
    )


def roi_align_reference(features, rois, output_size, spatial_scale, sampling_ratio, aligned):
    """One box, one output cell, one sample point at a time."""
    out_h, out_w = output_size
    channels = features.shape[1]
    out = torch.zeros(rois.shape[0], channels, out_h, out_w, dtype=features.dtype)
    offset = 0.5 if aligned else 0.0
    for k, (b, x1, y1, x2, y2) in enumerate(rois.tolist()):
        feature = features[int(b)]
        start_w, start_h = x1 * spatial_scale - offset, y1 * spatial_scale - offset
        roi_w, roi_h = x2 * spatial_scale - offset - start_w, y2 * spatial_scale - offset - start_h
        if not aligned:
            roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
        bin_h, bin_w = roi_h / out_h, roi_w / out_w
        grid_h = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_h / out_h)
        grid_w = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_w / out_w)
        count = max(grid_h * grid_w, 1)
        for ph in range(out_h):
            for pw in range(out_w):
                total = torch.zeros(channels, dtype=features.dtype)
                for iy in range(grid_h):
                    y = start_h + ph * bin_h + (iy + 0.5) * bin_h / grid_h
                    for ix in range(grid_w):
                        x = start_w + pw * bin_w + (ix + 0.5) * bin_w / grid_w
                        total = total + bilinear_reference(feature, y, x)
                out[k, :, ph, pw] = total / count
    return out


def random_rois(generator, num, num_images, height, width, scale):
    """Boxes in image coordinates (map size / scale): inside, partly outside, fully outside, degenerate, flipped."""
    img_h, img_w = height / scale, width / scale
    x1 = torch.rand(num, generator=generator, dtype=torch.float64) * 1.6 * img_w - 0.3 * img_w
    y1 = torch.rand(num, generator=generator, dtype=torch.float64) * 1.6 * img_h - 0.3 * img_h
    x2 = x1 + torch.rand(num, generator=generator, dtype=torch.float64) * 0.9 * img_w
    y2 = y1 + torch.rand(num, generator=generator, dtype=torch.float64) * 0.9 * img_h
    index = torch.randint(0, num_images, (num,), generator=generator).double()
    rois = torch.stack([index, x1, y1, x2, y2], dim=1)
    special = torch.tensor(
        [
            [0, 0.0, 0.0, img_w, img_h],  # whole map
            [num_images - 1, 2.0, 3.0, 2.0, 3.0],  # zero width and height
            [0, 5.0, 1.0, 3.0, 4.0],  # x2 < x1
            [0, 1.0, 4.0, 3.0, 1.5],  # y2 < y1
            [num_images - 1, -50.0, -40.0, -20.0, -10.0],  # fully outside, top-left
            [0, img_w + 10, img_h + 5, img_w + 30, img_h + 20],  # fully outside, bottom-right
            [0, -0.7 / scale, -1.0 / scale, img_w + 0.9 / scale, img_h + 1.0 / scale],  # samples near the -1 / H limits
        ],
        dtype=torch.float64,
    )
    return torch.cat([rois, special])


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 1, 2, 3])
def test_matches_reference_float64(aligned, sampling_ratio):
    generator = torch.Generator().manual_seed(1000 * aligned + sampling_ratio + 7)
    features = torch.randn(3, 4, 9, 13, generator=generator, dtype=torch.float64)
    for output_size, scale in [((3, 2), 1.0), ((2, 5), 0.5)]:
        rois = random_rois(generator, 10, 3, 9, 13, scale)
        got = roi_align(features, rois, output_size, scale, sampling_ratio, aligned)
        want = roi_align_reference(features, rois, output_size, scale, sampling_ratio, aligned)
        assert got.shape == (rois.shape[0], 4, *output_size)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_matches_reference_float32_int_output_size_and_box_list():
    generator = torch.Generator().manual_seed(3)
    features = torch.randn(2, 5, 11, 8, generator=generator)
    boxes = [
        torch.tensor([[0.0, 0.0, 16.0, 22.0], [3.2, 1.7, 9.9, 20.4]]),
        torch.tensor([[-4.0, 2.0, 6.5, 30.0]]),
    ]
    got = roi_align(features, boxes, 4, spatial_scale=0.5)
    rois = torch.tensor([[0.0, *boxes[0][0]], [0.0, *boxes[0][1]], [1.0, *boxes[1][0]]], dtype=torch.float64)
    want = roi_align_reference(features.double(), rois, (4, 4), 0.5, -1, False).float()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_adaptive_grid_differs_per_box():
    # small box: grid 1; large box: grid ceil(12/2) = 6 per axis; checks the per-box masking of padded samples
    features = torch.randn(1, 2, 16, 16, dtype=torch.float64)
    rois = torch.tensor(
        [[0, 1.0, 1.0, 2.5, 2.5], [0, 0.0, 0.0, 12.0, 12.0], [0, 3.0, 2.0, 4.0, 14.0]], dtype=torch.float64
    )
    got = roi_align(features, rois, 2, 1.0)
    want = roi_align_reference(features, rois, (2, 2), 1.0, -1, False)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_constant_map_inside_gives_constant():
    # hand-computed: every in-map sample of a constant map reads the constant
    features = torch.full((1, 3, 6, 6), 2.5)
    out = roi_align(features, torch.tensor([[0, 0.5, 0.5, 4.5, 5.0]]), (2, 3), 1.0, sampling_ratio=2)
    torch.testing.assert_close(out, torch.full((1, 3, 2, 3), 2.5))


def test_samples_exactly_on_the_limits():
    # one sample per bin at the box centre. Centre y = H (= 4): still valid, reads row H-1; y = -1: valid, reads row 0;
    # y slightly beyond: contributes 0. Hand-computed values on a map whose rows hold their own index.
    features = torch.arange(4, dtype=torch.float64).view(1, 1, 4, 1).expand(1, 1, 4, 3).contiguous()
    rois = torch.tensor(
        [
            [0, 0.0, 3.0, 2.0, 5.0],
            [0, 0.0, -2.0, 2.0, 0.0],
            [0, 0.0, 3.0, 2.0, 5.0 + 1e-6],
            [0, 0.0, -2.0 - 1e-6, 2.0, 0.0],
        ],
        dtype=torch.float64,
    )
    out = roi_align(features, rois, 1, 1.0, sampling_ratio=1)
    assert out.flatten().tolist() == [3.0, 0.0, 0.0, 0.0]
    assert roi_align(features + 1, rois[:2], 1, 1.0, sampling_ratio=1).flatten().tolist() == [4.0, 1.0]


def test_chunked_equals_unchunked(monkeypatch):
    generator = torch.Generator().manual_seed(11)
    features = torch.randn(2, 3, 12, 10, generator=generator, dtype=torch.float64)
    rois = random_rois(generator, 20, 2, 12, 10, 1.0)
    whole = roi_align(features, rois, (3, 3), 1.0)
    monkeypatch.setattr(roi_align_module, "CHUNK_ELEMENTS", 500)  # forces many small chunks, sorted by size
    chunked = roi_align(features, rois, (3, 3), 1.0)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-12)
    want = roi_align_reference(features, rois, (3, 3), 1.0, -1, False)
    torch.testing.assert_close(chunked, want, rtol=1e-10, atol=1e-10)


def test_gradcheck_float64():
    generator = torch.Generator().manual_seed(5)
    features = torch.randn(2, 1, 4, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor(
        [[0, 0.3, 0.7, 4.2, 3.9], [1, -1.0, 1.2, 3.3, 4.5], [1, 2.0, 2.0, 2.0, 2.0]], dtype=torch.float64
    )
    assert torch.autograd.gradcheck(lambda f: roi_align(f, rois, (2, 3), 1.0, -1, False), (features,))
    assert torch.autograd.gradcheck(lambda f: roi_align(f, rois, (3, 2), 0.8, 2, True), (features,))


def test_bfloat16_and_channels_last_view():
    generator = torch.Generator().manual_seed(9)
    hwc = torch.randn(1, 7, 9, 4, generator=generator)  # channels-last map, viewed as (N, C, H, W)
    rois = torch.tensor([[0, 0.0, 0.0, 4.5, 3.5], [0, 2.0, 1.0, 9.0, 7.0]])
    got = roi_align(hwc.permute(0, 3, 1, 2).bfloat16(), rois, (2, 2), 1.0)
    want = roi_align_reference(hwc.permute(0, 3, 1, 2).bfloat16().double(), rois.double(), (2, 2), 1.0, -1, False)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), want, rtol=1e-2, atol=1e-2)


def test_empty_boxes():
    features = torch.randn(2, 3, 5, 5)
    assert roi_align(features, torch.zeros(0, 5), (2, 4), 1.0).shape == (0, 3, 2, 4)
    assert roi_align(features, [torch.zeros(0, 4), torch.zeros(0, 4)], 3, 1.0).shape == (0, 3, 3, 3)


@pytest.mark.parametrize(
    "boxes, message",
    [
        (torch.zeros(3, 4), "boxes must be"),
        (torch.zeros(5), "boxes must be"),
        (torch.tensor([[2.0, 0, 0, 1, 1]]), "batch index"),
        (torch.tensor([[-1.0, 0, 0, 1, 1]]), "batch index"),
        (torch.tensor([[0.5, 0, 0, 1, 1]]), "batch index"),
        (torch.tensor([[0.0, 0, float("nan"), 1, 1]]), "non-finite"),
        (torch.tensor([[0.0, 0, 0, float("inf"), 1]]), "non-finite"),
        ([torch.zeros(1, 5)], r"boxes\[0\]"),
        ([torch.zeros(1, 4)] * 3, "3 images"),
    ],
)
def test_bad_boxes(boxes, message):
    with pytest.raises(ValueError, match=message):
        roi_align(torch.randn(2, 1, 4, 4), boxes, 2, 1.0)


def test_bad_features_and_output_size():
    with pytest.raises(ValueError, match="features"):
        roi_align(torch.randn(1, 4, 4), torch.zeros(0, 5), 2, 1.0)
    with pytest.raises(ValueError, match="output_size"):
        roi_align(torch.randn(1, 1, 4, 4), torch.zeros(0, 5), (2, 0), 1.0)
    with pytest.raises(ValueError, match="output_size"):
        roi_align(torch.randn(1, 1, 4, 4), torch.zeros(0, 5), (2, 2, 2), 1.0)


@pytest.mark.parametrize("aligned, sampling_ratio", [(False, -1), (True, 2)])
def test_roi_align_mean_equals_mean_of_reference(aligned, sampling_ratio, monkeypatch):
    generator = torch.Generator().manual_seed(21 + aligned)
    features = torch.randn(3, 4, 9, 11, generator=generator, dtype=torch.float64)
    rois = random_rois(generator, 8, 3, 9, 11, 0.5)
    want = roi_align_reference(features, rois, (3, 4), 0.5, sampling_ratio, aligned).mean((2, 3))
    got = roi_align_mean(features, rois, (3, 4), 0.5, sampling_ratio, aligned)
    assert got.shape == (rois.shape[0], 4)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    monkeypatch.setattr(roi_align_module, "CHUNK_ELEMENTS", 1)  # one box per matmul
    torch.testing.assert_close(roi_align_mean(features, rois, (3, 4), 0.5, sampling_ratio, aligned), want)
    assert roi_align_mean(features, torch.zeros(0, 5), 2, 1.0).shape == (0, 4)


def test_roi_align_mean_gradcheck():
    features = torch.randn(2, 1, 4, 5, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor([[1, 0.3, 0.7, 4.2, 3.9], [0, -1.0, 1.2, 3.3, 6.5]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda f: roi_align_mean(f, rois, (3, 2), 1.0), (features,))
