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


def exif_jpeg(path, orientation):
    """A 60x30 JPEG, red left half and blue right half, with an EXIF Orientation tag."""
    pixels = np.zeros((30, 60, 3), dtype=np.uint8)
    pixels[:, :30] = (255, 0, 0)
    pixels[:, 30:] = (0, 0, 255)
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = orientation
    image.save(path, format="JPEG", exif=exif.tobytes(), quality=95)
    return pixels


def test_exif_orientation_is_applied_as_transformers_does(tmp_path):
    from transformers.image_utils import load_image as hf_load_image

    path = tmp_path / "rotated.jpg"
    pixels = exif_jpeg(path, orientation=6)  # 6: the camera was turned 90 degrees: rotate 90 clockwise to view
    ours = np.asarray(load_image(path)).astype(int)
    assert ours.shape == (60, 30, 3)
    assert np.abs(ours - np.asarray(hf_load_image(str(path))).astype(int)).max() <= 1
    upright = np.rot90(pixels, k=-1)  # clockwise: the red left half is now on top
    assert np.abs(ours[5:25] - upright[5:25]).max() < 40 and np.abs(ours[35:55] - upright[35:55]).max() < 40
    assert load_image(path.read_bytes()).size == (30, 60)
    plain = tmp_path / "plain.jpg"
    exif_jpeg(plain, orientation=1)
    assert load_image(plain).size == (60, 30)


def test_processor_text_and_granularity_are_validated(processor, tmp_path):
    from multigran.tiny import build_tiny

    image = Image.new("RGB", (32, 32))
    for text in ([1, 2, 3], 123, [], [None]):
        with pytest.raises(TypeError, match="text must be a prompt string or a non-empty list of them"):
            processor(images=image, text=text)
    _, avg = build_tiny(method="avg")
    levels = "\\[4, 8, 16, 32, 64\\]"
    for value in (0, -1, "abc", 1.5, True, "16.5", float("nan")):
        with pytest.raises(ValueError, match=f"granularity {value!r} is not one of this model's levels {levels}"):
            avg(images=image, text=PROMPT, granularity=value)
    assert avg(images=image, text=PROMPT, granularity="16")["image_granularity"].tolist() == [16]
    assert avg(images=image, text=PROMPT, granularity=16.0)["image_granularity"].tolist() == [16]
    with pytest.raises(ValueError, match="max_pixels must be a positive int"):
        type(processor.image_processor)(max_pixels=0)


def test_router_knobs_are_validated():
    from multigran.pipelines.granularity import choose_granularity

    logits, levels, counts = torch.zeros(3), [36, 144, 576], [100, 400, 1600]
    for bias in (float("nan"), float("inf"), "abc", None):
        with pytest.raises(ValueError, match="granularity_bias must be a finite number"):
            choose_granularity(logits, levels, granularity_bias=bias, token_counts=counts)
    for budget in (0, -5, 2.5, True):
        with pytest.raises(ValueError, match="max_visual_tokens must be a positive int"):
            choose_granularity(logits, levels, max_visual_tokens=budget, token_counts=counts)
    assert choose_granularity(logits, levels, max_visual_tokens=400, token_counts=counts)[1] in (36, 144)


def test_recipe_values_are_range_checked():
    from multigran.train.recipe import load_recipe

    name = "anyres/stage2_finetune.yaml"
    for override, message in [
            ("training.max_steps=-1", r"training.max_steps must be an integer >= 1, got -1"),
            ("training.max_steps=0", r"training.max_steps must be an integer >= 1, got 0"),
            ("training.per_device_train_batch_size=0", "per_device_train_batch_size must be an integer >= 1"),
            ("training.gradient_accumulation_steps=1.5", "gradient_accumulation_steps must be an integer"),
            ("training.num_train_epochs=.nan", r"num_train_epochs must be a finite number > 0"),
            ("training.learning_rate=-1", "learning_rate must be a finite number > 0"),
            ("trainable.language_model=.nan", r"trainable\['language_model'\] must be a positive learning rate"),
            ("trainable.language_model=0", r"trainable\['language_model'\] must be a positive learning rate"),
            ("data.max_length=0", "data.max_length must be an integer >= 1"),
            ("data.template=bogus", "data.template 'bogus' is not one of"),
            ("lora.r=0", "lora.r must be an integer >= 1"),
            ("training.deepspeed=zero9.json", "training.deepspeed 'zero9.json' does not exist"),
    ]:
        with pytest.raises(ValueError, match=message):
            load_recipe(name, [override])
    assert load_recipe(name, ["training.max_steps=5"]).training["max_steps"] == 5


def test_recipes_run_without_deepspeed_by_default_and_name_it_when_asked(tmp_path, monkeypatch):
    import importlib.util

    from multigran.train.recipe import SHIPPED_RECIPES, check_engine_installed, load_recipe

    for path in sorted(SHIPPED_RECIPES.rglob("*.yaml")):
        if path.parent.name in ("fsdp",) or "stage:" in path.read_text():
            continue
        recipe = load_recipe(str(path))
        assert not recipe.training.get("deepspeed"), f"{path} defaults to DeepSpeed"
    monkeypatch.chdir(tmp_path)  # no recipes/ folder here: the name resolves to the config shipped in the package
    recipe = load_recipe("uhd/stage1_pretrain.yaml", ["training.deepspeed=recipes/deepspeed/zero2.json"])
    assert recipe.training["deepspeed"] == str(SHIPPED_RECIPES / "deepspeed" / "zero2.json")  # the shipped config
    if importlib.util.find_spec("deepspeed") is None:
        with pytest.raises(ValueError, match=r"training.deepspeed is set .* pip install 'multigran\[deepspeed\]'"):
            check_engine_installed(recipe)
    else:
        check_engine_installed(recipe)


def test_recipe_default_paths_say_which_key_to_set(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the shipped recipes' data paths are relative examples: absent here
    data = tmp_path / "data.json"
    data.write_text("[]")
    for overrides, message in [
            ([], "model 'checkpoints/mg-init' is not a multigran model directory (no config.json): set model=DIR"),
            ([f"model={tiny_model_dir}"], "training data 'data/mg_llava/pretrain.json' does not exist: set data.path"),
            ([f"model={tiny_model_dir}", f"data.path={data}", f"data.image_folder={tmp_path}"],
             "data.box_file 'data/mg_llava/pretrain_boxes.json' does not exist: set data.box_file=PATH"),
    ]:
        assert main(["train", "--recipe", "mg/stage1_pretrain.yaml", *overrides]) == 2
        assert message in capsys.readouterr().err


def test_cli_options_and_settings_name_the_option(tiny_model_dir, tmp_path, capsys):
    for argv, message in [
            (["generate", "--model", str(tiny_model_dir), "--prompt", "hi", "--granularity", "abc"], "--granularity"),
            (["switch-method", str(tiny_model_dir), str(tmp_path / "a"), "--to", "avg", "--settings", '{"x": '],
             "--settings '{\"x\": ': not valid JSON (line 1, column 7"),
            (["switch-method", str(tiny_model_dir), str(tmp_path / "b"), "--to", "avg", "--settings", "[1]"],
             "--settings: expected a JSON object"),
            (["switch-method", str(tiny_model_dir), str(tmp_path / "c"), "--to", "avg", "--settings",
              '{"granularity_bias": NaN}'], "NaN is not a number JSON allows here"),
            (["switch-method", str(tiny_model_dir), str(tmp_path / "d"), "--to", "bogus"], "--to 'bogus'"),
            (["init-tiny", str(tmp_path / "e"), "--method", "bogus"], "--method 'bogus'"),
            (["generate", "--model", str(tiny_model_dir), "--prompt", "hi", "--max-new-tokens", "x"],
             "argument --max-new-tokens"),
    ]:
        assert main(argv) == 2
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and error.startswith("multigran: error: ") and message in error, error
    assert not any(p.name in "abcde" for p in tmp_path.iterdir())
