"""LLaVA-UHD v2's JBU feature upsampler ("visual detail injection module") and its stage-0 hierarchical supervision.

Port of the release's `featup/upsamplers.py` (`JBULearnedRange`, `JBU2xStack`, `JBU4xStack`) and
`featup/train_vdim_upsampler.py` with `featup/configs/vdim_upsampler.yaml` (thunlp/LLaVA-UHD, branch LLaVA-UHD-v2;
derived from FeatUp, mhamilton723/FeatUp). Module and parameter names match
the release keys (`upsampler.upsampler.up1.range_proj.0.weight`, ..., `upsampler.upsampler.fixup_proj.1.weight`), and
the stage-0 helpers the Lightning checkpoint's `downsampler*` / `scale_net*` keys.

Deliberate differences from the release (numerics, not behaviour):
* the adaptive convolution is plain PyTorch (`multigran.ops.adaptive_conv`), not the CUDA kernel;
* no hard-coded casts: the release runs the kernel fix-up in bfloat16 and the convolution in float32 whatever the
  model dtype; here the layers run in the input dtype, while the small per-pixel kernel (range softmax, spatial
  Gaussian, normalisation) and the convolution's accumulation use at least float32; outputs have the input dtype.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from multigran.checkpointing import checkpointed
from multigran.ops.adaptive_conv import adaptive_conv, window_dot
from multigran.vision.varres import encode_variable_resolution

# Release / FeatUp defaults (featup/upsamplers.py, featup/configs/vdim_upsampler.yaml, featup/train_vdim_upsampler.py).
JBU_KEY_DIM = 32  # range-kernel key dimension
JBU_RADIUS = 3  # 7x7 window
KERNEL_FIXUP_SCALE = 0.1  # K += 0.1 * fixup_proj([K; G])
STACK_FIXUP_SCALE = 0.1  # x = x + 0.1 * fixup_proj(x) on the stack's last output (4x, or 2x for the 2x stack)
RANGE_TEMP_CLAMP = (1e-4, 1e4)  # e^tau is clamped to this range
KERNEL_NORM_EPS = 1e-7


class JBULearnedRange(nn.Module):
    """One joint-bilateral upsampling step: (B, C, h, w) features -> (B, C, scale*h, scale*w), guided by the image.

    K[p, q] = R[p, q] * S[q] / max(sum_q R * S, 1e-7) + 0.1 * fixup_proj([K; G])[p, q]
    R[p, q] = softmax_q(e^tau <P[p+q], P[p]>),  P = range_proj(G),  S[q] = exp(-|delta_q|^2 / (2 sigma^2))
    out[p]  = sum_q K[p, q] * bicubic_up(F)[p + q]          (7x7 window, reflect padding at the border)
    with G the guidance image average-pooled to the output size and delta_q on a 7x7 grid spanning [-1, 1]^2.
    """

    def __init__(self, guidance_dim: int = 3, feat_dim: int = 1024, key_dim: int = JBU_KEY_DIM, scale: int = 2,
                 radius: int = JBU_RADIUS):
        super().__init__()
        self.scale = scale
        self.radius = radius
        self.diameter = 2 * radius + 1
        self.feat_dim = feat_dim
        window = self.diameter**2
        self.range_temp = nn.Parameter(torch.tensor(0.0))  # tau
        self.range_proj = nn.Sequential(
            nn.Conv2d(guidance_dim, key_dim, 1),
            nn.GELU(),
            nn.Dropout2d(0.1),
            nn.Conv2d(key_dim, key_dim, 1),
        )
        self.fixup_proj = nn.Sequential(
            nn.Conv2d(guidance_dim + window, window, 1),
            nn.GELU(),
            nn.Dropout2d(0.1),
            nn.Conv2d(window, window, 1),
        )
        self.sigma_spatial = nn.Parameter(torch.tensor(1.0))

    def range_kernel(self, guidance: torch.Tensor) -> torch.Tensor:
        """(B, g, H, W) guidance -> (B, 49, H, W) softmax over the window of e^tau * <P[p+q], P[p]>.

        The dot products and the softmax run in at least float32 (cheap: 32 channels), so bf16 models stay stable.
        """
        keys = self.range_proj(guidance)  # (B, 32, H, W)
        logits = window_dot(keys, self.radius, padding="reflect")  # <P[p+q], P[p]>: (B, 49, H, W), q = i * 7 + j
        temperature = self.range_temp.exp().clamp(*RANGE_TEMP_CLAMP)
        return F.softmax(temperature * logits, dim=1)

    def spatial_kernel(self) -> torch.Tensor:
        """(1, 49, 1, 1) Gaussian over a 7x7 grid spanning [-1, 1]^2, width sigma_spatial."""
        sigma = self.sigma_spatial.to(torch.promote_types(self.sigma_spatial.dtype, torch.float32))
        offsets = torch.linspace(-1, 1, self.diameter, device=sigma.device, dtype=sigma.dtype)
        dy, dx = torch.meshgrid(offsets, offsets, indexing="ij")
        squared_distance = (dy.square() + dx.square()).reshape(1, -1, 1, 1)
        return torch.exp(-squared_distance / (2 * sigma**2))

    gradient_checkpointing = False  # set by gradient_checkpointing_enable(): its (B, 49, H, W) kernels are large

    def forward(self, source: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        return checkpointed(self, self._forward, source, guidance)

    def _forward(self, source: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        """source (B, C, h, w); guidance (B, g, H_img, W_img) at any resolution (pooled here to scale*(h, w))."""
        if source.dim() != 4 or guidance.dim() != 4 or source.shape[0] != guidance.shape[0]:
            raise ValueError(
                f"JBULearnedRange: source (B, C, h, w) and guidance (B, g, H, W) with the same B expected, got "
                f"{tuple(source.shape)} and {tuple(guidance.shape)}"
            )
        if source.shape[1] != self.feat_dim:
            raise ValueError(
                f"JBULearnedRange: source has {source.shape[1]} channels, module built for {self.feat_dim}"
            )
        out_size = (source.shape[2] * self.scale, source.shape[3] * self.scale)
        guidance = F.adaptive_avg_pool2d(guidance.to(source.dtype), out_size)  # (B, g, H, W)

        kernel = self.range_kernel(guidance) * self.spatial_kernel()  # (B, 49, H, W), >= float32
        kernel = kernel / kernel.sum(1, keepdim=True).clamp(min=KERNEL_NORM_EPS)
        fixup = self.fixup_proj(torch.cat([kernel.to(guidance.dtype), guidance], dim=1))  # in the module's dtype
        kernel = kernel + KERNEL_FIXUP_SCALE * fixup

        upsampled = F.interpolate(source, size=out_size, mode="bicubic", align_corners=False)  # (B, C, H, W)
        return adaptive_conv(upsampled, kernel, padding="reflect")


class JBU4xStack(nn.Module):
    """Two JBU steps (24 -> 48 -> 96 for a 336 slice) and a residual 1x1 fix-up on the 4x output only.

    forward returns all pyramid levels (1x, 2x, 4x); the LLaVA-UHD v2 pyramid picks from them with feature_scale_mask.
    """

    def __init__(self, feat_dim: int = 1024, key_dim: int = JBU_KEY_DIM, radius: int = JBU_RADIUS):
        super().__init__()
        self.up1 = JBULearnedRange(3, feat_dim, key_dim, scale=2, radius=radius)
        self.up2 = JBULearnedRange(3, feat_dim, key_dim, scale=2, radius=radius)
        # Sequential(Dropout2d, Conv1x1): the release key is `fixup_proj.1.{weight,bias}`.
        self.fixup_proj = nn.Sequential(nn.Dropout2d(0.2), nn.Conv2d(feat_dim, feat_dim, 1))

    def forward(
        self, source: torch.Tensor, guidance: torch.Tensor, detach_between_steps: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """source (B, C, h, w) ViT features; guidance (B, 3, H, W) the normalised image they come from.

        detach_between_steps: stage-0 training (release `forward_stageloss`): the second step sees a detached copy
        of the 2x output, so each step is trained by its own level's loss.
        Returns (source, up_2x (B, C, 2h, 2w), up_4x (B, C, 4h, 4w)).
        """
        up_2x = self.up1(source, guidance)
        up_4x = self.up2(up_2x.detach() if detach_between_steps else up_2x, guidance)
        up_4x = up_4x + STACK_FIXUP_SCALE * self.fixup_proj(up_4x)
        return source, up_2x, up_4x


class JBU2xStack(nn.Module):
    """One JBU step (24 -> 48 for a 336 slice) and the residual 1x1 fix-up on its 2x output: the release's stack for
    feature_scale_mask 2 and 3 (featup/upsamplers.py:278-302, chosen by hubconf.py:25-26 for scale '2x').

    Same key names as the 4x stack minus `up2`: a 4x stage-0 checkpoint loads into it without its up2 (the release
    loads it with strict=False, hubconf.py:166-169). forward returns the levels (1x, 2x).
    """

    def __init__(self, feat_dim: int = 1024, key_dim: int = JBU_KEY_DIM, radius: int = JBU_RADIUS):
        super().__init__()
        self.up1 = JBULearnedRange(3, feat_dim, key_dim, scale=2, radius=radius)
        self.fixup_proj = nn.Sequential(nn.Dropout2d(0.2), nn.Conv2d(feat_dim, feat_dim, 1))

    def forward(self, source: torch.Tensor, guidance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """source (B, C, h, w) ViT features; guidance (B, 3, H, W) the normalised image they come from.
        Returns (source, up_2x (B, C, 2h, 2w)), the fix-up applied to up_2x."""
        up_2x = self.up1(source, guidance)
        return source, up_2x + STACK_FIXUP_SCALE * self.fixup_proj(up_2x)


# The brief/callers may know the 4x stack as `JBUStack`. (The release's own `JBUStack` is a 16x, four-step variant.)
JBUStack = JBU4xStack


# ---------------------------------------------------------------------------------------------------------------------
# Stage 0: hierarchical supervision of the JBU alone (release train_vdim_upsampler.py, FeatUp's multi-view loss).
# ---------------------------------------------------------------------------------------------------------------------

STAGE0_N_JITTERS = 2
STAGE0_MAX_PAD = 30
STAGE0_MAX_ZOOM = 2.0
STAGE0_PROJECTION_DIM = 30
CRF_DEFAULTS = dict(n_samples=1000, alpha=0.1, beta=0.15, gamma=0.005, w1=10.0, w2=3.0, shift=0.0)  # FeatUp CRF
RELEASE_CRF_WEIGHT = 0.001  # the released JBU checkpoint was trained with crf 0.001 (file name "crf_0.001")


def _generator_device(generator: torch.Generator | None) -> torch.device | str:
    # Random draws happen where the generator lives (a CUDA generator cannot draw CPU tensors).
    return generator.device if generator is not None else "cpu"


def sample_jitter(
    height: int,
    width: int,
    max_pad: int = STAGE0_MAX_PAD,
    max_zoom: float = STAGE0_MAX_ZOOM,
    use_flips: bool = True,
    generator: torch.Generator | None = None,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Sample one jitter T_j for (height, width) maps; the returned callable applies that SAME transform to any
    (..., height, width) tensor - the image and the upsampled features resized to the image size.

    FeatUp `sample_transform`/`apply_jitter`: reflect pad by max_pad; with probability 1/2 zoom by U(1, max_zoom)
    (bilinear); crop a random (height, width) window; with probability 1/2 flip horizontally.
    """
    if max_pad >= min(height, width):
        raise ValueError(f"sample_jitter: reflect padding {max_pad} needs maps larger than it, got {height}x{width}")
    if max_zoom < 1:
        raise ValueError(f"sample_jitter: max_zoom must be >= 1, got {max_zoom}")
    device = _generator_device(generator)
    flip = use_flips and torch.rand((), generator=generator, device=device).item() > 0.5
    zoom = 1.0
    if torch.rand((), generator=generator, device=device).item() > 0.5:
        zoom = torch.rand((), generator=generator, device=device).item() * (max_zoom - 1) + 1
    top = int(torch.randint(0, int((height + 2 * max_pad) * zoom) - height + 1, (), generator=generator, device=device))
    left = int(torch.randint(0, int((width + 2 * max_pad) * zoom) - width + 1, (), generator=generator, device=device))

    def apply(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.dim() != 4 or tuple(tensor.shape[2:]) != (height, width):
            raise ValueError(f"jitter was sampled for (B, C, {height}, {width}) maps, got {tuple(tensor.shape)}")
        padded = F.pad(tensor, [max_pad] * 4, mode="reflect")
        if zoom > 1.0:
            padded = F.interpolate(padded, scale_factor=zoom, mode="bilinear")
        cropped = padded[:, :, top : top + height, left : left + width]
        return cropped.flip(-1) if flip else cropped

    return apply


def _gaussian_blur(x: torch.Tensor, size: int = 5, sigma: float = 1.0) -> torch.Tensor:
    # kornia.filters.gaussian_blur2d(x, 5, (1., 1.)) with its default reflect border, as a depthwise convolution.
    coords = torch.arange(size, device=x.device, dtype=x.dtype) - size // 2
    gauss = torch.exp(-coords.square() / (2 * sigma**2))
    gauss = gauss / gauss.sum()
    kernel = (gauss[:, None] * gauss[None, :]).expand(x.shape[1], 1, size, size)
    return F.conv2d(F.pad(x, [size // 2] * 4, mode="reflect"), kernel, groups=x.shape[1])


class AttentionDownsampler(nn.Module):
    """FeatUp's learned downsampler: (B, C, k*h, k*w) -> (B, C, h, w) by attention pooling over each k x k window.

    The attention logit of a pixel is Linear(C -> 1) of its (Gaussian-blurred) feature; per window, softmax over the
    k*k pixels of (logit * w + b) with learnable per-position w, b (k x k). The release unfolds with stride
    (H - k) // (final - 1), which is exactly non-overlapping k x k windows for H = final * k (336 = 24 * 14); this
    port requires that case. Both dropouts (on the features, and zeroing 20% of the windows' logits, which the release
    also applies at eval time) act in training mode only.
    """

    def __init__(self, dim: int, kernel_size: int = 14, blur_attn: bool = True):
        super().__init__()
        self.kernel_size = kernel_size
        self.blur_attn = blur_attn
        self.attention_net = nn.Sequential(nn.Dropout(0.2), nn.Linear(dim, 1))
        self.w = nn.Parameter(torch.ones(kernel_size, kernel_size) + 0.01 * torch.randn(kernel_size, kernel_size))
        self.b = nn.Parameter(torch.zeros(kernel_size, kernel_size) + 0.01 * torch.randn(kernel_size, kernel_size))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = features.shape
        k = self.kernel_size
        if height % k or width % k:
            raise ValueError(f"AttentionDownsampler: map {height}x{width} is not a multiple of the {k}x{k} window")
        out_h, out_w = height // k, width // k
        inputs = _gaussian_blur(features) if self.blur_attn else features
        logits = self.attention_net(inputs.permute(0, 2, 3, 1)).squeeze(-1)  # (B, H, W)
        logits = logits.reshape(batch, out_h, k, out_w, k).permute(0, 1, 3, 2, 4).reshape(batch, out_h, out_w, k * k)
        if self.training:
            logits = logits * (torch.rand(batch, out_h, out_w, 1, device=logits.device) > 0.2)
        attention = F.softmax(logits * self.w.flatten() + self.b.flatten(), dim=-1)  # (B, h, w, k*k)
        attention = attention.reshape(batch, 1, out_h, out_w, k, k).permute(0, 1, 2, 4, 3, 5)  # (B, 1, h, k, w, k)
        windows = inputs.reshape(batch, channels, out_h, k, out_w, k)
        return (windows * attention).sum(dim=(3, 5))  # (B, C, h, w)


class ScaleNet(nn.Module):
    """Per-level uncertainty s = max(exp(Conv1x1(target) + 0.1), 1e-4), (B, C, h, w) -> (B, 1, h, w)."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Conv2d(dim, 1, 1)
        with torch.no_grad():  # release: start near s = e^0.1
            self.net.weight.mul_(0.1)
            self.net.bias.mul_(0.1)

    def forward(self, target: torch.Tensor) -> torch.Tensor:
        return torch.exp(self.net(target) + 0.1).clamp_min(1e-4)


def uncertainty_loss(prediction: torch.Tensor, target: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """mean(|prediction - target|^2 / (2 s^2) + log s), s broadcast over channels (release rec_loss before /J)."""
    return ((prediction - target).square() / (2 * scale.square()) + scale.log()).mean()


def random_projection(batch: int, dim: int, out_dim: int, like: torch.Tensor,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, dim, out_dim) Gaussian matrix with unit-norm columns (Pi: 1024 -> 30), on like's device/dtype."""
    proj = torch.randn(batch, dim, out_dim, generator=generator, device=_generator_device(generator))
    proj = proj.to(device=like.device, dtype=like.dtype)
    return proj / proj.square().sum(1, keepdim=True).sqrt()


def _project(features: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
    return torch.einsum("bchw,bcd->bdhw", features, proj)


def sampled_crf_loss(guidance: torch.Tensor, features: torch.Tensor, generator: torch.Generator | None = None,
                     n_samples: int = 1000, alpha: float = 0.1, beta: float = 0.15, gamma: float = 0.005,
                     w1: float = 10.0, w2: float = 3.0, shift: float = 0.0) -> torch.Tensor:
    """FeatUp's sampled dense-CRF smoothness term on n random pixels: mean_ij |f_i - f_j|^2 * k_ij with
    k_ij = w1 exp(-|x_i - x_j|^2 / 2 alpha - |I_i - I_j|^2 / 2 beta) + w2 exp(-|x_i - x_j|^2 / 2 gamma) - shift."""
    height, width = guidance.shape[2:]
    if tuple(features.shape[2:]) != (height, width) or features.shape[0] != guidance.shape[0]:
        raise ValueError(
            f"sampled_crf_loss: guidance {tuple(guidance.shape)} and features {tuple(features.shape)} differ"
        )
    device = _generator_device(generator)
    ys = torch.randint(0, height, (n_samples,), generator=generator, device=device).to(guidance.device)
    xs = torch.randint(0, width, (n_samples,), generator=generator, device=device).to(guidance.device)
    coords = torch.stack([ys / height, xs / width]).to(guidance.dtype)  # (2, n)
    coord_diff = (coords[:, :, None] - coords[:, None, :]).square().sum(0)[None]  # (1, n, n)
    picked_guidance = guidance[:, :, ys, xs]  # (B, 3, n)
    guidance_diff = (picked_guidance[..., :, None] - picked_guidance[..., None, :]).square().sum(1)  # (B, n, n)
    similarity = (w1 * torch.exp(-coord_diff / (2 * alpha) - guidance_diff / (2 * beta))
                  + w2 * torch.exp(-coord_diff / (2 * gamma)) - shift)
    picked = features[:, :, ys, xs]
    feature_diff = (picked[..., :, None] - picked[..., None, :]).square().sum(1)
    return (feature_diff * similarity).mean()


def clip_featurizer(vision_model: nn.Module, feature_layer: int = -2) -> Callable[[torch.Tensor], torch.Tensor]:
    """Frozen-ViT target Phi: images (B, 3, H, W) -> layer-`feature_layer` patch grid (B, C, H/p, W/p)."""

    def featurize(images: torch.Tensor) -> torch.Tensor:
        grids = encode_variable_resolution(vision_model, list(images), feature_layer=feature_layer)
        return torch.stack(grids).permute(0, 3, 1, 2)

    return featurize


class JBUStage0Loss(nn.Module):
    """Stage-0 hierarchical supervision: every pyramid level must, after the same jitter and a learned downsampling,
    reproduce the frozen ViT's features of the jittered image.

    For each of J jitters T_j, and each level l in {2x, 4x} of `upsampler(Phi(I), I, detach_between_steps=True)`:
        U_l resized (bilinear) to the image size, jittered: T_j U_l;  target Phi(T_j I) (no grad);
        loss_l += mean(|Pi^T (D_l(T_j U_l) - Phi(T_j I))|^2 / (2 s_l^2) + log s_l) / J,  s_l = scale_net_l(Phi(T_j I))
        (+ crf_weight * CRF(I, Pi^T T_j U_l) on the first jitter; the release pairs the un-jittered image with the
        jittered features there, reproduced as is)
    with Pi a fresh random projection 1024 -> 30 per jitter and D_l the level's attention downsampler.

    crf_weight: 0.0 (default) omits the CRF term; the released checkpoint used 0.001 (RELEASE_CRF_WEIGHT).
    Owns the per-level helpers under the release names: `downsampler` / `scale_net` (4x level), `downsampler_2x` /
    `scale_net_2x` (2x level); they are dropped when the JBU is used in the MLLM.
    """

    def __init__(self, feat_dim: int = 1024, patch_size: int = 14, n_jitters: int = STAGE0_N_JITTERS,
                 max_pad: int = STAGE0_MAX_PAD, max_zoom: float = STAGE0_MAX_ZOOM,
                 projection_dim: int = STAGE0_PROJECTION_DIM, crf_weight: float = 0.0):
        super().__init__()
        if n_jitters < 1:
            raise ValueError(f"JBUStage0Loss: n_jitters must be >= 1, got {n_jitters}")
        if crf_weight < 0:
            raise ValueError(f"JBUStage0Loss: crf_weight must be >= 0, got {crf_weight}")
        self.n_jitters = n_jitters
        self.max_pad = max_pad
        self.max_zoom = max_zoom
        self.projection_dim = projection_dim
        self.crf_weight = crf_weight
        self.downsampler = AttentionDownsampler(feat_dim, patch_size)
        self.downsampler_2x = AttentionDownsampler(feat_dim, patch_size)
        self.scale_net = ScaleNet(feat_dim)
        self.scale_net_2x = ScaleNet(feat_dim)

    def forward(self, upsampler: nn.Module, featurizer: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """image (B, 3, H, W) normalised; featurizer: frozen Phi (B, 3, H, W) -> (B, C, H/p, W/p).

        Returns dict(loss, rec_2x, rec_4x, crf): `loss` = rec_2x + rec_4x + crf_weight * crf is what to backpropagate;
        the parts keep their graphs (rec_2x only reaches up1, rec_4x only up2 and the fix-up).
        """
        height, width = image.shape[2:]
        with torch.no_grad():
            lr_feats = featurizer(image)
        levels = ("2x", "4x")
        helpers = {"2x": (self.downsampler_2x, self.scale_net_2x), "4x": (self.downsampler, self.scale_net)}
        rec = {level: image.new_zeros(()) for level in levels}
        crf = image.new_zeros(())
        for jitter_index in range(self.n_jitters):
            # Recomputed per jitter, as the release (fresh dropout masks in training).
            _, up_2x, up_4x = upsampler(lr_feats, image, detach_between_steps=True)
            upsampled = {"2x": up_2x, "4x": up_4x}
            jitter = sample_jitter(height, width, self.max_pad, self.max_zoom, generator=generator)
            with torch.no_grad():
                target = featurizer(jitter(image))  # Phi(T_j I): (B, C, h, w)
            proj = random_projection(image.shape[0], target.shape[1], self.projection_dim, target, generator)
            projected_target = _project(target, proj)
            for level in levels:
                features = upsampled[level]
                if tuple(features.shape[2:]) != (height, width):
                    features = F.interpolate(features, size=(height, width), mode="bilinear")
                jittered = jitter(features)  # T_j U_l: (B, C, H, W)
                downsampler, scale_net = helpers[level]
                prediction = _project(downsampler(jittered), proj)
                level_loss = uncertainty_loss(prediction, projected_target, scale_net(target))
                rec[level] = rec[level] + level_loss / self.n_jitters
                if self.crf_weight > 0 and jitter_index == 0:
                    crf = crf + sampled_crf_loss(image, _project(jittered, proj), generator, **CRF_DEFAULTS)
        loss = rec["2x"] + rec["4x"] + self.crf_weight * crf
        return dict(loss=loss, rec_2x=rec["2x"], rec_4x=rec["4x"], crf=crf)
