"""Released LLaVA-UHD v2 checkpoints (LLaVA code-base layout, e.g. YipengZhang/LLaVA-UHD-v2) -> a multigran `uhd`
directory.

Source layout (shared/spec/llava-uhd-v2.md section 8; thunlp/LLaVA-UHD branch LLaVA-UHD-v2):
- `config.json`: model_type "llava_llama" (Vicuna) or "llava_qwen" (Qwen2), the LLM's fields at the top level, `mm_*`
  settings, `feature_scale_mask` (7; the Qwen2/13B releases 5).
- safetensors: the LLM (`model.embed_tokens`, `model.layers.*`, `model.norm`, `lm_head`), the CLIP tower
  (`model.vision_tower.vision_tower.vision_model.*`) and, under `model.mm_projector.`, the window attention
  (`query_1..4`, `pos_embed`, `feature_{1x,2x,4x}_embedding`, `features_{1x,2x,4x}_projector`, `attn`, `ln_*`,
  `cat_proj`, `proj`) and the JBU inside its FeatUp wrapper (`upsampler.upsampler.{up1,up2,fixup_proj}.*`).
- the stage-0 JBU checkpoint (`clip-large-jbu.ckpt`, PyTorch Lightning): `state_dict` with the JBU stack under
  `upsampler.` (`upsampler.up1.*`, or `upsampler.upsampler.up1.*` when saved with the wrapper), plus `scale_net*` /
  `downsampler*` (stage-0 training heads) and the frozen featurizer.

Renames (everything else is a prefix rename):
    model.mm_projector.upsampler.upsampler.X  -> visual.upsampler.X        (JBU4xStack)
    model.mm_projector.X                      -> visual.mm_projector.X     (HiwinProjector)
    model.vision_tower.vision_tower.vision_model.X -> vision_tower.X
    model.X -> language_model.model.X,  lm_head.X -> language_model.lm_head.X
Skipped with a logged note (present in the release, used by nothing): the base resampler's `query` and `kv_proj`, the
8x level (`feature_8x_embedding`, `features_8x_projector`), the duplicate frozen CLIP of the FeatUp wrapper
(`upsampler.model.*`). Dropped silently as the release does: `scale_net*`, `downsampler*` of the stage-0 checkpoint.
The JBU weights of the release directory win over the stage-0 checkpoint's (stage 2 fine-tunes the JBU's fix-up);
`jbu_ckpt` supplies the JBU when the directory lacks it. feature_scale_mask 2 and 3 build the release's one-step
`JBU2xStack` (up1 + the fix-up on the 2x output, featup/upsamplers.py:278-302): the 4x stage-0 checkpoint's up2 is
left aside with a logged note, as the release's strict=False load does (hubconf.py:166-169).

Release behaviour kept in the converted settings (both logged at conversion):
- `separator_ids` = [29892, 13]: the release embeds these ids, Llama's "," and "\n", between slices for every LLM,
  Qwen2 included (llava/slice_process.py:11-12, llava/model/llava_arch.py:576-579), so a converted checkpoint keeps
  those embedding rows - for Qwen2 they are other tokens than its own "," and "\n". `separators="tokenizer"` takes the
  tokenizer's own tokens instead (not what the checkpoint was trained with).
- `pre_resize_long_side` = 1024: the release's evaluation resizes the long side to 1024 before slicing
  (llava/eval/model_vqa_loader.py:56-61; 1536 for TextVQA, none for AI2D and MMBench: pass
  `pre_resize_long_side=multigran.pipelines.uhd.uhd_eval_pre_resize(task)` to the processor).
"""

import json
import logging
import pickle
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoTokenizer

from ..configuration import CLIP_L_336, MultiGranConfig
from ..data.templates import inference_chat_template
from ..pipelines.uhd import EVAL_PRE_RESIZE_LONG_SIDE, RELEASE_SEPARATOR_IDS, separator_token_ids
from ..processing import MultiGranImageProcessor, MultiGranProcessor
from .avg_llava import _NOT_LLM
from .common import (
    CheckpointMismatchError,
    SafetensorsCheckpoint,
    build_on_meta,
    canonical_tower_key,
    expected_state,
    tower_weights_from,
    write_checked,
)

logger = logging.getLogger(__name__)

# Keys of the LLaVA-UHD v2 config.json that are not the LLM's (on top of the LLaVA ones).
_NOT_LLM_UHD = _NOT_LLM + ("feature_", "single", "jbu_", "sft_", "model_mode", "slice_", "max_slice", "vdim_")

_LLM_TYPES = {"llava_llama": "llama", "llava_qwen": "qwen2", "llava_qwen2": "qwen2"}
JBU_STEPS = ("up1", "up2", "fixup_proj")  # the JBU4xStack's children (the JBU2xStack has no up2)
SECOND_STEP = "visual.upsampler.up2."  # absent from the JBU2xStack of feature_scale_mask 2 and 3
SEPARATOR_CHOICES = ("release", "tokenizer")
# Release tensors under model.mm_projector. that no multigran module uses: the base resampler's single query set and
# kv_proj, the 8x level, the FeatUp wrapper's duplicate frozen CLIP.
UNUSED_PROJECTOR_NAMES = ("query", "feature_8x_embedding")
UNUSED_PROJECTOR_PREFIXES = ("kv_proj.", "features_8x_projector.", "upsampler.model.")

_PREFIXES = [  # (released prefix, multigran prefix); first match wins
    ("model.mm_projector.upsampler.upsampler.", "visual.upsampler."),
    ("model.mm_projector.", "visual.mm_projector."),
    ("model.vision_tower.vision_tower.", "vision_tower."),
    ("model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
]


def is_unused_release_key(key: str) -> bool:
    if not key.startswith("model.mm_projector."):
        return False
    rest = key[len("model.mm_projector."):]
    return rest in UNUSED_PROJECTOR_NAMES or rest.startswith(UNUSED_PROJECTOR_PREFIXES)


def rename_key(key: str) -> str:
    for old, new in _PREFIXES:
        if key.startswith(old):
            return canonical_tower_key(new + key[len(old):])
    return key


def jbu_key(key: str) -> str | None:
    """A stage-0 checkpoint key -> its multigran key (`visual.upsampler.*`), or None when it is not the JBU stack."""
    for prefix in ("upsampler.upsampler.", "upsampler."):
        if key.startswith(prefix) and key[len(prefix):].split(".", 1)[0] in JBU_STEPS:
            return "visual.upsampler." + key[len(prefix):]
    return None


def load_jbu_checkpoint(path) -> dict[str, torch.Tensor]:
    """The JBU stack of a stage-0 checkpoint as {visual.upsampler.*: tensor}.

    Accepts the release's Lightning `.ckpt` (read with torch.load(weights_only=True): tensors and plain containers
    only, never arbitrary pickles), a plain state-dict file, or safetensors (also multigran's own stage-0 output).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointMismatchError(f"JBU checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            raise CheckpointMismatchError(
                f"{path} holds objects other than tensors and plain containers, which are not unpickled here (unsafe): "
                f"{str(error).splitlines()[0]}. Extract its state dict once in a trusted environment, e.g. "
                "torch.save(torch.load(path, weights_only=False)['state_dict'], 'jbu_state.pt'), and pass that file"
            ) from None
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]  # Lightning checkpoint
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointMismatchError(f"{path} is not a JBU checkpoint: expected a state dict of tensors")
    if any(key.startswith("visual.upsampler.") for key in state):  # multigran stage-0 output
        return {key: value for key, value in state.items() if key.startswith("visual.upsampler.")}
    found, dropped, skipped = {}, 0, []
    for key, value in state.items():
        new = jbu_key(key)
        if new is not None:
            found[new] = value
        elif key.startswith(("scale_net", "downsampler")):
            dropped += 1  # stage-0 training heads, dropped as the release does
        else:
            skipped.append(key)
    if not found:
        raise CheckpointMismatchError(
            f"{path} holds no JBU stack: expected keys like upsampler.up1.range_temp or "
            f"upsampler.upsampler.up1.range_temp, got {sorted(state)[:10]}"
        )
    if skipped:
        logger.info("JBU checkpoint %s: skipped %d tensors no multigran module uses (e.g. the frozen featurizer): %s",
                    path, len(skipped), _preview(skipped))
    logger.debug("JBU checkpoint %s: dropped %d stage-0 scale_net/downsampler tensors", path, dropped)
    return found


def _preview(keys, limit=8) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def release_separator_ids(tokenizer, vocab_size: int, where) -> list[int]:
    """The release's hard-coded separator ids [29892, 13], checked against the LLM's embedding size; logs what these
    rows are in this tokenizer when they are not its own "," and "\\n" (e.g. Qwen2)."""
    ids = list(RELEASE_SEPARATOR_IDS)
    if max(ids) >= vocab_size:
        raise CheckpointMismatchError(
            f"{where}: the release embeds the hard-coded Llama separator ids {ids} (',' and '\\n'; "
            f"llava/slice_process.py:11-12) for every LLM, but this LLM's embedding has only {vocab_size} rows: not a "
            "released checkpoint; convert with separators='tokenizer' to use the tokenizer's own ',' and '\\n'"
        )
    try:
        own = separator_token_ids(tokenizer)
    except ValueError:
        own = None
    if own == ids:
        logger.info("%s: slice separators: embedding rows %s (',' and '\\n', as the release hard-codes)", where, ids)
    else:
        pieces = tokenizer.convert_ids_to_tokens(ids) if max(ids) < len(tokenizer) else "ids beyond its vocabulary"
        logger.warning(
            "%s: slice separators kept as the release: embedding rows %s (Llama's ',' and '\\n', hard-coded for every "
            "LLM in llava/slice_process.py:11-12 and embedded at llava_arch.py:576-579), which this tokenizer reads "
            "as %s; its own ',' and '\\n' are %s. The checkpoint was trained with these rows; "
            "from_uhd_v2(..., separators='tokenizer') would use the tokenizer's own",
            where, ids, pieces, own if own is not None else "not single tokens",
        )
    return ids


def config_from_release(release: dict, tokenizer, vision_config=None, feature_scale_mask=None,
                        separators: str = "release", where="release", config_file="config.json") -> MultiGranConfig:
    """The released LLaVA-UHD v2 config.json -> MultiGranConfig (method "uhd", compat on, the release's evaluation
    pre-resize 1024, the release's separator ids [29892, 13] or, with separators="tokenizer", the tokenizer's).
    `config_file` names the file in errors."""
    if separators not in SEPARATOR_CHOICES:
        raise ValueError(f"separators must be one of {list(SEPARATOR_CHOICES)}, got {separators!r}")
    model_type = release.get("model_type")
    if model_type not in _LLM_TYPES:
        raise CheckpointMismatchError(
            f"{config_file}: model_type {model_type!r} is not a LLaVA-UHD v2 release ({', '.join(sorted(_LLM_TYPES))})"
        )
    text = {k: v for k, v in release.items() if not k.startswith(_NOT_LLM_UHD)}
    text_config = AutoConfig.for_model(_LLM_TYPES[model_type], **text)
    if vision_config is None:
        tower = str(release.get("mm_vision_tower", ""))
        if "clip-vit-large-patch14-336" not in tower:
            raise CheckpointMismatchError(
                f"the release's vision tower is {tower!r}: pass clip_dir (a Hugging Face CLIP directory) so its "
                "config is known"
            )
        vision_config = AutoConfig.for_model("clip_vision_model", **CLIP_L_336)
    select = release.get("mm_vision_select_feature", "patch")
    if select != "patch":
        raise CheckpointMismatchError(f"mm_vision_select_feature {select!r} is not supported by LLaVA-UHD v2 (patch)")
    mask = release.get("feature_scale_mask", 7) if feature_scale_mask is None else feature_scale_mask
    if isinstance(mask, bool) or not isinstance(mask, int) or not 1 <= mask <= 7:
        raise CheckpointMismatchError(
            f"feature_scale_mask {mask!r} is not supported: multigran implements the 1x/2x/4x levels (1..7), not 8x"
        )
    if separators == "release":
        separator_ids = release_separator_ids(tokenizer, text_config.vocab_size, where)
    else:
        separator_ids = separator_token_ids(tokenizer)
    return MultiGranConfig(
        vision_config=vision_config.to_dict(),
        text_config=text_config.to_dict(),
        method="uhd",
        method_settings={
            "feature_scale_mask": mask, "compat": True, "pre_resize_long_side": EVAL_PRE_RESIZE_LONG_SIDE,
            "separator_ids": separator_ids,
        },
        vision_feature_layer=release.get("mm_vision_select_layer", -2),
        vision_feature_select_strategy="default",
    )


def from_uhd_v2(src_dir, dst_dir, jbu_ckpt=None, clip_dir=None, feature_scale_mask=None,
                separators: str = "release") -> Path:
    """Converts a released LLaVA-UHD v2 directory (config, safetensors, tokenizer) into a multigran directory.

    jbu_ckpt: the stage-0 JBU checkpoint (`clip-large-jbu.ckpt`), needed when the directory has no JBU weights.
    clip_dir: a Hugging Face CLIP (vision) directory, needed when the release's config does not name CLIP-L/336 or its
        weights lack the vision tower (they are then taken from there).
    feature_scale_mask: overrides the release config's value (7 if absent; the Qwen2/13B releases use 5).
    separators: "release" (default: the release's hard-coded ids 29892 and 13, what the checkpoint was trained with)
        or "tokenizer" (the tokenizer's own "," and "\\n").
    Keys and shapes are checked before anything is written; unused release tensors are skipped with a logged note.
    """
    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    config_path = src_dir / "config.json"
    if not config_path.is_file():
        raise CheckpointMismatchError(f"{src_dir} has no config.json: not a released checkpoint directory")
    vision_config = None
    if clip_dir is not None:
        clip_config = AutoConfig.from_pretrained(clip_dir)
        vision_config = getattr(clip_config, "vision_config", clip_config)

    tokenizer = AutoTokenizer.from_pretrained(src_dir)
    if "<image>" not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    config = config_from_release(json.loads(config_path.read_text()), tokenizer, vision_config, feature_scale_mask,
                                 separators, where=str(src_dir), config_file=config_path)
    logger.info("%s: evaluation pre-resize of the long side to %d before slicing, as the release's evaluation "
                "(llava/eval/model_vqa_loader.py:56-61); per benchmark pass pre_resize_long_side=uhd_eval_pre_resize("
                "task) to the processor (1536 TextVQA, None AI2D/MMBench)", src_dir, EVAL_PRE_RESIZE_LONG_SIDE)
    config.image_token_id = tokenizer.convert_tokens_to_ids("<image>")

    model = build_on_meta(config)
    expected = expected_state(model)
    checkpoint = SafetensorsCheckpoint(src_dir)
    unused = [key for key in checkpoint.keys() if is_unused_release_key(key)]
    if unused:
        logger.info("%s: skipped %d release tensors no multigran module uses (the base resampler's query/kv_proj, "
                    "the 8x level, the FeatUp wrapper's duplicate CLIP): %s", src_dir, len(unused), _preview(unused))
    sources = {rename_key(key): (checkpoint, key) for key in checkpoint.keys() if not is_unused_release_key(key)}
    if clip_dir is not None and not any(key.startswith("vision_tower.") for key in sources):
        sources.update(tower_weights_from(clip_dir))

    extra = {}
    if jbu_ckpt is not None:
        jbu = load_jbu_checkpoint(jbu_ckpt)
        kept = sorted(key for key in jbu if key in sources)
        if kept:
            logger.info("%s already holds %d JBU tensors (fine-tuned in stage 2): kept; %s only fills missing ones",
                        src_dir, len(kept), jbu_ckpt)
        if not any(key.startswith(SECOND_STEP) for key in expected):  # the 2x stack (masks 2, 3) has no up2
            unused_jbu = sorted(key for key in jbu if key.startswith(SECOND_STEP))
            if unused_jbu:  # as the release's load_state_dict(strict=False) (hubconf.py:166-169)
                logger.info("%s: the 2x JBU stack of feature_scale_mask %d has no second step: %d up2 tensors of the "
                            "stage-0 checkpoint left unused", jbu_ckpt, config.method_settings["feature_scale_mask"],
                            len(unused_jbu))
            jbu = {key: value for key, value in jbu.items() if not key.startswith(SECOND_STEP)}
        extra = {key: value for key, value in jbu.items() if key not in sources}
    missing_jbu = sorted(
        k for k in expected if k.startswith("visual.upsampler.") and k not in sources and k not in extra
    )
    if missing_jbu and jbu_ckpt is None:
        raise CheckpointMismatchError(
            f"{src_dir} has no JBU upsampler weights ({_preview(missing_jbu)} missing): pass the stage-0 checkpoint "
            "(jbu_ckpt=..., `multigran convert uhd-v2 SRC DST --jbu clip-large-jbu.ckpt`)"
        )
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    sources = {key: value for key, value in sources.items() if key not in tied}
    write_checked(sources, expected, dst_dir, source=f"{src_dir}" + (f" + {jbu_ckpt}" if jbu_ckpt else ""),
                  extra=extra)
    config.save_pretrained(dst_dir)
    if (src_dir / "generation_config.json").is_file():
        shutil.copy(src_dir / "generation_config.json", dst_dir / "generation_config.json")
    size = config.vision_config.image_size
    image_processor = MultiGranImageProcessor(
        method="uhd", method_settings=config.method_settings, patch_size=config.vision_config.patch_size,
        size={"shortest_edge": size}, crop_size={"height": size, "width": size},
    )
    # Vicuna releases talk in LLaVA's vicuna_v1 format; Qwen2 releases in the tokenizer's own (ChatML) template.
    chat_template = inference_chat_template("vicuna_v1") if config.text_config.model_type == "llama" else None
    MultiGranProcessor(image_processor=image_processor, tokenizer=tokenizer,
                       chat_template=chat_template).save_pretrained(dst_dir)
    logger.info("converted %s -> %s (%d tensors)", src_dir, dst_dir, len(sources) + len(extra))
    return dst_dir


__all__ = ["from_uhd_v2", "load_jbu_checkpoint", "config_from_release", "rename_key"]
