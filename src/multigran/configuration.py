"""MultiGranConfig: one config for every granularity method (plain data, as Hugging Face configs are)."""

from dataclasses import fields
from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PretrainedConfig
from transformers.configuration_utils import SubConfigSpec

# LLaVA-NeXT's AnyRes resolutions, (height, width) in Hugging Face order (the original LLaVA code stores (width, height)).
# Source: llava-hf/llava-v1.6-* configs.
DEFAULT_GRID_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]

# CLIP ViT-L/14 at 336 px (openai/clip-vit-large-patch14-336), the vision tower of every paper implemented here.
CLIP_L_336 = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    patch_size=14,
    image_size=336,
    hidden_act="quick_gelu",
)


@strict
class MultiGranConfig(PretrainedConfig):
    r"""
    Configuration of a [`MultiGranForConditionalGeneration`]: a vision tower, a visual pipeline chosen by `method`,
    and any Hugging Face causal LM.

    Args:
        vision_config (`dict` or `PretrainedConfig`): a CLIP or SigLIP vision config (default CLIP ViT-L/14-336).
        text_config (`dict` or `PretrainedConfig`): a causal-LM config (Llama, Mistral, Qwen2, ...; default Llama).
        method (`str`): the visual pipeline: `"anyres"` (LLaVA-NeXT), `"avg"`, `"mg"` or `"uhd"`.
        method_settings (`dict`): settings of the method, parsed and validated by the method's own `Settings`
            dataclass in `multigran/pipelines/<method>.py` (unknown keys are rejected there).
        image_token_id (`int`): id of the image placeholder token in the tokenizer.
        projector_hidden_act (`str`): activation between the two projector layers.
        multimodal_projector_bias (`bool`): whether the projector layers have biases.
        vision_feature_layer (`int` or `list[int]`): hidden layer(s) of the vision tower used as features; a list
            concatenates the layers on the channel axis.
        vision_feature_select_strategy (`str`): `"default"` drops the CLS token, `"full"` keeps every token.
        image_grid_pinpoints (`list[list[int]]`): AnyRes resolutions in (height, width) order.
    """

    model_type = "multigran"
    attribute_map = {"image_token_index": "image_token_id"}
    sub_configs_defaults = {
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="clip_vision_model", init_kwargs=CLIP_L_336),
    }

    vision_config: dict | PretrainedConfig | None = None
    text_config: dict | PretrainedConfig | None = None
    method: str = "anyres"
    method_settings: dict | None = None
    image_token_id: int = 32000
    projector_hidden_act: str = "gelu"
    multimodal_projector_bias: bool = True
    vision_feature_layer: int | list[int] = -2
    vision_feature_select_strategy: Literal["default", "full"] = "default"
    image_grid_pinpoints: list | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.image_grid_pinpoints is None:
            self.image_grid_pinpoints = [list(p) for p in DEFAULT_GRID_PINPOINTS]
        if self.method_settings is None:
            self.method_settings = {}


def parse_method_settings(settings_class, config):
    """Builds a method's settings dataclass from `config.method_settings`, rejecting unknown keys."""
    values = dict(config.method_settings or {})
    known = {f.name for f in fields(settings_class)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(
            f"unknown method_settings for method {config.method!r}: {unknown}; known settings: {sorted(known)}"
        )
    return settings_class(**values)


__all__ = ["MultiGranConfig", "parse_method_settings", "DEFAULT_GRID_PINPOINTS", "CLIP_L_336"]
