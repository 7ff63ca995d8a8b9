"""Loading saved multigran models and processors for the commands, the server and evaluation."""

from pathlib import Path


def resolve_device_dtype(device: str, dtype: str):
    """("auto"|"cpu"|"cuda[:N]", "auto"|dtype name) -> (device string, torch dtype). "auto": CUDA with bf16 if
    available, else the CPU in float32."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device} was asked for but CUDA is not available on this machine")
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    return device, getattr(torch, dtype)


def check_model_dir(path):
    if not (Path(path) / "config.json").is_file():
        raise ValueError(f"{path} is not a model directory (no config.json); create one with `multigran init-tiny` "
                         "or `multigran convert`")


def load_processor(path):
    from transformers import AutoProcessor

    import multigran  # noqa: F401  (registers the Auto classes)

    check_model_dir(path)
    return AutoProcessor.from_pretrained(path)


def load_model(path, device="auto", dtype="auto"):
    """Loads a saved multigran model onto a device, in a dtype ("auto": bf16 on CUDA, fp32 on CPU), in eval mode."""
    from transformers import AutoModelForImageTextToText
    from transformers.utils import logging as hf_logging

    import multigran  # noqa: F401

    check_model_dir(path)
    device, torch_dtype = resolve_device_dtype(device, dtype)
    hf_logging.disable_progress_bar()  # keep stderr for our messages and stdout for the answer
    return AutoModelForImageTextToText.from_pretrained(path, dtype=torch_dtype).to(device).eval()


__all__ = ["check_model_dir", "load_model", "load_processor", "resolve_device_dtype"]
