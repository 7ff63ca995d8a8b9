"""Small pure-PyTorch kernels shared by the pipelines (no torchvision dependency)."""

from .nms import batched_nms, box_iou
from .roi_align import roi_align, roi_align_mean

__all__ = ["roi_align", "roi_align_mean", "box_iou", "batched_nms"]
