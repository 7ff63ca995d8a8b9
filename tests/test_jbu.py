"""JBU upsampler (spec section 3): adaptive convolution, JBULearnedRange / JBU4xStack against a slow per-pixel
reference written here, release key names, real-size parameter count, and the stage-0 hierarchical supervision."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from multigran.ops.adaptive_conv import adaptive_conv, window_dot
from multigran.pipelines.uhd_jbu import (
    AttentionDownsampler,
    JBU4xStack,
    JBUStage0Loss,
    ScaleNet,
    _gaussian_blur,
    sample_jitter,
    sampled_crf_loss,
    uncertainty_loss,
)


@pytest.fixture(autouse=True)
def _one_thread():
    # These tensors are tiny: intra-op threads only add synchronisation (10x slower on a busy 2-core machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _reflect(index, size):
    if index < 0:
        return -index
    if index >= size:
        return 2 * (size - 1) - index
    return index


def _replicate(index, size):
    return min(max(index, 0), size - 1)


# ---------------------------------------------------------------------------------------------------- adaptive conv

def _adaptive_conv_reference(features, kernels, padding):
    features, kernels = features.double().numpy(), kernels.double().numpy()
    batch, channels, height, width = features.shape
    size = int(round(math.sqrt(kernels.shape[1])))
    radius = size // 2
    out = np.zeros((batch, channels, height, width))
    for b in range(batch):
        for y in range(height):
            for x in range(width):
                for i in range(size):
                    for j in range(size):
                        yy, xx = y + i - radius, x + j - radius
                        if padding == "zeros":
                            if not (0 <= yy < height and 0 <= xx < width):
                                continue
                        else:
                            index = _reflect if padding == "reflect" else _replicate
                            yy, xx = index(yy, height), index(xx, width)
                        out[b, :, y, x] += kernels[b, i * size + j, y, x] * features[b, :, yy, xx]
    return torch.from_numpy(out)


@pytest.mark.parametrize("padding", ["reflect", "zeros", "replicate"])
def test_adaptive_conv_matches_per_pixel_loops(padding):
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(2, 3, 6, 7, generator=gen)
    kernels = torch.randn(2, 9, 6, 7, generator=gen)
    out = adaptive_conv(features, kernels, padding=padding)
    torch.testing.assert_close(out.double(), _adaptive_conv_reference(features, kernels, padding), rtol=1e-5, atol=1e-5)


def test_adaptive_conv_prepadded_input_and_large_window():
    gen = torch.Generator().manual_seed(1)
    features = torch.randn(1, 2, 5, 5, generator=gen)
    kernels = torch.randn(1, 49, 5, 5, generator=gen)
    prepadded = F.pad(features, [3] * 4, mode="reflect")  # the CUDA kernel's contract
    torch.testing.assert_close(adaptive_conv(prepadded, kernels, padding=None), adaptive_conv(features, kernels))
    torch.testing.assert_close(
        adaptive_conv(features, kernels).double(), _adaptive_conv_reference(features, kernels, "reflect"),
        rtol=1e-5, atol=1e-5,
    )


@pytest.mark.parametrize("padding", ["reflect", "zeros"])
def test_adaptive_conv_gradients(padding):
    # The explicit backward (one in-place padded gradient buffer) against finite differences, every entry.
    gen = torch.Generator().manual_seed(2)
    features = torch.randn(2, 2, 4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    kernels = torch.randn(2, 9, 4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda f, k: adaptive_conv(f, k, padding=padding), (features, kernels))
    kernels_only = kernels.detach().requires_grad_()  # one input needing no gradient
    assert torch.autograd.gradcheck(lambda k: adaptive_conv(features.detach(), k, padding=padding), (kernels_only,))


def _window_dot_reference(keys, radius):
    keys = keys.double().numpy()
    batch, _, height, width = keys.shape
    size = 2 * radius + 1
    out = np.zeros((batch, size * size, height, width))
    for b in range(batch):
        for y in range(height):
            for x in range(width):
                for i in range(size):
                    for j in range(size):
                        yy, xx = _reflect(y + i - radius, height), _reflect(x + j - radius, width)
                        out[b, i * size + j, y, x] = keys[b, :, yy, xx] @ keys[b, :, y, x]
    return torch.from_numpy(out)


def test_window_dot_matches_per_pixel_loops_and_its_gradient_is_exact():
    gen = torch.Generator().manual_seed(5)
    keys = torch.randn(2, 3, 6, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(window_dot(keys, 2), _window_dot_reference(keys.detach(), 2))
    assert torch.autograd.gradcheck(lambda k: window_dot(k, 1), (keys,))
    assert window_dot(keys.detach().bfloat16(), 1).dtype == torch.float32  # logits for the softmax: float32
    with pytest.raises(ValueError, match="larger than 3 pixels"):
        window_dot(torch.zeros(1, 2, 3, 8), 3)


def test_adaptive_conv_bf16_keeps_dtype():
    gen = torch.Generator().manual_seed(3)
    features = torch.randn(1, 4, 6, 6, generator=gen)
    kernels = torch.rand(1, 9, 6, 6, generator=gen)
    low = adaptive_conv(features.bfloat16(), kernels.bfloat16())
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), adaptive_conv(features, kernels), rtol=0.05, atol=0.05)


def test_adaptive_conv_bad_input():
    with pytest.raises(ValueError, match="k odd"):
        adaptive_conv(torch.zeros(1, 2, 5, 5), torch.zeros(1, 4, 5, 5))
    with pytest.raises(ValueError, match="share H, W"):
        adaptive_conv(torch.zeros(1, 2, 5, 5), torch.zeros(1, 9, 5, 6))
    with pytest.raises(ValueError, match="already padded"):
        adaptive_conv(torch.zeros(1, 2, 5, 5), torch.zeros(1, 9, 5, 5), padding=None)
    with pytest.raises(ValueError, match="batch mismatch"):
        adaptive_conv(torch.zeros(2, 2, 5, 5), torch.zeros(1, 9, 5, 5))
    with pytest.raises(ValueError, match="larger than 3"):
        adaptive_conv(torch.zeros(1, 2, 3, 3), torch.zeros(1, 49, 3, 3))
    with pytest.raises(ValueError, match="padding must be"):
        adaptive_conv(torch.zeros(1, 2, 5, 5), torch.zeros(1, 9, 5, 5), padding="circular")


# -------------------------------------------------------------------------------------------- JBU slow reference

def _cubic(x, a=-0.75):
    x = abs(x)
    if x <= 1:
        return (a + 2) * x**3 - (a + 3) * x**2 + 1
    if x < 2:
        return a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a
    return 0.0


def _bicubic_reference(image, out_h, out_w):
    """Keys' cubic convolution (a = -0.75), half-pixel centres (align_corners=False), borders clamped."""
    channels, height, width = image.shape
    out = np.zeros((channels, out_h, out_w))
    for y in range(out_h):
        sy = (y + 0.5) * height / out_h - 0.5
        y0 = math.floor(sy)
        wy = [_cubic(sy - (y0 + m)) for m in (-1, 0, 1, 2)]
        for x in range(out_w):
            sx = (x + 0.5) * width / out_w - 0.5
            x0 = math.floor(sx)
            wx = [_cubic(sx - (x0 + n)) for n in (-1, 0, 1, 2)]
            for m in range(4):
                for n in range(4):
                    yy, xx = _replicate(y0 + m - 1, height), _replicate(x0 + n - 1, width)
                    out[:, y, x] += wy[m] * wx[n] * image[:, yy, xx]
    return out


def _gelu(x):
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def _conv1x1(conv, x):
    return conv.weight.detach().double().numpy()[:, :, 0, 0] @ x + conv.bias.detach().double().numpy()


def _jbu_step_reference(step, source, guidance):
    """One JBULearnedRange step, pixel by pixel (eval mode: dropout off). source (C, h, w), guidance (3, Hg, Wg)."""
    channels, height, width = source.shape
    out_h, out_w = 2 * height, 2 * width
    block_y, block_x = guidance.shape[1] // out_h, guidance.shape[2] // out_w
    radius, size = step.radius, step.diameter
    temperature = min(max(math.exp(step.range_temp.item()), 1e-4), 1e4)
    sigma = step.sigma_spatial.item()
    upsampled = _bicubic_reference(source, out_h, out_w)
    out = np.zeros((channels, out_h, out_w))
    # guidance average-pooled over exact blocks, and the range projection P per pixel
    pooled = np.zeros((3, out_h, out_w))
    keys = np.zeros((step.range_proj[0].out_channels, out_h, out_w))
    for y in range(out_h):
        for x in range(out_w):
            pooled[:, y, x] = guidance[:, y * block_y:(y + 1) * block_y, x * block_x:(x + 1) * block_x].mean((1, 2))
            keys[:, y, x] = _conv1x1(step.range_proj[3], _gelu(_conv1x1(step.range_proj[0], pooled[:, y, x])))
    grid = [-1 + 2 * k / (size - 1) for k in range(size)]
    for y in range(out_h):
        for x in range(out_w):
            logits, spatial, neighbours = [], [], []
            for i in range(size):
                for j in range(size):
                    yy, xx = _reflect(y + i - radius, out_h), _reflect(x + j - radius, out_w)
                    logits.append(temperature * keys[:, yy, xx] @ keys[:, y, x])
                    spatial.append(math.exp(-(grid[i] ** 2 + grid[j] ** 2) / (2 * sigma**2)))
                    neighbours.append((yy, xx))
            logits = np.array(logits)
            range_kernel = np.exp(logits - logits.max())
            range_kernel /= range_kernel.sum()
            kernel = range_kernel * np.array(spatial)
            kernel /= max(kernel.sum(), 1e-7)
            fix_in = np.concatenate([kernel, pooled[:, y, x]])
            kernel = kernel + 0.1 * _conv1x1(step.fixup_proj[3], _gelu(_conv1x1(step.fixup_proj[0], fix_in)))
            for q, (yy, xx) in enumerate(neighbours):
                out[:, y, x] += kernel[q] * upsampled[:, yy, xx]
    return out


def _nontrivial_stack(feat_dim=4):
    torch.manual_seed(0)
    stack = JBU4xStack(feat_dim=feat_dim).eval()
    with torch.no_grad():
        stack.up1.range_temp.fill_(0.4)
        stack.up1.sigma_spatial.fill_(0.7)
        stack.up2.range_temp.fill_(-0.3)
        stack.up2.sigma_spatial.fill_(1.3)
        for module in stack.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.weight.normal_(0, 0.5)
                module.bias.normal_(0, 0.2)
    return stack


def test_bicubic_reference_agrees_with_torch():
    # sanity of the test's own helper: half-pixel bicubic upsampling as torch defines it
    image = np.random.default_rng(0).normal(size=(2, 5, 6))
    ours = _bicubic_reference(image, 10, 12)
    theirs = F.interpolate(torch.from_numpy(image)[None], size=(10, 12), mode="bicubic", align_corners=False)[0]
    np.testing.assert_allclose(ours, theirs.numpy(), atol=1e-10)


def test_jbu_stack_matches_per_pixel_reference():
    stack = _nontrivial_stack()
    gen = torch.Generator().manual_seed(1)
    source = torch.randn(1, 4, 6, 6, generator=gen)
    guidance = torch.randn(1, 3, 48, 48, generator=gen)  # pooled 4x4 -> 12x12, then 2x2 -> 24x24
    with torch.no_grad():
        level_1x, level_2x, level_4x = stack(source, guidance)
    assert level_1x is source
    assert level_2x.shape == (1, 4, 12, 12) and level_4x.shape == (1, 4, 24, 24)

    src, gd = source[0].double().numpy(), guidance[0].double().numpy()
    expected_2x = _jbu_step_reference(stack.up1, src, gd)
    np.testing.assert_allclose(level_2x[0].double().numpy(), expected_2x, rtol=1e-4, atol=1e-4)
    expected_4x = _jbu_step_reference(stack.up2, expected_2x, gd)
    fixup = stack.fixup_proj[1]
    expected_4x = expected_4x + 0.1 * np.einsum("oc,chw->ohw", fixup.weight.detach().double().numpy()[:, :, 0, 0],
                                                expected_4x) + 0.1 * fixup.bias.detach().double().numpy()[:, None, None]
    np.testing.assert_allclose(level_4x[0].double().numpy(), expected_4x, rtol=1e-4, atol=1e-4)


def test_jbu_non_square_slice_shapes_and_batch_independence():
    stack = _nontrivial_stack()
    gen = torch.Generator().manual_seed(2)
    source = torch.randn(2, 4, 5, 4, generator=gen)  # e.g. a 350x308 slice has a 25x22 grid; scaled down here
    guidance = torch.randn(2, 3, 70, 56, generator=gen)
    with torch.no_grad():
        _, up_2x, up_4x = stack(source, guidance)
        _, alone_2x, alone_4x = stack(source[1:], guidance[1:])
    assert up_2x.shape == (2, 4, 10, 8) and up_4x.shape == (2, 4, 20, 16)
    torch.testing.assert_close(up_4x[1:], alone_4x)


def test_jbu_runs_in_bf16():
    stack = _nontrivial_stack()
    gen = torch.Generator().manual_seed(5)
    source, guidance = torch.randn(1, 4, 6, 6, generator=gen), torch.randn(1, 3, 24, 24, generator=gen)
    with torch.no_grad():
        reference = stack(source, guidance)
        low = stack.to(torch.bfloat16)(source.bfloat16(), guidance)  # float32 guidance is cast to the features' dtype
    for r, lo in zip(reference[1:], low[1:]):
        assert lo.dtype == torch.bfloat16 and torch.isfinite(lo).all()
        # bf16 keys shift the (sharp, in this harsh test config) range softmax a little: compare on average
        assert (lo.float() - r).abs().mean() < 0.02 * r.abs().mean() + 0.01


def test_learnable_temperature_and_sigma_get_gradients():
    stack = _nontrivial_stack()
    gen = torch.Generator().manual_seed(3)
    _, up_2x, up_4x = stack(torch.randn(1, 4, 6, 6, generator=gen), torch.randn(1, 3, 24, 24, generator=gen))
    (up_2x.square().sum() + up_4x.square().sum()).backward()
    for step in (stack.up1, stack.up2):
        for parameter in (step.range_temp, step.sigma_spatial):
            assert parameter.grad is not None and torch.isfinite(parameter.grad) and parameter.grad.abs() > 0


def test_range_temperature_is_clamped():
    step = _nontrivial_stack().up1
    gen = torch.Generator().manual_seed(4)
    guidance = torch.randn(1, 3, 12, 12, generator=gen)
    for tau, bound in ((20.0, 1e4), (-20.0, 1e-4)):
        with torch.no_grad():
            step.range_temp.fill_(math.log(bound))
            at_bound = step.range_kernel(guidance)
            step.range_temp.fill_(tau)
            beyond = step.range_kernel(guidance)
        torch.testing.assert_close(beyond, at_bound)
    step.range_kernel(guidance).square().sum().backward()  # clamped: no gradient flows into tau
    assert step.range_temp.grad.abs() == 0
    assert not torch.allclose(at_bound, _nontrivial_stack().up1.range_kernel(guidance))  # tau matters in range


def test_release_key_names():
    keys = set(JBU4xStack(feat_dim=8).state_dict())
    expected = {"fixup_proj.1.weight", "fixup_proj.1.bias"}
    for up in ("up1", "up2"):
        expected |= {f"{up}.range_temp", f"{up}.sigma_spatial"}
        for seq in ("range_proj", "fixup_proj"):
            expected |= {f"{up}.{seq}.{i}.{p}" for i in (0, 3) for p in ("weight", "bias")}
    assert keys == expected


def test_real_size_parameter_count_on_meta():
    with torch.device("meta"):
        stack = JBU4xStack(feat_dim=1024)
    # layer list of one step: range_proj 3->32, 32->32; fixup_proj (3 + 49)->49, 49->49 (1x1 convs with bias);
    # plus the scalars tau and sigma
    conv_shapes = [(3, 32), (32, 32), (3 + 49, 49), (49, 49)]
    per_step = sum(i * o + o for i, o in conv_shapes) + 2
    expected = 2 * per_step + (1024 * 1024 + 1024)  # + the stack's 1x1 fix-up conv
    assert sum(p.numel() for p in stack.parameters()) == expected == 1_062_066


def test_jbu_bad_input():
    stack = JBU4xStack(feat_dim=4)
    with pytest.raises(ValueError, match="channels"):
        stack(torch.zeros(1, 5, 6, 6), torch.zeros(1, 3, 24, 24))
    with pytest.raises(ValueError, match="same B"):
        stack(torch.zeros(2, 4, 6, 6), torch.zeros(1, 3, 24, 24))


# --------------------------------------------------------------------------------------------------------- stage 0

def test_jitter_applies_one_transform_to_image_and_features():
    gen = torch.Generator().manual_seed(5)
    image = torch.randn(2, 3, 16, 16, generator=gen)
    features = torch.randn(2, 5, 16, 16, generator=gen)
    for seed in range(10):
        jitter = sample_jitter(16, 16, max_pad=4, max_zoom=2.0, generator=torch.Generator().manual_seed(seed))
        together = jitter(torch.cat([image, features], dim=1))
        torch.testing.assert_close(together, torch.cat([jitter(image), jitter(features)], dim=1))
        torch.testing.assert_close(jitter(image), jitter(image))  # parameters are fixed once sampled
        assert together.shape == (2, 8, 16, 16)
    with pytest.raises(ValueError, match="sampled for"):
        jitter(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="reflect padding"):
        sample_jitter(16, 16, max_pad=16)


def test_jitter_without_zoom_is_a_crop_of_the_padded_image_maybe_flipped():
    image = torch.arange(64.0).reshape(1, 1, 8, 8)
    padded = F.pad(image, [3] * 4, mode="reflect")
    crops = [padded[:, :, y:y + 8, x:x + 8] for y in range(7) for x in range(7)]
    flips_seen = set()
    for seed in range(30):
        out = sample_jitter(8, 8, max_pad=3, max_zoom=1.0, generator=torch.Generator().manual_seed(seed))(image)
        plain = any(torch.equal(out, crop) for crop in crops)
        flipped = any(torch.equal(out, crop.flip(-1)) for crop in crops)
        assert plain or flipped
        flips_seen.add(flipped and not plain)
    assert flips_seen == {True, False}  # both branches are exercised


def test_attention_downsampler_matches_window_loop():
    torch.manual_seed(6)
    down = AttentionDownsampler(dim=3, kernel_size=4, blur_attn=False).eval()
    features = torch.randn(1, 3, 8, 12)
    out = down(features)
    assert out.shape == (1, 3, 2, 3)
    weight, bias = down.attention_net[1].weight.detach()[0], down.attention_net[1].bias.detach()[0]
    for oy in range(2):
        for ox in range(3):
            logits, values = [], []
            for ky in range(4):
                for kx in range(4):
                    pixel = features[0, :, oy * 4 + ky, ox * 4 + kx]
                    logits.append((weight @ pixel + bias) * down.w[ky, kx] + down.b[ky, kx])
                    values.append(pixel)
            attention = torch.softmax(torch.stack(logits), 0)
            expected = (attention[:, None] * torch.stack(values)).sum(0)
            torch.testing.assert_close(out[0, :, oy, ox], expected.detach(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="multiple"):
        down(torch.randn(1, 3, 9, 12))


def test_gaussian_blur_matches_loops():
    image = torch.randn(1, 2, 7, 8, generator=torch.Generator().manual_seed(7))
    g = [math.exp(-(d * d) / 2) for d in (-2, -1, 0, 1, 2)]
    g = [v / sum(g) for v in g]
    expected = torch.zeros_like(image)
    for y in range(7):
        for x in range(8):
            for i in range(5):
                for j in range(5):
                    expected[0, :, y, x] += g[i] * g[j] * image[0, :, _reflect(y + i - 2, 7), _reflect(x + j - 2, 8)]
    torch.testing.assert_close(_gaussian_blur(image), expected, rtol=1e-5, atol=1e-6)


def test_scale_net_and_uncertainty_loss():
    torch.manual_seed(8)
    net = ScaleNet(4)
    target = torch.randn(2, 4, 3, 3)
    conv = net.net.weight[0, :, 0, 0] @ target.permute(1, 0, 2, 3).reshape(4, -1) + net.net.bias[0]
    expected = conv.reshape(2, 3, 3).add(0.1).exp().clamp_min(1e-4)[:, None]  # (B, 1, h, w)
    torch.testing.assert_close(net(target), expected)
    with torch.no_grad():
        net.net.bias.fill_(-50.0)
    assert torch.all(net(target) == 1e-4)  # floor
    prediction, truth, scale = torch.randn(2, 3, 2, 2), torch.randn(2, 3, 2, 2), torch.rand(2, 1, 2, 2) + 0.5
    total, count = 0.0, 0
    for b in range(2):
        for c in range(3):
            for y in range(2):
                for x in range(2):
                    s = scale[b, 0, y, x]
                    total += (prediction[b, c, y, x] - truth[b, c, y, x]) ** 2 / (2 * s**2) + torch.log(s)
                    count += 1
    torch.testing.assert_close(uncertainty_loss(prediction, truth, scale), total / count)


def test_sampled_crf_loss_formula():
    gen = torch.Generator().manual_seed(9)
    guidance, features = torch.randn(1, 3, 5, 6, generator=gen), torch.randn(1, 2, 5, 6, generator=gen)
    loss = sampled_crf_loss(guidance, features, torch.Generator().manual_seed(10), n_samples=4)
    draws = torch.Generator().manual_seed(10)
    ys, xs = torch.randint(0, 5, (4,), generator=draws), torch.randint(0, 6, (4,), generator=draws)
    total = 0.0
    for a in range(4):
        for b in range(4):
            dc = (ys[a] / 5 - ys[b] / 5) ** 2 + (xs[a] / 6 - xs[b] / 6) ** 2
            dg = (guidance[0, :, ys[a], xs[a]] - guidance[0, :, ys[b], xs[b]]).square().sum()
            k = 10 * torch.exp(-dc / 0.2 - dg / 0.3) + 3 * torch.exp(-dc / 0.01)
            total += (features[0, :, ys[a], xs[a]] - features[0, :, ys[b], xs[b]]).square().sum() * k
    torch.testing.assert_close(loss, total / 16)


def _tiny_stage0(crf_weight=0.0):
    torch.manual_seed(11)
    featurizer_conv = torch.nn.Conv2d(3, 8, kernel_size=8, stride=8).requires_grad_(False)  # frozen "ViT": 32 -> 4x4
    upsampler = JBU4xStack(feat_dim=8)
    criterion = JBUStage0Loss(feat_dim=8, patch_size=8, n_jitters=2, max_pad=6, projection_dim=4, crf_weight=crf_weight)
    image = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(12))
    return featurizer_conv, upsampler, criterion, image


def test_stage0_optimisation_decreases_the_loss():
    featurizer, upsampler, criterion, image = _tiny_stage0()
    upsampler.eval(), criterion.eval()  # dropout off; a fixed seed per step: a deterministic objective
    optimizer = torch.optim.NAdam([*upsampler.parameters(), *criterion.parameters()], lr=1e-2)
    losses = []
    for _ in range(6):
        out = criterion(upsampler, featurizer, image, generator=torch.Generator().manual_seed(0))
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        losses.append(out["loss"].item())
    assert losses[-1] < losses[0] - 0.05, losses
    torch.testing.assert_close(out["loss"], out["rec_2x"] + out["rec_4x"])  # crf_weight 0: term omitted


def test_stage0_each_step_is_trained_by_its_own_level():
    featurizer, upsampler, criterion, image = _tiny_stage0()
    for level, trained, untouched in (("rec_4x", "up2", "up1"), ("rec_2x", "up1", "up2")):
        upsampler.zero_grad()
        out = criterion(upsampler, featurizer, image, generator=torch.Generator().manual_seed(1))
        out[level].backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in getattr(upsampler, trained).parameters())
        assert all(p.grad is None or p.grad.abs().sum() == 0 for p in getattr(upsampler, untouched).parameters())
        fixup_grad = upsampler.fixup_proj[1].weight.grad
        assert (fixup_grad is not None and fixup_grad.abs().sum() > 0) == (level == "rec_4x")
    assert out["crf"] == 0


def test_stage0_crf_term_behind_flag():
    featurizer, upsampler, criterion, image = _tiny_stage0(crf_weight=0.5)
    upsampler.eval(), criterion.eval()
    out = criterion(upsampler, featurizer, image, generator=torch.Generator().manual_seed(3))
    assert out["crf"] > 0
    torch.testing.assert_close(out["loss"], out["rec_2x"] + out["rec_4x"] + 0.5 * out["crf"])
    with pytest.raises(ValueError, match="crf_weight"):
        JBUStage0Loss(feat_dim=8, crf_weight=-1.0)
