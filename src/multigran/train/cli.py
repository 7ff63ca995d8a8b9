"""`multigran train` and `multigran merge-lora` (wired into multigran.cli by the lead).

    multigran train --recipe recipes/anyres/stage1_pretrain.yaml model=runs/init data.path=data.json \\
        training.per_device_train_batch_size=8 [--resume] [--output-dir DIR]
    torchrun --nproc_per_node 8 -m multigran.cli train --recipe ...      # DDP / DeepSpeed / FSDP as the recipe says
    multigran merge-lora runs/lora-stage2 runs/merged [--base runs/stage1]

Recipes with a top-level `stage:` key are not Trainer recipes: they name their own training loop in STAGE_RUNNERS
(e.g. LLaVA-UHD v2's stage 0, `stage: jbu`), which gets the recipe path and the overrides.
"""

import importlib

# `stage:` value -> "module:function" taking (recipe_path, overrides); imported on use.
STAGE_RUNNERS = {
    "jbu": "multigran.train.uhd_stage0:run_jbu_recipe",
}


def recipe_stage(path) -> str | None:
    """The `stage:` of a recipe file or shipped recipe name (None for Trainer recipes)."""
    from .recipe import read_recipe_file

    _, tree = read_recipe_file(path)
    return tree.get("stage") if isinstance(tree, dict) else None


def check_recipe_paths(recipe):
    """The paths a recipe names exist (a shipped recipe's defaults are examples): errors say which key to set."""
    import os

    if not os.path.isfile(os.path.join(recipe.model, "config.json")):
        raise FileNotFoundError(f"recipe {recipe.source}: model {recipe.model!r} is not a multigran model directory "
                                "(no config.json): set model=DIR (e.g. the output of `multigran init`)")
    paths = [recipe.data.path] if isinstance(recipe.data.path, str) else recipe.data.path
    for path in paths:
        if not os.path.exists(path):
            raise FileNotFoundError(f"recipe {recipe.source}: training data {path!r} does not exist: set data.path=PATH")
    for key in ("image_folder", "box_file"):
        value = getattr(recipe.data, key)
        if value and not os.path.exists(value):
            hint = " (a box file written by `multigran detect`)" if key == "box_file" else ""
            raise FileNotFoundError(f"recipe {recipe.source}: data.{key} {value!r} does not exist: set "
                                    f"data.{key}=PATH{hint}")


def add_train_arguments(parser):
    parser.add_argument("--recipe", required=True, help="a training recipe (YAML; see recipes/ and train/recipe.py)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="recipe overrides, e.g. training.num_train_epochs=2 trainable.vision_tower=2e-6 "
                             "(values are YAML)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest complete checkpoint in output_dir (after a crash or a kill)")
    parser.add_argument("--resume-from", metavar="CHECKPOINT", help="continue from this checkpoint directory")
    parser.add_argument("--output-dir", help="shorthand for the override output_dir=DIR")
    parser.add_argument("--allow-missing-weights", action="store_true",
                        help="start from a model directory that lacks some weights on purpose: they start from the "
                             "model's initialisation (default: missing weights are an error)")


def train_command(args):
    from ..loading import check_model_weights
    from .recipe import check_engine_installed, load_recipe
    from .trainer import run_training

    overrides = list(args.overrides or [])
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    stage = recipe_stage(args.recipe)
    if stage is not None:
        if stage not in STAGE_RUNNERS:
            raise ValueError(f"recipe {args.recipe}: unknown stage {stage!r}; known stages: {sorted(STAGE_RUNNERS)}")
        if args.resume or args.resume_from:
            raise ValueError(f"recipe {args.recipe}: stage {stage!r} does not support --resume")
        module, _, function = STAGE_RUNNERS[stage].partition(":")
        getattr(importlib.import_module(module), function)(args.recipe, overrides)
        return
    recipe = load_recipe(args.recipe, overrides)
    if args.resume or args.resume_from:
        recipe.resume = args.resume_from or True
    check_recipe_paths(recipe)
    check_engine_installed(recipe)
    check_model_weights(recipe.model, allow_missing=args.allow_missing_weights)  # headers only, before any training
    model = None
    if args.allow_missing_weights:  # the trainer's own load would refuse the partial checkpoint
        from .trainer import load_model_for_training

        model = load_model_for_training(recipe, allow_missing=True)
    trainer = run_training(recipe, model=model)
    if trainer.args.should_save:
        print(f"wrote {recipe.output_dir}")


def add_merge_lora_arguments(parser):
    parser.add_argument("adapter", help="a LoRA training output (or checkpoint) directory with adapter_config.json")
    parser.add_argument("output", help="directory for the merged multigran model")
    parser.add_argument("--base", help="base model directory (default: the one named in adapter_config.json)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])


def merge_lora_command(args):
    from .lora import merge_lora

    merge_lora(args.adapter, args.output, base_model=args.base, dtype=args.dtype)
    print(f"wrote {args.output}")


__all__ = ["add_train_arguments", "train_command", "add_merge_lora_arguments", "merge_lora_command"]
