"""RoIAlign in plain PyTorch with torchvision's exact semantics (`torchvision.ops.roi_align`, CPU/CUDA kernels).

torchvision has no CPU build here, so this is a re-implementation. It computes, per box k and output cell (p, q),

    out[k, c, p, q] = 1 / (gy * gx) * sum_{i < gy, j < gx} bilinear(F[b_k, c], y_{p,i}, x_{q,j})

with y_{p,i} = y1 + p * bin_h + (i + 0.5) * bin_h / gy (same for x), and torchvision's border rules: a sample with
y < -1 or y > H (or x < -1 or x > W) contributes 0 but still counts; y <= 0 reads row 0; y >= H - 1 reads row H - 1.

Bilinear weights factor into a row part and a column part, so the sampling-grid average is separable:
out[k] = A_y[k] @ F[b_k] @ A_x[k]^T, where row p of A_y[k] holds the averaged 1-D interpolation weights of output row p.
We build A_y/A_x for all boxes at once (boxes differ in their adaptive grid gy, gx: padded to the largest and masked),
restricted to the rows/columns each box touches, gather that crop of the map (channels-last) and apply two batched
matmuls. No Python loop over boxes; the (K, C, oh * gy, ow * gx) sample tensor is never materialised; differentiable
w.r.t. the features (gather + matmul); any device and dtype (computed in at least float32, returned in the features'
dtype). (A banded variant that skips the zero weights was measured slower on CPU: gathers are memory-bound, GEMMs
are not.)

Memory: boxes are processed in chunks whose working set (crop + partial products + output) stays under `CHUNK_ELEMENTS`
elements; boxes are sorted by size first when more than one chunk is needed. LLaVA-UHD v2 (144 windows of a 96x96x4096
map, 3x3 output) fits in a few chunks; MG-LLaVA (100 boxes x 2880 channels x 56x56 output on a 192x192 map) takes about
one full-image box per chunk, and its output alone is 100*2880*56*56 = 0.9 G elements: when only the mean over the
output grid is wanted (MG-LLaVA's object tokens), use `roi_align_mean`, which is exact and needs no (K, C, oh, ow)
tensor.
"""

from collections.abc import Sequence

import torch

# Working-memory budget per chunk of boxes, in elements of the compute dtype (2**27 floats = 512 MiB in float32).
CHUNK_ELEMENTS = 2**27


def roi_align(
    features: torch.Tensor,
    boxes: torch.Tensor | Sequence[torch.Tensor],
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> torch.Tensor:
    """Bilinear RoIAlign, same arguments and results as `torchvision.ops.roi_align`.

    Args:
        features: (N, C, H, W) feature maps.
        boxes: (K, 5) rows [batch_index, x1, y1, x2, y2] in input-image coordinates, or a list of N tensors (K_i, 4) of
            [x1, y1, x2, y2] boxes, one per image (batch index = position in the list).
        output_size: int or (height, width) of the pooled output.
        spatial_scale: factor mapping box coordinates to feature-map coordinates.
        sampling_ratio: samples per bin along each axis; <= 0 means adaptive, ceil(roi_size / output_size) per box.
        aligned: if True, shift box coordinates by -0.5 pixel and do not clamp the roi size to >= 1.

    Returns:
        (K, C, oh, ow) pooled features, dtype and device of `features`.
    """
    if not isinstance(features, torch.Tensor) or features.dim() != 4:
        raise ValueError(f"roi_align: features must be a (N, C, H, W) tensor, got {_describe(features)}")
    num_images, channels, height, width = features.shape
    out_h, out_w = _parse_output_size(output_size)
    compute_dtype = torch.promote_types(features.dtype, torch.float32)
    rois = _rois_from_boxes(boxes, num_images, features.device, compute_dtype)
    if height == 0 or width == 0:
        raise ValueError(f"roi_align: features have an empty spatial size {height}x{width}")
    num_boxes = rois.shape[0]
    if num_boxes == 0:
        return features.new_zeros(num_boxes, channels, out_h, out_w)

    geometry = [
        _axis_geometry(rois[:, 2], rois[:, 4], out_h, height, spatial_scale, sampling_ratio, aligned),
        _axis_geometry(rois[:, 1], rois[:, 3], out_w, width, spatial_scale, sampling_ratio, aligned),
    ]
    batch_index = rois[:, 0].long()
    # Channels-last so that a gathered crop is made of contiguous C-vectors; no copy when the caller already holds a
    # channels-last map viewed as (N, C, H, W), as the UHD projector does.
    features_hwc = features.permute(0, 2, 3, 1).contiguous()

    out = None
    for chunk in _plan_chunks(geometry, channels, out_h, out_w):
        pooled = _roi_align_chunk(features_hwc, batch_index[chunk], [g.select(chunk) for g in geometry], compute_dtype)
        if out is None and chunk.numel() == num_boxes:  # everything in one chunk, original order
            out = pooled
            break
        if out is None:
            out = pooled.new_zeros(num_boxes, *pooled.shape[1:])
        out.index_copy_(0, chunk, pooled)
    # (K, oh, ow, C) -> (K, C, oh, ow)
    return out.to(features.dtype).permute(0, 3, 1, 2)



def roi_align_mean(
    features: torch.Tensor,
    boxes: torch.Tensor | Sequence[torch.Tensor],
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> torch.Tensor:
    """`roi_align(...).mean((-2, -1))` -> (K, C), computed without the (K, C, oh, ow) output.

    The mean over the output grid of A_y F A_x^T is a_y^T F a_x with a_y = mean of A_y's rows: one (K_b, H) @ (H, W*C)
    matmul per image. MG-LLaVA's object tokens (56x56 RoIAlign then mean) cost ~100x less this way.
    """
    if not isinstance(features, torch.Tensor) or features.dim() != 4:
        raise ValueError(f"roi_align_mean: features must be a (N, C, H, W) tensor, got {_describe(features)}")
    num_images, channels, height, width = features.shape
    out_h, out_w = _parse_output_size(output_size)
    compute_dtype = torch.promote_types(features.dtype, torch.float32)
    rois = _rois_from_boxes(boxes, num_images, features.device, compute_dtype)
    if height == 0 or width == 0:
        raise ValueError(f"roi_align_mean: features have an empty spatial size {height}x{width}")
    num_boxes = rois.shape[0]
    if num_boxes == 0:
        return features.new_zeros(0, channels)
    vectors = []
    for axis, (lo, hi, out_size, length) in enumerate([(2, 4, out_h, height), (1, 3, out_w, width)]):
        geom = _axis_geometry(rois[:, lo], rois[:, hi], out_size, length, spatial_scale, sampling_ratio, aligned)
        weights, first = _interpolation_matrix(geom, compute_dtype)  # (K, out, S), (K,)
        index = (first[:, None] + torch.arange(weights.shape[2], device=first.device)).clamp(max=length - 1)
        dense = torch.zeros(num_boxes, length, device=first.device, dtype=compute_dtype)
        vectors.append(dense.scatter_add_(1, index, weights.mean(dim=1)))  # (K, H) then (K, W)
    weight_y, weight_x = vectors
    batch_index = rois[:, 0].long()
    features_hwc = features.permute(0, 2, 3, 1)
    out = torch.zeros(num_boxes, channels, device=features.device, dtype=compute_dtype)
    rows_per_chunk = max(1, CHUNK_ELEMENTS // (width * channels))
    for image in batch_index.unique().tolist():  # a loop over images, not boxes
        feature = features_hwc[image].reshape(height, width * channels).to(compute_dtype)
        for chunk in (batch_index == image).nonzero()[:, 0].split(rows_per_chunk):
            pooled_y = (weight_y[chunk] @ feature).view(-1, width, channels)  # (n, H) @ (H, W*C) -> (n, W, C)
            out = out.index_copy(0, chunk, torch.bmm(weight_x[chunk, None, :], pooled_y)[:, 0])  # -> (n, C)
    return out.to(features.dtype)

class _AxisGeometry:
    """Per-box sampling layout along one axis (rows or columns), all tensors of shape (K,)."""

    def __init__(self, start, bin_size, grid, span, out_size, length):
        self.start = start  # roi start in feature-map coordinates
        self.bin_size = bin_size  # roi size / output size
        self.grid = grid  # samples per bin (0 when the roi is empty: no sample at all)
        self.span = span  # number of map indices the samples touch, an upper bound used to size the chunks
        self.out_size = out_size
        self.length = length  # H or W of the map

    def select(self, index):
        return _AxisGeometry(
            self.start[index], self.bin_size[index], self.grid[index], self.span[index], self.out_size, self.length
        )


def _axis_geometry(lo, hi, out_size, length, spatial_scale, sampling_ratio, aligned) -> _AxisGeometry:
    offset = 0.5 if aligned else 0.0
    start = lo * spatial_scale - offset
    end = hi * spatial_scale - offset
    roi_size = end - start
    if not aligned:  # torchvision: force malformed rois to be 1x1
        roi_size = roi_size.clamp(min=1.0)
    bin_size = roi_size / out_size
    if sampling_ratio > 0:
        grid = torch.full_like(start, sampling_ratio, dtype=torch.long)
    else:
        # torchvision: ceil(roi_height / pooled_height); <= 0 (empty roi when aligned) means no sample
        grid = torch.ceil(roi_size / out_size).long().clamp(min=0)
    # Extreme sample positions (first sample of the first bin, last sample of the last bin), clamped to the map like the
    # kernel does, widened by one index each side so float rounding cannot make the bound too tight.
    safe_grid = grid.clamp(min=1).to(start.dtype)
    y_first = start + 0.5 * bin_size / safe_grid
    y_last = start + (out_size - 1) * bin_size + ((safe_grid - 0.5) * bin_size) / safe_grid
    lo_pos = torch.minimum(y_first, y_last).clamp(0, length - 1)
    hi_pos = torch.maximum(y_first, y_last).clamp(0, length - 1)
    first = (torch.floor(lo_pos).long() - 1).clamp(min=0)
    last = (torch.floor(hi_pos).long() + 2).clamp(max=length - 1)
    span = (last - first + 1).clamp(min=1)
    return _AxisGeometry(start, bin_size, grid, span, out_size, length)


def _plan_chunks(geometry, channels, out_h, out_w) -> list[torch.Tensor]:
    """Split the boxes into index chunks whose padded working set fits in CHUNK_ELEMENTS."""
    gy, gx = geometry
    num_boxes = gy.start.shape[0]
    device = gy.start.device

    # elements held per box: crop (+ its cast), x-pooled crop, output, weights, samples
    def cost(span_y, span_x, grid_y, grid_x):
        return (
            channels * (2 * span_y * span_x + span_y * out_w + out_h * out_w)
            + out_h * (span_y + 2 * grid_y)
            + out_w * (span_x + 2 * grid_x)
        )

    stats = torch.stack([gy.span, gx.span, gy.grid, gx.grid], dim=1).tolist()  # one host sync for the plan
    padded = [max(column) for column in zip(*stats)]
    if num_boxes * cost(*padded) <= CHUNK_ELEMENTS:
        return [torch.arange(num_boxes, device=device)]
    # Largest boxes first, so that boxes of similar size share a chunk and little padding is wasted.
    per_box = [cost(*row) for row in stats]
    order = sorted(range(num_boxes), key=lambda k: -per_box[k])
    chunks, begin = [], 0
    while begin < num_boxes:
        size = max(1, CHUNK_ELEMENTS // per_box[order[begin]])
        while size > 1:  # the padded cost of a chunk uses its per-axis maxima, which may exceed the first box's
            rows = [stats[k] for k in order[begin : begin + size]]
            if len(rows) * cost(*[max(column) for column in zip(*rows)]) <= CHUNK_ELEMENTS:
                break
            size //= 2
        chunks.append(torch.tensor(order[begin : begin + size], device=device))
        begin += size
    return chunks


def _interpolation_matrix(geom: _AxisGeometry, compute_dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Averaged 1-D bilinear weights of each output bin over the map indices first[k] + (0..span-1).

    Returns (weights (K, out_size, span), first (K,)): out[k, p] = sum_s weights[k, p, s] * map[first[k] + s].
    """
    num_boxes = geom.start.shape[0]
    device = geom.start.device
    max_grid = max(int(geom.grid.max()), 1)
    bins = torch.arange(geom.out_size, device=device, dtype=compute_dtype)
    samples = torch.arange(max_grid, device=device, dtype=compute_dtype)
    grid = geom.grid.to(compute_dtype).clamp(min=1)[:, None, None]
    bin_size = geom.bin_size[:, None, None]
    # (K, out, max_grid) sample positions, the kernel's expression and evaluation order
    offsets = ((samples[None, None, :] + 0.5) * bin_size) / grid
    pos = geom.start[:, None, None] + bins[None, :, None] * bin_size + offsets
    in_grid = samples[None, None, :] < geom.grid[:, None, None]
    valid = in_grid & (pos >= -1.0) & (pos <= geom.length)
    pos = torch.where(valid, pos, torch.zeros_like(pos)).clamp(min=0)
    low = torch.floor(pos).long()
    at_edge = low >= geom.length - 1
    low = torch.where(at_edge, torch.full_like(low, geom.length - 1), low)
    high = torch.where(at_edge, low, low + 1)
    frac = torch.where(at_edge, torch.zeros_like(pos), pos - low.to(compute_dtype))
    scale = valid.to(compute_dtype) / grid  # the 1/(gy*gx) average factors into 1/gy and 1/gx
    w_low, w_high = (1 - frac) * scale, frac * scale

    # Tight row range from the actual samples (the planning bound may be a little wider).
    big = torch.full_like(low, geom.length)
    first = torch.where(valid, low, big).amin(dim=(1, 2)).clamp(max=geom.length - 1)
    last = torch.where(valid, high, torch.full_like(high, -1)).amax(dim=(1, 2))
    span = max(int((last - first).max()) + 1, 1)
    rel = torch.cat([low, high], dim=2) - first[:, None, None]
    rel = torch.where(torch.cat([valid, valid], dim=2), rel, torch.zeros_like(rel))
    weights = torch.zeros(num_boxes, geom.out_size, span, device=device, dtype=compute_dtype)
    weights.scatter_add_(2, rel, torch.cat([w_low, w_high], dim=2))
    return weights, first


def _roi_align_chunk(features_hwc, batch_index, geometry, compute_dtype) -> torch.Tensor:
    """(n boxes) -> (n, oh, ow, C) in compute_dtype."""
    gy, gx = geometry
    weights_y, first_y = _interpolation_matrix(gy, compute_dtype)  # (n, oh, Sy)
    weights_x, first_x = _interpolation_matrix(gx, compute_dtype)  # (n, ow, Sx)
    rows = (first_y[:, None] + torch.arange(weights_y.shape[2], device=first_y.device)).clamp(max=gy.length - 1)
    cols = (first_x[:, None] + torch.arange(weights_x.shape[2], device=first_x.device)).clamp(max=gx.length - 1)
    # (n, Sy, Sx, C): the part of each box's map its samples touch (padding rows/cols have zero weight)
    crop = features_hwc[batch_index[:, None, None], rows[:, :, None], cols[:, None, :]].to(compute_dtype)
    n, span_y, _, channels = crop.shape
    pooled_x = torch.matmul(weights_x[:, None], crop)  # (n, 1, ow, Sx) @ (n, Sy, Sx, C) -> (n, Sy, ow, C)
    out_w = weights_x.shape[1]
    pooled = torch.matmul(weights_y, pooled_x.reshape(n, span_y, out_w * channels))  # (n, oh, ow * C)
    return pooled.reshape(n, weights_y.shape[1], out_w, channels)


def _parse_output_size(output_size) -> tuple[int, int]:
    if isinstance(output_size, int) and not isinstance(output_size, bool):
        output_size = (output_size, output_size)
    if (
        not isinstance(output_size, (tuple, list))
        or len(output_size) != 2
        or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in output_size)
    ):
        raise ValueError(f"roi_align: output_size must be a positive int or (height, width), got {output_size!r}")
    return int(output_size[0]), int(output_size[1])


def _rois_from_boxes(boxes, num_images, device, dtype) -> torch.Tensor:
    """Validate boxes and return (K, 5) [batch_index, x1, y1, x2, y2] on `device` in `dtype`."""
    if isinstance(boxes, (list, tuple)):
        rois = []
        for i, b in enumerate(boxes):
            if not isinstance(b, torch.Tensor) or b.dim() != 2 or b.shape[1] != 4:
                raise ValueError(
                    f"roi_align: boxes[{i}] must be a (K_i, 4) tensor of [x1, y1, x2, y2], got {_describe(b)}"
                )
            if not b.is_floating_point():
                b = b.to(dtype)
            b = b.to(device=device, dtype=dtype)
            rois.append(torch.cat([torch.full_like(b[:, :1], i), b], dim=1))
        if len(boxes) > num_images:
            raise ValueError(f"roi_align: got box lists for {len(boxes)} images but features hold only {num_images}")
        rois = torch.cat(rois) if rois else torch.zeros(0, 5, device=device, dtype=dtype)
    elif isinstance(boxes, torch.Tensor):
        if boxes.dim() != 2 or boxes.shape[1] != 5:
            raise ValueError(
                f"roi_align: boxes must be (K, 5) [batch_index, x1, y1, x2, y2] or a list of (K_i, 4) tensors, "
                f"got {_describe(boxes)}"
            )
        rois = boxes.to(device=device, dtype=dtype)
    else:
        raise ValueError(f"roi_align: boxes must be a tensor or a list of tensors, got {type(boxes).__name__}")
    if rois.numel():
        if not bool(torch.isfinite(rois).all()):
            bad = (~torch.isfinite(rois).all(dim=1)).nonzero()[:, 0].tolist()
            raise ValueError(f"roi_align: non-finite box coordinates at rows {bad[:10]}")
        index = rois[:, 0]
        bad = ((index != torch.round(index)) | (index < 0) | (index >= num_images)).nonzero()[:, 0].tolist()
        if bad:
            raise ValueError(
                f"roi_align: batch index must be an integer in [0, {num_images}), bad rows {bad[:10]} "
                f"(values {index[bad[:10]].tolist()})"
            )
    return rois


def _describe(x) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


__all__ = ["roi_align", "roi_align_mean", "CHUNK_ELEMENTS"]
