"""multigran `anyres` directory -> native Hugging Face LLaVA-NeXT checkpoint (`LlavaNextForConditionalGeneration`).

The inverse of `from_llava_next`: the written directory loads with transformers alone (`AutoModelForImageTextToText`,
`AutoProcessor`), so an anyres model runs unchanged wherever transformers' LLaVA-NeXT does (vLLM, SGLang, lmms-eval's
`llava_hf`). Only `anyres` maps onto LLaVA-NeXT: the other methods have modules (router, fusion, JBU, window
attention) that LLaVA-NeXT lacks.
"""

import json
import logging
import shutil
from pathlib import Path

import torch
from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

from ..configuration import MultiGranConfig
from .common import CheckpointMismatchError, SafetensorsCheckpoint, check_keys, expected_state, write_checked
from .llava_next import IMAGE_PROCESSOR_FIELDS

logger = logging.getLogger(__name__)

# (multigran prefix, transformers >= 5 LLaVA-NeXT prefix)
EXPORT_PREFIXES = [
    ("vision_tower.", "model.vision_tower."),
    ("visual.projector.", "model.multi_modal_projector."),
    ("visual.image_newline", "model.image_newline"),
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
]


def export_key(key: str) -> str:
    for old, new in EXPORT_PREFIXES:
        if key.startswith(old):
            return new + key[len(old):]
    return key  # reported as unexpected by the key check


# anyres settings transformers' LLaVA-NeXT computes with (its unpad rounding and its spatial-unpad merge).
LLAVA_NEXT_SETTINGS = {"unpad_rounding": "hf", "patch_merge": "spatial_unpad"}


def check_llava_next_geometry(config: MultiGranConfig, src_dir):
    """An anyres model whose settings transformers' LLaVA-NeXT would not reproduce (the original LLaVA code base's
    rounding or merge) is refused: the export would load but give other token counts and answers."""
    from ..pipelines.anyres import AnyResSettings

    defaults = AnyResSettings()
    settings = config.method_settings or {}
    different = {k: settings.get(k, getattr(defaults, k)) for k in LLAVA_NEXT_SETTINGS
                 if settings.get(k, getattr(defaults, k)) != LLAVA_NEXT_SETTINGS[k]}
    if different:
        raise ValueError(
            f"{src_dir}: method_settings {different} differ from what transformers' LLaVA-NeXT computes "
            f"({LLAVA_NEXT_SETTINGS}): the exported model would count and merge visual tokens differently"
        )


def llava_next_config(config: MultiGranConfig) -> LlavaNextConfig:
    text = config.text_config
    if not 0 <= config.image_token_id < text.vocab_size:
        raise ValueError(
            f"the image token id {config.image_token_id} lies outside the language model's vocabulary "
            f"({text.vocab_size} tokens): LLaVA-NeXT embeds the placeholder, so add <image> to the vocabulary first"
        )
    return LlavaNextConfig(
        vision_config=config.vision_config.to_dict(),
        text_config=text.to_dict(),
        image_token_index=config.image_token_id,
        projector_hidden_act=config.projector_hidden_act,
        multimodal_projector_bias=config.multimodal_projector_bias,
        vision_feature_layer=config.vision_feature_layer,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        image_grid_pinpoints=[list(p) for p in config.image_grid_pinpoints],
        tie_word_embeddings=bool(getattr(text, "tie_word_embeddings", False)),
    )


def export_processor(src_dir, config: MultiGranConfig) -> LlavaNextProcessor:
    """MultiGranProcessor files -> LlavaNextProcessor (PIL image processor: no torchvision needed to load it)."""
    from ..processing import MultiGranProcessor

    ours = MultiGranProcessor.from_pretrained(src_dir)
    fields = {k: v for k, v in ours.image_processor.to_dict().items() if k in IMAGE_PROCESSOR_FIELDS}
    image_processor = LlavaNextImageProcessorPil(**fields)
    has_cls = config.vision_config.model_type.startswith("clip")
    return LlavaNextProcessor(
        image_processor=image_processor, tokenizer=ours.tokenizer, patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=int(has_cls), chat_template=ours.chat_template, image_token=ours.image_token,
    )


def export_llava_next(src_dir, dst_dir) -> Path:
    """Writes the anyres model in `src_dir` as a transformers LLaVA-NeXT directory `dst_dir` (config, safetensors,
    processor files, generation config). Tensors are streamed one by one and every key is checked against
    `LlavaNextForConditionalGeneration` before anything is written."""
    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    config_path = src_dir / "config.json"
    if not config_path.is_file():
        raise CheckpointMismatchError(f"{src_dir} has no config.json: not a multigran model directory")
    model_type = json.loads(config_path.read_text()).get("model_type")
    if model_type != "multigran":
        raise CheckpointMismatchError(f"{config_path} has model_type {model_type!r}, expected 'multigran'")
    config = MultiGranConfig.from_pretrained(src_dir)
    if config.method != "anyres":
        raise ValueError(
            f"{src_dir} is a {config.method!r} model: only 'anyres' models are LLaVA-NeXT models (the others carry "
            "modules LLaVA-NeXT has no place for)"
        )
    check_llava_next_geometry(config, src_dir)
    hf_config = llava_next_config(config)
    hf_config.architectures = ["LlavaNextForConditionalGeneration"]  # what vLLM / SGLang dispatch on
    with torch.device("meta"):
        expected = expected_state(LlavaNextForConditionalGeneration(hf_config))

    checkpoint = SafetensorsCheckpoint(src_dir)
    sources = {export_key(key): (checkpoint, key) for key in checkpoint.keys()}
    for key in [k for k in sources if k.startswith("lm_head.") and k not in expected]:
        del sources[key]  # a tied head saved anyway: LLaVA-NeXT re-ties it on load
    try:
        check_keys({k: checkpoint.shape(old) for k, (_, old) in sources.items()}, expected, str(src_dir))
    except CheckpointMismatchError as error:
        raise CheckpointMismatchError(f"cannot export as LLaVA-NeXT: {error}") from None
    write_checked(sources, expected, dst_dir, source=str(src_dir))

    hf_config.save_pretrained(dst_dir)
    if (src_dir / "generation_config.json").is_file():
        shutil.copy(src_dir / "generation_config.json", dst_dir / "generation_config.json")
    export_processor(src_dir, config).save_pretrained(dst_dir)
    logger.info("exported %s -> %s (%d tensors)", src_dir, dst_dir, len(sources))
    return dst_dir


__all__ = ["export_llava_next"]
