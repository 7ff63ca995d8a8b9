"""Hierarchical window attention: the "Hiwin" projector of LLaVA-UHD v2 (spec llava-uhd-v2.md sections 4-5).

Compresses each slice's inverse feature pyramid (levels 1x/2x/4x of CLIP layer -2 features, C = 1024) into 144 tokens
that land directly in the LLM embedding space. Module and parameter names match the release keys under
`model.mm_projector.` (release class `AdaptSpatialResampler`, methods `prepare_single_key_value` /
`query_with_parallel_attn`, thunlp/LLaVA-UHD branch LLaVA-UHD-v2), so converting a checkpoint is a prefix rename.

Per slice and active level l with map X_l (h_l, w_l, C):
    values V_l = LN_kv(W_l X_l)                          (h_l, w_l, D)
    keys   K_l = V_l + PE(h_l, w_l) + e_l                 PE: 12x12 2-D sin-cos table, bicubic-resized to (h_l, w_l)
    a fixed 12x12 grid of windows of float size (h_l/12, w_l/12) (the same normalised windows at every level);
    RoIAlign of K_l and V_l in every window to an (oh, ow) grid -> window i gets L = sum_l oh*ow keys.
Queries: four independent sets query_1..4, each 144 x D. Reading of the spec's "query k attends only to window k's keys"
(confirmed by the release code): k indexes the 144 grid positions, not the 4 sets. Query i of EVERY set attends to the
L keys of window i only (windows on the batch axis, a single query per window), through one shared
nn.MultiheadAttention. The four sets are four "views" of the same window, merged afterwards:
    y = LN_post(cat_proj([LN_proj(y_1); ...; LN_proj(y_4)])) @ proj             (144, D)

Conventions settled here:
- Pooling sizes "2x4" etc. are (height, width) = (rows, columns), as the release passes them to RoIAlign: its candidate
  list is written (w, h), compared with log(w / h) of the map and returned as (h, w). A wide slice (w/h ~ 2) pools each
  window to 2 rows x 4 columns.
- compat=True (release): the pooling size depends only on the map's aspect ratio (the same at every level), window boxes
  are rounded to the working dtype before RoIAlign (the release casts them to bf16). compat=False (paper, Table 4
  "Pyramid"): the base size is scaled by the level factor, e.g. [2x3], [4x6], [8x12] at 1x/2x/4x, boxes kept in float32.
- The 2-D sin-cos table is MAE's (`get_2d_sincos_pos_embed`): the first half of the channels encodes the column index,
  the second half the row index (MAE meshgrids w first). It is stored as a persistent, non-trainable buffer `pos_embed`
  created in the default dtype, so it follows the model's dtype like the release's frozen parameter (also under
  `from_pretrained(dtype=...)`, which builds the model in that default dtype).
- Slices whose maps differ in size get different key counts L; keys are zero-padded and masked
  (key_padding_mask), exactly like the release, so one attention call serves all slices ("reference"; the "fused" path
  below runs each group of same-size slices on its own keys, which is the same softmax).
- The sin-cos table is resized in float32 for float32/bf16/fp16 tables (the release's get_abs_pos), in float64 for a
  float64 table ("at least float32", so that float64 checks are not limited by a float32 table).

Two implementations of the same function, chosen by `impl` (method setting `hiwin_impl` of method "uhd"):
- "reference": the release's order of operations, literally: W_l and LN_kv on every map position at width D,
  RoIAlign of the D-channel key and value maps, then nn.MultiheadAttention (its Q/K/V in-projections applied to every
  window's queries and keys). About 2.9 TFLOPs for the 7 views of a 1008x672 image at D = 4096.
- "fused" (default): the same math reordered with exact linear-algebra identities (equal up to float rounding; tested
  against "reference" in float64 to ~1e-10, gradients included). Per level l, with y = W_l x + b_l and C = I - 11^T/D:
    * LN_kv's statistics from x without forming y: ||C y||^2 = x^T G x + 2 g^T x + c, G = (C W_l)^T C W_l (C x C),
      computed in (at least) float32 whatever the module dtype;
    * RoIAlign is linear: pool x/s, 1/s and a ones-map (C + 2 channels) instead of the D-channel keys and values
      (RoIAlign of a ones-map is not 1 everywhere: samples outside the map weigh 0);
    * keys are never projected: q'.(W_k k + b_k) = (W_k^T q').k + const, folded through LN_kv and W_l into
      A_k = W_k Gamma C W_l (D x C) so that scores run in C dims against the pooled x/s; q'.b_k is the same for every
      key of a query and cancels in the softmax;
    * values are mixed first and projected after (probabilities sum to 1): per head and level,
      A_v[h] (sum_j p_j xtilde_j) with A_v = W_v Gamma C W_l, plus the bias / beta terms;
    * the position term: the resized table is a linear map of the fixed 12x12 table, so its RoIAlign is
      M (a weight-free (windows, keys, 144) matrix per map size) times the table, and its score contribution
      M . (q' . W_k T) needs no D-wide work per window;
    * the queries (LN_q(query_k) + pos_embed) do not depend on the input: projected once per forward.
  Everything that depends on the weights only (q', A_k folded with q', A_v, G, ...; ~0.27 TFLOPs at D = 4096) is
  computed once per forward under autograd (training: gradients flow through it), and cached while no gradient is
  recorded (no_grad / inference_mode, e.g. generation; ~75M elements at D = 4096, ~150 MB in bf16). The cache is keyed
  on the storage and version counters of the tensors it was built from, and cleared by train()/eval(),
  load_state_dict and .to()/.cuda(); an edit that bypasses version counters (writing through `param.data`) needs
  `clear_fused_cache()`. Under autocast the folding and the LN statistics stay in float32.
  About 0.6 TFLOPs per 1008x672 image at D = 4096 (benchmarks/uhd_flops.py). The output projections (out_proj,
  LN_proj, cat_proj, LN_post, proj) are the same in both and are most of what remains.
"""

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpointing import checkpointed
from ..ops import roi_align

# Numbers of the release (thunlp/LLaVA-UHD, LLaVA-UHD-v2 branch, adapt_spatial_resampler.py).
GRID_SIZE = 12  # 12 x 12 = 144 queries and windows per slice
HEAD_DIM = 128  # nn.MultiheadAttention(D, D // 128)
LAYER_NORM_EPS = 1e-6
QUERY_INIT_STD = 0.02
NUM_QUERY_SETS = 4
# feature_scale_mask bit -> (level name in the release keys, upsampling factor of that level)
LEVELS = {1: ("1x", 1), 2: ("2x", 2), 4: ("4x", 4)}
# RoIAlign output sizes per window as (height, width), in the release's search order (ties keep the first).
POOLING_CANDIDATES = ((2, 4), (2, 3), (3, 4), (3, 3), (4, 2), (3, 2), (4, 3))
IMPLEMENTATIONS = ("fused", "reference")  # HiwinProjector(impl=...), method setting hiwin_impl; see the docstring


def sincos_2d_position_embedding(embed_dim: int, grid_size: int) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos table -> (grid_size**2, embed_dim), float32 values, positions in raster order.

    Row r, column c: [sin(c * w), cos(c * w), sin(r * w), cos(r * w)], w_i = 10000^(-i / (D/4)), i < D/4.
    """
    if embed_dim % 4:
        raise ValueError(f"sincos_2d_position_embedding: embed_dim must be a multiple of 4, got {embed_dim}")
    omega = 1.0 / 10000 ** (torch.arange(embed_dim // 4, dtype=torch.float64) / (embed_dim / 4))
    index = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(index, index, indexing="ij")

    def encode(pos):  # (g*g,) -> (g*g, D/2)
        angles = pos.reshape(-1, 1) * omega
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)

    return torch.cat([encode(cols), encode(rows)], dim=1).float()


def resize_position_embedding(pos_embed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(g*g, D) table -> (height, width, D): bicubic, align_corners=False, computed in float32 (release get_abs_pos;
    float64 for a float64 table)."""
    grid = math.isqrt(pos_embed.shape[0])
    dtype = torch.promote_types(pos_embed.dtype, torch.float32)
    table = pos_embed.to(dtype).reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
    resized = F.interpolate(table, size=(height, width), mode="bicubic", align_corners=False)
    return resized[0].permute(1, 2, 0)


def window_boxes(height: int, width: int, grid_size: int = GRID_SIZE) -> torch.Tensor:
    """The grid_size x grid_size windows of a (height, width) map as (grid_size**2, 4) float32 [x1, y1, x2, y2].

    Raster order (row-major, matching the query order). Window size (height / g, width / g), computed with the
    release's expressions (`slice_image_feature_minicpm`) so the float32 coordinates are bit-identical.
    """
    num_windows = grid_size * grid_size
    window_h = math.sqrt(height * width / num_windows / (width / height))
    window_w = window_h * (width / height)
    if round(height / window_h) != grid_size or round(width / window_w) != grid_size:
        raise ValueError(f"window_boxes: cannot tile a {height}x{width} map with {grid_size}x{grid_size} windows")
    index = torch.arange(grid_size, dtype=torch.float64)
    y1 = (index * window_h)[:, None].expand(grid_size, grid_size)
    x1 = (index * window_w)[None, :].expand(grid_size, grid_size)
    boxes = torch.stack([x1, y1, x1 + window_w, y1 + window_h], dim=-1)
    return boxes.reshape(num_windows, 4).float()


def pooling_size(height: int, width: int, level_factor: int = 1, compat: bool = True) -> tuple[int, int]:
    """RoIAlign output (oh, ow) for each window of a (height, width) map.

    The candidate nearest to the map's aspect ratio in log space (release `cal_best_pooling_size`); compat=False scales
    it by the level factor (the paper's region-level pyramid).
    """
    log_ratio = math.log(width / height)
    best, best_error = (3, 3), float("inf")
    for out_h, out_w in POOLING_CANDIDATES:
        error = abs(log_ratio - math.log(out_w / out_h))
        if error < best_error:
            best, best_error = (out_h, out_w), error
    if compat:
        return best
    return best[0] * level_factor, best[1] * level_factor


class HiwinProjector(nn.Module):
    """LLaVA-UHD v2 hierarchical window attention: feature pyramid of each slice -> (grid_size**2, embed_dim) tokens.

    Args:
        embed_dim: D, the LLM hidden size.
        vision_dim: channels of the pyramid levels (CLIP-L: 1024).
        grid_size: queries/windows per side (144 = 12 x 12 tokens per slice).
        feature_scale_mask: bitmask of the active levels, 1 = 1x, 2 = 2x, 4 = 4x (release default 7; its Qwen2/13B
            scripts use 5). The parameters of all three levels exist regardless, as in the release checkpoints.
        compat: release behaviour (default) or the paper's level-scaled pooling grids; see the module docstring.
        num_heads: attention heads, default D // 128.
        impl: "fused" (default, the cheap exact reformulation) or "reference" (the release's order of operations);
            see the module docstring. An attribute: it may be switched on a built module.
    """

    def __init__(
        self,
        embed_dim: int,
        vision_dim: int = 1024,
        grid_size: int = GRID_SIZE,
        feature_scale_mask: int = 7,
        compat: bool = True,
        num_heads: int | None = None,
        impl: str = "fused",
    ):
        super().__init__()
        if impl not in IMPLEMENTATIONS:
            raise ValueError(f"HiwinProjector: impl must be one of {IMPLEMENTATIONS}, got {impl!r}")
        if not isinstance(feature_scale_mask, int) or not 1 <= feature_scale_mask <= 7:
            raise ValueError(
                f"HiwinProjector: feature_scale_mask must be a non-empty bitmask of 1 (1x), 2 (2x), 4 (4x), "
                f"got {feature_scale_mask!r}"
            )
        if num_heads is None:
            if embed_dim % HEAD_DIM:
                raise ValueError(
                    f"HiwinProjector: embed_dim {embed_dim} is not a multiple of {HEAD_DIM}; pass num_heads explicitly"
                )
            num_heads = embed_dim // HEAD_DIM
        if embed_dim % 4 or embed_dim % num_heads:
            raise ValueError(
                f"HiwinProjector: embed_dim {embed_dim} must be a multiple of 4 and of num_heads {num_heads}"
            )
        self.embed_dim, self.vision_dim, self.grid_size = embed_dim, vision_dim, grid_size
        self.num_queries = grid_size * grid_size
        self.feature_scale_mask, self.compat, self.impl = feature_scale_mask, compat, impl
        self._fused_cache = None  # (key, folded weights) of the fused path, see folded_weights
        self.active_levels = [bit for bit in LEVELS if feature_scale_mask & bit]

        for k in range(1, NUM_QUERY_SETS + 1):
            setattr(self, f"query_{k}", nn.Parameter(torch.empty(self.num_queries, embed_dim)))
        # Fixed, saved with the weights (the release stores it as a frozen parameter), not trainable.
        # Default dtype: the model's dtype under from_pretrained(dtype=...), as the release's parameter follows it.
        table = sincos_2d_position_embedding(embed_dim, grid_size).to(torch.get_default_dtype())
        self.register_buffer("pos_embed", table, persistent=True)
        for name, _ in LEVELS.values():
            setattr(self, f"feature_{name}_embedding", nn.Parameter(torch.zeros(1, 1, embed_dim)))
            setattr(self, f"features_{name}_projector", nn.Linear(vision_dim, embed_dim))
        self.attn = nn.MultiheadAttention(embed_dim, num_heads, batch_first=True)
        self.ln_q = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)
        self.ln_kv = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)
        self.ln_proj = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)
        self.ln_post = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)
        self.cat_proj = nn.Linear(NUM_QUERY_SETS * embed_dim, embed_dim)
        self.proj = nn.Parameter(torch.empty(embed_dim, embed_dim))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """Release initialisation: Linear weights (attn.out_proj included) trunc-normal std 0.02 with zero bias,
        attn.in_proj xavier-uniform (nn.MultiheadAttention default), LayerNorms 1/0, queries trunc-normal std 0.02,
        level embeddings 0, proj = D^-0.5 * N(0, 1), pos_embed = the sin-cos table."""
        self.attn._reset_parameters()
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for k in range(1, NUM_QUERY_SETS + 1):
            nn.init.trunc_normal_(getattr(self, f"query_{k}"), std=QUERY_INIT_STD)
        for name, _ in LEVELS.values():
            nn.init.zeros_(getattr(self, f"feature_{name}_embedding"))
        nn.init.normal_(self.proj, 0.0, self.embed_dim**-0.5)  # nn.init: leaves loaded weights alone
        if not getattr(self.pos_embed, "_is_hf_initialized", False):  # a buffer: no nn.init guard of its own
            self.pos_embed.copy_(sincos_2d_position_embedding(self.embed_dim, self.grid_size))

    gradient_checkpointing = False  # set by gradient_checkpointing_enable(): keys/values of every window are large

    def forward(self, pyramids: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
        return checkpointed(self, self._forward, pyramids)

    def _forward(self, pyramids: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
        """Project the feature pyramids of a batch of slices.

        Args:
            pyramids: one entry per slice: a sequence with one map per active level, in order 1x, 2x, 4x (only the
                levels in feature_scale_mask), each (C, h_l, w_l). An entry may also hold (S, C, h_l, w_l) maps: S
                slices of the same size. Slices of different sizes may be mixed freely.

        Returns:
            (total slices, grid_size**2, D) tokens, slices in input order, tokens in raster order.
        """
        entries = [self._check_pyramid(i, pyramid) for i, pyramid in enumerate(pyramids)]
        if not entries:
            raise ValueError("HiwinProjector: got no slice")
        # Same-size slices share one projection / RoIAlign pass (a loop over sizes: a handful per image).
        groups: dict[tuple, list[int]] = {}
        for i, levels in enumerate(entries):
            groups.setdefault(tuple(level.shape[-2:] for level in levels), []).append(i)
        members = list(groups.values())
        batches = [[torch.cat([entries[i][l] for i in indices]) for l in range(len(self.active_levels))]
                   for indices in members]
        if self.impl == "reference":
            keys, values = zip(*(self.window_keys_values(levels) for levels in batches))
            tokens = self.attend(keys, values)  # list of (S_group, grid**2, D)
        else:  # groups need no padding here: each group's softmax runs over its own keys
            folded = self.folded_weights()
            tokens = [self.fused_tokens(levels, folded) for levels in batches]
        per_entry = {}
        for indices, group_tokens in zip(members, tokens):
            sizes = [entries[i][0].shape[0] for i in indices]
            per_entry.update(zip(indices, group_tokens.split(sizes)))
        return torch.cat([per_entry[i] for i in range(len(entries))])

    def window_keys_values(self, levels: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of every window: (S, C, h_l, w_l) per active level -> two (S * grid**2, L, D) tensors.

        L = sum over levels of oh_l * ow_l (e.g. 27 for mask 7 on square slices in compat mode); keys of a window are
        ordered level by level (1x, 2x, 4x), raster order inside each level's pooled grid.
        """
        keys, values = [], []
        for bit, level in zip(self.active_levels, levels):
            name, factor = LEVELS[bit]
            projector = getattr(self, f"features_{name}_projector")
            embedding = getattr(self, f"feature_{name}_embedding")
            num_slices, _, height, width = level.shape
            value = self.ln_kv(projector(level.permute(0, 2, 3, 1).to(projector.weight.dtype)))  # (S, h, w, D)
            position = resize_position_embedding(self.pos_embed, height, width).to(value.dtype)  # (h, w, D)
            key = value + position + embedding.to(value.dtype)

            rois = self._window_rois(num_slices, height, width, value.dtype, value.device)
            size = pooling_size(height, width, factor, self.compat)
            for target, feature_map in ((keys, key), (values, value)):
                pooled = roi_align(feature_map.permute(0, 3, 1, 2), rois, size, 1.0, -1, False)  # (S*g*g, D, oh, ow)
                target.append(pooled.flatten(2).transpose(1, 2))  # -> (S*g*g, oh*ow, D)
        return torch.cat(keys, dim=1), torch.cat(values, dim=1)

    def _window_rois(self, num_slices: int, height: int, width: int, dtype, device) -> torch.Tensor:
        """(S * g*g, 5) RoIAlign rows [slice, x1, y1, x2, y2] of every window, slice-major then raster order.

        Only the coordinates are rounded to the working dtype in compat mode; the slice index is kept in at least
        float32 (bf16 holds integers exactly only up to 256: a group of more slices would read the wrong maps).
        """
        boxes = window_boxes(height, width, self.grid_size).to(device)
        if self.compat:  # the release casts the window boxes to the working dtype (bf16) before RoIAlign
            boxes = boxes.to(dtype)
        boxes = boxes.to(torch.promote_types(boxes.dtype, torch.float32))  # exact: rounding is kept
        slice_index = torch.arange(num_slices, device=device, dtype=boxes.dtype)
        return torch.cat([slice_index.repeat_interleave(self.num_queries)[:, None], boxes.repeat(num_slices, 1)], dim=1)

    def attend(self, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Window attention of the four query sets over groups of windows whose key counts L may differ.

        keys[i], values[i]: (S_i * grid**2, L_i, D). Returns [(S_i, grid**2, D)].
        """
        max_len = max(k.shape[1] for k in keys)
        counts = [k.shape[0] // self.num_queries for k in keys]
        padding_mask = None
        if any(k.shape[1] != max_len for k in keys):  # zero-pad and mask, like the release
            padding_mask = torch.cat(
                [
                    (torch.arange(max_len, device=k.device) >= k.shape[1]).expand(k.shape[0], max_len)
                    for k in keys
                ]
            )
            keys = [F.pad(k, (0, 0, 0, max_len - k.shape[1])) for k in keys]
            values = [F.pad(v, (0, 0, 0, max_len - v.shape[1])) for v in values]
        all_keys, all_values = torch.cat(keys), torch.cat(values)  # (B, L, D), B = total slices * g*g

        # (g*g, 4, D): the four query sets side by side on the query axis. Each query attends on its own, so this is
        # the release's four attention calls in one.
        queries = torch.stack(
            [
                self.ln_q(getattr(self, f"query_{k}")) + self.pos_embed.to(self.ln_q.weight.dtype)
                for k in range(1, NUM_QUERY_SETS + 1)
            ],
            dim=1,
        )
        queries = queries.repeat(sum(counts), 1, 1).to(all_keys.dtype)  # (B, 4, D): query i of slice s -> window i
        attended, _ = self.attn(queries, all_keys, all_values, key_padding_mask=padding_mask, need_weights=False)
        tokens = self.merge_query_sets(attended)  # (B, D)
        return list(tokens.view(-1, self.num_queries, self.embed_dim).split(counts))

    def merge_query_sets(self, attended: torch.Tensor) -> torch.Tensor:
        """(B, 4, D) attention outputs (after out_proj) of the four query sets -> (B, D) tokens."""
        merged = self.ln_proj(attended).flatten(1)  # (B, 4, D) -> (B, 4D) = [y_1; y_2; y_3; y_4]
        return self.ln_post(self.cat_proj(merged)) @ self.proj

    # -- the fused path ----------------------------------------------------------------------------------------------

    def folded_weights(self) -> dict:
        """The weight-only tensors of the fused path, from the cache when still valid (see the module docstring).

        Cached only while no gradient is recorded: under autograd they are recomputed every forward so that gradients
        reach the parameters they are made of.
        """
        sources = self._folded_sources()
        cacheable = not torch.is_grad_enabled() and not any(t.is_inference() for t in sources)
        key = None
        if cacheable:
            key = tuple((t.data_ptr(), t._version, t.dtype, t.device, tuple(t.shape)) for t in sources)
        if cacheable and self._fused_cache is not None and self._fused_cache[0] == key:
            return self._fused_cache[1]
        with torch.autocast(self.attn.in_proj_weight.device.type, enabled=False):  # float32 folding under AMP too
            folded = self._fold_weights()
        self._fused_cache = (key, folded) if cacheable else None
        return folded

    def clear_fused_cache(self) -> None:
        """Drops the fused path's cached weight-only tensors (needed only after edits through `param.data`)."""
        self._fused_cache = None

    def train(self, mode: bool = True):
        self._fused_cache = None
        return super().train(mode)

    def _apply(self, *args, **kwargs):  # .to(), .cuda(), .half(), ...
        self._fused_cache = None
        return super()._apply(*args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):
        self._fused_cache = None
        return super()._load_from_state_dict(*args, **kwargs)

    def _folded_sources(self) -> list[torch.Tensor]:
        """Every tensor the folded weights are made of (all but the output projections, which are used as they are)."""
        sources = [getattr(self, f"query_{k}") for k in range(1, NUM_QUERY_SETS + 1)]
        sources += [self.pos_embed, self.attn.in_proj_weight, self.attn.in_proj_bias]
        sources += [self.ln_q.weight, self.ln_q.bias, self.ln_kv.weight, self.ln_kv.bias]
        for bit in self.active_levels:
            name = LEVELS[bit][0]
            projector = getattr(self, f"features_{name}_projector")
            sources += [projector.weight, projector.bias, getattr(self, f"feature_{name}_embedding")]
        return sources

    def _fold_weights(self) -> dict:
        """Weight-only work of the fused path, computed in (at least) float32, stored in the working dtype where it
        feeds the per-window matmuls. n = grid**2 windows/queries per set, Q = 4 sets, H heads of d channels."""
        work = self.attn.in_proj_weight.dtype
        compute = torch.promote_types(work, torch.float32)
        dim, heads = self.embed_dim, self.attn.num_heads
        head_dim = dim // heads
        w_q, w_k, w_v = self.attn.in_proj_weight.to(compute).chunk(3)
        b_q, _, b_v = self.attn.in_proj_bias.to(compute).chunk(3)  # q'.b_k: the same for every key, cancels in softmax
        ln_q = (self.ln_q.weight.to(compute), self.ln_q.bias.to(compute))
        table = self.pos_embed.to(compute)  # (n, D)
        queries = torch.stack(
            [
                F.layer_norm(getattr(self, f"query_{k}").to(compute), (dim,), *ln_q, self.ln_q.eps) + table
                for k in range(1, NUM_QUERY_SETS + 1)
            ],
            dim=1,
        )  # (n, Q, D), the reference's queries
        # q' = W_q q + b_q with the 1/sqrt(d) of the scores folded in: (n, Q, H, d)
        q = ((queries @ w_q.T + b_q) / math.sqrt(head_dim)).view(self.num_queries, NUM_QUERY_SETS, heads, head_dim)
        # score of table entry t: q'_h . (W_k T_t)[h] -> (n, Q, H, n); combined per map size with the RoIAlign of the
        # resized table (fused_tokens)
        position_scores = torch.einsum("iqhd,thd->iqht", q, (table @ w_k.T).view(-1, heads, head_dim))
        gamma, beta = self.ln_kv.weight.to(compute), self.ln_kv.bias.to(compute)
        levels = []
        for bit in self.active_levels:
            name = LEVELS[bit][0]
            projector = getattr(self, f"features_{name}_projector")
            weight, bias = projector.weight.to(compute), projector.bias.to(compute)
            weight_c, bias_c = weight - weight.mean(0), bias - bias.mean()  # C W_l (D, C), C b_l
            scaled = gamma[:, None] * weight_c  # Gamma C W_l
            embedding = getattr(self, f"feature_{name}_embedding").to(compute).reshape(dim)
            # keys: score = z . xtilde + alpha * rtilde + delta * wtilde (+ position); z = (W_k[h] Gamma C W_l)^T q'_h
            key_weight = torch.einsum("iqhd,hdc->iqhc", q, (w_k @ scaled).view(heads, head_dim, -1))
            key_vectors = torch.stack([w_k @ (gamma * bias_c), w_k @ (beta + embedding)]).view(2, heads, head_dim)
            levels.append({
                "key_weight": key_weight.to(work).contiguous(),  # (n, Q, H, C)
                "key_coefficients": torch.einsum("iqhd,khd->kiqh", q, key_vectors),  # (2, n, Q, H): of rtilde, wtilde
                "value_weight": (w_v @ scaled).view(heads, head_dim, -1).to(work),  # A_v: (H, d, C)
                "value_scale_bias": (w_v @ (gamma * bias_c)).view(heads, head_dim),  # times sum_j p_j rtilde_j
                # LN_kv statistics: ||C y||^2 = x^T G x + 2 g^T x + c
                "gram": weight_c.T @ weight_c,
                "gram_bias": weight_c.T @ bias_c,
                "bias_norm": bias_c @ bias_c,
            })
        return {
            "levels": levels,
            "position_scores": position_scores,
            "value_beta": (w_v @ beta).view(heads, head_dim),  # times sum_j p_j wtilde_j
            "value_bias": b_v.view(heads, head_dim),  # times sum_j p_j = 1 (unmasked keys only: no padding here)
        }

    def fused_tokens(self, levels: Sequence[torch.Tensor], folded: dict) -> torch.Tensor:
        """The fused path on one group of same-size slices: (S, C, h_l, w_l) per active level -> (S, grid**2, D).

        n = grid**2 windows per slice (window i is read by query i of each set), Q = 4 query sets, H heads of d
        channels, L_l keys per window at level l (L = sum_l L_l).
        """
        work = self.attn.in_proj_weight.dtype
        compute = torch.promote_types(work, torch.float32)
        n, sets, heads = self.num_queries, NUM_QUERY_SETS, self.attn.num_heads
        num_slices = levels[0].shape[0]
        identity = torch.eye(n, dtype=compute, device=levels[0].device)
        samples, side_maps, scores = [], [], []
        for bit, level, fold in zip(self.active_levels, levels, folded["levels"]):
            _, channels, height, width = level.shape
            x = level.permute(0, 2, 3, 1).to(work).to(compute)  # (S, h, w, C), rounded like the reference's input
            # LN_kv's 1/s per map position without forming W_l x: ||C y||^2 = x^T G x + 2 g^T x + c, in (at least)
            # float32 even under autocast (bf16 would lose the statistics to rounding)
            flat_x = x.reshape(-1, channels)
            with torch.autocast(x.device.type, enabled=False):
                square = (flat_x @ fold["gram"] * flat_x).sum(-1) + 2 * (flat_x @ fold["gram_bias"]) + fold["bias_norm"]
            inv_std = torch.rsqrt(square.clamp(min=0) / self.embed_dim + self.ln_kv.eps).view(*x.shape[:3], 1)
            rois = self._window_rois(num_slices, height, width, work, x.device)
            size = pooling_size(height, width, LEVELS[bit][1], self.compat)

            def pool(feature_map, boxes=rois):  # (N, h, w, K) channels-last -> (N', n, L_l, K)
                pooled = roi_align(feature_map.permute(0, 3, 1, 2), boxes, size, 1.0, -1, False)  # (N'*n, K, oh, ow)
                return pooled.flatten(2).transpose(1, 2).reshape(-1, n, size[0] * size[1], feature_map.shape[-1])

            sample = pool(x * inv_std).to(work).contiguous()  # RoIAlign of x/s: (S, n, L_l, C)
            # RoIAlign of 1/s and of a ones-map (below 1 where samples fall outside the map): (S, n, L_l, 2)
            side = pool(torch.cat([inv_std, torch.ones_like(inv_std)], dim=-1))
            # RoIAlign of the resized table = M @ table; M from the resized identity (weight-free): (n, L_l, n entries)
            table_map = resize_position_embedding(identity, height, width)[None]  # (1, h, w, n)
            position = torch.bmm(folded["position_scores"].flatten(1, 2), pool(table_map, rois[:n])[0].transpose(1, 2))

            keys = sample.shape[2]
            flat = sample.transpose(0, 1).reshape(n, num_slices * keys, channels)
            level_scores = torch.bmm(fold["key_weight"].view(n, sets * heads, channels), flat.transpose(1, 2))
            alpha, delta = fold["key_coefficients"].reshape(2, n, sets * heads, 1, 1)
            side_t = side.transpose(0, 1)[:, None]  # (n, 1, S, L_l, 2)
            level_scores = (level_scores.view(n, sets * heads, num_slices, keys).to(compute)
                            + alpha * side_t[..., 0] + delta * side_t[..., 1] + position[:, :, None])  # (n, QH, S, L_l)
            scores.append(level_scores)
            samples.append(sample)
            side_maps.append(side)
        probs = torch.softmax(torch.cat(scores, dim=-1), dim=-1)  # (n, Q*H, S, L)
        probs = probs.view(n, sets, heads, num_slices, -1).permute(2, 3, 0, 1, 4)  # (H, S, n, Q, L)

        # values: sum_j p_j v'_j = sum_l A_v[h] (sum_{j in l} p_j xtilde_j) + b_v + W_v beta * sum_j p_j wtilde_j
        #         + sum_l W_v Gamma C b_l * sum_{j in l} p_j rtilde_j
        bounds = torch.tensor([0] + [s.shape[2] for s in samples]).cumsum(0).tolist()
        side_weights = torch.zeros(num_slices, n, bounds[-1], 1 + len(samples), dtype=compute, device=probs.device)
        for l, (side, lo, hi) in enumerate(zip(side_maps, bounds, bounds[1:])):
            side_weights[..., lo:hi, 0] = side[..., 1]
            side_weights[..., lo:hi, 1 + l] = side[..., 0]
        coefficients = torch.matmul(probs, side_weights).view(heads, -1, 1 + len(samples))  # (H, S*n*Q, 1 + levels)
        vectors = torch.stack(
            [folded["value_beta"]] + [fold["value_scale_bias"] for fold in folded["levels"]], dim=1
        )  # (H, 1 + levels, d)
        bias = torch.baddbmm(folded["value_bias"][:, None], coefficients, vectors).to(work)  # (H, S*n*Q, d)
        probs = probs.to(work)
        per_head = []
        for h in range(heads):  # per head: the mixed C-wide vectors never exist for all heads at once (and it is fast)
            out = bias[h]
            for fold, sample, lo, hi in zip(folded["levels"], samples, bounds, bounds[1:]):
                mixed = torch.matmul(probs[h, ..., lo:hi], sample)  # (S, n, Q, L_l) @ (S, n, L_l, C) -> (S, n, Q, C)
                out = torch.addmm(out, mixed.flatten(0, 2), fold["value_weight"][h].T)  # (S*n*Q, d)
            per_head.append(out)
        attended = torch.stack(per_head, dim=1).view(num_slices * n, sets, self.embed_dim)  # (S*n, Q, D)
        tokens = self.merge_query_sets(self.attn.out_proj(attended))  # (S*n, D)
        return tokens.view(num_slices, n, self.embed_dim)

    def _check_pyramid(self, index, pyramid) -> list[torch.Tensor]:
        where = f"HiwinProjector: slice {index}"
        if isinstance(pyramid, torch.Tensor) or not isinstance(pyramid, Sequence):
            raise ValueError(
                f"{where}: expected a sequence of {len(self.active_levels)} level maps (C, h, w), "
                f"got {type(pyramid).__name__}; wrap a single slice as [[level_1x, ...]]"
            )
        names = [LEVELS[bit][0] for bit in self.active_levels]
        if len(pyramid) != len(names):
            raise ValueError(
                f"{where}: feature_scale_mask {self.feature_scale_mask} expects {len(names)} levels {names}, "
                f"got {len(pyramid)}"
            )
        levels = []
        for name, level in zip(names, pyramid):
            if not isinstance(level, torch.Tensor) or level.dim() not in (3, 4):
                got = f"shape {tuple(level.shape)}" if isinstance(level, torch.Tensor) else type(level).__name__
                raise ValueError(f"{where}, level {name}: expected a (C, h, w) or (S, C, h, w) tensor, got {got}")
            level = level if level.dim() == 4 else level[None]
            if level.shape[1] != self.vision_dim or level.shape[2] == 0 or level.shape[3] == 0:
                raise ValueError(
                    f"{where}, level {name}: expected {self.vision_dim} channels and a non-empty map, "
                    f"got shape {tuple(level.shape)}"
                )
            if levels and level.shape[0] != levels[0].shape[0]:
                raise ValueError(
                    f"{where}, level {name}: {level.shape[0]} slices but level {names[0]} has {levels[0].shape[0]}"
                )
            levels.append(level)
        return levels


__all__ = [
    "HiwinProjector",
    "pooling_size",
    "resize_position_embedding",
    "sincos_2d_position_embedding",
    "window_boxes",
]
