"""LoRA / QLoRA on the LLM through `peft` (an optional extra: `pip install multigran[lora]`), and merging.

- Adapters go on every nn.Linear of `language_model` except `lm_head` (LLaVA's `find_all_linear_names`), unless the
  recipe names `lora.target_modules`.
- The other trainable parts of the recipe (projector, router, ...) are trained in full: they become peft
  `modules_to_save`, so the adapter checkpoint carries them and merging restores them.
- QLoRA loads the LLM in 4-bit NF4 (double quantization, bf16 compute; the QLoRA paper's settings) and needs CUDA and
  bitsandbytes; the vision tower, the visual pipeline and lm_head stay unquantized.
- `merge_lora(adapter_dir, output_dir)` folds the adapters into the base weights and saves a plain multigran directory.
"""

import os

from torch import nn


def require_peft():
    from ..extras import require

    return require("peft", "lora")


def check_qlora_available():
    import torch

    if not torch.cuda.is_available():
        raise ValueError("QLoRA (lora.qlora: true) needs a CUDA GPU: 4-bit bitsandbytes kernels do not run on CPU; "
                         "use plain LoRA (lora.qlora: false) here")
    from ..extras import require

    require("bitsandbytes", "qlora")


def qlora_quantization_config():
    """4-bit NF4 with double quantization and bf16 compute (QLoRA paper); non-LLM parts and lm_head stay in full."""
    import torch
    from transformers import BitsAndBytesConfig

    check_qlora_available()
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=["vision_tower", "visual", "lm_head"],
    )


def llm_linear_names(model) -> list[str]:
    """Full names of the LLM's linear layers except lm_head (where LoRA adapters go by default)."""
    names = []
    for name, module in model.named_modules():
        if not name.startswith("language_model.") or name.endswith("lm_head"):
            continue
        if isinstance(module, nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt"):
            names.append(name)
    if not names:
        raise ValueError("found no linear layer in language_model to put LoRA adapters on")
    return names


def modules_to_save(model, prefixes) -> list[str]:
    """Module names that hold the trainable prefixes outside the LLM (a parameter prefix -> its module)."""
    module_names = dict(model.named_modules())
    parameter_names = dict(model.named_parameters())
    out = []
    for prefix in prefixes:
        if prefix == "language_model" or prefix.startswith("language_model."):
            raise ValueError(
                f"trainable prefix {prefix!r}: with LoRA the LLM is trained through its adapters (lora.learning_rate); "
                "remove it from trainable or set lora: null for full fine-tuning"
            )
        if prefix in module_names:
            out.append(prefix)
        elif prefix in parameter_names:
            out.append(prefix.rpartition(".")[0])
        else:  # a prefix of several modules (e.g. "visual.proj") is not a module: peft needs module names
            raise ValueError(f"trainable prefix {prefix!r} must name a module or a parameter when LoRA is on")
    # a module inside another one to save is saved with it
    return sorted({name for name in out if not any(name.startswith(other + ".") for other in out if other != name)})


def apply_lora(model, settings, trainable_prefixes):
    """Wraps the model in a peft LoRA model (adapters on the LLM, full training of the other trainable parts)."""
    peft = require_peft()
    if settings.qlora:
        check_qlora_available()
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = peft.LoraConfig(
        r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout, bias="none",
        target_modules=list(settings.target_modules or llm_linear_names(model)),
        modules_to_save=modules_to_save(model, trainable_prefixes) or None,
    )
    return peft.get_peft_model(model, config)


def merge_lora(adapter_dir, output_dir, base_model: str | None = None, dtype: str = "float32"):
    """Base model + adapters (a LoRA training's output or checkpoint) -> a plain multigran directory."""
    import json

    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import multigran  # noqa: F401  (registers the Auto classes)

    peft = require_peft()
    adapter_dir = os.fspath(adapter_dir)
    config_path = os.path.join(adapter_dir, "adapter_config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"{adapter_dir} holds no LoRA adapter (no adapter_config.json)")
    if base_model is None:
        with open(config_path, encoding="utf-8") as handle:
            base_model = json.load(handle).get("base_model_name_or_path")
        if not base_model:
            raise ValueError(f"{config_path} does not name its base model: pass the base model directory")
    if not os.path.isfile(os.path.join(base_model, "config.json")):
        raise ValueError(f"base model {base_model!r} is not a multigran model directory (no config.json)")
    model = AutoModelForImageTextToText.from_pretrained(base_model, dtype=getattr(torch, dtype))
    model = peft.PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    model.save_pretrained(output_dir)
    processor_source = adapter_dir if os.path.isfile(os.path.join(adapter_dir, "processor_config.json")) else base_model
    AutoProcessor.from_pretrained(processor_source).save_pretrained(output_dir)
    return model


__all__ = ["apply_lora", "merge_lora", "llm_linear_names", "modules_to_save", "qlora_quantization_config",
           "require_peft"]
