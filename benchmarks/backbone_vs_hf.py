"""multigran's anyres backbone vs Hugging Face's LlavaNextForConditionalGeneration, same weights, one process.

Alternating runs (>= 5 pairs) of prefill latency (forward over the whole prompt with a 672x672 image), decode
throughput (greedy new tokens per second after the prefill) and peak memory, on a CLIP-B-shaped tower and a
Qwen2-0.5B-shaped LLM with random weights. Results: benchmarks/results/backbone_vs_hf.json (with the median ratio).

    python benchmarks/backbone_vs_hf.py [--pairs 5] [--new-tokens 16] [--device cpu|cuda] [--dtype float32|bfloat16]
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

sys.path.insert(0, str(Path(__file__).parent))
from common import CLIP_B_336, QWEN2_05B, PeakMemory, environment, summary, synchronize, timed, write_result  # noqa: E402

from multigran import MultiGranForConditionalGeneration, MultiGranProcessor  # noqa: E402
from multigran.convert import from_llava_next  # noqa: E402
from multigran.tiny import CHAT_TEMPLATE, build_tiny_tokenizer  # noqa: E402


def build_pair(workdir: Path, dtype, device):
    tokenizer = build_tiny_tokenizer()
    config = LlavaNextConfig(vision_config=dict(CLIP_B_336), text_config=dict(QWEN2_05B),
                             image_token_index=tokenizer.convert_tokens_to_ids("<image>"), tie_word_embeddings=True)
    torch.manual_seed(0)
    reference = LlavaNextForConditionalGeneration(config)
    processor = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}),
        tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )
    reference.save_pretrained(workdir / "hf")
    processor.save_pretrained(workdir / "hf")
    from_llava_next(workdir / "hf", workdir / "mg")
    ours = MultiGranForConditionalGeneration.from_pretrained(workdir / "mg", dtype=dtype).to(device).eval()
    reference = LlavaNextForConditionalGeneration.from_pretrained(workdir / "hf", dtype=dtype).to(device).eval()
    return reference, ours, MultiGranProcessor.from_pretrained(workdir / "mg")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--output", default="backbone_vs_hf.json")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    with tempfile.TemporaryDirectory() as tmp:
        reference, ours, processor = build_pair(Path(tmp), dtype, device)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (672, 672, 3), dtype=np.uint8))
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}],
        add_generation_prompt=True,
    )
    inputs = processor(images=image, text=prompt).to(device)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    models = {"multigran": ours, "hf": reference}
    results = {name: {"prefill_s": [], "decode_tokens_per_s": [], "prefill_peak_bytes": []} for name in models}

    def decode(model, steps):
        """Greedy decoding after a prefill, timed on its own: one token per step from the cache."""
        out = model(**inputs, use_cache=True)
        cache, token = out.cache, out.logits[:, -1:].argmax(-1)
        mask = inputs["attention_mask"]
        synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            out = model(input_ids=token, attention_mask=mask, cache=cache, use_cache=True)
            cache, token = out.cache, out.logits[:, -1:].argmax(-1)
        synchronize(device)
        return steps / (time.perf_counter() - start)

    with torch.inference_mode():
        for model in models.values():  # warm-up (allocator, kernels)
            model(**inputs)
        for pair in range(args.pairs):
            order = list(models) if pair % 2 == 0 else list(models)[::-1]  # alternate who goes first
            for name in order:
                model = models[name]
                with PeakMemory(device) as memory:
                    prefill, _ = timed(lambda: model(**inputs), device)
                tokens_per_second = decode(model, args.new_tokens)
                results[name]["prefill_s"].append(prefill)
                results[name]["decode_tokens_per_s"].append(tokens_per_second)
                results[name]["prefill_peak_bytes"].append(memory.peak_bytes)
                print(f"pair {pair} {name:9s} prefill {prefill:.3f}s decode {tokens_per_second:.1f} tok/s", flush=True)

    ratios = [a / b for a, b in zip(results["multigran"]["prefill_s"], results["hf"]["prefill_s"])]
    data = {
        "benchmark": "anyres backbone: multigran vs transformers LlavaNextForConditionalGeneration (same weights)",
        "shapes": {"vision": CLIP_B_336, "text": QWEN2_05B, "image": [672, 672],
                   "prompt_tokens": int(inputs["input_ids"].shape[1])},
        "dtype": args.dtype, "pairs": args.pairs, "new_tokens": args.new_tokens, "environment": environment(device),
        "multigran": {k: summary(v) for k, v in results["multigran"].items()},
        "hf": {k: summary(v) for k, v in results["hf"].items()},
        "prefill_latency_ratio_median": statistics.median(ratios),
        "decode_throughput_ratio_median": statistics.median(
            [a / b for a, b in zip(results["multigran"]["decode_tokens_per_s"], results["hf"]["decode_tokens_per_s"])]
        ),
        "target": "prefill_latency_ratio_median <= 1.0",
    }
    path = write_result(args.output, data)
    print(f"median prefill latency ratio multigran/hf = {data['prefill_latency_ratio_median']:.3f} -> {path}")


if __name__ == "__main__":
    main()
