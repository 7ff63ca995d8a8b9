"""High-resolution ConvNeXt encoder (MG-LLaVA's `visual_encoder_aux`) on Hugging Face `ConvNextModel`.

MG-LLaVA uses the image tower of OpenCLIP `convnext_large_d_320`
(laion/CLIP-convnext_large_d_320.laion2B-s29B-b131K-ft-soup) at 768x768, stem + 4 stages only: the trunk's final
norm/head and the CLIP projection head are dropped. ("_d" in OpenCLIP names = MLP projection head + deeper 16-layer
text tower; both are discarded here, the trunk is plain timm `convnext_large`.)

Outputs (release `OpenCLIPVisionTower.backbone`):
- `last_feat`: stage 3, (B, 1536, 24, 24) at 768 input; fused with the CLIP tokens by the Conv-Gate.
- `multi_stage`: the 4 stage maps bilinearly upsampled (align_corners=False, computed in fp32 and cast back, as the
  release) to the stage-0 size and concatenated: (B, 192+384+768+1536 = 2880, 192, 192); RoIAlign source for objects.

Weights come from the OpenCLIP checkpoint (timm key layout) through `convert_open_clip_convnext`.
"""

from __future__ import annotations

import logging
import os
import re

import torch
import torch.nn.functional as F
from transformers import ConvNextConfig, ConvNextModel

logger = logging.getLogger(__name__)

# timm `convnext_large` trunk (OpenCLIP config convnext_large_d_320.json: timm_model_name "convnext_large").
CONVNEXT_LARGE_DEPTHS = (3, 3, 27, 3)
CONVNEXT_LARGE_DIMS = (192, 384, 768, 1536)


def convnext_large_d_320_config(**overrides) -> ConvNextConfig:
    """HF config of the OpenCLIP `convnext_large_d_320` image trunk (patch-4 stem, timm LayerNorm eps 1e-6)."""
    settings = dict(
        num_channels=3,
        patch_size=4,
        num_stages=4,
        hidden_sizes=list(CONVNEXT_LARGE_DIMS),
        depths=list(CONVNEXT_LARGE_DEPTHS),
        hidden_act="gelu",
        layer_norm_eps=1e-6,  # only the (unused) final LayerNorm reads this; block norms are fixed at 1e-6 like timm
        # Stochastic depth, active in training mode only. OpenCLIP's config has timm_drop_path 0.1 and the release
        # trains with it on (MgSettings.hires_drop_path); 0 here: a frozen tower is deterministic unless asked.
        drop_path_rate=0.0,
        image_size=320,  # OpenCLIP training resolution (metadata only; MG-LLaVA runs it at 768)
    )
    settings.update(overrides)
    return ConvNextConfig(**settings)


def convnext_features(model: ConvNextModel, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run stem + stages of a frozen ConvNeXt and return `(last_feat, multi_stage)`.

    pixel_values (B, 3, H, W) -> last_feat (B, C3, H/32, W/32) and multi_stage (B, C0+C1+C2+C3, H/4, W/4).
    The final LayerNorm / pooler of `ConvNextModel` are not used (the release deletes them). Runs under no_grad: the
    release keeps this encoder frozen in every stage. A model built with drop_path_rate > 0 drops residual blocks at
    random in training mode (as the release's training, `openclip_encoder.py:60`) and never in eval mode.
    """
    if pixel_values.dim() != 4:
        raise ValueError(f"pixel_values must be (B, 3, H, W); got shape {tuple(pixel_values.shape)}")
    stem_weight = model.embeddings.patch_embeddings.weight
    pixel_values = pixel_values.to(device=stem_weight.device, dtype=stem_weight.dtype)
    with torch.no_grad():
        hidden = model.embeddings(pixel_values)  # (B, C0, H/4, W/4)
        stage_maps = []
        for stage in model.encoder.stages:
            hidden = stage(hidden)
            stage_maps.append(hidden)  # (B, C0, H/4, W/4), (B, C1, H/8, W/8), (B, C2, H/16, W/16), (B, C3, H/32, W/32)
        target_size = stage_maps[0].shape[-2:]
        # Release: stage 0 as is; the others upsampled in fp32 then cast back to the map's dtype.
        upsampled = [stage_maps[0]] + [
            F.interpolate(m.float(), size=target_size, mode="bilinear", align_corners=False).to(m.dtype)
            for m in stage_maps[1:]
        ]
        multi_stage = torch.cat(upsampled, dim=1)  # (B, C0+C1+C2+C3, H/4, W/4)
    return stage_maps[-1], multi_stage


# --- OpenCLIP (timm layout) -> HF ConvNextModel -------------------------------------------------------------------

_TRUNK_PREFIXES = ("visual.trunk.", "trunk.", "")  # OpenCLIP full model, its `visual` tower, a bare timm trunk
# Trunk parts the release deletes (head = final norm + pooling; norm_pre is Identity for convnext_large).
_DROPPED_TRUNK_PARTS = ("head.", "norm_pre.")

_KEY_RULES = [  # (timm key regex relative to the trunk, HF key template)
    (r"stem\.0\.(weight|bias)", "embeddings.patch_embeddings.{0}"),
    (r"stem\.1\.(weight|bias)", "embeddings.layernorm.{0}"),
    (r"stages\.(\d+)\.downsample\.([01])\.(weight|bias)", "encoder.stages.{0}.downsampling_layer.{1}.{2}"),
    (r"stages\.(\d+)\.blocks\.(\d+)\.conv_dw\.(weight|bias)", "encoder.stages.{0}.layers.{1}.dwconv.{2}"),
    (r"stages\.(\d+)\.blocks\.(\d+)\.norm\.(weight|bias)", "encoder.stages.{0}.layers.{1}.layernorm.{2}"),
    (r"stages\.(\d+)\.blocks\.(\d+)\.mlp\.fc1\.(weight|bias)", "encoder.stages.{0}.layers.{1}.pwconv1.{2}"),
    (r"stages\.(\d+)\.blocks\.(\d+)\.mlp\.fc2\.(weight|bias)", "encoder.stages.{0}.layers.{1}.pwconv2.{2}"),
    (r"stages\.(\d+)\.blocks\.(\d+)\.gamma", "encoder.stages.{0}.layers.{1}.layer_scale_parameter"),
]
_KEY_RULES = [(re.compile(pattern + r"$"), template) for pattern, template in _KEY_RULES]

# HF keys that have no counterpart in the trunk checkpoint and are never used by `convnext_features`.
_UNUSED_HF_KEYS = {"layernorm.weight", "layernorm.bias"}


def _trunk_prefix(state_dict: dict) -> str:
    for prefix in _TRUNK_PREFIXES:
        if f"{prefix}stem.0.weight" in state_dict:
            return prefix
    raise ValueError(
        "not an OpenCLIP/timm ConvNeXt state dict: no 'visual.trunk.stem.0.weight', 'trunk.stem.0.weight' or "
        f"'stem.0.weight' key (first keys: {sorted(state_dict)[:5]})"
    )


def convert_open_clip_convnext(state_dict: dict) -> dict:
    """Map OpenCLIP/timm ConvNeXt trunk keys to HF `ConvNextModel` keys.

    Keys outside the trunk (text tower, `visual.head.*` projection, logit_scale) and the trunk's `head.*` /
    `norm_pre.*` are dropped with one log line. An unknown key inside the trunk raises ValueError naming it.
    """
    prefix = _trunk_prefix(state_dict)
    converted, ignored, unknown = {}, [], []
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            ignored.append(key)
            continue
        local = key[len(prefix):]
        if local.startswith(_DROPPED_TRUNK_PARTS):
            ignored.append(key)
            continue
        for pattern, template in _KEY_RULES:
            match = pattern.match(local)
            if match:
                converted[template.format(*match.groups())] = value
                break
        else:
            if prefix or local.startswith(("stem.", "stages.")):
                unknown.append(key)
            else:  # bare timm trunk: other top-level keys (e.g. a classifier) are not part of stem + stages
                ignored.append(key)
    if unknown:
        raise ValueError(f"unexpected ConvNeXt trunk keys (no HF counterpart): {sorted(unknown)}")
    if ignored:
        groups = sorted({".".join(re.sub(r"\.\d+(\..*)?$", "", k).split(".")[:3]) for k in ignored})
        logger.info(
            "convert_open_clip_convnext: ignored %d keys outside stem + stages (%s)", len(ignored), ", ".join(groups)
        )
    return converted


def _config_from_converted(converted: dict) -> ConvNextConfig:
    """Infer depths / widths / patch size of a converted trunk (so convnext_base_w_320 etc. load too)."""
    stem = converted["embeddings.patch_embeddings.weight"]  # (C0, 3, p, p)
    num_stages = 1 + max(int(k.split(".")[2]) for k in converted if k.startswith("encoder.stages."))
    depths, dims = [], []
    for i in range(num_stages):
        blocks = {int(k.split(".")[4]) for k in converted if k.startswith(f"encoder.stages.{i}.layers.")}
        depths.append(len(blocks))
        dims.append(converted[f"encoder.stages.{i}.layers.0.dwconv.weight"].shape[0])
    return convnext_large_d_320_config(
        num_stages=num_stages, depths=depths, hidden_sizes=dims, patch_size=stem.shape[-1], num_channels=stem.shape[1]
    )


def read_state_dict(path: str | os.PathLike) -> dict:
    """Tensors of a `.safetensors` file or a torch pickle read with `weights_only=True` (never arbitrary objects)."""
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state_dict, dict) and isinstance(state_dict.get("state_dict"), dict):
        state_dict = state_dict["state_dict"]
    if not isinstance(state_dict, dict):
        raise ValueError(f"{path}: expected a state dict (names -> tensors), got {type(state_dict).__name__}")
    return state_dict


def load_open_clip_convnext(
    path_or_state_dict: str | os.PathLike | dict, config: ConvNextConfig | None = None
) -> ConvNextModel:
    """Build a `ConvNextModel` from an OpenCLIP checkpoint (`open_clip_pytorch_model.bin` or `.safetensors`).

    `config` defaults to one inferred from the checkpoint (equal to `convnext_large_d_320_config()` for the MG-LLaVA
    weights). Missing or unexpected keys raise ValueError naming them. The model is returned frozen, in eval mode.
    """
    state_dict = path_or_state_dict if isinstance(path_or_state_dict, dict) else read_state_dict(path_or_state_dict)
    converted = convert_open_clip_convnext(state_dict)
    config = config if config is not None else _config_from_converted(converted)
    model = ConvNextModel(config)
    expected = set(model.state_dict())
    missing = sorted(expected - set(converted) - _UNUSED_HF_KEYS)
    unexpected = sorted(set(converted) - expected)
    if missing or unexpected:
        raise ValueError(
            f"ConvNeXt checkpoint does not match the config (depths={list(config.depths)}, "
            f"hidden_sizes={list(config.hidden_sizes)}): missing keys {missing}; unexpected keys {unexpected}"
        )
    shape_errors = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(model.state_dict()[k].shape)}"
        for k, v in converted.items()
        if tuple(v.shape) != tuple(model.state_dict()[k].shape)
    ]
    if shape_errors:
        raise ValueError("ConvNeXt checkpoint shapes do not match the config: " + "; ".join(shape_errors))
    model.load_state_dict(converted, strict=False)
    model.requires_grad_(False)
    return model.eval()
