"""Released LLaVA-UHD v2 layout (+ the Lightning stage-0 JBU checkpoint) -> multigran: every tensor lands where it
should, unused release tensors are skipped with a note, mismatches are named, the converted model runs."""

import json
import logging

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


def tiny_clip():
    torch.manual_seed(1)
    return CLIPVisionModel(CLIPVisionConfig(hidden_size=C, intermediate_size=16, num_hidden_layers=2,
                                            num_attention_heads=2, image_size=16, patch_size=4))


def jbu_tensors(r, prefix):
    """The JBU4xStack under `prefix`, by the release key names (spec section 8)."""
    t = {f"{prefix}fixup_proj.1.weight": r(C, C, 1, 1), f"{prefix}fixup_proj.1.bias": r(C)}
    for step in ("up1", "up2"):
        p = f"{prefix}{step}."
        t[p + "range_temp"], t[p + "sigma_spatial"] = r(1)[0], r(1)[0] + 1  # scalars
        t[p + "range_proj.0.weight"], t[p + "range_proj.0.bias"] = r(KEY, 3, 1, 1), r(KEY)
        t[p + "range_proj.3.weight"], t[p + "range_proj.3.bias"] = r(KEY, KEY, 1, 1), r(KEY)
        t[p + "fixup_proj.0.weight"], t[p + "fixup_proj.0.bias"] = r(WINDOW, 3 + WINDOW, 1, 1), r(WINDOW)
        t[p + "fixup_proj.3.weight"], t[p + "fixup_proj.3.bias"] = r(WINDOW, WINDOW, 1, 1), r(WINDOW)
    return t


def released_tensors(with_jbu=True):
    """Random tensors under exactly the released key names; returns (used tensors, unused extras)."""
    g = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.2  # noqa: E731
    t = {"model.embed_tokens.weight": r(320, D), "model.norm.weight": r(D) + 1, "lm_head.weight": r(320, D)}
    for i in range(2):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            t[p + f"self_attn.{name}.weight"] = r(D, D)
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
        t.update(jbu_tensors(r, q + "upsampler.upsampler."))
    t.update({f"model.vision_tower.vision_tower.vision_model.{k}": v.clone()
              for k, v in tiny_clip().state_dict().items()})
    extras = {q + "query": r(144, D), q + "kv_proj.weight": r(D, C), q + "feature_8x_embedding": r(1, 1, D),
              q + "features_8x_projector.weight": r(D, C), q + "features_8x_projector.bias": r(D),
              q + "upsampler.model.0.model.visual.conv1.weight": r(C, 3, 4, 4),  # the wrapper's duplicate CLIP
              q + "upsampler.model.1.norm.weight": r(C)}
    return t, extras


def write_release(path, tensors, feature_scale_mask=7):
    path.mkdir(parents=True)
    save_file(tensors, path / "model.safetensors")
    config = {"model_type": "llava_llama", "architectures": ["LlavaLlamaForCausalLM"], "hidden_size": D,
              "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
              "vocab_size": 320, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
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
    assert settings["separator_ids"] == [tokenizer.convert_tokens_to_ids(","), tokenizer.convert_tokens_to_ids("Ċ")]
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
    inputs = processor(images=image, text=prompt)
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
    # The first separator is the release LLM's embedding row of "," (taken from the converted embed_tokens).
    comma = processor.tokenizer.convert_tokens_to_ids(",")
    assert torch.equal(features[0][144], tensors["model.embed_tokens.weight"][comma])
