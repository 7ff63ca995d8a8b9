"""LLaVA-UHD v2 against transcriptions of its release (thunlp/LLaVA-UHD, branch LLaVA-UHD-v2 @ ec06a5b): the
evaluation pre-resize per benchmark, the stage-0 data and gradient clipping, the 2x JBU stack of masks 2/3, and the
float64 behaviour of a model loaded with from_pretrained(dtype=torch.float64). The converter's side (pre-resize
default, hard-coded separator ids, masks 2/3 keys) is in test_convert_uhd.py."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from multigran import MultiGranForConditionalGeneration, MultiGranProcessor
from multigran.pipelines.uhd import resize_keep_ratio, uhd_eval_pre_resize
from multigran.pipelines.uhd_jbu import JBU2xStack
from multigran.tiny import build_tiny
from multigran.vision.varres import encode_variable_resolution

PROMPT = "USER: <image>\nWhat is written here? ASSISTANT:"


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: extra threads only add synchronisation on a busy 2-core machine
    yield
    torch.set_num_threads(threads)


def picture(width, height, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


# ------------------------------------------------------------------------------------ evaluation pre-resize


def release_loader_long_side(image_folder):
    """llava/eval/model_vqa_loader.py:56-61, transcribed: the --image-folder path decides."""
    if ("mme" in image_folder) or ("ai2d" in image_folder):
        return None
    elif "textvqa" in image_folder:
        return 1536
    else:
        return 1024


# --image-folder of the release's evaluation scripts that run model_vqa_loader (scripts/v1_5/eval/<name>.sh).
RELEASE_LOADER_FOLDERS = {
    "textvqa": "./playground/data/eval/textvqa/train_images",  # textvqa.sh:18
    "ai2d": "./playground/data/eval/ai2d/ai2d_images",  # ai2d.sh:26
    "mme": "./playground/data/eval/MME/MME_Benchmark_release_version",  # mme.sh:17
    "gqa": "./playground/data/eval/gqa/data/images",  # gqa.sh:17
    "pope": "./playground/data/eval/pope/val2014",  # pope.sh:16
    "docvqa": "./playground/data/ureader/DUE_Benchmark/DocVQA/pngs",  # docvqa_val.sh:16
    "chartqa": "./playground/data/ureader/ChartQA/test/png",  # chartqa.sh:17
    "vizwiz": "./playground/data/eval/vizwiz/test",  # vizwiz.sh
    "mmvet": "./playground/data/eval/mm-vet/images",  # mmvet.sh
}


def test_eval_pre_resize_per_benchmark_is_what_the_release_scripts_do():
    for benchmark, folder in RELEASE_LOADER_FOLDERS.items():
        assert uhd_eval_pre_resize(benchmark) == release_loader_long_side(folder), benchmark
    assert uhd_eval_pre_resize("textvqa") == 1536 and uhd_eval_pre_resize("ai2d") is None
    # MME: the loader means "no resize" but tests "mme" case-sensitively against ".../MME/MME_Benchmark_..." -> 1024.
    assert uhd_eval_pre_resize("mme") == 1024 and release_loader_long_side("mme") is None
    # MMBench runs model_vqa_mmbench.py, whose resize is commented out (:111); ScienceQA model_vqa_science.py:64.
    assert uhd_eval_pre_resize("mmbench") is None and uhd_eval_pre_resize("mmbench_cn") is None
    assert uhd_eval_pre_resize("scienceqa") == 1024
    assert uhd_eval_pre_resize("TextVQA_val") == 1536  # task names are matched lower-cased, by containment
    with pytest.raises(TypeError, match="task_name must be a non-empty string"):
        uhd_eval_pre_resize(None)


def release_resize_image_keep_ratio(image, max_size):
    """llava/slice_process.py:244-253, transcribed."""
    original_width, original_height = image.size
    if original_width > original_height:
        new_width = max_size
        new_height = int((max_size / original_width) * original_height)
    else:
        new_height = max_size
        new_width = int((max_size / original_height) * original_width)
    return image.resize((new_width, new_height), Image.Resampling.BICUBIC)


@pytest.mark.parametrize("size, long_side", [((640, 480), 1024), ((480, 640), 1536), ((500, 500), 1024),
                                             ((1999, 37), 1024), ((3000, 2000), 1024), ((100, 70), 1536)])
def test_pre_resize_pixels_match_the_release(size, long_side):
    image = picture(*size, seed=size[0])
    ours, release = resize_keep_ratio(image, long_side), release_resize_image_keep_ratio(image, long_side)
    assert ours.size == release.size and np.array_equal(np.asarray(ours), np.asarray(release))


def release_grid(width, height, long_side, scale, max_slices=9):
    """resize_image_keep_ratio (slice_process.py:244-253) then slice_image_minicpm's grid (:67-119), transcribed."""
    if long_side is not None:
        if width > height:
            width, height = long_side, int((long_side / width) * height)
        else:
            width, height = int((long_side / height) * width), long_side
    multiple = min(math.ceil(width * height / (scale * scale)), max_slices)
    if multiple <= 1:
        return None
    grids = []
    for count in [n for n in (multiple - 1, multiple, multiple + 1) if n != 1 and n <= max_slices]:
        grids += [[m, count // m] for m in range(1, count + 1) if count % m == 0]
    best, min_error = [1, 1], float("inf")
    for grid in grids:
        error = abs(math.log(width / height) - math.log(grid[0] / grid[1]))
        if error < min_error:
            best, min_error = grid, error
    return best


def test_processor_pre_resize_default_and_per_call(tmp_path):
    build_tiny(tmp_path / "m", method="uhd", method_settings={"pre_resize_long_side": 64})
    processor = MultiGranProcessor.from_pretrained(tmp_path / "m")  # tiny tower: S = 32
    image = picture(40, 30, 1)
    for option, long_side in [({}, 64), ({"pre_resize_long_side": 100}, 100), ({"pre_resize_long_side": None}, None)]:
        grid = release_grid(40, 30, long_side, scale=32)
        inputs = processor(images=image, text=PROMPT, **option)
        assert inputs["slice_grids"].tolist() == [grid], option
        count = (inputs["input_ids"] == processor.image_token_id).sum().item()
        assert count == 145 * grid[0] * grid[1] + 144, option
        assert processor.count_image_tokens(image, **option) == [count]
    # The three settings give three different grids, so each assertion above tells them apart.
    assert [release_grid(40, 30, n, 32) for n in (64, 100, None)] == [[2, 2], [3, 3], [2, 1]]
    with pytest.raises(ValueError, match="pre_resize_long_side must be >= 1"):
        processor(images=image, text=PROMPT, pre_resize_long_side=0)


# ----------------------------------------------------------------------------------------------- stage 0


IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # featup/util.py:62


def release_stage0_tensor(image, res):
    """featup/util.py:293-296 `get_transform(res, False, "center")` (train_vdim_upsampler.py:485), transcribed:
    T.Resize(res, NEAREST) - torchvision: shorter side -> res, longer int(res * long / short), no-op at that size -,
    T.CenterCrop(res) - torchvision: top/left int(round((side - res) / 2.)) -, T.ToTensor(), norm (ImageNet)."""
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = res, int(res * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.Resampling.NEAREST)
    top, left = int(round((new_h - res) / 2.0)), int(round((new_w - res) / 2.0))
    pixels = np.asarray(image.crop((left, top, left + res, top + res)), dtype=np.float32) / 255.0
    pixels = (pixels - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    return torch.from_numpy(pixels.transpose(2, 0, 1).copy())


@pytest.mark.parametrize("size, res", [((50, 20), 32), ((45, 33), 32), ((33, 47), 32), ((32, 70), 32),
                                       ((640, 427), 336), ((427, 640), 336), ((336, 500), 336)])
def test_stage0_images_are_prepared_as_the_release(tmp_path, size, res):
    """45x33 -> 43x32 (truncated, not 44) then crop left int(round(5.5)) = 6; 33x47 -> 32x45, top round(6.5) = 6."""
    from multigran.train.uhd_stage0 import IMAGENET_MEAN as MEAN, IMAGENET_STD as STD, ImageFolderDataset

    assert list(MEAN) == IMAGENET_MEAN and list(STD) == IMAGENET_STD
    image = picture(*size, seed=size[0] + size[1])
    image.save(tmp_path / "a.png")
    ours = ImageFolderDataset([tmp_path / "a.png"], res, MEAN, STD)[0]
    torch.testing.assert_close(ours, release_stage0_tensor(image, res), rtol=0, atol=1e-6)


def test_stage0_alternatives_are_options():
    from multigran.train.uhd_stage0 import load_jbu_recipe, resize_and_center_crop

    recipe = load_jbu_recipe("recipes/uhd/stage0_jbu.yaml")
    assert (recipe.data.resample, recipe.data.normalize) == ("nearest", "imagenet")
    assert (recipe.training.early_clip_steps, recipe.training.early_clip_norm) == (10, 1e-4)
    image = picture(45, 33, 2)
    bilinear = resize_and_center_crop(image, 32, "bilinear")
    assert np.array_equal(np.asarray(bilinear),
                          np.asarray(image.resize((43, 32), Image.Resampling.BILINEAR).crop((6, 0, 38, 32))))
    with pytest.raises(ValueError, match=r"\(data\): resample must be one of \['bilinear', 'nearest'\]"):
        load_jbu_recipe("recipes/uhd/stage0_jbu.yaml", ["data.resample=bicubic"])
    with pytest.raises(ValueError, match=r"\(data\): normalize must be one of"):
        load_jbu_recipe("recipes/uhd/stage0_jbu.yaml", ["data.normalize=clip"])
    with pytest.raises(ValueError, match="early_clip_steps must be an int >= 0"):
        load_jbu_recipe("recipes/uhd/stage0_jbu.yaml", ["training.early_clip_steps=-1"])


def test_stage0_training_uses_release_data_and_clips_the_first_10_steps(tmp_path, monkeypatch):
    """train_vdim_upsampler.py:270-271: clip_gradients(opt, 1e-4, "norm") while global_step < 10, over every
    parameter of the optimizer (upsampler, downsamplers, scale nets: :381-393); data with ImageNet statistics."""
    from multigran.train import uhd_stage0

    build_tiny(tmp_path / "model", method="uhd", seed=0)
    (tmp_path / "images").mkdir()
    for i in range(2):
        picture(48, 40, i).save(tmp_path / "images" / f"{i}.png")
    datasets, clips = [], []

    class RecordingDataset(uhd_stage0.ImageFolderDataset):
        def __init__(self, paths, size, mean, std, resample="nearest"):
            datasets.append((list(mean), list(std), resample))
            super().__init__(paths, size, mean, std, resample)

    original_clip = torch.nn.utils.clip_grad_norm_

    def recording_clip(parameters, max_norm, *args, **kwargs):
        parameters = list(parameters)
        total = original_clip(parameters, max_norm, *args, **kwargs)
        after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in parameters if p.grad is not None]))
        clips.append((max_norm, len(parameters), float(total), float(after)))
        return total

    monkeypatch.setattr(uhd_stage0, "ImageFolderDataset", RecordingDataset)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
    result = uhd_stage0.run_jbu_recipe("recipes/uhd/stage0_jbu.yaml", [
        f"model={tmp_path / 'model'}", f"output_dir={tmp_path / 'out'}", f"data.path={tmp_path / 'images'}",
        "training.max_steps=11", "training.per_device_train_batch_size=1", "training.gradient_accumulation_steps=1",
        "training.device=cpu", "training.save_model=false", "loss.n_jitters=1",
    ])
    assert result["steps"] == 11
    assert datasets == [(IMAGENET_MEAN, IMAGENET_STD, "nearest")]
    model = MultiGranForConditionalGeneration.from_pretrained(tmp_path / "model")
    trained = len(list(model.visual.upsampler.parameters())) + len(list(uhd_stage0.JBUStage0Loss(
        feat_dim=model.config.vision_config.hidden_size, patch_size=model.config.vision_config.patch_size
    ).parameters()))
    assert len(clips) == 10 and all(c[0] == 1e-4 and c[1] == trained for c in clips)
    assert all(c[2] > 1e-3 and c[3] <= 1e-4 * (1 + 1e-5) for c in clips)  # it did clip
    metrics = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 11 and all(np.isfinite(m["loss"]) for m in metrics)  # step 11: not clipped


def test_stage0_refuses_the_2x_stack_and_loads_its_weights_into_it(tmp_path):
    from safetensors.torch import save_file

    from multigran.train.uhd_stage0 import load_jbu_weights, run_jbu_recipe

    build_tiny(tmp_path / "two", method="uhd", method_settings={"feature_scale_mask": 3})
    (tmp_path / "images").mkdir()
    picture(40, 40).save(tmp_path / "images" / "a.png")
    with pytest.raises(ValueError, match=r"2x JBU stack \(feature_scale_mask 3\): stage 0 trains the 4x stack"):
        run_jbu_recipe("recipes/uhd/stage0_jbu.yaml", [f"model={tmp_path / 'two'}", f"output_dir={tmp_path / 'o'}",
                                                       f"data.path={tmp_path / 'images'}", "training.device=cpu"])
    four, _ = build_tiny(method="uhd", seed=3)
    save_file({"visual.upsampler." + k: v.contiguous() for k, v in four.visual.upsampler.state_dict().items()},
              str(tmp_path / "jbu.safetensors"))
    two, _ = build_tiny(method="uhd", seed=4, method_settings={"feature_scale_mask": 2})
    load_jbu_weights(two, tmp_path / "jbu.safetensors")  # up1 and the fix-up; up2 left aside (strict=False)
    for key, value in two.visual.upsampler.state_dict().items():
        assert torch.equal(value, four.visual.upsampler.state_dict()[key]), key


# ------------------------------------------------------------------------------------------ masks 2 and 3


@pytest.mark.parametrize("mask", [2, 3])
def test_masks_2_and_3_run_the_2x_stack_end_to_end(mask):
    model, processor = build_tiny(method="uhd", seed=0, method_settings={"feature_scale_mask": mask})
    upsampler = model.visual.upsampler
    assert isinstance(upsampler, JBU2xStack) and sorted({k.split(".")[0] for k in upsampler.state_dict()}) == \
        ["fixup_proj", "up1"]
    assert upsampler.up1.range_temp.item() == 0.0 and upsampler.up1.sigma_spatial.item() == 1.0  # release init
    inputs = processor(images=picture(80, 48, 4), text=PROMPT)
    assert inputs["slice_grids"].tolist() == [[2, 2]]
    with torch.no_grad():
        features = model.get_image_features(inputs["pixel_values"], inputs["image_sizes"],
                                            view_sizes=inputs["view_sizes"], slice_grids=inputs["slice_grids"])[0]
        # Per view, by hand: 2x level = x2 + 0.1 * fixup_proj(x2) with x2 = up1(x) (upsamplers.py:293-295).
        conv = upsampler.fixup_proj[1]
        tokens = []
        for v in range(5):
            h, w = inputs["view_sizes"][0, v].tolist()
            view = inputs["pixel_values"][0, v, :, :h, :w]
            (grid,) = encode_variable_resolution(model.vision_tower, [view], -2, "default")
            source = grid.permute(2, 0, 1)[None]
            two_x = upsampler.up1(source, view[None])
            two_x = two_x + 0.1 * (torch.einsum("oc,bchw->bohw", conv.weight[:, :, 0, 0], two_x)
                                   + conv.bias[:, None, None])
            levels = [two_x] if mask == 2 else [source, two_x]
            tokens.append(model.visual.mm_projector([levels])[0])
    table = model.get_input_embeddings().weight
    comma, newline = (table[i] for i in model.config.method_settings["separator_ids"])
    expected = torch.cat([tokens[0], comma[None], tokens[1], newline[None], tokens[2], comma[None], tokens[3],
                          newline[None], tokens[4]])
    torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        out = model(**{k: v for k, v in inputs.items() if k not in ("pixel_values", "image_sizes", "view_sizes",
                                                                      "slice_grids")},
                    image_features=[features])
    assert out.image_token_counts == [724] and torch.isfinite(out.logits).all()


# ------------------------------------------------------------------------------------------- float64 models


@pytest.fixture(scope="module")
def float64_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("uhd64")
    _, processor = build_tiny(path, method="uhd", seed=0)
    model = MultiGranForConditionalGeneration.from_pretrained(path, dtype=torch.float64).eval()  # no .double()
    return model, processor


def test_from_pretrained_float64_gives_a_float64_visual_path(float64_model):
    model, _ = float64_model
    projector = model.visual.mm_projector
    assert projector.pos_embed.dtype == torch.float64 and projector.attn.in_proj_weight.dtype == torch.float64
    assert model.vision_tower.embeddings.position_embedding.weight.dtype == torch.float64
    floating = {n: t.dtype for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_floating_point()}
    # Only the LLM's rotary frequencies stay float32 (transformers keeps them so); every visual tensor is float64.
    assert {n for n, d in floating.items() if d != torch.float64} <= {
        "language_model.model.rotary_emb.inv_freq", "language_model.model.rotary_emb.original_inv_freq"}


def test_fused_equals_reference_in_float64_after_from_pretrained(float64_model):
    model, processor = float64_model
    projector = model.visual.mm_projector
    inputs = processor(images=picture(80, 40, 11), text=PROMPT)  # 2x1 grid: views of two sizes

    def features(impl):
        projector.impl = impl
        projector.clear_fused_cache()
        with torch.no_grad():
            return torch.cat(model.get_image_features(
                inputs["pixel_values"], inputs["image_sizes"], view_sizes=inputs["view_sizes"],
                slice_grids=inputs["slice_grids"]))

    try:
        fused, reference = features("fused"), features("reference")
        assert fused.dtype == torch.float64
        torch.testing.assert_close(fused, reference, rtol=1e-10, atol=1e-10 * reference.abs().max().item())
        # The check can fail: a float32 table (what float64 loading used to leave) is off by far more than 1e-10.
        table = projector.pos_embed.clone()
        projector.pos_embed = projector.pos_embed.float()
        try:
            off = (features("reference") - features("fused")).abs().max().item()
        finally:
            projector.pos_embed = table
        assert off > 1e-9 * reference.abs().max().item(), off
    finally:
        projector.impl = "fused"
        projector.clear_fused_cache()
