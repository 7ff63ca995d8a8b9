"""Adaptive granularity (AVG-LLaVA's granularity scaler + router) as one layer over any pipeline's grids of visual
tokens.

Nothing in the idea is specific to AnyRes: a pipeline hands over, per image, its (crops, n*n, D) grids of projected
tokens (AnyRes: base view + tiles; MG-LLaVA: the fused grid; LLaVA-UHD v2: the overview + every slice's compressed
grid), the layer pools them to one level of a pyramid (the scaler), lets the router pick that level per image from
the grids and the instruction ("auto"), and the pipeline assembles the pooled grids into its token sequence (unpad +
newlines, object tokens, separators). Method "avg" is AnyRes + this layer; "mg" and "uhd" carry it when their
`method_settings.adaptive_granularity` is set.

Components: the pyramid (`granularity_levels`, `pool_level`), the text filter and the router (`AvgRouter`, whose
keys match the AVG-LLaVA release under `model.router.`), the choice rule (`choose_granularity`), the knob
(`GranularitySettings`, `resolve_granularities`) and the layer itself (`AdaptiveGranularity`).
Facts and released-code quirks: shared/spec/avg-llava.md (reference: DeepLearnXMU/AVG-LLaVA).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# Released AVG-LLaVA config (zhibinlan/AVG-LLaVA): `vis_token_granularity` and `filtered_text_num`.
# The list order fixes the router's class index (0 = coarsest).
DEFAULT_LEVEL_TOKENS = (36, 72, 144, 288, 576)
DEFAULT_TOP_K = 32
# The default pyramid of an n x n grid, coarsest first: n^2/16, n^2/8, n^2/4, n^2/2, n^2 tokens per crop, which the
# release pools with kernels (rows, cols) 4x4, 2x4, 2x2, 1x2, 1x1 (alternating 1x2 and 2x1 average pools compose to
# exactly these: the paper's description).
DEFAULT_LEVEL_DIVISORS = (16, 8, 4, 2, 1)


# ---------------------------------------------------------------------------------------------------------------------
# Granularity scaler
# ---------------------------------------------------------------------------------------------------------------------


def level_kernel(grid: int, tokens: int) -> tuple[int, int]:
    """The release's pooling kernel (rows, cols) for `tokens` per crop of an n x n grid (`matryoshka_vis_token_process`,
    release `llava/model/llava_arch.py:216-234`): 1x2 for n^2/2 tokens, 2x4 for n^2/8, else the square kernel
    int(sqrt(n^2 / tokens))."""
    patches = grid * grid
    if tokens == patches / 2:
        return 1, 2
    if tokens == patches / 8:
        return 2, 4
    side = int(math.sqrt(patches / tokens))
    return side, side


def _pooled_grid(grid: int, tokens: int):
    """(kernel, pooled grid) when the release's kernel pools the n x n grid to exactly `tokens`, else None."""
    kernel_rows, kernel_cols = level_kernel(grid, tokens)
    if grid % kernel_rows or grid % kernel_cols or (grid // kernel_rows) * (grid // kernel_cols) != tokens:
        return None
    return (kernel_rows, kernel_cols), (grid // kernel_rows, grid // kernel_cols)


def granularity_levels(grid: int, level_tokens=None) -> list[tuple[int, tuple[int, int], tuple[int, int]]]:
    """The levels of an n x n patch grid: [(tokens, kernel (rows, cols), pooled grid (rows, cols))], in list order.

    level_tokens: tokens per crop of each level, in the router's class order (the release's `vis_token_granularity`,
    any list: `multimodal_router/builder.py:328-336`); None = the five-level pyramid, n = 24 (CLIP-L/336) giving
    36/72/144/288/576 tokens on 6x6, 12x6, 12x12, 24x12, 24x24 grids. Each level is pooled with the release's kernel
    (`level_kernel`); a level that kernel does not produce exactly (the release would pool it to another count, which
    its router cannot hold) is refused: the levels of a grid are n^2/2, n^2/8 and (n/k)^2 for the divisors k of n.
    """
    if level_tokens is None:
        if not isinstance(grid, int) or grid <= 0 or grid % 4:
            raise ValueError(f"granularity_levels: the patch grid side must be a positive multiple of 4, got {grid!r}")
        level_tokens = [grid * grid // divisor for divisor in DEFAULT_LEVEL_DIVISORS]
    if not isinstance(grid, int) or isinstance(grid, bool) or grid <= 0:
        raise ValueError(f"granularity_levels: the patch grid side must be a positive integer, got {grid!r}")
    level_tokens = list(level_tokens)
    if not level_tokens:
        raise ValueError("granularity levels: the list is empty; give at least one level (tokens per crop)")
    levels = []
    for tokens in level_tokens:
        geometry = None
        if isinstance(tokens, int) and not isinstance(tokens, bool) and 0 < tokens <= grid * grid:
            geometry = _pooled_grid(grid, tokens)
        if geometry is None:
            possible = [t for t in range(1, grid * grid + 1) if _pooled_grid(grid, t) is not None]
            raise ValueError(
                f"granularity level {tokens!r} cannot be pooled from a {grid}x{grid} patch grid by the release's rule "
                f"(llava_arch.py:216-234); the levels of this grid are {possible} tokens per crop"
            )
        levels.append((tokens, *geometry))
    if len(set(level_tokens)) != len(level_tokens):
        raise ValueError(f"granularity levels {level_tokens} repeat a level: each level must appear once")
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



# ---------------------------------------------------------------------------------------------------------------------
# Granularity router
# ---------------------------------------------------------------------------------------------------------------------


def select_instruction_tokens(input_ids, image_token_id: int, attention_mask=None, labels=None, ignore_index=-100,
                              max_length: int | None = None):
    """Which prompt tokens the router's text filter sees, for one sample (all arguments (L,)).

    Returns (keep (L',) positions of input_ids that are not image placeholders, valid (L',) bool mask). Embed
    `input_ids[keep]` with the LLM's `embed_tokens` (no context) and pass them with `valid` to the filter.
    Inference (labels None): the attended prompt tokens, all valid; a batch's padding is left out of the sequence, so
    a prompt routes as it does alone (the release infers one prompt at a time, unpadded). Training (labels given):
    only attended tokens with label == ignore_index (system prompt, user turns, role tokens) are valid; answer tokens
    never outscore an instruction token. Masked tokens (answers, padding) stay in the sequence, as in the release's
    training: when fewer than k tokens are valid, the released filter fills its k slots with them (see
    `filter_instruction_tokens`), so in compat mode a short instruction lets the router see answer embeddings.
    max_length: keep only the first max_length tokens (the release cuts the router's text to the tokenizer's
    model_max_length, `llava/model/llava_arch.py:199-202`).
    """
    if input_ids.dim() != 1:
        raise ValueError(f"select_instruction_tokens: input_ids must be one sample (L,), got {tuple(input_ids.shape)}")
    valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    if labels is not None:
        valid = valid & (labels == ignore_index)
    text = input_ids != image_token_id
    if labels is None and attention_mask is not None:
        text = text & attention_mask.bool()  # inference: a batch's padding is not part of the prompt
    keep = text.nonzero().squeeze(1)
    if max_length is not None:
        keep = keep[:max_length]
    return keep, valid[keep]


def filter_instruction_tokens(
    base_visual: torch.Tensor, text_embeds: torch.Tensor, text_mask=None, top_k: int = DEFAULT_TOP_K,
    fill_with_masked: bool = True,
) -> torch.Tensor:
    """The k instruction tokens most similar to the image (no parameters): (n*n, D), (L, D), (L,) bool -> (k, D).

    Score of a text token = mean over the base crop's visual tokens of their cosine similarity with it (masked tokens
    score -inf). Tokens come in score order, ties in position order (a stable sort).
    Fewer than k valid tokens: fill_with_masked=True (the release, `multimodal_router/builder.py:291-311`) fills the
    next slots with the masked tokens in position order (in training these are answer tokens and padding) and, when
    L < k, zero rows; False (corrected) fills every slot past the valid tokens with zero rows, so the router never
    sees a masked token.

    Tie order: the release sorts with `torch.sort(descending=True)` (`builder.py:304`), whose CUDA kernel is a stable
    merge/radix sort above 32 elements but a bitonic network (no defined order among ties) for 32 or fewer. The
    stable order here is therefore the release's on CUDA whenever L > 32 (any prompt with a system message). For
    L <= 32 every token is kept anyway (k = 32): only the order of tied tokens (repeated tokens, masked ones) may
    differ from a given CUDA run, and with it the voter weight each of them gets.
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
    chosen = text_embeds[order]  # (min(L, k), D)
    if not fill_with_masked and text_mask is not None:
        chosen = torch.where(text_mask.bool()[order, None], chosen, 0.0)  # the masked fill becomes zero rows
    selected = text_embeds.new_zeros(top_k, text_embeds.shape[1])
    selected[: order.numel()] = chosen
    return selected


class AvgRouter(nn.Module):
    """Visual granularity router: one decision per image from its crops' pyramid and its instruction.

    Per crop c the sequence X_c = [P36(V_c); P72(V_c); P144(V_c); P288(V_c); V_c; T] (1148 tokens for n = 24, k = 32)
    goes through one Transformer layer (`merger`), an MLP gives per-token logits l_{c,t}, the learned `voter` sums them
    z_c = sum_t v_t l_{c,t}, and z = LayerNorm(mean_c z_c).
    Submodule names match the released checkpoint keys under `model.router.`.

    compat=True (released): the (crops, 1148, D) tensor enters the batch_first=False layer as (sequence=crops,
    batch=1148), so self-attention runs ACROSS CROPS at each token position, and a short instruction's free text slots
    hold masked tokens (answers in training). compat=False: attention over each crop's 1148 tokens, the token-level
    fusion the paper describes, and free text slots hold zero rows.
    level_tokens: any list of levels (the release's `vis_token_granularity`, `multimodal_router/builder.py:328-336`):
    one logit per level, the voter over sum(level_tokens) + top_k tokens.
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
        grid = math.isqrt(features.shape[1])
        try:
            if grid * grid != features.shape[1]:
                raise ValueError(f"{features.shape[1]} tokens are not a square patch grid")
            levels = granularity_levels(grid, self.level_tokens)
        except ValueError as error:
            raise ValueError(
                f"AvgRouter: crops of {features.shape[1]} tokens cannot give the levels {list(self.level_tokens)} "
                f"this router was built for ({error})"
            ) from None
        text = filter_instruction_tokens(
            features[0], text_embeds.to(features), text_mask, self.top_k, fill_with_masked=self.compat
        )  # (k, D)
        crops = features.shape[0]
        sequence = torch.cat(
            [pool_level(features, kernel) for _, kernel, _ in levels] + [text.expand(crops, -1, -1)], dim=1
        )  # (crops, sum(levels) + k, D)
        if self.compat:
            fused = self.merger(sequence)  # read as (sequence=crops, batch=1148, D): attention across crops
        else:
            fused = self.merger(sequence.transpose(0, 1)).transpose(0, 1)  # attention across each crop's tokens
        token_logits = self.router(fused)  # (crops, sum(levels) + k, levels)
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
    if isinstance(granularity_bias, bool) or not isinstance(granularity_bias, (int, float)) or not math.isfinite(granularity_bias):
        raise ValueError(f"granularity_bias must be a finite number (nats per 1000 visual tokens), got {granularity_bias!r}")
    if max_visual_tokens is not None and (isinstance(max_visual_tokens, bool) or not isinstance(max_visual_tokens, int)
                                          or max_visual_tokens < 1):
        raise ValueError(f"max_visual_tokens must be a positive int (visual tokens per image), got {max_visual_tokens!r}")
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
# The knob
# ---------------------------------------------------------------------------------------------------------------------

AUTO = "auto"


def resolve_granularities(granularity, levels, n_images: int, use_router: bool = True) -> list[int]:
    """User knob -> one value per image: tokens per crop of a level, or 0 for "auto". Clear errors otherwise."""
    values = list(granularity) if isinstance(granularity, (list, tuple)) else [granularity] * n_images
    if len(values) != n_images:
        raise ValueError(f"granularity: got {len(values)} values for {n_images} image(s) (one per image, or one for all)")
    resolved = []
    for value in values:
        if value == AUTO:
            if not use_router:
                raise ValueError("granularity='auto' needs a router, and this model has none (use_router=False): "
                                 f"pick a fixed granularity from {list(levels)}")
            resolved.append(0)
            continue
        try:  # an int, or its decimal string; never a bool or a fractional number
            tokens = None if isinstance(value, bool) or value != value or int(value) != float(value) else int(value)
        except (TypeError, ValueError, OverflowError):
            tokens = None
        if tokens not in levels:
            raise ValueError(f"granularity {value!r} is not one of this model's levels {list(levels)} (tokens per "
                             "crop) or 'auto'")
        resolved.append(tokens)
    return resolved



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



# LAYER
# ---------------------------------------------------------------------------------------------------------------------
# The layer
# ---------------------------------------------------------------------------------------------------------------------


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class GranularitySettings:
    """Settings of the adaptive-granularity layer. Method "avg" reads them from its own (flat) `method_settings`
    (`AvgSettings`); methods "mg" and "uhd" from `method_settings.adaptive_granularity`, a dict of these fields
    (absent or null = no layer).

    granularity: the default knob, "auto" (the router decides per image) or a fixed level (tokens per grid).
    use_router: False for a model trained at every level but without a router yet (AVG-LLaVA's stage 3): fixed
        levels only.
    top_k: instruction tokens kept by the router's text filter (released `filtered_text_num`).
    max_visual_tokens: auto mode only: the most probable level whose visual tokens (per image) fit this budget.
    granularity_bias: auto mode only: a cost in nats per 1000 visual tokens subtracted from the router's
        log-probabilities; > 0 trades accuracy for speed without retraining.
    levels: tokens per grid of each level, in the router's class order (released `vis_token_granularity`); None =
        the five-level pyramid n^2/16 ... n^2 of the pipeline's n x n grid.
    router_compat: the released router (attention across crops, masked tokens in free text slots; AVG-LLaVA's
        `compat`). The composed models have no released weights, so they default to the corrected router.
    """

    granularity: str | int = AUTO
    use_router: bool = True
    top_k: int = DEFAULT_TOP_K
    max_visual_tokens: int | None = None
    granularity_bias: float = 0.0
    levels: list[int] | None = None
    router_compat: bool = False

    def __post_init__(self):
        for name in ("use_router", "router_compat"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"method_settings.{name} must be true or false, got {getattr(self, name)!r}")
        if self.levels is not None:
            if not isinstance(self.levels, (list, tuple)):
                raise ValueError(f"method_settings.levels must be a list of tokens per grid, got {self.levels!r}")
            self.levels = list(self.levels)
        if not _is_int(self.top_k) or self.top_k < 1:
            raise ValueError(f"method_settings.top_k must be a positive integer, got {self.top_k!r}")
        if self.max_visual_tokens is not None and (not _is_int(self.max_visual_tokens) or self.max_visual_tokens < 1):
            raise ValueError("method_settings.max_visual_tokens must be a positive integer (visual tokens per image) "
                             f"or null, got {self.max_visual_tokens!r}")
        bias = self.granularity_bias
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not math.isfinite(bias):
            raise ValueError("method_settings.granularity_bias must be a finite number (nats per 1000 visual tokens), "
                             f"got {bias!r}")

    @classmethod
    def from_dict(cls, values, where: str) -> "GranularitySettings":
        """`method_settings.adaptive_granularity` of mg / uhd -> settings; `where` names it in errors."""
        if not isinstance(values, dict):
            raise ValueError(f"{where} must be a dict of {[f for f in cls.__dataclass_fields__]}, got {values!r}")
        unknown = sorted(set(values) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; known: {sorted(cls.__dataclass_fields__)}")
        try:
            return cls(**values)
        except ValueError as error:
            raise ValueError(f"{where}: {error}".replace("method_settings.", "")) from None

    def level_geometry(self, grid: int):
        """The levels for an n x n grid (see `granularity_levels`), checked for the router: the release's router
        needs its last level to be the largest (`builder.py:398-401` adds every level into a buffer the size of the
        last one)."""
        levels = granularity_levels(grid, self.levels)
        tokens = [t for t, _, _ in levels]
        if self.use_router and tokens[-1] != max(tokens):
            raise ValueError(f"method_settings.levels {tokens}: with a router the last level must be the largest (the "
                             "release's router fails otherwise, multimodal_router/builder.py:398-401)")
        return levels


def placeholders(requested, count) -> list[int]:
    """Image tokens each image takes in the prompt: its count at a fixed level, 1 in auto mode (0; the model expands
    that placeholder to the router's choice)."""
    return [1 if g == 0 else count(i, g) for i, g in enumerate(requested)]


class AdaptiveGranularity:
    """The scaler + router over a pipeline's grids: which level each image gets, and the pooling to it.

    A pipeline that carries the layer provides three things and the layer does the rest (`apply`):
      encode_grids(vision_tower, pixel_values, image_sizes, **inputs) -> (grids, context): per image its projected
          (crops, n*n, D) grids, the one the router compares the instruction with first (base view / overview);
      assemble(grids, context, granularities) -> per image its token sequence with every grid pooled to the image's
          level (`pool`; None = unpooled);
      token_counter(image_sizes, **inputs) -> count(i, granularity): image i's visual tokens at that level, known
          before the forward pass, so the processor's accounting is exact at every level.
    The router's weights belong to the pipeline (`pipeline.router`, built by `build_router`), so that checkpoints
    keep the release's `visual.router.*` keys; this object holds no weights.
    """

    input_names = ("image_granularity", "max_visual_tokens", "granularity_bias")

    def __init__(self, settings: GranularitySettings, grid: int, image_token_id: int):
        self.settings = settings
        self.levels = settings.level_geometry(grid)
        self.level_tokens = [tokens for tokens, _, _ in self.levels]
        self.image_token_id = image_token_id
        resolve_granularities(settings.granularity, self.level_tokens, 1, settings.use_router)  # validate the default

    def build_router(self, hidden_size: int) -> AvgRouter | None:
        if not self.settings.use_router:
            return None
        return AvgRouter(hidden_size, self.level_tokens, self.settings.top_k, self.settings.router_compat)

    def resolve(self, granularity, n_images: int) -> list[int]:
        """The processor's knob (None = the model's default) -> one value per image: a level, or 0 for "auto"."""
        value = self.settings.granularity if granularity is None else granularity
        return resolve_granularities(value, self.level_tokens, n_images, self.settings.use_router)

    def requested(self, image_granularity, n_images: int) -> list[int]:
        """The processor's `image_granularity` tensor (0 = "auto"; None = the model's default) -> per image."""
        if image_granularity is None:
            return self.resolve(None, n_images)
        values = image_granularity.tolist() if torch.is_tensor(image_granularity) else list(image_granularity)
        return self.resolve([AUTO if value == 0 else value for value in values], n_images)

    def step(self, granularity, n_images: int, count) -> dict:
        """The processor step's part: per image its placeholder count (1 in auto mode: the model expands it to the
        router's choice) and `image_granularity` (0 = auto)."""
        chosen = self.resolve(granularity, n_images)
        return {"image_token_counts": placeholders(chosen, count),
                "image_granularity": torch.tensor(chosen, dtype=torch.long)}

    def placeholder_counts(self, image_granularity, n_images: int, count) -> list[int]:
        return placeholders(self.requested(image_granularity, n_images), count)

    def pool(self, grids: torch.Tensor, granularity) -> tuple[torch.Tensor, tuple[int, int]]:
        """(crops, n*n, D) -> ((crops, g, D), the pooled grid (h, w)) at level `granularity` (tokens per grid)."""
        _, kernel, level_grid = self.levels[self.level_tokens.index(granularity)]
        return pool_level(grids, kernel), level_grid

    def instruction(self, row: int, input_ids, inputs_embeds, attention_mask, labels, max_length=None):
        """One prompt's instruction embeddings (image placeholders removed) and the router's valid-token mask."""
        keep, valid = select_instruction_tokens(
            input_ids[row], self.image_token_id,
            None if attention_mask is None else attention_mask[row], None if labels is None else labels[row],
            max_length=max_length,
        )
        return inputs_embeds[row, keep], valid

    def route(self, router, grids, owners, input_ids, inputs_embeds, attention_mask=None, labels=None,
              max_length=None) -> torch.Tensor:
        """Router logits (images, levels) for the given images' grids; each image reads its own prompt's instruction
        (its first `max_length` text tokens when given, as the release's training does)."""
        texts, masks = zip(*(self.instruction(r, input_ids, inputs_embeds, attention_mask, labels, max_length)
                             for r in owners))
        return router.route_images(list(grids), list(texts), list(masks))

    def choose(self, router, grids, requested, count, input_ids=None, inputs_embeds=None, attention_mask=None,
               labels=None, max_visual_tokens=None, granularity_bias=None):
        """Per image its level (the requested one, or the router's choice where 0 = auto) and the router's
        probabilities (None for fixed levels)."""
        chosen, probabilities = list(requested), [None] * len(grids)
        auto = [i for i, g in enumerate(requested) if g == 0]
        if not auto:
            return chosen, probabilities
        if input_ids is None or inputs_embeds is None:
            raise ValueError("granularity='auto' needs input_ids: the router reads the instruction")
        owners = images_to_samples(input_ids, self.image_token_id, placeholders(requested, count))
        logits = self.route(router, [grids[i] for i in auto], [owners[i] for i in auto], input_ids, inputs_embeds,
                            attention_mask, labels)
        budget = self.settings.max_visual_tokens if max_visual_tokens is None else max_visual_tokens
        bias = self.settings.granularity_bias if granularity_bias is None else granularity_bias
        counts = [[count(i, g) for g in self.level_tokens] for i in auto]
        _, picked, probs = choose_granularity(logits, self.level_tokens, max_visual_tokens=budget,
                                              granularity_bias=bias, token_counts=counts)
        for slot, i in enumerate(auto):
            chosen[i], probabilities[i] = int(picked[slot]), probs[slot].tolist()
        return chosen, probabilities

    def apply(self, pipeline, grids, context, count, image_granularity=None, max_visual_tokens=None,
              granularity_bias=None, input_ids=None, inputs_embeds=None, attention_mask=None, labels=None,
              **unused) -> tuple[list[torch.Tensor], list[dict]]:
        """The layer's forward: levels per image (fixed or routed), the pipeline's assembly at those levels, and the
        report per image (granularity, mode, router probabilities)."""
        requested = self.requested(image_granularity, len(grids))
        chosen, probabilities = self.choose(pipeline.router, grids, requested, count, input_ids, inputs_embeds,
                                            attention_mask, labels, max_visual_tokens, granularity_bias)
        features = pipeline.assemble(grids, context, chosen)
        report = [{"granularity": g, "mode": "fixed" if r else "auto", "router_probabilities": p}
                  for g, r, p in zip(chosen, requested, probabilities)]
        return features, report
