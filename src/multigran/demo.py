"""`multigran demo`: the built-in synthetic granularity benchmark, trained end to end on CPU, with a report.

Data (multigran.data.synthetic) -> a tiny model family built from scratch (a small CLIP-style ViT, a small Llama, a
word-level tokenizer) -> every training stage of each method through the shipped recipes (`recipes/<method>/*.yaml`,
with demo-sized overrides) -> evaluation on the test split at every fixed granularity and with the router -> a report
(results.json, report.md, PNG plots). Every step writes its output before the next starts and is skipped when its
output is already there, so an interrupted demo resumes where it stopped.
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
from .pipelines.uhd_hiwin import sincos_2d_position_embedding
from .modeling import MultiGranForConditionalGeneration
from .processing import MultiGranImageProcessor, MultiGranProcessor

logger = logging.getLogger(__name__)

METHODS = ("anyres", "avg")  # the demo's stages exist for these; MG-LLaVA and LLaVA-UHD v2 have none yet
DEFAULT_METHODS = ("anyres", "avg")


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


SCALES = {
    "full": Scale(train=4000, router=1600, val=300, test=600, pretrain=800, stage1_steps=50, stage2_steps=600,
                  stage3_steps=300, stage4_steps=200, batch_size=16, latency_samples=16),
    "quick": Scale(train=160, router=48, val=16, test=48, pretrain=48, stage1_steps=3, stage2_steps=30,
                   stage3_steps=6, stage4_steps=4, batch_size=8, latency_samples=2),
}

# The task: fine questions about a dot pair at a fixed place, coarse questions about the background and the big
# shape's colour, four different questions per training image (see multigran.data.synthetic.generate_dataset).
TASK = dict(fixed_dots=True, coarse_subtypes=("background_color", "shape_color"), train_turns=4)

# The tiny model family: a 96-px image is one AnyRes tile of 12x12 patches of 8 px (levels 9/18/36/72/144 tokens),
# a 2-layer ViT of width 64 and a 3-layer Llama of width 64, trained from scratch.
TILE, PATCH = 96, 8
VISION = dict(model_type="clip_vision_model", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, image_size=TILE, patch_size=PATCH)
TEXT = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=512)


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
    # From-scratch choice (as MAE does): a 2-D sin-cos position table, so that a token's row and column are readable
    # from its features from the first step (the relative-position questions need them).
    embeddings = model.vision_tower.embeddings
    grid = TILE // PATCH
    with torch.no_grad():
        embeddings.position_embedding.weight[1:] = sincos_2d_position_embedding(VISION["hidden_size"], grid)
        embeddings.position_embedding.weight[0] = 0
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
    from .train.recipe import load_recipe
    from .train.trainer import run_training

    recipe = load_recipe(recipe_name, [f"model={model_dir}", f"output_dir={out_dir}", *overrides])
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
    from .cli import load_model, load_processor
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
    if set(unknown) & {"mg", "uhd"}:
        raise ValueError(f"the demo has no stages for {sorted(set(unknown) & {'mg', 'uhd'})} yet (only "
                         f"{list(METHODS)}); train them with `multigran train --recipe mg/... | uhd/...`")
    if unknown:
        raise ValueError(f"unknown demo method(s) {unknown}; choose from {list(METHODS)}")
    if "avg" in methods and "anyres" not in methods:
        methods = ("anyres", *methods)  # AVG-LLaVA starts from the LLaVA-NeXT stage-2 model
    scale = SCALES["quick" if quick else "full"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results = {"scale": "quick" if quick else "full", "settings": asdict(scale), "methods": list(methods),
               "stages": {}, "evaluation": {}}

    log(f"[1/4] data -> {out / 'data'}")
    mix = {"coarse": 0.4, "fine": 0.6, "object": 0.0}
    data = generate_dataset(out / "data", num_train=scale.train, num_val=scale.val, num_test=scale.test,
                            num_pretrain=scale.pretrain, num_router=scale.router, seed=seed, tile_size=TILE,
                            patch_size=PATCH, question_mix=mix, **TASK)
    tokenizer = demo_tokenizer()

    log("[2/4] training")
    if "anyres" in methods:
        if not (out / "anyres-init" / "config.json").is_file():
            init_model(out / "anyres-init", "anyres", tokenizer, seed=seed)
        stage1 = common_overrides(data, scale, scale.stage1_steps, path=data["pretrain"])
        results["stages"]["anyres/stage1"] = stage("anyres/stage1_pretrain.yaml", out / "anyres-init",
                                                   out / "anyres-stage1", stage1, log)
        # From scratch, every part learns at 1e-3 (the recipe's 2e-5 / 2e-6 are for pretrained LLMs and towers).
        stage2 = common_overrides(data, scale, scale.stage2_steps, lr=1e-3,
                                  parts=("visual", "language_model", "vision_tower"))
        results["stages"]["anyres/stage2"] = stage("anyres/stage2_finetune.yaml", out / "anyres-stage1",
                                                   out / "anyres-stage2", stage2, log)
    if "avg" in methods:
        if not (out / "avg-init" / "config.json").is_file():
            from .convert.method import switch_method

            switch_method(out / "anyres-stage2", out / "avg-init", "avg", {"compat": True}, seed=seed)
        stage3 = common_overrides(data, scale, scale.stage3_steps, lr=5e-4,
                                  parts=("visual.projector", "visual.image_newline", "language_model"))
        results["stages"]["avg/stage3"] = stage("avg/stage3_multigranularity.yaml", out / "avg-init",
                                                out / "avg-stage3", stage3, log)
        stage4 = common_overrides(data, scale, scale.stage4_steps, path=data["router"], lr=1e-3,
                                  parts=("visual.router",))
        stage4.append(f"loss.options.token_cost={TOKEN_COST}")
        results["stages"]["avg/stage4"] = stage("avg/stage4_rglf.yaml", out / "avg-stage3",
                                                out / "avg-stage4", stage4, log)

    log("[3/4] evaluation on the test split")
    evaluation = results["evaluation"]
    cache = out / "evaluation.json"
    retrained = any(info.get("ran") for info in results["stages"].values())
    if cache.is_file() and not retrained:  # a model that changed invalidates every cached evaluation
        evaluation.update(json.loads(cache.read_text()))

    def evaluate(name, *args, **kwargs):
        if name not in evaluation:
            log(f"  {name}")
            evaluation[name] = evaluate_setting(*args, **kwargs)
            cache.write_text(json.dumps(evaluation, indent=1))
        return evaluation[name]

    if "anyres" in methods:
        evaluate("anyres", out / "anyres-stage2", data, scale)
    if "avg" in methods:
        from .pipelines.avg import granularity_levels

        for tokens, _, _ in granularity_levels(TILE // PATCH):
            evaluate(f"avg@{tokens}", out / "avg-stage4", data, scale, {"granularity": tokens})
        evaluate("avg@auto", out / "avg-stage4", data, scale, {"granularity": "auto"})

    log("[4/4] report")
    results["targets"] = check_targets(evaluation)
    results["seconds"] = time.perf_counter() - started
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    write_report(out, results)
    return results


# RGLF's tie-breaker for the demo (nats per 1000 visual tokens; see multigran.train.avg.rglf_training_loss): between
# the coarsest and the finest level (21 vs 300 visual tokens per image) it adds 0.28 nats. (0.2 was tried too: the
# router then no longer sent coarse questions to the coarsest levels, and fine ones still did not reach the finest.)
TOKEN_COST = 1.0


def check_targets(evaluation) -> dict:
    """The issue's targets for the default (anyres + avg) run, measured on the test split."""
    levels = sorted(int(k.split("@")[1]) for k in evaluation if k.startswith("avg@") and k != "avg@auto")
    if not levels or "avg@auto" not in evaluation:
        return {}
    finest, coarsest = evaluation[f"avg@{levels[-1]}"], evaluation[f"avg@{levels[0]}"]
    router = evaluation["avg@auto"]
    distribution = router.get("granularity_by_type", {})

    def share(kind, allowed):
        counts = distribution.get(kind, {})
        total = sum(counts.values())
        return 100.0 * sum(v for k, v in counts.items() if int(k) in allowed) / total if total else 0.0

    gap = finest["accuracy_by_type"].get("fine", 0) - coarsest["accuracy_by_type"].get("fine", 0)
    targets = {
        "fine_gap_finest_minus_coarsest": {"value": gap, "target": ">= 20", "met": gap >= 20},
        "router_accuracy_minus_finest": {"value": router["accuracy"] - finest["accuracy"], "target": ">= -2",
                                         "met": router["accuracy"] >= finest["accuracy"] - 2},
        "router_tokens_share_of_finest": {
            "value": 100.0 * router["mean_visual_tokens"] / finest["mean_visual_tokens"], "target": "<= 50",
            "met": router["mean_visual_tokens"] <= 0.5 * finest["mean_visual_tokens"]},
        "coarse_questions_on_two_coarsest": {"value": share("coarse", levels[:2]), "target": ">= 80",
                                             "met": share("coarse", levels[:2]) >= 80},
        "fine_questions_on_two_finest": {"value": share("fine", levels[-2:]), "target": ">= 80",
                                         "met": share("fine", levels[-2:]) >= 80},
    }
    return targets


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
        f"total time {results['seconds'] / 60:.1f} min.",
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
    router = evaluation.get("avg@auto")
    if router and "granularity_by_type" in router:
        levels = sorted({int(k) for counts in router["granularity_by_type"].values() for k in counts})
        lines += ["", "## The router's choices per question type (share of test questions, %)", "",
                  "| question type | " + " | ".join(str(level) for level in levels) + " |",
                  "|---|" + "---|" * len(levels)]
        for kind, counts in router["granularity_by_type"].items():
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
    if router and "granularity_by_type" in router:
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
    axis.legend(loc="lower right", fontsize=8)
    axis.set_title("Test accuracy per question type")
    figure.tight_layout()
    figure.savefig(out / "accuracy_by_type.png", dpi=110)
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(5.5, 3.6))
    fixed = sorted((n for n in names if n.startswith("avg@") and n != "avg@auto"), key=lambda n: int(n.split("@")[1]))
    for kind in [None, *types]:
        def value(name):
            summary = evaluation[name]
            return summary["accuracy"] if kind is None else summary["accuracy_by_type"].get(kind)

        if fixed:
            axis.plot([evaluation[n]["mean_visual_tokens"] for n in fixed], [value(n) for n in fixed], marker="o",
                      label=f"fixed granularity ({kind or 'all'})", linewidth=2 if kind is None else 1)
    for name, marker in (("avg@auto", "*"), ("anyres", "s")):
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

    router = evaluation.get("avg@auto")
    if router and "granularity_by_type" in router:
        distribution = router["granularity_by_type"]
        levels = sorted({int(k) for counts in distribution.values() for k in counts})
        kinds = list(distribution)
        figure, axis = plt.subplots(figsize=(5, 3.4))
        bottom = [0.0] * len(kinds)
        for level in levels:
            shares = [100 * distribution[k].get(str(level), 0) / max(1, sum(distribution[k].values())) for k in kinds]
            axis.bar(kinds, shares, bottom=bottom, label=f"{level} tokens/crop")
            bottom = [b + s for b, s in zip(bottom, shares)]
        axis.set_ylabel("share of questions (%)")
        axis.set_title("Granularity chosen by the router")
        axis.legend(fontsize=7, loc="upper right")
        figure.tight_layout()
        figure.savefig(out / "router_choices.png", dpi=110)
        plt.close(figure)
