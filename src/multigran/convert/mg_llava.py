"""Released MG-LLaVA checkpoints (PhoenixZ810/MG-LLaVA, an XTuner / mmengine fork) -> multigran `mg` directory.

Source (shared/spec/mg-llava.md, "Released checkpoints"): the trainable modules only, under these keys
    llm.*                          Hugging Face causal-LM keys (llm.model.layers.0..., llm.lm_head.weight)
    projector.model.{0,2}.*        Linear(1024 -> D), Linear(D -> D)
    bbox_projector.model.{0,2}.*   Linear(2880 -> D), Linear(D -> D)
    fuse_module.*                  the Conv-Gate (slow_conv, slow_proj, fast_conv, fast_proj, gate.0, gate.2)
in one of these containers, all read with `torch.load(weights_only=True)` (never arbitrary unpickling):
  - an mmengine `.pth` file: the state dict itself, or nested under a `state_dict` key (mmengine's runner);
  - a DeepSpeed checkpoint directory (XTuner's `iter_N.pth/` folder, or its parent holding a `latest` file that names
    the tag folder): the model-states file `mp_rank_00_model_states.pt`, whose `module` entry is the state dict.
    Supported: ZeRO stages 0-2 without model parallelism (there `module` holds the full weights, in the training dtype;
    the fp32 master copies in the `*_optim_states.pt` shards are not read). ZeRO-3 directories hold only parameter
    partitions (`zero_pp_rank_*_mp_rank_00_model_states.pt`, empty `module` tensors): consolidate them first with
    DeepSpeed's `zero_to_fp32.py` and convert the file it writes.
A file that holds other Python objects (mmengine's message hub, optimizer states with custom classes) cannot be read
with weights_only=True: the error says how to extract the state dict in a trusted environment.

The rest comes from the original checkpoints, as in the release:
  - `clip_dir`: the Hugging Face CLIP ViT-L/14-336 (openai/clip-vit-large-patch14-336): vision config and weights;
  - `convnext_dir`: the OpenCLIP convnext_large_d_320 weights (`open_clip_pytorch_model.bin` or `.safetensors`, a file
    or the folder holding it), or a Hugging Face ConvNext directory (config.json + weights);
  - `llm_config`: the base LLM's Hugging Face config (a directory or its config.json; e.g. lmsys/vicuna-7b-v1.5) --
    the .pth stores no config. Its directory also provides the tokenizer (and the LLM weights when the .pth holds no
    `llm.*` keys, e.g. a stage-1 checkpoint where the LLM was frozen).
The converted model runs in compat mode (`MgSettings.compat`: the release's box pipeline, ConvNeXt stochastic depth in
training) with the release's text budget `text_max_length` (2048 - 576). The tokenizer gets `<image>` as a special
token (XTuner inserts images by a negative index, so its id may lie outside the LLM's vocabulary; the model never
embeds or predicts it). Chat template: the tokenizer's own (Llama-3, Phi-3) or, when it has none (Vicuna), XTuner's
`vicuna` prompt template.
"""

import logging
import pickle
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer, ConvNextModel

from ..configuration import MultiGranConfig
from ..data.templates import MESSAGE_TEXT_JINJA
from ..processing import MultiGranImageProcessor, MultiGranProcessor
from ..vision.convnext import load_open_clip_convnext
from .common import (
    CheckpointMismatchError,
    SafetensorsCheckpoint,
    build_on_meta,
    expected_state,
    safetensors_files,
    tower_weights_from,
    write_checked,
)

logger = logging.getLogger(__name__)

# XTuner PROMPT_TEMPLATE.vicuna: SYSTEM "A chat between a curious user ... {system}\n " (only when a system message is
# given), INSTRUCTION "USER: {input} ASSISTANT:", images as "<image>\n" before the text. XTuner tokenizes the answer
# separately and appends EOS, then SEP "\n" before the next turn.
XTUNER_VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, "
    "and polite answers to the user's questions. "
)
XTUNER_VICUNA_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    + MESSAGE_TEXT_JINJA +
    "{%- if message['role'] == 'system' -%}{{ \"" + XTUNER_VICUNA_SYSTEM + "\" + text + '\n ' }}"
    "{%- elif message['role'] == 'user' -%}{{ 'USER: ' + text + ' ASSISTANT:' }}"
    "{%- else -%}{{ ' ' + text + eos_token + '\n' }}{%- endif -%}"
    "{%- endfor -%}"
)

_PREFIXES = [  # (released prefix, multigran prefix)
    ("llm.", "language_model."),
    ("projector.", "visual.projector."),
    ("bbox_projector.", "visual.bbox_projector."),
    ("fuse_module.", "visual.fuse_module."),
]

DEEPSPEED_MODEL_STATES = "mp_rank_00_model_states.pt"
RELEASE_CONTEXT = 2048  # the release configs' context: max_length = 2048 - 576 text tokens
OPEN_CLIP_FILES = ("open_clip_pytorch_model.bin", "open_clip_model.safetensors", "open_clip_pytorch_model.safetensors")


def rename_key(key: str) -> str:
    """Released key -> multigran key (unknown prefixes are returned unchanged, so the key check names them)."""
    for old, new in _PREFIXES:
        if key.startswith(old):
            return new + key[len(old):]
    return key


# --- reading the release ------------------------------------------------------------------------------------------


def _load_weights_only(path: Path):
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:  # legacy (non-zip) pickles cannot be memory-mapped
            if "mmap" not in str(error):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointMismatchError(
            f"{path} cannot be read with torch.load(weights_only=True): {reason}. It holds Python objects besides "
            "tensors; if you trust the file, extract the weights once in a separate environment, e.g. "
            "`sd = torch.load(f, weights_only=False); torch.save(sd.get('state_dict', sd.get('module', sd)), "
            "'weights.pth')`, and convert weights.pth"
        ) from None


def deepspeed_model_states(directory: Path) -> Path:
    """The model-states file of a DeepSpeed checkpoint directory (the tag folder, or its parent with `latest`)."""
    if (directory / "latest").is_file() and not (directory / DEEPSPEED_MODEL_STATES).is_file():
        tag = (directory / "latest").read_text().strip()
        if not (directory / tag).is_dir():
            raise CheckpointMismatchError(f"{directory}/latest names the tag {tag!r}, but {directory / tag} is missing")
        directory = directory / tag
    states = directory / DEEPSPEED_MODEL_STATES
    if states.is_file():
        return states
    if sorted(directory.glob("zero_pp_rank_*_mp_rank_*_model_states.pt")):
        raise CheckpointMismatchError(
            f"{directory} is a DeepSpeed ZeRO-3 checkpoint (parameters partitioned across ranks): consolidate it with "
            "DeepSpeed's zero_to_fp32.py (copied into the checkpoint folder) and convert the file it writes"
        )
    others = sorted(p.name for p in directory.glob("mp_rank_*_model_states.pt"))
    if others:
        raise CheckpointMismatchError(f"{directory}: model-parallel DeepSpeed checkpoints ({others}) are not supported")
    raise CheckpointMismatchError(
        f"{directory} is not a DeepSpeed checkpoint directory: no {DEEPSPEED_MODEL_STATES} (nor a 'latest' file naming "
        "a tag folder that holds it)"
    )


def read_release(src) -> dict[str, torch.Tensor]:
    """The released state dict (names -> tensors) from an mmengine .pth file or a DeepSpeed directory."""
    src = Path(src)
    if src.is_dir():
        path = deepspeed_model_states(src)
        loaded = _load_weights_only(path)
        if not isinstance(loaded, dict) or not isinstance(loaded.get("module"), dict):
            raise CheckpointMismatchError(f"{path}: a DeepSpeed model-states file must hold a 'module' state dict")
        if loaded.get("mp_world_size", 1) != 1:
            raise CheckpointMismatchError(f"{path}: model-parallel checkpoints (mp_world_size "
                                          f"{loaded['mp_world_size']}) are not supported")
        state = loaded["module"]
    elif src.is_file():
        path = src
        state = _load_weights_only(path)
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
    else:
        raise CheckpointMismatchError(f"{src} does not exist (expected an mmengine .pth file or a DeepSpeed directory)")
    if not isinstance(state, dict):
        raise CheckpointMismatchError(f"{path}: expected a state dict (names -> tensors), got {type(state).__name__}")
    not_tensors = sorted(str(k) for k, v in state.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise CheckpointMismatchError(f"{path}: entries that are not tensors: {not_tensors[:10]}")
    empty = sorted(k for k, v in state.items() if v.numel() == 0)
    if empty:
        raise CheckpointMismatchError(
            f"{path}: empty tensors {empty[:5]} (a ZeRO-3 partition?): consolidate with DeepSpeed's zero_to_fp32.py"
        )
    return state


# --- the original encoders and the LLM config ---------------------------------------------------------------------


def load_convnext(convnext_path) -> ConvNextModel:
    """OpenCLIP convnext weights (a file, or the folder holding it) or a Hugging Face ConvNext directory -> model."""
    path = Path(convnext_path)
    if path.is_file():
        return load_open_clip_convnext(path)
    if not path.is_dir():
        raise CheckpointMismatchError(f"ConvNeXt weights {path} do not exist")
    for name in OPEN_CLIP_FILES:
        if (path / name).is_file():
            return load_open_clip_convnext(path / name)
    if (path / "config.json").is_file():
        model, info = ConvNextModel.from_pretrained(path, output_loading_info=True)
        missing = sorted(k for k in info["missing_keys"] if not k.startswith("layernorm."))  # final norm: unused
        if missing or info["mismatched_keys"]:
            raise CheckpointMismatchError(f"{path}: ConvNext weights missing {missing} or mis-shaped "
                                          f"{info['mismatched_keys']}")
        return model
    raise CheckpointMismatchError(f"{path} holds neither OpenCLIP weights ({', '.join(OPEN_CLIP_FILES)}) nor a Hugging "
                                  "Face ConvNext directory (config.json)")


def _convnext_settings(model: ConvNextModel) -> dict | None:
    """The `convnext_config` method setting: None for convnext_large_d_320 itself, else its structure."""
    from ..vision.convnext import convnext_large_d_320_config

    keys = ("num_channels", "patch_size", "num_stages", "hidden_sizes", "depths", "layer_norm_eps", "hidden_act")
    found = {key: getattr(model.config, key) for key in keys}
    default = {key: getattr(convnext_large_d_320_config(), key) for key in keys}
    return None if found == default else found


def _high_res(vision_config, convnext_config) -> int:
    grid = vision_config.image_size // vision_config.patch_size
    return grid * convnext_config.patch_size * 2 ** (convnext_config.num_stages - 1)


def release_text_max_length(vision_config) -> int:
    """The release configs' max_length, `int(2048 - (336 // 14) ** 2)`: text tokens, the image tokens excluded."""
    return RELEASE_CONTEXT - (vision_config.image_size // vision_config.patch_size) ** 2


def _llm_folder(llm_config) -> Path:
    path = Path(llm_config)
    if path.is_dir():
        return path
    if path.is_file():
        return path.parent
    raise CheckpointMismatchError(f"the LLM config {path} does not exist (a Hugging Face directory or config.json)")


# --- conversion -----------------------------------------------------------------------------------------------------


def from_mg_llava(pth_path_or_dir, clip_dir, convnext_dir, dst_dir, llm_config=None, tokenizer_dir=None,
                  chat_template=None) -> Path:
    """Converts a released MG-LLaVA checkpoint into a multigran `mg` directory (model, config, processor).

    pth_path_or_dir: the mmengine .pth file or DeepSpeed directory; clip_dir: Hugging Face CLIP; convnext_dir: OpenCLIP
    convnext weights or a Hugging Face ConvNext directory; llm_config (required): the base LLM's config directory or
    config.json; tokenizer_dir: defaults to the LLM config's folder; chat_template: defaults to the tokenizer's own,
    else XTuner's vicuna template. Keys and shapes are checked before anything is written; mismatches are named.
    """
    for value, what in ((clip_dir, "clip_dir (--clip): the Hugging Face CLIP directory"),
                        (convnext_dir, "convnext_dir (--convnext): the OpenCLIP convnext_large_d_320 weights")):
        if value is None:
            raise CheckpointMismatchError(f"the MG-LLaVA .pth holds only the trained modules: pass {what}")
    if llm_config is None:
        raise CheckpointMismatchError("the MG-LLaVA .pth holds no LLM config: pass llm_config (--llm-config), the base "
                                      "LLM's Hugging Face directory or config.json (e.g. lmsys/vicuna-7b-v1.5)")
    src, dst_dir = Path(pth_path_or_dir), Path(dst_dir)
    release = read_release(src)
    renamed = {rename_key(key): key for key in release}

    clip_config = AutoConfig.from_pretrained(clip_dir)
    vision_config = getattr(clip_config, "vision_config", clip_config)
    text_config = AutoConfig.from_pretrained(llm_config)
    convnext = load_convnext(convnext_dir)
    llm_folder = _llm_folder(llm_config)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir or llm_folder)
    if "<image>" not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})

    config = MultiGranConfig(
        vision_config=vision_config.to_dict(),
        text_config=text_config.to_dict(),
        method="mg",
        # High-res side = CLIP token grid x ConvNeXt stride, so the two grids align: 24 x 32 = 768 for the release.
        # compat: the release's box pipeline and training-time ConvNeXt stochastic depth (MgSettings); its text budget
        # max_length = 2048 - grid^2 (1472) drives the one-box-per-label rule for texts near it.
        method_settings={"compat": True, "convnext_config": _convnext_settings(convnext),
                         "high_res": _high_res(vision_config, convnext.config),
                         "text_max_length": release_text_max_length(vision_config)},
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,  # MG-LLaVA: visual_select_layer -2, patch tokens only
        vision_feature_select_strategy="default",
    )
    model = build_on_meta(config)
    expected = expected_state(model)
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})

    extra = {new: release[old] for new, old in renamed.items() if new not in tied}
    extra.update({f"visual.hires_tower.{key}": value for key, value in convnext.state_dict().items()})
    sources = tower_weights_from(clip_dir)
    if not any(key.startswith("language_model.") for key in extra):
        if not any(llm_folder.glob("*.safetensors")):
            raise CheckpointMismatchError(
                f"{src} holds no llm.* weights (a stage-1 checkpoint?) and {llm_folder} has no safetensors weights of "
                "the base LLM to take them from"
            )
        llm = SafetensorsCheckpoint(llm_folder)
        sources.update({f"language_model.{key}": (llm, key) for key in llm.keys()})
        logger.info("no llm.* keys in %s: the LLM weights come from %s", src, safetensors_files(llm_folder)[0].parent)
    sources = {key: value for key, value in sources.items() if key not in tied}
    write_checked(sources, expected, dst_dir, source=str(src), extra=extra)

    config.save_pretrained(dst_dir)
    size = config.vision_config.image_size
    image_processor = MultiGranImageProcessor(
        method="mg", method_settings=config.method_settings, patch_size=config.vision_config.patch_size,
        size={"shortest_edge": size}, crop_size={"height": size, "width": size},
    )
    template = chat_template or getattr(tokenizer, "chat_template", None) or XTUNER_VICUNA_CHAT_TEMPLATE
    MultiGranProcessor(image_processor=image_processor, tokenizer=tokenizer,
                       chat_template=template).save_pretrained(dst_dir)
    logger.info("converted %s -> %s (%d tensors)", src, dst_dir, len(sources) + len(extra))
    return dst_dir


__all__ = ["from_mg_llava", "read_release", "deepspeed_model_states", "rename_key", "XTUNER_VICUNA_CHAT_TEMPLATE"]
