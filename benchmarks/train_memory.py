"""Peak training memory per method, with and without activation checkpointing (`gradient_checkpointing_enable()`).

One training step (forward + backward of the answer loss, every weight trainable) on one 672x448 image at the papers'
geometry: a CLIP-B/16-shaped tower at 336 px (24x24 grid, 2 of its layers), a Qwen2-0.5B-wide LM (2 layers), MG-LLaVA's
ConvNeXt at 768 px (stage widths 96..768, its last stage on the 24x24 grid) and LLaVA-UHD v2's 4x JBU pyramid and
window attention. Settings: no checkpointing; checkpointing of the towers and LM layers only (what transformers'
own modules do); and everything, the pipelines' heavy modules included. Recorded per method and setting:
- `saved_activation_bytes`: bytes the autograd graph holds for the backward pass at the end of the forward (distinct
  storages seen by saved-tensor hooks; activations inside checkpointed regions are not held). Deterministic.
- `peak_bytes`: the CUDA allocator's peak on GPU; on CPU the growth of the resident set size (sampled, noisier).
- `backward_seconds`, and whether the gradients equal those without checkpointing.

    python benchmarks/train_memory.py [--methods anyres,avg,mg,uhd] [--device cpu|cuda]
Writes benchmarks/results/train_memory.json.
"""

import argparse
import gc

import numpy as np
import torch
from PIL import Image
from transformers import AutoConfig

from common import CLIP_B_336, PeakMemory, environment, timed, write_result
from multigran.configuration import MultiGranConfig
from multigran.modeling import MultiGranForConditionalGeneration
from multigran.pipelines import settings_for
from multigran.processing import MultiGranImageProcessor, MultiGranProcessor
from multigran.tiny import SPECIAL_TOKENS, build_tiny_tokenizer

PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # LLaVA-NeXT's
SETTINGS = {
    "mg": {"high_res": 768, "convnext_config": {"hidden_sizes": [96, 192, 384, 768], "depths": [1, 1, 1, 1]}},
    "uhd": {},
    "avg": {"granularity": 144},
    "anyres": {},
}
BOXES = {"mg": {"boxes": [[[20, 30, 300, 200], [100, 100, 600, 400], [0, 0, 672, 448]]]}}


def build(method, device):
    tokenizer = build_tiny_tokenizer()
    vision = AutoConfig.for_model(**{**CLIP_B_336, "num_hidden_layers": 2})
    text = AutoConfig.for_model("qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=2,
                                num_attention_heads=14, num_key_value_heads=2, vocab_size=len(tokenizer),
                                max_position_embeddings=32768, sliding_window=None, pad_token_id=3)
    settings = settings_for(method, SETTINGS[method], tokenizer)
    config = MultiGranConfig(vision_config=vision, text_config=text, method=method, method_settings=settings,
                             image_token_id=SPECIAL_TOKENS.index("<image>"), image_grid_pinpoints=PINPOINTS)
    torch.manual_seed(0)
    model = MultiGranForConditionalGeneration(config).to(device).train()
    model.requires_grad_(True)
    image_processor = MultiGranImageProcessor(method=method, method_settings=settings, patch_size=14,
                                              image_grid_pinpoints=PINPOINTS)
    return model, MultiGranProcessor(image_processor=image_processor, tokenizer=tokenizer)


class SavedActivations:
    """Distinct storages saved for backward while the block runs (what checkpointing avoids keeping)."""

    def __init__(self):
        self.storages = {}

    def pack(self, tensor):
        if tensor.device.type != "meta":
            storage = tensor.untyped_storage()
            self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    def __enter__(self):
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda tensor: tensor)
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)

    @property
    def bytes(self):
        return sum(self.storages.values())


def step(model, inputs, checkpointing, device, pipeline=True):
    """One forward + backward; checkpointing of the towers and LM layers, and (pipeline=True) of the pipeline's own
    heavy modules too."""
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        for module in model.visual.modules():
            if type(module).__module__.startswith("multigran.") and hasattr(module, "gradient_checkpointing"):
                module.gradient_checkpointing = pipeline
    else:
        model.activation_checkpointing_disable()
    model.zero_grad(set_to_none=True)
    gc.collect()
    torch.manual_seed(0)
    with PeakMemory(device) as peak:
        with SavedActivations() as saved:
            loss = model(**inputs).loss
        seconds, _ = timed(loss.backward, device)
    gradients = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return {"saved_activation_bytes": saved.bytes, "peak_bytes": peak.peak_bytes, "backward_seconds": seconds}, gradients


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="anyres,avg,mg,uhd")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (448, 672, 3), dtype=np.uint8))
    results = {"environment": environment(device), "image": [672, 448], "methods": {}}
    for method in args.methods.split(","):
        model, processor = build(method, device)
        inputs = processor(images=[image], text=["USER: <image>\nWhat is shown? ASSISTANT: a red square and a dot"],
                           **BOXES.get(method, {}))
        inputs["labels"] = inputs["input_ids"].clone()
        inputs = inputs.to(device)
        plain, reference = step(model, inputs, False, device)
        towers_and_lm, _ = step(model, inputs, True, device, pipeline=False)
        checkpointed, gradients = step(model, inputs, True, device)
        equal = reference.keys() == gradients.keys() and all(
            torch.allclose(gradients[n], reference[n], atol=1e-5, rtol=1e-4) for n in reference)
        entry = {
            "visual_tokens": int((inputs["input_ids"] == model.config.image_token_id).sum()),
            "without_checkpointing": plain, "towers_and_lm_layers_only": towers_and_lm,
            "with_checkpointing": checkpointed, "gradients_equal": bool(equal),
            "saved_activation_reduction": 1 - checkpointed["saved_activation_bytes"] / plain["saved_activation_bytes"],
        }
        results["methods"][method] = entry
        print(f"{method:7s} saved activations {plain['saved_activation_bytes'] / 2**20:8.1f} MiB -> "
              f"{towers_and_lm['saved_activation_bytes'] / 2**20:8.1f} MiB (towers + LM layers only) -> "
              f"{checkpointed['saved_activation_bytes'] / 2**20:8.1f} MiB "
              f"({entry['saved_activation_reduction']:.0%} less), peak {plain['peak_bytes'] / 2**20:.0f} -> "
              f"{checkpointed['peak_bytes'] / 2**20:.0f} MiB, gradients equal: {equal}", flush=True)
        del model, reference, gradients
        gc.collect()
    print(f"wrote {write_result('train_memory.json', results)}")


if __name__ == "__main__":
    main()
