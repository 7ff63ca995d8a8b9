"""MG-LLaVA visual pipeline components: image preprocessing, Conv-Gate fusion, object tokens.

Data flow (spec/mg-llava.md, release PhoenixZ810/MG-LLaVA `mg_llava/module/fuse_model.py`):
  image -> expand2square (CLIP mean colour) -> 768 high-res pixels -> bilinear 336 low-res pixels
  CLIP ViT-L/14-336 (layer -2, no CLS): (B, 576, 1024)   ConvNeXt-L @768: last_feat (B, 1536, 24, 24),
                                                          multi_stage (B, 2880, 192, 192)
  ConvGateFusion(low, last_feat) -> (B, 576, 1024) -> projector -> 576 image tokens
  ObjectTokens(multi_stage, boxes) -> RoIAlign 56x56 -> mean -> bbox_projector -> one token per box
Module names follow the release checkpoint keys (`projector.model.0`, `bbox_projector.model.2`, `fuse_module.gate.0`).

Method "mg" (bottom of the file): `MgSettings` (method_settings), the processor step `mg_step` (images + boxes ->
pixel_values, pixel_values_aux, boxes, box_counts, token counts) and `MgPipeline` (the model's `visual` module).
Per image the LLM receives [grid^2 fused image tokens][K object tokens], K = boxes kept for that image (>= 1).
With `method_settings.adaptive_granularity` the fused grid goes through the adaptive-granularity layer
(pipelines/granularity.py: pooled to one level per image, fixed or chosen by the router); object tokens stay as
they are.
`compat` (MgSettings) switches the box pipeline (multigran.data.boxes) and the ConvNeXt's training-time stochastic
depth to the release's; the model computation is the same in both modes.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import ConvNextConfig, ConvNextModel
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from multigran.checkpointing import checkpointed
from multigran.configuration import parse_method_settings
from multigran.data.boxes import (
    HIGH_RES_SIZE,
    IOU_THRESHOLD,
    MAX_BOXES,
    check_box_cap,
    read_box_file,
    transform_boxes,
)
from multigran.ops.roi_align import roi_align_mean
from multigran.pipelines.anyres import check_crop_geometry
from multigran.pipelines.granularity import AdaptiveGranularity, GranularitySettings
from multigran.vision import select_vision_features
from multigran.vision.convnext import convnext_features, convnext_large_d_320_config

logger = logging.getLogger(__name__)

# Release defaults (MGLLaVADataset / MultiFuseObjectLLaVAModel); the 768 high-res side is data.boxes.HIGH_RES_SIZE.
LOW_RES_SIZE = 336  # CLIP ViT-L/14-336 crop size
BOX_FEATURE_SIZE = 56  # RoIAlign output size (box_feat_size default for the multi-stage map)
RELEASE_DROP_PATH = 0.1  # OpenCLIP convnext_large_d_320.json timm_drop_path, active in the release's training
# `mg_llava_dataset.py:95`: a text of at least max_length - 50 tokens keeps one box per label.
NEAR_MAX_LENGTH_MARGIN = 50


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

    def reset_parameters(self) -> None:
        """Release init = PyTorch's Linear default: XTuner's ProjectorModel never runs transformers' weight init
        (no post_init, no _init_weights), so this undoes the generic normal(0.02) init of the multigran model."""
        self.model[0].reset_parameters()
        self.model[2].reset_parameters()

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

    gradient_checkpointing = False  # set by gradient_checkpointing_enable()

    def forward(self, low_res_feat: torch.Tensor, high_res_feat: torch.Tensor) -> torch.Tensor:
        """low_res_feat (B, N = s*s, low_res_dim), high_res_feat (B, high_res_dim, h, w) -> (B, N, low_res_dim)."""
        return checkpointed(self, self._forward, low_res_feat, high_res_feat)

    def _forward(self, low_res_feat: torch.Tensor, high_res_feat: torch.Tensor) -> torch.Tensor:
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
        return object_tokens(self.bbox_projector, multi_stage, boxes, self.image_size, self.output_size)


def object_tokens(
    bbox_projector: MLPProjector,
    multi_stage: torch.Tensor,
    boxes: list[torch.Tensor],
    image_size: int = HIGH_RES_SIZE,
    output_size: int = BOX_FEATURE_SIZE,
) -> list[torch.Tensor]:
    """One LLM token per box: pool_box_features (RoIAlign mean) then `bbox_projector`; list of (K_i, D)."""
    pooled = pool_box_features(multi_stage, boxes, image_size, output_size)
    weight = bbox_projector.model[0].weight
    tokens = bbox_projector(torch.cat(pooled).to(weight.dtype))  # (sum K_i, 2880) -> (sum K_i, D)
    return list(tokens.split([len(p) for p in pooled]))


# --- method "mg": settings ----------------------------------------------------------------------------------------


@dataclass
class MgSettings:
    """`method_settings` of method "mg". Defaults: the MG-LLaVA release (MGLLaVADataset, MultiFuseObjectLLaVAModel).

    The low-res (CLIP) side is not a setting: it is the vision tower's `image_size` (336 for CLIP ViT-L/14-336),
    and the feature layer / CLS handling are the config's `vision_feature_layer` / `vision_feature_select_strategy`.

    compat: the release's box pipeline (`multigran.data.boxes`: NMS on the padded original-pixel boxes, then the soft
        per-label cap grouped by label, then scale / round / crop with its +1 px shift for some image sides) and its
        stochastic depth in the frozen ConvNeXt. Off (the default): the corrected pipeline (scale / round / crop, NMS,
        hard cap, score order). Converted release checkpoints have it on.
    high_res: side of the square high-res canvas: ConvNeXt input and box coordinate frame (release image_size_aux).
    convnext_config: the high-res tower's ConvNeXt config as keyword overrides of `convnext_large_d_320_config()`
        (None = OpenCLIP convnext_large_d_320 itself; a complete Hugging Face ConvNext config dict works too;
        its stochastic depth is `hires_drop_path`, not `drop_path_rate`).
    max_boxes: the box cap after class-wise NMS (release limit_num = 100); None = no cap (the default of the release's
        `MGLLaVAProxyEvalDataset`, which its configs keep for VQAv2, LLaVA-Bench, MM-Vet, MathVista and MMVP; they pass
        100 for the other benchmarks and for training). Corrected: a HARD bound: more boxes -> top 20 per label
        (5 if max_boxes < 50), then the best max_boxes by score. compat: the release's soft cap: top 20 per label
        (5 if max_boxes < 50) only, which can leave more than max_boxes; 50 is refused (the release fails there).
    text_max_length: the release's text budget (its max_length, 2048 - 576 = 1472 in every release config) for its
        rule "a training text within 50 tokens of max_length keeps one box per label" (`mg_llava_dataset.py:94-109`);
        None = no such rule. Applies where the sample's text length is known (training data, `text_length` option).
    hires_drop_path: stochastic-depth rate of the frozen ConvNeXt (rates rise linearly to it over the blocks, as timm),
        active only in training mode: the release builds OpenCLIP convnext_large_d_320 with timm_drop_path 0.1 and
        never puts it in eval mode (`openclip_encoder.py:60`), so its training saw randomly dropped blocks. None = the
        mode's default: 0.1 with compat, 0.0 (a deterministic frozen tower) without. Evaluation is never stochastic.
    nms_iou: IoU threshold of the class-wise NMS (release iou_threshold).
    grid_mismatch: what the Conv-Gate does when the ConvNeXt last stage and the CLIP token grid differ
        ("resample" the high-res map bilinearly, or "error"); the release needs high_res / 32 == 336 / 14.
    roi_output_size: RoIAlign output side before the mean (release box_feat_size).
    adaptive_granularity: None (the release), or the settings of the adaptive-granularity layer over the fused grid
        (`GranularitySettings` fields as a dict, {} = its defaults: router, five levels n^2/16 ... n^2, "auto").
    """

    compat: bool = False
    high_res: int = HIGH_RES_SIZE
    convnext_config: dict | None = None
    max_boxes: int | None = MAX_BOXES
    text_max_length: int | None = None
    hires_drop_path: float | None = None
    nms_iou: float = IOU_THRESHOLD
    grid_mismatch: str = "resample"
    roi_output_size: int = BOX_FEATURE_SIZE
    adaptive_granularity: dict | None = None

    def __post_init__(self):
        self.layer = None if self.adaptive_granularity is None else GranularitySettings.from_dict(
            self.adaptive_granularity, "mg method_settings.adaptive_granularity")
        if not isinstance(self.compat, bool):
            raise ValueError(f"mg method_settings: compat must be true or false, got {self.compat!r}")
        for name in ("high_res", "max_boxes", "text_max_length", "roi_output_size"):
            value = getattr(self, name)
            if value is None and name in ("max_boxes", "text_max_length"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"mg method_settings: {name} must be a positive int, got {value!r}")
        try:
            check_box_cap(self.max_boxes, self.compat, one_per_label=self.text_max_length is not None)
        except ValueError as error:
            raise ValueError(f"mg method_settings: {error}") from None
        if isinstance(self.nms_iou, bool) or not isinstance(self.nms_iou, (int, float)) or not 0 <= self.nms_iou <= 1:
            raise ValueError(f"mg method_settings: nms_iou must be a number in [0, 1], got {self.nms_iou!r}")
        drop = self.hires_drop_path
        if drop is not None and (isinstance(drop, bool) or not isinstance(drop, (int, float)) or not 0 <= drop < 1):
            raise ValueError(f"mg method_settings: hires_drop_path must be a number in [0, 1) or null, got {drop!r}")
        if self.grid_mismatch not in ("resample", "error"):
            raise ValueError(
                f"mg method_settings: grid_mismatch must be 'resample' or 'error', got {self.grid_mismatch!r}"
            )
        if self.convnext_config is not None and not isinstance(self.convnext_config, Mapping):
            raise ValueError(
                f"mg method_settings: convnext_config must be a dict, got {type(self.convnext_config).__name__}"
            )
        if self.convnext_config is not None and self.convnext_config.get("drop_path_rate", 0.0) not in (0, 0.0, None):
            raise ValueError("mg method_settings: set the ConvNeXt's stochastic depth with hires_drop_path, not "
                             "convnext_config.drop_path_rate")

    @property
    def drop_path_rate(self) -> float:
        """The ConvNeXt's stochastic-depth rate: hires_drop_path, or the mode's default (release 0.1 in compat)."""
        if self.hires_drop_path is not None:
            return float(self.hires_drop_path)
        return RELEASE_DROP_PATH if self.compat else 0.0

    def hires_config(self) -> ConvNextConfig:
        overrides = {**dict(self.convnext_config or {}), "drop_path_rate": self.drop_path_rate}
        return convnext_large_d_320_config(**overrides)


def mg_settings(method_settings: Mapping | None) -> MgSettings:
    """MgSettings from a plain dict (config.method_settings or the image processor's), unknown keys rejected."""
    return parse_method_settings(MgSettings, SimpleNamespace(method="mg", method_settings=dict(method_settings or {})))


# --- method "mg": boxes given by the user ---------------------------------------------------------------------------
#
# `boxes` (processor option) = one entry per image; an entry is
#   - None: no detections -> one all-zero box, as the release does for images without boxes;
#   - a record {"boxes": [[x1, y1, x2, y2], ...], "scores": [...], "labels": [...]} (a box-file record, e.g.
#     `read_box_file(path)[id]`): the release's load-time pipeline, class-wise NMS included;
#   - boxes alone: a (K, 4) list / numpy array / tensor of [x1, y1, x2, y2]: taken as given (scores 1, one label per
#     box, so NMS never drops one of them; order kept; the max_boxes cap keeps the first ones -- in compat mode its
#     per-label cap never drops one, as the release with one label per box);
#   - a string: a box-file path or JSON text (a record or a list of boxes). A box file must hold exactly one record,
#     unless the image names are known (`read_box_argument(text, image_paths)`, as `multigran generate --boxes`
#     does): then each image takes the record whose id is its file stem (or file name).
# For a single image, `boxes` may also be that image's entry itself. Coordinates are absolute pixels of the ORIGINAL
# image (before the square padding).


def read_box_argument(text: str, image_paths=None):
    """A box-file path or JSON text (the CLI's `--boxes FILE|JSON`) -> a `boxes` value for the processor.

    A file whose records are keyed by image: with `image_paths`, one record per image looked up by the image's file
    stem (then its file name); a file with a single record applies to a single image. JSON text is returned parsed.
    """
    if not isinstance(text, str):
        raise TypeError(f"boxes: expected a box-file path or JSON text, got {type(text).__name__}")
    names = [Path(os.fspath(p)) for p in image_paths] if image_paths is not None else None
    if names is not None and not names:
        raise ValueError("boxes were given but no image: object boxes belong to an image (pass --image)")
    stripped = text.strip()
    if not stripped.startswith(("[", "{")) or os.path.isfile(text):
        if not os.path.isfile(text):
            raise ValueError(
                f"boxes: {text!r} is neither an existing box file nor JSON boxes ([[x1, y1, x2, y2], ...])"
            )
        records = read_box_file(text)  # errors name the file and the record
        if names is not None:
            found = [records.get(n.stem, records.get(n.name)) for n in names]
            if all(record is not None for record in found):
                return found
            if len(records) == 1 and len(names) == 1:
                return [next(iter(records.values()))]
            missing = [str(n) for n, record in zip(names, found) if record is None]
            raise ValueError(
                f"{text}: no box record with the id of image(s) {missing} (records are looked up by image file stem; "
                f"the file holds {len(records)} record(s), e.g. ids {list(records)[:5]})"
            )
        if len(records) != 1:
            raise ValueError(
                f"{text} holds {len(records)} box records: pass the record of each image (read_box_file(path)[id]) "
                "or use `multigran generate --boxes`, which looks records up by image file stem"
            )
        return [next(iter(records.values()))]
    try:
        return json.loads(stripped)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"boxes: JSON text is not valid (line {e.lineno}, column {e.colno}: {e.msg}): {text[:80]!r}"
        ) from None


def _is_box_list(value) -> bool:
    """A non-empty (K, 4)-like nesting of numbers (list of lists, array, tensor): one image's boxes."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return value.ndim == 2
    return (
        isinstance(value, (list, tuple)) and len(value) > 0
        and all(isinstance(b, (list, tuple)) and len(b) == 4 and all(_is_number(x) for x in b) for b in value)
    )


def _is_number(x) -> bool:
    return isinstance(x, (int, float, np.number)) and not isinstance(x, bool)


def boxes_per_image(boxes, num_images: int) -> list:
    """Normalise the `boxes` option to one entry per image (see the comment above)."""
    if boxes is None:
        return [None] * num_images
    if isinstance(boxes, str):
        boxes = read_box_argument(boxes)
        if isinstance(boxes, list) and len(boxes) == 1 and isinstance(boxes[0], Mapping):
            boxes = boxes[0]  # a one-record file
    single = isinstance(boxes, Mapping) or _is_box_list(boxes)
    if single:
        if num_images != 1:
            raise ValueError(
                f"boxes: got one image's boxes for {num_images} images: pass a list with one entry per image "
                "(None, a record, or a list of [x1, y1, x2, y2])"
            )
        return [boxes]
    if isinstance(boxes, (torch.Tensor, np.ndarray)) and boxes.ndim == 3:  # (images, K, 4)
        boxes = list(boxes)
    if not isinstance(boxes, (list, tuple)):
        raise TypeError(f"boxes: expected a list with one entry per image, got {type(boxes).__name__}")
    if num_images == 1 and len(boxes) == 0:
        return [[]]  # one image, no box
    if len(boxes) != num_images:
        raise ValueError(f"boxes: got {len(boxes)} entries for {num_images} image(s); pass one entry per image")
    return list(boxes)


def _detections(entry, where: str):
    """One image's entry -> (boxes, scores, labels) in original-image pixels, for transform_boxes."""
    if entry is None:
        return [], [], []
    if isinstance(entry, str):
        entry = boxes_per_image(entry, 1)[0]
    if isinstance(entry, Mapping):
        if "frames" in entry:
            raise ValueError(f"{where}: a video record (with 'frames') was given for an image")
        missing = [k for k in ("boxes", "scores", "labels") if k not in entry]
        if missing:
            raise ValueError(f"{where}: a box record needs 'boxes', 'scores' and 'labels'; missing {missing}")
        return entry["boxes"], entry["scores"], entry["labels"]
    if isinstance(entry, torch.Tensor):
        entry = entry.detach().cpu().double()
    elif isinstance(entry, np.ndarray):
        entry = torch.from_numpy(entry.astype(np.float64))
    elif not isinstance(entry, (list, tuple)):
        raise TypeError(
            f"{where}: expected None, a record, a (K, 4) list/array/tensor of [x1, y1, x2, y2] or a box-file path, "
            f"got {type(entry).__name__}"
        )
    count = len(entry)
    # User-chosen boxes: no NMS among them (one label each), order kept (equal scores sort stably).
    return entry, [1.0] * count, list(range(count))


# --- method "mg": processor step -----------------------------------------------------------------------------------


def mg_step(image_processor, images, boxes=None, text_length=None, granularity=None) -> dict:
    """MG-LLaVA preprocessing of RGB images and their object boxes.

    Returns pixel_values (images, 3, low, low) (low = the CLIP crop size), pixel_values_aux (images, 3, high, high),
    image_sizes (images, 2) original (height, width), boxes (images, max_K, 4) float32 on the high-res canvas, zero
    padded, box_counts (images,) long, and image_token_counts = grid^2 + K_i (the object tokens count in the prompt
    and in the context budget). `boxes`: see `boxes_per_image` (one entry per image, original-image pixels).
    `text_length`: the sample's text tokens with one token per image placeholder (as the release's len(input_ids));
    with the `text_max_length` setting, a text of at least text_max_length - 50 tokens keeps one box per label.
    `granularity` (models with the adaptive-granularity layer): "auto" or the fused grid's level in tokens; the
    counts become level + K_i (1 placeholder per image in auto mode), and `image_granularity` is returned.
    """
    settings = mg_settings(image_processor.method_settings)
    low_res = image_processor.crop_size.height
    grid = low_res // image_processor.patch_size
    mean, std = tuple(image_processor.image_mean), tuple(image_processor.image_std)
    entries = boxes_per_image(boxes, len(images))
    if text_length is not None and (isinstance(text_length, bool) or not isinstance(text_length, int)):
        raise ValueError(f"text_length must be an int (text tokens of the sample), got {text_length!r}")
    near_max_length = (settings.text_max_length is not None and text_length is not None
                       and text_length >= settings.text_max_length - NEAR_MAX_LENGTH_MARGIN)
    low, high, sizes, canvas_boxes = [], [], [], []
    for index, (image, entry) in enumerate(zip(images, entries)):
        low_i, high_i, pad_info = preprocess_mg_image(image, settings.high_res, low_res, mean, std)
        low.append(low_i)
        high.append(high_i)
        sizes.append((pad_info.original_height, pad_info.original_width))
        where = f"boxes of image {index}"
        kept, _, _ = transform_boxes(
            *_detections(entry, where), (pad_info.original_width, pad_info.original_height), target=settings.high_res,
            iou_threshold=settings.nms_iou, max_boxes=settings.max_boxes, where=where, compat=settings.compat,
            one_per_label=near_max_length,
        )
        canvas_boxes.append(kept)  # (K_i, 4), K_i >= 1
    counts = [len(b) for b in canvas_boxes]
    padded = torch.zeros(len(images), max(counts), 4)
    for index, image_boxes in enumerate(canvas_boxes):
        padded[index, : len(image_boxes)] = image_boxes
    out = {
        "pixel_values": torch.stack(low),
        "pixel_values_aux": torch.stack(high),
        "image_sizes": torch.tensor(sizes, dtype=torch.long),
        "boxes": padded,
        "box_counts": torch.tensor(counts, dtype=torch.long),
        "image_token_counts": [grid * grid + k for k in counts],
    }
    if settings.layer is not None:
        layer = AdaptiveGranularity(settings.layer, grid, image_token_id=-1)  # the processor never routes
        out.update(layer.step(granularity, len(images), lambda i, tokens: tokens + counts[i]))
    elif granularity is not None:
        raise ValueError("granularity applies to models with the adaptive-granularity layer; this mg model has none "
                         "(add it with method_settings.adaptive_granularity: multigran switch-method ... --to mg)")
    return out


# --- method "mg": the pipeline --------------------------------------------------------------------------------------


class MgPipeline(nn.Module):
    """MG-LLaVA's visual pipeline: per image [grid^2 fused tokens][one token per box].

    CLIP (the model's vision_tower) sees the low-res view; the frozen ConvNeXt `hires_tower` sees the high-res one.
    fused = fuse_module(CLIP features, ConvNeXt last stage) -> projector; object tokens = RoIAlign mean on the
    multi-stage ConvNeXt map -> bbox_projector. Keys (`visual.` prefix in the model): projector.model.{0,2},
    bbox_projector.model.{0,2}, fuse_module.*, as the release; hires_tower.* = Hugging Face ConvNextModel keys.
    With the adaptive-granularity layer the fused grid is pooled to one level per image ([level tokens][K object
    tokens]); the router (`router.*`) reads the unpooled fused grid and the instruction.
    """

    def __init__(self, config):
        super().__init__()
        self.settings = mg_settings(config.method_settings)
        self.grid = check_crop_geometry(config)  # CLIP tokens form a square grid (CLS dropped)
        self.feature_layer = config.vision_feature_layer
        self.select_strategy = config.vision_feature_select_strategy
        num_layers = 1 if isinstance(config.vision_feature_layer, int) else len(config.vision_feature_layer)
        low_res_dim = config.vision_config.hidden_size * num_layers
        text_dim = config.text_config.hidden_size
        hires_config = self.settings.hires_config()
        stride = hires_config.patch_size * 2 ** (hires_config.num_stages - 1)
        hires_grid = self.settings.high_res // stride
        if hires_grid != self.grid and self.settings.grid_mismatch == "error":
            raise ValueError(
                f"mg: the ConvNeXt last stage is {hires_grid}x{hires_grid} at high_res {self.settings.high_res} "
                f"(stride {stride}) but the vision tower's token grid is {self.grid}x{self.grid}; set high_res to "
                f"{self.grid * stride} or grid_mismatch='resample'"
            )
        self.hires_tower = ConvNextModel(hires_config)
        self.hires_tower.requires_grad_(False)  # frozen in every stage (release)
        self.fuse_module = ConvGateFusion(low_res_dim, hires_config.hidden_sizes[-1], self.settings.grid_mismatch)
        self.projector = MLPProjector(low_res_dim, text_dim)
        self.bbox_projector = MLPProjector(sum(hires_config.hidden_sizes), text_dim)
        self.input_names = ("pixel_values_aux", "boxes", "box_counts")
        self.adaptive = self.router = None
        if self.settings.layer is not None:
            self.adaptive = AdaptiveGranularity(self.settings.layer, self.grid, config.image_token_id)
            self.router = self.adaptive.build_router(text_dim)
            self.input_names += AdaptiveGranularity.input_names

    def token_counter(self, image_sizes, box_counts=None, **unused):
        if box_counts is None:
            raise ValueError("method 'mg' needs box_counts (from MultiGranProcessor) to count each image's tokens")
        boxes = box_counts.tolist()
        return lambda i, granularity: granularity + int(boxes[i])

    def placeholder_counts(self, image_sizes, box_counts=None, image_granularity=None, **unused) -> list[int]:
        count = self.token_counter(image_sizes, box_counts)
        if self.adaptive is None:
            return [count(i, self.grid * self.grid) for i in range(len(box_counts))]
        return self.adaptive.placeholder_counts(image_granularity, len(box_counts), count)

    def encode_grids(self, vision_tower, pixel_values, image_sizes=None, pixel_values_aux=None, boxes=None,
                     box_counts=None, **unused):
        """Per image its projected fused grid (1, grid^2, D); the context is its object tokens (K_i, D)."""
        if pixel_values_aux is None or boxes is None or box_counts is None:
            raise ValueError("method 'mg' needs pixel_values_aux, boxes and box_counts: build inputs with "
                             "MultiGranProcessor (boxes=... per image, None for none)")
        num_images, high_res = pixel_values.shape[0], self.settings.high_res
        if tuple(pixel_values_aux.shape) != (num_images, 3, high_res, high_res):
            raise ValueError(f"pixel_values_aux must be ({num_images}, 3, {high_res}, {high_res}), got "
                             f"{tuple(pixel_values_aux.shape)}")
        if boxes.dim() != 3 or boxes.shape[0] != num_images or boxes.shape[2] != 4 or box_counts.shape != (num_images,):
            raise ValueError(f"boxes must be ({num_images}, max_K, 4) and box_counts ({num_images},), got "
                             f"{tuple(boxes.shape)} and {tuple(box_counts.shape)}")
        counts = box_counts.tolist()
        if min(counts) < 1 or max(counts) > boxes.shape[1]:
            raise ValueError(f"box_counts {counts} must lie in [1, {boxes.shape[1]}] (every image has >= 1 box)")

        low = select_vision_features(vision_tower, pixel_values, self.feature_layer, self.select_strategy)
        # (B, 1536, 24, 24) last stage, (B, 2880, 192, 192) all stages at stage-0 size
        last_feat, multi_stage = convnext_features(self.hires_tower, pixel_values_aux)
        fused = self.fuse_module(low, last_feat)  # (B, 576, 1024)
        image_tokens = self.projector(fused.to(self.projector.model[0].weight.dtype))  # (B, 576, 1024) -> (B, 576, D)
        objects = object_tokens(
            self.bbox_projector, multi_stage, [b[:k] for b, k in zip(boxes, counts)], high_res,
            self.settings.roi_output_size,
        )  # per image (K_i, D)
        return list(image_tokens[:, None]), objects  # per image (1, 576, D); (K_i, D)

    def assemble(self, grids, objects, granularities) -> list[torch.Tensor]:
        """Per image [its fused grid at its level (None = unpooled)][its object tokens]."""
        features = []
        for grid, obj, granularity in zip(grids, objects, granularities):
            tokens = grid if granularity is None else self.adaptive.pool(grid, granularity)[0]  # (1, g, D)
            features.append(torch.cat([tokens[0], obj.to(tokens.dtype)]))
        return features

    def forward(self, vision_tower, pixel_values, image_sizes=None, pixel_values_aux=None, boxes=None,
                box_counts=None, **inputs) -> list[torch.Tensor]:
        grids, objects = self.encode_grids(vision_tower, pixel_values, image_sizes, pixel_values_aux, boxes, box_counts)
        if self.adaptive is None:
            features, report = self.assemble(grids, objects, [None] * len(grids)), [{} for _ in grids]
        else:
            count = self.token_counter(image_sizes, box_counts)
            features, report = self.adaptive.apply(self, grids, objects, count, **inputs)
        self.last_report = [{**entry, "visual_tokens": f.shape[0], "object_tokens": int(k)}
                            for entry, f, k in zip(report, features, box_counts.tolist())]
        return features


__all__ = [
    "MgSettings",
    "MgPipeline",
    "mg_step",
    "mg_settings",
    "read_box_argument",
    "boxes_per_image",
    "preprocess_mg_image",
    "expand2square",
    "MLPProjector",
    "ConvGateFusion",
    "ObjectTokens",
    "object_tokens",
    "pool_box_features",
]
