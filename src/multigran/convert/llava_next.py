"""Hugging Face LLaVA-NeXT checkpoint (`LlavaNextForConditionalGeneration` directory) -> multigran `anyres` directory."""

import json
import logging
import shutil
from pathlib import Path

from transformers import AutoProcessor, LlavaNextConfig

from ..configuration import MultiGranConfig
from ..processing import MultiGranImageProcessor, MultiGranProcessor
from .common import (
    CheckpointMismatchError,
    SafetensorsCheckpoint,
    build_on_meta,
    canonical_tower_key,
    expected_state,
    write_checked,
)

logger = logging.getLogger(__name__)

# (Hugging Face prefix, multigran prefix): the transformers >= 4.52 layout, then the older one.
KEY_PREFIXES = [
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "visual.projector."),
    ("model.image_newline", "visual.image_newline"),
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("vision_tower.", "vision_tower."),
    ("multi_modal_projector.", "visual.projector."),
    ("image_newline", "visual.image_newline"),
    ("language_model.model.", "language_model.model."),
    ("language_model.lm_head.", "language_model.lm_head."),
]

IMAGE_PROCESSOR_FIELDS = (
    "size", "crop_size", "image_grid_pinpoints", "image_mean", "image_std", "resample", "do_resize", "do_center_crop",
    "do_rescale", "rescale_factor", "do_normalize", "do_pad", "do_convert_rgb",
)


def rename_key(key: str) -> str:
    for old, new in KEY_PREFIXES:
        if key.startswith(old):
            return canonical_tower_key(new + key[len(old):])
    return key  # reported as unexpected by the key check


def multigran_config_from_llava_next(hf_config: LlavaNextConfig) -> MultiGranConfig:
    text_config = hf_config.text_config.to_dict()
    # LLaVA-NeXT ties (or not) its lm_head at the top level; here the LM owns its head, so its config decides.
    text_config["tie_word_embeddings"] = bool(hf_config.tie_word_embeddings)
    return MultiGranConfig(
        vision_config=hf_config.vision_config.to_dict(),
        text_config=text_config,
        method="anyres",
        # transformers' unpad (`int(round(x, 7))`), which llava-hf checkpoints run with; the original LLaVA code base
        # truncates instead (convert/avg_llava.py sets "truncate")
        method_settings={"unpad_rounding": "hf"},
        image_token_id=hf_config.image_token_id,
        projector_hidden_act=hf_config.projector_hidden_act,
        multimodal_projector_bias=hf_config.multimodal_projector_bias,
        vision_feature_layer=hf_config.vision_feature_layer,
        vision_feature_select_strategy=hf_config.vision_feature_select_strategy,
        image_grid_pinpoints=[list(p) for p in hf_config.image_grid_pinpoints],
    )


def convert_processor(src_dir, config: MultiGranConfig, method: str = "anyres", method_settings=None):
    """LlavaNextProcessor files (tokenizer, image processor, chat template) -> MultiGranProcessor."""
    hf_processor = AutoProcessor.from_pretrained(src_dir)
    settings = {k: v for k, v in hf_processor.image_processor.to_dict().items() if k in IMAGE_PROCESSOR_FIELDS}
    image_processor = MultiGranImageProcessor(
        method=method, method_settings=method_settings, patch_size=config.vision_config.patch_size, **settings
    )
    tokenizer = hf_processor.tokenizer
    image_token = getattr(hf_processor, "image_token", "<image>")
    if tokenizer.convert_tokens_to_ids(image_token) != config.image_token_id:
        raise CheckpointMismatchError(
            f"the tokenizer maps {image_token!r} to id {tokenizer.convert_tokens_to_ids(image_token)} but the model's "
            f"image_token_index is {config.image_token_id}"
        )
    return MultiGranProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=hf_processor.chat_template,
        image_token=image_token,
    )


def from_llava_next(src_dir, dst_dir) -> Path:
    """Converts a Hugging Face LLaVA-NeXT directory (config, safetensors shards, processor files) into `dst_dir`.

    Weights are streamed tensor by tensor; every key is checked against the multigran model before anything is
    written, and a mismatch fails naming the missing, unexpected or mis-shaped keys.
    """
    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    config_path = src_dir / "config.json"
    if not config_path.is_file():
        raise CheckpointMismatchError(f"{src_dir} has no config.json: not a Hugging Face checkpoint directory")
    model_type = json.loads(config_path.read_text()).get("model_type")
    if model_type != "llava_next":
        raise CheckpointMismatchError(f"{config_path} has model_type {model_type!r}, expected 'llava_next'")
    config = multigran_config_from_llava_next(LlavaNextConfig.from_pretrained(src_dir))

    model = build_on_meta(config)
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    checkpoint = SafetensorsCheckpoint(src_dir)
    sources = {}
    for key in checkpoint.keys():
        new = rename_key(key)
        if new not in tied:  # a tied lm_head saved anyway is skipped: the LM re-ties it on load
            sources[new] = (checkpoint, key)
    write_checked(sources, expected_state(model), dst_dir, source=str(src_dir))

    config.save_pretrained(dst_dir)
    if (src_dir / "generation_config.json").is_file():
        shutil.copy(src_dir / "generation_config.json", dst_dir / "generation_config.json")
    convert_processor(src_dir, config, method_settings=config.method_settings).save_pretrained(dst_dir)
    logger.info("converted %s -> %s (%d tensors)", src_dir, dst_dir, len(sources))
    return dst_dir
