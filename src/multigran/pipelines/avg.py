"""AVG-LLaVA: a pooled pyramid of the projected tokens (granularity scaler) and a router that picks one granularity
per image from the image and its instruction.

Components only: the pyramid (`granularity_levels`, `pool_level`), the merge of one image's crops at a granularity
(`merge_at_granularity`, `count_tokens_at_granularity`), the text filter, the router and the choice rule.
Facts and released-code quirks: shared/spec/avg-llava.md (reference: DeepLearnXMU/AVG-LLaVA).
"""

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..configuration import parse_method_settings
from .anyres import AnyResPipeline, anyres_step, pack_crops, tile_grid_shape, unpadded_extent

# Released AVG-LLaVA config (zhibinlan/AVG-LLaVA): `vis_token_granularity` and `filtered_text_num`.
# The list order fixes the router's class index (0 = coarsest).
DEFAULT_LEVEL_TOKENS = (36, 72, 144, 288, 576)
DEFAULT_TOP_K = 32
# Pool kernels (rows, cols) from the finest n x n grid, coarsest first: tokens n^2/16, n^2/8, n^2/4, n^2/2, n^2.
# Alternating 1x2 and 2x1 average pools (the paper's description) compose to exactly these kernels.
LEVEL_KERNELS = ((4, 4), (2, 4), (2, 2), (1, 2), (1, 1))


# ---------------------------------------------------------------------------------------------------------------------
# Granularity scaler
# ---------------------------------------------------------------------------------------------------------------------


def granularity_levels(grid: int) -> list[tuple[int, tuple[int, int], tuple[int, int]]]:
    """The pyramid of an n x n patch grid: [(tokens, kernel (rows, cols), pooled grid (rows, cols))], coarsest first.

    n = 24 (CLIP-L/336) gives 36/72/144/288/576 tokens on 6x6, 12x6, 12x12, 24x12, 24x24 grids.
    """
    if not isinstance(grid, int) or grid <= 0 or grid % 4:
        raise ValueError(f"granularity_levels: the patch grid side must be a positive multiple of 4, got {grid!r}")
    levels = []
    for kernel_rows, kernel_cols in LEVEL_KERNELS:
        rows, cols = grid // kernel_rows, grid // kernel_cols
        levels.append((rows * cols, (kernel_rows, kernel_cols), (rows, cols)))
    return levels


def pool_level(features: torch.Tensor, kernel) -> torch.Tensor:
    """Average-pools every crop's n x n token grid with kernel = stride; tokens stay in raster order of the pooled grid.

    features: (crops, n*n, D) -> (crops, (n/kr)*(n/kc), D). Pooling runs after the projector, in LLM embedding space.
    """
    if features.dim() != 3:
        raise ValueError(f"pool_level: features must be (crops, n*n, D), got shape {tuple(features.shape)}")
    crops, tokens, dim = features.shape
    grid = math.isqrt(tokens)
    kernel_rows, kernel_cols = kernel
    if grid * grid != tokens or grid % kernel_rows or grid % kernel_cols:
        raise ValueError(
            f"pool_level: {tokens} tokens per crop is not a square grid divisible by the kernel {tuple(kernel)}"
        )
    if (kernel_rows, kernel_cols) == (1, 1):
        return features
    # (crops, n*n, D) -> (crops, D, n, n) -> (crops, D, n/kr, n/kc) -> (crops, tokens, D)
    grid_map = features.reshape(crops, grid, grid, dim).permute(0, 3, 1, 2)
    pooled = F.avg_pool2d(grid_map, kernel_size=(kernel_rows, kernel_cols), stride=(kernel_rows, kernel_cols))
    return pooled.flatten(2).transpose(1, 2)


def unpadded_extent_at_level(image_size, tile_grid, level_grid, compat: bool = True) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) bounds of the stitched token grid that hold the image, not its aspect padding.

    tile_grid: (rows, cols) of tiles; level_grid: (h, w) tokens per tile. The stitched grid is (rows*h, cols*w).

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
        return unpadded_extent(image_size, rows * h, cols * w)
    top, bottom, _, _ = unpadded_extent(image_size, rows * h, cols * h)
    _, _, left, right = unpadded_extent(image_size, rows * w, cols * w)
    return top, bottom, left, right


def merge_at_granularity(
    crop_features: torch.Tensor,
    image_size,
    grid_pinpoints,
    tile_size: int,
    level_grid,
    image_newline: torch.Tensor,
    compat: bool = True,
) -> torch.Tensor:
    """One image's pooled crops -> its visual-token sequence (LLaVA-NeXT `spatial_unpad` at one granularity).

    crop_features: (crops, g, D), base (whole-image) crop first, then the tiles in raster order; every crop at the
    same granularity g = h*w with `level_grid` = (h, w). image_size: (height, width) of the original image;
    grid_pinpoints in (height, width) order. Returns (g + H_u * (W_u + 1), D): the base crop flat, then the stitched
    and unpadded tile grid with `image_newline` appended to every row. A single crop (no tiles) gives its g tokens
    and one newline, as Hugging Face's `pack_image_features` does.
    """
    if crop_features.dim() != 3:
        raise ValueError(f"merge_at_granularity: crop_features must be (crops, g, D), got {tuple(crop_features.shape)}")
    _, tokens, dim = crop_features.shape
    h, w = level_grid
    if h * w != tokens:
        raise ValueError(f"merge_at_granularity: level_grid {tuple(level_grid)} does not hold {tokens} tokens per crop")
    if image_newline.shape != (dim,):
        raise ValueError(
            f"merge_at_granularity: image_newline must have shape ({dim},), got {tuple(image_newline.shape)}"
        )
    return pack_crops(
        crop_features, image_size, grid_pinpoints, tile_size, image_newline, level_grid,
        extent=lambda size, tiles, grid: unpadded_extent_at_level(size, tiles, grid, compat),
    )


def count_tokens_at_granularity(
    image_size, grid_pinpoints, tile_size: int, grid: int, level_index: int, compat: bool = True
) -> int:
    """Visual tokens of one image at pyramid level `level_index` (0 = coarsest), known before the forward pass.

    Equals `len(merge_at_granularity(...))` for the same image. `grid_pinpoints=None` means a single crop (no tiles).
    """
    levels = granularity_levels(grid)
    if not 0 <= level_index < len(levels):
        raise ValueError(f"count_tokens_at_granularity: level_index {level_index} outside 0..{len(levels) - 1}")
    tokens, _, level_grid = levels[level_index]
    if grid_pinpoints is None:
        return tokens + 1
    tile_grid = tile_grid_shape(image_size, grid_pinpoints, tile_size)
    top, bottom, left, right = unpadded_extent_at_level(image_size, tile_grid, level_grid, compat)
    return tokens + (bottom - top) * (right - left + 1)


# ---------------------------------------------------------------------------------------------------------------------
# Granularity router
# ---------------------------------------------------------------------------------------------------------------------


def select_instruction_tokens(input_ids, image_token_id: int, attention_mask=None, labels=None, ignore_index=-100):
    """Which prompt tokens the router's text filter sees, for one sample (all arguments (L,)).

    Returns (keep (L',) positions of input_ids that are not image placeholders, valid (L',) bool mask). Embed
    `input_ids[keep]` with the LLM's `embed_tokens` (no context) and pass them with `valid` to the filter.
    Inference (labels None): every attended prompt token is valid. Training (labels given): only attended tokens with
    label == ignore_index (system prompt, user turns, role tokens); answers are excluded so the router never sees them.
    Masked tokens stay in the sequence (as in the release): they are the filter's fill when fewer than k are valid.
    """
    if input_ids.dim() != 1:
        raise ValueError(f"select_instruction_tokens: input_ids must be one sample (L,), got {tuple(input_ids.shape)}")
    valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    if labels is not None:
        valid = valid & (labels == ignore_index)
    keep = (input_ids != image_token_id).nonzero().squeeze(1)
    return keep, valid[keep]


def filter_instruction_tokens(
    base_visual: torch.Tensor, text_embeds: torch.Tensor, text_mask=None, top_k: int = DEFAULT_TOP_K
) -> torch.Tensor:
    """The k instruction tokens most similar to the image (no parameters): (n*n, D), (L, D), (L,) bool -> (k, D).

    Score of a text token = mean over the base crop's visual tokens of their cosine similarity with it (masked tokens
    score -inf). Tokens come in score order. With fewer than k valid tokens the rest are the masked tokens (in position
    order: a stable sort) and, when L < k, zero rows.
    """
    if base_visual.dim() != 2 or text_embeds.dim() != 2 or base_visual.shape[1] != text_embeds.shape[1]:
        raise ValueError(
            "filter_instruction_tokens: base_visual must be (n*n, D) and text_embeds (L, D) with the same D, got "
            f"{tuple(base_visual.shape)} and {tuple(text_embeds.shape)}"
        )
    length = text_embeds.shape[0]
    if text_mask is not None and text_mask.shape != (length,):
        raise ValueError(
            f"filter_instruction_tokens: text_mask must have shape ({length},), got {tuple(text_mask.shape)}"
        )
    # Cosine similarity as F.cosine_similarity (each norm clamped at 1e-8) without its (n*n, L, D) broadcast; scores in
    # float32 so that the ranking does not depend on bf16 rounding of a mean over 576 values.
    visual = base_visual.float()
    text = text_embeds.float()
    visual = visual / visual.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    text = text / text.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    similarity = visual @ text.T  # (n*n, L)
    if text_mask is not None:
        similarity = similarity.masked_fill(~text_mask.bool()[None], float("-inf"))
    scores = similarity.mean(dim=0)  # (L,)
    order = torch.sort(scores, descending=True, stable=True).indices[:top_k]
    selected = text_embeds.new_zeros(top_k, text_embeds.shape[1])
    selected[: order.numel()] = text_embeds[order]
    return selected


class AvgRouter(nn.Module):
    """Visual granularity router: one decision per image from its crops' pyramid and its instruction.

    Per crop c the sequence X_c = [P36(V_c); P72(V_c); P144(V_c); P288(V_c); V_c; T] (1148 tokens for n = 24, k = 32)
    goes through one Transformer layer (`merger`), an MLP gives per-token logits l_{c,t}, the learned `voter` sums them
    z_c = sum_t v_t l_{c,t}, and z = LayerNorm(mean_c z_c).
    Submodule names match the released checkpoint keys under `model.router.`.

    compat=True (released): the (crops, 1148, D) tensor enters the batch_first=False layer as (sequence=crops,
    batch=1148), so self-attention runs ACROSS CROPS at each token position. compat=False: attention over each crop's
    1148 tokens, the token-level fusion the paper describes.
    """

    def __init__(
        self, hidden_size: int, level_tokens=DEFAULT_LEVEL_TOKENS, top_k: int = DEFAULT_TOP_K, compat: bool = True
    ):
        super().__init__()
        self.level_tokens = tuple(int(t) for t in level_tokens)
        self.top_k = top_k
        self.compat = compat
        num_levels = len(self.level_tokens)
        # The released layer: 8 heads, FFN width D, PyTorch defaults (dropout 0.1, ReLU, post-LN, eps 1e-5,
        # batch_first=False).
        self.merger = nn.TransformerEncoderLayer(d_model=hidden_size, nhead=8, dim_feedforward=hidden_size)
        self.router = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.GELU(), nn.Linear(hidden_size, num_levels))
        self.voter = nn.Parameter(torch.empty(sum(self.level_tokens) + top_k, 1))  # (sequence length, 1)
        self.norm = nn.LayerNorm(num_levels)  # not in the paper; in the release
        self.reset_parameters()

    def reset_parameters(self):
        for layer in (self.merger.self_attn, self.merger.linear1, self.merger.linear2, self.merger.norm1,
                      self.merger.norm2, self.router[0], self.router[2], self.norm):  # PyTorch's own defaults
            getattr(layer, "_reset_parameters", getattr(layer, "reset_parameters", None))()
        nn.init.kaiming_normal_(self.router[0].weight)
        nn.init.kaiming_normal_(self.router[2].weight)
        nn.init.normal_(self.voter)

    def crop_votes(self, crop_features: torch.Tensor, text_embeds: torch.Tensor, text_mask=None) -> torch.Tensor:
        """Per-crop voted logits z_c before the crop average: (crops, n*n, D) projected unpooled -> (crops, levels)."""
        if crop_features.dim() != 3:
            raise ValueError(f"AvgRouter: crop_features must be (crops, n*n, D), got {tuple(crop_features.shape)}")
        features = crop_features.to(self.voter.dtype)
        levels = granularity_levels(math.isqrt(features.shape[1]))
        if tuple(tokens for tokens, _, _ in levels) != self.level_tokens or levels[-1][0] != features.shape[1]:
            raise ValueError(
                f"AvgRouter: crops of {features.shape[1]} tokens give the pyramid {[t for t, _, _ in levels]}, "
                f"but this router was built for {list(self.level_tokens)}"
            )
        text = filter_instruction_tokens(features[0], text_embeds.to(features), text_mask, self.top_k)  # (k, D)
        crops = features.shape[0]
        sequence = torch.cat(
            [pool_level(features, kernel) for _, kernel, _ in levels] + [text.expand(crops, -1, -1)], dim=1
        )  # (crops, 1148, D)
        if self.compat:
            fused = self.merger(sequence)  # read as (sequence=crops, batch=1148, D): attention across crops
        else:
            fused = self.merger(sequence.transpose(0, 1)).transpose(0, 1)  # attention across each crop's tokens
        token_logits = self.router(fused)  # (crops, 1148, levels)
        return torch.einsum("ctl,t->cl", token_logits, self.voter[:, 0])

    def forward(self, crop_features: torch.Tensor, text_embeds: torch.Tensor, text_mask=None) -> torch.Tensor:
        """One image: crops (crops, n*n, D), its instruction (L, D) + valid mask (L,) -> logits (levels,)."""
        return self.norm(self.crop_votes(crop_features, text_embeds, text_mask).mean(dim=0))

    def route_images(self, crop_features, text_embeds, text_masks=None) -> torch.Tensor:
        """Several images -> (images, levels) logits, one decision per image.

        crop_features, text_embeds, text_masks: lists with one entry per image. Images of the same sample pass that
        sample's instruction (the release indexed the text by image index, right only for one image per sample).
        """
        if text_masks is None:
            text_masks = [None] * len(crop_features)
        if not len(crop_features) == len(text_embeds) == len(text_masks):
            raise ValueError(
                f"AvgRouter.route_images: got {len(crop_features)} images, {len(text_embeds)} instructions and "
                f"{len(text_masks)} masks; pass one instruction per image"
            )
        return torch.stack([self(c, t, m) for c, t, m in zip(crop_features, text_embeds, text_masks)])


def choose_granularity(
    logits: torch.Tensor,
    levels,
    mode: str = "argmax",
    max_visual_tokens=None,
    granularity_bias: float = 0.0,
    token_counts=None,
    generator=None,
):
    """Picks one granularity per image from router logits.

    logits: (levels,) for one image or (images, levels). levels: tokens per crop of each level (e.g. [36, ..., 576]).
    token_counts: each level's total visual tokens for the image ((levels,) or (images, levels); e.g. from
    `count_tokens_at_granularity`); needed for `max_visual_tokens` and `granularity_bias`.
    The score of a level is log_softmax(logits) - granularity_bias * token_count / 1000: the bias is a cost in nats
    per 1000 visual tokens (0 = the router's own choice). `max_visual_tokens` keeps only levels whose token count fits.
    mode "argmax" takes the best score (the release at bias 0, no budget); "sample" draws from softmax(score).

    Returns (index, granularity, probs): chosen level index and its tokens per crop (ints for one image, LongTensors
    for several), and the router's probabilities softmax(logits).
    """
    if mode not in ("argmax", "sample"):
        raise ValueError(f"choose_granularity: mode must be 'argmax' or 'sample', got {mode!r}")
    single = logits.dim() == 1
    scores = logits.float()[None] if single else logits.float()  # (images, levels)
    if scores.dim() != 2 or scores.shape[1] != len(levels):
        raise ValueError(f"choose_granularity: logits {tuple(logits.shape)} do not match {len(levels)} levels")
    probs = scores.softmax(dim=-1)
    scores = scores.log_softmax(dim=-1)
    if (max_visual_tokens is not None or granularity_bias) and token_counts is None:
        raise ValueError("choose_granularity: max_visual_tokens and granularity_bias need token_counts per level")
    if token_counts is not None:
        counts = torch.as_tensor(token_counts, dtype=torch.float32, device=scores.device).reshape(-1, len(levels))
        counts = counts.expand_as(scores)
        scores = scores - granularity_bias * counts / 1000
        if max_visual_tokens is not None:
            fits = counts <= max_visual_tokens
            if not fits.any(dim=-1).all():
                smallest = counts.min(dim=-1).values.max().item()
                raise ValueError(
                    f"choose_granularity: max_visual_tokens={max_visual_tokens} is below the coarsest level of an "
                    f"image ({int(smallest)} tokens)"
                )
            scores = scores.masked_fill(~fits, float("-inf"))
    if mode == "argmax":
        index = scores.argmax(dim=-1)
    else:
        index = torch.multinomial(scores.softmax(dim=-1), 1, generator=generator).squeeze(1)
    granularity = torch.as_tensor(list(levels), device=index.device)[index]
    if single:
        return int(index[0]), int(granularity[0]), probs[0]
    return index, granularity, probs


# ---------------------------------------------------------------------------------------------------------------------
# The pipeline: settings, processor step, model module
# ---------------------------------------------------------------------------------------------------------------------

AUTO = "auto"


@dataclass
class AvgSettings:
    """`method_settings` of method "avg" (the levels themselves follow from the tower's patch grid).

    granularity: the default knob, "auto" (the router decides per image) or a fixed number of tokens per crop.
    compat: released behaviour (unpad quirk at the 2:1 levels, router attention across crops); False = corrected.
    use_router: False for checkpoints without a router (AVG-LLaVA stage 3): only fixed granularities then.
    top_k: instruction tokens kept by the router's text filter (released `filtered_text_num`).
    max_visual_tokens: auto mode only: the most probable level whose visual tokens (per image) fit this budget.
    granularity_bias: auto mode only: a cost in nats per 1000 visual tokens subtracted from the router's
        log-probabilities; > 0 trades accuracy for speed without retraining.
    """

    granularity: str | int = AUTO
    compat: bool = True
    use_router: bool = True
    top_k: int = DEFAULT_TOP_K
    max_visual_tokens: int | None = None
    granularity_bias: float = 0.0


def resolve_granularities(granularity, levels, n_images: int, use_router: bool = True) -> list[int]:
    """User knob -> one value per image: tokens per crop of a level, or 0 for "auto". Clear errors otherwise."""
    values = list(granularity) if isinstance(granularity, (list, tuple)) else [granularity] * n_images
    if len(values) != n_images:
        raise ValueError(f"got {len(values)} granularities for {n_images} images")
    resolved = []
    for value in values:
        if value == AUTO or value == 0:
            if not use_router:
                raise ValueError("granularity='auto' needs a router, and this model has none (use_router=False): "
                                 f"pick a fixed granularity from {list(levels)}")
            resolved.append(0)
            continue
        try:
            tokens = int(value)
        except (TypeError, ValueError):
            tokens = None
        if tokens not in levels:
            raise ValueError(f"granularity {value!r} is not one of this model's levels {list(levels)} (tokens per "
                             "crop) or 'auto'")
        resolved.append(tokens)
    return resolved


def avg_step(image_processor, images, granularity=None) -> dict:
    """Processor step: AnyRes preprocessing; each image's placeholder count at its granularity (1 when "auto":
    the model expands it to the router's choice, so no padding is left in the sequence)."""
    settings = parse_method_settings(AvgSettings, image_processor)
    out = anyres_step(image_processor, images)
    tile = image_processor.crop_size.height
    grid = tile // image_processor.patch_size
    levels = [tokens for tokens, _, _ in granularity_levels(grid)]
    chosen = resolve_granularities(
        settings.granularity if granularity is None else granularity, levels, len(images), settings.use_router
    )
    pinpoints = image_processor.image_grid_pinpoints
    out["image_token_counts"] = [
        1 if g == 0 else count_tokens_at_granularity(size, pinpoints, tile, grid, levels.index(g), settings.compat)
        for g, size in zip(chosen, out["image_sizes"].tolist())
    ]
    out["image_granularity"] = torch.tensor(chosen, dtype=torch.long)
    return out


def images_to_samples(input_ids: torch.Tensor, image_token_id: int, placeholder_counts) -> list[int]:
    """Which prompt (row of input_ids) each image belongs to, from how many placeholders each image took."""
    per_row = (input_ids == image_token_id).sum(dim=1).tolist()
    owners, row = [], 0
    for count in placeholder_counts:
        while row < len(per_row) and per_row[row] == 0:
            row += 1
        if row == len(per_row) or per_row[row] < count:
            raise ValueError("the image placeholders in input_ids do not match the images: build inputs with "
                             "MultiGranProcessor")
        owners.append(row)
        per_row[row] -= count
    return owners


class AvgPipeline(AnyResPipeline):
    """AVG-LLaVA: AnyRes crops -> projector -> pyramid at one granularity per image -> merge; the router picks the
    granularity from the image and its instruction when asked for "auto"."""

    input_names = ("image_granularity", "max_visual_tokens", "granularity_bias")

    def __init__(self, config):
        self.avg = parse_method_settings(AvgSettings, config)
        config_for_anyres = copy.copy(config)
        config_for_anyres.method_settings = {}
        super().__init__(config_for_anyres)
        self.image_token_id = config.image_token_id
        self.levels = granularity_levels(self.grid)
        self.level_tokens = [tokens for tokens, _, _ in self.levels]
        resolve_granularities(self.avg.granularity, self.level_tokens, 1, self.avg.use_router)  # validate the default
        if self.avg.use_router:
            self.router = AvgRouter(config.text_config.hidden_size, self.level_tokens, self.avg.top_k, self.avg.compat)

    def count_at(self, image_size, granularity: int) -> int:
        index = self.level_tokens.index(granularity)
        return count_tokens_at_granularity(
            image_size, self.grid_pinpoints, self.tile_size, self.grid, index, self.avg.compat
        )

    def requested(self, image_granularity, n_images) -> list[int]:
        if image_granularity is None:
            return resolve_granularities(self.avg.granularity, self.level_tokens, n_images, self.avg.use_router)
        values = image_granularity.tolist() if torch.is_tensor(image_granularity) else image_granularity
        return resolve_granularities(values, self.level_tokens, n_images, self.avg.use_router)

    def placeholder_counts(self, image_sizes, image_granularity=None, **unused) -> list[int]:
        sizes = image_sizes.tolist()
        return [1 if g == 0 else self.count_at(s, g) for g, s in zip(self.requested(image_granularity, len(sizes)), sizes)]

    def instruction(self, row: int, input_ids, inputs_embeds, attention_mask, labels):
        """One prompt's instruction embeddings (image placeholders removed) and the router's valid-token mask."""
        keep, valid = select_instruction_tokens(
            input_ids[row], self.image_token_id,
            None if attention_mask is None else attention_mask[row], None if labels is None else labels[row],
        )
        return inputs_embeds[row, keep], valid

    def route(self, crops, owners, input_ids, inputs_embeds, attention_mask=None, labels=None) -> torch.Tensor:
        """Router logits (images, levels) for the given images' crops; each image reads its own prompt's instruction."""
        texts, masks = zip(*(self.instruction(r, input_ids, inputs_embeds, attention_mask, labels) for r in owners))
        return self.router.route_images(list(crops), list(texts), list(masks))

    def merge(self, crops: torch.Tensor, image_size, granularity: int) -> torch.Tensor:
        _, kernel, level_grid = self.levels[self.level_tokens.index(granularity)]
        return merge_at_granularity(
            pool_level(crops, kernel), image_size, self.grid_pinpoints, self.tile_size, level_grid,
            self.image_newline, self.avg.compat,
        )

    def forward(self, vision_tower, pixel_values, image_sizes, image_granularity=None, max_visual_tokens=None,
                granularity_bias=None, input_ids=None, inputs_embeds=None, attention_mask=None, labels=None,
                **unused) -> list[torch.Tensor]:
        crops = self.encode_crops(vision_tower, pixel_values, image_sizes)
        sizes = image_sizes.tolist()
        requested = self.requested(image_granularity, len(crops))
        chosen, probabilities = list(requested), [None] * len(crops)
        auto = [i for i, g in enumerate(requested) if g == 0]
        if auto:
            if input_ids is None:
                raise ValueError("granularity='auto' needs input_ids: the router reads the instruction")
            owners = images_to_samples(input_ids, self.image_token_id, self.placeholder_counts(image_sizes, requested))
            logits = self.route([crops[i] for i in auto], [owners[i] for i in auto], input_ids, inputs_embeds,
                                attention_mask, labels)
            budget = self.avg.max_visual_tokens if max_visual_tokens is None else max_visual_tokens
            bias = self.avg.granularity_bias if granularity_bias is None else granularity_bias
            counts = [[self.count_at(sizes[i], g) for g in self.level_tokens] for i in auto]
            _, picked, probs = choose_granularity(logits, self.level_tokens, max_visual_tokens=budget,
                                                  granularity_bias=bias, token_counts=counts)
            for slot, i in enumerate(auto):
                chosen[i], probabilities[i] = int(picked[slot]), probs[slot].tolist()
        features = [self.merge(c, s, g) for c, s, g in zip(crops, sizes, chosen)]
        self.last_report = [
            {"granularity": g, "mode": "fixed" if r else "auto", "router_probabilities": p, "visual_tokens": f.shape[0]}
            for g, r, p, f in zip(chosen, requested, probabilities, features)
        ]
        return features
