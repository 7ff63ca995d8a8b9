"""A new multigran model from released parts: a Hugging Face CLIP/SigLIP tower + a Hugging Face causal LM (+ the
method's own pretrained parts, e.g. MG-LLaVA's ConvNeXt), with the method's new modules freshly initialised.
This is the `model:` a stage-1 recipe starts from (`multigran init`).

Weights are streamed into the output shards (nothing 7B-sized is built in memory); only the visual pipeline is
instantiated, to initialise the modules that no checkpoint provides (projector, newline, router, fusion, ...).
"""

import logging
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer

from ..configuration import DEFAULT_GRID_PINPOINTS, MultiGranConfig
from ..pipelines import build_pipeline, settings_for
from ..processing import MultiGranImageProcessor, MultiGranProcessor
from .common import (
    CheckpointMismatchError,
    SafetensorsCheckpoint,
    build_on_meta,
    expected_state,
    tower_weights_from,
    write_checked,
)

logger = logging.getLogger(__name__)


def _llm_sources(llm_dir) -> dict:
    checkpoint = SafetensorsCheckpoint(llm_dir)
    return {f"language_model.{key}": (checkpoint, key) for key in checkpoint.keys()}


def _image_processor_settings(vision_dir, vision_config) -> dict:
    """Mean/std (and the tile size) from the tower's own preprocessor config when it has one."""
    settings = {}
    path = Path(vision_dir) / "preprocessor_config.json"
    if path.is_file():
        from ..json_io import read_json_file

        data = read_json_file(path)
        data = data if isinstance(data, dict) else {}
        for key in ("image_mean", "image_std"):
            if key in data:
                settings[key] = data[key]
    size = vision_config.image_size
    settings.update(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return settings


def _part_config(folder, option: str):
    """The Hugging Face config of a part's directory; a missing folder or broken config.json is named."""
    from ..loading import check_json_files

    if not (Path(folder) / "config.json").is_file():
        raise ValueError(f"{option} {folder}: not a Hugging Face model directory (no config.json)")
    check_json_files(folder)
    try:
        return AutoConfig.from_pretrained(folder)
    except (KeyError, ValueError, TypeError) as error:
        raise ValueError(f"{option} {folder}/config.json: {' '.join(str(error).split())[:300]}") from None


def compose(out_dir, method: str, vision_dir, llm_dir, method_settings: dict | None = None, hires_dir=None,
            chat_template: str | None = None, seed: int = 0, **config_fields) -> Path:
    """Writes a trainable multigran model directory (weights, config, processor) to `out_dir`.

    vision_dir: a Hugging Face CLIP/SigLIP (vision) directory; llm_dir: a causal-LM directory with its tokenizer;
    hires_dir: MG-LLaVA's high-res ConvNeXt (OpenCLIP file/folder or Hugging Face ConvNext directory);
    config_fields: extra MultiGranConfig fields (vision_feature_layer, image_grid_pinpoints, ...).
    `<image>` is added to the tokenizer when missing; its id may lie outside the LM's vocabulary (never embedded).
    """
    out_dir = Path(out_dir)
    vision_config = _part_config(vision_dir, "--vision")
    vision_config = getattr(vision_config, "vision_config", vision_config)  # a full CLIP model: its vision half
    if not hasattr(vision_config, "patch_size") or not hasattr(vision_config, "image_size"):
        raise ValueError(f"--vision {vision_dir}: a {vision_config.model_type!r} model is not a CLIP/SigLIP vision tower")
    text_config = _part_config(llm_dir, "--llm")
    try:
        tokenizer = AutoTokenizer.from_pretrained(llm_dir)
    except (OSError, ValueError, TypeError) as error:
        raise ValueError(f"--llm {llm_dir}: cannot load its tokenizer: {' '.join(str(error).split())[:300]}") from None
    if "<image>" not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    if vision_config.model_type.startswith("siglip"):
        config_fields.setdefault("vision_feature_select_strategy", "full")
    # LLaVA-NeXT's 1x2, 2x1, 2x2, 3x1, 1x3 tile layouts, in the tower's own tile size.
    tile = vision_config.image_size
    config_fields.setdefault("image_grid_pinpoints", [[h // 336 * tile, w // 336 * tile] for h, w in DEFAULT_GRID_PINPOINTS])
    config = MultiGranConfig(
        vision_config=vision_config.to_dict(), text_config=text_config.to_dict(), method=method,
        method_settings=settings_for(method, method_settings, tokenizer), image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        **config_fields,
    )
    expected = expected_state(build_on_meta(config))

    sources = {**tower_weights_from(vision_dir), **_llm_sources(llm_dir)}
    tied = {k for k in sources if k not in expected and k.endswith("lm_head.weight")}
    for key in tied:  # a tied head saved anyway: the LM re-ties it on load
        sources.pop(key)
    torch.manual_seed(seed)
    visual = build_pipeline(config)  # the method's modules, initialised as their papers say
    for module in visual.modules():
        if type(module).__module__.startswith("multigran.") and hasattr(module, "reset_parameters"):
            module.reset_parameters()
    extra = {f"visual.{key}": value for key, value in visual.state_dict().items()}
    if hasattr(visual, "hires_tower") and hires_dir is None:
        raise ValueError(f"method {method!r} needs its pretrained high-res tower: pass hires_dir (MG-LLaVA: OpenCLIP "
                         "convnext_large_d_320)")
    if hires_dir is not None:
        from ..vision.convnext import load_open_clip_convnext

        hires = load_open_clip_convnext(hires_dir) if not (Path(hires_dir) / "config.json").is_file() else None
        if hires is None:
            from transformers import ConvNextModel

            hires = ConvNextModel.from_pretrained(hires_dir)
        for key, value in hires.state_dict().items():
            name = f"visual.hires_tower.{key}"
            if name in extra:
                extra[name] = value
    missing_parts = sorted({k.split(".")[0] for k in set(expected) - set(sources) - set(extra)})
    if missing_parts:
        raise CheckpointMismatchError(f"no weights for {missing_parts}: check vision_dir and llm_dir")
    extra = {k: v for k, v in extra.items() if k in expected}
    write_checked(sources, expected, out_dir, source=f"{vision_dir} + {llm_dir}", extra=extra)
    config.save_pretrained(out_dir)
    image_processor = MultiGranImageProcessor(
        method=method, method_settings=config.method_settings, patch_size=vision_config.patch_size,
        image_grid_pinpoints=config.image_grid_pinpoints, **_image_processor_settings(vision_dir, vision_config),
    )
    template = chat_template if chat_template is not None else getattr(tokenizer, "chat_template", None)
    MultiGranProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=template).save_pretrained(
        out_dir)
    logger.info("composed %s: %s + %s, method %s", out_dir, vision_dir, llm_dir, method)
    return out_dir
