"""A multigran checkpoint of one method -> the same weights under another method (e.g. AVG-LLaVA's stage 3 starts
from a LLaVA-NeXT `anyres` stage-2 model and adds the router).

Every tensor the two methods share moves over unchanged; the new method's own modules (the router, ...) start from
their initialisation; tensors the new method does not have are reported and dropped.
"""

import logging
from pathlib import Path

import torch

from ..loading import from_pretrained_checked, load_config, load_processor
from ..modeling import MultiGranForConditionalGeneration
from ..pipelines import PIPELINES, settings_for

logger = logging.getLogger(__name__)


# AnyRes's merge settings, which AVG-LLaVA (AnyRes + the adaptive-granularity layer) shares: a model keeps them when
# it moves between the two methods, so that its token layout does not change under it.
ANYRES_MERGE_SETTINGS = ("unpad_rounding", "patch_merge")


def carried_settings(source_method: str, source: dict | None, method: str, given: dict | None) -> dict:
    """The new method's settings: `given` laid over what the source model's settings still mean under `method`
    (all of them for the same method, e.g. adding `adaptive_granularity` to an mg model; AnyRes's merge settings
    between anyres and avg; nothing otherwise)."""
    source, given = dict(source or {}), dict(given or {})
    if source_method == method:
        return {**source, **given}
    if {source_method, method} == {"anyres", "avg"}:
        from ..pipelines.anyres import AnyResSettings
        from ..pipelines.avg import AvgSettings

        effective = (AnyResSettings if source_method == "anyres" else AvgSettings)(**source)  # defaults resolved
        return {**{k: getattr(effective, k) for k in ANYRES_MERGE_SETTINGS}, **given}
    return given


def switch_method(src_dir, dst_dir, method: str, method_settings: dict | None = None, seed: int = 0) -> dict:
    """Writes `dst_dir` (model + processor) with `method`; returns {"new": [...], "dropped": [...]} parameter names."""
    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    if method not in PIPELINES:
        raise ValueError(f"--to {method!r}: expected one of {', '.join(sorted(PIPELINES))}")
    if method_settings is not None and not isinstance(method_settings, dict):
        raise ValueError(f"method settings must be a JSON object, got {type(method_settings).__name__}")
    config = load_config(src_dir)  # every file of SRC checked first: errors name the file
    processor = load_processor(src_dir)
    config.method_settings = settings_for(
        method, carried_settings(config.method, config.method_settings, method, method_settings), processor.tokenizer)
    config.method = method
    source = from_pretrained_checked(src_dir, allow_missing=False)
    torch.manual_seed(seed)
    try:
        target = MultiGranForConditionalGeneration(config)
    except (TypeError, KeyError) as error:  # a setting of the wrong type deep in a module's constructor
        raise ValueError(f"method {method!r} with settings {config.method_settings}: {error}") from None
    source_state, target_state = source.state_dict(), target.state_dict()
    shared = {k: v for k, v in source_state.items() if k in target_state and target_state[k].shape == v.shape}
    mismatched = [k for k, v in source_state.items() if k in target_state and target_state[k].shape != v.shape]
    if mismatched:
        raise ValueError(f"{src_dir}: tensors change shape under method {method!r}: {mismatched[:10]}")
    target.load_state_dict(shared, strict=False)
    report = {"new": sorted(set(target_state) - set(source_state)),
              "dropped": sorted(set(source_state) - set(target_state))}
    if report["dropped"]:
        logger.warning("method %r has no place for %d tensors of %s: %s", method, len(report["dropped"]), src_dir,
                       report["dropped"][:10])
    target.save_pretrained(dst_dir)
    processor.image_processor.method = method
    processor.image_processor.method_settings = dict(config.method_settings)
    processor.save_pretrained(dst_dir)
    logger.info("%s (%s) -> %s (%s): %d new tensors", src_dir, source.config.method, dst_dir, method,
                len(report["new"]))
    return report
