"""Released AVG-LLaVA layout -> multigran: every tensor lands where it should, the router computes the same thing."""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import CLIPVisionConfig, CLIPVisionModel

from multigran import MultiGranForConditionalGeneration, MultiGranProcessor
from multigran.cli import main
from multigran.convert import CheckpointMismatchError, from_avg_llava
from multigran.tiny import build_tiny_tokenizer
from test_avg_router import slow_router

GRID, TOP_K, DIM = 4, 3, 16  # the geometry of test_avg_router's written-out router
LEVELS = [1, 2, 4, 8, 16]


def released_tensors(vision_layers=1, with_tower=True, split_attention=False, levels=LEVELS, newline=True):
    """Random tensors under exactly the released key names (shapes for D = 16, CLIP width 8, a 4x4 patch grid).
    The release has `image_newline` only with an unpadded merge (llava_arch.py:40-43)."""
    g = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.3  # noqa: E731
    t = {"model.embed_tokens.weight": r(320, DIM), "model.norm.weight": r(DIM) + 1, "lm_head.weight": r(320, DIM),
         "model.mm_projector.0.weight": r(DIM, 8), "model.mm_projector.0.bias": r(DIM),
         "model.mm_projector.2.weight": r(DIM, DIM), "model.mm_projector.2.bias": r(DIM)}
    if newline:
        t["model.image_newline"] = r(DIM)
    for i in range(2):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            t[p + f"self_attn.{name}.weight"] = r(DIM, DIM)
        t[p + "mlp.gate_proj.weight"], t[p + "mlp.up_proj.weight"] = r(32, DIM), r(32, DIM)
        t[p + "mlp.down_proj.weight"] = r(DIM, 32)
        t[p + "input_layernorm.weight"], t[p + "post_attention_layernorm.weight"] = r(DIM) + 1, r(DIM) + 1
    q = "model.router."
    if split_attention:
        for name in ("q_proj", "k_proj", "v_proj"):
            t[q + f"merger.self_attn.{name}.weight"], t[q + f"merger.self_attn.{name}.bias"] = r(DIM, DIM), r(DIM)
    else:
        t[q + "merger.self_attn.in_proj_weight"], t[q + "merger.self_attn.in_proj_bias"] = r(3 * DIM, DIM), r(3 * DIM)
    t[q + "merger.self_attn.out_proj.weight"], t[q + "merger.self_attn.out_proj.bias"] = r(DIM, DIM), r(DIM)
    for name in ("linear1", "linear2"):
        t[q + f"merger.{name}.weight"], t[q + f"merger.{name}.bias"] = r(DIM, DIM), r(DIM)
    for name in ("norm1", "norm2"):
        t[q + f"merger.{name}.weight"], t[q + f"merger.{name}.bias"] = r(DIM) + 1, r(DIM)
    t[q + "router.0.weight"], t[q + "router.0.bias"] = r(DIM, DIM), r(DIM)
    t[q + "router.2.weight"], t[q + "router.2.bias"] = r(len(levels), DIM), r(len(levels))
    t[q + "voter"] = r(sum(levels) + TOP_K, 1)  # multimodal_router/builder.py:328-344
    t[q + "norm.weight"], t[q + "norm.bias"] = r(len(levels)) + 1, r(len(levels))
    tower = {f"vision_model.{k}": v for k, v in tiny_clip(vision_layers).state_dict().items()}
    if with_tower:
        t.update({f"model.vision_tower.vision_tower.{k}": v.clone() for k, v in tower.items()})
    return t, tower


def tiny_clip(layers=1):
    torch.manual_seed(1)
    return CLIPVisionModel(CLIPVisionConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=layers,
                                            num_attention_heads=2, image_size=16, patch_size=4))


def write_release(path, tensors, router=True, **config_overrides):
    """A release directory; `config_overrides` replace config.json keys (None removes the key)."""
    path.mkdir(parents=True)
    save_file(tensors, path / "model.safetensors")
    config = {"model_type": "llava_llama", "architectures": ["LlavaLlamaForCausalLM"], "hidden_size": DIM,
              "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
              "vocab_size": 320, "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
              "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_projector_type": "mlp2x_gelu",
              "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "mm_patch_merge_type": "spatial_unpad",
              "image_aspect_ratio": "anyres", "image_grid_pinpoints": [[16, 32], [32, 16], [32, 32]],
              "vis_token_granularity": LEVELS, "router_select": router, "filtered_text_num": TOP_K,
              "ce_loss_weight": 0.1, "margin": 1.0, "rank_loss_weight": 1.0}
    config.update(config_overrides)
    config = {key: value for key, value in config.items() if value is not None}
    (path / "config.json").write_text(json.dumps(config))
    build_tiny_tokenizer(image_token=False).save_pretrained(path)


@pytest.fixture()
def clip_dir(tmp_path):
    tiny_clip().save_pretrained(tmp_path / "clip")
    return tmp_path / "clip"


def expected_location(key: str) -> str:
    """Where each released key must land (written out per key family, independently of the converter)."""
    if key.startswith("model.vision_tower.vision_tower.vision_model."):  # transformers 5 drops `vision_model.`
        return "vision_tower." + key[len("model.vision_tower.vision_tower.vision_model."):]
    if key == "model.image_newline":
        return "visual.image_newline"
    if key.startswith("model.mm_projector."):
        index, rest = key[len("model.mm_projector."):].split(".", 1)
        return {"0": "visual.projector.linear_1.", "2": "visual.projector.linear_2."}[index] + rest
    if key.startswith("model.router."):
        return "visual.router." + key[len("model.router."):]
    if key == "lm_head.weight":
        return "language_model.lm_head.weight"
    return "language_model." + key  # model.embed_tokens / model.layers.* / model.norm


def test_every_tensor_lands_where_it_should(tmp_path, clip_dir):
    tensors, _ = released_tensors()
    write_release(tmp_path / "release", tensors)
    from_avg_llava(tmp_path / "release", tmp_path / "out", clip_dir=clip_dir)
    converted = load_file(tmp_path / "out" / "model.safetensors")
    assert len(converted) == len(tensors)
    for key, value in tensors.items():
        assert torch.equal(converted[expected_location(key)], value), key
    model = MultiGranForConditionalGeneration.from_pretrained(tmp_path / "out")
    assert model.config.method == "avg" and model.config.image_grid_pinpoints == [[32, 16], [16, 32], [32, 32]]
    assert model.visual.level_tokens == LEVELS and model.config.method_settings["compat"] is True
    # the original LLaVA code base's unpad (`int()`, llava_arch.py:132,137) and merge type, in model and processor
    processor = MultiGranProcessor.from_pretrained(tmp_path / "out")
    for settings in (model.config.method_settings, processor.image_processor.method_settings):
        assert settings["unpad_rounding"] == "truncate" and settings["patch_merge"] == "spatial_unpad"
        assert settings["levels"] == LEVELS


def test_router_output_equals_an_independent_computation(tmp_path, clip_dir):
    tensors, _ = released_tensors()
    write_release(tmp_path / "release", tensors)
    from_avg_llava(tmp_path / "release", tmp_path / "out", clip_dir=clip_dir)
    model = MultiGranForConditionalGeneration.from_pretrained(tmp_path / "out", dtype=torch.float64).eval()
    w = {k[len("model.router."):]: v.double() for k, v in tensors.items() if k.startswith("model.router.")}
    ns = SimpleNamespace
    released_router = ns(
        merger=ns(self_attn=ns(in_proj_weight=w["merger.self_attn.in_proj_weight"],
                               in_proj_bias=w["merger.self_attn.in_proj_bias"],
                               out_proj=ns(weight=w["merger.self_attn.out_proj.weight"],
                                           bias=w["merger.self_attn.out_proj.bias"])),
                  norm1=ns(weight=w["merger.norm1.weight"], bias=w["merger.norm1.bias"]),
                  norm2=ns(weight=w["merger.norm2.weight"], bias=w["merger.norm2.bias"]),
                  linear1=ns(weight=w["merger.linear1.weight"], bias=w["merger.linear1.bias"]),
                  linear2=ns(weight=w["merger.linear2.weight"], bias=w["merger.linear2.bias"])),
        router=[ns(weight=w["router.0.weight"], bias=w["router.0.bias"]), None,
                ns(weight=w["router.2.weight"], bias=w["router.2.bias"])],
        voter=w["voter"], norm=ns(weight=w["norm.weight"], bias=w["norm.bias"]),
    )
    torch.manual_seed(2)
    crops, text = torch.randn(3, GRID * GRID, DIM, dtype=torch.float64), torch.randn(6, DIM, dtype=torch.float64)
    mask = torch.tensor([True, True, False, True, True, False])
    _, expected = slow_router(released_router, crops, text, mask, across_crops=True)
    with torch.no_grad():
        torch.testing.assert_close(model.visual.router(crops, text, mask), expected, rtol=1e-9, atol=1e-10)


def test_split_attention_tower_from_clip_dir_and_a_working_processor(tmp_path, clip_dir):
    tensors, tower = released_tensors(with_tower=False, split_attention=True)
    write_release(tmp_path / "release", tensors)
    tiny_clip().save_pretrained(clip_dir)  # weights of the tower come from here
    assert main(["convert", "avg-llava", str(tmp_path / "release"), str(tmp_path / "out"), "--clip", str(clip_dir)]) == 0
    converted = load_file(tmp_path / "out" / "model.safetensors")
    packed = torch.cat([tensors[f"model.router.merger.self_attn.{n}_proj.weight"] for n in "qkv"])
    assert torch.equal(converted["visual.router.merger.self_attn.in_proj_weight"], packed)
    for key, value in tower.items():
        assert torch.equal(converted["vision_tower." + key[len("vision_model."):]], value)
    model = MultiGranForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    processor = MultiGranProcessor.from_pretrained(tmp_path / "out")
    assert processor.image_token_id == 320  # added after the 320-token vocabulary: outside the LM's embeddings
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}], add_generation_prompt=True)
    assert prompt.startswith("A chat between a curious human") and prompt.endswith("USER: <image>\nWhat? ASSISTANT:")
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8))
    inputs = processor(images=picture, text=prompt)
    output = model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    assert output.visual_report[0]["mode"] == "auto"
    assert output.sequences[:, inputs["input_ids"].shape[1]:].max() < 320  # never the out-of-vocabulary image token


def test_mismatched_release_names_the_keys(tmp_path, clip_dir):
    tensors, _ = released_tensors()
    tensors.pop("model.router.voter")
    tensors["model.router.gate.weight"] = torch.zeros(3)
    write_release(tmp_path / "release", tensors)
    with pytest.raises(CheckpointMismatchError, match=r"missing keys \(1\): visual.router.voter.*unexpected keys \(1\): "
                                                      r"visual.router.gate.weight"):
        from_avg_llava(tmp_path / "release", tmp_path / "out", clip_dir=clip_dir)
    release = tmp_path / "release" / "config.json"
    config = json.loads(release.read_text())
    config["vis_token_granularity"] = [36, 72, 144, 288, 576]
    release.write_text(json.dumps(config))
    with pytest.raises(CheckpointMismatchError,
                       match=r"level 36 cannot be pooled from a 4x4 patch grid.*\[1, 2, 4, 8, 16\]"):
        from_avg_llava(tmp_path / "release", tmp_path / "out", clip_dir=clip_dir)


def test_stage3_release_without_router(tmp_path, clip_dir):
    tensors, _ = released_tensors()
    tensors = {k: v for k, v in tensors.items() if not k.startswith("model.router.")}
    write_release(tmp_path / "release", tensors, router=False)
    from_avg_llava(tmp_path / "release", tmp_path / "out", clip_dir=clip_dir)
    model = MultiGranForConditionalGeneration.from_pretrained(tmp_path / "out")
    assert model.visual.router is None and not any(k.startswith("visual.router") for k in model.state_dict())
    assert model.config.method_settings["granularity"] == 16


def release_count(width, height, granularity, merge_type, tile=16, patch=4):
    """Visual tokens of one image in the release (llava_arch.py:258-319 with mm_utils.py:12-39,99-116 and the
    `int()` unpad of :113-141), for the tiny release's pinpoints (width, height) 16x32, 32x16, 32x32."""
    best, best_effective, best_wasted = None, 0, float("inf")
    for pw, ph in [[16, 32], [32, 16], [32, 32]]:
        scale = min(pw / width, ph / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = pw * ph - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (pw, ph), effective, wasted
    cols, rows = best[0] // tile, best[1] // tile
    if merge_type != "spatial_unpad":
        return (1 + rows * cols) * granularity
    if math.sqrt(granularity) % 1 != 0:  # the per-tile grid, llava_arch.py:287-291
        h = 2 * int(math.sqrt(granularity / 2))
        w = int(granularity / h)
    else:
        h = w = int(math.sqrt(granularity))
    current_h, current_w = rows * h, cols * w
    if width / height > current_w / current_h:
        new = int(height * (current_w / width))
        pad = (current_h - new) // 2
        return granularity + (current_h - 2 * pad) * (current_w + 1)
    new = int(width * (current_h / height))
    pad = (current_w - new) // 2
    return granularity + current_h * (current_w - 2 * pad + 1)


@pytest.mark.parametrize("merge_type,levels,router", [("spatial", [1, 4, 16], True), ("flat", LEVELS, False),
                                                      ("spatial_unpad", [4, 16], True)])
def test_other_merge_types_and_granularity_lists_convert_and_count_as_the_release(tmp_path, clip_dir, merge_type,
                                                                                  levels, router):
    tensors, _ = released_tensors(levels=levels, newline=merge_type == "spatial_unpad")
    if not router:
        tensors = {k: v for k, v in tensors.items() if not k.startswith("model.router.")}
    write_release(tmp_path / "release", tensors, router=router, mm_patch_merge_type=merge_type,
                  vis_token_granularity=levels)
    from_avg_llava(tmp_path / "release", tmp_path / "out", clip_dir=clip_dir)
    model = MultiGranForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    processor = MultiGranProcessor.from_pretrained(tmp_path / "out")
    assert model.visual.level_tokens == levels and model.config.method_settings["patch_merge"] == merge_type
    if router:
        assert model.visual.router.router[2].out_features == len(levels)
    picture = Image.fromarray(np.random.default_rng(1).integers(0, 256, (20, 37, 3), dtype=np.uint8))  # 37x20
    for level in levels:
        inputs = processor(images=picture, text="USER: <image>\nWhat? ASSISTANT:", granularity=level)
        count = int((inputs["input_ids"] == processor.image_token_id).sum())
        with torch.no_grad():
            assert model(**inputs).image_token_counts == [count] == [release_count(37, 20, level, merge_type)]


def test_release_settings_multigran_does_not_reproduce_are_refused_by_name(tmp_path, clip_dir):
    tensors, _ = released_tensors()
    cases = [
        ({"mm_patch_merge_type": "spatial_unpad_anyres_max"}, r"mm_patch_merge_type 'spatial_unpad_anyres_max' is not "
                                                              r"supported"),
        ({"mm_patch_merge_type": "flat"}, r"mm_patch_merge_type 'flat' .*with router_select.*never runs its router"),
        ({"mm_patch_merge_type": None}, r"mm_patch_merge_type 'flat' \(the release's default"),
        ({"image_aspect_ratio": "pad"}, r"image_aspect_ratio 'pad' is not supported"),
        ({"image_aspect_ratio": None}, r"image_aspect_ratio 'square' is not supported"),
        ({"mm_projector_type": "linear"}, r"mm_projector_type 'linear' is not supported"),
        ({"mm_projector_type": "mlp3x_gelu"}, r"mm_projector_type 'mlp3x_gelu' is not supported"),
        ({"vis_token_granularity": [16, 4]}, r"vis_token_granularity \[16, 4\]: .*the last level must be the largest"),
        ({"vis_token_granularity": "1,4,16"}, r"vis_token_granularity '1,4,16': it must be a list"),
    ]
    for index, (overrides, message) in enumerate(cases):
        write_release(tmp_path / f"release{index}", tensors, **overrides)
        with pytest.raises(CheckpointMismatchError, match=message):
            from_avg_llava(tmp_path / f"release{index}", tmp_path / f"out{index}", clip_dir=clip_dir)
        assert not (tmp_path / f"out{index}").exists()  # refused before anything is written
