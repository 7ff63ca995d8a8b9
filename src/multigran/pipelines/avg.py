"""AVG-LLaVA: LLaVA-NeXT AnyRes + the adaptive-granularity layer (`pipelines/granularity.py`: the pooled pyramid of
the projected tokens and the router that picks one granularity per image from the image and its instruction).

What is AnyRes-specific lives here: the merge of one image's pooled crops (unpad at a level, with the release's quirk
at the 2:1 levels: `merge_at_granularity`, `count_tokens_at_granularity`), the flat `AvgSettings`, the processor step
and `AvgPipeline`. Facts and released-code quirks: shared/spec/avg-llava.md (reference: DeepLearnXMU/AVG-LLaVA).
"""

import copy
import functools
from dataclasses import dataclass

import torch

from ..configuration import parse_method_settings
from .anyres import (
    PATCH_MERGES,
    UNPAD_ROUNDINGS,
    AnyResPipeline,
    check_choice,
    count_merged_tokens,
    pack_crops,
    preprocess_anyres,
    unpadded_extent,
)
from .granularity import (
    AUTO,
    DEFAULT_TOP_K,
    AdaptiveGranularity,
    GranularitySettings,
    granularity_levels,
)


def unpadded_extent_at_level(image_size, tile_grid, level_grid, compat: bool = True,
                             rounding: str = "hf") -> tuple[int, int, int, int]:
    """(top, bottom, left, right) bounds of the stitched token grid that hold the image, not its aspect padding.

    tile_grid: (rows, cols) of tiles; level_grid: (h, w) tokens per tile. The stitched grid is (rows*h, cols*w).
    rounding: how unpad makes whole rows/cols of the scaled image side ("hf" or "truncate", see `UNPAD_ROUNDINGS`).

    compat (released code): LLaVA-NeXT's `unpad_image` on the stitched grid itself. It treats the token grid's aspect
    (cols*w)/(rows*h) as the image-canvas aspect, which only holds for square per-tile grids: at the 2:1 levels
    (288 = 24x12, 72 = 12x6) it takes the canvas for one twice as tall (relative to its width) as it is, so it
    removes rows that hold the image and keeps padding columns (672x672: 48x24 -> 24x24 at 288, 24x12 -> 12x12 at 72).
    Released weights were trained with it.

    corrected: the same arithmetic with each axis measured in its own token cells: rows against a canvas
    (rows*h) x (cols*h), columns against (rows*w) x (cols*w); both canvases have the true tile-grid aspect cols/rows.
    Identical to compat at the square levels (36, 144, 576).
    """
    rows, cols = tile_grid
    h, w = level_grid
    if compat:
        return unpadded_extent(image_size, rows * h, cols * w, rounding)
    top, bottom, _, _ = unpadded_extent(image_size, rows * h, cols * h, rounding)
    _, _, left, right = unpadded_extent(image_size, rows * w, cols * w, rounding)
    return top, bottom, left, right


def merge_at_granularity(
    crop_features: torch.Tensor,
    image_size,
    grid_pinpoints,
    tile_size: int,
    level_grid,
    image_newline: torch.Tensor | None,
    compat: bool = True,
    rounding: str = "hf",
    merge: str = "spatial_unpad",
) -> torch.Tensor:
    """One image's pooled crops -> its visual-token sequence (LLaVA-NeXT `spatial_unpad` at one granularity).

    crop_features: (crops, g, D), base (whole-image) crop first, then the tiles in raster order; every crop at the
    same granularity g = h*w with `level_grid` = (h, w). image_size: (height, width) of the original image;
    grid_pinpoints in (height, width) order. Returns (g + H_u * (W_u + 1), D): the base crop flat, then the stitched
    and unpadded tile grid with `image_newline` appended to every row. A single crop (no tiles) gives its g tokens
    and one newline, as Hugging Face's `pack_image_features` does. `merge` "spatial" / "flat" (release
    `mm_patch_merge_type`): every crop's g tokens, no unpad and no newline (`image_newline` may then be None).
    """
    if crop_features.dim() != 3:
        raise ValueError(f"merge_at_granularity: crop_features must be (crops, g, D), got {tuple(crop_features.shape)}")
    _, tokens, dim = crop_features.shape
    h, w = level_grid
    if h * w != tokens:
        raise ValueError(f"merge_at_granularity: level_grid {tuple(level_grid)} does not hold {tokens} tokens per crop")
    if merge == "spatial_unpad" and (image_newline is None or image_newline.shape != (dim,)):
        raise ValueError(
            f"merge_at_granularity: image_newline must have shape ({dim},), got "
            f"{None if image_newline is None else tuple(image_newline.shape)}"
        )
    return pack_crops(
        crop_features, image_size, grid_pinpoints, tile_size, image_newline, level_grid,
        extent=functools.partial(unpadded_extent_at_level, compat=compat, rounding=rounding), merge=merge,
    )


def count_tokens_at_granularity(
    image_size, grid_pinpoints, tile_size: int, grid: int, level_index: int, compat: bool = True,
    rounding: str = "hf", merge: str = "spatial_unpad", level_tokens=None,
) -> int:
    """Visual tokens of one image at level `level_index` of `level_tokens` (None = the five-level pyramid; 0 =
    coarsest), known before the forward pass.

    Equals `len(merge_at_granularity(...))` for the same image and settings. `grid_pinpoints=None` means a single crop
    (no tiles).
    """
    levels = granularity_levels(grid, level_tokens)
    if not 0 <= level_index < len(levels):
        raise ValueError(f"count_tokens_at_granularity: level_index {level_index} outside 0..{len(levels) - 1}")
    _, _, level_grid = levels[level_index]
    extent = functools.partial(unpadded_extent_at_level, compat=compat, rounding=rounding)
    return count_merged_tokens(image_size, grid_pinpoints, tile_size, level_grid, merge, extent)


# ---------------------------------------------------------------------------------------------------------------------
# The method: settings, processor step, model module
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class AvgSettings:
    """`method_settings` of method "avg": the layer's settings (`GranularitySettings`, flat here, as converted
    checkpoints store them) plus AnyRes's merge settings.

    granularity, use_router, top_k, max_visual_tokens, granularity_bias, levels: see `GranularitySettings` (tokens per
        crop; `use_router` False for checkpoints without a router: AVG-LLaVA stage 3).
    compat: released behaviour (unpad quirk at the 2:1 levels, router attention across crops, masked tokens filling
        the router's free text slots); False = corrected.
    unpad_rounding: "truncate" (the original LLaVA code's `int()`, as the release) or "hf" (transformers'
        `int(round(x, 7))`); None = "truncate" when compat, else "hf". Converters set it explicitly.
    patch_merge: the release's `mm_patch_merge_type`: "spatial_unpad" (AVG-LLaVA), "spatial" or "flat" (no unpad, no
        newline). "flat" has no router: the release never routes flat features (`llava_arch.py:258-259`).
    """

    granularity: str | int = AUTO
    compat: bool = True
    use_router: bool = True
    top_k: int = DEFAULT_TOP_K
    max_visual_tokens: int | None = None
    granularity_bias: float = 0.0
    levels: list[int] | None = None
    unpad_rounding: str | None = None
    patch_merge: str = "spatial_unpad"

    def __post_init__(self):
        if self.unpad_rounding is None:
            self.unpad_rounding = "truncate" if self.compat else "hf"
        check_choice("unpad_rounding", self.unpad_rounding, UNPAD_ROUNDINGS)
        check_choice("patch_merge", self.patch_merge, PATCH_MERGES)
        if self.patch_merge == "flat" and self.use_router:
            raise ValueError("method_settings.patch_merge='flat' needs use_router=False: the release never runs its "
                             "router on flat features (llava/model/llava_arch.py:258-259), so a flat model has fixed "
                             "granularities only")
        self.layer = GranularitySettings(
            granularity=self.granularity, use_router=self.use_router, top_k=self.top_k,
            max_visual_tokens=self.max_visual_tokens, granularity_bias=self.granularity_bias, levels=self.levels,
            router_compat=self.compat,
        )  # validates the layer's fields
        self.levels = self.layer.levels

    def level_geometry(self, grid: int):
        return self.layer.level_geometry(grid)


def avg_step(image_processor, images, granularity=None) -> dict:
    """Processor step: AnyRes preprocessing; each image's placeholder count at its granularity (1 when "auto":
    the model expands it to the router's choice, so no padding is left in the sequence)."""
    settings = parse_method_settings(AvgSettings, image_processor)
    out = preprocess_anyres(image_processor, images)
    tile = image_processor.crop_size.height
    grid = tile // image_processor.patch_size
    layer = AdaptiveGranularity(settings.layer, grid, image_token_id=-1)  # the processor never routes
    sizes = out["image_sizes"].tolist()
    pinpoints = image_processor.image_grid_pinpoints

    def count(i, tokens):
        return count_tokens_at_granularity(
            sizes[i], pinpoints, tile, grid, layer.level_tokens.index(tokens), settings.compat,
            settings.unpad_rounding, settings.patch_merge, layer.level_tokens)

    return {**out, **layer.step(granularity, len(images), count)}


class AvgPipeline(AnyResPipeline):
    """AVG-LLaVA: AnyRes crops -> projector -> the adaptive-granularity layer (each image's crops pooled to one level,
    fixed or chosen by the router from the image and its instruction) -> AnyRes merge at that level."""

    input_names = AdaptiveGranularity.input_names

    def __init__(self, config):
        self.avg = parse_method_settings(AvgSettings, config)
        config_for_anyres = copy.copy(config)  # the merge settings AnyRes shares; the rest are the layer's
        config_for_anyres.method_settings = {"unpad_rounding": self.avg.unpad_rounding,
                                             "patch_merge": self.avg.patch_merge}
        super().__init__(config_for_anyres)
        self.adaptive = AdaptiveGranularity(self.avg.layer, self.grid, config.image_token_id)
        self.router = self.adaptive.build_router(config.text_config.hidden_size)  # None without a router

    @property
    def level_tokens(self) -> list[int]:
        return self.adaptive.level_tokens

    def count_at(self, image_size, granularity: int) -> int:
        return count_tokens_at_granularity(
            image_size, self.grid_pinpoints, self.tile_size, self.grid, self.level_tokens.index(granularity),
            self.avg.compat, self.avg.unpad_rounding, self.avg.patch_merge, self.level_tokens,
        )

    def token_counter(self, image_sizes, **unused):
        sizes = image_sizes.tolist()
        return lambda i, granularity: self.count_at(sizes[i], granularity)

    def placeholder_counts(self, image_sizes, image_granularity=None, **unused) -> list[int]:
        return self.adaptive.placeholder_counts(image_granularity, len(image_sizes), self.token_counter(image_sizes))

    def encode_grids(self, vision_tower, pixel_values, image_sizes, **unused):
        """Per image its projected crops (crops, n*n, D), base view first; the context is the image sizes."""
        return self.encode_crops(vision_tower, pixel_values, image_sizes), image_sizes.tolist()

    def merge(self, crops: torch.Tensor, image_size, granularity: int) -> torch.Tensor:
        pooled, level_grid = self.adaptive.pool(crops, granularity)
        return merge_at_granularity(
            pooled, image_size, self.grid_pinpoints, self.tile_size, level_grid, self.image_newline,
            self.avg.compat, self.avg.unpad_rounding, self.avg.patch_merge,
        )

    def assemble(self, grids, sizes, granularities) -> list[torch.Tensor]:
        return [self.merge(c, s, g) for c, s, g in zip(grids, sizes, granularities)]

    def forward(self, vision_tower, pixel_values, image_sizes, **inputs) -> list[torch.Tensor]:
        grids, sizes = self.encode_grids(vision_tower, pixel_values, image_sizes)
        features, report = self.adaptive.apply(self, grids, sizes, self.token_counter(image_sizes), **inputs)
        self.last_report = [{**entry, "visual_tokens": f.shape[0]} for entry, f in zip(report, features)]
        return features
