"""Referring-expression grounding (RefCOCO/+/g): the box in the answer, its IoU with the reference, Acc@0.5.

Boxes are compared in the coordinate convention the model was trained with:
- "square": [x1, y1, x2, y2] in [0, 1] of the image padded to a centred square (LLaVA-1.5's grounding data, which
  LLaVA-NeXT, AVG-LLaVA, MG-LLaVA and LLaVA-UHD v2 train on; `expand2square` pastes the image at the middle of the
  longer side);
- "normalized": [x1, y1, x2, y2] in [0, 1] of the image's own width and height (lmms-eval's refcoco tasks).
"""

import re

# lmms_eval/tasks/refcoco/utils_rec.py:56-77: the first "[a, b, c, d]" of four numbers.
_BOX = re.compile(r"\[\s*(-?\d+(?:\.\d+)?),\s*(-?\d+(?:\.\d+)?),\s*(-?\d+(?:\.\d+)?),\s*(-?\d+(?:\.\d+)?)\s*\]")
BOX_FORMATS = ("square", "normalized")


def parse_box(text: str) -> list[float] | None:
    """The first bracketed 4-number box in the answer, or None (lmms-eval scores [0, 0, 0, 0] then: IoU 0)."""
    match = _BOX.search(text)
    return [float(match.group(i)) for i in range(1, 5)] if match else None


def reference_box(xywh, width: int, height: int, box_format: str) -> list[float]:
    """A COCO box [x, y, w, h] in pixels -> [x1, y1, x2, y2] in the model's convention."""
    x, y, w, h = (float(v) for v in xywh)
    if box_format == "normalized":
        return [x / width, y / height, (x + w) / width, (y + h) / height]
    if box_format == "square":
        side = max(width, height)
        dx, dy = (side - width) // 2, (side - height) // 2
        return [(x + dx) / side, (y + dy) / side, (x + w + dx) / side, (y + h + dy) / side]
    raise ValueError(f"box format {box_format!r}: expected one of {', '.join(BOX_FORMATS)}")


def iou(a, b) -> float:
    """Intersection over union of two [x1, y1, x2, y2] boxes (0 when the union is empty)."""
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


__all__ = ["BOX_FORMATS", "iou", "parse_box", "reference_box"]
