"""Released LLaVA-UHD v2 layout (+ the Lightning stage-0 JBU checkpoint) -> multigran: every tensor lands where it
should, unused release tensors are skipped with a note, mismatches are named, the converted model runs."""

import json
import logging
import math

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import CLIPVisionConfig, CLIPVisionModel

from multigran import MultiGranForConditionalGeneration, MultiGranProcessor
from multigran.cli import main
from multigran.convert import CheckpointMismatchError
from multigran.convert.uhd_v2 import from_uhd_v2
from multigran.tiny import build_tiny_tokenizer

D, C = 128, 8  # LLM width (one window-attention head, D / 128) and CLIP width of the tiny release
KEY, WINDOW = 32, 49  # JBU range-key dimension and 7x7 window
# The release embeds the hard-coded ids 29892 (",") and 13 ("\n") between slices for every LLM
# (llava/slice_process.py:11-12, llava/model/llava_arch.py:576-579): a released LLM has at least 29893 embedding rows.
VOCAB = 29_904
RELEASE_COMMA, RELEASE_NEWLINE = 29892, 13


def tiny_clip(image_size=16, patch_size=4):
    torch.manual_seed(1)
    return CLIPVisionModel(CLIPVisionConfig(hidden_size=C, intermediate_size=16, num_hidden_layers=2,
                                            num_attention_heads=2, image_size=image_size, patch_size=patch_size))


def jbu_tensors(r, prefix, steps=("up1", "up2")):
    """The JBU4xStack (or, steps=("up1",), the JBU2xStack) under `prefix`, by the release key names (spec section 8;
    featup/upsamplers.py:278-323)."""
    t = {f"{prefix}fixup_proj.1.weight": r(C, C, 1, 1), f"{prefix}fixup_proj.1.bias": r(C)}
    for step in steps:
        p = f"{prefix}{step}."
        t[p + "range_temp"], t[p + "sigma_spatial"] = r(1)[0], r(1)[0] + 1  # scalars
        t[p + "range_proj.0.weight"], t[p + "range_proj.0.bias"] = r(KEY, 3, 1, 1), r(KEY)
        t[p + "range_proj.3.weight"], t[p + "range_proj.3.bias"] = r(KEY, KEY, 1, 1), r(KEY)
        t[p + "fixup_proj.0.weight"], t[p + "fixup_proj.0.bias"] = r(WINDOW, 3 + WINDOW, 1, 1), r(WINDOW)
        t[p + "fixup_proj.3.weight"], t[p + "fixup_proj.3.bias"] = r(WINDOW, WINDOW, 1, 1), r(WINDOW)
    return t


def released_tensors(with_jbu=True, jbu_steps=("up1", "up2"), qwen=False, clip=None):
    """Random tensors under exactly the released key names; returns (used tensors, unused extras).
    qwen: Qwen2's attention biases; clip: the tower whose weights the release holds (default tiny_clip())."""
    g = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.2  # noqa: E731
    t = {"model.embed_tokens.weight": r(VOCAB, D), "model.norm.weight": r(D) + 1, "lm_head.weight": r(VOCAB, D)}
    for i in range(2):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            t[p + f"self_attn.{name}.weight"] = r(D, D)
            if qwen and name != "o_proj":
                t[p + f"self_attn.{name}.bias"] = r(D)
        t[p + "mlp.gate_proj.weight"], t[p + "mlp.up_proj.weight"] = r(64, D), r(64, D)
        t[p + "mlp.down_proj.weight"] = r(D, 64)
        t[p + "input_layernorm.weight"], t[p + "post_attention_layernorm.weight"] = r(D) + 1, r(D) + 1
    q = "model.mm_projector."
    for k in range(1, 5):
        t[q + f"query_{k}"] = r(144, D)
    t[q + "pos_embed"] = r(144, D)
    for level in ("1x", "2x", "4x"):
        t[q + f"feature_{level}_embedding"] = r(1, 1, D)
        t[q + f"features_{level}_projector.weight"], t[q + f"features_{level}_projector.bias"] = r(D, C), r(D)
    t[q + "attn.in_proj_weight"], t[q + "attn.in_proj_bias"] = r(3 * D, D), r(3 * D)
    t[q + "attn.out_proj.weight"], t[q + "attn.out_proj.bias"] = r(D, D), r(D)
    for norm in ("ln_q", "ln_kv", "ln_proj", "ln_post"):
        t[q + f"{norm}.weight"], t[q + f"{norm}.bias"] = r(D) + 1, r(D)
    t[q + "cat_proj.weight"], t[q + "cat_proj.bias"] = r(D, 4 * D), r(D)
    t[q + "proj"] = r(D, D)
    if with_jbu:
        t.update(jbu_tensors(r, q + "upsampler.upsampler.", jbu_steps))
    t.update({f"model.vision_tower.vision_tower.vision_model.{k}": v.clone()
              for k, v in (clip or tiny_clip()).state_dict().items()})
    extras = {q + "query": r(144, D), q + "kv_proj.weight": r(D, C), q + "feature_8x_embedding": r(1, 1, D),
              q + "features_8x_projector.weight": r(D, C), q + "features_8x_projector.bias": r(D),
              q + "upsampler.model.0.model.visual.conv1.weight": r(C, 3, 4, 4),  # the wrapper's duplicate CLIP
              q + "upsampler.model.1.norm.weight": r(C)}
    return t, extras


def write_release(path, tensors, feature_scale_mask=7, model_type="llava_llama", vocab_size=VOCAB):
    path.mkdir(parents=True)
    save_file(tensors, path / "model.safetensors")
    architecture = {"llava_llama": "LlavaLlamaForCausalLM", "llava_qwen": "LlavaQwenForCausalLM"}[model_type]
    config = {"model_type": model_type, "architectures": [architecture], "hidden_size": D,
              "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
              "vocab_size": vocab_size, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
              "tie_word_embeddings": False,
              "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_hidden_size": C,
              "mm_projector_type": "adapt_spatial_resampler", "mm_vision_select_layer": -2,
              "mm_vision_select_feature": "patch", "feature_scale_mask": feature_scale_mask,
              "feature_mode": "featup_muti_res", "model_mode": "uhd_v2", "jbu_ckpt": "clip-large-jbu.ckpt",
              "sft_encoder": True, "single": False, "image_aspect_ratio": "pad"}
    (path / "config.json").write_text(json.dumps(config))
    build_tiny_tokenizer(image_token=False).save_pretrained(path)


def expected_location(key: str) -> str:
    """Where each released key must land (written out per key family, independently of the converter)."""
    families = [
        ("model.vision_tower.vision_tower.vision_model.", "vision_tower."),  # transformers 5: no `vision_model.`
        ("model.mm_projector.upsampler.upsampler.", "visual.upsampler."),
        ("model.mm_projector.", "visual.mm_projector."),
        ("upsampler.upsampler.", "visual.upsampler."),  # stage-0 checkpoint, wrapper layout
        ("upsampler.", "visual.upsampler."),  # stage-0 checkpoint, FeatUp layout
        ("lm_head.", "language_model.lm_head."),
        ("model.", "language_model.model."),
    ]
    for old, new in families:
        if key.startswith(old):
            return new + key[len(old):]
    raise AssertionError(key)


@pytest.fixture()
def clip_dir(tmp_path):
    tiny_clip().save_pretrained(tmp_path / "clip")
    return tmp_path / "clip"


def test_every_tensor_lands_where_it_should(tmp_path, clip_dir, caplog):
    tensors, extras = released_tensors()
    write_release(tmp_path / "release", {**tensors, **extras}, feature_scale_mask=5)
    with caplog.at_level(logging.INFO, logger="multigran.convert.uhd_v2"):
        from_uhd_v2(tmp_path / "release", tmp_path / "out", clip_dir=clip_dir)
    converted = load_file(tmp_path / "out" / "model.safetensors")
    assert len(converted) == len(tensors)
    for key, value in tensors.items():
        assert torch.equal(converted[expected_location(key)], value), key
    note = " ".join(record.getMessage() for record in caplog.records)
    assert f"skipped {len(extras)} release tensors" in note
    assert "model.mm_projector.query," in note and "model.mm_projector.kv_proj.weight" in note

    model = MultiGranForConditionalGeneration.from_pretrained(tmp_path / "out")
    state = model.state_dict()
    for key, value in tensors.items():  # loading keeps every converted tensor (no re-initialisation)
        assert torch.equal(state[expected_location(key)], value), key
    processor = MultiGranProcessor.from_pretrained(tmp_path / "out")
    tokenizer = processor.tokenizer
    settings = model.config.method_settings
    assert model.config.method == "uhd" and settings["feature_scale_mask"] == 5 and settings["compat"] is True
    # The release's hard-coded ids (slice_process.py:11-12), not this tokenizer's own "," and "\n".
    assert settings["separator_ids"] == [RELEASE_COMMA, RELEASE_NEWLINE]
    assert settings["separator_ids"] != [tokenizer.convert_tokens_to_ids(","), tokenizer.convert_tokens_to_ids("Ċ")]
    # The release's evaluation pre-resize of the long side (llava/eval/model_vqa_loader.py:61).
    assert settings["pre_resize_long_side"] == 1024
    assert processor.image_processor.method_settings == settings
    assert model.visual.levels == [0, 2]  # mask 5: 1x and 4x


@pytest.mark.parametrize("prefix", ["upsampler.upsampler.", "upsampler."])
def test_jbu_from_the_lightning_checkpoint(tmp_path, clip_dir, prefix):
    tensors, _ = released_tensors(with_jbu=False)
    write_release(tmp_path / "release", tensors)
    g = torch.Generator().manual_seed(5)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    jbu = jbu_tensors(r, prefix)
    state = {**jbu, "scale_net.net.weight": r(1, C, 1, 1), "scale_net_2x.net.bias": r(1),
             "downsampler.attention_net.1.weight": r(1, C), "downsampler_2x.w": r(14, 14),
             "model.0.model.visual.conv1.weight": r(C, 3, 4, 4), "upsampler.model.0.weight": r(C)}
    torch.save({"state_dict": state, "epoch": 0, "global_step": 2000, "pytorch-lightning_version": "1.9.0"},
               tmp_path / "clip-large-jbu.ckpt")
    assert main(["convert", "uhd-v2", str(tmp_path / "release"), str(tmp_path / "out"), "--jbu",
                 str(tmp_path / "clip-large-jbu.ckpt"), "--clip", str(clip_dir)]) == 0
    converted = load_file(tmp_path / "out" / "model.safetensors")
    assert len(converted) == len(tensors) + len(jbu)  # scale_net*, downsampler*, featurizer: not converted
    for key, value in {**tensors, **jbu}.items():
        assert torch.equal(converted[expected_location(key)], value), key


def test_release_jbu_wins_over_the_stage0_checkpoint(tmp_path, clip_dir):
    tensors, _ = released_tensors()
    write_release(tmp_path / "release", tensors)
    stage0 = jbu_tensors(lambda *shape: torch.full(shape, 7.0), "upsampler.")
    torch.save({"state_dict": stage0}, tmp_path / "jbu.ckpt")
    from_uhd_v2(tmp_path / "release", tmp_path / "out", jbu_ckpt=tmp_path / "jbu.ckpt", clip_dir=clip_dir)
    converted = load_file(tmp_path / "out" / "model.safetensors")
    key = "model.mm_projector.upsampler.upsampler.fixup_proj.1.weight"
    assert torch.equal(converted["visual.upsampler.fixup_proj.1.weight"], tensors[key])


def test_mismatches_are_named(tmp_path, clip_dir):
    tensors, _ = released_tensors(with_jbu=False)
    write_release(tmp_path / "nojbu", tensors)
    with pytest.raises(CheckpointMismatchError, match=r"no JBU upsampler weights \(visual\.upsampler\.fixup_proj"):
        from_uhd_v2(tmp_path / "nojbu", tmp_path / "out1", clip_dir=clip_dir)

    tensors, _ = released_tensors()
    tensors["model.mm_projector.features_2x_projector.weight"] = torch.zeros(D, C + 1)
    del tensors["model.mm_projector.cat_proj.bias"]
    write_release(tmp_path / "bad", tensors)
    with pytest.raises(CheckpointMismatchError) as error:
        from_uhd_v2(tmp_path / "bad", tmp_path / "out2", clip_dir=clip_dir)
    message = str(error.value)
    assert "missing keys (1): visual.mm_projector.cat_proj.bias" in message
    assert f"visual.mm_projector.features_2x_projector.weight: checkpoint ({D}, {C + 1}) vs model ({D}, {C})" \
        in message
    assert not (tmp_path / "out2" / "model.safetensors").exists()  # checked before writing

    tensors, _ = released_tensors()
    write_release(tmp_path / "eight", tensors, feature_scale_mask=15)
    with pytest.raises(CheckpointMismatchError, match="feature_scale_mask 15 is not supported.*8x"):
        from_uhd_v2(tmp_path / "eight", tmp_path / "out3", clip_dir=clip_dir)


class NotATensor:
    pass


def test_unsafe_or_foreign_jbu_checkpoints_are_refused(tmp_path, clip_dir):
    tensors, _ = released_tensors(with_jbu=False)
    write_release(tmp_path / "release", tensors)
    torch.save({"state_dict": {}, "hyper_parameters": NotATensor()}, tmp_path / "pickled.ckpt")
    with pytest.raises(CheckpointMismatchError, match="not unpickled here"):
        from_uhd_v2(tmp_path / "release", tmp_path / "out", jbu_ckpt=tmp_path / "pickled.ckpt", clip_dir=clip_dir)
    torch.save({"state_dict": {"encoder.weight": torch.zeros(2)}}, tmp_path / "other.ckpt")
    with pytest.raises(CheckpointMismatchError, match="holds no JBU stack"):
        from_uhd_v2(tmp_path / "release", tmp_path / "out", jbu_ckpt=tmp_path / "other.ckpt", clip_dir=clip_dir)


def test_converted_model_runs(tmp_path, clip_dir):
    tensors, extras = released_tensors()
    write_release(tmp_path / "release", {**tensors, **extras})
    from_uhd_v2(tmp_path / "release", tmp_path / "out", clip_dir=clip_dir)
    model = MultiGranForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    processor = MultiGranProcessor.from_pretrained(tmp_path / "out")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8))
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}],
        add_generation_prompt=True,
    )
    assert prompt.startswith("A chat between a curious human") and prompt.endswith("ASSISTANT:")  # vicuna_v1
    inputs = processor(images=image, text=prompt, pre_resize_long_side=None)  # the release's MME/AI2D setting
    # 40x24 at S = 16: r = 3.75 -> n0 = 4, candidates 3, 4, 5: 2x2 (error 0.51) beats 3x1 (0.59).
    assert inputs["slice_grids"].tolist() == [[2, 2]]
    with torch.no_grad():
        features = model.get_image_features(
            inputs["pixel_values"], inputs["image_sizes"], view_sizes=inputs["view_sizes"],
            slice_grids=inputs["slice_grids"],
        )
        visual = ("pixel_values", "image_sizes", "view_sizes", "slice_grids")
        text = {k: v for k, v in inputs.items() if k not in visual}
        out = model(**text, image_features=features)
    assert out.image_token_counts == [145 * 4 + 144] and torch.isfinite(out.logits).all()
    # The separators are the release LLM's embedding rows 29892 ("," in a row) and 13 ("\n" at a row's end), as
    # llava_arch.py:576-579 embeds the ids of slice_process.py:128-133: 2x2 -> [",", "\n", ",", "\n"].
    table = tensors["model.embed_tokens.weight"]
    for k, token in enumerate([RELEASE_COMMA, RELEASE_NEWLINE, RELEASE_COMMA, RELEASE_NEWLINE]):
        assert torch.equal(features[0][145 * k + 144], table[token]), k


# ------------------------------------------------------------------------------------------- release parity

def release_eval_grid(width, height, long_side):
    """The release's evaluation slicing, transcribed: `resize_image_keep_ratio` (llava/slice_process.py:244-253; called
    at llava/eval/model_vqa_loader.py:56-61) then the grid of `slice_image_minicpm` (slice_process.py:67-119) with
    max_slice_nums=9, scale_resolution=336 (model_vqa_loader.py:63-64). Returns [cols, rows] or None (not sliced)."""
    if long_side is not None:
        if width > height:
            width, height = long_side, int((long_side / width) * height)
        else:
            width, height = int((long_side / height) * width), long_side
    multiple = min(math.ceil(width * height / (336 * 336)), 9)
    if multiple <= 1:
        return None
    grids = []
    for count in [n for n in (multiple - 1, multiple, multiple + 1) if n != 1 and n <= 9]:
        m = 1
        while m <= count:
            if count % m == 0:
                grids.append([m, count // m])
            m += 1
    best, min_error = [1, 1], float("inf")
    for grid in grids:
        error = abs(math.log(width / height) - math.log(grid[0] / grid[1]))
        if error < min_error:
            best, min_error = grid, error
    return best


def release_token_count(grid):
    return 144 if grid is None else 145 * grid[0] * grid[1] + 144  # llava_arch.py:591-597: slice + sep, overview


@pytest.fixture(scope="module")
def converted_at_336(tmp_path_factory):
    """A converted release whose tower has the real input geometry (336 px, patch 14), widths kept tiny."""
    root = tmp_path_factory.mktemp("uhd336")
    clip = tiny_clip(image_size=336, patch_size=14)
    clip.save_pretrained(root / "clip")
    tensors, _ = released_tensors(clip=clip)
    write_release(root / "release", tensors)
    from_uhd_v2(root / "release", root / "out", clip_dir=root / "clip")
    return MultiGranProcessor.from_pretrained(root / "out")


def test_converted_checkpoint_pre_resizes_like_the_release_evaluation(converted_at_336):
    processor = converted_at_336
    assert processor.image_processor.method_settings["pre_resize_long_side"] == 1024
    prompt = "USER: <image>\nWhat is it? ASSISTANT:"
    image = Image.new("RGB", (640, 480), (120, 30, 200))
    # Default (release: long side 1024 -> 1024x768): 3x2 grid, 6 * 145 + 144 = 1014 tokens (not 2x2 / 724).
    inputs = processor(images=image, text=prompt)
    assert release_eval_grid(640, 480, 1024) == [3, 2]
    assert inputs["slice_grids"].tolist() == [[3, 2]]
    assert (inputs["input_ids"] == processor.image_token_id).sum().item() == 1014
    # Per call: TextVQA's 1536 and MME/AI2D's none.
    for long_side in (1536, None):
        grid = release_eval_grid(640, 480, long_side)
        inputs = processor(images=image, text=prompt, pre_resize_long_side=long_side)
        assert inputs["slice_grids"].tolist() == [grid]
        assert (inputs["input_ids"] == processor.image_token_id).sum().item() == release_token_count(grid)
    assert release_eval_grid(640, 480, None) == [2, 2] and release_eval_grid(640, 480, 1536) == [3, 3]
    # More shapes (upscaled small images, tall, square, extreme), against the transcription.
    sizes = [(200, 150), (480, 640), (300, 300), (1000, 200), (100, 1400), (2000, 1500), (337, 335)]
    for long_side in (1024, 1536, None):
        options = {} if long_side == 1024 else {"pre_resize_long_side": long_side}
        counts = processor.count_image_tokens([Image.new("RGB", size) for size in sizes], **options)
        assert counts == [release_token_count(release_eval_grid(*size, long_side)) for size in sizes], long_side


def test_qwen2_release_keeps_the_release_separator_rows(tmp_path, clip_dir, caplog):
    """The release embeds 29892 and 13 between slices for every LLM, Qwen2 included (slice_process.py:11-12 ->
    llava_arch.py:576-579): a converted Qwen2 release must use those embedding rows, not its tokenizer's "," / "\\n"."""
    tensors, _ = released_tensors(qwen=True)
    write_release(tmp_path / "release", tensors, model_type="llava_qwen")
    with caplog.at_level(logging.INFO, logger="multigran.convert.uhd_v2"):
        from_uhd_v2(tmp_path / "release", tmp_path / "out", clip_dir=clip_dir)
    model = MultiGranForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    processor = MultiGranProcessor.from_pretrained(tmp_path / "out")
    tokenizer = processor.tokenizer
    own = [tokenizer.convert_tokens_to_ids(","), tokenizer.convert_tokens_to_ids("Ċ")]  # byte-level BPE, as Qwen2
    assert model.config.text_config.model_type == "qwen2"
    assert model.config.method_settings["separator_ids"] == [RELEASE_COMMA, RELEASE_NEWLINE] != own
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "multigran.convert.uhd_v2"]
    assert len(warnings) == 1 and "[29892, 13]" in warnings[0] and str(own) in warnings[0], warnings

    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (24, 40, 3), dtype=np.uint8))
    inputs = processor(images=image, text="<image>\nWhat is it?", pre_resize_long_side=None)
    assert inputs["slice_grids"].tolist() == [[2, 2]]
    with torch.no_grad():
        features = model.get_image_features(inputs["pixel_values"], inputs["image_sizes"],
                                            view_sizes=inputs["view_sizes"], slice_grids=inputs["slice_grids"])
    table = tensors["model.embed_tokens.weight"]
    for k, (release, mine) in enumerate(zip([RELEASE_COMMA, RELEASE_NEWLINE] * 2, own * 2)):
        separator = features[0][145 * k + 144]
        assert torch.equal(separator, table[release]) and not torch.equal(separator, table[mine]), k


def test_separator_choice_and_a_vocabulary_without_the_release_rows(tmp_path, clip_dir):
    tensors, _ = released_tensors()
    write_release(tmp_path / "release", tensors)
    from_uhd_v2(tmp_path / "release", tmp_path / "own", clip_dir=clip_dir, separators="tokenizer")
    tokenizer = MultiGranProcessor.from_pretrained(tmp_path / "own").tokenizer
    settings = json.loads((tmp_path / "own" / "config.json").read_text())["method_settings"]
    assert settings["separator_ids"] == [tokenizer.convert_tokens_to_ids(","), tokenizer.convert_tokens_to_ids("Ċ")]
    with pytest.raises(ValueError, match="separators must be one of"):
        from_uhd_v2(tmp_path / "release", tmp_path / "bad", clip_dir=clip_dir, separators="llama")

    small = {k: (v[:320] if k in ("model.embed_tokens.weight", "lm_head.weight") else v) for k, v in tensors.items()}
    write_release(tmp_path / "small", small, vocab_size=320)
    with pytest.raises(CheckpointMismatchError, match=r"hard-coded Llama separator ids \[29892, 13\].*only 320 rows"):
        from_uhd_v2(tmp_path / "small", tmp_path / "out", clip_dir=clip_dir)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("mask", [2, 3])
def test_masks_2_and_3_convert_to_the_2x_stack(tmp_path, clip_dir, mask, caplog):
    """Masks 2/3: the release builds JBU2xStack (featup/upsamplers.py:278-302): up1 and a fix-up on the 2x output."""
    from multigran.pipelines.uhd_jbu import JBU2xStack

    tensors, _ = released_tensors(jbu_steps=("up1",))
    write_release(tmp_path / "release", tensors, feature_scale_mask=mask)
    from_uhd_v2(tmp_path / "release", tmp_path / "out", clip_dir=clip_dir)
    converted = load_file(tmp_path / "out" / "model.safetensors")
    assert len(converted) == len(tensors)
    for key, value in tensors.items():
        assert torch.equal(converted[expected_location(key)], value), key
    model = MultiGranForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    upsampler = model.visual.upsampler
    assert isinstance(upsampler, JBU2xStack) and not any(k.startswith("up2.") for k in upsampler.state_dict())
    assert model.visual.levels == ([1] if mask == 2 else [0, 1])

    # The 2x level, transcribed from upsamplers.py:293-295: x2 = up1(x); x2 + 0.1 * fixup_proj(x2) (dropout off).
    g = torch.Generator().manual_seed(2)
    source, guidance = torch.randn(1, C, 4, 5, generator=g), torch.randn(1, 3, 16, 20, generator=g)
    with torch.no_grad():
        levels = upsampler(source, guidance)
        two_x = upsampler.up1(source, guidance)
        weight = tensors["model.mm_projector.upsampler.upsampler.fixup_proj.1.weight"][:, :, 0, 0]
        bias = tensors["model.mm_projector.upsampler.upsampler.fixup_proj.1.bias"]
        fixed = two_x + 0.1 * (torch.einsum("oc,bchw->bohw", weight, two_x) + bias[:, None, None])
    assert len(levels) == 2 and torch.equal(levels[0], source)
    torch.testing.assert_close(levels[1], fixed, rtol=1e-6, atol=1e-6)
    assert (levels[1] - two_x).abs().max() > 1e-3  # the fix-up is there

    # From the 4x stage-0 checkpoint: up1 and the fix-up are taken, up2 left aside (release: strict=False load).
    bare, _ = released_tensors(with_jbu=False)
    write_release(tmp_path / "bare", bare, feature_scale_mask=mask)
    stage0 = jbu_tensors(lambda *shape: torch.full(shape, 0.5), "upsampler.")
    torch.save({"state_dict": stage0}, tmp_path / "jbu.ckpt")
    with caplog.at_level(logging.INFO, logger="multigran.convert.uhd_v2"):
        from_uhd_v2(tmp_path / "bare", tmp_path / "out2", jbu_ckpt=tmp_path / "jbu.ckpt", clip_dir=clip_dir)
    converted = load_file(tmp_path / "out2" / "model.safetensors")
    jbu_keys = {k for k in converted if k.startswith("visual.upsampler.")}
    assert jbu_keys == {expected_location(k) for k in stage0 if not k.startswith("upsampler.up2.")}
    second_step = len([k for k in stage0 if k.startswith("upsampler.up2.")])  # 10
    assert any(f"{second_step} up2 tensors of the stage-0 checkpoint left unused" in r.getMessage()
               for r in caplog.records)


def test_masks_with_4x_keep_the_2x_level_without_fixup(tmp_path, clip_dir):
    """Masks 4..7: JBU4xStack.forward_with_internal_features returns up1's raw output as the 2x level and the fix-up
    on the 4x output only (featup/upsamplers.py:333-339)."""
    tensors, _ = released_tensors()
    write_release(tmp_path / "release", tensors, feature_scale_mask=7)
    from_uhd_v2(tmp_path / "release", tmp_path / "out", clip_dir=clip_dir)
    upsampler = MultiGranForConditionalGeneration.from_pretrained(tmp_path / "out").eval().visual.upsampler
    g = torch.Generator().manual_seed(4)
    source, guidance = torch.randn(1, C, 4, 4, generator=g), torch.randn(1, 3, 16, 16, generator=g)
    with torch.no_grad():
        _, two_x, four_x = upsampler(source, guidance)
        raw_2x = upsampler.up1(source, guidance)
        raw_4x = upsampler.up2(raw_2x, guidance)
        weight = tensors["model.mm_projector.upsampler.upsampler.fixup_proj.1.weight"][:, :, 0, 0]
        bias = tensors["model.mm_projector.upsampler.upsampler.fixup_proj.1.bias"]
        fixed_4x = raw_4x + 0.1 * (torch.einsum("oc,bchw->bohw", weight, raw_4x) + bias[:, None, None])
    assert torch.equal(two_x, raw_2x)
    torch.testing.assert_close(four_x, fixed_4x, rtol=1e-6, atol=1e-6)
