"""Images named in requests: data URIs, base64 text and http(s) URLs for everyone; local files only under the one
folder the operator allows (`--allowed-local-media-path`)."""

import os
from dataclasses import dataclass

from ..image_io import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, DEFAULT_TIMEOUT, ImageLoadError, image_string_kind, \
    load_image
from .schema import RequestError


@dataclass
class MediaPolicy:
    allowed_local_path: str | None = None  # None: no local file may be read
    timeout: float = DEFAULT_TIMEOUT
    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS


def local_path(url: str, param: str, policy: MediaPolicy) -> str:
    """A file path or file:// URL -> its real path, if it lies inside the allowed folder."""
    path = url[len("file://"):] if url.startswith("file://") else url
    if policy.allowed_local_path is None:
        raise RequestError(f"{param}: {url[:80]!r} is a local path, and this server reads no local files (start it "
                           "with --allowed-local-media-path DIR), nor is it a data URI or an http(s) URL", param,
                           "invalid_image")
    root = os.path.realpath(policy.allowed_local_path)
    real = os.path.realpath(path if os.path.isabs(path) else os.path.join(root, path))
    if os.path.commonpath([root, real]) != root:
        raise RequestError(f"{param}: {url[:80]!r} is outside the allowed media folder", param, "invalid_image")
    return real


def load_request_image(url: str, param: str, policy: MediaPolicy):
    """One request image -> RGB PIL image, or a RequestError naming `param` and what was wrong."""
    source = url
    if url.startswith("file://") or image_string_kind(url) == "path":
        source = local_path(url, param, policy)
    try:
        return load_image(source, max_pixels=policy.max_pixels, timeout=policy.timeout, max_bytes=policy.max_bytes)
    except (ImageLoadError, TypeError, OSError) as error:
        raise RequestError(f"{param}: {error}", param, "invalid_image") from None
