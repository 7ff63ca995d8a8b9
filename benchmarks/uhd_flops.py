"""LLaVA-UHD v2 vs LLaVA-NeXT AnyRes: analytic FLOPs for 7B shapes, and the CPU latency of the JBU and the window
attention on one 336x336 slice at real width.

FLOPs are counted from the real modules built on the `meta` device (CLIP-ViT-L/14-336, Vicuna-7B-shaped Llama, the
UHD pipeline's JBU4xStack and HiwinProjector, the AnyRes projector): every Linear / 1x1 convolution contributes
2 x in x out per position it is applied to, attention 2 x (QK^T + AV) MACs, the JBU's per-pixel kernels their window
and channel counts, RoIAlign its bilinear taps (4 per sample, samples per bin as torchvision's sampling_ratio=-1).
Element-wise work (norms, softmax, activations, additions) is left out in both pipelines. Token counts come from the
processors' own functions (`plan_slices`/`count_uhd_tokens`, `count_anyres_tokens`). UHD uses the release's
evaluation N_max = 9 and feature_scale_mask 7 (1x, 2x, 4x); both prompts carry TEXT_TOKENS text tokens; the LLM
prefill computes logits for the last position only, as generation does.

Target (issue 5): UHD v2 total <= 40% of AnyRes at 1008x672 (paper, 7B: 17.5T vs 44.4T).
Results: benchmarks/results/uhd_flops.json.

    python benchmarks/uhd_flops.py [--repeats 3] [--skip-latency]
"""

import argparse
import math
import sys
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, CLIPVisionModel

sys.path.insert(0, str(Path(__file__).parent))
from common import CLIP_L_336, environment, summary, timed, write_result  # noqa: E402
from flops import linear_macs, llm_flops, on_meta, vision_tower_flops  # noqa: E402

from multigran import MultiGranConfig  # noqa: E402
from multigran.configuration import DEFAULT_GRID_PINPOINTS  # noqa: E402
from multigran.pipelines.anyres import MultiModalProjector, count_anyres_tokens, num_crops  # noqa: E402
from multigran.pipelines.uhd import MAX_SLICES_EVAL, UhdPipeline, count_uhd_tokens, plan_slices  # noqa: E402
from multigran.pipelines.uhd_hiwin import LEVELS, HiwinProjector, pooling_size, window_boxes  # noqa: E402
from multigran.pipelines.uhd_jbu import JBU4xStack  # noqa: E402

# Vicuna-7B v1.5 (lmsys/vicuna-7b-v1.5 config): the LLM of both papers' 7B models.
VICUNA_7B = dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
TEXT_TOKENS = 64  # system prompt + a short question, the same for both pipelines
SIZES = [(1008, 672), (336, 336), (672, 672), (1024, 1024), (1344, 672), (672, 1344), (2048, 1536)]  # (width, height)
TILE, PATCH = 336, 14


def conv_macs(module: nn.Module) -> int:
    """Multiply-accumulates per output pixel of every 1x1 Conv2d in `module`."""
    total = 0
    for child in module.modules():
        if isinstance(child, nn.Conv2d):
            assert child.kernel_size == (1, 1), child
            total += child.in_channels * child.out_channels
    return total


def jbu_flops(stack: JBU4xStack, grid) -> int:
    """One view's JBU stack on an (h, w) patch grid: two 2x steps (h, w) -> (2h, 2w) -> (4h, 4w) and the 4x fix-up."""
    total, (height, width) = 0, grid
    for step in (stack.up1, stack.up2):
        height, width = height * step.scale, width * step.scale
        pixels, window = height * width, step.diameter**2
        key_dim = step.range_proj[0].out_channels
        channels = step.feat_dim
        per_pixel = (conv_macs(step.range_proj) + conv_macs(step.fixup_proj)  # range keys, kernel fix-up
                     + window * key_dim  # <P[p+q], P[p]> over the window
                     + 16 * channels  # bicubic 2x upsampling of the features: 4x4 taps
                     + window * channels)  # the adaptive convolution
        total += 2 * pixels * per_pixel
    total += 2 * height * width * conv_macs(stack.fixup_proj)  # 4x output: x + 0.1 * Conv1x1(x)
    return total


def roi_align_macs(height: int, width: int, pooled, grid_size: int) -> int:
    """Bilinear taps of RoIAlign over every window of an (height, width) map, per channel (sampling_ratio=-1)."""
    total = 0
    for x1, y1, x2, y2 in window_boxes(height, width, grid_size).tolist():
        roi_h, roi_w = max(y2 - y1, 1.0), max(x2 - x1, 1.0)  # aligned=False
        samples = math.ceil(roi_h / pooled[0]) * math.ceil(roi_w / pooled[1])
        total += pooled[0] * pooled[1] * samples * 4
    return total


def hiwin_flops(hiwin: HiwinProjector, level_grids) -> int:
    """One view's window attention; level_grids: the (h_l, w_l) of each active level, in order 1x, 2x, 4x."""
    dim, windows = hiwin.embed_dim, hiwin.num_queries
    total, keys = 0, 0
    for bit, (height, width) in zip(hiwin.active_levels, level_grids):
        name, factor = LEVELS[bit]
        projector = getattr(hiwin, f"features_{name}_projector")
        total += 2 * height * width * projector.in_features * projector.out_features  # W_l X_l on the whole map
        pooled = pooling_size(height, width, factor, hiwin.compat)
        total += 2 * 2 * roi_align_macs(height, width, pooled, hiwin.grid_size) * dim  # keys and values
        keys += pooled[0] * pooled[1]
    queries = 4  # the four query sets, one query each per window
    in_proj = hiwin.attn.in_proj_weight.shape[1] * hiwin.attn.embed_dim  # D x D per projected token (q, k or v)
    per_window = (queries * in_proj + 2 * keys * in_proj  # q, k, v projections
                  + 2 * queries * keys * dim  # scores and weighted values
                  + queries * linear_macs(hiwin.attn.out_proj)  # out_proj, one per query set
                  + linear_macs(hiwin.cat_proj) + hiwin.proj.shape[0] * hiwin.proj.shape[1])
    return total + 2 * windows * per_window


def uhd_breakdown(models, width, height, max_slices=MAX_SLICES_EVAL) -> dict:
    tower, language_model, pipeline = models["tower"], models["llm"], models["uhd"]
    plan = plan_slices(width, height, max_slices, TILE, PATCH)
    view_sizes = [plan["slice_size"]] * (0 if plan["grid"] is None else plan["grid"][0] * plan["grid"][1])
    view_sizes.append(plan["overview_size"])
    grids = [(h // PATCH, w // PATCH) for w, h in view_sizes]
    vision = sum(vision_tower_flops(tower, 1, h * w + 1) for h, w in grids)  # + CLS
    pyramid = sum(jbu_flops(pipeline.upsampler, grid) for grid in grids)
    factors = [LEVELS[bit][1] for bit in pipeline.mm_projector.active_levels]
    window_attention = sum(hiwin_flops(pipeline.mm_projector, [(h * f, w * f) for f in factors]) for h, w in grids)
    visual_tokens = count_uhd_tokens(plan["grid"])
    prefill = llm_flops(language_model, visual_tokens + TEXT_TOKENS, logits_tokens=1)
    parts = {"vision_encoder": vision, "pyramid_jbu": pyramid, "window_attention": window_attention,
             "llm_prefill": prefill}
    return {"slice_grid": plan["grid"], "views": len(grids), "view_patch_grids": grids, "visual_tokens": visual_tokens,
            "flops": {**parts, "total": sum(parts.values())}}


def anyres_breakdown(models, width, height) -> dict:
    tower, language_model, projector = models["tower"], models["llm"], models["anyres_projector"]
    image_size = (height, width)  # HF order
    crops = num_crops(image_size, DEFAULT_GRID_PINPOINTS, TILE)
    grid = TILE // PATCH
    visual_tokens = count_anyres_tokens(image_size, DEFAULT_GRID_PINPOINTS, TILE, grid)
    vision = vision_tower_flops(tower, crops, grid * grid + 1)
    projection = 2 * crops * grid * grid * linear_macs(projector)  # every crop token is projected before unpadding
    prefill = llm_flops(language_model, visual_tokens + TEXT_TOKENS, logits_tokens=1)
    parts = {"vision_encoder": vision, "projector": projection, "llm_prefill": prefill}
    return {"crops": crops, "visual_tokens": visual_tokens, "flops": {**parts, "total": sum(parts.values())}}


def build_models():
    vision_config = AutoConfig.for_model(**CLIP_L_336)
    text_config = AutoConfig.for_model(**VICUNA_7B)
    config = MultiGranConfig(vision_config=vision_config.to_dict(), text_config=text_config.to_dict(), method="uhd",
                             method_settings={"feature_scale_mask": 7})
    return {
        "tower": on_meta(lambda: CLIPVisionModel(vision_config)),
        "llm": on_meta(lambda: AutoModelForCausalLM.from_config(text_config)),
        "uhd": on_meta(lambda: UhdPipeline(config)),
        "anyres_projector": on_meta(lambda: MultiModalProjector(vision_config.hidden_size, text_config.hidden_size)),
    }


def latency(repeats: int) -> dict:
    """CPU seconds of the JBU stack and the window attention for one 336x336 slice (C = 1024, D = 4096), fp32."""
    torch.manual_seed(0)
    device = torch.device("cpu")
    grid = TILE // PATCH
    source = torch.randn(1, 1024, grid, grid)
    guidance = torch.randn(1, 3, TILE, TILE)
    upsampler = JBU4xStack(1024).eval()
    hiwin = HiwinProjector(4096, 1024, feature_scale_mask=7).eval()
    results = {}
    with torch.no_grad():
        pyramid = upsampler(source, guidance)
        for name, run in (("jbu_stack", lambda: upsampler(source, guidance)),
                          ("window_attention", lambda: hiwin([list(pyramid)]))):
            run()  # warm-up
            results[name] = summary([timed(run, device)[0] for _ in range(repeats)])
    results["shapes"] = {"features_1x": list(source.shape), "guidance": list(guidance.shape),
                         "pyramid": [list(level.shape) for level in pyramid], "window_attention_out": [1, 144, 4096]}
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--output", default="uhd_flops.json")
    args = parser.parse_args()

    models = build_models()
    rows = []
    for width, height in SIZES:
        uhd, anyres = uhd_breakdown(models, width, height), anyres_breakdown(models, width, height)
        ratio = uhd["flops"]["total"] / anyres["flops"]["total"]
        rows.append({"image": f"{width}x{height}", "uhd_v2": uhd, "anyres": anyres, "uhd_over_anyres": ratio})
        print(f"{width}x{height}: UHD {uhd['flops']['total'] / 1e12:.2f} TFLOPs ({uhd['visual_tokens']} visual tokens, "
              f"{uhd['views']} views) vs AnyRes {anyres['flops']['total'] / 1e12:.2f} TFLOPs "
              f"({anyres['visual_tokens']} visual tokens, {anyres['crops']} crops): {100 * ratio:.1f}%")
    main_row = rows[0]
    # Reconciling with the paper's 17.5T vs 44.4T: AnyRes's full budget is 5 crops / 2928 tokens (any image whose
    # best grid is 2x2 and needs no unpadding, e.g. 672x672), while 1008x672 unpads to fewer tokens; and UHD's ViT +
    # LLM alone, without the JBU and the window attention.
    full_budget = next(r for r in rows if r["image"] == "672x672")["anyres"]["flops"]["total"]
    uhd_flops = main_row["uhd_v2"]["flops"]
    reconciliation = {
        "anyres_full_budget_total": full_budget,
        "anyres_full_budget_visual_tokens": next(r for r in rows if r["image"] == "672x672")["anyres"]["visual_tokens"],
        "uhd_over_anyres_full_budget": uhd_flops["total"] / full_budget,
        "uhd_vit_plus_llm_only": uhd_flops["vision_encoder"] + uhd_flops["llm_prefill"],
    }
    result = {
        "description": __doc__.split("\n\n")[0],
        "assumptions": {"text_tokens": TEXT_TOKENS, "uhd_max_slices": MAX_SLICES_EVAL, "uhd_feature_scale_mask": 7,
                        "anyres_pinpoints_hw": DEFAULT_GRID_PINPOINTS, "llm": VICUNA_7B, "vision": CLIP_L_336,
                        "prefill_logits": "last position only", "elementwise_ops": "not counted"},
        "sizes": rows,
        "target": {"image": main_row["image"], "uhd_over_anyres": main_row["uhd_over_anyres"], "goal": 0.40,
                   "met": main_row["uhd_over_anyres"] <= 0.40,
                   "paper_tflops": {"uhd_v2": 17.5, "llava_next": 44.4}, "reconciliation": reconciliation},
    }
    print(f"target at {main_row['image']}: UHD / AnyRes = {100 * main_row['uhd_over_anyres']:.1f}% (goal <= 40%); "
          f"vs AnyRes's full 2928-token budget {100 * reconciliation['uhd_over_anyres_full_budget']:.1f}%; UHD ViT + "
          f"LLM only {reconciliation['uhd_vit_plus_llm_only'] / 1e12:.2f}T (paper: 17.5T vs 44.4T)")
    if not args.skip_latency:
        result["cpu_latency_one_slice_s"] = latency(args.repeats)
        result["environment"] = environment(torch.device("cpu"))
        for name in ("jbu_stack", "window_attention"):
            print(f"CPU latency, one 336x336 slice, {name}: {result['cpu_latency_one_slice_s'][name]['median']:.3f} s")
    path = write_result(args.output, result)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
