"""MultiGranProcessor: images (+ the method's extra inputs) and text -> model inputs, with exact visual-token accounting.

The processor expands every image placeholder into exactly as many image tokens as the model will produce for that
image (Hugging Face's LLaVA-NeXT convention), so the visual-token budget is known before the forward pass.
"""

import inspect

from transformers import BatchFeature, ProcessorMixin
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

from .image_io import DEFAULT_MAX_PIXELS, load_image
from .pipelines.anyres import anyres_step
from .pipelines.avg import avg_step
from .pipelines.mg import mg_step
from .pipelines.uhd import uhd_step


# Method name -> its processor step: (image processor, RGB PIL images, **method options) -> tensors + token counts.
IMAGE_STEPS = {
    "anyres": anyres_step,
    "avg": avg_step,
    "mg": mg_step,
    "uhd": uhd_step,
}


class MultiGranImageProcessor(LlavaNextImageProcessorPil):
    """Image processor of every method: LLaVA-NeXT's settings (sizes, pinpoints, mean/std) plus `method`, its
    `method_settings` and the tower's `patch_size`; `preprocess` runs the method's step from `IMAGE_STEPS`."""

    model_input_names = ["pixel_values", "image_sizes"]

    def __init__(self, method: str = "anyres", method_settings: dict | None = None, patch_size: int = 14,
                 max_pixels: int = DEFAULT_MAX_PIXELS, **kwargs):
        kwargs.setdefault("size", {"shortest_edge": 336})
        kwargs.setdefault("crop_size", {"height": 336, "width": 336})
        super().__init__(**kwargs)
        if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
            raise ValueError(f"max_pixels must be a positive int (pixels per image), got {max_pixels!r}")
        self.method = method
        self.method_settings = dict(method_settings or {})
        self.patch_size = patch_size
        self.max_pixels = max_pixels

    def preprocess(self, images, **options) -> BatchFeature:
        """RGB images -> the method's tensors and `image_token_counts` (visual tokens per image)."""
        self.check_options(options)
        images = [load_image(image, self.max_pixels) for image in images]
        return BatchFeature(IMAGE_STEPS[self.method](self, images, **options))

    def step_options(self) -> set[str]:
        """The keyword options the method's image step takes."""
        if self.method not in IMAGE_STEPS:
            raise ValueError(f"unknown method {self.method!r}; available methods: {sorted(IMAGE_STEPS)}")
        return set(inspect.signature(IMAGE_STEPS[self.method]).parameters) - {"image_processor", "images"}

    def check_options(self, options):
        accepted = self.step_options()
        unknown = sorted(set(options) - accepted)
        if unknown:
            raise ValueError(f"option(s) {unknown} do not apply to method {self.method!r} (it takes {sorted(accepted)})")


# Tokenizer-side keywords transformers' `apply_chat_template` may pass along; not image options.
TOKENIZER_OPTIONS_IGNORED = {"sanitize_control_tokens", "return_attention_mask"}


def _nest_images(images, texts, image_token) -> list[list]:
    """Assigns images to prompts: a flat list is consumed in placeholder order, a list of lists is per prompt."""
    placeholders = [text.count(image_token) for text in texts]
    if images is None:
        images = []
    elif not isinstance(images, (list, tuple)):
        images = [images]
    if images and all(isinstance(item, (list, tuple)) for item in images):
        if len(images) != len(texts):
            raise ValueError(f"got {len(images)} image lists for {len(texts)} prompts: pass one list per prompt")
        nested = [list(group) for group in images]
    else:
        if len(images) != sum(placeholders):
            raise ValueError(
                f"got {len(images)} image(s) but the prompt(s) hold {sum(placeholders)} {image_token!r} placeholder(s) "
                f"({placeholders} per prompt): each image needs exactly one placeholder"
            )
        nested, start = [], 0
        for count in placeholders:
            nested.append(list(images[start:start + count]))
            start += count
    for index, (group, count) in enumerate(zip(nested, placeholders)):
        if len(group) != count:
            raise ValueError(
                f"prompt {index} holds {count} {image_token!r} placeholder(s) but got {len(group)} image(s) for it"
            )
    return nested


class MultiGranProcessor(ProcessorMixin):
    """Wraps a [`MultiGranImageProcessor`] and a tokenizer; `__call__` returns inputs for the model's forward/generate.

    Args:
        image_processor: the [`MultiGranImageProcessor`] of the model's method.
        tokenizer: the LLM's tokenizer; it must know `image_token`.
        chat_template: Jinja chat template (transformers' message format); falls back to the tokenizer's.
        image_token: the placeholder string, one per image in the prompt.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, image_token="<image>", **kwargs):
        self.image_token = image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {image_token!r} token: add it as a special token first")
        if chat_template is None:
            chat_template = getattr(tokenizer, "chat_template", None)
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    @property
    def context_length(self) -> int | None:
        length = getattr(self.tokenizer, "model_max_length", None)
        return length if length is not None and length < 10**8 else None  # transformers' "no limit" is ~1e30

    def __call__(self, images=None, text=None, videos=None, audio=None, *, padding=True, return_tensors="pt",
                 add_special_tokens=True, **options) -> BatchFeature:
        """Prompts with one `image_token` per image -> `input_ids`, `attention_mask`, `pixel_values`, ...

        `images`: one image, a flat list (consumed in placeholder order across prompts) or one list per prompt; each
        image a path, PIL image, numpy array or tensor. `options` go to the method's image step (e.g. `granularity`).
        """
        if text is None:
            raise ValueError("text is required: a prompt with one image placeholder per image")
        if videos is not None or audio is not None:
            raise ValueError("multigran models take images and text only (no videos or audio)")
        if options.pop("truncation", None) or options.pop("max_length", None):
            raise ValueError("truncation is not supported: it could cut image tokens; the processor checks the "
                             "context length instead")
        # None is kept for the method step's own options (e.g. uhd's pre_resize_long_side=None: no pre-resize) and
        # dropped for anything else (keywords transformers passes along unset).
        accepted = self.image_processor.step_options()
        options = {k: v for k, v in options.items()
                   if k not in TOKENIZER_OPTIONS_IGNORED and (v is not None or k in accepted)}
        texts = [text] if isinstance(text, str) else list(text) if isinstance(text, (list, tuple)) else None
        if not texts or not all(isinstance(item, str) for item in texts):
            kinds = sorted({type(item).__name__ for item in texts or [text]})
            raise TypeError(f"text must be a prompt string or a non-empty list of them, got {type(text).__name__}"
                            f"{' of ' + '/'.join(kinds) if texts else ''} (token ids go to the model as input_ids)")
        nested = _nest_images(images, texts, self.image_token)
        flat_images = [image for group in nested for image in group]

        vision = {}
        counts = []
        if flat_images:
            vision = dict(self.image_processor.preprocess(flat_images, **options))
            counts = vision.pop("image_token_counts")
        elif options:
            self.image_processor.check_options(options)

        input_ids = self.expand_image_tokens(texts, [len(group) for group in nested], counts, add_special_tokens)
        batch = self.tokenizer.pad({"input_ids": input_ids}, padding=padding, return_tensors=return_tensors)
        return BatchFeature({**batch, **vision}, tensor_type=return_tensors)

    def expand_image_tokens(self, texts, images_per_text, counts, add_special_tokens=True) -> list[list[int]]:
        """Tokenizes each prompt and repeats its k-th image token counts[k] times; checks the context length."""
        input_ids, image_index = [], 0
        for index, (text, n_images) in enumerate(zip(texts, images_per_text)):
            # A prompt rendered by a chat template that already starts with BOS gets no second one (as transformers'
            # `apply_chat_template` does).
            bos = self.tokenizer.bos_token
            special = add_special_tokens and not (bos and text.startswith(bos))
            ids = self.tokenizer(text, add_special_tokens=special)["input_ids"]
            positions = [i for i, token in enumerate(ids) if token == self.image_token_id]
            if len(positions) != n_images:
                raise ValueError(
                    f"prompt {index}: the tokenizer found {len(positions)} image token(s) for {n_images} image(s); "
                    f"is {self.image_token!r} a special token of this tokenizer?"
                )
            expanded, last = [], 0
            for position in positions:
                expanded += ids[last:position] + [self.image_token_id] * counts[image_index]
                last, image_index = position + 1, image_index + 1
            expanded += ids[last:]
            limit = self.context_length
            if limit is not None and len(expanded) > limit:
                visual = sum(counts[image_index - n_images:image_index])
                raise ValueError(
                    f"prompt {index} is {len(expanded)} tokens long ({visual} visual + {len(expanded) - visual} text) "
                    f"but the model's context is {limit} tokens: shorten the prompt, use fewer or smaller images, "
                    "or a coarser granularity"
                )
            input_ids.append(expanded)
        return input_ids

    def count_image_tokens(self, images, **options) -> list[int]:
        """Visual tokens each image will take in the prompt (without running the model)."""
        images = images if isinstance(images, (list, tuple)) else [images]
        return self.image_processor.preprocess(images, **options)["image_token_counts"]

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    @property
    def model_input_names(self):
        return ["input_ids", "attention_mask", "pixel_values", "image_sizes"]


__all__ = ["MultiGranProcessor", "MultiGranImageProcessor", "IMAGE_STEPS"]
