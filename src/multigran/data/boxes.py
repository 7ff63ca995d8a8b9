"""MG-LLaVA object boxes: box files (release JSON format) and the load-time box transforms.

Box file = JSON list of records, one per image, as written by the release's offline RAM++ / OWLv2 detection:
    {"id": <sample id>, "boxes": [[x1, y1, x2, y2], ...], "scores": [...], "labels": [...]}
with absolute pixel xyxy in the ORIGINAL image. Video records are {"id", "frames": [{boxes, scores, labels}, ...]}
(read and validated; the transforms apply per frame). Records are looked up by str(sample "id") in training and by
"question_id" in evaluation. A JSON object {id: record} is accepted too (the release accepts both).

`transform_boxes` maps a record to the high-res canvas (768 x 768 in the release) in one of two orders.

compat=True, the release (`mg_llava/module/mg_llava_dataset.py:76-160` with `mg_llava/dataset/utils.py:558-569,
717-767`; evaluation `mg_llava/evaluation/mg_llava_proxy_eval_dataset.py:130-206`):
  1. shift for the centred square padding: + (max - min) // 2 to y if W > H, to x if H > W;
  2. class-wise NMS at IoU 0.2 on these padded, unrounded, unclipped original-pixel boxes (float32);
  3. the soft cap: only if more than `max_boxes` remain, the top 20 per label (5 if max_boxes < 50), the output then
     grouped by label (labels in order of their best box); `one_per_label` (the release's "text within 50 tokens of
     max_length" rule, training only) keeps the best box of each label, grouped the same way; max_boxes=None = no cap
     (the evaluation default). The cap counts boxes that step 5 drops later;
  4. scale by target / side, round (torch.round, half to even, float32);
  5. centre crop: start = (int(side * (target / side)) - target) // 2, which is -1 for ~4-5 % of the sides (47, 94,
     307, 613, 637, ...: the float product lands just below target): every box then moves by +1 px. Boxes entirely
     outside the canvas are dropped, the rest clipped to [0, target].
compat=False, corrected (the default):
  1. the same padding shift; 2. scale and round; 3. drop boxes entirely outside, clip to [0, target] (no shift);
  4. class-wise NMS at IoU 0.2 on the canvas boxes; 5. if more than `max_boxes` remain: the top 20 per label (5 if
  max_boxes < 50), then a HARD cap at max_boxes; `one_per_label` keeps one box per label first;
  6. descending score order.
Both: no box left -> one all-zero box (every image gets >= 1 object token). Degenerate zero-area boxes that touch
the canvas are kept (the release's drop test only removes boxes entirely outside); boxes with x2 < x1 or y2 < y1 are
rejected as malformed input (most likely [x, y, w, h] boxes), never silently dropped (the release would keep them).
Remaining compat deviations, both from the release's own nondeterminism: torchvision's `batched_nms` shifts each
label's boxes by label_index * (max coordinate + 1) before a single NMS, in float32, with label indices from
`set(labels)` (an order that changes with PYTHONHASHSEED), so IoUs within ~1e-4 of the threshold can flip from run to
run there; here each label's IoUs are exact float32 (as the release for more than 1000 boxes). Equal scores keep
their input order (torchvision's stable sort); the release's per-label `topk` leaves the order of equal scores open.
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
    if labels is not None and (isinstance(labels, (str, bytes, Mapping)) or not hasattr(labels, "__iter__")):
        raise ValueError(f"{where}: labels must be a list (one label per box), got {type(labels).__name__}")
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
    compat: bool = False,
    one_per_label: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Original-image detections -> (boxes (K, 4) float32 on the target canvas, scores (K,) float32, labels).

    image_size is the ORIGINAL (width, height) before square padding. K >= 1: with no box left the result is one
    all-zero box with score 0.0 and label "". compat: the release's order and soft cap, else the corrected order and
    hard cap (module docstring). max_boxes=None disables the cap. one_per_label: keep one box per label (the release's
    rule for a training text within 50 tokens of max_length).
    """
    boxes_t, scores_t, labels = check_detections(boxes, scores, labels, where)
    if len(image_size) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in image_size):
        raise ValueError(f"{where}: image_size must be (width, height) positive ints, got {image_size!r}")
    check_box_cap(max_boxes, compat, one_per_label)
    width, height = image_size
    side = max(width, height)
    # 1. centred square padding (in float64 like the release's Python-float arithmetic, then float32 like its tensors).
    pad_x, pad_y = (side - width) // 2, (side - height) // 2
    padded = (boxes_t + torch.tensor([pad_x, pad_y, pad_x, pad_y], dtype=boxes_t.dtype)).float()
    scores_f = scores_t.float()
    if compat:
        keep = _class_wise_nms(padded, scores_f, labels, iou_threshold, torchvision_threshold=True)
        keep = _release_cap(keep, labels, max_boxes, one_per_label)
        canvas, inside = _scale_and_crop(padded[torch.tensor(keep, dtype=torch.long)], side, target, True)
        keep = [i for i, k in zip(keep, inside.tolist()) if k]
    else:
        canvas, inside = _scale_and_crop(padded, side, target, release_shift=False)
        candidates = inside.nonzero()[:, 0].tolist()
        candidate_labels = [labels[i] for i in candidates]
        kept = _class_wise_nms(canvas, scores_f[inside], candidate_labels, iou_threshold, torchvision_threshold=False)
        kept = _hard_cap(kept, candidate_labels, max_boxes, one_per_label)
        canvas, keep = canvas[torch.tensor(kept, dtype=torch.long)], [candidates[i] for i in kept]
    if not keep:  # always at least one object token
        return torch.zeros(1, 4), torch.zeros(1), [""]
    return canvas, scores_f[torch.tensor(keep, dtype=torch.long)], [labels[i] for i in keep]


def check_box_cap(max_boxes: int | None, compat: bool, one_per_label: bool = False) -> None:
    """Refuses caps the release cannot run: limit_num == 50 defines no per-label cap
    (`mg_llava_dataset.py:103-106`, UnboundLocalError at :117) and limit_num None with the near-max_length rule
    compares len(scores) > None (TypeError at :109)."""
    if max_boxes is not None and (isinstance(max_boxes, bool) or not isinstance(max_boxes, int) or max_boxes < 1):
        raise ValueError(f"max_boxes must be a positive int or None, got {max_boxes!r}")
    if compat and max_boxes == 50:
        raise ValueError("max_boxes=50 in compat mode: the release defines its per-label cap only for limit_num > 50 "
                         "(20) or < 50 (5) and fails at 50; use another value or compat=False")
    if compat and max_boxes is None and one_per_label:
        raise ValueError("max_boxes=None with the one-box-per-label rule (text_max_length) in compat mode: the release "
                         "fails on this combination (len(scores) > None); set max_boxes or drop text_max_length")


def _class_wise_nms(boxes: torch.Tensor, scores: torch.Tensor, labels: list, iou_threshold: float,
                    torchvision_threshold: bool) -> list[int]:
    """Kept indices in descending score order (equal scores: input order), boxes of different labels never compete.

    `batched_nms` compares the IoU with the threshold in the boxes' dtype (an IoU of 1/5 = 0.2f is not > 0.2f: kept).
    torchvision_threshold: as torchvision's kernel, which compares its float32 IoU with the threshold as a double
    (0.2f > 0.2: suppressed); the float32 just below 0.2f splits every float32 IoU the same way."""
    label_ids = {label: i for i, label in enumerate(dict.fromkeys(labels))}
    ids = torch.tensor([label_ids[x] for x in labels], dtype=torch.long)
    threshold = iou_threshold
    rounded = torch.tensor(iou_threshold, dtype=boxes.dtype)
    if torchvision_threshold and float(rounded) > iou_threshold:
        threshold = float(torch.nextafter(rounded, torch.tensor(float("-inf"), dtype=boxes.dtype)))
    return batched_nms(boxes, scores, ids, threshold).tolist()


def _per_label(keep: list[int], labels: list, cap: int) -> dict:
    """label -> its first `cap` indices of `keep` (score order), labels in order of their first (best) box."""
    groups: dict = {}
    for i in keep:
        members = groups.setdefault(labels[i], [])
        if len(members) < cap:
            members.append(i)
    return groups


def _release_cap(keep: list[int], labels: list, max_boxes: int | None, one_per_label: bool) -> list[int]:
    """`mg_llava_dataset.py:100-135` (per_category): only when more than max_boxes remain (or one_per_label), the best
    20 per label (5 if max_boxes < 50; 1 with one_per_label), output grouped by label."""
    if not keep or (max_boxes is None and not one_per_label):
        return keep
    if not one_per_label and len(keep) <= max_boxes:
        return keep
    cap = 1 if one_per_label else (PER_LABEL_CAP if max_boxes > 50 else PER_LABEL_CAP_SMALL)
    return [i for members in _per_label(keep, labels, cap).values() for i in members]


def _hard_cap(keep: list[int], labels: list, max_boxes: int | None, one_per_label: bool) -> list[int]:
    """Corrected cap, order kept: one box per label if asked; past max_boxes the top 20 (5 if max_boxes < 50) per
    label, then the best max_boxes."""
    if one_per_label:
        keep = _subset(keep, _per_label(keep, labels, 1))
    if max_boxes is not None and len(keep) > max_boxes:
        per_label = PER_LABEL_CAP if max_boxes >= 50 else PER_LABEL_CAP_SMALL
        keep = _subset(keep, _per_label(keep, labels, per_label))[:max_boxes]
    return keep


def _subset(keep: list[int], groups: dict) -> list[int]:
    chosen = {i for members in groups.values() for i in members}
    return [i for i in keep if i in chosen]


def _scale_and_crop(boxes: torch.Tensor, side: int, target: int, release_shift: bool):
    """Padded original-pixel boxes (K, 4) float32 -> (canvas boxes (K', 4) float32 for the boxes inside, inside (K,)).

    Scale target / side and round in float32 (`utils.py:732-739`). release_shift: the centre-crop start of
    `utils.py:742-747`, (int(side * scale) - target) // 2, is -1 when the float product falls below target: boxes
    then move by +1 px. Boxes entirely outside [0, target] are dropped, the rest clipped (`utils.py:754-759`).
    """
    scale = target / side
    canvas = torch.round(boxes * scale)
    start = (int(side * scale) - target) // 2 if release_shift else 0
    canvas = canvas - start
    inside = (canvas[:, 2] >= 0) & (canvas[:, 3] >= 0) & (canvas[:, 0] <= target) & (canvas[:, 1] <= target)
    return canvas[inside].clamp(0, target), inside


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
    from ..json_io import read_json_file

    path = os.fspath(path)
    data = read_json_file(path)  # UTF-8, JSON syntax and nesting depth: errors name the file and line
    if isinstance(data, Mapping):  # {id: record}
        items = [(str(key), record, f"{path}, record id {str(key)!r}") for key, record in data.items()]
    elif isinstance(data, list):
        items = []
        for index, record in enumerate(data):
            if not isinstance(record, Mapping):
                raise ValueError(f"{path}: record {index} must be a JSON object, got {type(record).__name__}")
            if record.get("id") is None:
                raise ValueError(f"{path}: record {index} has no 'id'")
            if isinstance(record["id"], bool) or not isinstance(record["id"], (str, int)):
                raise ValueError(f"{path}: record {index}: field 'id' must be a string or an integer, got "
                                 f"{type(record['id']).__name__}")
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
    "check_box_cap",
    "transform_boxes",
    "read_box_file",
    "write_box_file",
    "find_box_record",
    "HIGH_RES_SIZE",
    "MAX_BOXES_PER_RECORD",
]
