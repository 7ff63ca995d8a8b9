"""MG-LLaVA box files and load-time box transforms (data/boxes.py)."""

import json
import logging
import os

import pytest
import torch

from multigran.data.boxes import (
    MAX_BOXES_PER_RECORD,
    find_box_record,
    read_box_file,
    transform_boxes,
    write_box_file,
)


def grid_boxes(n, size=5, step=10, per_row=70):
    """n non-overlapping size x size boxes on a 768 canvas (scale 1 for a 768x768 image)."""
    return [[(i % per_row) * step, (i // per_row) * step, (i % per_row) * step + size, (i // per_row) * step + size]
            for i in range(n)]


# --- transforms ------------------------------------------------------------------------------------------------------


def test_wide_image_pads_y_and_scales():
    # 200x100: side 200, pad_y = 50, scale 768/200 = 3.84.
    boxes, scores, labels = transform_boxes([[10, 20, 60, 70]], [0.5], ["cat"], (200, 100))
    # [10, 70, 60, 120] * 3.84 = [38.4, 268.8, 230.4, 460.8] -> rounded
    assert boxes.tolist() == [[38.0, 269.0, 230.0, 461.0]]
    assert boxes.dtype == torch.float32 and scores.tolist() == [0.5] and labels == ["cat"]


def test_tall_image_pads_x_scales_and_clips():
    # 100x300: side 300, pad_x = 100, scale 2.56.
    boxes, _, labels = transform_boxes(
        [[0, 0, 50, 150], [-20, 280, 120, 320]], [0.9, 0.8], ["a", "b"], (100, 300)
    )
    # [100, 0, 150, 150] * 2.56 = [256, 0, 384, 384]; [80, 280, 220, 320] * 2.56 = [204.8, 716.8, 563.2, 819.2]
    # -> [205, 717, 563, 819] -> y2 clipped to 768 (outside the image: clipped, not an error).
    assert boxes.tolist() == [[256.0, 0.0, 384.0, 384.0], [205.0, 717.0, 563.0, 768.0]]
    assert labels == ["a", "b"]


def test_odd_padding_uses_floor_half_and_rounding_is_half_to_even():
    # 512x509: pad_y = 3 // 2 = 1, scale 1.5. x: 1 -> 1.5 -> 2, 3 -> 4.5 -> 4 (half to even, like torch.round).
    boxes, _, _ = transform_boxes([[1, 2, 3, 6]], [0.3], ["a"], (512, 509))
    # y: (2 + 1) * 1.5 = 4.5 -> 4, (6 + 1) * 1.5 = 10.5 -> 10
    assert boxes.tolist() == [[2.0, 4.0, 4.0, 10.0]]


def test_boxes_entirely_outside_are_dropped_and_empty_gives_one_zero_box():
    # 200x100 image: a box at y 200..210 lands at y (250..260) * 3.84 = 960.. > 768, entirely outside.
    boxes, scores, labels = transform_boxes([[0, 200, 10, 210]], [0.9], ["x"], (200, 100))
    assert boxes.tolist() == [[0.0, 0.0, 0.0, 0.0]] and scores.tolist() == [0.0] and labels == [""]
    boxes, scores, labels = transform_boxes([], [], [], (640, 480))
    assert boxes.shape == (1, 4) and not boxes.any() and labels == [""]


def test_zero_area_box_touching_the_canvas_is_kept():
    boxes, _, _ = transform_boxes([[768, 10, 800, 20], [5, 5, 5, 9]], [0.9, 0.8], ["a", "b"], (768, 768))
    assert boxes.tolist() == [[768.0, 10.0, 768.0, 20.0], [5.0, 5.0, 5.0, 9.0]]


def test_classwise_nms_and_score_order():
    raw = [
        [0, 0, 100, 100],  # A cat 0.9
        [10, 10, 110, 110],  # cat 0.8: IoU with A 8100 / 11900 = 0.68 -> suppressed
        [0, 0, 100, 100],  # C dog 0.5: other label, kept although identical to A
        [50, 0, 150, 100],  # cat 0.7: IoU with A 5000 / 15000 = 0.33 > 0.2 -> suppressed
        [80, 0, 180, 100],  # E cat 0.6: IoU with A 2000 / 18000 = 0.11 -> kept
    ]
    labels = ["cat", "cat", "dog", "cat", "cat"]
    boxes, scores, labels = transform_boxes(raw, [0.9, 0.8, 0.5, 0.7, 0.6], labels, (768, 768))
    assert boxes.tolist() == [[0.0, 0.0, 100.0, 100.0], [80.0, 0.0, 180.0, 100.0], [0.0, 0.0, 100.0, 100.0]]
    assert labels == ["cat", "cat", "dog"]
    torch.testing.assert_close(scores, torch.tensor([0.9, 0.6, 0.5]))


def _capped_expected(scores, labels, per_label, cap):
    by_label = {}
    for i in sorted(range(len(scores)), key=lambda i: -scores[i]):
        by_label.setdefault(labels[i], []).append(i)
    kept = [i for ids in by_label.values() for i in ids[:per_label]]
    return sorted(kept, key=lambda i: -scores[i])[:cap]


def test_per_label_cap_when_more_than_max_boxes():
    n = 130
    labels = ["a"] * 60 + ["b"] * 50 + ["c"] * 20
    scores = [((i * 37) % n) / n + 0.001 for i in range(n)]  # distinct, shuffled
    boxes, out_scores, out_labels = transform_boxes(grid_boxes(n), scores, labels, (768, 768))
    expected = _capped_expected(scores, labels, per_label=20, cap=100)  # 20 + 20 + 20 = 60 boxes
    assert len(expected) == 60 and out_labels == [labels[i] for i in expected]
    assert boxes.tolist() == [[float(v) for v in grid_boxes(n)[i]] for i in expected]
    assert out_scores.tolist() == sorted(out_scores.tolist(), reverse=True)
    # max_boxes < 50 -> 5 per label, then the hard cap: 15 candidates -> the 10 best.
    _, s10, l10 = transform_boxes(grid_boxes(n), scores, labels, (768, 768), max_boxes=10)
    expected = _capped_expected(scores, labels, per_label=5, cap=10)
    assert l10 == [labels[i] for i in expected]
    torch.testing.assert_close(s10, torch.tensor([scores[i] for i in expected]))
    # No cap when max_boxes is None.
    assert len(transform_boxes(grid_boxes(n), scores, labels, (768, 768), max_boxes=None)[0]) == n
    # Exactly max_boxes boxes: no cap applied (release: only when more than limit_num remain).
    assert len(transform_boxes(grid_boxes(n), scores, labels, (768, 768), max_boxes=n)[0]) == n


def test_hard_cap_when_per_label_cap_is_not_enough():
    n = 120  # one label per box: the per-label cap keeps all 120, the release would return 120 > 100
    scores = [((i * 53) % n) / n for i in range(n)]
    labels = [f"tag{i}" for i in range(n)]
    boxes, out_scores, out_labels = transform_boxes(grid_boxes(n), scores, labels, (768, 768), max_boxes=100)
    assert len(boxes) == 100
    assert out_labels == [labels[i] for i in sorted(range(n), key=lambda i: -scores[i])[:100]]


def test_transform_bad_inputs():
    with pytest.raises(ValueError, match=r"rec 7: box 1 \[30.0, 5.0, 20.0, 9.0\] has x2 < x1"):
        transform_boxes([[0, 0, 1, 1], [30, 5, 20, 9]], [0.5, 0.4], ["a", "b"], (64, 64), where="rec 7")
    with pytest.raises(ValueError, match="rec 8: box 0 has a NaN or infinite coordinate"):
        transform_boxes([[0, float("nan"), 1, 1]], [0.5], ["a"], (64, 64), where="rec 8")
    with pytest.raises(ValueError, match="score 0 is NaN or infinite"):
        transform_boxes([[0, 0, 1, 1]], [float("inf")], ["a"], (64, 64))
    with pytest.raises(ValueError, match="2 boxes but 1 scores and 2 labels"):
        transform_boxes([[0, 0, 1, 1]] * 2, [0.5], ["a", "b"], (64, 64))
    with pytest.raises(ValueError, match="1 boxes but 1 scores and 2 labels"):
        transform_boxes([[0, 0, 1, 1]], [0.5], ["a", "b"], (64, 64))
    with pytest.raises(ValueError, match=r"got shape \(1, 3\)"):
        transform_boxes([[0, 0, 1]], [0.5], ["a"], (64, 64))
    with pytest.raises(ValueError, match="lists of 4 numbers"):
        transform_boxes([[0, 0, 1, 1], [0, 1]], [0.5, 0.5], ["a", "b"], (64, 64))
    with pytest.raises(ValueError, match=f"more than the limit of {MAX_BOXES_PER_RECORD}"):
        n = MAX_BOXES_PER_RECORD + 1
        transform_boxes([[0, 0, 1, 1]] * n, [0.5] * n, ["a"] * n, (64, 64))
    with pytest.raises(ValueError, match="image_size must be"):
        transform_boxes([[0, 0, 1, 1]], [0.5], ["a"], (0, 64))
    with pytest.raises(ValueError, match="label 0 must be a string"):
        transform_boxes([[0, 0, 1, 1]], [0.5], [None], (64, 64))


# --- box files -------------------------------------------------------------------------------------------------------


def _write_text(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_read_lookup_and_video_records(tmp_path):
    records = [
        {"id": 42, "boxes": [[1, 2, 3, 4]], "scores": [0.5], "labels": ["cat"]},
        {"id": "q-7", "boxes": [], "scores": [], "labels": []},
        {"id": "vid", "frames": [{"boxes": [[0, 0, 5, 5]], "scores": [0.3], "labels": ["dog"]}]},
    ]
    path = _write_text(tmp_path / "boxes.json", json.dumps(records))
    data = read_box_file(path)
    assert sorted(data) == ["42", "q-7", "vid"]  # str ids
    assert find_box_record(data, {"id": 42})["labels"] == ["cat"]
    assert find_box_record(data, {"question_id": "q-7", "image": "x.jpg"})["boxes"] == []
    assert find_box_record(data, {"id": "not-there", "question_id": "q-7"})["boxes"] == []
    with pytest.raises(KeyError, match=r"in b.json for sample id/question_id \['1', '2'\]"):
        find_box_record(data, {"id": 1, "question_id": 2}, path="b.json")
    # {id: record} objects are accepted too (the release accepts both).
    keyed = read_box_file(_write_text(tmp_path / "keyed.json", json.dumps({"5": records[0]})))
    assert keyed["5"]["scores"] == [0.5]


def test_read_errors_name_file_and_record(tmp_path):
    text = '[{"id": 1, "boxes": [[1, 2, 3, 4]],\n "scores": [0.5] "labels": []}]\n'  # missing comma on line 2
    bad_json = _write_text(tmp_path / "bad.json", text)
    with pytest.raises(ValueError, match=r"bad\.json: not valid JSON \(line 2, column 18"):
        read_box_file(bad_json)
    no_id = _write_text(tmp_path / "noid.json", json.dumps([{"id": 1, "boxes": [], "scores": [], "labels": []},
                                                             {"boxes": [], "scores": [], "labels": []}]))
    with pytest.raises(ValueError, match=r"noid\.json: record 1 has no 'id'"):
        read_box_file(no_id)
    text = '[{"id": "img9", "boxes": [[1, NaN, 3, 4]], "scores": [0.5], "labels": ["a"]}]'  # Python's json reads NaN
    nan = _write_text(tmp_path / "nan.json", text)
    with pytest.raises(ValueError, match=r"nan\.json, record id 'img9': box 0 has a NaN"):
        read_box_file(nan)
    mismatch = _write_text(tmp_path / "mm.json", json.dumps([{"id": 3, "boxes": [[1, 2, 3, 4]], "scores": [0.5, 0.6],
                                                               "labels": ["a"]}]))
    with pytest.raises(ValueError, match=r"mm\.json, record id '3': 1 boxes but 2 scores and 1 labels"):
        read_box_file(mismatch)
    negative = _write_text(tmp_path / "neg.json", json.dumps([{"id": 4, "boxes": [[10, 2, 3, 4]], "scores": [0.5],
                                                               "labels": ["a"]}]))
    with pytest.raises(ValueError, match=r"neg\.json, record id '4': box 0 .* x2 < x1"):
        read_box_file(negative)
    missing = _write_text(tmp_path / "miss.json", json.dumps([{"id": 5, "boxes": []}]))
    with pytest.raises(ValueError, match=r"miss\.json, record id '5': missing field\(s\) \['scores', 'labels'\]"):
        read_box_file(missing)
    video = _write_text(tmp_path / "vid.json", json.dumps([{"id": "v", "frames": [
        {"boxes": [], "scores": [], "labels": []}, {"boxes": [[0, 0, 1, 1]], "scores": [], "labels": []}]}]))
    with pytest.raises(ValueError, match=r"vid\.json, record id 'v', frame 1: 1 boxes but 0 scores"):
        read_box_file(video)
    not_list = _write_text(tmp_path / "str.json", '"boxes"')
    with pytest.raises(ValueError, match=r"str\.json: a box file must hold a JSON list"):
        read_box_file(not_list)


def test_duplicate_ids_last_wins_with_warning(tmp_path, caplog):
    records = [{"id": 1, "boxes": [], "scores": [], "labels": []},
               {"id": "1", "boxes": [[0, 0, 2, 2]], "scores": [0.1], "labels": ["z"]}]
    with caplog.at_level(logging.WARNING, logger="multigran.data.boxes"):
        data = read_box_file(_write_text(tmp_path / "dup.json", json.dumps(records)))
    assert data["1"]["labels"] == ["z"] and "1 duplicate record ids" in caplog.text


def test_write_roundtrip_with_tensors(tmp_path):
    path = tmp_path / "out.json"
    write_box_file(path, [{"id": 7, "boxes": torch.tensor([[1.0, 2.0, 3.5, 4.0]]), "scores": torch.tensor([0.25]),
                           "labels": ["cat"]}])
    expected = [{"id": 7, "boxes": [[1.0, 2.0, 3.5, 4.0]], "scores": [0.25], "labels": ["cat"]}]
    assert json.loads(path.read_text()) == expected
    write_box_file(path, read_box_file(path))  # {id: record} form round-trips
    assert read_box_file(path)["7"]["boxes"] == [[1.0, 2.0, 3.5, 4.0]]


def test_write_is_atomic_and_validates(tmp_path):
    path = tmp_path / "boxes.json"
    write_box_file(path, [{"id": 1, "boxes": [[0, 0, 1, 1]], "scores": [0.5], "labels": ["a"]}])
    before = path.read_text()
    with pytest.raises(ValueError, match=r"boxes\.json, record id '2': box 0 has a NaN"):
        write_box_file(path, [{"id": 2, "boxes": [[0, float("nan"), 1, 1]], "scores": [0.5], "labels": ["a"]}])
    with pytest.raises(ValueError, match="record 0 has no 'id'"):
        write_box_file(path, [{"boxes": [], "scores": [], "labels": []}])
    # A failure while serialising (an unwritable extra field) leaves the old file intact and no temporary file.
    with pytest.raises(TypeError, match="cannot write set"):
        write_box_file(path, [{"id": 3, "boxes": [], "scores": [], "labels": [], "extra": {1, 2}}])
    assert path.read_text() == before
    assert os.listdir(tmp_path) == ["boxes.json"]
