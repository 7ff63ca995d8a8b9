"""The anyres backbone against Hugging Face's own LLaVA-NeXT: same weights, same inputs -> same logits and tokens."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

from multigran import MultiGranForConditionalGeneration, MultiGranProcessor
from multigran.convert import from_llava_next
from multigran.tiny import CHAT_TEMPLATE, tiny_text_config, tiny_vision_config

TILE = 32


def make_hf_checkpoint(path, tokenizer, text="llama", vision="clip", feature_layer=-2, seed=0):
    pinpoints = [[TILE, 2 * TILE], [2 * TILE, TILE], [2 * TILE, 2 * TILE], [3 * TILE, TILE], [TILE, 3 * TILE]]
    strategy = "full" if vision == "siglip" else "default"
    config = LlavaNextConfig(
        vision_config=tiny_vision_config(vision, image_size=TILE, patch_size=4).to_dict(),
        text_config=tiny_text_config(text, vocab_size=len(tokenizer)).to_dict(),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=feature_layer,
        vision_feature_select_strategy=strategy,
    )
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).eval()
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE}, image_grid_pinpoints=pinpoints,
        **({"image_mean": [0.5] * 3, "image_std": [0.5] * 3} if vision == "siglip" else {}),
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=4, vision_feature_select_strategy=strategy,
        num_additional_image_tokens=0 if vision == "siglip" else 1, chat_template=CHAT_TEMPLATE,
    )
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return model, processor


def random_image(width, height, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def prompt(processor, n_images=1, question="What is shown?"):
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tiny_tokenizer):
    src = tmp_path_factory.mktemp("hf")
    hf_model, hf_processor = make_hf_checkpoint(src, tiny_tokenizer)
    dst = from_llava_next(src, tmp_path_factory.mktemp("mg") / "model")
    ours = MultiGranForConditionalGeneration.from_pretrained(dst).eval()
    our_processor = MultiGranProcessor.from_pretrained(dst)
    for p in (hf_processor, our_processor):
        p.tokenizer.padding_side = "left"
    return hf_model, hf_processor, ours, our_processor


def run_both(pair, images, texts, new_tokens=8):
    hf_model, hf_processor, ours, our_processor = pair
    hf_inputs = hf_processor(images=images, text=texts, return_tensors="pt", padding=True)
    our_inputs = our_processor(images=images, text=texts)
    assert torch.equal(hf_inputs["input_ids"], our_inputs["input_ids"])  # identical token accounting
    assert torch.equal(hf_inputs["attention_mask"], our_inputs["attention_mask"])
    if images:
        assert torch.equal(hf_inputs["pixel_values"], our_inputs["pixel_values"])
    with torch.no_grad():
        hf_logits = hf_model(**hf_inputs).logits
        our_logits = ours(**our_inputs).logits
        torch.testing.assert_close(our_logits, hf_logits, atol=1e-5, rtol=0)
        hf_tokens = hf_model.generate(**hf_inputs, max_new_tokens=new_tokens, do_sample=False)
        our_tokens = ours.generate(**our_inputs, max_new_tokens=new_tokens, do_sample=False)
    assert torch.equal(hf_tokens, our_tokens)
    return our_inputs


@pytest.mark.parametrize("size", [(64, 64), (120, 40), (40, 120), (5, 7), (97, 61)], ids=["square", "wide", "tall", "tiny", "odd"])
def test_single_image_matches_hugging_face(pair, size):
    inputs = run_both(pair, [random_image(*size, seed=sum(size))], prompt(pair[1]))
    assert (inputs["input_ids"] == pair[2].config.image_token_id).sum() > 64  # the image really is in the prompt


def test_batch_of_two_sizes_with_left_padding(pair):
    images = [random_image(64, 64, 1), random_image(96, 30, 2)]
    texts = [prompt(pair[1]), prompt(pair[1], question="Describe the picture in detail please.")]
    inputs = run_both(pair, images, texts)
    assert (inputs["attention_mask"][:, 0] == 0).any()  # one prompt is really left-padded


def test_prompt_with_two_images(pair):
    run_both(pair, [random_image(50, 80, 3), random_image(80, 50, 4)], prompt(pair[1], n_images=2))


def test_text_only_prompt(pair):
    hf_model, hf_processor, ours, our_processor = pair
    text = hf_processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": "Hello there"}]}], add_generation_prompt=True
    )
    run_both(pair, None, text)


@pytest.mark.parametrize(
    "text,vision,layer",
    [("mistral", "clip", -2), ("qwen2", "clip", [-2, -1]), ("llama", "siglip", -1)],
)
def test_other_language_models_and_towers(tmp_path, tiny_tokenizer, text, vision, layer):
    hf_model, hf_processor = make_hf_checkpoint(tmp_path / "hf", tiny_tokenizer, text, vision, layer, seed=1)
    dst = from_llava_next(tmp_path / "hf", tmp_path / "mg")
    ours = MultiGranForConditionalGeneration.from_pretrained(dst).eval()
    assert type(ours.language_model).__name__.lower().startswith(text)
    assert type(ours.vision_tower).__name__.lower().startswith(vision)
    our_processor = MultiGranProcessor.from_pretrained(dst)
    image = random_image(70, 45, 5)
    with torch.no_grad():
        hf_logits = hf_model(**hf_processor(images=image, text=prompt(hf_processor), return_tensors="pt")).logits
        our_logits = ours(**our_processor(images=image, text=prompt(our_processor))).logits
    torch.testing.assert_close(our_logits, hf_logits, atol=1e-5, rtol=0)


def test_converted_checkpoint_keeps_transformers_unpad_rounding(pair):
    # llava-hf checkpoints run with transformers' `int(round(x, 7))` unpad: the converter says so in model and processor
    # (checkpoints of the original LLaVA code base get "truncate", convert/avg_llava.py).
    _, _, ours, our_processor = pair
    assert ours.config.method_settings["unpad_rounding"] == "hf"
    assert our_processor.image_processor.method_settings["unpad_rounding"] == "hf"
    assert ours.visual.settings.unpad_rounding == "hf"
