"""Bad input gets one clear error naming the problem (or a documented conversion), never a deep stack trace."""

import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from multigran import MultiGranForConditionalGeneration, MultiGranProcessor
from multigran.cli import main
from multigran.image_io import ImageLoadError, load_image

PROMPT = "USER: <image>\nWhat is it? ASSISTANT:"


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    return MultiGranProcessor.from_pretrained(tiny_model_dir)


def png_bytes(image):
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_truncated_image_file(tmp_path, processor):
    data = png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    path = tmp_path / "cut.png"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match=r"cut\.png' is corrupt or truncated"):
        processor(images=str(path), text=PROMPT)


def test_corrupt_image_file(tmp_path):
    data = bytearray(png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))))
    data[200:260] = b"\xff" * 60  # scramble the compressed pixel data, keep the header intact
    path = tmp_path / "scrambled.png"
    path.write_bytes(bytes(data))
    with pytest.raises(ImageLoadError, match="scrambled.png' is corrupt or truncated"):
        load_image(path)


def test_non_image_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(ImageLoadError, match="notes.txt' is not an image"):
        load_image(path)
    with pytest.raises(ImageLoadError, match="does not exist"):
        load_image(tmp_path / "missing.png")


def bomb_png(width, height):
    """A tiny file whose header claims a huge image (what a decompression bomb looks like before decoding)."""
    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def test_decompression_bomb_is_refused_before_decoding(tmp_path, processor):
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb_png(60_000, 60_000))
    with pytest.raises(ImageLoadError, match=r"bomb.png' is above the pixel limit .*3600000000 pixels"):
        processor(images=str(path), text=PROMPT)
    with pytest.raises(ImageLoadError, match=r"is 20x20 = 400 pixels, above the limit of 100 \(a decompression-bomb"):
        load_image(Image.new("RGB", (20, 20)), max_pixels=100)


def test_image_modes_are_converted_not_rejected(processor):
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red -> white, as transformers composites
    assert np.asarray(load_image(rgba)).tolist() == np.full((8, 8, 3), 255).tolist()
    gray = Image.new("L", (8, 8), 77)
    assert np.asarray(load_image(gray))[0, 0].tolist() == [77, 77, 77]
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red in CMYK
    assert np.asarray(load_image(cmyk))[0, 0].tolist() == [255, 0, 0]
    sixteen = Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16))
    assert np.asarray(load_image(sixteen))[0, 0].tolist() == [255, 255, 255]
    half = np.full((8, 8), 257 * 100, dtype=np.uint16)
    assert np.asarray(load_image(half))[0, 0].tolist() == [100, 100, 100]
    floats = np.full((8, 8, 3), 0.5, dtype=np.float32)
    assert np.asarray(load_image(floats))[0, 0].tolist() == [128, 128, 128]
    channels_first = np.zeros((3, 8, 9), dtype=np.uint8)
    assert load_image(channels_first).size == (9, 8)
    for image in (rgba, gray, cmyk, sixteen, Image.new("P", (8, 8)), Image.new("1", (8, 8))):
        inputs = processor(images=image, text=PROMPT)
        assert inputs["pixel_values"].shape[-3] == 3


def test_malformed_arrays_and_types():
    with pytest.raises(ImageLoadError, match=r"shape \(4, 5, 6, 7\) is not an image"):
        load_image(np.zeros((4, 5, 6, 7)))
    with pytest.raises(ImageLoadError, match="empty"):
        load_image(np.zeros((0, 5, 3), dtype=np.uint8))
    with pytest.raises(TypeError, match="cannot read an image from dict"):
        load_image({"not": "an image"})


def test_image_and_placeholder_counts_must_match(processor):
    image = Image.new("RGB", (32, 32))
    with pytest.raises(ValueError, match=r"got 2 image\(s\) but the prompt\(s\) hold 1 '<image>' placeholder"):
        processor(images=[image, image], text=PROMPT)
    with pytest.raises(ValueError, match=r"got 0 image\(s\) but the prompt\(s\) hold 1"):
        processor(images=None, text=PROMPT)
    with pytest.raises(ValueError, match=r"prompt 1 holds 0 '<image>' placeholder\(s\) but got 1 image"):
        processor(images=[[image], [image]], text=[PROMPT, "no image here"])


def test_prompt_longer_than_context(tmp_path):
    from multigran.tiny import build_tiny

    model, processor = build_tiny(tmp_path / "short")
    processor.tokenizer.model_max_length = 300
    long_prompt = "USER: <image>\n" + "What is shown in this image? " * 40 + "ASSISTANT:"
    with pytest.raises(ValueError, match=r"prompt 0 is \d+ tokens long \(234 visual \+ \d+ text\) but the model's context is 300"):
        processor(images=Image.new("RGB", (70, 45)), text=long_prompt)
    # The model refuses too when handed an over-long sequence directly.
    model.config.text_config.max_position_embeddings = 300
    with pytest.raises(ValueError, match="the prompt is 400 tokens long .* context is 300 tokens"):
        model(input_ids=torch.ones(1, 400, dtype=torch.long))


def test_placeholder_count_mismatch_in_the_model(tiny_model_dir, processor):
    model = MultiGranForConditionalGeneration.from_pretrained(tiny_model_dir)
    inputs = processor(images=Image.new("RGB", (64, 64)), text=PROMPT)
    inputs["input_ids"] = inputs["input_ids"][:, 10:]
    inputs["attention_mask"] = inputs["attention_mask"][:, 10:]
    with pytest.raises(ValueError, match=r"the prompt holds \d+ image tokens but the 1 image\(s\) give \d+ visual tokens"):
        model(**inputs)


def test_cli_reports_bad_input_and_exits_non_zero(tiny_model_dir, tmp_path, capsys):
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb_png(60_000, 60_000))
    code = main(["generate", "--model", str(tiny_model_dir), "--image", str(path), "--prompt", "hi"])
    error = capsys.readouterr().err
    assert code == 2 and error.startswith("multigran: error: image file") and "decompression-bomb guard" in error
    assert main(["generate", "--model", str(tmp_path), "--prompt", "hi"]) == 2
    assert "is not a model directory" in capsys.readouterr().err
