"""MG-LLaVA object boxes: box files (release JSON format) and the load-time box transforms.

Box file = JSON list of records, one per image, as written by the release's offline RAM++ / OWLv2 detection:
    {"id": <sample id>, "boxes": [[x1, y1, x2, y2], ...], "scores": [...], "labels": [...]}
with absolute pixel xyxy in the ORIGINAL image. Video records are {"id", "frames": [{boxes, scores, labels}, ...]}
(read and validated; the transforms apply per frame). Records are looked up by str(sample "id") in training and by
"question_id" in evaluation. A JSON object {id: record} is accepted too (the release accepts both).

`transform_boxes` maps a record to the 768x768 high-res canvas (spec mg-llava.md "Box pipeline", in this order):
  1. shift for the centred square padding: + (max - min) // 2 to y if W > H, to x if H > W;
  2. scale by 768 / max(W, H) and round (torch.round, half to even, in float32 as the release);
  3. drop boxes lying entirely outside the canvas, clip the rest to [0, 768];
  4. class-wise NMS at IoU 0.2;
  5. if more than `max_boxes` remain: keep the top 20 per label (5 if max_boxes < 50), then a hard cap at max_boxes;
  6. order by descending score; no box left -> one all-zero box (every image gets >= 1 object token).
Differences from the release, on purpose: the cap in step 5 is a hard bound (the release's per-label cap can leave
more than 100 boxes, and is absent for several benchmarks), and the output is always in descending-score order (the
release groups boxes by label after the per-label cap). Degenerate zero-area boxes that touch the canvas are kept
(the release's drop test only removes boxes entirely outside); boxes with x2 < x1 or y2 < y1 are rejected as
malformed input (most likely [x, y, w, h] boxes), never silently dropped.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterable, Mapping

import torch

from multigran.ops.nms import batched_nms

logger = logging.getLogger(__name__)

# Release defaults (MGLLaVADataset): image_size_aux, iou_threshold, limit_num, 'per_category' caps.
HIGH_RES_SIZE = 768  # side of MG-LLaVA's high-res canvas: the ConvNeXt input and the box coordinate frame
IOU_THRESHOLD = 0.2
MAX_BOXES = 100
PER_LABEL_CAP, PER_LABEL_CAP_SMALL = 20, 5  # 5 when max_boxes < 50
# Sanity bound: OWLv2 at threshold 0.2 keeps at most a few hundred boxes; more than this means a broken file.
MAX_BOXES_PER_RECORD = 10_000


def check_detections(boxes, scores, labels, where: str = "boxes") -> tuple[torch.Tensor, torch.Tensor, list]:
    """Validate one image's detections; returns (boxes (K, 4) float64, scores (K,) float64, labels list).

    Raises ValueError naming `where` (e.g. "boxes.json, record id '42'") for: non-numeric or non-(K, 4) boxes,
    NaN/inf coordinates or scores, x2 < x1 or y2 < y1, more than MAX_BOXES_PER_RECORD boxes, and scores/labels whose
    length differs from the number of boxes. Coordinates outside the image are allowed (transform_boxes clips them).
    """
    try:
        boxes_t = torch.as_tensor(boxes, dtype=torch.float64)
        scores_t = torch.as_tensor(scores, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{where}: boxes must be lists of 4 numbers and scores numbers ({e})") from None
    if boxes_t.numel() == 0:
        boxes_t = boxes_t.reshape(0, 4)
    if boxes_t.dim() != 2 or boxes_t.shape[1] != 4:
        raise ValueError(f"{where}: boxes must be a list of [x1, y1, x2, y2], got shape {tuple(boxes_t.shape)}")
    num = boxes_t.shape[0]
    if num > MAX_BOXES_PER_RECORD:
        raise ValueError(f"{where}: {num} boxes, more than the limit of {MAX_BOXES_PER_RECORD} per image")
    labels = list(labels) if labels is not None else None
    if labels is None or scores_t.dim() != 1 or len(scores_t) != num or len(labels) != num:
        raise ValueError(
            f"{where}: {num} boxes but {len(scores_t) if scores_t.dim() == 1 else tuple(scores_t.shape)} scores and "
            f"{None if labels is None else len(labels)} labels; one score and one label per box are required"
        )
    bad = (~torch.isfinite(boxes_t).all(1)).nonzero()
    if len(bad):
        i = int(bad[0])
        raise ValueError(f"{where}: box {i} has a NaN or infinite coordinate: {boxes_t[i].tolist()}")
    bad = (~torch.isfinite(scores_t)).nonzero()
    if len(bad):
        raise ValueError(f"{where}: score {int(bad[0])} is NaN or infinite")
    bad = ((boxes_t[:, 2] < boxes_t[:, 0]) | (boxes_t[:, 3] < boxes_t[:, 1])).nonzero()
    if len(bad):
        i = int(bad[0])
        raise ValueError(
            f"{where}: box {i} {boxes_t[i].tolist()} has x2 < x1 or y2 < y1 ({len(bad)} such boxes); boxes must be "
            "absolute-pixel [x1, y1, x2, y2], not [x, y, w, h]"
        )
    for i, label in enumerate(labels):
        if isinstance(label, bool) or not isinstance(label, (str, int)):
            raise ValueError(f"{where}: label {i} must be a string (or int class id), got {label!r}")
    return boxes_t, scores_t, labels


def transform_boxes(
    boxes,
    scores,
    labels,
    image_size: tuple[int, int],
    target: int = HIGH_RES_SIZE,
    iou_threshold: float = IOU_THRESHOLD,
    max_boxes: int | None = MAX_BOXES,
    where: str = "boxes",
) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Original-image detections -> (boxes (K, 4) float32 on the target canvas, scores (K,) float32, labels).

    image_size is the ORIGINAL (width, height) before square padding. K >= 1: with no box left the result is one
    all-zero box with score 0.0 and label "". max_boxes=None disables the cap (release evaluation on some
    benchmarks). See the module docstring for the steps.
    """
    boxes_t, scores_t, labels = check_detections(boxes, scores, labels, where)
    if len(image_size) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in image_size):
        raise ValueError(f"{where}: image_size must be (width, height) positive ints, got {image_size!r}")
    if max_boxes is not None and max_boxes < 1:
        raise ValueError(f"max_boxes must be >= 1 or None, got {max_boxes}")
    width, height = image_size
    side = max(width, height)
    # 1. centred square padding (in float64 like the release's Python-float arithmetic, then float32 like its tensors).
    pad_x, pad_y = (side - width) // 2, (side - height) // 2
    boxes_t = boxes_t + torch.tensor([pad_x, pad_y, pad_x, pad_y], dtype=boxes_t.dtype)
    # 2. scale + round.
    canvas = torch.round(boxes_t.float() * (target / side))
    # 3. drop boxes entirely outside, clip the rest.
    inside = (canvas[:, 2] >= 0) & (canvas[:, 3] >= 0) & (canvas[:, 0] <= target) & (canvas[:, 1] <= target)
    canvas, scores_f = canvas[inside].clamp(0, target), scores_t.float()[inside]
    labels = [label for label, k in zip(labels, inside.tolist()) if k]
    # 4. class-wise NMS; `keep` is in descending score order.
    label_ids = {label: i for i, label in enumerate(dict.fromkeys(labels))}
    keep = batched_nms(canvas, scores_f, torch.tensor([label_ids[x] for x in labels], dtype=torch.long), iou_threshold)
    keep = keep.tolist()
    # 5. per-label cap, then the hard cap.
    if max_boxes is not None and len(keep) > max_boxes:
        per_label = PER_LABEL_CAP if max_boxes >= 50 else PER_LABEL_CAP_SMALL
        taken: dict = {}
        capped = []
        for i in keep:
            taken[labels[i]] = taken.get(labels[i], 0) + 1
            if taken[labels[i]] <= per_label:
                capped.append(i)
        keep = capped[:max_boxes]
    if not keep:  # 6. always at least one object token
        return torch.zeros(1, 4), torch.zeros(1), [""]
    index = torch.tensor(keep, dtype=torch.long)
    return canvas[index], scores_f[index], [labels[i] for i in keep]


# --- box files ----------------------------------------------------------------------------------------------------


def _check_record(record, where: str) -> None:
    if not isinstance(record, Mapping):
        raise ValueError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    if "frames" in record:
        if not isinstance(record["frames"], list):
            raise ValueError(f"{where}: 'frames' must be a list of {{boxes, scores, labels}} objects")
        for f, frame in enumerate(record["frames"]):
            _check_detection_fields(frame, f"{where}, frame {f}")
    else:
        _check_detection_fields(record, where)


def _check_detection_fields(record, where: str) -> None:
    if not isinstance(record, Mapping):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    missing = [k for k in ("boxes", "scores", "labels") if k not in record]
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing}")
    check_detections(record["boxes"], record["scores"], record["labels"], where)


def read_box_file(path: str | os.PathLike) -> dict[str, dict]:
    """Read and validate a box file -> {str(id): record}. Errors name the file and the record id (or index).

    A later record with an id already seen replaces the earlier one (as the release's dict build), with a warning.
    """
    path = os.fspath(path)
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    if isinstance(data, Mapping):  # {id: record}
        items = [(str(key), record, f"{path}, record id {str(key)!r}") for key, record in data.items()]
    elif isinstance(data, list):
        items = []
        for index, record in enumerate(data):
            if not isinstance(record, Mapping) or record.get("id") is None:
                raise ValueError(f"{path}: record {index} has no 'id'")
            items.append((str(record["id"]), record, f"{path}, record id {str(record['id'])!r}"))
    else:
        raise ValueError(f"{path}: a box file must hold a JSON list of records, got {type(data).__name__}")
    records: dict[str, dict] = {}
    duplicates = []
    for record_id, record, where in items:
        _check_record(record, where)
        if record_id in records:
            duplicates.append(record_id)
        records[record_id] = record
    if duplicates:
        logger.warning("%s: %d duplicate record ids (e.g. %r); the last one wins", path, len(duplicates), duplicates[0])
    return records


def find_box_record(records: Mapping[str, dict], sample: Mapping, path: str | None = None) -> dict:
    """The box record of a LLaVA sample: by str(sample["id"]) (training data), else str(sample["question_id"])."""
    tried = [str(sample[key]) for key in ("id", "question_id") if sample.get(key) is not None]
    for record_id in tried:
        if record_id in records:
            return records[record_id]
    source = f" in {path}" if path else ""
    raise KeyError(f"no box record{source} for sample id/question_id {tried or '(sample has neither)'}")


def write_box_file(path: str | os.PathLike, records: Mapping[str, dict] | Iterable[Mapping]) -> None:
    """Validate and write records (a list, or {id: record} as read_box_file returns) atomically: a temporary file
    in the same folder is renamed over `path`, so readers never see a half-written file. Tensors/arrays in the
    records are written as lists; NaN/inf are rejected."""
    path = os.fspath(path)
    if isinstance(records, Mapping):
        records = [{**record, "id": record.get("id", key)} for key, record in records.items()]
    records = list(records)
    for index, record in enumerate(records):
        if not isinstance(record, Mapping) or record.get("id") is None:
            raise ValueError(f"{path}: record {index} has no 'id'")
        _check_record(record, f"{path}, record id {str(record['id'])!r}")
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp_path = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(records, f, allow_nan=False, default=_to_list)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        os.unlink(tmp_path)
        raise


def _to_list(value):
    if hasattr(value, "tolist"):  # torch.Tensor, numpy arrays and scalars
        return value.tolist()
    raise TypeError(f"box files hold numbers, strings and lists; cannot write {type(value).__name__}")


__all__ = [
    "check_detections",
    "transform_boxes",
    "read_box_file",
    "write_box_file",
    "find_box_record",
    "HIGH_RES_SIZE",
    "MAX_BOXES_PER_RECORD",
]
