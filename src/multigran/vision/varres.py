"""Variable-resolution ViT encoding (LLaVA-UHD v2 / LLaVA-UHD `AdaptCLIPVisionEmbeddings`).

Every image (slice or overview) is patch-embedded at its own size; the tower's square position table (24x24 + CLS for
CLIP-L/336) is bicubically interpolated (align_corners=False) to the image's (h, w) patch grid, the CLS position kept
as is; the sequences are zero-padded to the longest one and masked, and the whole batch goes through ONE encoder pass.

Works on the Hugging Face towers of transformers 5.x, whose vision models are flat: `CLIPVisionModel` (embeddings with
`class_embedding`, `pre_layrnorm`, `encoder.layers`) and `SiglipVisionModel` (no CLS, no pre-norm). The tower's own
submodules do all the work, so attention, dtypes and gradient checkpointing are the tower's.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# Attention implementations that accept a (B, 1, 1, L) additive float mask. Others (flash attention) only work here
# when no padding is needed, i.e. when all images of the call have the same patch grid.
_MASKABLE_ATTENTION = ("eager", "sdpa")


def _tower_parts(vision_model: nn.Module):
    embeddings = getattr(vision_model, "embeddings", None)
    encoder = getattr(vision_model, "encoder", None)
    if (
        embeddings is None
        or not isinstance(getattr(embeddings, "patch_embedding", None), nn.Conv2d)
        or not isinstance(getattr(embeddings, "position_embedding", None), nn.Embedding)
        or not hasattr(encoder, "layers")
    ):
        raise TypeError(
            f"encode_variable_resolution: unsupported vision tower {type(vision_model).__name__}; expected a "
            "transformers 5.x CLIPVisionModel or SiglipVisionModel (with .embeddings.patch_embedding, "
            ".embeddings.position_embedding and .encoder.layers)"
        )
    class_embedding = getattr(embeddings, "class_embedding", None)
    pre_norm = getattr(vision_model, "pre_layrnorm", None)  # CLIP only
    return embeddings, class_embedding, pre_norm, encoder.layers


def interpolate_position_table(position_table: torch.Tensor, grid: tuple[int, int], has_cls: bool) -> torch.Tensor:
    """Position embeddings for an (h, w) patch grid: (n_cls + h*w, C), from a square table (n_cls + side^2, C).

    The patch part is resized bicubically (align_corners=False) in the table's dtype, at least float32 (a float64
    table in float64; a bf16/fp16 table in float32, rounded once on the way back - the release interpolates its bf16
    table directly, adapt_clip_vision_model.py:63-72, whose CUDA kernel accumulates in float32: expected to agree up to
    operation order, not checked on a GPU here). The native grid is returned untouched; CLS (when present) keeps its
    own position.
    """
    n_cls = int(has_cls)
    cls_part, patch_part = position_table[:n_cls], position_table[n_cls:]
    side = math.isqrt(patch_part.shape[0])
    if side * side != patch_part.shape[0]:
        raise ValueError(f"position table of {patch_part.shape[0]} patch positions is not a square grid")
    height, width = grid
    if (height, width) != (side, side):
        compute = torch.promote_types(position_table.dtype, torch.float32)
        square = patch_part.to(compute).T.reshape(1, -1, side, side)  # (1, C, side, side)
        resized = F.interpolate(square, size=(height, width), mode="bicubic", align_corners=False)
        patch_part = resized.reshape(-1, height * width).T.to(position_table.dtype)  # (h*w, C)
    return torch.cat([cls_part, patch_part], dim=0)


def encode_variable_resolution(
    vision_model: nn.Module,
    pixel_values_list: list[torch.Tensor],
    feature_layer: int = -2,
    select_strategy: str = "default",
) -> list[torch.Tensor]:
    """Encode images of different sizes in one ViT pass; returns a list of (h_i, w_i, C) patch-feature grids.

    pixel_values_list: normalised images (3, H_i, W_i), H_i and W_i multiples of the patch size.
    feature_layer: index into HF's `hidden_states` (0 = embeddings after the pre-norm, -1 = last layer, before the
        post-layernorm); only the layers up to it are run. LLaVA uses -2.
    select_strategy: "default" drops the CLS token (CLIP); "full" keeps everything, which yields an (h, w) grid only
        for towers without CLS (SigLIP) - for those both strategies give the same grid.
    """
    embeddings, class_embedding, pre_norm, layers = _tower_parts(vision_model)
    if select_strategy not in ("default", "full"):
        raise ValueError(
            f"encode_variable_resolution: select_strategy must be 'default' or 'full', got {select_strategy!r}"
        )
    if select_strategy == "full" and class_embedding is not None:
        raise ValueError(
            "encode_variable_resolution: select_strategy='full' keeps the CLS token, which has no place in an (h, w) "
            "patch grid; use 'default' with CLIP towers"
        )
    num_states = len(layers) + 1
    valid_layer = isinstance(feature_layer, int) and not isinstance(feature_layer, bool)
    if not valid_layer or not -num_states <= feature_layer < num_states:
        raise ValueError(
            f"encode_variable_resolution: feature_layer must be an int in [{-num_states}, {num_states - 1}] "
            f"for a tower with {len(layers)} layers, got {feature_layer!r}"
        )
    if not isinstance(pixel_values_list, (list, tuple)) or len(pixel_values_list) == 0:
        raise ValueError("encode_variable_resolution: pixel_values_list must be a non-empty list of (3, H, W) tensors")
    patch_size = embeddings.patch_embedding.kernel_size[0]
    in_channels = embeddings.patch_embedding.in_channels
    for i, pixels in enumerate(pixel_values_list):
        if not isinstance(pixels, torch.Tensor) or pixels.dim() != 3 or pixels.shape[0] != in_channels:
            shape = tuple(pixels.shape) if isinstance(pixels, torch.Tensor) else type(pixels).__name__
            raise ValueError(
                f"encode_variable_resolution: image {i} must be a ({in_channels}, H, W) tensor, got {shape}"
            )
        if pixels.shape[1] % patch_size or pixels.shape[2] % patch_size or min(pixels.shape[1:]) == 0:
            raise ValueError(
                f"encode_variable_resolution: image {i} has size {tuple(pixels.shape[1:])}; height and width must be "
                f"positive multiples of the patch size {patch_size}"
            )

    weight = embeddings.patch_embedding.weight
    n_cls = int(class_embedding is not None)
    grids = [(p.shape[1] // patch_size, p.shape[2] // patch_size) for p in pixel_values_list]
    lengths = [n_cls + h * w for h, w in grids]
    max_len = max(lengths)
    hidden = weight.new_zeros(len(pixel_values_list), max_len, weight.shape[0])  # (B, L_max, C), zero padding

    # Patch-embed same-sized images together (all slices of an image share one size).
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, pixels in enumerate(pixel_values_list):
        by_size.setdefault(tuple(pixels.shape[1:]), []).append(i)
    position_table = embeddings.position_embedding.weight
    for indices in by_size.values():
        pixels = torch.stack([pixel_values_list[i] for i in indices]).to(device=weight.device, dtype=weight.dtype)
        patches = embeddings.patch_embedding(pixels).flatten(2).transpose(1, 2)  # (n, h*w, C)
        if n_cls:
            patches = torch.cat([class_embedding.expand(len(indices), 1, -1), patches], dim=1)  # (n, 1 + h*w, C)
        sequence = patches + interpolate_position_table(position_table, grids[indices[0]], has_cls=bool(n_cls))
        hidden[indices, : sequence.shape[1]] = sequence

    if pre_norm is not None:
        hidden = pre_norm(hidden)

    attention_mask = None
    if any(length != max_len for length in lengths):
        implementation = getattr(getattr(vision_model, "config", None), "_attn_implementation", "eager") or "eager"
        if implementation not in _MASKABLE_ATTENTION:
            raise ValueError(
                f"encode_variable_resolution: images of different sizes need a padding mask, which the vision tower's "
                f"attention implementation {implementation!r} does not take here; use one of {_MASKABLE_ATTENTION} "
                "(e.g. vision_model.set_attn_implementation('sdpa'))"
            )
        lengths_t = torch.tensor(lengths, device=hidden.device)
        valid = torch.arange(max_len, device=hidden.device)[None, :] < lengths_t[:, None]  # (B, L_max)
        # (B, 1, 1, L) additive mask: padded keys get the dtype's minimum so no real token attends to them.
        attention_mask = torch.zeros(valid.shape, dtype=hidden.dtype, device=hidden.device)
        attention_mask = attention_mask.masked_fill(~valid, torch.finfo(hidden.dtype).min)[:, None, None, :]

    for layer in layers[: feature_layer % num_states]:
        hidden = layer(hidden, attention_mask)

    return [hidden[i, n_cls : n_cls + h * w].reshape(h, w, -1) for i, (h, w) in enumerate(grids)]
