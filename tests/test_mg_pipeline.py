"""MG-LLaVA in the model: processor step, token accounting, object tokens after the image tokens, identity fusion at
init, boxes through the processor and `multigran generate --boxes`, the hard box cap, bad input."""

import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from multigran import MultiGranForConditionalGeneration
from multigran.cli import main
from multigran.configuration import MultiGranConfig
from multigran.ops.roi_align import roi_align
from multigran.pipelines.mg import MgPipeline, MgSettings, mg_settings
from multigran.processing import MultiGranImageProcessor, MultiGranProcessor
from multigran.tiny import TINY_METHOD_SETTINGS, build_tiny, build_tiny_tokenizer, tiny_config

PROMPT = "USER: <image>\nWhat is in the picture? ASSISTANT:"
GRID = 8  # tiny CLIP: 32 px, patch 4
HIGH_RES = TINY_METHOD_SETTINGS["mg"]["high_res"]  # 256


def picture(width, height, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def tiny_mg():
    return build_tiny(None, method="mg", seed=1)


@pytest.fixture(scope="module")
def tiny_mg_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_mg")
    build_tiny(path, method="mg", seed=2)
    return path


def capture_lm_inputs(model):
    """Runs the model's forward and returns the inputs_embeds the LM received."""
    seen = {}

    def record(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"]

    return seen, model.language_model.register_forward_pre_hook(record, with_kwargs=True)


def gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def reference_visual_tokens(model, inputs):
    """Per image [fused image tokens][object tokens], computed from Hugging Face's own encoder outputs."""
    visual = model.visual
    with torch.no_grad():
        clip = model.vision_tower(inputs["pixel_values"], output_hidden_states=True).hidden_states[-2][:, 1:]
        stages = visual.hires_tower(inputs["pixel_values_aux"], output_hidden_states=True).hidden_states[1:]
        size = stages[0].shape[-2:]
        multi = torch.cat([stages[0]] + [F.interpolate(s, size=size, mode="bilinear", align_corners=False)
                                         for s in stages[1:]], dim=1)
        image_tokens = visual.projector(visual.fuse_module(clip, stages[-1]))
        out = []
        for i, (boxes, count) in enumerate(zip(inputs["boxes"], inputs["box_counts"].tolist())):
            rois = torch.cat([torch.full((count, 1), float(i)), boxes[:count]], dim=1)
            pooled = roi_align(multi, rois, 56, size[-1] / HIGH_RES, sampling_ratio=-1, aligned=False).mean((2, 3))
            p = visual.bbox_projector.model
            objects = gelu(pooled @ p[0].weight.T + p[0].bias) @ p[2].weight.T + p[2].bias
            out.append(torch.cat([image_tokens[i], objects]))
    return out


def randomise_fusion(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.visual.fuse_module.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))


# --- end to end ---------------------------------------------------------------------------------------------------


def test_end_to_end_processor_forward_generate(tiny_mg):
    model, processor = tiny_mg
    record = {"boxes": [[1, 2, 20, 25], [5, 5, 30, 28], [0, 0, 40, 30]], "scores": [0.5, 0.9, 0.7],
              "labels": ["cat", "dog", "table"]}
    inputs = processor(images=[picture(40, 30), picture(20, 50, seed=1)], text=[PROMPT, PROMPT],
                       boxes=[record, None])
    assert inputs["pixel_values"].shape == (2, 3, 32, 32)
    assert inputs["pixel_values_aux"].shape == (2, 3, HIGH_RES, HIGH_RES)
    assert inputs["boxes"].shape == (2, 3, 4) and inputs["box_counts"].tolist() == [3, 1]
    assert inputs["image_sizes"].tolist() == [[30, 40], [50, 20]]  # (height, width)
    # Image 0 (40x30): padded by 5 rows on top, scaled by 256 / 40 = 6.4, rounded; descending score order.
    expected = torch.tensor([[5, 10, 30, 33], [0, 5, 40, 35], [1, 7, 20, 30]], dtype=torch.float32) * 6.4
    torch.testing.assert_close(inputs["boxes"][0], torch.round(expected))
    assert not inputs["boxes"][1].any()  # no boxes -> one all-zero box, as the release
    placeholders = (inputs["input_ids"] == processor.image_token_id).sum(dim=1).tolist()
    assert placeholders == [GRID * GRID + 3, GRID * GRID + 1]
    with torch.no_grad():
        out = model(**inputs)
    assert out.image_token_counts == [GRID * GRID + 3, GRID * GRID + 1]
    assert out.visual_report == [{"visual_tokens": 67, "object_tokens": 3}, {"visual_tokens": 65, "object_tokens": 1}]
    generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert generated.shape == (2, inputs["input_ids"].shape[1] + 3)
    assert torch.equal(generated[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])


@pytest.mark.parametrize("num_boxes", [0, 1, 4, 9])
def test_processor_count_equals_model_feature_count(tiny_mg, num_boxes):
    model, processor = tiny_mg
    boxes = [[3 * k, 2 * k, 3 * k + 8, 2 * k + 6] for k in range(num_boxes)]  # kept as given (no NMS among them)
    inputs = processor(images=picture(48, 36), text=PROMPT, boxes=[boxes])
    counts = processor.count_image_tokens(picture(48, 36), boxes=[boxes])
    expected = GRID * GRID + max(num_boxes, 1)
    assert counts == [expected]
    assert int((inputs["input_ids"] == processor.image_token_id).sum()) == expected
    visual_inputs = {name: inputs[name] for name in model.visual.input_names}
    assert model.visual.placeholder_counts(inputs["image_sizes"], **visual_inputs) == [expected]
    with torch.no_grad():
        features = model.get_image_features(inputs["pixel_values"], inputs["image_sizes"], **visual_inputs)
    assert [f.shape for f in features] == [(expected, model.config.text_config.hidden_size)]


def test_object_tokens_follow_the_image_tokens_in_score_order(tiny_mg):
    model, processor = tiny_mg
    model = copy.deepcopy(model)
    randomise_fusion(model)  # a non-trivial gate, so the fused tokens differ from the CLIP-projected ones
    record = {"boxes": [[0, 0, 10, 10], [10, 10, 40, 30], [2, 20, 18, 29], [20, 0, 39, 9]],
              "scores": [0.2, 0.8, 0.5, 0.9], "labels": ["a", "b", "c", "d"]}
    inputs = processor(images=picture(40, 30, seed=4), text=PROMPT, boxes=record)
    order = [3, 1, 2, 0]  # descending score
    padded = torch.tensor(record["boxes"], dtype=torch.float32)[order] + torch.tensor([0, 5, 0, 5])
    torch.testing.assert_close(inputs["boxes"][0], torch.round(padded * 6.4))
    seen, hook = capture_lm_inputs(model)
    with torch.no_grad():
        model(**inputs)
    hook.remove()
    positions = (inputs["input_ids"][0] == processor.image_token_id).nonzero()[:, 0]
    assert positions.tolist() == list(range(int(positions[0]), int(positions[0]) + GRID * GRID + 4))  # one run
    spliced = seen["embeds"][0, positions]
    expected = reference_visual_tokens(model, inputs)[0]
    torch.testing.assert_close(spliced, expected, rtol=1e-5, atol=1e-5)
    # The fused image tokens are not the CLIP-projected ones once the gate is non-zero (the check above has teeth).
    with torch.no_grad():
        clip = model.vision_tower(inputs["pixel_values"], output_hidden_states=True).hidden_states[-2][:, 1:]
        assert not torch.allclose(spliced[: GRID * GRID], model.visual.projector(clip)[0], atol=1e-3)
    # Text positions keep their token embeddings.
    text = (inputs["input_ids"][0] != processor.image_token_id).nonzero()[:, 0]
    embed = model.get_input_embeddings().weight
    torch.testing.assert_close(seen["embeds"][0, text], embed[inputs["input_ids"][0, text]])


def test_fusion_is_the_identity_at_init_on_the_whole_model():
    torch.manual_seed(5)
    model = MultiGranForConditionalGeneration(tiny_config(method="mg")).eval()
    fusion = model.visual.fuse_module
    for name in ("slow_proj", "fast_proj"):  # transformers' generic normal(0.02) init ran first: reset must win
        assert not getattr(fusion, name).weight.any() and not getattr(fusion, name).bias.any()
    # Xavier-uniform convs (bound sqrt(6 / (fan_in + fan_out))), not the generic normal init.
    bound = math.sqrt(6 / (32 + 32))
    assert 0.9 * bound < fusion.slow_conv.weight.abs().max() <= bound
    # Projectors: PyTorch's default Linear init (uniform, bound 1 / sqrt(fan_in)), as XTuner's ProjectorModel.
    for projector, fan_in in ((model.visual.projector, 32), (model.visual.bbox_projector, 8 + 16 + 24 + 32)):
        weight = projector.model[0].weight
        assert 0.9 / math.sqrt(fan_in) < weight.abs().max() <= 1 / math.sqrt(fan_in)
    image = picture(33, 47, seed=3)
    image_processor = MultiGranImageProcessor(method="mg", method_settings=model.config.method_settings, patch_size=4,
                                              crop_size={"height": 32, "width": 32})
    processor = MultiGranProcessor(image_processor=image_processor, tokenizer=build_tiny_tokenizer())
    inputs = processor(images=image, text=PROMPT)
    visual_inputs = {name: inputs[name] for name in model.visual.input_names}
    with torch.no_grad():
        features = model.get_image_features(inputs["pixel_values"], inputs["image_sizes"], **visual_inputs)[0]
        clip = model.vision_tower(inputs["pixel_values"], output_hidden_states=True).hidden_states[-2][:, 1:]
        w0, b0 = model.visual.projector.model[0].weight, model.visual.projector.model[0].bias
        w2, b2 = model.visual.projector.model[2].weight, model.visual.projector.model[2].bias
        expected = gelu(clip[0] @ w0.T + b0) @ w2.T + b2
    torch.testing.assert_close(features[: GRID * GRID], expected, rtol=1e-5, atol=1e-6)


def test_saved_model_reloads_with_its_weights(tiny_mg_dir):
    """from_pretrained must not re-run the release init over the loaded weights (fusion included)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    saved = load_file(tiny_mg_dir / "model.safetensors")
    model = AutoModelForImageTextToText.from_pretrained(tiny_mg_dir)
    state = model.state_dict()
    assert set(saved) == set(state)
    assert all(torch.equal(saved[k], state[k]) for k in saved)
    assert "visual.bbox_projector.model.0.weight" in saved and "visual.fuse_module.gate.2.bias" in saved


def test_training_step_updates_the_trainable_parts_only(tiny_mg):
    model, processor = tiny_mg
    model = copy.deepcopy(model).train()
    inputs = processor(images=picture(40, 30), text=PROMPT + " a cat", boxes=[[[1, 1, 20, 20]]])
    labels = inputs["input_ids"].clone()
    model(**inputs, labels=labels).loss.backward()
    visual = model.visual
    assert not any(p.requires_grad for p in visual.hires_tower.parameters())  # frozen (release)
    for part in (visual.projector, visual.bbox_projector, visual.fuse_module):
        assert all(p.grad is not None for p in part.parameters() if p.requires_grad)
    assert visual.bbox_projector.model[0].weight.grad.abs().sum() > 0


def test_bfloat16_model_runs(tiny_mg):
    model, processor = tiny_mg
    model = copy.deepcopy(model).to(torch.bfloat16)
    inputs = processor(images=picture(30, 30), text=PROMPT, boxes=[[[0, 0, 15, 15], [10, 10, 30, 30]]])
    with torch.no_grad():
        features = model.get_image_features(
            inputs["pixel_values"], inputs["image_sizes"], **{n: inputs[n] for n in model.visual.input_names})
    assert features[0].dtype == torch.bfloat16 and features[0].shape[0] == GRID * GRID + 2


# --- boxes: direct, box files, the CLI ------------------------------------------------------------------------------


def test_boxes_given_directly_are_kept_as_given(tiny_mg):
    _, processor = tiny_mg
    # Two heavily overlapping boxes: a detector record would NMS one away; boxes given alone are all kept, in order.
    boxes = [[0, 0, 20, 20], [1, 1, 21, 21], [30, 0, 40, 10]]
    for value in (boxes, np.array(boxes), torch.tensor(boxes), [boxes], json.dumps(boxes)):
        out = processor.image_processor.preprocess([picture(40, 40)], boxes=value)
        expected = torch.round(torch.tensor(boxes, dtype=torch.float32) * 6.4)
        torch.testing.assert_close(out["boxes"][0], expected)
        assert out["image_token_counts"] == [GRID * GRID + 3]


def test_detector_records_get_class_wise_nms(tiny_mg):
    _, processor = tiny_mg
    record = {"boxes": [[0, 0, 20, 20], [1, 1, 21, 21], [0, 0, 20, 20]], "scores": [0.9, 0.8, 0.7],
              "labels": ["cat", "cat", "dog"]}  # IoU(0, 1) = 361 / 439 > 0.2: box 1 goes; box 2 is another label
    out = processor.image_processor.preprocess([picture(40, 40)], boxes=[record])
    torch.testing.assert_close(out["boxes"][0], torch.round(torch.tensor([[0, 0, 20, 20], [0, 0, 20, 20.]]) * 6.4))
    assert out["box_counts"].tolist() == [2]


def test_box_file_record_path_and_lookup(tiny_mg, tmp_path):
    from multigran.data.boxes import read_box_file, write_box_file

    _, processor = tiny_mg
    records = [{"id": "img7", "boxes": [[0, 0, 10, 10], [20, 20, 30, 30]], "scores": [0.3, 0.6], "labels": ["a", "b"]},
               {"id": 8, "boxes": [[5, 5, 9, 9]], "scores": [0.5], "labels": ["c"]}]
    write_box_file(tmp_path / "boxes.json", records)
    by_id = read_box_file(tmp_path / "boxes.json")
    out = processor.image_processor.preprocess([picture(40, 40)], boxes=[by_id["img7"]])
    torch.testing.assert_close(out["boxes"][0], torch.round(torch.tensor([[20, 20, 30, 30], [0, 0, 10, 10.]]) * 6.4))
    # A file with one record, by path.
    write_box_file(tmp_path / "one.json", records[1:])
    out = processor.image_processor.preprocess([picture(40, 40)], boxes=str(tmp_path / "one.json"))
    torch.testing.assert_close(out["boxes"][0], torch.round(torch.tensor([[5, 5, 9, 9.]]) * 6.4))
    # A file with several records cannot be matched to an unnamed image.
    with pytest.raises(ValueError, match=r"holds 2 box records"):
        processor.image_processor.preprocess([picture(40, 40)], boxes=str(tmp_path / "boxes.json"))


def generate_report(capsys, model_dir, image_path, boxes):
    code = main(["generate", "--model", str(model_dir), "--image", str(image_path), "--prompt", "What is it?",
                 "--max-new-tokens", "2", "--device", "cpu", "--boxes", boxes, "--report"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.err.strip().splitlines()[-1])


def test_cli_generate_boxes_file_and_json(tiny_mg_dir, tmp_path, capsys):
    from multigran.data.boxes import write_box_file

    image_path = tmp_path / "street42.png"
    picture(40, 30).save(image_path)
    # JSON text: two boxes.
    report = generate_report(capsys, tiny_mg_dir, image_path, "[[0, 0, 10, 10], [12, 3, 30, 20]]")
    assert report == [{"visual_tokens": GRID * GRID + 2, "object_tokens": 2}]
    # A box file whose records are looked up by the image's file stem.
    write_box_file(tmp_path / "boxes.json", [
        {"id": "other", "boxes": [[0, 0, 5, 5]], "scores": [0.9], "labels": ["x"]},
        {"id": "street42", "boxes": [[0, 0, 10, 10], [12, 3, 30, 20], [31, 0, 39, 9]], "scores": [0.4, 0.5, 0.6],
         "labels": ["car", "car", "sign"]},
    ])
    report = generate_report(capsys, tiny_mg_dir, image_path, str(tmp_path / "boxes.json"))
    assert report == [{"visual_tokens": GRID * GRID + 3, "object_tokens": 3}]
    # A JSON record.
    record = json.dumps({"boxes": [[1, 1, 9, 9]], "scores": [0.9], "labels": ["dog"]})
    assert generate_report(capsys, tiny_mg_dir, image_path, record)[0]["object_tokens"] == 1


def test_cli_generate_bad_box_file_names_file_and_record(tiny_mg_dir, tmp_path, capsys):
    image_path = tmp_path / "img.png"
    picture(20, 20).save(image_path)
    broken = tmp_path / "broken.json"
    broken.write_text('[{"id": "img", "boxes": [[0, 0, 1, 1]]')
    args = ["generate", "--model", str(tiny_mg_dir), "--image", str(image_path), "--prompt", "q", "--device", "cpu"]
    assert main(args + ["--boxes", str(broken)]) == 2
    err = capsys.readouterr().err
    assert "broken.json" in err and "not valid JSON" in err
    bad_record = tmp_path / "bad.json"
    bad_record.write_text(json.dumps([{"id": "img", "boxes": [[0, 0, 5, 5]], "scores": [0.5, 0.4], "labels": ["a"]}]))
    assert main(args + ["--boxes", str(bad_record)]) == 2
    err = capsys.readouterr().err
    assert "bad.json" in err and "record id 'img'" in err and "1 boxes but 2 scores" in err
    assert main(args + ["--boxes", "[[0, 0, 5, 5]"]) == 2
    assert "not valid" in capsys.readouterr().err
    assert main(args + ["--boxes", "nothere.json"]) == 2
    assert "neither an existing box file" in capsys.readouterr().err
    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps([{"id": "someone_else", "boxes": [], "scores": [], "labels": []},
                                   {"id": "x", "boxes": [], "scores": [], "labels": []}]))
    assert main(args + ["--boxes", str(missing)]) == 2
    assert "no box record with the id of image(s)" in capsys.readouterr().err


# --- the hard cap, the context budget -------------------------------------------------------------------------------


def processor_with(processor, **settings):
    processor = copy.deepcopy(processor)
    processor.image_processor.method_settings = {**processor.image_processor.method_settings, **settings}
    return processor


def test_max_boxes_is_a_hard_bound_on_object_tokens(tiny_mg):
    model, processor = tiny_mg
    g = torch.Generator().manual_seed(0)
    # 300 identical boxes of 300 labels: NMS is class-wise (none suppressed), 1 per label passes the per-label cap;
    # the release would keep all 300, here the best 100 by score remain.
    scores = torch.rand(300, generator=g).tolist()
    record = {"boxes": [[2, 2, 30, 30]] * 300, "scores": scores, "labels": [f"l{i}" for i in range(300)]}
    inputs = processor(images=picture(40, 40), text=PROMPT, boxes=record)
    assert inputs["box_counts"].tolist() == [100]
    assert int((inputs["input_ids"] == processor.image_token_id).sum()) == GRID * GRID + 100
    with torch.no_grad():
        assert model(**inputs).image_token_counts == [GRID * GRID + 100]
    # A configured cap: 30 boxes of 3 labels -> 5 per label (max_boxes < 50) = 15 -> the best 5 overall.
    small = processor_with(processor, max_boxes=5)
    labels = ["a", "b", "c"] * 10
    record = {"boxes": [[i, 0, i + 1, 1] for i in range(30)], "scores": [i / 30 for i in range(30)], "labels": labels}
    out = small.image_processor.preprocess([picture(40, 40)], boxes=record)
    assert out["image_token_counts"] == [GRID * GRID + 5]
    # Top 5 per label are i = 29..15 (labels by i % 3); the 5 best scores overall: i = 29, 28, 27, 26, 25.
    torch.testing.assert_close(out["boxes"][0][:, 0], torch.round(torch.tensor([29, 28, 27, 26, 25.]) * 6.4))
    # Raw boxes are capped too (the first ones kept).
    out = small.image_processor.preprocess([picture(40, 40)], boxes=[[[i, 0, i + 1, 1] for i in range(12)]])
    assert out["image_token_counts"] == [GRID * GRID + 5]


def test_object_tokens_count_in_the_context_budget(tiny_mg):
    _, processor = tiny_mg
    processor = copy.deepcopy(processor)
    one_box = processor(images=picture(40, 40), text=PROMPT)["input_ids"].shape[1]
    processor.tokenizer.model_max_length = one_box + 2
    boxes = [[i, i, i + 2, i + 2] for i in range(0, 30, 3)]
    assert processor(images=picture(40, 40), text=PROMPT, boxes=[boxes[:3]])["input_ids"].shape[1] == one_box + 2
    with pytest.raises(ValueError, match=rf"{GRID * GRID + 4} visual .* context is {one_box + 2} tokens"):
        processor(images=picture(40, 40), text=PROMPT, boxes=[boxes[:4]])


# --- bad input ------------------------------------------------------------------------------------------------------


def test_boxes_outside_the_image_are_clipped_or_dropped(tiny_mg):
    _, processor = tiny_mg
    out = processor.image_processor.preprocess([picture(40, 30)], boxes=[[[-50, -20, 500, 400], [100, 100, 200, 200]]])
    # First box: clipped to the whole canvas; second: entirely outside -> dropped.
    torch.testing.assert_close(out["boxes"][0], torch.tensor([[0, 0, HIGH_RES, HIGH_RES]], dtype=torch.float32))
    out = processor.image_processor.preprocess([picture(40, 30)], boxes=[[[100, 100, 200, 200]]])
    assert out["box_counts"].tolist() == [1] and not out["boxes"].any()  # nothing left -> one zero box


@pytest.mark.parametrize("boxes, message", [
    ([[10, 10, 5, 20]], r"boxes of image 0: box 0 .* x2 < x1"),
    ([[0, 0, 5, float("nan")]], r"boxes of image 0: box 0 has a NaN or infinite coordinate"),
    ([[0, 0, float("inf"), 5]], r"NaN or infinite"),
    ([[0, 0, 1, 1]] * 10_001, r"10001 boxes, more than the limit of 10000"),
    ({"boxes": [[0, 0, 1, 1]], "scores": [0.5], "labels": ["a", "b"]}, r"1 boxes but 1 scores and 2 labels"),
    ({"boxes": [[0, 0, 1, 1]], "scores": [0.5, 0.2], "labels": ["a"]}, r"1 boxes but 2 scores"),
    ({"boxes": [[0, 0, 1, 1]], "labels": ["a"]}, r"missing \['scores'\]"),
    ({"frames": []}, r"video record"),
    ([[0, 0, 1]], r"list of \[x1, y1, x2, y2\]"),
    ("[[0, 0, 1, 1]", r"JSON text is not valid"),
])
def test_bad_boxes_reach_the_user_as_clear_errors(tiny_mg, boxes, message):
    _, processor = tiny_mg
    with pytest.raises(ValueError, match=message):
        processor(images=picture(40, 40), text=PROMPT, boxes=[boxes] if not isinstance(boxes, str) else boxes)


def test_box_entries_must_match_the_images(tiny_mg):
    _, processor = tiny_mg
    two = [picture(20, 20), picture(30, 20)]
    with pytest.raises(ValueError, match="got 3 entries for 2 image"):
        processor(images=two, text=[PROMPT, PROMPT], boxes=[None, None, None])
    with pytest.raises(ValueError, match="one image's boxes for 2 images"):
        processor(images=two, text=[PROMPT, PROMPT], boxes=[[0, 0, 5, 5]])
    with pytest.raises(TypeError, match="expected None, a record"):
        processor(images=two, text=[PROMPT, PROMPT], boxes=[None, 5])


def test_invalid_json_box_file_names_the_file(tiny_mg, tmp_path):
    _, processor = tiny_mg
    path = tmp_path / "dets.json"
    path.write_text("[{oops")
    with pytest.raises(ValueError, match=r"dets\.json: not valid JSON \(line 1"):
        processor(images=picture(40, 40), text=PROMPT, boxes=str(path))
    path.write_text('[{"id": 3, "boxes": [[0, 0, 1, NaN]], "scores": [1], "labels": ["a"]}]')
    with pytest.raises(ValueError, match=r"dets\.json, record id '3': box 0 has a NaN"):
        processor(images=picture(40, 40), text=PROMPT, boxes=str(path))


# --- settings and geometry ------------------------------------------------------------------------------------------


def test_settings_defaults_and_validation():
    settings = MgSettings()
    assert (settings.high_res, settings.max_boxes, settings.nms_iou, settings.roi_output_size) == (768, 100, 0.2, 56)
    assert settings.compat is False and settings.text_max_length is None and settings.drop_path_rate == 0.0
    config = settings.hires_config()
    assert list(config.hidden_sizes) == [192, 384, 768, 1536] and list(config.depths) == [3, 3, 27, 3]
    with pytest.raises(ValueError, match=r"unknown method_settings for method 'mg': \['max_box'\]"):
        mg_settings({"max_box": 3})
    for bad in ({"max_boxes": 0}, {"max_boxes": True}, {"nms_iou": 1.5}, {"grid_mismatch": "crop"},
                {"convnext_config": [1]}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            mg_settings(bad)


def test_grid_mismatch_error_fails_at_construction_and_resample_runs(tiny_mg):
    with pytest.raises(ValueError, match=r"ConvNeXt last stage is 4x4 at high_res 128 .* token grid is 8x8"):
        MgPipeline(tiny_config(method="mg", method_settings={"high_res": 128, "grid_mismatch": "error"}))
    model = MultiGranForConditionalGeneration(tiny_config(method="mg", method_settings={"high_res": 128})).eval()
    _, processor = tiny_mg
    processor = processor_with(processor, high_res=128)
    inputs = processor(images=picture(40, 40), text=PROMPT)
    assert inputs["pixel_values_aux"].shape[-1] == 128
    with torch.no_grad():
        assert model(**inputs).image_token_counts == [GRID * GRID + 1]


def test_model_rejects_missing_mg_inputs(tiny_mg):
    model, processor = tiny_mg
    inputs = processor(images=picture(40, 40), text=PROMPT)
    inputs.pop("pixel_values_aux")
    with pytest.raises(ValueError, match="needs pixel_values_aux, boxes and box_counts"):
        model(**inputs)


def test_real_size_keys_and_parameter_counts():
    config = MultiGranConfig(method="mg")  # CLIP ViT-L/14-336 + a 4096-d Llama, ConvNeXt-L at 768
    with torch.device("meta"):
        visual = MgPipeline(config)
    assert visual.grid == 24
    shapes = {k: tuple(v.shape) for k, v in visual.state_dict().items() if not k.startswith("hires_tower.")}
    assert shapes["projector.model.0.weight"] == (4096, 1024) and shapes["projector.model.2.weight"] == (4096, 4096)
    assert shapes["bbox_projector.model.0.weight"] == (4096, 2880)  # 192 + 384 + 768 + 1536 channels
    assert shapes["fuse_module.slow_conv.weight"] == (1536, 1536, 1, 1)
    assert shapes["fuse_module.gate.0.weight"] == (512, 2048)
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    assert count(visual.projector) == 1024 * 4096 + 4096 + 4096 * 4096 + 4096
    assert count(visual.bbox_projector) == 2880 * 4096 + 4096 + 4096 * 4096 + 4096
    assert count(visual.fuse_module) == 6_085_121
    assert visual.hires_tower.encoder.stages[3].layers[0].dwconv.weight.shape == (1536, 1, 7, 7)
    assert "init_marker" not in visual.state_dict()  # not a checkpoint key
