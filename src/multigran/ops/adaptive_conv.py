"""Adaptive (per-pixel kernel) convolution in plain PyTorch: the op behind FeatUp's JBU.

    out[b, c, y, x] = sum_{i, j} K[b, i*k + j, y, x] * F_pad[b, c, y + i, x + j],   i, j in [0, k)

i.e. each output pixel p gets its own k x k kernel over the window centred on p (offset q = (i - r, j - r), r = k // 2),
shared by all channels. This is the FeatUp/LLaVA-UHD CUDA kernel `AdaptiveConv` (filters (B, H, W, k, k)) with the
kernel given in the channel-first layout the JBU produces, (B, k*k, H, W), row-major over the window (i = row offset).

Why a loop over the k*k offsets and not `F.unfold`: unfold materialises (B, C*k*k, H*W); for the LLaVA-UHD 4x level
(C = 1024, 96x96, k = 7) that is 1.8 GB per image in float32, forward alone. The loop keeps one (B, C, H, W)
accumulator, and autograd only saves views of the padded input and of the kernel, so memory stays O(B*C*H*W) in both
passes; on a GPU the 49 fused multiply-adds are bandwidth-bound elementwise kernels, as fast as the unfold einsum.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_PADDINGS = ("reflect", "replicate", "zeros", None)


def adaptive_conv(features: torch.Tensor, kernels: torch.Tensor, padding: str | None = "reflect") -> torch.Tensor:
    """Per-pixel-kernel convolution.

    features: (B, C, H, W), or (B, C, H + 2r, W + 2r) already padded when `padding=None` (the CUDA kernel's contract).
    kernels:  (B, k*k, H, W), k = 2r + 1 odd; entry i*k + j weighs the neighbour at offset (i - r, j - r).
    padding:  how the window sees beyond the border: "reflect" (FeatUp/LLaVA-UHD JBU), "replicate", "zeros", or None.
    Returns (B, C, H, W) in features' dtype; half/bfloat16 inputs are accumulated in float32.
    """
    if features.dim() != 4 or kernels.dim() != 4:
        raise ValueError(
            f"adaptive_conv: features must be (B, C, H, W) and kernels (B, k*k, H, W), got {tuple(features.shape)} "
            f"and {tuple(kernels.shape)}"
        )
    if padding not in _PADDINGS:
        raise ValueError(f"adaptive_conv: padding must be one of {_PADDINGS}, got {padding!r}")
    batch, window, height, width = kernels.shape
    size = math.isqrt(window)
    if size * size != window or size % 2 == 0:
        raise ValueError(f"adaptive_conv: kernels need k*k channels with k odd, got {window} channels")
    radius = size // 2
    if features.shape[0] != batch:
        raise ValueError(f"adaptive_conv: batch mismatch, features {features.shape[0]} vs kernels {batch}")

    if padding is None:
        expected = (height + 2 * radius, width + 2 * radius)
        if tuple(features.shape[2:]) != expected:
            raise ValueError(
                f"adaptive_conv: padding=None expects features already padded to {expected} for {size}x{size} kernels "
                f"over {height}x{width}, got {tuple(features.shape[2:])}"
            )
        padded = features
    else:
        if tuple(features.shape[2:]) != (height, width):
            raise ValueError(
                f"adaptive_conv: features {tuple(features.shape[2:])} and kernels {(height, width)} must share H, W"
            )
        if padding == "reflect" and min(height, width) <= radius:
            raise ValueError(
                f"adaptive_conv: reflect padding by {radius} needs maps larger than {radius} pixels, "
                f"got {height}x{width}"
            )
        mode = "constant" if padding == "zeros" else padding
        padded = F.pad(features, [radius] * 4, mode=mode)  # (B, C, H + 2r, W + 2r)

    out_dtype = features.dtype
    compute_dtype = torch.float32 if out_dtype in (torch.float16, torch.bfloat16) else out_dtype
    padded = padded.to(compute_dtype)
    kernels = kernels.to(compute_dtype)
    out = None
    for i in range(size):
        for j in range(size):
            shifted = padded[:, :, i : i + height, j : j + width]  # neighbour at offset (i - r, j - r): (B, C, H, W)
            weight = kernels[:, i * size + j, None]  # (B, 1, H, W), shared by all channels
            out = shifted * weight if out is None else torch.addcmul(out, shifted, weight)
    return out.to(out_dtype)
