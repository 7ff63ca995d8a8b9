"""MultiGranForConditionalGeneration: vision tower -> visual pipeline -> tokens spliced into a Hugging Face causal LM."""

from contextlib import contextmanager
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


def pad_left(input_ids, attention_mask):
    """Moves each row's padding to its left end, as decoder-only generation needs (new tokens follow the prompt).

    A stable sort of the mask puts the padding (0) first and keeps the tokens (1) in order; rows are unchanged when
    nothing is padded on the right.
    """
    if attention_mask is None or bool((attention_mask[:, -1] == 1).all()):
        return input_ids, attention_mask
    order = torch.sort(attention_mask.long(), dim=1, stable=True).indices
    return input_ids.gather(1, order), attention_mask.gather(1, order)


def reexpand_image_tokens(input_ids, attention_mask, labels, old_counts, new_counts, image_token_id, pad_token_id,
                          padding_side=None):
    """Changes each image's run of placeholder tokens from old_counts[i] to new_counts[i] tokens, row by row.

    Used when the model, not the processor, settles an image's token count (AVG-LLaVA's router in "auto" mode: the
    processor leaves one placeholder). Rows are re-padded on `padding_side` ("left" or "right"; None: the side the
    batch was padded on, right when no row is padded); new image positions are attended and carry label -100.
    """
    if padding_side not in (None, "left", "right"):
        raise ValueError(f"padding_side must be 'left', 'right' or None, got {padding_side!r}")
    if padding_side is None:
        padding_side = "left" if attention_mask is not None and bool((attention_mask[:, 0] == 0).any()) else "right"
    left_padded = padding_side == "left"
    rows, image = [], 0
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


def offload_hooks(module) -> list:
    """accelerate's offloading hooks (device_map with "cpu"/"disk" entries) under `module`: (submodule, hook) pairs."""
    found = []
    for child in module.modules():
        hook = getattr(child, "_hf_hook", None)
        for single in getattr(hook, "hooks", [hook]):  # a SequentialHook holds several
            if getattr(single, "offload", False):
                found.append((child, single))
    return found


@contextmanager
def offloaded_weights_loaded(*modules):
    """Loads the offloaded weights of `modules` for the duration of the block, then offloads them again.

    accelerate's offload hooks load a module's own weights only while that module is called; the visual pipelines
    also read weights of modules they do not call (nn.MultiheadAttention projections in AVG's router and UHD's window
    attention, the towers' stems, the input embeddings UHD's separators read), which would be left on the meta device.
    The vision side is small next to the LLM, so it is loaded whole while the images are encoded. Does nothing without
    offloading.
    """
    hooks = [pair for module in modules for pair in offload_hooks(module)]
    for child, hook in hooks:
        hook.pre_forward(child)
        hook.offload = False  # the module's own calls inside the block must not offload it again
    try:
        yield
    finally:
        for child, hook in hooks:
            hook.offload = True
            hook.post_forward(child, None)


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
    # With a device_map (accelerate's offload hooks), these are not moved with a module's inputs: the cache, and the
    # modules the model hands to its visual pipeline (they carry their own hooks).
    _skip_keys_device_placement = ["cache", "vision_tower", "embed_tokens"]

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

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, allow_missing: bool = False, **kwargs):
        """transformers' `from_pretrained` (also through the Auto classes), refusing a checkpoint whose weights do not
        match config.json: missing, unexpected or mis-shaped weights end in one `WeightsMismatchError` naming the keys
        and files (transformers would fill missing weights randomly and generate garbage). `allow_missing=True`
        loads a deliberately partial checkpoint (missing weights keep their initialisation, logged);
        `ignore_mismatched_sizes=True` keeps transformers' meaning (re-initialise mis-shaped weights)."""
        import os

        from .loading import check_loading_info, check_weight_files

        wants_info = kwargs.pop("output_loading_info", False)
        forgive_shapes = kwargs.pop("ignore_mismatched_sizes", False)
        path = pretrained_model_name_or_path
        location = check_weight_files(path) if os.path.isdir(path) else None  # key -> file, for the error
        model, info = super().from_pretrained(path, *model_args, output_loading_info=True,
                                              ignore_mismatched_sizes=True, **kwargs)
        check_loading_info({**info, "mismatched_keys": [] if forgive_shapes else info.get("mismatched_keys")}, path,
                           location, allow_missing)
        return (model, info) if wants_info else model

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
        with offloaded_weights_loaded(self.vision_tower, self.visual, self.get_input_embeddings()):
            return self.visual(vision_tower=self.vision_tower, pixel_values=pixel_values, image_sizes=image_sizes,
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

    def check_inputs(self, input_ids=None, pixel_values=None, image_sizes=None):
        """One clear ValueError for inputs the model cannot run: a model left on the meta device, pixel_values that
        are not (images[, views], 3, H, W), image sizes that are not positive (height, width) pairs, token ids outside
        the vocabulary (the image placeholder excepted). One host sync for all the value checks."""
        if self.device.type == "meta" and not getattr(self, "hf_device_map", None):
            raise ValueError("the model's weights are on the meta device (never loaded): load it with "
                             "from_pretrained, or move it with model.to_empty(device=...) and load a state dict")
        if pixel_values is not None and (not torch.is_tensor(pixel_values) or pixel_values.dim() not in (4, 5)):
            shape = tuple(pixel_values.shape) if torch.is_tensor(pixel_values) else type(pixel_values).__name__
            raise ValueError(f"pixel_values must be a (images, 3, H, W) or (images, views, 3, H, W) tensor from "
                             f"MultiGranProcessor, got {shape}")
        values = []
        if image_sizes is not None:
            if not torch.is_tensor(image_sizes) or image_sizes.dim() != 2 or image_sizes.shape[1] != 2:
                shape = tuple(image_sizes.shape) if torch.is_tensor(image_sizes) else type(image_sizes).__name__
                raise ValueError(f"image_sizes must be an (images, 2) tensor of (height, width), got {shape}")
            if image_sizes.numel():
                values.append(image_sizes.min())
        if input_ids is not None and input_ids.numel():
            text = input_ids.masked_fill(input_ids == self.config.image_token_id, 0)
            values += [text.min(), text.max()]
        if not values:
            return
        found = torch.stack([v.to("cpu", torch.long) for v in values]).tolist()
        if image_sizes is not None and image_sizes.numel() and found[0] < 1:
            raise ValueError(f"image_sizes must hold positive (height, width) pairs, got {image_sizes.tolist()}")
        if input_ids is not None and input_ids.numel():
            low, high = found[-2:]
            vocabulary = self.get_input_embeddings().num_embeddings
            if low < 0 or high >= vocabulary:
                raise ValueError(f"input_ids must lie in [0, {vocabulary}) (the language model's vocabulary; the image "
                                 f"token {self.config.image_token_id} excepted), got ids from {low} to {high}")

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
        `MultiGranProcessor`; `image_features` (per image (tokens, D)) replaces them when precomputed; `labels` follow
        Hugging Face's convention (-100 = ignored; image positions are always ignored). `compute=fn` runs `fn(model)`
        instead and returns its result (losses of several passes, under a DDP / FSDP wrapper).
        """
        if (compute := kwargs.pop("compute", None)) is not None:
            # A training loss that runs several passes (AVG-LLaVA's per-granularity losses) passes itself as
            # `compute(model)`: under DDP / FSDP everything then happens inside the wrapped forward, where the wrapper
            # sees every parameter used (its gradient hooks and unused-parameter search start from this output).
            return compute(self)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if cache is None or cache.get_seq_length() == 0:  # the prompt, not every decoding step
            self.check_inputs(input_ids, pixel_values, image_sizes)
        visual_inputs = {name: kwargs.pop(name) for name in self.visual.input_names if name in kwargs}
        if inputs_embeds is None:
            inputs_embeds = self.embed_text(input_ids)

        image_token_counts = report = None
        if image_features is None and pixel_values is not None and pixel_values.shape[0] > 0:
            image_features = self.get_image_features(
                pixel_values, image_sizes, input_ids=input_ids, inputs_embeds=inputs_embeds,
                attention_mask=attention_mask, labels=labels, **visual_inputs,
            )
            report = self.visual_report(image_features)
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

    def visual_report(self, features) -> list[dict]:
        """Per image, the pipeline's report of its last call (granularity, slices, boxes, ...); always with
        `visual_tokens`, the number of visual tokens the image gave."""
        report = getattr(self.visual, "last_report", None)
        if report is None or len(report) != len(features):
            report = [{} for _ in features]
        return [{**entry, "visual_tokens": f.shape[0]} for entry, f in zip(report, features)]

    @torch.no_grad()
    def generate(self, input_ids=None, pixel_values=None, image_sizes=None, attention_mask=None, **kwargs):
        """transformers' `generate`, with the images encoded and spliced into the prompt's embeddings before it starts.

        Every decoding mode of transformers works unchanged (beam search, `num_return_sequences`, sampling,
        assisted / prompt-lookup decoding, streamers, static caches): they see a text prompt (`input_ids`, which
        also holds the image placeholders) whose first step reads `inputs_embeds`, one tensor expanded per beam like
        any other. The prompt is left-padded whatever the tokenizer's padding side (decoder-only generation appends
        new tokens on the right).

        The pipeline may settle each image's token count itself (AVG-LLaVA's router with granularity "auto"): the
        prompt's placeholders are then resized to exactly the chosen counts. The output starts with the caller's
        `input_ids` as passed, so `output[:, input_ids.shape[1]:]` is always the answer. Per-image decisions and
        visual-token counts are in `self.last_visual_report` (and `output.visual_report` with
        `return_dict_in_generate=True`). Method options (e.g. `granularity=144`, `max_visual_tokens=...`,
        `granularity_bias=...`) may be passed here and override the processor's.
        """
        self.last_visual_report = None
        visual_inputs = {name: kwargs.pop(name) for name in self.visual.input_names if name in kwargs}
        override = kwargs.pop("granularity", None)
        self.check_inputs(input_ids, pixel_values, image_sizes)
        has_images = pixel_values is not None and pixel_values.shape[0] > 0
        if input_ids is None:
            if has_images:
                raise ValueError("generate with images needs input_ids (the prompt with its image placeholders)")
            return super().generate(attention_mask=attention_mask, **kwargs)
        original_ids = input_ids
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        input_ids, attention_mask = pad_left(input_ids, attention_mask)
        if has_images:
            processor_inputs = dict(visual_inputs)
            if override is not None:
                visual_inputs["image_granularity"] = [override] * pixel_values.shape[0]
            features = self.get_image_features(
                pixel_values, image_sizes, input_ids=input_ids, inputs_embeds=self.embed_text(input_ids),
                attention_mask=attention_mask, **visual_inputs,
            )
            self.last_visual_report = self.visual_report(features)
            counts = [f.shape[0] for f in features]
            if int((input_ids == self.config.image_token_id).sum()) != sum(counts) or override is not None:
                old = self.visual.placeholder_counts(image_sizes, **processor_inputs)
                input_ids, attention_mask, _ = reexpand_image_tokens(
                    input_ids, attention_mask, None, old, counts, self.config.image_token_id, self.pad_token_id,
                    padding_side="left",
                )
            image_mask = input_ids == self.config.image_token_id
            kwargs["inputs_embeds"] = self.splice_image_features(self.embed_text(input_ids), image_mask, features)
            vocabulary = self.get_input_embeddings().num_embeddings
            if not 0 <= self.config.image_token_id < vocabulary:
                # Logits processors index the vocabulary with the prompt's ids (repetition penalty, prompt lookup):
                # an image token outside it (original LLaVA checkpoints) reads as padding there.
                input_ids = input_ids.masked_fill(image_mask, self.pad_token_id)
        prompt = input_ids
        output = super().generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        if original_ids.shape != prompt.shape or not torch.equal(original_ids, prompt):
            # Give back the caller's prompt (as passed, once per returned sequence) followed by the new tokens.
            sequences = output if torch.is_tensor(output) else output.sequences
            repeats = sequences.shape[0] // original_ids.shape[0]
            sequences = torch.cat([original_ids.repeat_interleave(repeats, dim=0), sequences[:, prompt.shape[1]:]], 1)
            if torch.is_tensor(output):
                output = sequences
            else:
                output.sequences = sequences
        if self.last_visual_report is not None and not torch.is_tensor(output):
            output.visual_report = self.last_visual_report
        return output

    def prepare_inputs_for_generation(self, input_ids, *args, inputs_embeds=None, is_first_iteration=False, **kwargs):
        if is_first_iteration and inputs_embeds is not None and input_ids.shape[1] > inputs_embeds.shape[1]:
            # Assisted / prompt-lookup decoding checks its first draft tokens in the prefill: they follow the prompt's
            # embeddings (transformers would drop them and read only the prompt).
            draft = self.embed_text(input_ids[:, inputs_embeds.shape[1]:])
            inputs_embeds = torch.cat([inputs_embeds, draft.to(inputs_embeds.dtype)], dim=1)
        return super().prepare_inputs_for_generation(
            input_ids, *args, inputs_embeds=inputs_embeds, is_first_iteration=is_first_iteration, **kwargs
        )


__all__ = ["MultiGranForConditionalGeneration", "MultiGranPreTrainedModel", "MultiGranCausalLMOutput"]
