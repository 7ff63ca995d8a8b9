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
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

# Constants of the release (`slice_process.py`, training/eval scripts) and the paper (Sec. 4.1).
SCALE_RESOLUTION = 336  # S: CLIP-ViT-L/14-336 input side; slices and overview have area ~S^2
PATCH_SIZE = 14  # CLIP-ViT-L/14 patch; every resized side is a multiple of it
MAX_SLICES_TRAIN = 7  # N_max used in training
MAX_SLICES_EVAL = 9  # N_max used in evaluation (paper); 1024^2 -> 3x3
# release eval: `resize_image_keep_ratio(image, 1024)` (1536 for TextVQA; none for MME, AI2D)
EVAL_PRE_RESIZE_LONG_SIDE = 1024
TOKENS_PER_IMAGE = 144  # Hiwin compresses every slice and the overview to 12x12 query tokens
SLICE_SEPARATORS = (",", "\n")  # between slices of a row / after the last slice of a row


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

    `pre_resize_long_side`: the evaluation pre-resize (release: 1024; 1536 for TextVQA; None = off, the default).
    Resizes use PIL bicubic, as the release.

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

    The release hard-codes Llama ids 29892 (",") and 13 ("\\n"); the caller tokenises these strings instead.
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
