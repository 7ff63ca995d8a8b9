"""Tiny random checkpoints built locally (no download): for tests, examples and `multigran init-tiny`.

Everything is real (a trained byte-level BPE tokenizer, Hugging Face CLIP/SigLIP towers and causal LMs); only the
sizes are small and the weights random.
"""

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoConfig, PreTrainedTokenizerFast

from .configuration import MultiGranConfig
from .data.templates import MESSAGE_TEXT_JINJA

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]

# A Vicuna-style template ("USER: <image>\n... ASSISTANT:") in transformers' message format.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    + MESSAGE_TEXT_JINJA +
    "{%- if message['role'] == 'system' -%}{{ text + ' ' }}"
    "{%- elif message['role'] == 'user' -%}{{ 'USER: ' + text + ' ' }}"
    "{%- else -%}{{ 'ASSISTANT: ' + text + eos_token + ' ' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)

_CORPUS = [
    "A chat between a curious human and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    "What is shown in this image? Describe the picture in detail. How many objects are there?",
    "The image shows a red square, a blue circle and a green triangle on a white background.",
    "There are two cats on the left and one dog on the right. The text reads 0123456789.",
    "Answer the question using a single word or phrase. Yes. No. Left. Right. Top. Bottom.",
]


def build_tiny_tokenizer(vocab_size: int = 320, image_token: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a built-in corpus, with `<image>` as a special token (unless asked not
    to: the original LLaVA code base's tokenizers have none)."""
    specials = SPECIAL_TOKENS if image_token else [t for t in SPECIAL_TOKENS if t != "<image>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(_CORPUS * 4, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", SPECIAL_TOKENS.index("<s>"))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens=["<image>"] if image_token else [], model_max_length=4096,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_vision_config(kind: str = "clip", image_size: int = 32, patch_size: int = 4, hidden_size: int = 32):
    model_type = {"clip": "clip_vision_model", "siglip": "siglip_vision_model"}[kind]
    return AutoConfig.for_model(
        model_type, hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2,
        num_attention_heads=4, image_size=image_size, patch_size=patch_size,
    )


def tiny_text_config(kind: str = "llama", vocab_size: int = 320, hidden_size: int = 64, context: int = 4096):
    extra = {"sliding_window": None} if kind in ("mistral", "qwen2") else {}
    return AutoConfig.for_model(
        kind, vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context, pad_token_id=3,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, **extra,
    )


# Tiny defaults of methods that need settings to run at tiny sizes (merged under the caller's method_settings).
TINY_METHOD_SETTINGS = {
    # A 4-stage ConvNeXt of stride 32 at 256 px: its last stage is 8x8, the tiny CLIP grid (32 / 4).
    "mg": {"high_res": 256, "convnext_config": {"hidden_sizes": [8, 16, 24, 32], "depths": [1, 1, 1, 1]}},
    # The window attention has D / 128 heads in the release; the tiny LLM is 64 wide.
    "uhd": {"num_heads": 2},
}


def tiny_config(method: str = "anyres", vision: str = "clip", text: str = "llama", vocab_size: int = 320,
                image_size: int = 32, patch_size: int = 4, method_settings: dict | None = None, **overrides):
    """A tiny MultiGranConfig with LLaVA-NeXT geometry scaled down: pinpoints are 1x2, 2x1, 2x2, 3x1, 1x3 tiles."""
    tile = image_size
    pinpoints = [[tile, 2 * tile], [2 * tile, tile], [2 * tile, 2 * tile], [3 * tile, tile], [tile, 3 * tile]]
    strategy = "full" if vision == "siglip" else "default"
    return MultiGranConfig(
        vision_config=tiny_vision_config(vision, image_size, patch_size),
        text_config=tiny_text_config(text, vocab_size),
        method=method,
        method_settings={**TINY_METHOD_SETTINGS.get(method, {}), **(method_settings or {})},
        image_token_id=SPECIAL_TOKENS.index("<image>"),
        image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy=strategy,
        **overrides,
    )


def build_tiny(out_dir=None, method: str = "anyres", seed: int = 0, **config_kwargs):
    """Builds (and optionally saves) a tiny random model and its processor; returns (model, processor)."""
    from .modeling import MultiGranForConditionalGeneration
    from .processing import MultiGranImageProcessor, MultiGranProcessor

    from .pipelines import settings_for

    tokenizer = build_tiny_tokenizer()
    config_kwargs["method_settings"] = settings_for(method, config_kwargs.get("method_settings"), tokenizer)
    config = tiny_config(method=method, vocab_size=len(tokenizer), **config_kwargs)
    torch.manual_seed(seed)
    model = MultiGranForConditionalGeneration(config).eval()
    vision = config.vision_config
    image_processor = MultiGranImageProcessor(
        method=method, method_settings=config.method_settings, patch_size=vision.patch_size,
        size={"shortest_edge": vision.image_size}, crop_size={"height": vision.image_size, "width": vision.image_size},
        image_grid_pinpoints=config.image_grid_pinpoints,
        **({"image_mean": [0.5] * 3, "image_std": [0.5] * 3} if vision.model_type.startswith("siglip") else {}),
    )
    processor = MultiGranProcessor(image_processor=image_processor, tokenizer=tokenizer)
    if out_dir is not None:
        model.save_pretrained(out_dir)
        processor.save_pretrained(out_dir)
    return model, processor


__all__ = ["build_tiny", "build_tiny_tokenizer", "tiny_config", "CHAT_TEMPLATE"]
