"""`multigran demo`: the built-in synthetic granularity benchmark, trained end to end on CPU, with a report.

Data (multigran.data.synthetic) -> a tiny model family built from scratch (a small CLIP ViT, a small Llama-style
Qwen2, a word-level tokenizer) -> every training stage of each method through the shipped recipes
(`recipes/<method>/*.yaml`, with demo-sized overrides): LLaVA-NeXT stages 1-2, then from its stage-2 model AVG-LLaVA
stages 3-4 (default), MG-LLaVA stages 1-2 (stage 2 after a phase of object questions alone) and LLaVA-UHD v2 stages
0 and 2 with its AnyRes baseline fine-tuned on the same 192-px data, and the composed models' stages 3-4 (`methods`) ->
evaluation on the test split (AnyRes, AVG-LLaVA at every fixed granularity and with its router, MG-LLaVA with and
without its object tokens, LLaVA-UHD v2 and AnyRes on its 192-px split, the composed models at every level and with
their router) -> a report (results.json, report.md, PNG plots). Every step writes its output before the next starts
and is skipped when its output is already there, so an interrupted demo resumes where it stopped.
"""

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoConfig

from .configuration import MultiGranConfig
from .modeling import MultiGranForConditionalGeneration
from .processing import MultiGranImageProcessor, MultiGranProcessor

logger = logging.getLogger(__name__)

METHODS = ("anyres", "avg", "mg", "uhd", "mg+avg", "uhd+avg")
DEFAULT_METHODS = ("anyres", "avg")
# The composed models: a method's stage-2 model + the adaptive-granularity layer (AVG-LLaVA's scaler and router over its
# grids), trained by AVG-LLaVA's stages 3 and 4 through the method's own stage-3/4 recipes. mg+avg is part of every run
# with both mg and avg (the full demo); uhd+avg runs when named.
COMPOSED = {"mg+avg": "mg", "uhd+avg": "uhd"}
# Optimizer steps of their stages 3 and 4 (batch Scale.batch_size), per scale.
COMPOSED_STEPS = {"full": {"mg+avg": (200, 600), "uhd+avg": (100, 300)},
                  "quick": {"mg+avg": (3, 3), "uhd+avg": (2, 2)}}


@dataclass(frozen=True)
class Scale:
    """Sizes of one demo run: samples per split and optimizer steps per stage (batch `batch_size`)."""

    train: int
    router: int
    val: int
    test: int
    pretrain: int
    stage1_steps: int
    stage2_steps: int
    stage3_steps: int
    stage4_steps: int
    batch_size: int
    latency_samples: int
    hires_train: int  # MG-LLaVA / LLaVA-UHD v2 training samples (192-px dataset)
    mg_stage1_steps: int
    mg_object_samples: int  # single-question object samples of MG-LLaVA's object phase (192-px images)
    mg_object_steps: int
    mg_stage2_steps: int
    uhd_stage0_steps: int
    uhd_stage2_steps: int


SCALES = {
    "full": Scale(train=4000, router=1600, val=300, test=300, pretrain=800, stage1_steps=50, stage2_steps=800,
                  stage3_steps=300, stage4_steps=400, batch_size=16, latency_samples=16, hires_train=3000,
                  mg_stage1_steps=100, mg_object_samples=800, mg_object_steps=400,
                  mg_stage2_steps=1200, uhd_stage0_steps=50, uhd_stage2_steps=500),
    "quick": Scale(train=160, router=48, val=16, test=48, pretrain=48, stage1_steps=3, stage2_steps=30,
                   stage3_steps=6, stage4_steps=4, batch_size=8, latency_samples=2, hires_train=48,
                   mg_stage1_steps=3, mg_object_samples=16, mg_object_steps=2,
                   mg_stage2_steps=6, uhd_stage0_steps=2, uhd_stage2_steps=4),
}

# The task (multigran.data.synthetic): coarse questions about the background's and the big shape's colour, the fine
# question about the framed-square block; every training image is asked each of the three once (a 3-turn
# conversation), the other splits one question per image. No objects: nothing asks about them here, and as
# distractors (coloured squares like the block's) they kept the tiny model from finding the block in this budget.
TASK = dict(subtypes={"coarse": ("background_color", "shape_color")}, train_turns=3,
            question_mix={"coarse": 0.6, "fine": 0.4, "object": 0.0}, num_objects=0)

# The tiny model family, trained from scratch: a 96-px image is one AnyRes tile of 12x12 patches of 8 px (levels
# 9/18/36/72/144 tokens per crop).
# - Vision: a 2-layer CLIP ViT of width 64 WITHOUT position embedding (the table is zero and never trained). The tower
#   is then equivariant to permutations of the patches, so a pooled token is an exact symmetric function of its
#   window: what the fine question needs is provably absent from levels 0-2 (multigran.data.synthetic). Where a
#   patch is, the LLM learns from the order of the visual tokens.
# - Language: a 3-layer Qwen2 of width 128 whose first layer is a sliding-window layer over 2 tokens (each token sees
#   itself and the one before it; Qwen2's own `layer_types`), the other two full attention. The short-range layer is
#   a locality prior ("canon"/token-shift layers): it makes "the square left of X" (the visual token before X's) a
#   one-hop lookup that a few CPU minutes of training find, where full attention alone found it late or not at all.
#   Width 128 rather than 64: at 64 whether stage 2 finds the fine skill at all depended on the seed (on validation
#   data: 2 of 3 seeds); at 128 all three tried seeds found it within 1000 steps.
TILE, PATCH = 96, 8
VISION = dict(model_type="clip_vision_model", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, image_size=TILE, patch_size=PATCH)
TEXT = dict(model_type="qwen2", hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=1024, use_sliding_window=True, sliding_window=2,
            layer_types=["sliding_attention", "full_attention", "full_attention"], tie_word_embeddings=False)
# MG-LLaVA and LLaVA-UHD v2 (--methods mg,uhd) train on a second dataset at twice the resolution: 192-px images,
# 16-px squares, the same 1-px object textures. MG-LLaVA's high-res ConvNeXt sees it whole and its low-res CLIP view
# (the anyres model's 96-px tower) a 2x downscale, in which every object texture is erased (2x2 means are equal);
# LLaVA-UHD v2 cuts it into 2x2 slices of 96 px and an overview.
HIRES_TILE, HIRES_PATCH = 192, 16
HIRES_TASK = dict(subtypes={"coarse": ("background_color", "shape_color"), "object": ("object_pattern",)},
                  train_turns=4, question_mix={"coarse": 0.3, "fine": 0.2, "object": 0.5}, num_objects=1)
MG_SETTINGS = {"high_res": HIRES_TILE, "convnext_config": {"hidden_sizes": [16, 32, 48, 64], "depths": [1, 1, 1, 1]}}
# LLaVA-UHD v2: 4 window-attention heads of 32 over the 128-wide LLM; a 6x6 query grid per view (the release's 12x12
# would give 4 x 145 + 144 = 724 tokens per image): 4 x (36 + 1) + 36 = 184 tokens, fewer than AnyRes's 300, and each
# query window (16 px of a 96-px view) is exactly one 16-px block square, as one AnyRes patch token is one square of the
# 96-px data (the LLM's "left of" is then again "the visual token before"). The pyramid: levels 1x and 2x (the one-step
# JBU stack, feature_scale_mask 3) rather than the release's 1x/2x/4x: the 48x48 4x level made a training step 2.5x as
# expensive on CPU (measured: 6.4 vs 2.6 s per batch of 16 on one busy core).
UHD_SETTINGS = {"scale_resolution": TILE, "num_heads": 4, "query_grid": 6, "feature_scale_mask": 3}
# UHD stage 2 (and its AnyRes baseline): from-scratch rates as AnyRes stage 2 (the recipe's 2e-5 are for pretrained
# parts); the window attention, fresh and the only path from the slices to the LLM, at half that. On validation data
# (300 questions, 500 steps from the stage-0 model): fine accuracy 100 % at 5e-4, 88.7 % at 2e-3 (the loss fell
# about twice as fast at 5e-4 over the first 300 steps).
UHD_STAGE2_LR, UHD_PROJECTOR_LR = 1e-3, 5e-4
ANYRES_HIRES = "anyres @192px"  # the row of AnyRes on the 192-px test split (UHD's baseline)
# The tower's trainable parts: everything but the (zero) position embedding.
TOWER_PARTS = ("vision_tower.embeddings.class_embedding", "vision_tower.embeddings.patch_embedding",
               "vision_tower.pre_layrnorm", "vision_tower.encoder")


def demo_tokenizer():
    """Word-level tokenizer over the generator's words and the recipes' `vicuna_v1` system prompt."""
    from .data.synthetic import all_words, words_of
    from .data.templates import VICUNA_SYSTEM
    from .data.word_tokenizer import build_word_tokenizer

    return build_word_tokenizer(sorted({*all_words(), *words_of(VICUNA_SYSTEM)}))


def init_model(out_dir, method: str, tokenizer, method_settings=None, seed: int = 0) -> Path:
    """A from-scratch model of the tiny family, saved with its processor."""
    text = dict(TEXT, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    config = MultiGranConfig(
        vision_config=AutoConfig.for_model(**VISION), text_config=text, method=method,
        method_settings=dict(method_settings or {}), image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=[[TILE, TILE]],
    )
    torch.manual_seed(seed)
    model = MultiGranForConditionalGeneration(config)
    with torch.no_grad():  # no position embedding: see VISION above
        model.vision_tower.embeddings.position_embedding.weight.zero_()
    image_processor = MultiGranImageProcessor(
        method=method, method_settings=config.method_settings, patch_size=PATCH, size={"shortest_edge": TILE},
        crop_size={"height": TILE, "width": TILE}, image_grid_pinpoints=[[TILE, TILE]], image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    )
    model.save_pretrained(out_dir)
    MultiGranProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out_dir)
    return Path(out_dir)


def train_stage(recipe_name: str, model_dir, out_dir, overrides):
    """One stage through the shipped recipe (what `multigran train --recipe ...` runs), demo-sized by overrides."""
    from .train.cli import recipe_stage
    from .train.recipe import load_recipe
    from .train.trainer import run_training

    overrides = [f"model={model_dir}", f"output_dir={out_dir}", *overrides]
    if recipe_stage(recipe_name) == "jbu":  # LLaVA-UHD v2 stage 0: its own loop (multigran.train.uhd_stage0)
        from .train.uhd_stage0 import run_jbu_recipe

        losses = run_jbu_recipe(recipe_name, overrides)["losses"]
        return {"recipe": recipe_name, "steps": len(losses), "first_loss": losses[0], "last_loss": losses[-1]}
    recipe = load_recipe(recipe_name, overrides)
    trainer = run_training(recipe)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {"recipe": recipe_name, "steps": trainer.state.global_step, "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None}


def stage_done(path) -> bool:
    return (Path(path) / "DONE").is_file()


def mark_done(path, info: dict):
    (Path(path) / "DONE").write_text(json.dumps(info, indent=1) + "\n")


def stage(recipe_name, model_dir, stage_dir, overrides, log):
    """Runs a recipe unless its output is complete; resumes from the newest checkpoint after an interruption."""
    from .train.trainer import latest_complete_checkpoint

    if stage_done(stage_dir):
        log(f"  {recipe_name}: done already ({stage_dir})")
        return {**json.loads((Path(stage_dir) / "DONE").read_text()), "ran": False}
    resume = ["resume=true"] if latest_complete_checkpoint(stage_dir) else []
    log(f"  {recipe_name} -> {stage_dir}" + (" (resuming)" if resume else ""))
    start = time.perf_counter()
    info = train_stage(recipe_name, model_dir, stage_dir, [*overrides, *resume])
    info["seconds"] = time.perf_counter() - start
    for checkpoint in Path(stage_dir).glob("checkpoint-*"):
        shutil.rmtree(checkpoint)  # the final model is saved next to them
    mark_done(stage_dir, info)
    return {**info, "ran": True}


def common_overrides(data, scale: Scale, steps: int, path=None, lr=None, parts=()):
    """Demo-sized settings; the data templates stay the recipes' own (`plain` for stage 1, `vicuna_v1` after)."""
    overrides = [
        f"data.path={path or data['train']}", f"data.image_folder={data['image_folder']}",
        "data.max_length=512", f"training.max_steps={steps}", f"training.per_device_train_batch_size={scale.batch_size}",
        "training.gradient_accumulation_steps=1", "training.dataloader_num_workers=0", "training.bf16=false",
        "training.activation_checkpointing=false", "training.save_steps=100", "training.save_total_limit=1",
        "training.logging_steps=10", "training.warmup_steps=0.05", "training.seed=0",
    ]
    overrides += [f"trainable.{part}={lr}" for part in parts]
    return overrides


def evaluate_setting(model_dir, data, scale, processor_options=None, generate_options=None, boxes=None, progress=True):
    from .loading import load_model, load_processor
    from .evaluate.runner import evaluate_records, load_question_file

    model = load_model(model_dir, "auto", "float32")
    processor = load_processor(model_dir)
    records = load_question_file(data["test"])
    return evaluate_records(model, processor, records, data["image_folder"], where=data["test"],
                            processor_options=processor_options, generate_options=generate_options, boxes=boxes,
                            batch_size=64, max_new_tokens=3, latency_samples=scale.latency_samples,
                            progress=progress)["summary"]


def run_demo(out_dir="demo_out", quick: bool = False, methods=DEFAULT_METHODS, seed: int = 0, log=print) -> dict:
    """The whole demo; returns the results (also written to out_dir/results.json with report.md and plots)."""
    from .data.synthetic import generate_dataset

    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown demo method(s) {unknown}; choose from {list(METHODS)}")
    if "anyres" not in methods:
        methods = ("anyres", *methods)  # every other method starts from the LLaVA-NeXT stage-2 model
    if {"mg", "avg"} <= set(methods):
        methods = (*methods, "mg+avg")
    methods = (*methods, *(COMPOSED[m] for m in methods if m in COMPOSED))  # a composed model needs its method's
    methods = tuple(m for m in METHODS if m in methods)
    scale = SCALES["quick" if quick else "full"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results = {"scale": "quick" if quick else "full", "settings": asdict(scale), "methods": list(methods),
               "stages": {}, "evaluation": {}}

    log(f"[1/4] data -> {out / 'data'}")
    data = generate_dataset(out / "data", num_train=scale.train, num_val=scale.val, num_test=scale.test,
                            num_pretrain=scale.pretrain, num_router=scale.router, seed=seed, tile_size=TILE,
                            patch_size=PATCH, **TASK)
    hires = None
    if {"mg", "uhd"} & set(methods):
        log(f"      {out / 'data-hires'} (MG-LLaVA, LLaVA-UHD v2)")
        hires = generate_dataset(out / "data-hires", num_train=scale.hires_train, num_val=scale.val,
                                 num_test=scale.test, num_pretrain=scale.pretrain, seed=seed, tile_size=HIRES_TILE,
                                 patch_size=HIRES_PATCH, **HIRES_TASK)
        hires["train_boxes"] = write_training_boxes(hires)
    if "mg" in methods:  # MG-LLaVA's object phase: the object question alone, on the first training images
        hires["objects"] = generate_dataset(
            out / "data-hires-objects", num_train=scale.mg_object_samples, num_val=0, num_test=0, num_pretrain=0,
            seed=seed, tile_size=HIRES_TILE, patch_size=HIRES_PATCH,
            **{**HIRES_TASK, "question_mix": {"object": 1.0}, "train_turns": 1})
    if set(COMPOSED) & set(methods):  # RGLF needs one instruction per image: single-question samples of the same kind
        hires["router_data"] = generate_dataset(
            out / "data-hires-router", num_train=0, num_val=0, num_test=0, num_pretrain=0, num_router=scale.router,
            seed=seed, tile_size=HIRES_TILE, patch_size=HIRES_PATCH, **HIRES_TASK)
    tokenizer = demo_tokenizer()

    log("[2/4] training")
    stages = results["stages"]

    def run(name, recipe, model_dir, stage_dir, overrides):
        stages[name] = stage(recipe, model_dir, stage_dir, overrides, log)

    if not (out / "anyres-init" / "config.json").is_file():
        init_model(out / "anyres-init", "anyres", tokenizer, seed=seed)
    run("anyres/stage1", "anyres/stage1_pretrain.yaml", out / "anyres-init", out / "anyres-stage1",
        common_overrides(data, scale, scale.stage1_steps, path=data["pretrain"]))
    # From scratch, every part learns at 1e-3 (the recipe's 2e-5 / 2e-6 are for pretrained LLMs and towers); the
    # tower's position embedding stays zero. 800 steps: on validation data 100 % on coarse and fine questions (final
    # loss 0.002), as after 1200.
    stage2 = common_overrides(data, scale, scale.stage2_steps, lr=1e-3, parts=("visual", "language_model", *TOWER_PARTS))
    run("anyres/stage2", "anyres/stage2_finetune.yaml", out / "anyres-stage1", out / "anyres-stage2",
        [*stage2, "trainable.vision_tower=null"])
    if "avg" in methods:
        switched(out / "anyres-stage2", out / "avg-init", "avg", {"compat": True}, seed)
        # 300 + 400 steps, on validation data: with 150 + 300 level 72 answered 78 % of the fine questions (100 % after
        # 300) and the router fell 9 points below the finest level; with 300 + 400 every target held (router 98.3 %
        # at 55 tokens vs 100 % at 300; after 600 RGLF steps 100 % at 67), a third of stage 4's time saved.
        run("avg/stage3", "avg/stage3_multigranularity.yaml", out / "avg-init", out / "avg-stage3",
            common_overrides(data, scale, scale.stage3_steps, lr=5e-4,
                             parts=("visual.projector", "visual.image_newline", "language_model")))
        # The router learns at 3e-3 and its voter at 3e-2: the voter (one weight per router input position, drawn
        # N(0, 1)) must first agree in sign over the instruction's positions, which 1e-3 does not reach in a few
        # hundred steps (the release trains ~8000).
        stage4 = common_overrides(data, scale, scale.stage4_steps, path=data["router"], lr=3e-3,
                                  parts=("visual.router",))
        run("avg/stage4", "avg/stage4_rglf.yaml", out / "avg-stage3", out / "avg-stage4",
            [*stage4, f"trainable.visual.router.voter={3e-2}", f"loss.options.token_cost={TOKEN_COST}"])
    if "mg" in methods:
        # The anyres model's tower (frozen, as MG-LLaVA's CLIP) and LLM, a fresh random ConvNeXt (frozen: no
        # pretrained one here) and fresh Conv-Gate fusion, projector and box projector.
        switched(out / "anyres-stage2", out / "mg-init", "mg", MG_SETTINGS, seed)
        boxes = [f"data.box_file={hires['boxes']}"]
        run("mg/stage1", "mg/stage1_pretrain.yaml", out / "mg-init", out / "mg-stage1",
            [*common_overrides(hires, scale, scale.mg_stage1_steps, path=hires["pretrain"]), *boxes])
        # Stage 2 in two parts through the same recipe. The LLM has never named a texture (the anyres data have no
        # objects), and it learns to read the object token only on the object question alone: in the mixed data it
        # stayed at chance on object questions, with and without boxes (validation data: 1200 steps of the 4-turn
        # conversations, 600 of single questions), while on object questions alone it leaves that plateau in two
        # jumps (on validation data: two of the three patterns told apart after ~90 steps, all three after ~170; 250
        # steps stopped at the first, 66 %), hence 400 steps. They leave the LLM answering a pattern to everything;
        # the mixed stage 2 after them needs its full 1200 steps to relearn the other questions (600 left its loss at
        # 0.26). The box projector learns at 10x: at 5e-4 for all, object accuracy stayed at chance.
        stage2_parts = ("visual.fuse_module", "visual.projector", "language_model")
        box_projector_rate = f"trainable.visual.bbox_projector={1e-2}"
        objects = hires["objects"]
        run("mg/stage2-objects", "mg/stage2_finetune.yaml", out / "mg-stage1", out / "mg-stage2-objects",
            [*common_overrides(objects, scale, scale.mg_object_steps, lr=1e-3, parts=stage2_parts),
             box_projector_rate, f"data.box_file={objects['boxes']}"])
        run("mg/stage2", "mg/stage2_finetune.yaml", out / "mg-stage2-objects", out / "mg-stage2",
            [*common_overrides(hires, scale, scale.mg_stage2_steps, lr=1e-3, parts=stage2_parts),
             box_projector_rate, f"data.box_file={hires['train_boxes']}"])
    if "uhd" in methods:
        train_uhd(out, hires, scale, tokenizer, run, seed)

    for composed in (m for m in COMPOSED if m in methods):
        train_composed(composed, out, hires, scale, run, seed)

    log("[3/4] evaluation on the test splits")
    evaluation = results["evaluation"]
    cache = out / "evaluation.json"
    cached = json.loads(cache.read_text()) if cache.is_file() else {}

    def evaluate(name, model_dir, *args, **kwargs):
        # A cached result counts only for the very model it measured (a stage that ran again made a new one).
        stamp = (Path(model_dir) / "DONE").read_text()
        entry = cached.get(name)
        if entry is None or entry.get("model") != stamp:
            log(f"  {name}")
            entry = cached[name] = {"model": stamp, "summary": evaluate_setting(model_dir, *args, **kwargs)}
            cache.write_text(json.dumps(cached, indent=1))
        evaluation[name] = entry["summary"]

    evaluate("anyres", out / "anyres-stage2", data, scale)
    if "avg" in methods:
        from .pipelines.granularity import granularity_levels

        for tokens, _, _ in granularity_levels(TILE // PATCH):
            evaluate(f"avg@{tokens}", out / "avg-stage4", data, scale, {"granularity": tokens})
        evaluate("avg@auto", out / "avg-stage4", data, scale, {"granularity": "auto"})
    from .data.boxes import read_box_file

    if "mg" in methods:
        evaluate("mg", out / "mg-stage2", hires, scale, boxes=read_box_file(hires["boxes"]))
        evaluate("mg, no boxes", out / "mg-stage2", hires, scale)  # one all-zero box per image, as the release
    if "uhd" in methods:
        evaluate("uhd", out / "uhd-stage2", hires, scale)
        evaluate(ANYRES_HIRES, out / "anyres-hires-stage2", hires, scale)
    for composed in (m for m in COMPOSED if m in methods):
        model_dir = out / f"{composed.replace('+', '-')}-stage4"
        boxes = read_box_file(hires["boxes"]) if COMPOSED[composed] == "mg" else None
        for tokens in MultiGranConfig.from_pretrained(model_dir).method_settings["adaptive_granularity"]["levels"]:
            evaluate(f"{composed}@{tokens}", model_dir, hires, scale, {"granularity": tokens}, boxes=boxes)
        evaluate(f"{composed}@auto", model_dir, hires, scale, {"granularity": "auto"}, boxes=boxes)

    log("[4/4] report")
    results["targets"] = check_targets(evaluation)
    results["seconds"] = time.perf_counter() - started
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    write_report(out, results)
    return results


# The layer of each composed model: the five-level pyramid of its grid, written out (the evaluation runs every level);
# MG-LLaVA's fused grid is the tower's 12x12 grid; LLaVA-UHD v2's views are the window attention's query grid.
# - The released router (router_compat), as AVG-LLaVA's demo model: the corrected one (attention over each grid's
#   9 + ... + 144 + k tokens) collapsed to one constant output in this budget (on validation data: every question at
#   level 9, 300 RGLF steps), while the released one (attention across crops; over MG's single grid a per-token MLP
#   before the voter) sent 98 % of the fine questions to level 144 and every other one to level 9.
# - top_k 48: the text filter's 32 slots kept, for some images, none of the words that tell a fine question ("left",
#   "framed") from a coarse one (the filter ranks the instruction by similarity with the image); 48 keeps all but the
#   least image-like of the >= 50 instruction tokens of every demo prompt, so no slot is ever left to the released
#   filter's fill with masked (answer) tokens.
COMPOSED_LAYERS = {name: {"levels": [9, 18, 36, 72, 144], "router_compat": True, "top_k": 48}
                   for name in ("mg+avg", "uhd+avg")}


def train_composed(composed: str, out: Path, hires, scale, run, seed):
    """A method's stage-2 model + the adaptive-granularity layer, through the method's stage-3 and stage-4 recipes
    (AVG-LLaVA's multi-granularity tuning, then RGLF on single-question samples), demo-sized as AVG-LLaVA's."""
    method, name = COMPOSED[composed], composed.replace("+", "-")
    stage3_steps, stage4_steps = COMPOSED_STEPS["quick" if scale is SCALES["quick"] else "full"][composed]
    settings = dict(json.loads((out / f"{method}-stage2" / "config.json").read_text())["method_settings"])
    layer = dict(COMPOSED_LAYERS[composed])
    if method == "uhd":  # the pyramid of the views' query grid
        side = settings.get("query_grid", 12)
        layer["levels"] = [side * side // divisor for divisor in (16, 8, 4, 2, 1)]
    switched(out / f"{method}-stage2", out / f"{name}-init", method, {"adaptive_granularity": layer}, seed)
    router = hires["router_data"]
    if method == "mg":
        parts = ("visual.fuse_module", "visual.projector", "visual.bbox_projector", "language_model")
        data, router_data = [f"data.box_file={hires['train_boxes']}"], [f"data.box_file={router['boxes']}"]
    else:
        parts = ("vision_tower", "language_model", "visual.mm_projector", "visual.upsampler.fixup_proj")
        data = router_data = ["data.max_length=1024"]
    run(f"{composed}/stage3", f"{method}/stage3_multigranularity.yaml", out / f"{name}-init", out / f"{name}-stage3",
        [*common_overrides(hires, scale, stage3_steps, lr=5e-4, parts=parts), *data])
    run(f"{composed}/stage4", f"{method}/stage4_rglf.yaml", out / f"{name}-stage3", out / f"{name}-stage4",
        [*common_overrides(router, scale, stage4_steps, path=router["router"], lr=3e-3, parts=("visual.router",)),
         *router_data, f"trainable.visual.router.voter={3e-2}", f"loss.options.token_cost={TOKEN_COST}"])


def train_uhd(out: Path, hires, scale, tokenizer, run, seed):
    """LLaVA-UHD v2 stages 0-2 from the LLaVA-NeXT stage-2 model, and its baseline: that model fine-tuned on the same
    192-px data (`run(name, recipe, model_dir, stage_dir, overrides)` runs or skips one stage)."""
    # The word-level tokenizer has no newline token: "." ends a row of slices instead of "\n".
    settings = {**UHD_SETTINGS, "separator_ids": [tokenizer.convert_tokens_to_ids(word) for word in (",", ".")]}
    # Stage 0 trains the release's 4x JBU stack (on a twin with the full pyramid); the demo's 2x model then takes its
    # first step and fix-up, as the release's 2x models load the stage-0 checkpoint.
    switched(out / "anyres-stage2", out / "uhd-init-jbu4x", "uhd", {**settings, "feature_scale_mask": 7}, seed)
    run("uhd/stage0", "uhd/stage0_jbu.yaml", out / "uhd-init-jbu4x", out / "uhd-stage0",
        [f"data.path={Path(hires['root']) / 'images' / 'train'}", f"training.max_steps={scale.uhd_stage0_steps}",
         "training.per_device_train_batch_size=4", "training.gradient_accumulation_steps=1",
         "training.logging_steps=10", "training.seed=0"])
    with_jbu(out / "anyres-stage2", out / "uhd-stage0", out / "uhd-init", settings, seed)
    # No stage 1 (the window attention's pretraining on captions with the LLM frozen): here it only undid what the
    # fresh window attention passes on. After 100 stage-1 steps, a linear probe on its tokens told the object textures
    # apart 53 % of the time (94 % before), and stage 2 after it learnt no fine question (test: 28.5 %); stage 2 from
    # the stage-0 model at the same rates learnt them (validation: 88.7 %).
    # Object questions stay at chance after this stage, although the tokens hold the texture: a linear probe on the
    # window-attention token at the object's centre tells the three textures apart 83 % of the time (validation
    # images), the tower's patch there 100 %. The LLM does not learn to read them: 600 further steps on the object
    # question alone stopped at two textures of three (66 %) and left it answering a texture to every question; 300 +
    # 300 mixed steps after that kept the objects (65 %) and the coarse questions (100 %) but relearnt the fine one
    # only to 38 % (validation data), for 25 more minutes of training.
    run("uhd/stage2", "uhd/stage2_finetune.yaml", out / "uhd-init", out / "uhd-stage2",
        [*common_overrides(hires, scale, scale.uhd_stage2_steps, lr=UHD_STAGE2_LR,
                           parts=("language_model", "visual.upsampler.fixup_proj", *TOWER_PARTS)),
         "trainable.vision_tower=null", f"trainable.visual.mm_projector={UHD_PROJECTOR_LR}",
         "data.max_length=1024"])
    # The baseline of UHD's claim: the same LLaVA-NeXT stage-2 model fine-tuned on the same 192-px training data
    # for as many steps at the same rates, answering at 300 visual tokens (its one 96-px tile: the 192-px image
    # downscaled 2x, which erases the object textures).
    run("anyres/stage2-hires", "anyres/stage2_finetune.yaml", out / "anyres-stage2", out / "anyres-hires-stage2",
        [*common_overrides(hires, scale, scale.uhd_stage2_steps, lr=UHD_STAGE2_LR,
                           parts=("visual", "language_model", *TOWER_PARTS)),
         "trainable.vision_tower=null"])


def with_jbu(src, stage0_dir, dst, settings, seed):
    """`src` as a "uhd" model with `settings`, its JBU from the stage-0 output `stage0_dir`; rebuilt whenever that
    stage ran again (its DONE stamp is kept next to the model)."""
    from .train.uhd_stage0 import load_jbu_weights

    stamp = (Path(stage0_dir) / "DONE").read_text()
    if (Path(dst) / "stage0-DONE").is_file() and (Path(dst) / "stage0-DONE").read_text() == stamp:
        return
    shutil.rmtree(dst, ignore_errors=True)
    switched(src, dst, "uhd", settings, seed)
    model = MultiGranForConditionalGeneration.from_pretrained(dst)
    load_jbu_weights(model, Path(stage0_dir) / "jbu.safetensors")
    model.save_pretrained(dst)
    (Path(dst) / "stage0-DONE").write_text(stamp)


def switched(src, dst, method, settings, seed):
    """The model `src` turned into `method` (new parts freshly initialised), once."""
    if not (Path(dst) / "config.json").is_file():
        from .convert.method import switch_method

        switch_method(src, dst, method, dict(settings), seed=seed)


def write_training_boxes(data) -> str:
    """The training split's box file with every third record's boxes removed (MG-LLaVA then gets one all-zero box,
    as for an image without detections), so that the model also learns to answer without object tokens and
    "the same model without object tokens" is a fair comparison."""
    path = Path(data["root"]) / "boxes-train.json"
    records = json.loads(Path(data["boxes"]).read_text())
    train = [r for r in records if r["id"].startswith("train-")]
    for index, record in enumerate(train):
        if index % 3 == 2:
            record.update(boxes=[], scores=[], labels=[])
    path.write_text(json.dumps(train))
    return str(path)


# RGLF's tie-breaker for the demo (nats per 1000 visual tokens; see multigran.train.avg.rglf_training_loss): between
# the coarsest and the finest level (21 vs 300 visual tokens per image) it adds 0.28 nats. A coarse question is
# answered equally well at every level, so without it the ranking of the levels is noise for those.
TOKEN_COST = 1.0


def fixed_levels(evaluation, model: str = "avg") -> list[int]:
    """Visual tokens per grid of a model's fixed-granularity rows ("avg@36", "mg+avg@9", ...), coarsest first."""
    return sorted(int(name.split("@")[1]) for name in evaluation
                  if name.startswith(f"{model}@") and name != f"{model}@auto")


def routed_models(evaluation) -> list[str]:
    """The models with a router row ("avg", "mg+avg", ...), in report order."""
    return [name[:-len("@auto")] for name in evaluation if name.endswith("@auto")]


# LLaVA-UHD v2's targets (with uhd), set before any measurement: the trained model answers the 192-px benchmark
# (accuracy in %), and at no more visual tokens than AnyRes it reads the 1-px object textures that AnyRes's 2x
# downscale erases (object accuracy in points over AnyRes on the same split; chance is 1/3).
UHD_MIN_ACCURACY = 80
UHD_MIN_OBJECT_GAIN = 30


def check_targets(evaluation) -> dict:
    """The issue's targets, measured on the test splits: AVG-LLaVA's (default run), MG-LLaVA's (with mg),
    LLaVA-UHD v2's against AnyRes on the same 192-px split (with uhd) and the composed models'."""
    targets = {}
    levels = fixed_levels(evaluation)
    if levels and "avg@auto" in evaluation:
        finest, coarsest = evaluation[f"avg@{levels[-1]}"], evaluation[f"avg@{levels[0]}"]
        router = evaluation["avg@auto"]
        distribution = router.get("granularity_by_type", {})

        def share(kind, allowed):
            counts = distribution.get(kind, {})
            total = sum(counts.values())
            return 100.0 * sum(v for k, v in counts.items() if int(k) in allowed) / total if total else 0.0

        gap = finest["accuracy_by_type"].get("fine", 0) - coarsest["accuracy_by_type"].get("fine", 0)
        tokens = 100.0 * router["mean_visual_tokens"] / finest["mean_visual_tokens"]
        targets.update({
            "fine_gap_finest_minus_coarsest": {"value": gap, "target": ">= 20", "met": gap >= 20},
            "router_accuracy_minus_finest": {"value": router["accuracy"] - finest["accuracy"], "target": ">= -2",
                                             "met": router["accuracy"] >= finest["accuracy"] - 2},
            "router_tokens_share_of_finest": {"value": tokens, "target": "<= 50", "met": tokens <= 50},
            "coarse_questions_on_two_coarsest": {"value": share("coarse", levels[:2]), "target": ">= 80",
                                                 "met": share("coarse", levels[:2]) >= 80},
            "fine_questions_on_two_finest": {"value": share("fine", levels[-2:]), "target": ">= 80",
                                             "met": share("fine", levels[-2:]) >= 80},
        })
    if "mg" in evaluation and "mg, no boxes" in evaluation:
        gap = (evaluation["mg"]["accuracy_by_type"].get("object", 0)
               - evaluation["mg, no boxes"]["accuracy_by_type"].get("object", 0))
        targets["mg_object_gain_from_object_tokens"] = {"value": gap, "target": ">= 15", "met": gap >= 15}
    if "uhd" in evaluation and ANYRES_HIRES in evaluation:
        uhd, anyres = evaluation["uhd"], evaluation[ANYRES_HIRES]
        gain = uhd["accuracy_by_type"].get("object", 0) - anyres["accuracy_by_type"].get("object", 0)
        tokens = 100.0 * uhd["mean_visual_tokens"] / anyres["mean_visual_tokens"]
        targets.update({
            "uhd_accuracy": {"value": uhd["accuracy"], "target": f">= {UHD_MIN_ACCURACY}",
                             "met": uhd["accuracy"] >= UHD_MIN_ACCURACY},
            "uhd_object_gain_over_anyres_192px": {"value": gain, "target": f">= {UHD_MIN_OBJECT_GAIN}",
                                                  "met": gain >= UHD_MIN_OBJECT_GAIN},
            "uhd_tokens_share_of_anyres_192px": {"value": tokens, "target": "<= 100", "met": tokens <= 100},
        })
    for composed in (m for m in routed_models(evaluation) if m in COMPOSED):
        # The composed models' claim (set before measuring): the router saves >= 40 % of the visual tokens of the
        # model's finest fixed level and stays within 2 points of its accuracy.
        levels = fixed_levels(evaluation, composed)
        if not levels:
            continue
        finest, router = evaluation[f"{composed}@{levels[-1]}"], evaluation[f"{composed}@auto"]
        saved = 100.0 * (1 - router["mean_visual_tokens"] / finest["mean_visual_tokens"])
        delta = router["accuracy"] - finest["accuracy"]
        targets[f"{composed}_router_tokens_saved_vs_finest"] = {"value": saved, "target": ">= 40", "met": saved >= 40}
        targets[f"{composed}_router_accuracy_minus_finest"] = {"value": delta, "target": ">= -2", "met": delta >= -2}
    return targets


def router_levels(evaluation, model: str = "avg") -> list[int]:
    """Every level the router could pick (the fixed-granularity rows), so that a level it never picks shows as 0."""
    chosen = {int(k) for counts in evaluation[f"{model}@auto"]["granularity_by_type"].values() for k in counts}
    return sorted(set(fixed_levels(evaluation, model)) | chosen)


def _reused_note(stages: dict) -> str:
    reused = [name for name, info in stages.items() if not info.get("ran", True)]
    if not reused:
        return ""
    seconds = sum(stages[name].get("seconds") or 0 for name in reused)
    return f" (this invocation; {len(reused)} stages were done already, by an earlier one, in {seconds / 60:.1f} min)"


def _fmt(value, digits=1):
    return "-" if value is None else f"{value:.{digits}f}"


def write_report(out: Path, results: dict):
    """report.md and its PNG plots (accuracy per type, the router's choices per type, accuracy vs visual tokens)."""
    evaluation = results["evaluation"]
    types = sorted({t for s in evaluation.values() for t in s["accuracy_by_type"]})
    lines = [
        "# multigran demo: the synthetic granularity benchmark",
        "",
        f"Scale: {results['scale']} ({results['settings']['train']} training samples, "
        f"{results['settings']['test']} test samples); methods: {', '.join(results['methods'])}; "
        f"wall time {results['seconds'] / 60:.1f} min" + _reused_note(results["stages"]) + ".",
        "",
        "## Test-split results",
        "",
        "| setting | accuracy | " + " | ".join(types) + " | mean visual tokens | prefill (ms) |",
        "|---|---|" + "---|" * len(types) + "---|---|",
    ]
    for name, summary in evaluation.items():
        prefill = summary.get("prefill_seconds")
        lines.append(f"| {name} | {_fmt(summary['accuracy'])} | "
                     + " | ".join(_fmt(summary["accuracy_by_type"].get(t)) for t in types)
                     + f" | {_fmt(summary['mean_visual_tokens'])} | {_fmt(prefill * 1000 if prefill else None)} |")
    if any(name.startswith(("mg", "uhd")) for name in evaluation):
        lines += ["", f"Rows mg* and uhd* (the composed mg+avg, uhd+avg included): the {HIRES_TILE}-px test split "
                  "(same scenes at twice the resolution, with object questions); the other rows: the 96-px test split."]
    if ANYRES_HIRES in evaluation:
        lines += ["", f"Row {ANYRES_HIRES}: the anyres model fine-tuned on the {HIRES_TILE}-px training data as long "
                  "as uhd's stage 2, on the same split; its one 96-px tile is the image downscaled 2x, which erases "
                  "the 1-px object textures. uhd: 2x2 slices of 96 px at full resolution plus the overview, "
                  f"{UHD_SETTINGS['query_grid']}x{UHD_SETTINGS['query_grid']} tokens each."]
    routed = [m for m in routed_models(evaluation) if "granularity_by_type" in evaluation[f"{m}@auto"]]
    for model in routed:
        levels = router_levels(evaluation, model)
        lines += ["", f"## The router's choices per question type, {model} (share of test questions, %)", "",
                  "| question type | " + " | ".join(str(level) for level in levels) + " |",
                  "|---|" + "---|" * len(levels)]
        for kind, counts in evaluation[f"{model}@auto"]["granularity_by_type"].items():
            total = sum(counts.values())
            lines.append(f"| {kind} | " + " | ".join(_fmt(100 * counts.get(str(level), 0) / total)
                                                     for level in levels) + " |")
    if results.get("targets"):
        lines += ["", "## Targets", "", "| target | value | wanted | met |", "|---|---|---|---|"]
        for name, target in results["targets"].items():
            lines.append(f"| {name} | {_fmt(target['value'])} | {target['target']} | "
                         f"{'yes' if target['met'] else 'NO'} |")
    lines += ["", "## Training stages", "", "| stage | steps | first loss | last loss | seconds |", "|---|---|---|---|---|"]
    for name, info in results["stages"].items():
        lines.append(f"| {name} | {info['steps']} | {_fmt(info['first_loss'], 3)} | {_fmt(info['last_loss'], 3)} | "
                     f"{_fmt(info.get('seconds'), 0)} |")
    lines += ["", "![accuracy per question type](accuracy_by_type.png)", "",
              "![accuracy vs visual tokens](accuracy_vs_tokens.png)", ""]
    if routed:
        lines += ["![the router's choices](router_choices.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
    plot(out, evaluation, types)


def plot(out: Path, evaluation: dict, types):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(evaluation)
    figure, axis = plt.subplots(figsize=(max(6, 1.2 * len(names)), 3.6))
    width = 0.8 / max(1, len(types))
    for index, kind in enumerate(types):
        values = [evaluation[n]["accuracy_by_type"].get(kind) or 0 for n in names]
        axis.bar([i + index * width for i in range(len(names))], values, width, label=kind)
    axis.set_xticks([i + width * (len(types) - 1) / 2 for i in range(len(names))], names, rotation=20)
    axis.set_ylabel("accuracy (%)")
    axis.set_ylim(0, 105)
    axis.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)  # outside: never over a bar
    axis.set_title("Test accuracy per question type")
    figure.tight_layout()
    figure.savefig(out / "accuracy_by_type.png", dpi=110)
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(5.5, 3.6))
    fixed = [f"avg@{level}" for level in fixed_levels(evaluation)]
    for kind in [None, *types]:
        def value(name):
            summary = evaluation[name]
            return summary["accuracy"] if kind is None else summary["accuracy_by_type"].get(kind)

        values = [value(n) for n in fixed]
        if any(v is not None for v in values):  # AVG-LLaVA's rows have no object questions
            axis.plot([evaluation[n]["mean_visual_tokens"] for n in fixed], values, marker="o",
                      label=f"avg fixed ({kind or 'all'})", linewidth=2 if kind is None else 1)
    for model in (m for m in routed_models(evaluation) if m != "avg"):  # the composed models: all questions
        rows = [f"{model}@{level}" for level in fixed_levels(evaluation, model)]
        axis.plot([evaluation[n]["mean_visual_tokens"] for n in rows], [evaluation[n]["accuracy"] for n in rows],
                  marker="o", linestyle="--", linewidth=2, label=f"{model} fixed (all)")
    for name, marker in (*((f"{m}@auto", "*") for m in routed_models(evaluation)), ("anyres", "s"), ("mg", "X"),
                         ("mg, no boxes", "x"), ("uhd", "D"), (ANYRES_HIRES, "P")):
        if name in evaluation:
            axis.scatter([evaluation[name]["mean_visual_tokens"]], [evaluation[name]["accuracy"]], marker=marker,
                         s=160, zorder=5, label=f"{name} (all)")
    axis.set_xlabel("mean visual tokens per image")
    axis.set_ylabel("accuracy (%)")
    axis.set_ylim(0, 105)
    axis.legend(fontsize=7)
    axis.set_title("Accuracy vs visual tokens")
    figure.tight_layout()
    figure.savefig(out / "accuracy_vs_tokens.png", dpi=110)
    plt.close(figure)

    routed = [m for m in routed_models(evaluation) if "granularity_by_type" in evaluation[f"{m}@auto"]]
    if routed:
        figure, axes = plt.subplots(1, len(routed), figsize=(5 * len(routed), 3.4), squeeze=False)
        for axis, model in zip(axes[0], routed):
            distribution = evaluation[f"{model}@auto"]["granularity_by_type"]
            kinds = list(distribution)
            bottom = [0.0] * len(kinds)
            for level in router_levels(evaluation, model):
                shares = [100 * distribution[k].get(str(level), 0) / max(1, sum(distribution[k].values()))
                          for k in kinds]
                axis.bar(kinds, shares, bottom=bottom, label=f"{level} tokens/grid")
                bottom = [b + s for b, s in zip(bottom, shares)]
            axis.set_ylabel("share of questions (%)")
            axis.set_title(f"Granularity chosen by the router ({model})")
            axis.legend(fontsize=7, loc="upper right")
        figure.tight_layout()
        figure.savefig(out / "router_choices.png", dpi=110)
        plt.close(figure)
