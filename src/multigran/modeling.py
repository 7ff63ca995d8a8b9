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


def reexpand_image_tokens(input_ids, attention_mask, labels, old_counts, new_counts, image_token_id, pad_token_id):
    """Changes each image's run of placeholder tokens from old_counts[i] to new_counts[i] tokens, row by row.

    Used when the model, not the processor, settles an image's token count (AVG-LLaVA's router in "auto" mode: the
    processor leaves one placeholder). Rows are re-padded on the side the batch was padded on; new image positions
    are attended and carry label -100.
    """
    rows, image = [], 0
    left_padded = attention_mask is not None and bool((attention_mask[:, -1] == 1).all()) and bool(
        (attention_mask[:, 0] == 0).any())
    for row in range(input_ids.shape[0]):
        valid = attention_mask[row].bool() if attention_mask is not None else torch.ones_like(input_ids[row], dtype=torch.bool)
        ids = input_ids[row][valid].tolist()
        row_labels = labels[row][valid].tolist() if labels is not None else None
        new_ids, new_labels, position = [], [], 0
        while position < len(ids):
            if ids[position] != image_token_id:
                new_ids.append(ids[position])
                if row_labels is not None:
                    new_labels.append(row_labels[position])
                position += 1
                continue
            if image >= len(old_counts):
                raise ValueError("input_ids hold more image placeholders than there are images")
            run = ids[position:position + old_counts[image]]
            if len(run) != old_counts[image] or any(token != image_token_id for token in run):
                raise ValueError(
                    f"image {image} should take {old_counts[image]} placeholder token(s) in the prompt: build inputs "
                    "with MultiGranProcessor"
                )
            new_ids += [image_token_id] * new_counts[image]
            new_labels += [-100] * new_counts[image]
            position += old_counts[image]
            image += 1
        rows.append((new_ids, new_labels))
    if image != len(old_counts):
        raise ValueError(f"input_ids hold placeholders for {image} image(s) but {len(old_counts)} were given")
    length = max(len(ids) for ids, _ in rows)
    device = input_ids.device
    out_ids = torch.full((len(rows), length), pad_token_id, dtype=input_ids.dtype, device=device)
    out_mask = torch.zeros((len(rows), length), dtype=torch.long, device=device)
    out_labels = torch.full((len(rows), length), -100, dtype=torch.long, device=device) if labels is not None else None
    for row, (ids, row_labels) in enumerate(rows):
        span = slice(length - len(ids), length) if left_padded else slice(0, len(ids))
        out_ids[row, span] = torch.tensor(ids, dtype=input_ids.dtype, device=device)
        out_mask[row, span] = 1
        if out_labels is not None:
            out_labels[row, span] = torch.tensor(row_labels, dtype=torch.long, device=device)
    return out_ids, out_mask, out_labels


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

    def _initialize_weights(self, module, is_custom_code: bool = False):
        # transformers skips, in custom-code models, modules that own no parameter themselves (e.g. a fusion block
        # whose weights all live in its convs): their `reset_parameters` must still run, so treat ours as library
        # code. Loaded weights stay protected by transformers' per-parameter "initialised" flags.
        super()._initialize_weights(module, is_custom_code=False)

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
        return self.visual(self.vision_tower, pixel_values=pixel_values, image_sizes=image_sizes,
                           embed_tokens=self.get_input_embeddings(), **visual_inputs)

    def embed_text(self, input_ids) -> torch.Tensor:
        """The LM's token embeddings; image placeholders read row 0 (they are overwritten by visual tokens), so the
        image token may lie outside the LM's vocabulary, as in checkpoints of the original LLaVA code base."""
        return self.get_input_embeddings()(input_ids.masked_fill(input_ids == self.config.image_token_id, 0))

    def image_token_mask(self, input_ids, inputs_embeds) -> torch.Tensor:
        if input_ids is not None:
            return input_ids == self.config.image_token_id
        if self.config.image_token_id >= self.get_input_embeddings().num_embeddings:
            raise ValueError("pass input_ids: the image token is outside the LM's vocabulary, so image positions "
                             "cannot be found in inputs_embeds")
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
        image_features: list[torch.Tensor] | None = None,
        **kwargs,
    ) -> MultiGranCausalLMOutput:
        """Splices each image's visual tokens into the prompt and runs the LM.

        `pixel_values`/`image_sizes` (and the method's own inputs, `self.visual.input_names`) come from
        `MultiGranProcessor`; `image_features` (per image (tokens, D)) replaces them when precomputed (as `generate`
        does); `labels` follow Hugging Face's convention (-100 = ignored; image positions are always ignored).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        visual_inputs = {name: kwargs.pop(name) for name in self.visual.input_names if name in kwargs}
        if inputs_embeds is None:
            inputs_embeds = self.embed_text(input_ids)

        image_token_counts = report = None
        if image_features is None and pixel_values is not None and pixel_values.shape[0] > 0:
            image_features = self.get_image_features(
                pixel_values, image_sizes, input_ids=input_ids, inputs_embeds=inputs_embeds,
                attention_mask=attention_mask, labels=labels, **visual_inputs,
            )
            report = getattr(self.visual, "last_report", None)
        if image_features is not None:
            image_token_counts = [f.shape[0] for f in image_features]
            image_mask = self.image_token_mask(input_ids, inputs_embeds)
            placeholders = int(image_mask.sum())
            old = None
            if placeholders != sum(image_token_counts) and input_ids is not None and image_sizes is not None:
                old = self.visual.placeholder_counts(image_sizes, **visual_inputs)
            if old is not None and placeholders == sum(old):
                # The pipeline settled the counts itself (e.g. the AVG router): resize each image's placeholder run.
                input_ids, attention_mask, labels = reexpand_image_tokens(
                    input_ids, attention_mask, labels, old, image_token_counts, self.config.image_token_id,
                    self.pad_token_id,
                )
                inputs_embeds = self.embed_text(input_ids)
                image_mask = input_ids == self.config.image_token_id
                position_ids = None
            inputs_embeds = self.splice_image_features(inputs_embeds, image_mask, image_features)
            if labels is not None:
                labels = labels.masked_fill(image_mask.to(labels.device), -100)
        self.check_context(inputs_embeds.shape[1], cache)

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

    @property
    def pad_token_id(self) -> int:
        pad = getattr(self.config.text_config, "pad_token_id", None)
        return 0 if pad is None else pad

    @torch.no_grad()
    def generate(self, input_ids=None, pixel_values=None, image_sizes=None, attention_mask=None, **kwargs):
        """transformers' `generate`, with the images encoded once before the prefill.

        The pipeline may settle each image's token count itself (AVG-LLaVA's router with granularity "auto"): the
        prompt's placeholders are then resized to exactly the chosen counts, so no padding is left in the sequence.
        Per-image decisions are in `self.last_visual_report` (and `output.visual_report` with
        `return_dict_in_generate=True`). Method options (e.g. `granularity=144`, `max_visual_tokens=...`,
        `granularity_bias=...`) may be passed here and override the processor's.
        """
        self.last_visual_report = None
        original_ids = input_ids
        visual_inputs = {name: kwargs.pop(name) for name in self.visual.input_names if name in kwargs}
        override = kwargs.pop("granularity", None)
        if pixel_values is not None and pixel_values.shape[0] > 0 and input_ids is not None:
            processor_inputs = dict(visual_inputs)
            if override is not None:
                visual_inputs["image_granularity"] = [override] * pixel_values.shape[0]
            features = self.get_image_features(
                pixel_values, image_sizes, input_ids=input_ids, inputs_embeds=self.embed_text(input_ids),
                attention_mask=attention_mask, **visual_inputs,
            )
            self.last_visual_report = getattr(self.visual, "last_report", None)
            counts = [f.shape[0] for f in features]
            if int((input_ids == self.config.image_token_id).sum()) != sum(counts) or override is not None:
                old = self.visual.placeholder_counts(image_sizes, **processor_inputs)
                input_ids, attention_mask, _ = reexpand_image_tokens(
                    input_ids, attention_mask, None, old, counts, self.config.image_token_id, self.pad_token_id
                )
            kwargs["image_features"] = features
        prompt = input_ids
        output = super().generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        if original_ids is not None and original_ids.shape != prompt.shape:
            # Give back the caller's prompt (as passed) followed by the new tokens, so `output[:, len(prompt):]`
            # is the answer whatever the number of visual tokens the model settled on.
            if torch.is_tensor(output):
                output = torch.cat([original_ids, output[:, prompt.shape[1]:]], dim=1)
            else:
                output.sequences = torch.cat([original_ids, output.sequences[:, prompt.shape[1]:]], dim=1)
        if self.last_visual_report is not None and not torch.is_tensor(output):
            output.visual_report = self.last_visual_report
        return output

    def prepare_inputs_for_generation(self, *args, is_first_iteration=False, **kwargs):
        inputs = super().prepare_inputs_for_generation(*args, is_first_iteration=is_first_iteration, **kwargs)
        # Images are consumed by the prefill; later steps read them from the cache.
        if not is_first_iteration and inputs.get("use_cache", True):
            for name in ("pixel_values", "image_sizes", "image_features", *self.visual.input_names):
                inputs.pop(name, None)
        return inputs


__all__ = ["MultiGranForConditionalGeneration", "MultiGranPreTrainedModel", "MultiGranCausalLMOutput"]
