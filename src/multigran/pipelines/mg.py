"""MG-LLaVA visual pipeline components: image preprocessing, Conv-Gate fusion, object tokens.

Data flow (spec/mg-llava.md, release PhoenixZ810/MG-LLaVA `mg_llava/module/fuse_model.py`):
  image -> expand2square (CLIP mean colour) -> 768 high-res pixels -> bilinear 336 low-res pixels
  CLIP ViT-L/14-336 (layer -2, no CLS): (B, 576, 1024)   ConvNeXt-L @768: last_feat (B, 1536, 24, 24),
                                                          multi_stage (B, 2880, 192, 192)
  ConvGateFusion(low, last_feat) -> (B, 576, 1024) -> projector -> 576 image tokens
  ObjectTokens(multi_stage, boxes) -> RoIAlign 56x56 -> mean -> bbox_projector -> one token per box
Module names follow the release checkpoint keys (`projector.model.0`, `bbox_projector.model.2`, `fuse_module.gate.0`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from multigran.data.boxes import HIGH_RES_SIZE
from multigran.ops.roi_align import roi_align_mean

logger = logging.getLogger(__name__)

# Release defaults (MGLLaVADataset / MultiFuseObjectLLaVAModel); the 768 high-res side is data.boxes.HIGH_RES_SIZE.
LOW_RES_SIZE = 336  # CLIP ViT-L/14-336 crop size
BOX_FEATURE_SIZE = 56  # RoIAlign output size (box_feat_size default for the multi-stage map)


# --- preprocessing ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PadInfo:
    """Where the original image sits inside the padded square (original-pixel units)."""

    original_width: int
    original_height: int
    side: int  # side of the square canvas = max(width, height)
    pad_left: int  # (side - width) // 2, added to box x coordinates
    pad_top: int  # (side - height) // 2, added to box y coordinates


def expand2square(image: Image.Image, background_color: tuple[int, ...]) -> tuple[Image.Image, PadInfo]:
    """Pad to a square with the image centred (release `expand2square`: offset (max - min) // 2)."""
    width, height = image.size
    side = max(width, height)
    info = PadInfo(width, height, side, (side - width) // 2, (side - height) // 2)
    if width == height:
        return image, info
    canvas = Image.new(image.mode, (side, side), background_color)
    canvas.paste(image, (info.pad_left, info.pad_top))
    return canvas, info


def preprocess_mg_image(
    image: Image.Image,
    high_res: int = HIGH_RES_SIZE,
    low_res: int = LOW_RES_SIZE,
    mean: tuple[float, ...] = tuple(OPENAI_CLIP_MEAN),
    std: tuple[float, ...] = tuple(OPENAI_CLIP_STD),
) -> tuple[torch.Tensor, torch.Tensor, PadInfo]:
    """PIL image -> (pixel_values_low (3, low, low), pixel_values_high (3, high, high), pad_info).

    As the release dataset: expand2square with the mean colour as 0-255 ints (`int(x * 255)`, truncated), then the
    CLIP image processor at 768 (bicubic resize of the uint8 image, shortest edge 768, centre crop 768, rescale 1/255,
    normalise). The low-res input is NOT a second preprocessing pass: it is the normalised 768 tensor resized
    bilinearly (align_corners=False, no antialias -- `F.interpolate` defaults, as the release) to 336.
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"preprocess_mg_image expects a PIL image, got {type(image).__name__}")
    image = image.convert("RGB")
    square, pad_info = expand2square(image, tuple(int(x * 255) for x in mean))
    # CLIP processor: resize shortest edge to `high_res` (the image is square, so both edges), centre crop (no-op).
    resized = square.resize((high_res, high_res), resample=Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, high, high)
    mean_t = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    std_t = torch.tensor(std, dtype=torch.float32)[:, None, None]
    pixel_values_high = (pixels - mean_t) / std_t
    pixel_values_low = F.interpolate(
        pixel_values_high[None], size=(low_res, low_res), mode="bilinear", align_corners=False
    )[0]  # (3, high, high) -> (3, low, low)
    return pixel_values_low, pixel_values_high, pad_info


# --- projectors ---------------------------------------------------------------------------------------------------


class MLPProjector(nn.Module):
    """Linear(in -> out) -> GELU -> Linear(out -> out); XTuner `ProjectorModel(depth=2)` key layout `model.0/2`."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.model = nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.model(features)


# --- Conv-Gate fusion ---------------------------------------------------------------------------------------------


class ConvGateFusion(nn.Module):
    """Release `DualPathFuseModule` (`fuse_module.*`): adds gated high-res ConvNeXt features to the CLIP tokens.

    H = slow_proj(GELU(slow_conv(high)));  L = L + fast_proj(GELU(fast_conv(L)));  out = L + tanh(gate([L, H])) * H
    with one gate scalar per image. slow_proj / fast_proj start at zero, so the module is the identity at init.

    The release relies on 768 / 32 == 336 / 14 == 24 to align the grids. If they differ, `grid_mismatch="resample"`
    resizes the high-res map bilinearly to the token grid (logged once), `"error"` raises ValueError.
    """

    def __init__(self, low_res_dim: int = 1024, high_res_dim: int = 1536, grid_mismatch: str = "resample"):
        super().__init__()
        if grid_mismatch not in ("resample", "error"):
            raise ValueError(f"grid_mismatch must be 'resample' or 'error', got {grid_mismatch!r}")
        self.low_res_dim, self.high_res_dim, self.grid_mismatch = low_res_dim, high_res_dim, grid_mismatch
        self.slow_conv = nn.Conv2d(high_res_dim, high_res_dim, 1)
        self.slow_proj = nn.Conv2d(high_res_dim, low_res_dim, 1)
        self.fast_conv = nn.Conv2d(low_res_dim, low_res_dim, 7, padding=3, groups=low_res_dim)
        self.fast_proj = nn.Conv2d(low_res_dim, low_res_dim, 1)
        self.gate = nn.Sequential(
            nn.Linear(low_res_dim * 2, low_res_dim // 2), nn.GELU(), nn.Linear(low_res_dim // 2, 1)
        )
        self._warned_resample = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Release init (zero_init=True): Xavier convs with zero bias, zero projections, default gate."""
        for conv in (self.slow_conv, self.fast_conv):
            nn.init.xavier_uniform_(conv.weight)
            nn.init.zeros_(conv.bias)
        for proj in (self.slow_proj, self.fast_proj):
            nn.init.zeros_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(self, low_res_feat: torch.Tensor, high_res_feat: torch.Tensor) -> torch.Tensor:
        """low_res_feat (B, N = s*s, low_res_dim), high_res_feat (B, high_res_dim, h, w) -> (B, N, low_res_dim)."""
        if low_res_feat.dim() != 3 or low_res_feat.shape[-1] != self.low_res_dim:
            raise ValueError(f"low_res_feat must be (B, N, {self.low_res_dim}); got {tuple(low_res_feat.shape)}")
        if high_res_feat.dim() != 4 or high_res_feat.shape[1] != self.high_res_dim:
            raise ValueError(f"high_res_feat must be (B, {self.high_res_dim}, h, w); got {tuple(high_res_feat.shape)}")
        batch, num_tokens, dim = low_res_feat.shape
        if high_res_feat.shape[0] != batch:
            raise ValueError(f"batch sizes differ: low_res_feat {batch}, high_res_feat {high_res_feat.shape[0]}")
        side = math.isqrt(num_tokens)
        if side * side != num_tokens:
            raise ValueError(f"low_res_feat has {num_tokens} tokens, not a square grid (CLS token not dropped?)")
        if tuple(high_res_feat.shape[-2:]) != (side, side):
            grids = f"high-res grid {tuple(high_res_feat.shape[-2:])} vs low-res token grid {(side, side)}"
            if self.grid_mismatch == "error":
                raise ValueError(f"ConvGateFusion: {grids} (the release needs 768/32 == 336/14)")
            if not self._warned_resample:
                logger.warning("ConvGateFusion: %s; resampling the high-res map bilinearly", grids)
                self._warned_resample = True
            high_res_feat = F.interpolate(high_res_feat, size=(side, side), mode="bilinear", align_corners=False)

        dtype = self.slow_conv.weight.dtype  # the ConvNeXt may run in another precision than CLIP
        high_res_feat, low_res_feat = high_res_feat.to(dtype), low_res_feat.to(dtype)
        high = self.slow_proj(F.gelu(self.slow_conv(high_res_feat)))  # (B, 1536, s, s) -> (B, D_low, s, s)
        high = high.flatten(2).transpose(1, 2)  # (B, D_low, s, s) -> (B, N, D_low)
        low = low_res_feat.transpose(1, 2).reshape(batch, dim, side, side)  # (B, N, D_low) -> (B, D_low, s, s)
        low = low + self.fast_proj(F.gelu(self.fast_conv(low)))
        low = low.flatten(2).transpose(1, 2)  # (B, D_low, s, s) -> (B, N, D_low)
        gate = self.gate(torch.cat([low, high], dim=-1).mean(dim=1)).unsqueeze(1)  # (B, N, 2 D_low) -> (B, 1, 1)
        return low + gate.tanh() * high


# --- object tokens ------------------------------------------------------------------------------------------------


def pool_box_features(
    features: torch.Tensor,
    boxes: list[torch.Tensor],
    image_size: int = HIGH_RES_SIZE,
    output_size: int = BOX_FEATURE_SIZE,
) -> list[torch.Tensor]:
    """Mean of a RoIAlign(output_size) grid per box: features (B, C, S, S), boxes[i] (K_i, 4) xyxy in
    `image_size` pixels -> list of (K_i, C) in the features' dtype.

    torchvision RoIAlign semantics (release): spatial_scale = S / image_size (192 / 768), sampling_ratio -1 (adaptive),
    aligned False, sampled in float32. `roi_align_mean` computes the grid mean directly (the mean of A_y F A_x^T is
    a_y^T F a_x), so the (K, C, 56, 56) RoIAlign output -- 3.6 GB in float32 for 100 boxes on the 2880-channel map --
    never exists; its working memory is bounded by `multigran.ops.roi_align.CHUNK_ELEMENTS`. With bf16 features the
    release averages the bf16-cast 56x56 grid; here the float32 mean is cast once (a rounding difference only).
    """
    if features.dim() != 4 or features.shape[-1] != features.shape[-2]:
        raise ValueError(f"features must be a square map (B, C, S, S); got {tuple(features.shape)}")
    if len(boxes) != features.shape[0]:
        raise ValueError(f"got boxes for {len(boxes)} images but features for {features.shape[0]}")
    for i, image_boxes in enumerate(boxes):
        if image_boxes.dim() != 2 or image_boxes.shape[-1] != 4:
            raise ValueError(f"boxes[{i}] must be (K, 4) xyxy; got {tuple(image_boxes.shape)}")
    spatial_scale = features.shape[-1] / image_size
    pooled = roi_align_mean(features, list(boxes), output_size, spatial_scale, sampling_ratio=-1, aligned=False)
    return list(pooled.split([len(b) for b in boxes]))  # (sum K_i, C) -> per image


class ObjectTokens(nn.Module):
    """One LLM token per box: RoIAlign 56x56 on the multi-stage ConvNeXt map, mean, `bbox_projector`."""

    def __init__(
        self,
        feature_dim: int = 2880,
        hidden_size: int = 4096,
        image_size: int = HIGH_RES_SIZE,
        output_size: int = BOX_FEATURE_SIZE,
    ):
        super().__init__()
        self.image_size, self.output_size = image_size, output_size
        self.bbox_projector = MLPProjector(feature_dim, hidden_size)

    def forward(self, multi_stage: torch.Tensor, boxes: list[torch.Tensor]) -> list[torch.Tensor]:
        """multi_stage (B, 2880, 192, 192), boxes[i] (K_i, 4) in 768-pixel xyxy -> list of (K_i, hidden_size)."""
        pooled = pool_box_features(multi_stage, boxes, self.image_size, self.output_size)
        weight = self.bbox_projector.model[0].weight
        tokens = self.bbox_projector(torch.cat(pooled).to(weight.dtype))  # (sum K_i, 2880) -> (sum K_i, D)
        return list(tokens.split([len(p) for p in pooled]))
