"""Visual pipelines: one file per method, chosen by `config.method` through this explicit table."""

from .anyres import AnyResPipeline
from .avg import AvgPipeline
from .mg import MgPipeline
from .uhd import UhdPipeline

PIPELINES = {
    "anyres": AnyResPipeline,
    "avg": AvgPipeline,
    "mg": MgPipeline,
    "uhd": UhdPipeline,
}


def settings_for(method: str, settings: dict | None, tokenizer) -> dict:
    """`method_settings` completed with what the method reads from the tokenizer (e.g. UHD's separator ids), through
    the pipeline's optional `settings_from_tokenizer(settings, tokenizer)`."""
    if method not in PIPELINES:
        raise ValueError(f"unknown method {method!r}; available methods: {sorted(PIPELINES)}")
    hook = getattr(PIPELINES[method], "settings_from_tokenizer", None)
    settings = dict(settings or {})
    return hook(settings, tokenizer) if hook is not None else settings


def build_pipeline(config):
    if config.method not in PIPELINES:
        raise ValueError(f"unknown method {config.method!r}; available methods: {sorted(PIPELINES)}")
    return PIPELINES[config.method](config)


__all__ = ["PIPELINES", "build_pipeline", "settings_for"]
