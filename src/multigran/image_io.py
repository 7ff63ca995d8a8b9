"""Loading images from paths, PIL images, numpy arrays or tensors into 8-bit RGB, with clear errors.

Conversions (documented behaviour, never a rejection):
- grayscale, palette and 1-bit images are converted to RGB;
- images with transparency (RGBA, LA, palette with transparency) are composited on white, as transformers does;
- CMYK and YCbCr images go through PIL's RGB conversion;
- 16-bit and 32-bit integer images are scaled to 8 bits (value / 257 for 16-bit data);
- float images (PIL mode "F" or float arrays) are read as [0, 1] when their maximum is <= 1, else as [0, 255].
"""

import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

# Images above this many pixels are refused before decoding (a decompression-bomb guard): 2^27 = 134M pixels,
# e.g. 11585 x 11585, far beyond what any pipeline here uses and below PIL's own hard limit (~179M).
DEFAULT_MAX_PIXELS = 1 << 27


class ImageLoadError(ValueError):
    """An image could not be read; the message says which image and why."""


def _describe(source) -> str:
    if isinstance(source, (str, os.PathLike)):
        return f"image file {str(source)!r}"
    return f"image of type {type(source).__name__}"


def _check_pixels(width: int, height: int, what: str, max_pixels: int):
    if width <= 0 or height <= 0:
        raise ImageLoadError(f"{what} is empty ({width}x{height} pixels)")
    if width * height > max_pixels:
        raise ImageLoadError(
            f"{what} is {width}x{height} = {width * height:,} pixels, above the limit of {max_pixels:,} "
            "(a decompression-bomb guard; raise max_pixels if the image is trusted)"
        )


def _scale_to_uint8(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.floating):
        array = np.nan_to_num(array.astype(np.float64), nan=0.0, posinf=1.0, neginf=0.0)
        scale = 255.0 if array.max(initial=0.0) <= 1.0 else 1.0
        return np.clip(np.rint(array * scale), 0, 255).astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        # 16-bit data (uint16, or PIL's 32-bit "I" mode holding 16-bit PNG values) maps 65535 -> 255.
        if array.max(initial=0) > 255 or array.dtype in (np.uint16, np.int16):
            return np.clip(np.rint(array.astype(np.float64) / 257.0), 0, 255).astype(np.uint8)
        return np.clip(array, 0, 255).astype(np.uint8)
    raise ImageLoadError(f"unsupported image array dtype {array.dtype}")


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return Image.fromarray(_scale_to_uint8(np.asarray(image))).convert("RGB")
    return image.convert("RGB")


def _from_array(array: np.ndarray, max_pixels: int) -> Image.Image:
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)  # channels-first -> channels-last
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ImageLoadError(
            f"image array of shape {tuple(array.shape)} is not an image: expected (H, W), (H, W, 1|3|4) or (1|3|4, H, W)"
        )
    _check_pixels(array.shape[1], array.shape[0], f"image array of shape {tuple(array.shape)}", max_pixels)
    return _to_rgb(Image.fromarray(np.ascontiguousarray(_scale_to_uint8(array))))


def load_image(source, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Returns an 8-bit RGB PIL image from a path, bytes, PIL image, numpy array or torch tensor."""
    if isinstance(source, Image.Image):
        _check_pixels(*source.size, _describe(source), max_pixels)
        return _to_rgb(source)
    if isinstance(source, np.ndarray):
        return _from_array(source, max_pixels)
    if type(source).__module__.startswith("torch"):
        return _from_array(source.detach().cpu().float().numpy(), max_pixels)
    if isinstance(source, bytes):
        return _open(io.BytesIO(source), "image bytes", max_pixels)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise ImageLoadError(f"image file {str(path)!r} does not exist")
        with open(path, "rb") as handle:
            return _open(handle, f"image file {str(path)!r}", max_pixels)
    raise TypeError(
        f"cannot read an image from {type(source).__name__}: pass a path, bytes, PIL image, numpy array or torch tensor"
    )


def _open(handle, what: str, max_pixels: int) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit applies
            if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
                Image.MAX_IMAGE_PIXELS = max_pixels  # a caller who trusts bigger images lifts PIL's limit too
            image = Image.open(handle)
            _check_pixels(*image.size, what, max_pixels)
            image.load()
    except UnidentifiedImageError:
        raise ImageLoadError(f"{what} is not an image PIL can read (unknown or unsupported format)") from None
    except Image.DecompressionBombError as error:
        raise ImageLoadError(
            f"{what} is above the pixel limit of {max_pixels:,} (a decompression-bomb guard; raise max_pixels if the "
            f"image is trusted): {error}"
        ) from None
    except (OSError, SyntaxError, ValueError) as error:
        if isinstance(error, ImageLoadError):
            raise
        raise ImageLoadError(f"{what} is corrupt or truncated: {error}") from None
    return _to_rgb(image)


__all__ = ["load_image", "ImageLoadError", "DEFAULT_MAX_PIXELS"]
