"""Released MG-LLaVA layout (mmengine .pth, `state_dict` nesting, DeepSpeed directory) -> multigran `mg` directory."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoProcessor, CLIPVisionConfig, CLIPVisionModel

from multigran import MultiGranForConditionalGeneration
from multigran.cli import main
from multigran.convert import CheckpointMismatchError
from multigran.convert.mg_llava import from_mg_llava
from multigran.tiny import build_tiny_tokenizer, tiny_text_config
from test_convnext import TINY_DEPTHS, TINY_DIMS, tiny_open_clip_state_dict

D = 16  # LLM width
CLIP_WIDTH = 8


def tiny_llm_dir(path, with_weights=False):
    """A base-LLM folder as on the Hub: config.json + tokenizer (no chat template, like vicuna-7b-v1.5)."""
    tokenizer = build_tiny_tokenizer(image_token=False)
    tokenizer.chat_template = None
    config = tiny_text_config(vocab_size=len(tokenizer), hidden_size=D)
    config.save_pretrained(path)
    tokenizer.save_pretrained(path)
    if with_weights:
        torch.manual_seed(7)
        AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return config


def released_state(llm_config, with_llm=True):
    """Random tensors under exactly the released key names (spec "Released checkpoints"), tiny shapes."""
    g = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.2  # noqa: E731
    high = TINY_DIMS[-1]
    state = {
        "projector.model.0.weight": r(D, CLIP_WIDTH), "projector.model.0.bias": r(D),
        "projector.model.2.weight": r(D, D), "projector.model.2.bias": r(D),
        "bbox_projector.model.0.weight": r(D, sum(TINY_DIMS)), "bbox_projector.model.0.bias": r(D),
        "bbox_projector.model.2.weight": r(D, D), "bbox_projector.model.2.bias": r(D),
        "fuse_module.slow_conv.weight": r(high, high, 1, 1), "fuse_module.slow_conv.bias": r(high),
        "fuse_module.slow_proj.weight": r(CLIP_WIDTH, high, 1, 1), "fuse_module.slow_proj.bias": r(CLIP_WIDTH),
        "fuse_module.fast_conv.weight": r(CLIP_WIDTH, 1, 7, 7), "fuse_module.fast_conv.bias": r(CLIP_WIDTH),
        "fuse_module.fast_proj.weight": r(CLIP_WIDTH, CLIP_WIDTH, 1, 1), "fuse_module.fast_proj.bias": r(CLIP_WIDTH),
        "fuse_module.gate.0.weight": r(CLIP_WIDTH // 2, 2 * CLIP_WIDTH), "fuse_module.gate.0.bias": r(CLIP_WIDTH // 2),
        "fuse_module.gate.2.weight": r(1, CLIP_WIDTH // 2), "fuse_module.gate.2.bias": r(1),
    }
    if with_llm:
        torch.manual_seed(3)
        llm = AutoModelForCausalLM.from_config(llm_config)
        state.update({f"llm.{k}": v.clone() for k, v in llm.state_dict().items()})
    return state


@pytest.fixture()
def originals(tmp_path):
    """The original checkpoints the conversion reads: HF CLIP, OpenCLIP ConvNeXt, the base LLM's config."""
    torch.manual_seed(1)
    clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=CLIP_WIDTH, intermediate_size=16, num_hidden_layers=2,
                                            num_attention_heads=2, image_size=16, patch_size=4))
    clip.save_pretrained(tmp_path / "clip")
    (tmp_path / "convnext").mkdir()
    torch.save(tiny_open_clip_state_dict(), tmp_path / "convnext" / "open_clip_pytorch_model.bin")
    llm_config = tiny_llm_dir(tmp_path / "vicuna")
    return {"clip": tmp_path / "clip", "convnext": tmp_path / "convnext", "llm": tmp_path / "vicuna",
            "llm_config": llm_config, "convnext_state": tiny_open_clip_state_dict()}


def convnext_location(timm_key: str) -> str | None:
    """Where each OpenCLIP trunk key lands in the Hugging Face ConvNextModel (None: dropped), written out."""
    key = timm_key[len("visual.trunk."):] if timm_key.startswith("visual.trunk.") else None
    if key is None or key.startswith("head."):
        return None
    parts = key.split(".")
    if parts[0] == "stem":
        return {"0": "embeddings.patch_embeddings.", "1": "embeddings.layernorm."}[parts[1]] + parts[2]
    stage = f"encoder.stages.{parts[1]}."
    if parts[2] == "downsample":
        return stage + f"downsampling_layer.{parts[3]}.{parts[4]}"
    layer = stage + f"layers.{parts[3]}."
    if parts[4] == "gamma":
        return layer + "layer_scale_parameter"
    name = {"conv_dw": "dwconv", "norm": "layernorm", "fc1": "pwconv1", "fc2": "pwconv2"}[parts[-2]]
    return layer + f"{name}.{parts[-1]}"


def release_location(key: str) -> str:
    for old, new in (("llm.", "language_model."), ("projector.", "visual.projector."),
                     ("bbox_projector.", "visual.bbox_projector."), ("fuse_module.", "visual.fuse_module.")):
        if key.startswith(old):
            return new + key[len(old):]
    raise AssertionError(key)


def check_every_tensor(dst, release, originals):
    converted = load_file(dst / "model.safetensors")
    placed = set()
    for key, value in release.items():
        assert torch.equal(converted[release_location(key)], value), key
        placed.add(release_location(key))
    for key, value in load_file(originals["clip"] / "model.safetensors").items():
        new = "vision_tower." + key.removeprefix("vision_model.")  # transformers 5 has no `vision_model.` level
        assert torch.equal(converted[new], value), key
        placed.add(new)
    for key, value in originals["convnext_state"].items():
        new = convnext_location(key)
        if new is not None:
            assert torch.equal(converted["visual.hires_tower." + new], value), key
            placed.add("visual.hires_tower." + new)
    # Only the ConvNeXt's final LayerNorm (unused, absent from the trunk) is left at its init.
    assert set(converted) - placed == {"visual.hires_tower.layernorm.weight", "visual.hires_tower.layernorm.bias"}


def write_deepspeed(path, state, latest=False):
    """XTuner/mmengine + DeepSpeed (ZeRO-2) layout: iter_N.pth/mp_rank_00_model_states.pt with a `module` entry."""
    tag = path / "iter_10.pth" if latest else path
    tag.mkdir(parents=True)
    torch.save({"module": state, "buffer_names": [], "param_shapes": [{k: v.shape for k, v in state.items()}],
                "dp_world_size": 8, "mp_world_size": 1, "ds_version": "0.14.0", "global_steps": 10},
               tag / "mp_rank_00_model_states.pt")
    torch.save({"optimizer_state_dict": {"zero_stage": 2}}, tag / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt")
    if latest:
        (path / "latest").write_text("iter_10.pth")


@pytest.mark.parametrize("layout", ["plain", "state_dict", "deepspeed_tag", "deepspeed_latest"])
def test_every_tensor_lands_where_it_should(tmp_path, originals, layout):
    release = released_state(originals["llm_config"])
    src = tmp_path / "release.pth"
    if layout == "plain":
        torch.save(release, src)
    elif layout == "state_dict":
        torch.save({"meta": {"epoch": 1, "iter": 5198}, "state_dict": release}, src)
    else:
        src = tmp_path / "work_dir"
        write_deepspeed(src, release, latest=layout == "deepspeed_latest")
    dst = from_mg_llava(src, originals["clip"], originals["convnext"], tmp_path / "out", llm_config=originals["llm"])
    check_every_tensor(dst, release, originals)
    config = json.loads((dst / "config.json").read_text())
    assert config["method"] == "mg" and config["vision_feature_layer"] == -2
    settings = config["method_settings"]
    assert settings["convnext_config"]["hidden_sizes"] == TINY_DIMS
    assert settings["convnext_config"]["depths"] == TINY_DEPTHS
    assert settings["high_res"] == (16 // 4) * 32  # CLIP grid x ConvNeXt stride (768 for the release)
    # Release parity: compat on, the release's text budget max_length = 2048 - grid^2 (1472 at 336 / 14).
    assert settings["compat"] is True and settings["text_max_length"] == 2048 - (16 // 4) ** 2
    processor_settings = json.loads((dst / "processor_config.json").read_text())["image_processor"]["method_settings"]
    assert processor_settings == settings


def test_converted_model_loads_and_runs(tmp_path, originals):
    release = released_state(originals["llm_config"])
    torch.save(release, tmp_path / "release.pth")
    dst = from_mg_llava(tmp_path / "release.pth", originals["clip"], originals["convnext"], tmp_path / "out",
                        llm_config=originals["llm"] / "config.json")
    model = MultiGranForConditionalGeneration.from_pretrained(dst).eval()
    processor = AutoProcessor.from_pretrained(dst)
    assert torch.equal(model.visual.fuse_module.slow_proj.weight, release["fuse_module.slow_proj.weight"])
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}],
        add_generation_prompt=True)
    assert prompt == "USER: <image>\nWhat is it? ASSISTANT:"  # XTuner's vicuna template
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8))
    inputs = processor(images=image, text=prompt, boxes=[[[0, 0, 20, 20], [10, 5, 40, 30]]])
    assert inputs["pixel_values"].shape == (1, 3, 16, 16) and inputs["pixel_values_aux"].shape == (1, 3, 128, 128)
    output = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert output.shape[1] == inputs["input_ids"].shape[1] + 3
    with torch.no_grad():
        assert model(**inputs).image_token_counts == [16 + 2]
    # `<image>` was added to the tokenizer (XTuner inserts images by a negative index): outside the LM's vocabulary.
    assert processor.image_token_id >= model.config.text_config.vocab_size


def test_stage1_checkpoint_takes_the_llm_from_its_folder(tmp_path, originals):
    tiny_llm_dir(originals["llm"], with_weights=True)
    release = released_state(originals["llm_config"], with_llm=False)
    torch.save(release, tmp_path / "stage1.pth")
    dst = from_mg_llava(tmp_path / "stage1.pth", originals["clip"], originals["convnext"], tmp_path / "out",
                        llm_config=originals["llm"])
    converted = load_file(dst / "model.safetensors")
    base = load_file(originals["llm"] / "model.safetensors")
    for key, value in base.items():
        assert torch.equal(converted["language_model." + key], value), key


def test_mismatched_keys_fail_naming_them(tmp_path, originals):
    release = released_state(originals["llm_config"])
    release["projector.model.1.weight"] = torch.zeros(2)  # not a released key
    del release["fuse_module.gate.2.bias"]
    release["bbox_projector.model.0.weight"] = torch.zeros(D, 99)
    torch.save(release, tmp_path / "bad.pth")
    with pytest.raises(CheckpointMismatchError) as error:
        from_mg_llava(tmp_path / "bad.pth", originals["clip"], originals["convnext"], tmp_path / "out",
                      llm_config=originals["llm"])
    message = str(error.value)
    assert "visual.projector.model.1.weight" in message and "visual.fuse_module.gate.2.bias" in message
    assert "visual.bbox_projector.model.0.weight: checkpoint (16, 99) vs model (16, 56)" in message
    assert not (tmp_path / "out" / "model.safetensors").exists()  # checked before anything is written


class NotATensor:
    pass


def test_unsafe_pickles_and_unsupported_layouts_fail_clearly(tmp_path, originals):
    args = (originals["clip"], originals["convnext"], tmp_path / "out")
    torch.save({"state_dict": {"projector.model.0.weight": torch.zeros(1)}, "hub": NotATensor()}, tmp_path / "x.pth")
    with pytest.raises(CheckpointMismatchError, match=r"x\.pth cannot be read with torch.load\(weights_only=True\)"):
        from_mg_llava(tmp_path / "x.pth", *args, llm_config=originals["llm"])
    zero3 = tmp_path / "zero3"
    zero3.mkdir()
    torch.save({"module": {}}, zero3 / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    with pytest.raises(CheckpointMismatchError, match="ZeRO-3 .* zero_to_fp32.py"):
        from_mg_llava(zero3, *args, llm_config=originals["llm"])
    stub = tmp_path / "stub"
    write_deepspeed(stub, {"projector.model.0.weight": torch.zeros(0)})
    with pytest.raises(CheckpointMismatchError, match=r"empty tensors \['projector.model.0.weight'\]"):
        from_mg_llava(stub, *args, llm_config=originals["llm"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointMismatchError, match="not a DeepSpeed checkpoint directory"):
        from_mg_llava(tmp_path / "empty", *args, llm_config=originals["llm"])
    torch.save(released_state(originals["llm_config"]), tmp_path / "ok.pth")
    with pytest.raises(CheckpointMismatchError, match="pass llm_config"):
        from_mg_llava(tmp_path / "ok.pth", *args)
    with pytest.raises(CheckpointMismatchError, match="pass convnext_dir"):
        from_mg_llava(tmp_path / "ok.pth", originals["clip"], None, tmp_path / "out", llm_config=originals["llm"])


def test_cli_convert_mg_llava(tmp_path, originals, capsys):
    release = released_state(originals["llm_config"])
    torch.save({"state_dict": release}, tmp_path / "release.pth")
    # The ConvNeXt as a single safetensors file this time.
    save_file(tiny_open_clip_state_dict(), tmp_path / "open_clip_model.safetensors")
    code = main(["convert", "mg-llava", str(tmp_path / "release.pth"), str(tmp_path / "out"),
                 "--clip", str(originals["clip"]), "--convnext", str(tmp_path / "open_clip_model.safetensors"),
                 "--llm-config", str(originals["llm"])])
    assert code == 0, capsys.readouterr().err
    check_every_tensor(tmp_path / "out", release, originals)
    code = main(["convert", "mg-llava", str(tmp_path / "release.pth"), str(tmp_path / "out2"),
                 "--clip", str(originals["clip"]), "--convnext", str(originals["convnext"])])
    assert code == 2 and "pass llm_config (--llm-config)" in capsys.readouterr().err
