"""Released AVG-LLaVA checkpoints (LLaVA code-base layout, e.g. zhibinlan/AVG-LLaVA) -> multigran `avg` directory.

Source layout (shared/spec/avg-llava.md): `config.json` with model_type "llava_llama" (Llama fields at the top level,
`mm_*` settings, `vis_token_granularity`, `router_select`), safetensors keys `model.embed_tokens`, `model.layers.*`,
`model.norm`, `lm_head`, `model.mm_projector.{0,2}`, `model.image_newline`,
`model.vision_tower.vision_tower.vision_model.*` (HF CLIP keys) and the router under `model.router.`
(`merger.self_attn.in_proj_*` packed Q;K;V, or split q/k/v projections, which are packed here).
The tokenizer is the LLM's; LLaVA inserts images by a negative index, so `<image>` is added as a special token whose id
may lie outside the LM vocabulary (the model never embeds or predicts it).
"""

import json
import logging
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer

from ..configuration import CLIP_L_336, MultiGranConfig
from ..data.templates import inference_chat_template
from ..pipelines.anyres import PATCH_MERGES
from ..pipelines.avg import DEFAULT_TOP_K, AvgSettings
from ..processing import MultiGranImageProcessor, MultiGranProcessor
from .common import (
    CheckpointMismatchError,
    SafetensorsCheckpoint,
    build_on_meta,
    canonical_tower_key,
    expected_state,
    tower_weights_from,
    write_checked,
)

logger = logging.getLogger(__name__)

# Keys of the LLaVA code base's config that are not the LLM's.
_NOT_LLM = ("mm_", "image_", "vis_", "router", "tokenizer_", "tune_", "freeze_", "use_mm", "unfreeze", "filtered_",
            "ce_loss", "rank_loss", "margin", "architectures", "model_type", "_name_or_path", "transformers_version")

_PREFIXES = [  # (released prefix, multigran prefix)
    ("model.vision_tower.vision_tower.", "vision_tower."),
    ("model.mm_projector.0.", "visual.projector.linear_1."),
    ("model.mm_projector.2.", "visual.projector.linear_2."),
    ("model.image_newline", "visual.image_newline"),
    ("model.router.", "visual.router."),
    ("model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
]

_SPLIT_ATTENTION = ("q_proj", "k_proj", "v_proj")


def rename_key(key: str) -> str:
    for old, new in _PREFIXES:
        if key.startswith(old):
            return canonical_tower_key(new + key[len(old):])
    return key


def config_from_release(release: dict, vision_config=None, config_file="config.json") -> MultiGranConfig:
    """The released LLaVA-style config.json -> MultiGranConfig (method "avg", compat on, the release's unpad rounding,
    merge type and granularity levels). `config_file` names the file in errors."""
    if release.get("model_type") not in ("llava_llama", "llava_mistral", "llava_qwen"):
        raise CheckpointMismatchError(f"{config_file}: model_type {release.get('model_type')!r} is not an AVG-LLaVA/LLaVA-NeXT "
                                      "release (llava_llama, llava_mistral or llava_qwen)")
    llm_type = release["model_type"].split("_", 1)[1].replace("qwen", "qwen2")
    text = {k: v for k, v in release.items() if not k.startswith(_NOT_LLM)}
    text_config = AutoConfig.for_model(llm_type, **text)
    if vision_config is None:
        tower = str(release.get("mm_vision_tower", ""))
        if "clip-vit-large-patch14-336" not in tower:
            raise CheckpointMismatchError(
                f"the release's vision tower is {tower!r}: pass clip_dir (a Hugging Face CLIP directory) so its "
                "config is known"
            )
        vision_config = AutoConfig.for_model("clip_vision_model", **CLIP_L_336)
    select = release.get("mm_vision_select_feature", "patch")
    if select not in ("patch", "cls_patch"):
        raise CheckpointMismatchError(f"mm_vision_select_feature {select!r} is not supported (patch or cls_patch)")
    check_release_layout(release)
    # The LLaVA code stores AnyRes pinpoints as (width, height); transformers (and multigran) as (height, width).
    pinpoints = [[h, w] for w, h in release.get("image_grid_pinpoints", [[336, 672], [672, 336], [672, 672],
                                                                          [1008, 336], [336, 1008]])]
    grid = vision_config.image_size // vision_config.patch_size
    router = bool(release.get("router_select", False))  # the release builds a router only then (llava_arch.py:45)
    released_levels = release.get("vis_token_granularity")
    settings = {"compat": True, "use_router": router, "top_k": int(release.get("filtered_text_num", DEFAULT_TOP_K)),
                # the original LLaVA code's unpad (`int()`, llava_arch.py:132,137) and merge type
                "unpad_rounding": "truncate", "patch_merge": release.get("mm_patch_merge_type", "flat")}
    try:
        if released_levels is not None:
            if not isinstance(released_levels, list) or not all(isinstance(t, int) for t in released_levels):
                raise ValueError("it must be a list of token counts per crop")
            settings["levels"] = list(released_levels)
        levels = [tokens for tokens, _, _ in AvgSettings(**settings).level_geometry(grid)]
    except ValueError as error:
        raise CheckpointMismatchError(f"vis_token_granularity {released_levels!r}: {error}") from None
    settings["granularity"] = "auto" if router else levels[-1]
    return MultiGranConfig(
        vision_config=vision_config.to_dict(),
        text_config=text_config.to_dict(),
        method="avg",
        method_settings=settings,
        vision_feature_layer=release.get("mm_vision_select_layer", -2),
        vision_feature_select_strategy="default" if select == "patch" else "full",
        image_grid_pinpoints=pinpoints,
    )


def check_release_layout(release: dict) -> None:
    """Refuses, by name, the release's settings that multigran does not reproduce. Missing keys take the release
    code's defaults (`llava_arch.py:256-257`, `multimodal_projector/builder.py:34`)."""
    merge = release.get("mm_patch_merge_type", "flat")
    if merge not in PATCH_MERGES:
        raise CheckpointMismatchError(f"mm_patch_merge_type {merge!r} is not supported (one of {list(PATCH_MERGES)})")
    if merge == "flat" and release.get("router_select", False):
        raise CheckpointMismatchError(
            "mm_patch_merge_type 'flat' (the release's default when the key is missing) with router_select: the "
            "release never runs its router on flat features (llava/model/llava_arch.py:258-259), so this checkpoint's "
            "router was never used; convert a spatial_unpad checkpoint, or one with router_select false")
    aspect = release.get("image_aspect_ratio", "square")
    if aspect != "anyres":
        raise CheckpointMismatchError(
            f"image_aspect_ratio {aspect!r} is not supported: multigran's avg processor does AnyRes (a base view and "
            "tiles); the release preprocesses 'pad' and 'square' as one crop (llava/mm_utils.py:166-182), which it "
            "does not reproduce (image_aspect_ratio defaults to 'square' when the key is missing)")
    projector = release.get("mm_projector_type", "linear")
    if projector != "mlp2x_gelu":
        raise CheckpointMismatchError(
            f"mm_projector_type {projector!r} is not supported: multigran's projector is mlp2x_gelu (Linear, GELU, "
            "Linear); the release's 'linear', 'identity' and other 'mlpNx_gelu' projectors "
            "(llava/model/multimodal_projector/builder.py:33-51) have other layers (mm_projector_type defaults to "
            "'linear' when the key is missing)")


def _pack_split_attention(checkpoint, renamed, extra):
    """Split q/k/v projections of the router's merger (if a source has them) -> the packed in_proj of PyTorch."""
    prefix = "visual.router.merger.self_attn."
    for kind in ("weight", "bias"):
        parts = [f"{prefix}{name}.{kind}" for name in _SPLIT_ATTENTION]
        if all(part in renamed for part in parts):
            extra[f"{prefix}in_proj_{kind}"] = torch.cat([checkpoint.tensor(renamed.pop(part)) for part in parts])


def from_avg_llava(src_dir, dst_dir, clip_dir=None) -> Path:
    """Converts a released AVG-LLaVA directory (config, safetensors, tokenizer) into a multigran directory.

    `clip_dir`: a Hugging Face CLIP (vision) directory, needed when the release's config does not name CLIP-L/336 or
    its weights lack the vision tower (they are then taken from there). Keys are checked before anything is written.
    """
    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    config_path = src_dir / "config.json"
    if not config_path.is_file():
        raise CheckpointMismatchError(f"{src_dir} has no config.json: not a released checkpoint directory")
    vision_config = None
    if clip_dir is not None:
        clip_config = AutoConfig.from_pretrained(clip_dir)
        vision_config = getattr(clip_config, "vision_config", clip_config)
    config = config_from_release(json.loads(config_path.read_text()), vision_config, config_file=config_path)

    tokenizer = AutoTokenizer.from_pretrained(src_dir)
    if "<image>" not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    config.image_token_id = tokenizer.convert_tokens_to_ids("<image>")

    model = build_on_meta(config)
    expected = expected_state(model)
    checkpoint = SafetensorsCheckpoint(src_dir)
    renamed = {rename_key(key): key for key in checkpoint.keys()}
    extra = {}
    _pack_split_attention(checkpoint, renamed, extra)
    sources = {new: (checkpoint, old) for new, old in renamed.items()}
    if clip_dir is not None and not any(key.startswith("vision_tower.") for key in renamed):
        sources.update(tower_weights_from(clip_dir))
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    sources = {key: value for key, value in sources.items() if key not in tied}
    write_checked(sources, expected, dst_dir, source=str(src_dir), extra=extra)
    config.save_pretrained(dst_dir)
    if (src_dir / "generation_config.json").is_file():
        shutil.copy(src_dir / "generation_config.json", dst_dir / "generation_config.json")
    size = config.vision_config.image_size
    image_processor = MultiGranImageProcessor(
        method="avg", method_settings=config.method_settings, patch_size=config.vision_config.patch_size,
        size={"shortest_edge": size}, crop_size={"height": size, "width": size},
        image_grid_pinpoints=config.image_grid_pinpoints,
    )
    MultiGranProcessor(image_processor=image_processor, tokenizer=tokenizer,
                       chat_template=inference_chat_template("vicuna_v1")).save_pretrained(dst_dir)
    logger.info("converted %s -> %s (%d tensors)", src_dir, dst_dir, len(sources) + len(extra))
    return dst_dir
