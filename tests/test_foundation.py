"""Package surface: Auto classes, processor inputs, converter errors, CLI, real-size parameter counts."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoProcessor,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
)

import multigran
from multigran import MultiGranConfig, MultiGranForConditionalGeneration, MultiGranProcessor
from multigran.cli import main
from multigran.convert import CheckpointMismatchError, from_llava_next
from multigran.pipelines.anyres import count_anyres_tokens


def test_auto_classes_load_a_saved_directory(tiny_model_dir):
    config = AutoConfig.from_pretrained(tiny_model_dir)
    assert isinstance(config, MultiGranConfig) and config.model_type == "multigran" and config.method == "anyres"
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    assert isinstance(model, MultiGranForConditionalGeneration)
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    assert isinstance(processor, MultiGranProcessor)
    reference = MultiGranForConditionalGeneration.from_pretrained(tiny_model_dir)
    for (name, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), name


def test_unknown_method_and_settings_are_rejected():
    from multigran.tiny import tiny_config

    with pytest.raises(ValueError, match="unknown method 'nope'"):
        MultiGranForConditionalGeneration(tiny_config(method="nope"))
    with pytest.raises(ValueError, match="unknown method_settings"):
        MultiGranForConditionalGeneration(tiny_config(method_settings={"granularity": 3}))


def test_processor_accepts_pil_numpy_and_paths(tiny_model_dir, tmp_path):
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    array = np.random.default_rng(0).integers(0, 256, (45, 70, 3), dtype=np.uint8)
    path = tmp_path / "image.png"
    Image.fromarray(array).save(path)
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}], add_generation_prompt=True
    )
    assert text == "USER: <image>\nWhat? ASSISTANT:"
    outputs = [processor(images=image, text=text) for image in (Image.fromarray(array), array, str(path), path)]
    for other in outputs[1:]:
        assert torch.equal(other["input_ids"], outputs[0]["input_ids"])
        assert torch.equal(other["pixel_values"], outputs[0]["pixel_values"])
    # The placeholder became exactly the visual-token count of a 70x45 image, by hand for the tiny geometry (tile 32,
    # grid 8): the best (h, w) pinpoint is 64x64 (effective 64x41 = 2624 pixels beats 32x64's 49x32 = 1568) -> 2x2
    # tiles -> a 16x16 stitched grid; the image is wider than the grid, so rows are cut: round(45 * 16 / 70) = 10 rows
    # kept -> 64 base tokens + 10 rows x (16 + 1 newline) = 234.
    n_image_tokens = int((outputs[0]["input_ids"] == processor.image_token_id).sum())
    assert n_image_tokens == 64 + 10 * (16 + 1)
    assert n_image_tokens == count_anyres_tokens((45, 70), processor.image_processor.image_grid_pinpoints, 32, 8)


def test_apply_chat_template_tokenizes_with_images(tiny_model_dir, tmp_path):
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    path = tmp_path / "image.png"
    Image.fromarray(np.zeros((40, 40, 3), dtype=np.uint8)).save(path)
    messages = [{"role": "user", "content": [{"type": "image", "path": str(path)}, {"type": "text", "text": "Hi"}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    direct = processor(images=str(path), text="USER: <image>\nHi ASSISTANT:")
    assert torch.equal(torch.as_tensor(inputs["input_ids"]), direct["input_ids"])


def make_hf_dir(path, tokenizer):
    from multigran.tiny import tiny_text_config, tiny_vision_config

    config = LlavaNextConfig(
        vision_config=tiny_vision_config().to_dict(), text_config=tiny_text_config(vocab_size=len(tokenizer)).to_dict(),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]],
    )
    LlavaNextForConditionalGeneration(config).save_pretrained(path)
    from transformers import LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    LlavaNextProcessor(
        image_processor=LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer, patch_size=4, vision_feature_select_strategy="default", num_additional_image_tokens=1,
    ).save_pretrained(path)


def test_converter_names_missing_unexpected_and_misshaped_keys(tmp_path, tiny_tokenizer):
    src = tmp_path / "hf"
    make_hf_dir(src, tiny_tokenizer)
    weights = load_file(src / "model.safetensors")
    # transformers saves LLaVA-NeXT in its original key layout (`image_newline`, `multi_modal_projector.*`)
    weights.pop("image_newline")
    weights["extra_head.weight"] = torch.zeros(2)
    weights["multi_modal_projector.linear_1.bias"] = torch.zeros(7)
    save_file(weights, src / "model.safetensors")
    with pytest.raises(CheckpointMismatchError) as error:
        from_llava_next(src, tmp_path / "out")
    message = str(error.value)
    assert "missing keys (1): visual.image_newline" in message
    assert "unexpected keys (1): extra_head.weight" in message
    assert "visual.projector.linear_1.bias: checkpoint (7,) vs model (64,)" in message
    assert not (tmp_path / "out" / "model.safetensors").exists()  # nothing half-written


def test_converter_rejects_other_model_types(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(CheckpointMismatchError, match="expected 'llava_next'"):
        from_llava_next(tmp_path, tmp_path / "out")


def test_convert_cli_writes_a_loadable_directory(tmp_path, tiny_tokenizer, capsys):
    make_hf_dir(tmp_path / "hf", tiny_tokenizer)
    assert main(["convert", "llava-next", str(tmp_path / "hf"), str(tmp_path / "mg")]) == 0
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "mg")
    assert model.config.image_grid_pinpoints == [[32, 64], [64, 32], [64, 64]]
    assert main(["convert", "llava-next", str(tmp_path / "nowhere"), str(tmp_path / "x")]) == 2
    assert "nowhere" in capsys.readouterr().err  # the message names the missing source


def test_generate_cli_streams_the_greedy_answer(tiny_model_dir, tmp_path, capsys):
    image = tmp_path / "image.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (50, 80, 3), dtype=np.uint8)).save(image)
    code = main(["generate", "--model", str(tiny_model_dir), "--image", str(image), "--prompt", "What is it?",
                 "--max-new-tokens", "6", "--device", "cpu", "--dtype", "float32"])
    assert code == 0
    streamed = capsys.readouterr().out
    model = MultiGranForConditionalGeneration.from_pretrained(tiny_model_dir).eval()
    processor = MultiGranProcessor.from_pretrained(tiny_model_dir)
    inputs = processor(images=str(image), text="USER: <image>\nWhat is it? ASSISTANT:")
    tokens = model.generate(**inputs, max_new_tokens=6, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    expected = processor.decode(tokens, skip_special_tokens=True)
    assert expected and streamed.strip() == expected.strip()


def test_generate_cli_runs_in_bfloat16(tiny_model_dir, tmp_path, capsys):
    image = tmp_path / "image.png"
    Image.fromarray(np.zeros((40, 40, 3), dtype=np.uint8)).save(image)
    code = main(["generate", "--model", str(tiny_model_dir), "--image", str(image), "--prompt", "Hi",
                 "--max-new-tokens", "3", "--dtype", "bfloat16"])
    assert code == 0, capsys.readouterr().err


def test_console_script_exits_non_zero_with_one_line_message(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    result = subprocess.run(
        [sys.executable, "-m", "multigran.cli", "generate", "--model", str(tiny_model_dir), "--image", str(bad),
         "--prompt", "hi"], capture_output=True, text=True,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert f"image file '{bad}' is not an image" in result.stderr


def vicuna_7b_llava_next_configs():
    text = dict(model_type="llama", vocab_size=32064, hidden_size=4096, intermediate_size=11008,
                num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
    ours = MultiGranConfig(text_config=dict(text), image_token_id=32000)
    hf = LlavaNextConfig(vision_config=ours.vision_config.to_dict(), text_config=dict(text), image_token_index=32000)
    return ours, hf


def test_real_size_parameter_count_equals_hugging_face_llava_next():
    ours_config, hf_config = vicuna_7b_llava_next_configs()
    with torch.device("meta"):
        ours = MultiGranForConditionalGeneration(ours_config)
        reference = LlavaNextForConditionalGeneration(hf_config)
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in reference.parameters())
    # Independent figure from the layer shapes: Llama-7B (V 32064, D 4096, I 11008, 32 layers) + CLIP ViT-L/14-336
    # vision (patch conv, CLS, 577 positions, pre-LN, 24 layers, post-LN) + projector + newline.
    V, D, I, L = 32064, 4096, 11008, 32
    llama = 2 * V * D + L * (4 * D * D + 3 * D * I + 2 * D) + D
    d, i = 1024, 4096
    clip = 3 * 14 * 14 * d + d + 577 * d + 2 * d + 24 * (4 * (d * d + d) + (d * i + i) + (i * d + d) + 4 * d) + 2 * d
    projector = (d * D + D) + (D * D + D)
    assert count == llama + clip + projector + D == 7_063_431_168


@pytest.mark.parametrize("layout", ["transformers4", "transformers5"])
def test_converter_reads_both_key_layouts(tmp_path, tiny_tokenizer, layout):
    """Hub checkpoints saved by transformers 4 nest CLIP under `vision_model.`; version 5 nests the LM under
    `model.language_model.`. Both convert to the same multigran weights."""
    src = tmp_path / "hf"
    make_hf_dir(src, tiny_tokenizer)
    original = load_file(src / "model.safetensors")
    renamed = {}
    for key, value in original.items():
        if layout == "transformers4" and key.startswith("vision_tower."):
            key = "vision_tower.vision_model." + key[len("vision_tower."):]
        if layout == "transformers5":
            key = {"image_newline": "model.image_newline"}.get(key, key)
            for old, new in (("multi_modal_projector.", "model.multi_modal_projector."),
                             ("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
                             ("vision_tower.", "model.vision_tower.")):
                if key.startswith(old):
                    key = new + key[len(old):]
                    break
        renamed[key] = value
    save_file(renamed, src / "model.safetensors")
    from_llava_next(src, tmp_path / "out")
    converted = load_file(tmp_path / "out" / "model.safetensors")
    reference = LlavaNextForConditionalGeneration.from_pretrained(src)
    ours = MultiGranForConditionalGeneration.from_pretrained(tmp_path / "out")
    assert torch.equal(converted["visual.image_newline"], original["image_newline"])
    assert torch.equal(ours.vision_tower.embeddings.patch_embedding.weight,
                       reference.model.vision_tower.embeddings.patch_embedding.weight)
    assert torch.equal(ours.language_model.lm_head.weight, reference.lm_head.weight)
