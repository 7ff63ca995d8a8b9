"""Optional extras: a feature whose packages are missing ends in one line that names the extra to install."""

import importlib

# extra name -> what it enables (shown in the message and in the README's table)
EXTRAS = {
    "serve": "the OpenAI-compatible server (`multigran serve`)",
    "eval": "benchmark evaluation with lmms-eval",
    "detect": "OWLv2 object detection (`multigran detect`)",
    "lora": "LoRA training and merging",
    "qlora": "QLoRA training (4-bit base weights)",
    "deepspeed": "DeepSpeed ZeRO training",
    "flash": "FlashAttention-2 kernels",
}


class MissingExtraError(ImportError):
    """Raised instead of a bare ImportError; its message is one line naming the extra."""


def require(module: str, extra: str):
    """Imports `module` or raises MissingExtraError naming `pip install 'multigran[extra]'`."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise MissingExtraError(
            f"{EXTRAS.get(extra, extra)} needs the '{extra}' extra ({module} is not installed: {error}): "
            f"pip install 'multigran[{extra}]'"
        ) from None
