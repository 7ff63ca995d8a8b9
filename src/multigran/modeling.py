"""MultiGranForConditionalGeneration: vision tower -> visual pipeline -> tokens spliced into a Hugging Face causal LM."""

from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration import MultiGranConfig
from .pipelines import build_pipeline


@dataclass
class MultiGranCausalLMOutput(CausalLMOutputWithPast):
    """The LM's output plus, per image, the number of visual tokens it received (and the pipeline's report, if any)."""

    image_token_counts: list[int] | None = None
    visual_report: list[dict] | None = None


class MultiGranPreTrainedModel(PreTrainedModel):
    config: MultiGranConfig
    config_class = MultiGranConfig
    base_model_prefix = ""
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _skip_keys_device_placement = "cache"

    def _init_weights(self, module):
        super()._init_weights(module)
        # Our own modules carry their papers' initialisation (zero-init gates, Kaiming routers, ...) in
        # `reset_parameters`; it runs after the generic init of their children, so it has the last word.
        if type(module).__module__.startswith("multigran.") and hasattr(module, "reset_parameters"):
            module.reset_parameters()


class MultiGranForConditionalGeneration(MultiGranPreTrainedModel, GenerationMixin):
    """A LLaVA-style model whose visual tokens come from the pipeline named by `config.method`.

    Layout: `vision_tower` (Hugging Face CLIP/SigLIP vision model), `visual` (the method's pipeline: projector,
    newline, router, fusion, ...), `language_model` (any Hugging Face causal LM, with its own `lm_head`).
    """

    def __init__(self, config: MultiGranConfig):
        super().__init__(config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.visual = build_pipeline(config)
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        self.post_init()

    # Embeddings are the LM's: generation, resizing and tying go through it.
    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value):
        self.language_model.set_output_embeddings(value)

    @property
    def context_length(self) -> int | None:
        return getattr(self.config.text_config, "max_position_embeddings", None)

    def get_image_features(self, pixel_values, image_sizes, **visual_inputs) -> list[torch.Tensor]:
        """Per image, its visual tokens in the LLM's embedding space: list of (tokens_i, D)."""
        return self.visual(self.vision_tower, pixel_values=pixel_values, image_sizes=image_sizes, **visual_inputs)

    def image_token_mask(self, input_ids, inputs_embeds) -> torch.Tensor:
        if input_ids is not None:
            return input_ids == self.config.image_token_id
        image_embedding = self.get_input_embeddings()(
            torch.tensor(self.config.image_token_id, device=inputs_embeds.device)
        )
        return (inputs_embeds == image_embedding).all(-1)

    def splice_image_features(self, inputs_embeds, image_mask, features: list[torch.Tensor]) -> torch.Tensor:
        """Writes the visual tokens, image after image, over the image-placeholder positions."""
        placeholders = int(image_mask.sum())
        counts = [f.shape[0] for f in features]
        if placeholders != sum(counts):
            raise ValueError(
                f"the prompt holds {placeholders} image tokens but the {len(features)} image(s) give {sum(counts)} "
                f"visual tokens ({counts} per image): build inputs with MultiGranProcessor, which expands each "
                "image placeholder to its exact token count"
            )
        features = torch.cat(features, dim=0).to(inputs_embeds.device, inputs_embeds.dtype)
        return inputs_embeds.masked_scatter(image_mask[..., None], features)

    def check_context(self, sequence_length: int, cache=None):
        limit = self.context_length
        past = cache.get_seq_length() if cache is not None else 0
        if limit is not None and past == 0 and sequence_length > limit:
            raise ValueError(
                f"the prompt is {sequence_length} tokens long (text and visual tokens) but the language model's "
                f"context is {limit} tokens (text_config.max_position_embeddings): shorten the prompt, use fewer or "
                "smaller images, or a coarser granularity"
            )

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> MultiGranCausalLMOutput:
        """Splices each image's visual tokens into the prompt and runs the LM.

        `pixel_values`/`image_sizes` (and the method's own inputs, `self.visual.input_names`) come from
        `MultiGranProcessor`; `labels` follow Hugging Face's convention (-100 = ignored; image positions are always ignored).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        visual_inputs = {name: kwargs.pop(name) for name in self.visual.input_names if name in kwargs}
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        self.check_context(inputs_embeds.shape[1], cache)

        image_token_counts = report = None
        if pixel_values is not None and pixel_values.shape[0] > 0:
            features = self.get_image_features(pixel_values, image_sizes, **visual_inputs)
            report = getattr(self.visual, "last_report", None)
            image_token_counts = [f.shape[0] for f in features]
            image_mask = self.image_token_mask(input_ids, inputs_embeds)
            inputs_embeds = self.splice_image_features(inputs_embeds, image_mask, features)
            if labels is not None:
                labels = labels.masked_fill(image_mask.to(labels.device), -100)

        outputs = self.language_model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **{**kwargs, "return_dict": True},
        )
        return MultiGranCausalLMOutput(
            **outputs, image_token_counts=image_token_counts, visual_report=report
        )

    def prepare_inputs_for_generation(self, *args, is_first_iteration=False, **kwargs):
        inputs = super().prepare_inputs_for_generation(*args, is_first_iteration=is_first_iteration, **kwargs)
        # Images are consumed by the prefill; later steps read them from the cache.
        if not is_first_iteration and inputs.get("use_cache", True):
            for name in ("pixel_values", "image_sizes", *self.visual.input_names):
                inputs.pop(name, None)
        return inputs


__all__ = ["MultiGranForConditionalGeneration", "MultiGranPreTrainedModel", "MultiGranCausalLMOutput"]
