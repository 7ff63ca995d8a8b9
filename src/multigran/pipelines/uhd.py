"""LLaVA-UHD v2: adaptive image slicing and the image preprocessing that feeds the variable-resolution ViT.

Faithful to the release (thunlp/LLaVA-UHD, branch LLaVA-UHD-v2, `llava/slice_process.py::slice_image_minicpm`):

* r = W*H / S^2, n0 = min(ceil(r), max_slices).
* n0 <= 1: no slicing. The whole image is resized (up or down) to area ~S^2 at its own aspect ratio, each side floored
  to a multiple of the ViT patch (never below one patch). Only this "overview" is encoded.
* otherwise the candidate slice counts are {n0-1, n0, n0+1} minus {1} and minus counts above max_slices; every
  factorisation (cols, rows) of a candidate is a grid, and the grid minimising |log(W/H) - log(cols/rows)| wins (first
  one in the release's enumeration order on ties, using the same float arithmetic, so e.g. a square image with 7 max
  slices gets 3x2, not 2x3: |log(2/3)| is one ulp larger than |log(3/2)| in float64).
* each slice is resized to area ~S^2 (sides multiples of the patch) - so slices need not be 336x336 (308x350 happens);
  the whole image is resized to (cols * slice_w, rows * slice_h) and cut in a raster (row-major) order.
* the overview is the whole image resized to area ~S^2; in the slicing branch the image is larger than S^2, so this
  is always a downscale ("never upscaled").

Token organisation in the LLM sequence (release `llava_arch.py`, `UsePermute = False`):
    [slice_1 (144 tokens), sep_1, ..., slice_N (144 tokens), sep_N, overview (144 tokens)]
where sep_i is the LLM embedding of "," between slices of a row and "\\n" after the last slice of each row, slices in
raster order. Total 145*N + 144 tokens; without slicing only the overview's 144 tokens (no separator at all).

The method ("uhd", bottom of this file): `UhdSettings`, the processor step `uhd_step` and the model-side `UhdPipeline`
(variable-resolution ViT -> JBU feature pyramid `visual.upsampler` -> hierarchical window attention
`visual.mm_projector` -> token organisation with the separator embeddings of `method_settings["separator_ids"]`).

Release evaluation pre-resize and hard-coded separator ids: `RELEASE_EVAL_PRE_RESIZE` / `uhd_eval_pre_resize` and
`RELEASE_SEPARATOR_IDS` below; the converter (convert/uhd_v2.py) stores both in a converted checkpoint's settings.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..configuration import parse_method_settings
from ..vision.varres import encode_variable_resolution
from .granularity import AdaptiveGranularity, GranularitySettings
from .uhd_hiwin import GRID_SIZE, HiwinProjector
from .uhd_hiwin import IMPLEMENTATIONS as HIWIN_IMPLEMENTATIONS
from .uhd_jbu import JBU2xStack, JBU4xStack, JBULearnedRange

# Constants of the release (`slice_process.py`, training/eval scripts) and the paper (Sec. 4.1).
SCALE_RESOLUTION = 336  # S: CLIP-ViT-L/14-336 input side; slices and overview have area ~S^2
PATCH_SIZE = 14  # CLIP-ViT-L/14 patch; every resized side is a multiple of it
MAX_SLICES_TRAIN = 7  # N_max used in training
MAX_SLICES_EVAL = 9  # N_max used in evaluation (paper); 1024^2 -> 3x3
TOKENS_PER_IMAGE = 144  # Hiwin compresses every slice and the overview to 12x12 query tokens
SLICE_SEPARATORS = (",", "\n")  # between slices of a row / after the last slice of a row
# The release's separator ids, hard-coded for every LLM (Llama's "," and "\n"; Qwen2 included): DOT_TOKEN and
# NEWLINE_TOKEN of llava/slice_process.py:11-12, embedded at llava/model/llava_arch.py:576-579. Converted releases keep
# these embedding rows; models built here use the tokenizer's own tokens (`separator_token_ids`).
RELEASE_SEPARATOR_IDS = (29892, 13)

# Evaluation pre-resize of the release: the image's long side is resized to this before slicing (also upscaling).
# llava/eval/model_vqa_loader.py:56-61 tests the --image-folder path in this order: contains "mme" or "ai2d" -> no
# resize, "textvqa" -> 1536, else 1024. The values below are what the release's own scripts get (folder, script):
#   textvqa  1536  ./playground/data/eval/textvqa/train_images (scripts/v1_5/eval/textvqa.sh:18)
#   ai2d     None  ./playground/data/eval/ai2d/ai2d_images (ai2d.sh:26)
#   mmbench  None  llava/eval/model_vqa_mmbench.py:111 has the resize commented out (mmbench.sh, mmbench_cn.sh)
#   mme      1024  the loader's test is case-sensitive and mme.sh:17 passes ./playground/data/eval/MME/
#                  MME_Benchmark_release_version (no lowercase "mme"), so MME falls through to 1024 (:61); the
#                  intended "no resize" is pre_resize_long_side=None
#   anything else 1024 (gqa, pope, docvqa, chartqa, ... via the loader; scienceqa: model_vqa_science.py:64)
EVAL_PRE_RESIZE_LONG_SIDE = 1024  # the default, also what converted checkpoints store
RELEASE_EVAL_PRE_RESIZE = {"textvqa": 1536, "ai2d": None, "mmbench": None, "mme": 1024}


def _check_positive_int(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def _floor_to_multiple(length: float, multiple: int) -> int:
    """Floor `length` to a multiple of `multiple`, never below one multiple (release `ensure_divide`)."""
    return max(math.floor(length / multiple) * multiple, multiple)


def best_resize(
    width: float,
    height: float,
    scale_resolution: int = SCALE_RESOLUTION,
    patch_size: int = PATCH_SIZE,
    allow_upscale: bool = False,
) -> tuple[int, int]:
    """(width, height) with area ~scale_resolution^2 at the input's aspect ratio, sides multiples of `patch_size`.

    Release `find_best_resize`: h = floor(S / sqrt(rho)), w = floor(h * rho) with rho = W / H, then each side floored to
    a multiple of the patch (at least one patch, so never zero). Images no larger than S^2 keep their size (only the
    flooring) unless `allow_upscale` - used for slices and for the no-slicing overview, which are resized up or down.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"best_resize: width and height must be positive, got {width}x{height}")
    if width * height > scale_resolution * scale_resolution or allow_upscale:
        ratio = width / height
        height = int(scale_resolution / math.sqrt(ratio))
        width = int(height * ratio)
    return _floor_to_multiple(width, patch_size), _floor_to_multiple(height, patch_size)


def plan_slices(
    width: int,
    height: int,
    max_slices: int,
    scale_resolution: int = SCALE_RESOLUTION,
    patch_size: int = PATCH_SIZE,
) -> dict:
    """Slicing plan for a `width` x `height` image.

    Returns a dict (all sizes PIL-style (width, height)):
      grid:          (cols, rows), or None when the image is not sliced
      slice_size:    (w, h) of every slice, or None when not sliced
      refine_size:   (cols * slice_w, rows * slice_h): the size the whole image is resized to before cutting, or None
      overview_size: (w, h) of the overview (the whole image resized; the only image when not sliced)
    """
    _check_positive_int(width, "plan_slices: width")
    _check_positive_int(height, "plan_slices: height")
    _check_positive_int(max_slices, "plan_slices: max_slices")
    _check_positive_int(scale_resolution, "plan_slices: scale_resolution")
    _check_positive_int(patch_size, "plan_slices: patch_size")

    ratio = width * height / (scale_resolution * scale_resolution)
    multiple = min(math.ceil(ratio), max_slices)
    if multiple <= 1:
        overview = best_resize(width, height, scale_resolution, patch_size, allow_upscale=True)
        return dict(grid=None, slice_size=None, refine_size=None, overview_size=overview)

    candidates = [n for n in (multiple - 1, multiple, multiple + 1) if n != 1 and n <= max_slices]
    log_ratio = math.log(width / height)
    best_grid, min_error = None, float("inf")
    for n in candidates:
        for cols in range(1, n + 1):
            if n % cols:
                continue
            error = abs(log_ratio - math.log(cols / (n // cols)))
            if error < min_error:  # strict: the first grid wins ties, as in the release
                best_grid, min_error = (cols, n // cols), error
    cols, rows = best_grid

    # Release `get_refine_size`: floor the image to a multiple of the grid, then best-resize one cell (up or down).
    cell_w = _floor_to_multiple(width, cols) / cols
    cell_h = _floor_to_multiple(height, rows) / rows
    slice_w, slice_h = best_resize(cell_w, cell_h, scale_resolution, patch_size, allow_upscale=True)
    overview = best_resize(width, height, scale_resolution, patch_size, allow_upscale=False)
    return dict(
        grid=(cols, rows),
        slice_size=(slice_w, slice_h),
        refine_size=(slice_w * cols, slice_h * rows),
        overview_size=overview,
    )


def resize_keep_ratio(image: Image.Image, long_side: int) -> Image.Image:
    """Evaluation pre-resize (release `resize_image_keep_ratio`): long side -> `long_side` (also upscales), bicubic.

    The short side is int(long_side / long * short) as in the release, but never 0 (the release crashes there).
    """
    _check_positive_int(long_side, "resize_keep_ratio: long_side")
    width, height = image.size
    if width > height:
        new_width, new_height = long_side, int(long_side / width * height)
    else:
        new_width, new_height = int(long_side / height * width), long_side
    return image.resize((max(new_width, 1), max(new_height, 1)), Image.Resampling.BICUBIC)


def uhd_eval_pre_resize(task_name: str) -> int | None:
    """The release's evaluation pre-resize for a benchmark, as its own evaluation scripts apply it: long side 1536 for
    TextVQA, None (no resize) for AI2D and MMBench, 1024 for everything else - MME included, see
    `RELEASE_EVAL_PRE_RESIZE`.

    The first key of `RELEASE_EVAL_PRE_RESIZE` contained in the lower-cased task name decides ("TextVQA_val" ->
    1536); no key -> EVAL_PRE_RESIZE_LONG_SIDE. Pass the result as
    `processor(..., pre_resize_long_side=uhd_eval_pre_resize(task))` (None turns the resize off).
    """
    if not isinstance(task_name, str) or not task_name:
        raise TypeError(f"uhd_eval_pre_resize: task_name must be a non-empty string, got {task_name!r}")
    name = task_name.lower()
    for key, long_side in RELEASE_EVAL_PRE_RESIZE.items():
        if key in name:
            return long_side
    return EVAL_PRE_RESIZE_LONG_SIDE


def _to_normalized_tensor(image: Image.Image, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    # CLIPImageProcessor with do_resize=False, do_center_crop=False: rescale by 1/255, then normalise.
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0  # (3, h, w)
    return (pixels - mean[:, None, None]) / std[:, None, None]


def preprocess_uhd_image(
    image: Image.Image,
    max_slices: int,
    mean: Sequence[float],
    std: Sequence[float],
    scale_resolution: int = SCALE_RESOLUTION,
    patch_size: int = PATCH_SIZE,
    pre_resize_long_side: int | None = None,
) -> dict:
    """Slice a PIL image and normalise the pieces for the variable-resolution ViT.

    `pre_resize_long_side`: the evaluation pre-resize (release: 1024; 1536 for TextVQA; none for AI2D, MMBench - see
    `uhd_eval_pre_resize`); None = off (the default here). Resizes use PIL bicubic, as the release.

    Returns a dict:
      overview:     float32 tensor (3, h, w), normalised
      slices:       list of float32 tensors (3, h, w) in raster order (empty when not sliced)
      grid:         (cols, rows) or None when not sliced
      patch_grids:  [(h // patch, w // patch), ...] for slices..., overview - the order the encoder sees them
      image_size:   (width, height) of the image that was sliced (after the optional pre-resize)
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"preprocess_uhd_image: image must be a PIL.Image.Image, got {type(image).__name__}")
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"preprocess_uhd_image: mean and std need 3 values (RGB), got {list(mean)} and {list(std)}")
    image = image.convert("RGB")
    if pre_resize_long_side is not None:
        image = resize_keep_ratio(image, pre_resize_long_side)
    plan = plan_slices(image.width, image.height, max_slices, scale_resolution, patch_size)
    mean_t = torch.tensor(mean, dtype=torch.float32)
    std_t = torch.tensor(std, dtype=torch.float32)

    overview = image.resize(plan["overview_size"], Image.Resampling.BICUBIC)
    slices = []
    if plan["grid"] is not None:
        (cols, rows), (slice_w, slice_h) = plan["grid"], plan["slice_size"]
        refined = image.resize(plan["refine_size"], Image.Resampling.BICUBIC)
        for row in range(rows):
            for col in range(cols):
                box = (col * slice_w, row * slice_h, (col + 1) * slice_w, (row + 1) * slice_h)
                slices.append(_to_normalized_tensor(refined.crop(box), mean_t, std_t))
    overview_tensor = _to_normalized_tensor(overview, mean_t, std_t)
    patch_grids = [(t.shape[1] // patch_size, t.shape[2] // patch_size) for t in [*slices, overview_tensor]]
    return dict(
        overview=overview_tensor,
        slices=slices,
        grid=plan["grid"],
        patch_grids=patch_grids,
        image_size=image.size,
    )


def _check_grid(grid) -> None:
    if grid is None:
        return
    if not isinstance(grid, (tuple, list)) or len(grid) != 2:
        raise TypeError(f"grid must be None or a (cols, rows) pair, got {grid!r}")
    _check_positive_int(grid[0], "grid cols")
    _check_positive_int(grid[1], "grid rows")


def slice_separators(grid) -> list[str]:
    """The separator text after each slice, in raster order: "," inside a row, "\\n" at a row's end ([] unsliced).

    Their ids are `method_settings["separator_ids"]` (the tokenizer's, or the release's 29892 / 13 when converted).
    """
    _check_grid(grid)
    if grid is None:
        return []
    cols, rows = grid
    return [SLICE_SEPARATORS[1] if col == cols - 1 else SLICE_SEPARATORS[0] for _ in range(rows) for col in range(cols)]


def count_uhd_tokens(grid, tokens_per_image: int = TOKENS_PER_IMAGE) -> int:
    """LLM tokens for one image: (tokens_per_image + 1 separator) per slice + the overview (alone if unsliced)."""
    _check_grid(grid)
    _check_positive_int(tokens_per_image, "count_uhd_tokens: tokens_per_image")
    num_slices = 0 if grid is None else grid[0] * grid[1]
    return (tokens_per_image + 1) * num_slices + tokens_per_image


# ---------------------------------------------------------------------------------------------------------------------
# The method "uhd": settings, separator ids, processor step, model pipeline
# ---------------------------------------------------------------------------------------------------------------------

# The first JBU step's 2x map must be larger than the 3-pixel reflect padding of its 7x7 window: views need at least
# 2 patches per side when the pyramid uses the JBU (feature_scale_mask with 2x or 4x).
MIN_JBU_PATCHES = 2
_LEVEL_BITS = (1, 2, 4)  # feature_scale_mask bits of the pyramid levels 1x, 2x, 4x (uhd_hiwin.LEVELS)


def _optional_positive_int(value, name: str) -> None:
    if value is not None:
        _check_positive_int(value, name)


@dataclass
class UhdSettings:
    """`method_settings` of method "uhd" (LLaVA-UHD v2; shared/spec/llava-uhd-v2.md).

    max_slices: N_max, the most slices per image. Default 9 (MAX_SLICES_EVAL), the release's evaluation setting; its
        training scripts use 7 (MAX_SLICES_TRAIN), which the training recipes pass as `data.image_options:
        {max_slices: 7}`. A processor call may override it (`processor(..., max_slices=7)`).
    scale_resolution: S: every slice and the overview have area ~S^2. None = the vision tower's image size (336 for
        CLIP-ViT-L/14-336, the release's value).
    feature_scale_mask: pyramid levels fed to the window attention, bitmask 1 = 1x, 2 = 2x, 4 = 4x. 7 (release
        default, Vicuna-7B); the released Qwen2-7B and Vicuna-13B checkpoints use 5 (1x + 4x). As in the release, a
        mask with 4x builds the two-step `JBU4xStack` (fix-up on the 4x output only; its 2x level is the first step's
        raw output), a mask with 2x but not 4x (2, 3) the one-step `JBU2xStack` (fix-up on the 2x output), mask 1 no
        JBU.
    compat: the release's window attention (pooling grid fixed across levels, boxes rounded to the working dtype);
        False = the paper's level-scaled pooling grids (see uhd_hiwin).
    pre_resize_long_side: evaluation pre-resize of the image's long side before slicing (release evaluation: 1024;
        1536 for TextVQA; none for AI2D and MMBench: `uhd_eval_pre_resize(task)`). None = off, the default of models
        built here; converted releases store 1024 (EVAL_PRE_RESIZE_LONG_SIDE). A processor call overrides it:
        `processor(..., pre_resize_long_side=1536)`, or `=None` to turn it off.
    separator_ids: [id of ",", id of "\\n"]: the separators between slices are these rows of the LLM's input
        embeddings. Models built here take the tokenizer's own tokens (`separator_token_ids`); converted releases
        keep the release's hard-coded Llama ids 29892 and 13 (RELEASE_SEPARATOR_IDS) for every LLM, Qwen2 included,
        since those are the rows the checkpoint was trained with. Needed as soon as an image is sliced.
    num_heads: heads of the window attention; None = D / 128 (release).
    hiwin_impl: how the window attention is computed: "fused" (default; the exact, several times cheaper
        reformulation) or "reference" (the release's order of operations, kept as the reference). Same outputs up to
        float rounding, same weights; see uhd_hiwin.
    query_grid: queries (and windows) per side of every view's window attention: query_grid**2 tokens per slice and
        for the overview. Default 12 (uhd_hiwin.GRID_SIZE: the release's 12x12 = 144 queries, `adapt_spatial_resampler
        .py`); a smaller grid compresses each view further (e.g. 6: 36 tokens, windows twice as wide). It sets the
        shapes of the queries and of the `pos_embed` table, so converted releases need 12.
    adaptive_granularity: None (the release), or the settings of the adaptive-granularity layer over every view's
        query_grid x query_grid tokens (`GranularitySettings` fields as a dict, {} = its defaults): all views of an
        image (slices and overview) are pooled to one level, chosen per image by the router reading the unpooled views
        (overview first) and the instruction; the separators stay as they are.
    """

    max_slices: int = MAX_SLICES_EVAL
    scale_resolution: int | None = None
    feature_scale_mask: int = 7
    compat: bool = True
    pre_resize_long_side: int | None = None
    separator_ids: list | None = None
    num_heads: int | None = None
    hiwin_impl: str = "fused"
    query_grid: int = GRID_SIZE
    adaptive_granularity: dict | None = None

    def __post_init__(self):
        self.layer = None if self.adaptive_granularity is None else GranularitySettings.from_dict(
            self.adaptive_granularity, "uhd method_settings.adaptive_granularity")
        _check_positive_int(self.query_grid, "uhd method_settings: query_grid")
        _check_positive_int(self.max_slices, "uhd method_settings: max_slices")
        _optional_positive_int(self.scale_resolution, "uhd method_settings: scale_resolution")
        _optional_positive_int(self.pre_resize_long_side, "uhd method_settings: pre_resize_long_side")
        _optional_positive_int(self.num_heads, "uhd method_settings: num_heads")
        if isinstance(self.feature_scale_mask, bool) or self.feature_scale_mask not in range(1, 8):
            raise ValueError(
                "uhd method_settings: feature_scale_mask must be a bitmask of 1 (1x), 2 (2x), 4 (4x) between 1 and 7, "
                f"got {self.feature_scale_mask!r}"
            )
        if self.hiwin_impl not in HIWIN_IMPLEMENTATIONS:
            raise ValueError(
                f"uhd method_settings: hiwin_impl must be one of {list(HIWIN_IMPLEMENTATIONS)}, got {self.hiwin_impl!r}"
            )
        if self.separator_ids is not None:
            ids = self.separator_ids
            if (not isinstance(ids, (list, tuple)) or len(ids) != 2
                    or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids)):
                raise ValueError(
                    "uhd method_settings: separator_ids must be [id of ',', id of '\\n'] (two non-negative ints) from "
                    f"the LLM tokenizer (multigran.pipelines.uhd.separator_token_ids), got {ids!r}"
                )
            self.separator_ids = [int(i) for i in ids]

    @property
    def uses_jbu(self) -> bool:
        return bool(self.feature_scale_mask & 6)

    @property
    def tokens_per_view(self) -> int:
        return self.query_grid * self.query_grid


def separator_token_ids(tokenizer) -> list[int]:
    """[id of ",", id of "\\n"]: the single tokens the LLM's tokenizer uses for these characters inside text.

    Each separator is encoded right after a digit ("0," minus "0", no special tokens), so that tokenizers which mark
    word starts (SentencePiece's "▁,") give the in-text token: Llama gives 29892 and 13 (<0x0A>), the ids the release
    hard-codes; byte-level BPE (Qwen2, GPT-2 style) gives its "," and "Ċ". The token must decode back to the character.
    Raises ValueError when the tokenizer splits a separator into several tokens or merges it with the digit.
    """
    ids = []
    for text in SLICE_SEPARATORS:
        prefix = tokenizer.encode("0", add_special_tokens=False)
        full = tokenizer.encode("0" + text, add_special_tokens=False)
        if len(full) != len(prefix) + 1 or full[: len(prefix)] != prefix:
            pieces = tokenizer.convert_ids_to_tokens(full)
            raise ValueError(
                f"the tokenizer does not encode the slice separator {text!r} as one token of its own ('0' + {text!r} "
                f"-> {pieces}, '0' -> {tokenizer.convert_ids_to_tokens(prefix)}); LLaVA-UHD v2 needs a single-token "
                "separator: pass method_settings['separator_ids'] explicitly"
            )
        token = full[-1]
        if tokenizer.decode([token]) != text:
            raise ValueError(
                f"the tokenizer's token for the slice separator {text!r} (id {token}, "
                f"{tokenizer.convert_ids_to_tokens([token])}) decodes to {tokenizer.decode([token])!r}; pass "
                "method_settings['separator_ids'] explicitly"
            )
        ids.append(int(token))
    return ids


def _too_thin_views(patch_grids, patch_size: int) -> str | None:
    small = [(h * patch_size, w * patch_size) for h, w in patch_grids if min(h, w) < MIN_JBU_PATCHES]
    if not small:
        return None
    return ", ".join(f"{w}x{h}" for h, w in small)


class _FromSettings:
    """Default of a processor option that falls back to `method_settings` (so that an explicit None can mean "off")."""

    def __repr__(self):
        return "<method_settings>"


FROM_SETTINGS = _FromSettings()


def uhd_step(image_processor, images, max_slices=None, pre_resize_long_side=FROM_SETTINGS, granularity=None) -> dict:
    """Processor step: adaptive slicing; every slice and the overview normalised at its own size.

    Options: `max_slices` (N_max, default `method_settings["max_slices"]`), `pre_resize_long_side` (evaluation
    pre-resize: an int, or None for none; default `method_settings["pre_resize_long_side"]`; per benchmark:
    `uhd_eval_pre_resize`), `granularity` (models with the adaptive-granularity layer: "auto" or tokens per view).

    Returns (images on dim 0, zero-padded where sizes differ, so the collator can concatenate batches):
      pixel_values  (images, max_views, 3, H_max, W_max) float32: views of image i in token order (slices in raster
                    order, then the overview), each in the top-left corner of its slot
      view_sizes    (images, max_views, 2) long: (height, width) in pixels of each view; (0, 0) for padding slots
      slice_grids   (images, 2) long: (cols, rows) of the slicing; (0, 0) when the image is not sliced
      image_sizes   (images, 2) long: (height, width) of each input image
      image_token_counts: (q + 1) * slices + q per image, q = query_grid**2 (release: 145 * slices + 144;
                    `count_uhd_tokens`)
    """
    settings = parse_method_settings(UhdSettings, image_processor)
    max_slices = settings.max_slices if max_slices is None else max_slices
    _check_positive_int(max_slices, "uhd: max_slices")
    pre_resize = settings.pre_resize_long_side if pre_resize_long_side is FROM_SETTINGS else pre_resize_long_side
    _optional_positive_int(pre_resize, "uhd: pre_resize_long_side")
    scale = settings.scale_resolution or image_processor.crop_size.height
    patch = image_processor.patch_size
    mean, std = list(image_processor.image_mean), list(image_processor.image_std)

    pieces = []
    for index, image in enumerate(images):
        out = preprocess_uhd_image(image, max_slices, mean, std, scale, patch, pre_resize)
        thin = _too_thin_views(out["patch_grids"], patch) if settings.uses_jbu else None
        if thin:
            raise ValueError(
                f"image {index} ({image.width}x{image.height}) is too elongated for LLaVA-UHD v2: its views would be "
                f"{thin} pixels, but the JBU feature pyramid needs at least {MIN_JBU_PATCHES} patches "
                f"({MIN_JBU_PATCHES * patch} pixels) per side; pad or crop the image to a less extreme aspect ratio"
            )
        pieces.append(out)

    max_views = max(len(p["slices"]) + 1 for p in pieces)
    max_h = max(t.shape[1] for p in pieces for t in [*p["slices"], p["overview"]])
    max_w = max(t.shape[2] for p in pieces for t in [*p["slices"], p["overview"]])
    pixel_values = torch.zeros(len(pieces), max_views, 3, max_h, max_w)
    view_sizes = torch.zeros(len(pieces), max_views, 2, dtype=torch.long)
    slice_grids = torch.zeros(len(pieces), 2, dtype=torch.long)
    for i, piece in enumerate(pieces):
        for v, view in enumerate([*piece["slices"], piece["overview"]]):
            pixel_values[i, v, :, : view.shape[1], : view.shape[2]] = view
            view_sizes[i, v] = torch.tensor(view.shape[1:])
        if piece["grid"] is not None:
            slice_grids[i] = torch.tensor(piece["grid"])
    out = {
        "pixel_values": pixel_values,
        "image_sizes": torch.tensor([[image.height, image.width] for image in images], dtype=torch.long),
        "view_sizes": view_sizes,
        "slice_grids": slice_grids,
        "image_token_counts": [count_uhd_tokens(p["grid"], settings.tokens_per_view) for p in pieces],
    }
    if settings.layer is not None:
        layer = AdaptiveGranularity(settings.layer, settings.query_grid, image_token_id=-1)  # the processor: no routing
        out.update(layer.step(granularity, len(images), lambda i, tokens: count_uhd_tokens(pieces[i]["grid"], tokens)))
    elif granularity is not None:
        raise ValueError("granularity applies to models with the adaptive-granularity layer; this uhd model has none "
                         "(add it with method_settings.adaptive_granularity: multigran switch-method ... --to uhd)")
    return out


def _grid_or_none(grid) -> tuple[int, int] | None:
    cols, rows = (int(v) for v in grid)
    return None if cols == 0 and rows == 0 else (cols, rows)


class UhdPipeline(nn.Module):
    """LLaVA-UHD v2: views (slices + overview) -> one variable-resolution ViT pass (layer -2, CLS dropped) -> JBU
    inverse feature pyramid per view (`upsampler`, guided by the view's normalised pixels) -> hierarchical window
    attention (`mm_projector`) -> query_grid**2 tokens per view (release: 144) -> [slice_1, sep_1, ..., slice_N,
    sep_N, overview].

    Key names: `visual.mm_projector.*` = the release's `model.mm_projector.*` (Hiwin), `visual.upsampler.*` = the
    release's `model.mm_projector.upsampler.upsampler.*` / the stage-0 checkpoint's JBU stack (up1, up2, fixup_proj;
    the 2x stack of masks 2 and 3 has no up2).

    The separators are the LLM's input embeddings of "," and "\\n" (ids in `method_settings["separator_ids"]`): forward
    needs the embedding module as `embed_tokens` (the model passes `self.get_input_embeddings()`).
    With the adaptive-granularity layer every view of an image is pooled to the image's level
    ([slice_1 (g), sep_1, ..., overview (g)]); the router (`router.*`) reads the unpooled views, overview first.
    """

    @staticmethod
    def settings_from_tokenizer(settings: dict, tokenizer) -> dict:
        """Fills `separator_ids` from the LLM tokenizer (its own "," and "\\n" tokens) for models built here;
        converted releases come with the release's ids already set (RELEASE_SEPARATOR_IDS)."""
        if settings.get("separator_ids") is None:
            settings["separator_ids"] = separator_token_ids(tokenizer)
        return settings

    def __init__(self, config):
        super().__init__()
        self.settings = parse_method_settings(UhdSettings, config)
        if isinstance(config.vision_feature_layer, bool) or not isinstance(config.vision_feature_layer, int):
            raise ValueError(
                "method 'uhd' encodes one vision layer (the release uses -2); vision_feature_layer must be an int, "
                f"got {config.vision_feature_layer!r}"
            )
        vision, text = config.vision_config, config.text_config
        self.feature_layer = config.vision_feature_layer
        self.select_strategy = config.vision_feature_select_strategy
        self.patch_size = vision.patch_size
        self.levels = [k for k, bit in enumerate(_LEVEL_BITS) if self.settings.feature_scale_mask & bit]
        # The release's stack per mask (multimodal_projector/adapt_spatial_resampler.py:141-144): the 4x stack when
        # 4x is used (its 2x level is up1's output, without fix-up), else the 2x stack (fix-up on the 2x output).
        self.upsampler = None
        if self.settings.feature_scale_mask & 4:
            self.upsampler = JBU4xStack(vision.hidden_size)
        elif self.settings.feature_scale_mask & 2:
            self.upsampler = JBU2xStack(vision.hidden_size)
        self.mm_projector = HiwinProjector(
            text.hidden_size, vision.hidden_size, self.settings.query_grid, self.settings.feature_scale_mask,
            self.settings.compat,
            self.settings.num_heads, impl=self.settings.hiwin_impl,
        )
        # The ids of "," and "\n", following the model's device. Not saved (config.method_settings holds them):
        # reset_parameters fills it, also after loading.
        self.register_buffer("separator_ids", torch.zeros(len(self.settings.separator_ids or ()), dtype=torch.long),
                             persistent=False)
        self.input_names = ("view_sizes", "slice_grids")
        self.adaptive = self.router = None
        if self.settings.layer is not None:
            self.adaptive = AdaptiveGranularity(self.settings.layer, self.settings.query_grid, config.image_token_id)
            self.router = self.adaptive.build_router(text.hidden_size)
            self.input_names += AdaptiveGranularity.input_names
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """The JBU's release initialisation (PyTorch's defaults; tau = 0, sigma = 1), replacing the generic init the
        model applied to its convolutions first (torch.nn.init calls: weights loaded from a checkpoint are kept). The
        window attention initialises itself (HiwinProjector)."""
        ids = torch.tensor(self.settings.separator_ids or [], dtype=torch.long)
        self.separator_ids.copy_(ids.to(self.separator_ids.device))
        if self.upsampler is None:
            return
        for module in self.upsampler.modules():
            if isinstance(module, nn.Conv2d):
                module.reset_parameters()
        for step in (m for m in self.upsampler.modules() if isinstance(m, JBULearnedRange)):
            nn.init.zeros_(step.range_temp)
            nn.init.ones_(step.sigma_spatial)

    # -- inputs ---------------------------------------------------------------------------------------------------

    def unpack_views(self, pixel_values, view_sizes, slice_grids):
        """Processor tensors -> (views: list of (3, h, w) in token order, grids: per image (cols, rows) or None)."""
        if view_sizes is None or slice_grids is None:
            raise ValueError("method 'uhd' needs view_sizes and slice_grids with pixel_values: pass the processor's "
                             "outputs together")
        if pixel_values.dim() != 5 or view_sizes.dim() != 3 or slice_grids.dim() != 2:
            raise ValueError(
                "method 'uhd' expects pixel_values (images, views, 3, H, W), view_sizes (images, views, 2) and "
                f"slice_grids (images, 2), got {tuple(pixel_values.shape)}, {tuple(view_sizes.shape)} and "
                f"{tuple(slice_grids.shape)}"
            )
        if not pixel_values.shape[0] == view_sizes.shape[0] == slice_grids.shape[0]:
            raise ValueError(
                f"pixel_values, view_sizes and slice_grids disagree on the number of images: {pixel_values.shape[0]}, "
                f"{view_sizes.shape[0]} and {slice_grids.shape[0]}"
            )
        views, grids = [], []
        for i, (sizes, grid) in enumerate(zip(view_sizes.tolist(), slice_grids.tolist())):
            grid = _grid_or_none(grid)
            count = 1 if grid is None else grid[0] * grid[1] + 1
            real = [tuple(s) for s in sizes[:count]]
            if count > pixel_values.shape[1] or any(min(s) <= 0 for s in real) or any(max(s) for s in sizes[count:]):
                raise ValueError(
                    f"image {i}: slice grid {grid} needs {count} views, but view_sizes holds {sizes}: pass the "
                    "processor's outputs together"
                )
            for height, width in real:
                if height % self.patch_size or width % self.patch_size or height > pixel_values.shape[3] or \
                        width > pixel_values.shape[4]:
                    raise ValueError(
                        f"image {i}: view size {height}x{width} is not a multiple of the patch {self.patch_size} or "
                        f"exceeds pixel_values {tuple(pixel_values.shape[3:])}"
                    )
            views += [pixel_values[i, v, :, :h, :w] for v, (h, w) in enumerate(real)]
            grids.append(grid)
        return views, grids

    # -- model ------------------------------------------------------------------------------------------------------

    def view_tokens(self, vision_tower, views) -> torch.Tensor:
        """(3, h_i, w_i) views -> (views, q, D), q = query_grid**2 (release: 144): ViT, pyramid and window
        attention, views of one size batched."""
        features = encode_variable_resolution(vision_tower, views, self.feature_layer, self.select_strategy)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, grid in enumerate(features):
            groups.setdefault(tuple(grid.shape[:2]), []).append(i)
        pyramids, order = [], []
        for indices in groups.values():
            source = torch.stack([features[i] for i in indices]).permute(0, 3, 1, 2)  # (n, C, h, w)
            levels = (source,)
            if self.upsampler is not None:
                dtype = self.upsampler.fixup_proj[1].weight.dtype
                guidance = torch.stack([views[i] for i in indices]).to(source.device)  # (n, 3, 14h, 14w)
                levels = self.upsampler(source.to(dtype), guidance)  # (n, C, h|2h[|4h], w|2w[|4w]): 1x, 2x[, 4x]
            pyramids.append([levels[k] for k in self.levels])
            order += indices
        tokens = self.mm_projector(pyramids)  # (views, q, D) in group order
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        return tokens[inverse.to(tokens.device)]

    def separator_embeddings(self, embed_tokens, like: torch.Tensor) -> torch.Tensor:
        """(2, D): the LLM's input embeddings of "," and "\\n"."""
        if self.settings.separator_ids is None:
            raise ValueError(
                "method 'uhd' needs method_settings['separator_ids'] (the tokenizer's ids of ',' and '\\n') to "
                "separate slices: set them with multigran.pipelines.uhd.separator_token_ids(tokenizer)"
            )
        if embed_tokens is None:
            raise ValueError(
                "method 'uhd' needs the LLM's input embeddings (embed_tokens=model.get_input_embeddings()) to build "
                "the separators between slices"
            )
        weight = getattr(embed_tokens, "weight", None)
        ids = self.separator_ids.to(weight.device if weight is not None else like.device)
        return embed_tokens(ids).to(device=like.device, dtype=like.dtype)

    def encode_grids(self, vision_tower, pixel_values, image_sizes=None, view_sizes=None, slice_grids=None,
                     embed_tokens=None, **unused):
        """Per image its views' tokens (views, q, D), the OVERVIEW FIRST (the view the router compares the
        instruction with), then the slices in raster order; the context: per image its slice grid, and the
        separator embeddings (2, D) (None when no image is sliced)."""
        views, grids = self.unpack_views(pixel_values, view_sizes, slice_grids)
        tokens = self.view_tokens(vision_tower, views)  # (all views, q, D), per image slices then overview
        separators = None
        if any(grid is not None for grid in grids):
            separators = self.separator_embeddings(embed_tokens, tokens)
        per_image, start = [], 0
        for grid in grids:
            count = 1 if grid is None else grid[0] * grid[1] + 1
            views_of_image = tokens[start:start + count]
            per_image.append(torch.cat([views_of_image[-1:], views_of_image[:-1]]))  # overview first
            start += count
        return per_image, (grids, separators)

    def assemble(self, grids, context, granularities) -> list[torch.Tensor]:
        """Per image [slice_1, sep_1, ..., slice_N, sep_N, overview], every view at the image's level (None =
        unpooled): ((g + 1) * slices + g, D)."""
        slice_grids, separators = context
        features = []
        for views, grid, granularity in zip(grids, slice_grids, granularities):
            if granularity is not None:
                views = self.adaptive.pool(views, granularity)[0]  # (views, q, D) -> (views, g, D)
            pieces = []
            for index, text in enumerate(slice_separators(grid)):  # one per slice, raster order
                pieces += [views[1 + index], separators[SLICE_SEPARATORS.index(text)][None]]
            pieces.append(views[0])  # the overview
            features.append(torch.cat(pieces))
        return features

    def token_counter(self, image_sizes, slice_grids=None, **unused):
        if slice_grids is None:
            raise ValueError("method 'uhd' counts image tokens from slice_grids: pass the processor's outputs")
        grids = [_grid_or_none(grid) for grid in slice_grids.tolist()]
        return lambda i, tokens_per_view: count_uhd_tokens(grids[i], tokens_per_view)

    def forward(self, vision_tower, pixel_values, image_sizes=None, view_sizes=None, slice_grids=None,
                embed_tokens=None, **inputs) -> list[torch.Tensor]:
        grids, context = self.encode_grids(vision_tower, pixel_values, image_sizes, view_sizes, slice_grids,
                                           embed_tokens)
        if self.adaptive is None:
            features, report = self.assemble(grids, context, [None] * len(grids)), [{} for _ in grids]
        else:
            count = self.token_counter(image_sizes, slice_grids)
            features, report = self.adaptive.apply(self, grids, context, count, **inputs)
        self.last_report = [
            {**entry, "slice_grid": None if g is None else list(g), "views": 1 if g is None else g[0] * g[1] + 1,
             "visual_tokens": f.shape[0]}
            for entry, g, f in zip(report, context[0], features)
        ]
        return features

    def placeholder_counts(self, image_sizes, slice_grids=None, image_granularity=None, **unused) -> list[int]:
        """Image tokens the processor put in the prompt for each image (from its slice grid and level)."""
        count = self.token_counter(image_sizes, slice_grids)
        if self.adaptive is None:
            return [count(i, self.settings.tokens_per_view) for i in range(len(slice_grids))]
        return self.adaptive.placeholder_counts(image_granularity, len(slice_grids), count)
