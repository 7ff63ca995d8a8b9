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

The window attention is counted as the default implementation (hiwin_impl "fused") computes it, with its weight-only
tensors cached as in evaluation; its weight-only work (once while cached; every forward in training) and the release-
order reference path are reported next to it. RoIAlign's position-table term is counted per view (an upper bound).

Target (issue 5): UHD v2 total <= 40% of AnyRes at 1008x672 (paper, 7B: 17.5T vs 44.4T). Reported two ways: against
AnyRes at its full 5-crop, 2928-token budget (the paper's 44.4T; `met`), and against the HF-identical AnyRes at
1008x672 itself, which unpads to 2144 tokens: out of reach there, UHD's LLM prefill alone is ~44% of it.
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
from multigran.pipelines.uhd_hiwin import (  # noqa: E402
    LEVELS, NUM_QUERY_SETS, HiwinProjector, pooling_size, window_boxes,
)
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


def hiwin_reference_flops(hiwin: HiwinProjector, level_grids) -> int:
    """One view's window attention in the release's order of operations (impl="reference"); level_grids: the
    (h_l, w_l) of each active level, in order 1x, 2x, 4x."""
    dim, windows = hiwin.embed_dim, hiwin.num_queries
    total, keys = 0, 0
    for bit, (height, width) in zip(hiwin.active_levels, level_grids):
        name, factor = LEVELS[bit]
        projector = getattr(hiwin, f"features_{name}_projector")
        total += 2 * height * width * projector.in_features * projector.out_features  # W_l X_l on the whole map
        pooled = pooling_size(height, width, factor, hiwin.compat)
        total += 2 * 2 * roi_align_macs(height, width, pooled, hiwin.grid_size) * dim  # keys and values
        keys += pooled[0] * pooled[1]
    queries = NUM_QUERY_SETS  # the four query sets, one query each per window
    in_proj = hiwin.attn.in_proj_weight.shape[1] * hiwin.attn.embed_dim  # D x D per projected token (q, k or v)
    per_window = (queries * in_proj + 2 * keys * in_proj  # q, k, v projections
                  + 2 * queries * keys * dim  # scores and weighted values
                  + queries * linear_macs(hiwin.attn.out_proj)  # out_proj, one per query set
                  + linear_macs(hiwin.cat_proj) + hiwin.proj.shape[0] * hiwin.proj.shape[1])
    return total + 2 * windows * per_window


def output_macs(hiwin: HiwinProjector) -> int:
    """Per window, the same in both paths: out_proj of the four query sets, cat_proj, proj."""
    return (NUM_QUERY_SETS * linear_macs(hiwin.attn.out_proj) + linear_macs(hiwin.cat_proj)
            + hiwin.proj.shape[0] * hiwin.proj.shape[1])


def hiwin_fused_flops(hiwin: HiwinProjector, level_grids) -> dict:
    """One view's window attention as impl="fused" computes it with its weight-only tensors cached (eval), by part.

    Per-map-size terms (the RoIAlign of the resized position table) are counted per view: an upper bound, the module
    computes them once per group of same-size views.
    """
    heads, head_dim = hiwin.attn.num_heads, hiwin.attn.head_dim
    windows, queries = hiwin.num_queries, NUM_QUERY_SETS * hiwin.attn.num_heads  # (query, head) pairs per window
    table = hiwin.pos_embed.shape[0]
    parts = dict.fromkeys(["ln_kv_statistics", "roi_align", "position_term", "scores", "value_mixing",
                           "value_projection", "value_bias_terms", "output_projections"], 0)
    levels = len(hiwin.active_levels)
    for bit, (height, width) in zip(hiwin.active_levels, level_grids):
        name, factor = LEVELS[bit]
        channels = getattr(hiwin, f"features_{name}_projector").in_features  # C
        pooled = pooling_size(height, width, factor, hiwin.compat)
        keys = pooled[0] * pooled[1]
        taps = roi_align_macs(height, width, pooled, hiwin.grid_size)  # per channel
        parts["ln_kv_statistics"] += height * width * (channels * channels + 2 * channels)  # x^T G x + 2 g^T x
        parts["roi_align"] += taps * (channels + 2)  # x/s, 1/s, ones
        # M: bicubic resize (4x4 taps) and RoIAlign of the identity table, then M . (q' W_k T)
        parts["position_term"] += 16 * height * width * table + taps * table + windows * queries * table * keys
        parts["scores"] += windows * queries * keys * channels  # z . xtilde, C wide
        parts["value_mixing"] += windows * queries * keys * channels  # sum_j p_j xtilde_j, C wide
        parts["value_projection"] += windows * queries * head_dim * channels  # A_v[h] (d x C) per level
        parts["value_bias_terms"] += windows * queries * keys * (1 + levels)
    parts["value_bias_terms"] += windows * queries * (1 + levels) * head_dim
    parts["output_projections"] = windows * output_macs(hiwin)
    parts = {key: 2 * value for key, value in parts.items()}
    return {**parts, "total": sum(parts.values())}


def hiwin_weight_only_flops(hiwin: HiwinProjector) -> dict:
    """What impl="fused" computes from the weights alone: once per forward under autograd (training), once in all
    while it stays cached (eval / no_grad). Query work = everything that involves the queries."""
    dim, heads, head_dim = hiwin.embed_dim, hiwin.attn.num_heads, hiwin.attn.head_dim
    queries = hiwin.num_queries * NUM_QUERY_SETS
    table = hiwin.pos_embed.shape[0]
    in_proj = hiwin.attn.in_proj_weight.shape[1] * hiwin.attn.embed_dim  # one of W_q, W_k, W_v
    query_work = queries * in_proj  # q' = W_q q + b_q
    query_work += table * in_proj + queries * heads * table * head_dim  # q'_h . (W_k T_t)[h]
    folding = in_proj  # W_v beta
    for bit in hiwin.active_levels:
        projector = getattr(hiwin, f"features_{LEVELS[bit][0]}_projector")
        channels = projector.in_features
        folding += 2 * dim * projector.out_features * channels  # A_k = W_k Gamma C W_l and A_v
        folding += 3 * in_proj  # W_k Gamma C b_l, W_k (beta + e_l), W_v Gamma C b_l
        folding += channels * channels * dim + channels * dim  # G, g
        query_work += queries * heads * head_dim * channels + 2 * queries * dim  # z = A_k[h]^T q'_h; alpha, delta
    parts = {"query_work": 2 * query_work, "weight_folding": 2 * folding}
    return {**parts, "total": sum(parts.values())}


def uhd_breakdown(models, width, height, max_slices=MAX_SLICES_EVAL) -> dict:
    tower, language_model, pipeline = models["tower"], models["llm"], models["uhd"]
    plan = plan_slices(width, height, max_slices, TILE, PATCH)
    view_sizes = [plan["slice_size"]] * (0 if plan["grid"] is None else plan["grid"][0] * plan["grid"][1])
    view_sizes.append(plan["overview_size"])
    grids = [(h // PATCH, w // PATCH) for w, h in view_sizes]
    vision = sum(vision_tower_flops(tower, 1, h * w + 1) for h, w in grids)  # + CLS
    pyramid = sum(jbu_flops(pipeline.upsampler, grid) for grid in grids)
    hiwin = pipeline.mm_projector
    level_grids = [[(h * LEVELS[bit][1], w * LEVELS[bit][1]) for bit in hiwin.active_levels] for h, w in grids]
    fused = [hiwin_fused_flops(hiwin, levels) for levels in level_grids]
    fused_parts = {key: sum(view[key] for view in fused) for key in fused[0]}
    reference = sum(hiwin_reference_flops(hiwin, levels) for levels in level_grids)
    visual_tokens = count_uhd_tokens(plan["grid"])
    prefill = llm_flops(language_model, visual_tokens + TEXT_TOKENS, logits_tokens=1)
    # the default (fused) window attention, its weight-only work cached (eval)
    parts = {"vision_encoder": vision, "pyramid_jbu": pyramid, "window_attention": fused_parts["total"],
             "llm_prefill": prefill}
    total = sum(parts.values())
    return {"slice_grid": plan["grid"], "views": len(grids), "view_patch_grids": grids, "visual_tokens": visual_tokens,
            "flops": {**parts, "total": total},
            "window_attention": {
                "fused": fused_parts, "reference": reference, "reference_over_fused": reference / fused_parts["total"],
                "fused_weight_only_once": hiwin_weight_only_flops(hiwin),
                "total_with_reference_window_attention": total - fused_parts["total"] + reference}}


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
    """CPU seconds of the JBU stack and of the window attention (both implementations) for one 336x336 slice
    (C = 1024, D = 4096), fp32, eval, no_grad. "window_attention_fused" runs with its weight-only tensors cached (the
    inference setting); "window_attention_fused_uncached" rebuilds them every call (what a training forward pays)."""
    torch.manual_seed(0)
    device = torch.device("cpu")
    grid = TILE // PATCH
    source = torch.randn(1, 1024, grid, grid)
    guidance = torch.randn(1, 3, TILE, TILE)
    upsampler = JBU4xStack(1024).eval()
    hiwin = HiwinProjector(4096, 1024, feature_scale_mask=7).eval()
    results = {}

    def window_attention(impl, cached=True):
        def run():
            hiwin.impl = impl
            if not cached:
                hiwin.clear_fused_cache()
            return hiwin([list(pyramid)])
        return run

    with torch.no_grad():
        pyramid = upsampler(source, guidance)
        for name, run in (("jbu_stack", lambda: upsampler(source, guidance)),
                          ("window_attention_reference", window_attention("reference")),
                          ("window_attention_fused", window_attention("fused")),
                          ("window_attention_fused_uncached", window_attention("fused", cached=False))):
            run()  # warm-up (and, for the fused path, the cache)
            results[name] = summary([timed(run, device)[0] for _ in range(repeats)])
        hiwin.impl = "reference"
        reference = hiwin([list(pyramid)])
        hiwin.impl = "fused"
        fused = hiwin([list(pyramid)])
    results["fused_vs_reference_max_relative_difference"] = ((fused - reference).abs().max()
                                                              / reference.abs().max()).item()
    results["shapes"] = {"features_1x": list(source.shape), "guidance": list(guidance.shape),
                         "pyramid": [list(level.shape) for level in pyramid], "window_attention_out": [1, 144, 4096]}
    results["note"] = ("wall-clock on a 2-core machine shared with another process's training run: noisy, compare "
                       "the paths within one run only")
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
              f"{uhd['views']} views; window attention {uhd['flops']['window_attention'] / 1e12:.3f}T fused vs "
              f"{uhd['window_attention']['reference'] / 1e12:.3f}T reference) vs AnyRes "
              f"{anyres['flops']['total'] / 1e12:.2f} TFLOPs ({anyres['visual_tokens']} visual tokens, "
              f"{anyres['crops']} crops): {100 * ratio:.1f}%")
    main_row = rows[0]
    # Reconciling with the paper's 17.5T vs 44.4T: AnyRes's full budget is 5 crops / 2928 tokens (any image whose
    # best grid is 2x2 and needs no unpadding, e.g. 672x672), while 1008x672 unpads to fewer tokens; and UHD's ViT +
    # LLM alone, without the JBU and the window attention.
    full_budget_row = next(r for r in rows if r["image"] == "672x672")["anyres"]
    full_budget = full_budget_row["flops"]["total"]
    uhd_flops = main_row["uhd_v2"]["flops"]
    unpadded = main_row["anyres"]["flops"]["total"]
    reconciliation = {
        "anyres_full_budget_total": full_budget,
        "anyres_full_budget_visual_tokens": full_budget_row["visual_tokens"],
        "uhd_over_anyres_full_budget": uhd_flops["total"] / full_budget,
        "uhd_vit_plus_llm_only": uhd_flops["vision_encoder"] + uhd_flops["llm_prefill"],
        "uhd_llm_prefill_alone_over_anyres_unpadded": uhd_flops["llm_prefill"] / unpadded,
    }
    ratio_full = reconciliation["uhd_over_anyres_full_budget"]
    hiwin = main_row["uhd_v2"]["window_attention"]
    result = {
        "description": __doc__.split("\n\n")[0],
        "assumptions": {"text_tokens": TEXT_TOKENS, "uhd_max_slices": MAX_SLICES_EVAL, "uhd_feature_scale_mask": 7,
                        "anyres_pinpoints_hw": DEFAULT_GRID_PINPOINTS, "llm": VICUNA_7B, "vision": CLIP_L_336,
                        "prefill_logits": "last position only", "elementwise_ops": "not counted",
                        "uhd_window_attention": "hiwin_impl 'fused' (default), its weight-only tensors cached (eval); "
                                                "the reference path and the one-off weight-only work are reported "
                                                "next to it under uhd_v2.window_attention"},
        "sizes": rows,
        "target": {
            "image": main_row["image"],
            "goal": 0.40,
            "uhd_total_tflops": uhd_flops["total"] / 1e12,
            "window_attention_tflops": {"fused": hiwin["fused"]["total"] / 1e12,
                                        "reference": hiwin["reference"] / 1e12, "goal_fused": 0.75,
                                        "fused_weight_only_once": hiwin["fused_weight_only_once"]["total"] / 1e12},
            # (b) the paper's comparison: AnyRes at its full 5-crop, 2928-token budget (paper: 17.5T vs 44.4T)
            "uhd_over_anyres_full_budget": ratio_full,
            "met": ratio_full <= 0.40,
            # (a) HF-identical AnyRes at 1008x672 itself, unpadded to fewer tokens
            "uhd_over_anyres_unpadded": main_row["uhd_over_anyres"],
            "met_unpadded": main_row["uhd_over_anyres"] <= 0.40,
            "note": (f"'met' is the paper's comparison, (b): UHD total (ViT, JBU, window attention, LLM) over AnyRes "
                     f"at its full budget ({full_budget_row['visual_tokens']} visual tokens, "
                     f"{full_budget / 1e12:.1f}T; the paper's 44.4T). Against the HF-identical AnyRes at 1008x672 "
                     f"itself, (a), which unpads to "
                     f"{main_row['anyres']['visual_tokens']} visual tokens ({unpadded / 1e12:.1f}T), 40% cannot be "
                     f"reached whatever the vision side costs: UHD's LLM prefill alone is "
                     f"{100 * reconciliation['uhd_llm_prefill_alone_over_anyres_unpadded']:.0f}% of it."),
            "paper_tflops": {"uhd_v2": 17.5, "llava_next": 44.4},
            "reconciliation": reconciliation,
        },
    }
    print(f"window attention at {main_row['image']}: fused {hiwin['fused']['total'] / 1e12:.3f}T per image "
          f"(goal <= 0.75T; + {hiwin['fused_weight_only_once']['total'] / 1e12:.3f}T weight-only, once while cached) "
          f"vs reference {hiwin['reference'] / 1e12:.3f}T ({hiwin['reference_over_fused']:.1f}x)")
    print(f"target at {main_row['image']}: UHD total {uhd_flops['total'] / 1e12:.2f}T = "
          f"{100 * ratio_full:.1f}% of AnyRes at its full {full_budget_row['visual_tokens']}-token budget "
          f"({full_budget / 1e12:.2f}T; the paper's comparison, goal <= 40%: "
          f"{'met' if ratio_full <= 0.40 else 'not met'})"
          f"; {100 * main_row['uhd_over_anyres']:.1f}% of the unpadded HF AnyRes at 1008x672 "
          f"({unpadded / 1e12:.2f}T, {main_row['anyres']['visual_tokens']} tokens: out of reach, the UHD LLM prefill "
          f"alone is {100 * reconciliation['uhd_llm_prefill_alone_over_anyres_unpadded']:.0f}%); "
          f"UHD ViT + LLM only {reconciliation['uhd_vit_plus_llm_only'] / 1e12:.2f}T (paper: 17.5T vs 44.4T)")
    if not args.skip_latency:
        result["cpu_latency_one_slice_s"] = latency(args.repeats)
        result["environment"] = environment(torch.device("cpu"))
        for name in ("jbu_stack", "window_attention_reference", "window_attention_fused",
                     "window_attention_fused_uncached"):
            print(f"CPU latency, one 336x336 slice, {name}: {result['cpu_latency_one_slice_s'][name]['median']:.3f} s")
    path = write_result(args.output, result)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
