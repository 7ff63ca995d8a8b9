"""Visual pipelines: one file per method, chosen by `config.method` through this explicit table."""

from .anyres import AnyResPipeline
from .avg import AvgPipeline

PIPELINES = {
    "anyres": AnyResPipeline,
    "avg": AvgPipeline,
}


def build_pipeline(config):
    if config.method not in PIPELINES:
        raise ValueError(f"unknown method {config.method!r}; available methods: {sorted(PIPELINES)}")
    return PIPELINES[config.method](config)


__all__ = ["PIPELINES", "build_pipeline"]
