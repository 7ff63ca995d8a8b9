"""MG-LLaVA compat mode against an independent transcription of the release (PhoenixZ810/MG-LLaVA @ 3237152).

Transcribed here, line by line and without multigran code:
  - `mg_llava/dataset/utils.py:717-729` adjust_padding_boxes, `:558-569` bbox_nms (torchvision's `batched_nms`: the
    CPU kernel's greedy loop, float32 IoU compared with the threshold as a double, stable descending-score order),
    `:732-739` adjust_short_resize_coordinates, `:742-767` adjust_center_crop_box;
  - `mg_llava/module/mg_llava_dataset.py:76-160` (training: NMS -> near-max_length rule -> per-category soft cap ->
    resize/crop) and `mg_llava/evaluation/mg_llava_proxy_eval_dataset.py:130-206` (evaluation: limit_num=None default,
    no near-max_length rule);
  - `mg_llava/module/openclip_encoder.py:60` (OpenCLIP convnext_large_d_320, timm_drop_path 0.1, never set to eval).
"""

import copy
import random
from collections import defaultdict

import numpy as np
import pytest
import torch
from PIL import Image

from multigran.data.boxes import transform_boxes
from multigran.pipelines.mg import MgPipeline, mg_settings
from multigran.tiny import build_tiny, tiny_config
from multigran.vision.convnext import convnext_features

@pytest.fixture(autouse=True)
def one_thread():
    """Small tensors run fastest on one thread; two threads on shared, busy cores spend their time waiting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- the release, transcribed ---------------------------------------------------------------------------------------


def release_adjust_padding_boxes(boxes, height, width):  # utils.py:717-729
    out = []
    for box in boxes:
        if width > height:
            delta = (width - height) // 2
            out.append((box[0], box[1] + delta, box[2], box[3] + delta))
        elif height > width:
            delta = (height - width) // 2
            out.append((box[0] + delta, box[1], box[2] + delta, box[3]))
        else:
            out.append(box)
    return out


def torchvision_batched_nms(boxes, scores, labels, iou_threshold):
    """torchvision.ops.batched_nms as its CPU kernel computes it per class: stable descending sort, float32 areas and
    IoU, `ovr > iou_threshold` with the threshold a double; returns kept indices by descending score."""
    b = boxes.numpy().astype(np.float32)
    s = scores.numpy().astype(np.float32)
    order = sorted(range(len(s)), key=lambda i: -s[i])  # Python's sort is stable
    areas = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])  # float32
    label_ids = np.array([hash(label) for label in labels], dtype=np.int64)
    suppressed = np.zeros(len(s), dtype=bool)
    keep = []
    for position, i in enumerate(order):
        if suppressed[i]:
            continue
        keep.append(i)
        rest = np.array(order[position + 1:], dtype=np.int64)
        rest = rest[label_ids[rest] == label_ids[i]]
        w = np.maximum(np.float32(0), np.minimum(b[i, 2], b[rest, 2]) - np.maximum(b[i, 0], b[rest, 0]))
        h = np.maximum(np.float32(0), np.minimum(b[i, 3], b[rest, 3]) - np.maximum(b[i, 1], b[rest, 1]))
        inter = w * h
        ovr = inter / (areas[i] + areas[rest] - inter)  # float32, in the kernel's order of operations
        suppressed[rest[ovr.astype(np.float64) > iou_threshold]] = True
    return keep


def release_bbox_nms(boxes, labels, scores, iou_threshold=0.2):  # utils.py:558-569
    boxes = torch.tensor(boxes).reshape(-1, 4)
    scores = torch.tensor(scores)
    keep = torchvision_batched_nms(boxes.float(), scores, labels, iou_threshold)
    keep = torch.tensor(keep, dtype=torch.long)
    return boxes[keep].float(), [labels[i] for i in keep.tolist()], scores[keep]


def release_adjust_short_resize_coordinates(boxes, original_height, original_width, short_edge):  # utils.py:732-739
    scale = short_edge / min(original_width, original_height)
    boxes = boxes * scale
    boxes = torch.round(boxes).int()
    return boxes, int(original_height * scale), int(original_width * scale)


def release_adjust_center_crop_box(boxes, labels, original_height, original_width, crop_size):  # utils.py:742-767
    start_x = (original_width - crop_size) // 2
    start_y = (original_height - crop_size) // 2
    new_boxes, new_labels = [], []
    for i in range(boxes.size(0)):
        x_min, y_min, x_max, y_max = boxes[i].tolist()
        new_x_min, new_y_min = max(x_min - start_x, 0), max(y_min - start_y, 0)
        new_x_max, new_y_max = min(x_max - start_x, crop_size), min(y_max - start_y, crop_size)
        if new_x_max < 0 or new_y_max < 0 or new_x_min > crop_size or new_y_min > crop_size:
            continue
        new_boxes.append(torch.tensor([new_x_min, new_y_min, new_x_max, new_y_max]))
        new_labels.append(labels[i])
    if new_boxes:
        return torch.stack(new_boxes).float(), new_labels
    return torch.stack([torch.zeros(4)]).float(), new_labels


def release_boxes(record, width, height, size=768, limit_num=100, text_length=None, max_length=1472):
    """mg_llava_dataset.py:71-157 (limit_mode 'per_category', pad_image_to_square, CLIP processor); text_length=None
    is the evaluation path (mg_llava_proxy_eval_dataset.py:126-206, which has no near-max_length rule)."""
    boxes, labels, scores = record["boxes"], record["labels"], record["scores"]
    boxes = release_adjust_padding_boxes(boxes, height=height, width=width)  # :79
    old_w = old_h = max(width, height)  # :80, expand2square
    boxes, labels, scores = release_bbox_nms(boxes, labels, scores, 0.2)  # :93
    close_to_max_length = text_length is not None and text_length >= max_length - 50  # :94-95
    if boxes.shape[0] != 0:  # :100
        if limit_num is not None or close_to_max_length:  # :101
            if limit_num is not None and limit_num > 50:  # :103-108
                num_per_category = 20
            elif limit_num is not None and limit_num < 50:
                num_per_category = 5
            if close_to_max_length:
                num_per_category = 1
            if len(scores) > limit_num or close_to_max_length:  # :109
                label_indices = defaultdict(list)
                for index, label in enumerate(labels):
                    label_indices[label].append(index)
                label_indices = dict(label_indices)
                for item in label_indices:  # :116-122
                    if len(label_indices[item]) > num_per_category:
                        item_scores = scores[label_indices[item]]
                        _, top_indices = item_scores.topk(num_per_category, largest=True)
                        label_indices[item] = [label_indices[item][i] for i in top_indices.tolist()]
                boxes = torch.stack([boxes[i] for item in label_indices for i in label_indices[item]])  # :125-127
                labels = [labels[i] for item in label_indices for i in label_indices[item]]  # :135
    boxes, h1, w1 = release_adjust_short_resize_coordinates(boxes, old_h, old_w, size)  # :153
    return release_adjust_center_crop_box(boxes, labels, h1, w1, size)  # :154


# --- random records -------------------------------------------------------------------------------------------------

SHIFTED_SIDES = (47, 94, 307, 613, 637)  # int(side * (768 / side)) == 767


def random_record(rng: random.Random, width: int, height: int):
    """OWLv2-like detections: clusters of overlapping boxes per label, some reaching past the image, float or integer
    coordinates, distinct scores; sometimes more than 100 boxes survive NMS."""
    labels_pool = [f"tag{i}" for i in range(rng.randint(1, 12))]
    many = rng.random() < 0.25
    boxes, labels = [], []
    for _ in range(rng.randint(0, 40) if not many else rng.randint(10, 25)):
        label = rng.choice(labels_pool)
        cx, cy = rng.uniform(-0.1, 1.1) * width, rng.uniform(-0.1, 1.1) * height
        w, h = rng.uniform(0.01, 0.5) * width, rng.uniform(0.01, 0.5) * height
        for _ in range(rng.randint(1, 4) if not many else rng.randint(6, 14)):
            jitter = rng.uniform(0, 0.4)
            x1 = cx - w / 2 + rng.uniform(-jitter, jitter) * w
            y1 = cy - h / 2 + rng.uniform(-jitter, jitter) * h
            box = [x1, y1, x1 + w * rng.uniform(0.6, 1.4), y1 + h * rng.uniform(0.6, 1.4)]
            if many:  # small, mostly separate boxes: past NMS more than limit_num remain
                box = [x1, y1, x1 + rng.uniform(1, 6), y1 + rng.uniform(1, 6)]
            boxes.append([round(v) for v in box] if rng.random() < 0.2 else box)
            labels.append(label)
    scores = rng.sample(range(1, 10**6), len(boxes))
    return {"boxes": boxes, "scores": [s / 10**6 for s in scores], "labels": labels}


def ours(record, width, height, **options):
    boxes, _, labels = transform_boxes(record["boxes"], record["scores"], record["labels"], (width, height),
                                       compat=True, **options)
    return boxes, labels


def same(release, mine):
    (release_b, release_l), (mine_b, mine_l) = release, mine
    if not release_l:  # the release's empty result: one zero box and no label (multigran labels it "")
        return mine_l == [""] and torch.equal(mine_b, release_b)
    return release_l == mine_l and torch.equal(mine_b, release_b)


def test_compat_box_pipeline_matches_the_release_on_random_records():
    rng = random.Random(14)
    sizes = [(rng.randint(16, 1400), rng.randint(16, 1400)) for _ in range(240)]
    sizes += [(side, rng.randint(16, side)) for side in SHIFTED_SIDES for _ in range(8)]
    sizes += [(rng.randint(16, side), side) for side in SHIFTED_SIDES for _ in range(8)]
    differs_from_corrected = capped = shifted = 0
    for width, height in sizes:
        record = random_record(rng, width, height)
        release = release_boxes(record, width, height)
        mine = ours(record, width, height)
        assert same(release, mine), (width, height, record)
        corrected, _, labels = transform_boxes(record["boxes"], record["scores"], record["labels"], (width, height))
        differs_from_corrected += labels != mine[1] or not torch.equal(corrected, mine[0])
        capped += len(mine[1]) > 100 or len(release_boxes(record, width, height, limit_num=None)[1]) > len(mine[1])
        shifted += int(max(width, height) * (768 / max(width, height))) == 767
    # The records exercise what compat changes: the order (most differ), the soft cap, the shifted sides.
    assert differs_from_corrected > 100 and capped >= 10 and shifted >= 80


def test_evaluation_default_is_uncapped_and_the_near_max_length_rule_keeps_one_box_per_label():
    rng = random.Random(5)
    checked = {"uncapped_larger": 0, "one_per_label_smaller": 0}
    for _ in range(60):
        width, height = rng.randint(100, 1000), rng.randint(100, 1000)
        record = random_record(rng, width, height)
        uncapped = release_boxes(record, width, height, limit_num=None)  # proxy :25, limit_num=None
        assert same(uncapped, ours(record, width, height, max_boxes=None))
        near = release_boxes(record, width, height, text_length=1430)  # 1430 >= 1472 - 50
        assert same(near, ours(record, width, height, one_per_label=True))
        assert len(set(near[1])) == len(near[1])  # one box per label
        far = release_boxes(record, width, height, text_length=1421)
        assert same(far, ours(record, width, height))
        checked["uncapped_larger"] += len(uncapped[1]) > len(far[1])
        checked["one_per_label_smaller"] += len(near[1]) < len(far[1])
    assert min(checked.values()) >= 3


def test_soft_cap_exceeds_max_boxes_and_groups_by_label():
    # 10 labels x 30 separate boxes, scores interleaved across labels: 300 survive NMS (> 100) -> 20 per label = 200.
    boxes = [[(i % 30) * 20, (i // 30) * 20, (i % 30) * 20 + 8, (i // 30) * 20 + 8] for i in range(300)]
    labels = [f"l{i % 10}" for i in range(300)]
    scores = [(300 - i) / 300 for i in range(300)]
    record = {"boxes": boxes, "scores": scores, "labels": labels}
    release_b, release_l = release_boxes(record, 768, 768)
    mine_b, mine_l = ours(record, 768, 768)
    assert len(release_l) == 200 and mine_l == release_l and torch.equal(mine_b, release_b)
    assert mine_l[:20] == ["l0"] * 20 and mine_l[20:40] == ["l1"] * 20  # grouped by label, best label first
    # The corrected mode: a hard bound, by score.
    _, _, corrected = transform_boxes(boxes, scores, labels, (768, 768))
    assert len(corrected) == 100 and corrected[:3] == ["l0", "l1", "l2"]


def test_cap_counts_boxes_that_the_crop_drops_later():
    # 120 boxes of one label below the image (past the padded square): NMS keeps them, the cap sees 130 > 100 and
    # keeps 20 per label; the crop then drops every box below the canvas.
    inside = [[i * 6, 0, i * 6 + 4, 4] for i in range(10)]
    below = [[i * 6, 900, i * 6 + 4, 904] for i in range(120)]
    record = {"boxes": inside + below, "scores": [0.5 - i / 1000 for i in range(10)] + [0.9 - i / 1000 for i in
                                                                                          range(120)],
              "labels": ["a"] * 130}
    release_b, release_l = release_boxes(record, 768, 768)
    mine_b, mine_l = ours(record, 768, 768)
    assert release_l == [] and mine_l == [""] and torch.equal(mine_b, release_b)  # all 20 best were off the canvas
    _, _, corrected = transform_boxes(record["boxes"], record["scores"], record["labels"], (768, 768))
    assert corrected == ["a"] * 10  # corrected: the crop first, then 10 boxes are left for the cap


@pytest.mark.parametrize("side", SHIFTED_SIDES)
def test_plus_one_pixel_shift_for_the_release_sides(side):
    assert int(side * (768 / side)) == 767
    rng = random.Random(side)
    for width, height in ((side, side), (side, rng.randint(10, side - 1)), (rng.randint(10, side - 1), side)):
        box = [0.1 * width, 0.2 * height, 0.6 * width, 0.7 * height]
        pad_x, pad_y = (side - width) // 2, (side - height) // 2
        square = [-pad_x, -pad_y, side - pad_x, side - pad_y]  # the whole padded square
        record = {"boxes": [box, square], "scores": [0.9, 0.1], "labels": ["a", "b"]}
        release = release_boxes(record, width, height)
        mine = ours(record, width, height)
        assert same(release, mine)
        corrected, _, _ = transform_boxes(record["boxes"], record["scores"], record["labels"], (width, height))
        # Every coordinate moves by +1 px in the release (the full-image box is clipped back at 768 on the right).
        torch.testing.assert_close(mine[0][0], corrected[0] + 1)
        assert mine[0][1].tolist() == [1, 1, 768, 768] and corrected[1].tolist() == [0, 0, 768, 768]


def test_shifted_sides_are_about_five_percent_and_unshifted_sides_agree_with_the_corrected_mode():
    shifted = [side for side in range(1, 2049) if int(side * (768 / side)) == 767]
    assert set(SHIFTED_SIDES) <= set(shifted) and 0.03 < len(shifted) / 2048 < 0.06
    record = {"boxes": [[3.3, 4.4, 20.5, 30.5]], "scores": [0.5], "labels": ["a"]}
    for side in (48, 100, 612, 640):  # not shifted: the same boxes in both modes
        assert int(side * (768 / side)) == 768
        assert torch.equal(ours(record, side, side)[0], transform_boxes(**record, image_size=(side, side))[0])


def test_iou_of_exactly_one_fifth_is_suppressed_as_torchvision():
    # IoU = 1/5 in float32 is 0.2f > 0.2 (double): torchvision suppresses; the corrected mode compares in float32.
    record = {"boxes": [[0, 0, 3, 1], [2, 0, 5, 1]], "scores": [0.9, 0.8], "labels": ["a", "a"]}  # 1 / 5
    assert release_boxes(record, 768, 768)[1] == ["a"]
    assert ours(record, 768, 768)[1] == ["a"]
    assert transform_boxes(**record, image_size=(768, 768))[2] == ["a", "a"]


def test_compat_refuses_what_the_release_cannot_run():
    with pytest.raises(ValueError, match="max_boxes=50 in compat mode"):
        mg_settings({"compat": True, "max_boxes": 50})
    with pytest.raises(ValueError, match="max_boxes=None with the one-box-per-label rule"):
        mg_settings({"compat": True, "max_boxes": None, "text_max_length": 1472})
    with pytest.raises(ValueError, match="max_boxes=50 in compat mode"):
        transform_boxes([[0, 0, 1, 1]], [0.5], ["a"], (8, 8), max_boxes=50, compat=True)
    # Both are fine in the corrected mode; max_boxes=None is accepted in both.
    assert mg_settings({"max_boxes": 50}).max_boxes == 50
    assert mg_settings({"compat": True, "max_boxes": None}).max_boxes is None
    with pytest.raises(ValueError, match="max_boxes must be a positive int"):
        mg_settings({"compat": True, "max_boxes": 0})
    with pytest.raises(ValueError, match="compat must be true or false"):
        mg_settings({"compat": "yes"})


# --- through the processor and the training data ----------------------------------------------------------------------


def picture(width, height, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def tiny_compat():
    return build_tiny(None, method="mg", seed=3, method_settings={"compat": True, "text_max_length": 100})


def test_processor_step_runs_the_release_pipeline_and_the_text_rule(tiny_compat):
    _, processor = tiny_compat
    high_res = processor.image_processor.method_settings["high_res"]  # 256 in the tiny model
    rng = random.Random(3)
    for index in range(6):
        width, height = rng.randint(40, 400), rng.randint(40, 400)
        record = random_record(rng, width, height)
        for text_length in (None, 49, 50):  # 50 >= text_max_length - 50: one box per label
            out = processor.image_processor.preprocess([picture(width, height, index)], boxes=record,
                                                       text_length=text_length)
            release_b, release_l = release_boxes(record, width, height, size=high_res, text_length=text_length,
                                                 max_length=100)
            count = max(len(release_l), 1)
            assert out["box_counts"].tolist() == [count]
            assert torch.equal(out["boxes"][0, :count], release_b)


def test_training_data_passes_the_text_length(tiny_compat, tmp_path):
    import json

    from multigran.data.llava import LlavaDataset

    _, processor = tiny_compat
    picture(60, 40).save(tmp_path / "a.png")
    boxes = [[i * 5, 2, i * 5 + 3, 5] for i in range(6)]
    (tmp_path / "boxes.json").write_text(json.dumps(
        [{"id": i, "boxes": boxes, "scores": [0.9 - j / 10 for j in range(6)], "labels": ["x", "y"] * 3}
         for i in (1, 2)]))
    short = "<image>\nWhat is it?"
    records = [{"id": 1, "image": "a.png", "conversations": [{"from": "human", "value": short},
                                                            {"from": "gpt", "value": "A box."}]},
               {"id": 2, "image": "a.png", "conversations": [{"from": "human", "value": short + " word" * 80},
                                                            {"from": "gpt", "value": "A box."}]}]
    (tmp_path / "data.json").write_text(json.dumps(records))
    def dataset(processor):
        return LlavaDataset(str(tmp_path / "data.json"), processor, image_folder=str(tmp_path),
                            box_file=str(tmp_path / "boxes.json"), on_bad_record="error")

    # Text tokens with one per image placeholder, as the release's len(input_ids):
    data = dataset(processor)
    lengths = [int((data[i]["input_ids"] != processor.image_token_id).sum()) + 1 for i in range(2)]
    assert lengths[0] < lengths[1]
    # The rule starts at text_max_length - 50: on for the long text only.
    processor = copy.deepcopy(processor)
    processor.image_processor.method_settings["text_max_length"] = lengths[1] + 50
    data = dataset(processor)
    assert data[0]["box_counts"].tolist() == [6] and data[1]["box_counts"].tolist() == [2]
    processor.image_processor.method_settings["text_max_length"] = lengths[1] + 51
    assert dataset(processor)[1]["box_counts"].tolist() == [6]


def test_converter_default_text_budget_is_the_release_max_length():
    from types import SimpleNamespace

    from multigran.convert.mg_llava import release_text_max_length

    assert release_text_max_length(SimpleNamespace(image_size=336, patch_size=14)) == int(2048 - (336 // 14) ** 2)


# --- stochastic depth in the frozen ConvNeXt --------------------------------------------------------------------------


def test_release_drop_path_is_the_compat_default_and_off_otherwise():
    assert mg_settings({"compat": True}).drop_path_rate == 0.1  # openclip convnext_large_d_320 timm_drop_path
    assert mg_settings({}).drop_path_rate == 0.0
    assert mg_settings({"compat": True, "hires_drop_path": 0.0}).drop_path_rate == 0.0
    assert mg_settings({"hires_drop_path": 0.1}).drop_path_rate == 0.1
    for bad in (1.0, -0.1, True, "0.1"):
        with pytest.raises(ValueError, match="hires_drop_path"):
            mg_settings({"hires_drop_path": bad})
    with pytest.raises(ValueError, match="hires_drop_path, not convnext_config.drop_path_rate"):
        mg_settings({"convnext_config": {"drop_path_rate": 0.1}})
    # Real size: timm's rates rise linearly over the 36 blocks to 0.1 (the HF tower uses the same schedule).
    config = mg_settings({"compat": True}).hires_config()
    rates = torch.linspace(0, 0.1, sum(config.depths))
    assert config.drop_path_rate == 0.1 and abs(float(rates[-1]) - 0.1) < 1e-7


def test_drop_path_makes_the_frozen_tower_stochastic_in_training_only():
    settings = {"compat": True, "hires_drop_path": 0.5, "high_res": 256,
                "convnext_config": {"hidden_sizes": [8, 16, 24, 32], "depths": [2, 2, 2, 2]}}
    pipeline = MgPipeline(tiny_config(method="mg", method_settings=settings))
    tower = pipeline.hires_tower
    rates = [layer.drop_path.drop_prob for stage in tower.encoder.stages for layer in stage.layers[1:]]
    assert max(rates) == pytest.approx(0.5)
    deterministic = copy.deepcopy(tower)
    for stage in deterministic.encoder.stages:  # the same weights without stochastic depth
        for layer in stage.layers:
            layer.drop_path = torch.nn.Identity()
    pixels = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(0))

    pipeline.train()
    torch.manual_seed(0)
    first = convnext_features(tower, pixels)
    second = convnext_features(tower, pixels)
    assert not torch.allclose(first[0], second[0]) and not torch.allclose(first[1], second[1])
    assert not any(p.requires_grad for p in tower.parameters()) and first[0].grad_fn is None  # still frozen

    pipeline.eval()
    evaluated = convnext_features(tower, pixels)
    reference = convnext_features(deterministic.eval(), pixels)
    assert torch.equal(evaluated[0], convnext_features(tower, pixels)[0])
    torch.testing.assert_close(evaluated[0], reference[0], rtol=0, atol=0)
    torch.testing.assert_close(evaluated[1], reference[1], rtol=0, atol=0)

    corrected = MgPipeline(tiny_config(method="mg", method_settings={**settings, "compat": False,
                                                                     "hires_drop_path": None})).train()
    assert torch.equal(convnext_features(corrected.hires_tower, pixels)[0],
                       convnext_features(corrected.hires_tower, pixels)[0])
