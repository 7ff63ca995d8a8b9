"""Loading images from paths, URLs, data URIs, base64 text, bytes, PIL images, numpy arrays or tensors into 8-bit
RGB, with clear errors.

Strings are read as: `data:image/...;base64,...` data URIs; `http://` / `https://` URLs (fetched with a timeout and a
size cap, the content decoded as an image whatever the server calls it); an existing file path; otherwise, when the
text is long and made only of base64 characters, bare base64 image bytes.

Conversions (documented behaviour, never a rejection):
- an encoded image's EXIF Orientation tag is applied (the photo is turned upright), as transformers' load_image does;
- grayscale, palette and 1-bit images are converted to RGB;
- images with transparency (RGBA, LA, palette with transparency) are composited on white, as transformers does;
- CMYK and YCbCr images go through PIL's RGB conversion;
- 16-bit and 32-bit integer images are scaled to 8 bits (value / 257 for 16-bit data);
- float images (PIL mode "F" or float arrays) are read as [0, 1] when their maximum is <= 1, else as [0, 255].
"""

import base64
import binascii
import io
import os
import re
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Images above this many pixels are refused before decoding (a decompression-bomb guard): 2^27 = 134M pixels,
# e.g. 11585 x 11585, far beyond what any pipeline here uses and below PIL's own hard limit (~179M).
DEFAULT_MAX_PIXELS = 1 << 27

# Remote and inline images: bytes read at most (above it the download stops and the image is refused) and the
# seconds a URL may take to answer each read.
DEFAULT_MAX_BYTES = 20 << 20
DEFAULT_TIMEOUT = 10.0

_BASE64_TEXT = re.compile(r"[A-Za-z0-9+/=_\-\s]+")
_MIN_BASE64_CHARS = 64  # shorter strings are always taken as paths


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


def image_string_kind(text: str) -> str:
    """How `load_image` reads a string: "data" (data URI), "url" (http/https), "path" or "base64"."""
    head = text[:16].lower()
    if head.startswith("data:"):
        return "data"
    if head.startswith(("http://", "https://")):
        return "url"
    if len(text) >= _MIN_BASE64_CHARS and _BASE64_TEXT.fullmatch(text) and not os.path.exists(text):
        return "base64"
    return "path"


def _describe_text(text: str) -> str:
    return text if len(text) <= 80 else text[:60] + f"... ({len(text):,} characters)"


def _decode_base64(payload: str, what: str, max_bytes: int) -> bytes:
    payload = "".join(payload.split())
    if len(payload) * 3 // 4 > max_bytes:
        raise ImageLoadError(f"{what} holds about {len(payload) * 3 // 4:,} bytes, above the limit of {max_bytes:,}")
    try:
        if "-" in payload or "_" in payload:
            return base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
        return base64.b64decode(payload + "=" * (-len(payload) % 4), validate=True)
    except (binascii.Error, ValueError) as error:
        raise ImageLoadError(f"{what} is not valid base64: {error}") from None


def _read_data_uri(uri: str, max_bytes: int) -> bytes:
    what = f"data URI {_describe_text(uri)!r}"
    header, comma, payload = uri.partition(",")
    if not comma:
        raise ImageLoadError(f"{what} has no ',' between its header and its data (expected data:image/png;base64,...)")
    media_type, *parameters = header[len("data:"):].split(";")
    if media_type and not media_type.lower().startswith("image/"):
        raise ImageLoadError(f"{what} declares media type {media_type!r}, not an image (image/png, image/jpeg, ...)")
    if "base64" not in (p.strip().lower() for p in parameters):
        raise ImageLoadError(f"{what} is not base64-encoded (expected data:image/...;base64,...)")
    return _decode_base64(payload, what, max_bytes)


def _fetch_url(url: str, timeout: float, max_bytes: int) -> bytes:
    what = f"image URL {_describe_text(url)!r}"
    request = urllib.request.Request(url, headers={"User-Agent": "multigran", "Accept": "image/*"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            declared = response.headers.get("Content-Length")
            if declared is not None and declared.isdigit() and int(declared) > max_bytes:
                raise ImageLoadError(f"{what} is {int(declared):,} bytes, above the limit of {max_bytes:,}")
            data = response.read(max_bytes + 1)
    except urllib.error.HTTPError as error:
        raise ImageLoadError(f"{what} could not be fetched: HTTP {error.code} {error.reason}") from None
    except urllib.error.URLError as error:
        reason = error.reason
        if isinstance(reason, TimeoutError) or "timed out" in str(reason):
            raise ImageLoadError(f"{what} did not answer within {timeout:g} s") from None
        raise ImageLoadError(f"{what} could not be fetched: {reason}") from None
    except TimeoutError:
        raise ImageLoadError(f"{what} did not answer within {timeout:g} s") from None
    except (OSError, ValueError) as error:
        if isinstance(error, ImageLoadError):
            raise
        raise ImageLoadError(f"{what} could not be fetched: {error}") from None
    if len(data) > max_bytes:
        raise ImageLoadError(f"{what} is larger than the limit of {max_bytes:,} bytes")
    return data


def load_image(source, max_pixels: int = DEFAULT_MAX_PIXELS, timeout: float = DEFAULT_TIMEOUT,
               max_bytes: int = DEFAULT_MAX_BYTES) -> Image.Image:
    """Returns an 8-bit RGB PIL image from a path, URL, data URI, base64 text, bytes, PIL image, numpy array or torch
    tensor. `timeout` (seconds) and `max_bytes` apply to URLs, data URIs and base64 text."""
    if isinstance(source, Image.Image):
        _check_pixels(*source.size, _describe(source), max_pixels)
        return _to_rgb(source)
    if isinstance(source, np.ndarray):
        return _from_array(source, max_pixels)
    if type(source).__module__.startswith("torch"):
        return _from_array(source.detach().cpu().float().numpy(), max_pixels)
    if isinstance(source, bytes):
        return _open(io.BytesIO(source), "image bytes", max_pixels)
    if isinstance(source, str):
        kind = image_string_kind(source)
        if kind == "data":
            return _open(io.BytesIO(_read_data_uri(source, max_bytes)), f"data URI {_describe_text(source)!r}",
                         max_pixels)
        if kind == "url":
            return _open(io.BytesIO(_fetch_url(source, timeout, max_bytes)), f"image URL {_describe_text(source)!r}",
                         max_pixels)
        if kind == "base64":
            what = f"base64 image text {_describe_text(source)!r}"
            return _open(io.BytesIO(_decode_base64(source, what, max_bytes)), what, max_pixels)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise ImageLoadError(f"image file {str(path)!r} does not exist")
        with open(path, "rb") as handle:
            return _open(handle, f"image file {str(path)!r}", max_pixels)
    raise TypeError(
        f"cannot read an image from {type(source).__name__}: pass a path, URL, data URI, base64 text, bytes, "
        "PIL image, numpy array or torch tensor"
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
            # Cameras store photos unrotated with an EXIF Orientation tag: show them upright, as transformers'
            # load_image does.
            image = ImageOps.exif_transpose(image)
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


__all__ = ["load_image", "image_string_kind", "ImageLoadError", "DEFAULT_MAX_PIXELS", "DEFAULT_MAX_BYTES",
           "DEFAULT_TIMEOUT"]
