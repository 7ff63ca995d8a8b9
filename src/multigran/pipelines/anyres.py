"""LLaVA-NeXT AnyRes: a base view plus tiles, one projector, unpad, a learned newline per row.

Numerically identical to Hugging Face's `LlavaNextForConditionalGeneration` (the baseline every method builds on) with
the default settings; `unpad_rounding` and `patch_merge` give the original LLaVA code base's variants.
"""

import functools
import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.image_processing_utils import select_best_resolution
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

from ..configuration import parse_method_settings
from ..vision import select_vision_features, tower_grid, tower_has_cls_token


# How unpad turns a scaled image side into whole token rows/columns. "hf": transformers' `int(round(x, 7))`, the exact
# count (llava-hf checkpoints). "truncate": the original LLaVA code's `int(x)` (AVG-LLaVA release
# `llava/model/llava_arch.py:132,137`), which loses a row or column when float error puts an integral x just below it
# (352x880 at 36 tokens per tile: 134 tokens instead of 148); checkpoints trained in that code base saw that.
UNPAD_ROUNDINGS = ("hf", "truncate")
# How the crops become one sequence: the original code's `mm_patch_merge_type` (release `llava_arch.py:256-322`).
# "spatial_unpad": stitched tiles, unpadded, a newline per row (LLaVA-NeXT, Hugging Face); "spatial": stitched tiles in
# raster order, no unpad, no newline; "flat": every crop's tokens one after the other. The base view comes first.
PATCH_MERGES = ("spatial_unpad", "spatial", "flat")


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"method_settings.{name} must be one of {list(choices)}, got {value!r}")


@dataclass
class AnyResSettings:
    """`method_settings` of method "anyres" (geometry comes from the vision config and `image_grid_pinpoints`).

    unpad_rounding: "hf" (default, Hugging Face's LLaVA-NeXT) or "truncate" (the original LLaVA code base).
    patch_merge: "spatial_unpad" (default), "spatial" or "flat" (see `PATCH_MERGES`).
    """

    unpad_rounding: str = "hf"
    patch_merge: str = "spatial_unpad"

    def __post_init__(self):
        check_choice("unpad_rounding", self.unpad_rounding, UNPAD_ROUNDINGS)
        check_choice("patch_merge", self.patch_merge, PATCH_MERGES)


def tile_grid_shape(image_size, grid_pinpoints, tile_size: int) -> tuple[int, int]:
    """(rows, cols) of tiles for an image of `image_size` (height, width): the best AnyRes resolution / tile size."""
    height, width = select_best_resolution([int(s) for s in image_size], grid_pinpoints)
    return height // tile_size, width // tile_size


def num_crops(image_size, grid_pinpoints, tile_size: int) -> int:
    rows, cols = tile_grid_shape(image_size, grid_pinpoints, tile_size)
    return rows * cols + 1  # + the base (whole-image) view


def unpadded_extent(image_size, grid_height: int, grid_width: int, rounding: str = "hf") -> tuple[int, int, int, int]:
    """Rows/cols of a stitched (grid_height, grid_width) feature grid that cover the image, not its aspect padding.

    Returns (top, bottom, left, right) slice bounds. Same arithmetic as LLaVA-NeXT's `unpad_image` (aspect ratio of
    the original image vs. the grid, symmetric padding); `rounding` "hf" rounds the scaled side to 7 decimals before
    `int()` as transformers does, "truncate" takes `int()` of it as the original LLaVA code does.
    """
    check_choice("unpad_rounding", rounding, UNPAD_ROUNDINGS)
    whole = (lambda x: int(round(x, 7))) if rounding == "hf" else int
    original_height, original_width = (int(s) for s in image_size)
    if original_width / original_height > grid_width / grid_height:
        new_height = whole(original_height * (grid_width / original_width))
        padding = (grid_height - new_height) // 2
        return padding, grid_height - padding, 0, grid_width
    new_width = whole(original_width * (grid_height / original_height))
    padding = (grid_width - new_width) // 2
    return 0, grid_height, padding, grid_width - padding


def stitched_extent(image_size, tile_grid, level_grid, rounding: str = "hf") -> tuple[int, int, int, int]:
    """LLaVA-NeXT's unpad bounds for tiles of (h, w) tokens laid out on a (rows, cols) tile grid."""
    (rows, cols), (h, w) = tile_grid, level_grid
    return unpadded_extent(image_size, rows * h, cols * w, rounding)


def count_merged_tokens(image_size, grid_pinpoints, tile_size: int, level_grid, merge: str = "spatial_unpad",
                        extent=stitched_extent) -> int:
    """Visual tokens of one image whose crops hold (h, w) tokens each, merged by `merge` (= `len(pack_crops(...))`).

    spatial_unpad: base view (h*w) + the unpadded stitched tiles + one newline per unpadded row; spatial and flat:
    every crop's h*w tokens. `grid_pinpoints=None` means a single view (no tiles): h*w, plus a newline if unpadded.
    """
    check_choice("patch_merge", merge, PATCH_MERGES)
    h, w = level_grid
    if grid_pinpoints is None:
        return h * w + int(merge == "spatial_unpad")
    rows, cols = tile_grid_shape(image_size, grid_pinpoints, tile_size)
    if merge != "spatial_unpad":
        return (1 + rows * cols) * h * w
    top, bottom, left, right = extent(image_size, (rows, cols), (h, w))
    return h * w + (bottom - top) * (right - left + 1)


def count_anyres_tokens(image_size, grid_pinpoints, tile_size: int, grid: int, rounding: str = "hf",
                        merge: str = "spatial_unpad") -> int:
    """Visual tokens of one image: base view (grid^2) + unpadded tiles + one newline per unpadded row (by default)."""
    extent = functools.partial(stitched_extent, rounding=rounding)
    return count_merged_tokens(image_size, grid_pinpoints, tile_size, (grid, grid), merge, extent)


def pack_crops(crops: torch.Tensor, image_size, grid_pinpoints, tile_size: int, newline: torch.Tensor | None,
               level_grid=None, extent=stitched_extent, merge: str = "spatial_unpad") -> torch.Tensor:
    """Merges one image's projected crops into its visual-token sequence (LLaVA-NeXT `spatial_unpad` by default).

    crops: (1 + rows*cols, h*w, D), base view first; `level_grid` (h, w) is the token grid of every crop (square by
    default). Returns (tokens, D): the base view flat, then
    - spatial_unpad: the stitched tile grid, cut to `extent` (the unpad bounds), in raster order with `newline`
      appended to every row. A single view (no tiles) gives its tokens and one newline, as Hugging Face does;
    - spatial: the whole stitched tile grid in raster order (release `llava_arch.py:308-310`);
    - flat: each tile's tokens in turn (release `llava_arch.py:258-259`).
    `newline` is only read by spatial_unpad (the other merges have none, as in the release).
    """
    check_choice("patch_merge", merge, PATCH_MERGES)
    if crops.shape[0] == 1:
        if merge != "spatial_unpad":
            return crops[0]
        return torch.cat([crops[0], newline[None].to(crops)], dim=0)
    base, tiles = crops[0], crops[1:]
    if level_grid is None:
        side = math.isqrt(tiles.shape[1])
        level_grid = (side, side)
    h, w = level_grid
    rows, cols = tile_grid_shape(image_size, grid_pinpoints, tile_size)
    if rows * cols != tiles.shape[0] or h * w != tiles.shape[1]:
        raise ValueError(
            f"an image of size {tuple(int(s) for s in image_size)} needs {rows}x{cols} tiles of {h}x{w} tokens + a base "
            f"view, got {crops.shape[0]} crops of {crops.shape[1]} tokens"
        )
    if merge == "flat":
        return crops.flatten(0, 1)  # (crops, h*w, D) -> (crops*h*w, D)
    dim = tiles.shape[-1]
    # (rows*cols, h*w, D) -> (D, rows*h, cols*w)
    stitched = tiles.view(rows, cols, h, w, dim).permute(4, 0, 2, 1, 3).reshape(dim, rows * h, cols * w)
    if merge == "spatial_unpad":
        top, bottom, left, right = extent(image_size, (rows, cols), (h, w))
        stitched = stitched[:, top:bottom, left:right]
        newlines = newline[:, None, None].expand(dim, stitched.shape[1], 1).to(stitched)
        stitched = torch.cat([stitched, newlines], dim=-1)  # (D, H_u, W_u + 1)
    return torch.cat([base, stitched.flatten(1).transpose(0, 1)], dim=0)


def preprocess_anyres(image_processor, images) -> dict:
    """LLaVA-NeXT preprocessing (base view + tiles) by transformers' own image processor: pixel_values, image_sizes."""
    out = LlavaNextImageProcessorPil.preprocess(image_processor, images, return_tensors="pt")
    return {"pixel_values": out["pixel_values"], "image_sizes": out["image_sizes"]}


def anyres_step(image_processor, images) -> dict:
    """Processor step: AnyRes preprocessing + each image's visual-token count under the model's settings."""
    settings = parse_method_settings(AnyResSettings, image_processor)
    out = preprocess_anyres(image_processor, images)
    tile = image_processor.crop_size.height
    grid = tile // image_processor.patch_size
    pinpoints = image_processor.image_grid_pinpoints
    out["image_token_counts"] = [
        count_anyres_tokens(size, pinpoints, tile, grid, settings.unpad_rounding, settings.patch_merge)
        for size in out["image_sizes"].tolist()
    ]
    return out


class MultiModalProjector(nn.Module):
    """Vision features -> LLM embeddings: Linear -> act -> Linear (LLaVA's `mlp2x_gelu`)."""

    def __init__(self, vision_dim: int, text_dim: int, act: str = "gelu", bias: bool = True):
        super().__init__()
        self.linear_1 = nn.Linear(vision_dim, text_dim, bias=bias)
        self.act = ACT2FN[act]
        self.linear_2 = nn.Linear(text_dim, text_dim, bias=bias)

    def forward(self, features):
        return self.linear_2(self.act(self.linear_1(features)))


def check_crop_geometry(config) -> int:
    """Tokens per crop kept by the feature selection; tiles must form a square grid to be stitched."""
    grid = tower_grid(config.vision_config)
    per_crop = grid * grid + int(tower_has_cls_token(config.vision_config))
    if config.vision_feature_select_strategy == "default":
        per_crop -= 1
    if per_crop != grid * grid:
        raise ValueError(
            f"vision_feature_select_strategy={config.vision_feature_select_strategy!r} leaves {per_crop} tokens per crop "
            f"for a {config.vision_config.model_type} tower, which cannot be arranged as its {grid}x{grid} patch grid "
            "(use 'default' for CLIP, whose CLS token it drops, and 'full' for SigLIP, which has none)"
        )
    return grid


class AnyResPipeline(nn.Module):
    """Vision tower features of every crop -> projector -> AnyRes merge, one token sequence per image."""

    input_names = ()  # no inputs beyond pixel_values / image_sizes

    def __init__(self, config):
        super().__init__()
        self.settings = parse_method_settings(AnyResSettings, config)
        self.grid = check_crop_geometry(config)
        self.tile_size = config.vision_config.image_size
        self.grid_pinpoints = config.image_grid_pinpoints
        self.feature_layer = config.vision_feature_layer
        self.select_strategy = config.vision_feature_select_strategy
        num_layers = 1 if isinstance(config.vision_feature_layer, int) else len(config.vision_feature_layer)
        text_dim = config.text_config.hidden_size
        self.projector = MultiModalProjector(
            config.vision_config.hidden_size * num_layers, text_dim,
            config.projector_hidden_act, config.multimodal_projector_bias,
        )
        # Only the unpadded merge has a newline (the release builds `image_newline` only then: llava_arch.py:40-43).
        uses_newline = self.settings.patch_merge == "spatial_unpad"
        self.image_newline = nn.Parameter(torch.empty(text_dim)) if uses_newline else None
        self.reset_parameters()

    def reset_parameters(self):
        if self.image_newline is not None:
            nn.init.normal_(self.image_newline, std=1 / math.sqrt(self.image_newline.shape[0]))  # as LLaVA-NeXT

    def unpad_extent(self, image_size, tile_grid, level_grid):
        return stitched_extent(image_size, tile_grid, level_grid, self.settings.unpad_rounding)

    def crops_per_image(self, image_sizes) -> list[int]:
        return [num_crops(size, self.grid_pinpoints, self.tile_size) for size in image_sizes.tolist()]

    def encode_crops(self, vision_tower, pixel_values, image_sizes) -> list[torch.Tensor]:
        """One tower pass over every crop of every image -> per image (crops, grid*grid, D) projected features."""
        counts = self.crops_per_image(image_sizes)
        if pixel_values.dim() == 5:  # (images, max_crops, 3, H, W), padded on the crop axis by the processor
            pixel_values = torch.cat([pv[:n] for pv, n in zip(pixel_values, counts)], dim=0)
        if pixel_values.shape[0] != sum(counts):
            raise ValueError(
                f"pixel_values hold {pixel_values.shape[0]} crops but image_sizes {image_sizes.tolist()} need "
                f"{sum(counts)} ({counts} per image): pass the processor's pixel_values and image_sizes together"
            )
        features = select_vision_features(vision_tower, pixel_values, self.feature_layer, self.select_strategy)
        return list(self.projector(features).split(counts, dim=0))

    def forward(self, vision_tower, pixel_values, image_sizes, **text_context) -> list[torch.Tensor]:
        crops = self.encode_crops(vision_tower, pixel_values, image_sizes)
        return [
            pack_crops(c, size, self.grid_pinpoints, self.tile_size, self.image_newline, extent=self.unpad_extent,
                       merge=self.settings.patch_merge)
            for c, size in zip(crops, image_sizes.tolist())
        ]

    def placeholder_counts(self, image_sizes, **visual_inputs) -> list[int]:
        """Image tokens the processor put in the prompt for each image."""
        return [
            count_anyres_tokens(s, self.grid_pinpoints, self.tile_size, self.grid, self.settings.unpad_rounding,
                                self.settings.patch_merge)
            for s in image_sizes.tolist()
        ]
