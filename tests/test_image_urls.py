"""load_image on http(s) URLs (a local server on 127.0.0.1), data URIs and bare base64 text."""

import base64
import io
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from multigran.image_io import ImageLoadError, image_string_kind, load_image


def png_bytes(width=6, height=4, color=(10, 200, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, "PNG")
    return buffer.getvalue()


PNG = png_bytes()
_noise = io.BytesIO()
Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(_noise, "PNG")
TRUNCATED = _noise.getvalue()[:1500]  # a noise PNG cut inside its pixel data
BIG = png_bytes(400, 400)  # noise would be bigger; a flat 400x400 PNG is still > 1 KB below
BIG = BIG + b"\0" * max(0, 5000 - len(BIG))


class Handler(BaseHTTPRequestHandler):
    routes = {
        "/ok.png": (200, "image/png", PNG),
        "/mislabelled.txt": (200, "text/plain", PNG),  # the content decides, not the header
        "/page.html": (200, "text/html", b"<html><body>not an image</body></html>"),
        "/truncated.png": (200, "image/png", TRUNCATED),
        "/big.png": (200, "image/png", BIG),
    }

    def do_GET(self):
        if self.path == "/slow.png":
            time.sleep(1.5)
        if self.path in ("/slow.png", "/chunked.png"):
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()  # no Content-Length: the reader must stop at the cap itself
            self.wfile.write(BIG if self.path == "/chunked.png" else PNG)
            return
        status, kind, body = self.routes.get(self.path, (404, "text/plain", b"missing"))
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        pass  # a client that stops reading at its size cap breaks the pipe: expected here


@pytest.fixture(scope="module")
def http_base():
    server = QuietServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_url_image_is_fetched_and_decoded(http_base):
    image = load_image(f"{http_base}/ok.png")
    assert image.mode == "RGB" and image.size == (6, 4)
    assert np.asarray(image)[0, 0].tolist() == [10, 200, 30]
    assert load_image(f"{http_base}/mislabelled.txt").size == (6, 4)


@pytest.mark.parametrize("path, expected", [
    ("/page.html", "not an image PIL can read"),
    ("/truncated.png", "corrupt or truncated"),
    ("/nothing-here.png", "HTTP 404"),
])
def test_url_errors_name_the_url_and_the_reason(http_base, path, expected):
    with pytest.raises(ImageLoadError, match=expected) as error:
        load_image(f"{http_base}{path}")
    assert f"{http_base}{path}" in str(error.value)


def test_url_size_cap_with_and_without_content_length(http_base):
    assert len(BIG) > 2000
    with pytest.raises(ImageLoadError, match=f"{len(BIG):,} bytes, above the limit of 2,000"):
        load_image(f"{http_base}/big.png", max_bytes=2000)
    with pytest.raises(ImageLoadError, match="larger than the limit of 2,000 bytes"):
        load_image(f"{http_base}/chunked.png", max_bytes=2000)
    assert load_image(f"{http_base}/chunked.png", max_bytes=len(BIG)).size == (400, 400)


def test_url_timeout(http_base):
    with pytest.raises(ImageLoadError, match="did not answer within 0.3 s"):
        load_image(f"{http_base}/slow.png", timeout=0.3)


def test_unreachable_url():
    with pytest.raises(ImageLoadError, match="could not be fetched"):
        load_image("http://127.0.0.1:9/none.png", timeout=2)


def test_data_uri_and_bare_base64():
    text = base64.b64encode(PNG).decode()
    for source in (f"data:image/png;base64,{text}", text, f"data:;base64,{text}",
                   base64.urlsafe_b64encode(PNG).decode().rstrip("=")):
        image = load_image(source)
        assert image.size == (6, 4) and np.asarray(image)[1, 1].tolist() == [10, 200, 30]
    assert image_string_kind(text) == "base64" and image_string_kind("cat.png") == "path"
    assert image_string_kind("HTTPS://x/y.png") == "url" and image_string_kind("data:image/png;base64,AA") == "data"


@pytest.mark.parametrize("uri, expected", [
    ("data:text/plain;base64,aGVsbG8=", "declares media type 'text/plain', not an image"),
    ("data:image/png;base64,@@@@", "is not valid base64"),
    ("data:image/png,rawtext", "is not base64-encoded"),
    ("data:image/png;base64", "has no ','"),
    ("data:image/png;base64," + base64.b64encode(b"hello world, not a picture").decode(), "not an image PIL can read"),
    ("data:image/png;base64," + base64.b64encode(TRUNCATED).decode(), "corrupt or truncated"),
])
def test_bad_data_uris(uri, expected):
    with pytest.raises(ImageLoadError, match=expected):
        load_image(uri)


def test_data_uri_size_cap_applies_before_decoding():
    uri = "data:image/png;base64," + base64.b64encode(BIG).decode()
    with pytest.raises(ImageLoadError, match="above the limit of 1,000"):
        load_image(uri, max_bytes=1000)


def test_base64_like_text_that_is_an_existing_file_is_a_path(tmp_path):
    name = tmp_path / ("A" * 70)
    name.write_bytes(PNG)
    assert image_string_kind(str(name)) == "path"
    assert load_image(str(name)).size == (6, 4)
