"""AVG-LLaVA in the model: token accounting, the router in "auto" mode, one knob everywhere, budgets, bad input."""

import numpy as np
import pytest
import torch
from PIL import Image

from multigran import MultiGranForConditionalGeneration
from multigran.cli import main
from multigran.configuration import MultiGranConfig
from multigran.pipelines.granularity import select_instruction_tokens
from multigran.processing import MultiGranImageProcessor, MultiGranProcessor
from multigran.tiny import build_tiny, build_tiny_tokenizer, tiny_text_config, tiny_vision_config

PROMPT = "USER: <image>\nWhat colour is the small dot? ASSISTANT:"


def image(width, height, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def clip_l_geometry(compat=True, granularity="auto"):
    """A CLIP-L/336-geometry tower (336 px, patch 14 -> 24x24 grid) of tiny width, and a tiny LLM."""
    tokenizer = build_tiny_tokenizer()
    vision = tiny_vision_config(image_size=336, patch_size=14, hidden_size=16)
    vision.num_hidden_layers = 1
    config = MultiGranConfig(
        vision_config=vision, text_config=tiny_text_config(vocab_size=len(tokenizer), hidden_size=32),
        method="avg", method_settings={"compat": compat, "granularity": granularity},
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(0)
    model = MultiGranForConditionalGeneration(config).eval()
    image_processor = MultiGranImageProcessor(method="avg", method_settings=config.method_settings, patch_size=14)
    return model, MultiGranProcessor(image_processor=image_processor, tokenizer=tokenizer)


# The spec's reference counts (shared/spec/avg-llava.md), level tokens -> visual tokens of the image.
COMPAT = {(672, 672): {576: 2928, 288: 888, 144: 744, 72: 228, 36: 192},
          (1000, 500): {576: 1752, 288: 588, 144: 444, 72: 150, 36: 114}}
CORRECTED = {(672, 672): {576: 2928, 288: 1488, 144: 744, 72: 384, 36: 192}}


@pytest.mark.parametrize("compat", [True, False])
def test_processor_and_model_counts_match_the_spec_table(compat):
    model, processor = clip_l_geometry(compat=compat)
    assert model.visual.level_tokens == [36, 72, 144, 288, 576]
    table = COMPAT if compat else CORRECTED
    for (width, height), expected in table.items():
        picture = image(width, height)
        for level, tokens in expected.items():
            inputs = processor(images=picture, text=PROMPT, granularity=level)
            assert int((inputs["input_ids"] == processor.image_token_id).sum()) == tokens
            with torch.no_grad():
                out = model(**inputs)
            assert out.image_token_counts == [tokens]


@pytest.fixture(scope="module")
def tiny_avg():
    # 64-px tiles, patch 8 -> an 8x8 grid: levels 4/8/16/32/64 tokens per crop.
    return build_tiny(None, method="avg", image_size=64, patch_size=8, seed=3)


def test_auto_mode_gives_the_llm_exactly_the_chosen_tokens(tiny_avg):
    model, processor = tiny_avg
    inputs = processor(images=image(100, 60), text=PROMPT, granularity="auto")
    assert int((inputs["input_ids"] == processor.image_token_id).sum()) == 1  # one placeholder, settled by the model
    seen = {}
    def record(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"]

    hook = model.language_model.register_forward_pre_hook(record, with_kwargs=True)
    with torch.no_grad():
        out = model(**inputs)
    hook.remove()
    report = out.visual_report[0]
    assert report["mode"] == "auto" and report["granularity"] in model.visual.level_tokens
    assert abs(sum(report["router_probabilities"]) - 1) < 1e-5
    text_tokens = inputs["input_ids"].shape[1] - 1
    assert seen["embeds"].shape[1] == text_tokens + report["visual_tokens"]  # no placeholder padding left
    # ... and the chosen count is the count of a fixed run at that granularity.
    fixed = processor(images=image(100, 60), text=PROMPT, granularity=report["granularity"])
    assert report["visual_tokens"] == int((fixed["input_ids"] == processor.image_token_id).sum())
    with torch.no_grad():
        torch.testing.assert_close(model(**fixed).logits, out.logits)


def test_generate_auto_equals_generate_at_the_chosen_level(tiny_avg):
    model, processor = tiny_avg
    inputs = processor(images=image(100, 60), text=PROMPT, granularity="auto")
    auto = model.generate(**inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    chosen = auto.visual_report[0]["granularity"]
    fixed = processor(images=image(100, 60), text=PROMPT, granularity=chosen)
    reference = model.generate(**fixed, max_new_tokens=4, do_sample=False)
    # The caller's prompt comes back as passed, followed by the same answer.
    assert torch.equal(auto.sequences[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
    assert torch.equal(auto.sequences[:, inputs["input_ids"].shape[1]:], reference[:, fixed["input_ids"].shape[1]:])


def test_one_knob_in_generate_processor_and_config(tiny_avg):
    model, processor = tiny_avg
    by_processor = model.generate(**processor(images=image(80, 80), text=PROMPT, granularity=16), max_new_tokens=3,
                                  do_sample=False, return_dict_in_generate=True)
    auto_inputs = processor(images=image(80, 80), text=PROMPT)
    by_generate = model.generate(**auto_inputs, granularity=16, max_new_tokens=3, do_sample=False,
                                 return_dict_in_generate=True)
    assert by_processor.visual_report == by_generate.visual_report
    assert by_generate.visual_report[0]["granularity"] == 16
    prompt_length = auto_inputs["input_ids"].shape[1]
    assert torch.equal(by_generate.sequences[:, prompt_length:], by_processor.sequences[:, -3:])
    # The config default: a model saved with granularity 8 uses it when nothing else is said.
    configured, configured_processor = build_tiny(None, method="avg", image_size=64, patch_size=8, seed=3,
                                                  method_settings={"granularity": 8})
    inputs = configured_processor(images=image(80, 80), text=PROMPT)
    assert inputs["image_granularity"].tolist() == [8]
    with torch.no_grad():
        assert configured(**inputs).visual_report[0]["granularity"] == 8


def test_batched_prompts_get_their_own_granularities(tiny_avg):
    model, processor = tiny_avg
    processor.tokenizer.padding_side = "left"
    small, large = image(40, 40, 1), image(190, 60, 2)
    counts = {g: [processor.count_image_tokens(x, granularity=g)[0] for x in (small, large)]
              for g in model.visual.level_tokens}
    # A per-image budget that the small image fits at the finest level and the large one only at coarse levels.
    budget = counts[64][0]
    assert counts[64][1] > budget and counts[4][1] <= budget
    inputs = processor(images=[small, large], text=[PROMPT, PROMPT], granularity="auto")
    with torch.no_grad():
        out = model(**inputs, granularity_bias=-1000.0, max_visual_tokens=budget)  # bias < 0: prefer fine levels
    report = out.visual_report
    assert report[0]["granularity"] == 64  # the finest that fits
    assert report[1]["granularity"] == max(g for g in model.visual.level_tokens if counts[g][1] <= budget)
    # Mixed: one image fixed, one routed, in the same batch.
    mixed = processor(images=[small, large], text=[PROMPT, PROMPT], granularity=[4, "auto"])
    with torch.no_grad():
        report = model(**mixed).visual_report
    assert report[0] == {"granularity": 4, "mode": "fixed", "router_probabilities": None,
                         "visual_tokens": counts[4][0]}
    assert report[1]["mode"] == "auto"


def test_budget_and_bias_steer_the_router(tiny_avg):
    model, processor = tiny_avg
    inputs = processor(images=image(120, 90), text=PROMPT)
    with torch.no_grad():
        assert model(**inputs, granularity_bias=1000.0).visual_report[0]["granularity"] == 4  # cost wins: coarsest
        assert model(**inputs, granularity_bias=-1000.0).visual_report[0]["granularity"] == 64
        coarsest = processor.count_image_tokens(image(120, 90), granularity=4)[0]
        with pytest.raises(ValueError, match=r"max_visual_tokens=\d+ is below the coarsest level"):
            model(**inputs, max_visual_tokens=coarsest - 1)
        assert model(**inputs, max_visual_tokens=coarsest).visual_report[0]["granularity"] == 4


def test_each_image_reads_its_own_prompt(tiny_avg):
    model, processor = tiny_avg
    processor.tokenizer.padding_side = "right"
    images = [image(64, 64, 5), image(90, 50, 6), image(50, 90, 7)]
    texts = ["USER: <image>\n<image>\nWhich one is brighter? ASSISTANT:", "USER: <image>\nCount the dots. ASSISTANT:"]
    inputs = processor(images=images, text=texts)
    with torch.no_grad():
        report = model(**inputs).visual_report
        # Independent computation: the router on each image's crops with its own prompt's token embeddings.
        crops = model.visual.encode_crops(model.vision_tower, inputs["pixel_values"], inputs["image_sizes"])
        for index, owner in enumerate([0, 0, 1]):
            ids = processor.tokenizer(texts[owner])["input_ids"]
            ids = torch.tensor([t for t in ids if t != processor.image_token_id])
            embeds = model.get_input_embeddings()(ids)
            probabilities = model.visual.router(crops[index], embeds).softmax(-1)
            torch.testing.assert_close(torch.tensor(report[index]["router_probabilities"]), probabilities)


def test_training_mask_hides_answers_from_the_router():
    ids = torch.tensor([1, 7, 4, 8, 9, 10])
    labels = torch.tensor([-100, -100, -100, -100, 9, 10])
    keep, valid = select_instruction_tokens(ids, image_token_id=4, labels=labels)
    assert keep.tolist() == [0, 1, 3, 4, 5] and valid.tolist() == [True, True, True, False, False]


def test_bad_granularity_budget_and_empty_instruction(tiny_avg):
    model, processor = tiny_avg
    with pytest.raises(ValueError, match=r"granularity 100 is not one of this model's levels \[4, 8, 16, 32, 64\]"):
        processor(images=image(64, 64), text=PROMPT, granularity=100)
    inputs = processor(images=image(64, 64), text=PROMPT)
    with pytest.raises(ValueError, match="granularity 'fine' is not one of"):
        model.generate(**inputs, granularity="fine", max_new_tokens=2)
    with pytest.raises(ValueError, match="needs a router"):
        build_tiny(None, method="avg", image_size=64, patch_size=8, method_settings={"use_router": False})
    # An instruction with no text besides the image: the router falls back to the image alone (zero text rows).
    bare = processor(images=image(64, 64), text="<image>")
    with torch.no_grad():
        report = model(**bare).visual_report[0]
    assert report["granularity"] in model.visual.level_tokens


def test_cli_granularity_knob_and_report(tiny_avg, tmp_path, capsys):
    model, processor = tiny_avg
    model.save_pretrained(tmp_path / "avg")
    processor.save_pretrained(tmp_path / "avg")
    picture = tmp_path / "x.png"
    image(90, 70).save(picture)
    base = ["generate", "--model", str(tmp_path / "avg"), "--image", str(picture), "--prompt", "What?",
            "--max-new-tokens", "2", "--report"]
    assert main(base + ["--granularity", "8"]) == 0
    assert '"granularity": 8, "mode": "fixed"' in capsys.readouterr().err
    assert main(base + ["--granularity", "auto"]) == 0
    assert '"mode": "auto"' in capsys.readouterr().err
    assert main(base + ["--granularity", "7"]) == 2
    assert "granularity 7 is not one of this model's levels" in capsys.readouterr().err
