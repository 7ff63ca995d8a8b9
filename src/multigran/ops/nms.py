"""Box IoU and class-wise non-maximum suppression in plain PyTorch (torchvision.ops semantics, no torchvision needed).

Used by MG-LLaVA's load-time box transforms (class-wise NMS at IoU 0.2, spec mg-llava.md "Box pipeline").
"""

import torch


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of (N, 4) and (M, 4) xyxy boxes -> (N, M), as `torchvision.ops.box_iou` (0/0 gives nan)."""
    _check_boxes(boxes1, "boxes1")
    _check_boxes(boxes2, "boxes2")
    area1 = (boxes1[:, 2] - boxes1[:, 0]) * (boxes1[:, 3] - boxes1[:, 1])
    area2 = (boxes2[:, 2] - boxes2[:, 0]) * (boxes2[:, 3] - boxes2[:, 1])
    top_left = torch.maximum(boxes1[:, None, :2], boxes2[None, :, :2])  # (N, M, 2)
    bottom_right = torch.minimum(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area1[:, None] + area2[None, :] - inter)


def batched_nms(
    boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, iou_threshold: float
) -> torch.Tensor:
    """Class-wise greedy NMS, as `torchvision.ops.batched_nms`: boxes of different labels never suppress each other.

    Args:
        boxes: (K, 4) xyxy. scores: (K,). labels: (K,) integer class ids. iou_threshold: a box is dropped when its IoU
            with a kept, higher-scored box of the same label is > iou_threshold.

    Returns:
        int64 indices of the kept boxes, by descending score; equal scores keep their input order (stable sort).
    """
    _check_boxes(boxes, "boxes")
    num = boxes.shape[0]
    if scores.shape != (num,) or labels.shape != (num,):
        raise ValueError(
            f"batched_nms: scores and labels must have shape ({num},) to match boxes, "
            f"got {tuple(scores.shape)} and {tuple(labels.shape)}"
        )
    if num == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    order = torch.sort(scores, descending=True, stable=True).indices
    sorted_boxes, sorted_labels = boxes[order], labels[order]
    # suppresses[i, j]: box i (earlier in score order) would suppress box j. (K, K): fine for the hundreds of boxes
    # a detector keeps per image.
    same_label = sorted_labels[:, None] == sorted_labels[None, :]
    suppresses = (box_iou(sorted_boxes, sorted_boxes) > iou_threshold) & same_label
    suppresses = torch.triu(suppresses, diagonal=1).float()  # 0/1 counts, exact in float32
    # Greedy NMS is the unique solution of keep[j] = no kept i < j suppresses j. Iterating that rule from "keep all"
    # fixes one more leading entry per round at least, so it converges; each round is one (K, K) mat-vec.
    keep = torch.ones(num, dtype=torch.bool, device=boxes.device)
    for _ in range(num):
        new_keep = (keep.to(suppresses.dtype) @ suppresses) == 0
        if torch.equal(new_keep, keep):
            break
        keep = new_keep
    return order[keep]


def _check_boxes(boxes, name):
    if not isinstance(boxes, torch.Tensor) or boxes.dim() != 2 or boxes.shape[1] != 4:
        shape = tuple(boxes.shape) if isinstance(boxes, torch.Tensor) else type(boxes).__name__
        raise ValueError(f"{name} must be an (N, 4) tensor of [x1, y1, x2, y2] boxes, got {shape}")


__all__ = ["box_iou", "batched_nms"]
