"""box_iou and class-wise batched_nms against slow, obvious references."""

import pytest
import torch

from multigran.ops import batched_nms, box_iou


def iou_reference(a, b):
    ax1, ay1, ax2, ay2 = a
    bx1, by1, bx2, by2 = b
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    return inter / union


def nms_reference(boxes, scores, labels, threshold):
    """Greedy: visit boxes by descending score (ties: lower index first); keep one unless a kept box of its label
    overlaps it by IoU > threshold."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    kept = []
    for i in order:
        if all(labels[j] != labels[i] or not iou_reference(boxes[i], boxes[j]) > threshold for j in kept):
            kept.append(i)
    return kept


def random_boxes(generator, num, size=20.0):
    xy = torch.rand(num, 2, generator=generator, dtype=torch.float64) * size
    wh = torch.rand(num, 2, generator=generator, dtype=torch.float64) * size / 2 + 0.5
    return torch.cat([xy, xy + wh], dim=1)


def test_box_iou_hand_values_and_reference():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0], [1.0, 1.0, 3.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [5.0, 5.0, 6.0, 6.0], [0.0, 0.0, 2.0, 2.0]])
    iou = box_iou(a, b)
    # [0,0,2,2] vs [1,1,3,3]: inter 1, union 7; disjoint: 0; identical: 1; [1,1,3,2] vs [1,1,3,3]: inter 2, union 4
    torch.testing.assert_close(iou[0], torch.tensor([1 / 7, 0.0, 1.0]))
    torch.testing.assert_close(iou[1, 0], torch.tensor(0.5))
    generator = torch.Generator().manual_seed(0)
    x, y = random_boxes(generator, 6), random_boxes(generator, 5)
    want = torch.tensor([[iou_reference(p, q) for q in y.tolist()] for p in x.tolist()], dtype=torch.float64)
    torch.testing.assert_close(box_iou(x, y), want)
    assert box_iou(torch.zeros(0, 4), b).shape == (0, 3)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("threshold", [0.0, 0.2, 0.5])
def test_batched_nms_matches_greedy_reference(seed, threshold):
    generator = torch.Generator().manual_seed(seed)
    num = 40
    boxes = random_boxes(generator, num)
    scores = torch.rand(num, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 3, (num,), generator=generator)
    got = batched_nms(boxes, scores, labels, threshold)
    want = nms_reference(boxes.tolist(), scores.tolist(), labels.tolist(), threshold)
    assert got.dtype == torch.int64
    assert got.tolist() == want


def test_ties_and_labels():
    boxes = torch.tensor(
        [
            [0.0, 0.0, 10.0, 10.0],
            [0.0, 0.0, 10.0, 10.0],  # same box and score as 0: 0 comes first and suppresses it
            [0.0, 0.0, 10.0, 10.0],  # same box, other label: kept
            [1.0, 1.0, 10.0, 10.0],  # IoU 0.81 with box 0, higher score: kept, and then it suppresses box 0
            [50.0, 50.0, 60.0, 60.0],
        ]
    )
    scores = torch.tensor([0.5, 0.5, 0.5, 0.9, 0.5])
    labels = torch.tensor([1, 1, 2, 1, 1])
    assert batched_nms(boxes, scores, labels, 0.5).tolist() == [3, 2, 4]
    assert batched_nms(boxes, scores, labels, 0.9).tolist() == [3, 0, 2, 4]  # 0.81 <= 0.9: 0 survives, suppresses 1
    # ties are ordered by input index among the kept ones
    assert batched_nms(boxes[[4, 2]], scores[[4, 2]], labels[[4, 2]], 0.5).tolist() == [0, 1]


def test_chain_suppression_is_greedy_not_pairwise():
    # a suppresses b, b would suppress c, but b is gone so c stays (a and c do not overlap enough)
    boxes = torch.tensor([[0.0, 0.0, 10.0, 1.0], [4.0, 0.0, 14.0, 1.0], [8.0, 0.0, 18.0, 1.0]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    labels = torch.zeros(3, dtype=torch.long)
    assert batched_nms(boxes, scores, labels, 0.3).tolist() == [0, 2]


def test_empty_and_bad_input():
    assert batched_nms(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long), 0.5).tolist() == []
    with pytest.raises(ValueError, match="boxes"):
        batched_nms(torch.zeros(3, 5), torch.zeros(3), torch.zeros(3, dtype=torch.long), 0.5)
    with pytest.raises(ValueError, match="scores and labels"):
        batched_nms(torch.zeros(3, 4), torch.zeros(2), torch.zeros(3, dtype=torch.long), 0.5)
    with pytest.raises(ValueError, match="boxes1"):
        box_iou(torch.zeros(4), torch.zeros(1, 4))
