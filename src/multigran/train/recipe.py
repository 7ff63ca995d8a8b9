"""Training recipes: one YAML file per stage, plus `key.sub=value` overrides from the command line.

Schema (every recipe under recipes/ repeats it in a comment at its top):

    model: PATH                 # required: the multigran model directory to start from (relative to the cwd)
    output_dir: PATH            # required: checkpoints, metrics.jsonl, the final model (relative to the cwd)
    method: anyres              # optional: checked against the model's config.method
    model_dtype: float32        # dtype the weights are loaded in: float32 (default; mixed precision comes from
                                # training.bf16/fp16), bfloat16, float16 or auto (bf16 on CUDA, else float32)
    resume: false               # true: continue from the newest complete checkpoint in output_dir; or a checkpoint path
    method_settings: {}         # optional: method settings laid over the model's for this run and saved with it
                                # (e.g. MG-LLaVA's {hires_drop_path: 0.1}); validated by the method's settings class
    data:
      path: PATH | [PATHS]      # required: .json / .jsonl (LLaVA), mixture .yaml, or an image folder
      image_folder: PATH        # image paths in the records are relative to it
      box_file: PATH            # MG box file, joined by str(record id)
      template: vicuna_v1       # plain | vicuna_v1 | llama_3 | qwen_2 | chatml | chat_template
      max_length: 2048          # longer samples (text + visual tokens) are bad records: never truncated
      on_bad_record: skip       # skip (report, count, skip) | error (raise with file, record id, line)
      image_options: {}         # options of the method's image step (e.g. {granularity: 36})
      group_by_modality_length: true   # LLaVA's sampler: image and text-only samples batched apart, by length
      require_answer: true      # false for image-only data (no gpt turn)
      seed: 0                   # seed of `random:N` mixture sampling
    trainable:                  # parameter-name prefix -> learning rate; every other parameter is frozen.
      visual.projector: 1.0e-3  # prefixes are dotted module/parameter names of MultiGranForConditionalGeneration
      language_model: 2.0e-5    # (vision_tower, visual.<part>, language_model, ...); the longest matching prefix wins;
                                # a prefix that matches no parameter is an error. `null` removes a prefix.
    loss:
      name: lm                  # a key of multigran.train.losses.LOSSES
      options: {}               # keyword options of that loss
    lora:                       # optional: LoRA (peft) on the LLM's linear layers; null = full fine-tuning
      r: 128
      alpha: 256
      dropout: 0.05
      learning_rate: 2.0e-4     # LR of the adapters (the LLM itself stays frozen: do not list it in trainable)
      target_modules: null      # default: every nn.Linear of language_model except lm_head
      qlora: false              # 4-bit base LLM (needs CUDA and bitsandbytes)
    training:                   # Hugging Face TrainingArguments, by their transformers 5.24 names, e.g.
      num_train_epochs: 1
      per_device_train_batch_size: 16
      gradient_accumulation_steps: 2
      lr_scheduler_type: cosine
      warmup_steps: 0.03        # < 1 is a ratio of the total steps (transformers 5)
      weight_decay: 0.0
      bf16: auto                # auto = bf16 where CUDA supports it
      activation_checkpointing: true
      save_steps: 500
      logging_steps: 1
      deepspeed: recipes/deepspeed/zero2.json
      report_to: none           # tensorboard / wandb when installed

Engines: `training.deepspeed: recipes/deepspeed/zero2.json` (or zero3.json) runs DeepSpeed ZeRO; those configs leave
the optimizer and scheduler to the Trainer (no "optimizer"/"scheduler" sections), so the per-part learning rates hold.
FSDP: launch with `accelerate launch --config_file recipes/fsdp/fsdp2.yaml -m multigran.cli train ...`.

`learning_rate` in `training` is only the default of optimizer groups and unused: per-part rates come from
`trainable`. Overrides: `multigran train --recipe R.yaml training.num_train_epochs=2 trainable.vision_tower=2e-6`
(values parsed as YAML; keys under `trainable` are whole prefixes, dots included).
"""

import copy
import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

class RecipeLoader(yaml.SafeLoader):
    """YAML 1.2 booleans and floats: only true/false are booleans (PyYAML's YAML 1.1 also reads no/off/yes/on, which
    would turn `save_strategy: no` into False), and 1e-3 is a float (YAML 1.1 needs 1.0e-3)."""


RecipeLoader.yaml_implicit_resolvers = {
    key: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:\d[\d_]*\.?\d*[eE][-+]?\d+|\.\d+[eE][-+]?\d+)$"), list("-+0123456789.")
)


def load_yaml(text_or_stream):
    return yaml.load(text_or_stream, Loader=RecipeLoader)


TOP_LEVEL_KEYS = {"model", "output_dir", "method", "model_dtype", "resume", "data", "trainable", "loss", "lora",
                  "training", "method_settings"}
FLAT_MAPS = {"trainable"}  # sections whose keys are dotted prefixes, not nested paths


@dataclass
class DataSettings:
    path: str | list
    image_folder: str | None = None
    box_file: str | None = None
    template: str = "vicuna_v1"
    max_length: int | None = 2048
    on_bad_record: str = "skip"
    image_options: dict = field(default_factory=dict)
    group_by_modality_length: bool = True
    require_answer: bool = True
    seed: int = 0


@dataclass
class LossSettings:
    name: str = "lm"
    options: dict = field(default_factory=dict)


@dataclass
class LoraSettings:
    r: int = 128  # LLaVA-1.5 LoRA recipe: r 128, alpha 256
    alpha: int = 256
    dropout: float = 0.05
    learning_rate: float = 2e-4
    target_modules: list | None = None
    qlora: bool = False


@dataclass
class Recipe:
    model: str
    output_dir: str
    data: DataSettings
    trainable: dict
    training: dict
    loss: LossSettings = field(default_factory=LossSettings)
    lora: LoraSettings | None = None
    method: str | None = None
    model_dtype: str = "float32"
    resume: bool | str = False
    method_settings: dict = field(default_factory=dict)
    source: str | None = None  # the recipe file

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out.pop("source")
        return out


def parse_override(text: str) -> tuple[list[str], object]:
    """"a.b.c=value" -> (["a", "b", "c"], YAML-parsed value)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"override {text!r} is not of the form key.sub=value")
    try:
        parsed = load_yaml(value) if value.strip() else None
    except yaml.YAMLError as error:
        raise ValueError(f"override {text!r}: the value is not valid YAML: {error}") from None
    return key.strip().split("."), parsed


def apply_override(tree: dict, text: str):
    """Sets one override in a raw recipe dict (in place). A `null` value removes a `trainable` prefix."""
    path, value = parse_override(text)
    if path[0] not in TOP_LEVEL_KEYS:
        raise ValueError(f"override {text!r}: unknown recipe key {path[0]!r}; known keys: {sorted(TOP_LEVEL_KEYS)}")
    if path[0] in FLAT_MAPS and len(path) > 1:
        section = tree.setdefault(path[0], {}) or {}
        tree[path[0]] = section
        prefix = ".".join(path[1:])
        if value is None:
            section.pop(prefix, None)
        else:
            section[prefix] = value
        return
    node = tree
    for depth, key in enumerate(path[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise ValueError(f"override {text!r}: {'.'.join(path[:depth + 1])} is a value, not a section")
        node = child
    node[path[-1]] = value


def _build(cls, values, where: str):
    if not isinstance(values, dict):
        raise ValueError(f"recipe {where}: expected a mapping, got {type(values).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"recipe {where}: unknown key(s) {unknown}; known keys: {sorted(known)}")
    try:
        return cls(**values)
    except TypeError as error:
        raise ValueError(f"recipe {where}: {error}") from None


def check_training_arguments(training: dict, where: str):
    from transformers import TrainingArguments

    known = {f.name for f in dataclasses.fields(TrainingArguments)}
    unknown = sorted(set(training) - known)
    if unknown:
        raise ValueError(
            f"recipe {where}: unknown TrainingArguments {unknown} (see transformers.TrainingArguments for the names)"
        )
    if "output_dir" in training:
        raise ValueError(f"recipe {where}: set output_dir at the top level of the recipe, not under training")


def _number(value, name: str, where: str, kind=float, minimum=None, above=None, maximum=None, below=None):
    """A recipe number in its allowed range, or one error naming the key, the range and the value."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float) if kind is float else int)
    ok = ok and math.isfinite(value)
    ok = ok and (minimum is None or value >= minimum) and (above is None or value > above)
    ok = ok and (maximum is None or value <= maximum) and (below is None or value < below)
    if not ok:
        bounds = [f">= {minimum}" if minimum is not None else None, f"> {above}" if above is not None else None,
                  f"<= {maximum}" if maximum is not None else None, f"< {below}" if below is not None else None]
        noun = "an integer" if kind is int else "a finite number"
        raise ValueError(f"recipe {where}: {name} must be {noun} {' and '.join(b for b in bounds if b)}, got {value!r}")


# TrainingArguments whose range the recipe checks (transformers accepts some nonsense, e.g. max_steps -1 means
# "not set" there: a recipe omits max_steps to train for num_train_epochs).
TRAINING_RANGES = {
    "max_steps": dict(kind=int, minimum=1),
    "num_train_epochs": dict(above=0),
    "per_device_train_batch_size": dict(kind=int, minimum=1),
    "per_device_eval_batch_size": dict(kind=int, minimum=1),
    "gradient_accumulation_steps": dict(kind=int, minimum=1),
    "learning_rate": dict(above=0),
    "weight_decay": dict(minimum=0),
    "warmup_steps": dict(minimum=0),
    "max_grad_norm": dict(minimum=0),
    "save_steps": dict(above=0),
    "logging_steps": dict(above=0),
    "eval_steps": dict(above=0),
    "save_total_limit": dict(kind=int, minimum=1),
    "dataloader_num_workers": dict(kind=int, minimum=0),
    "seed": dict(kind=int, minimum=0),
    "adam_beta1": dict(minimum=0, below=1),
    "adam_beta2": dict(minimum=0, below=1),
    "adam_epsilon": dict(above=0),
}


def check_ranges(tree: dict, data: "DataSettings", lora, training: dict, where: str):
    for key, bounds in TRAINING_RANGES.items():
        if training.get(key) is not None:
            _number(training[key], f"training.{key}", where, **bounds)
    if data.max_length is not None:
        _number(data.max_length, "data.max_length", where, kind=int, minimum=1)
    _number(data.seed, "data.seed", where, kind=int, minimum=0)
    if not isinstance(data.path, (str, list)) or (isinstance(data.path, list) and not all(
            isinstance(p, str) and p for p in data.path)) or not data.path:
        raise ValueError(f"recipe {where}: data.path must be a path or a list of paths, got {data.path!r}")
    for key in ("image_folder", "box_file", "template", "on_bad_record"):
        value = getattr(data, key)
        if value is not None and not isinstance(value, str):
            raise ValueError(f"recipe {where}: data.{key} must be a string, got {value!r}")
    if not isinstance(data.image_options, dict):
        raise ValueError(f"recipe {where}: data.image_options must be a mapping, got {data.image_options!r}")
    from ..data.llava import ON_BAD_RECORD
    from ..data.templates import TEMPLATE_NAMES

    if data.template not in TEMPLATE_NAMES:
        raise ValueError(f"recipe {where}: data.template {data.template!r} is not one of {', '.join(TEMPLATE_NAMES)}")
    if data.on_bad_record not in ON_BAD_RECORD:
        raise ValueError(f"recipe {where}: data.on_bad_record must be skip or error, got {data.on_bad_record!r}")
    if lora is not None:
        _number(lora.r, "lora.r", where, kind=int, minimum=1)
        _number(lora.alpha, "lora.alpha", where, above=0)
        _number(lora.dropout, "lora.dropout", where, minimum=0, below=1)
        _number(lora.learning_rate, "lora.learning_rate", where, above=0)
    for key in ("model", "output_dir"):
        if not isinstance(tree[key], str):
            raise ValueError(f"recipe {where}: {key} must be a path, got {tree[key]!r}")
    if not isinstance(tree.get("resume", False), (bool, str)):
        raise ValueError(f"recipe {where}: resume must be true, false or a checkpoint path, got {tree['resume']!r}")


def resolve_engine_config(training: dict, where: str) -> dict:
    """training.deepspeed names a JSON file: a path, or a config shipped with the package (recipes/deepspeed/...)."""
    value = training.get("deepspeed")
    if value in (None, "", False):
        training.pop("deepspeed", None)
        return training
    if not isinstance(value, (str, dict)):
        raise ValueError(f"recipe {where}: training.deepspeed must be a DeepSpeed JSON file or null, got {value!r}")
    if isinstance(value, str) and not os.path.isfile(value):
        shipped = SHIPPED_RECIPES / value.removeprefix("recipes/")
        if not shipped.is_file():
            raise ValueError(f"recipe {where}: training.deepspeed {value!r} does not exist (shipped configs: "
                             "recipes/deepspeed/zero2.json, recipes/deepspeed/zero3.json; null trains without DeepSpeed)")
        training["deepspeed"] = str(shipped)
    return training


def check_engine_installed(recipe: "Recipe"):
    """DeepSpeed is an opt-in extra: a recipe that asks for it on a machine without it is one error naming the key."""
    import importlib.util

    value = recipe.training.get("deepspeed")
    if value and importlib.util.find_spec("deepspeed") is None:
        raise ValueError(f"recipe {recipe.source or '<dict>'}: training.deepspeed is set ({value}) but DeepSpeed is "
                         "not installed: pip install 'multigran[deepspeed]', or override training.deepspeed=null to "
                         "train without it")


def recipe_from_dict(tree: dict, source: str | None = None) -> Recipe:
    where = source or "<dict>"
    if not isinstance(tree, dict):
        raise ValueError(f"recipe {where}: expected a YAML mapping at the top level")
    unknown = sorted(set(tree) - TOP_LEVEL_KEYS)
    if unknown:
        raise ValueError(f"recipe {where}: unknown key(s) {unknown}; known keys: {sorted(TOP_LEVEL_KEYS)}")
    for key in ("model", "output_dir", "data", "trainable"):
        if tree.get(key) in (None, "", {}):
            raise ValueError(f"recipe {where}: '{key}' is required")
    data = _build(DataSettings, tree["data"], f"{where} (data)")
    trainable = tree["trainable"]
    if not isinstance(trainable, dict):
        raise ValueError(f"recipe {where}: trainable must map parameter-name prefixes to learning rates")
    for prefix, lr in trainable.items():
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
            raise ValueError(f"recipe {where}: trainable[{prefix!r}] must be a positive learning rate, got {lr!r}")
    loss = _build(LossSettings, tree.get("loss") or {}, f"{where} (loss)")
    lora = _build(LoraSettings, tree["lora"], f"{where} (lora)") if tree.get("lora") else None
    if not isinstance(tree.get("training") or {}, dict):
        raise ValueError(f"recipe {where}: training must be a mapping of TrainingArguments")
    training = dict(tree.get("training") or {})
    check_training_arguments(training, f"{where} (training)")
    check_ranges(tree, data, lora, training, where)
    training = resolve_engine_config(training, where)
    if tree.get("model_dtype", "float32") not in ("float32", "bfloat16", "float16", "auto"):
        raise ValueError(f"recipe {where}: model_dtype must be float32, bfloat16, float16 or auto")
    method_settings = tree.get("method_settings") or {}
    if not isinstance(method_settings, dict):
        raise ValueError(f"recipe {where}: method_settings must be a mapping of the method's settings, got "
                         f"{type(method_settings).__name__}")
    return Recipe(
        model=str(tree["model"]), output_dir=str(tree["output_dir"]), data=data,
        trainable={str(k): float(v) for k, v in trainable.items()}, training=training, loss=loss, lora=lora,
        method=tree.get("method"), model_dtype=tree.get("model_dtype", "float32"), resume=tree.get("resume", False),
        method_settings=dict(method_settings), source=source,
    )


SHIPPED_RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def resolve_recipe(path) -> str:
    """A recipe file's path: `path` itself when it exists, else the recipe shipped with the package under that name
    (`anyres/stage2_finetune.yaml`, also written `recipes/anyres/stage2_finetune.yaml`)."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return path
    shipped = SHIPPED_RECIPES / path.removeprefix("recipes/")
    if not shipped.is_file():
        names = sorted(str(p.relative_to(SHIPPED_RECIPES)) for p in SHIPPED_RECIPES.rglob("*.yaml"))
        raise FileNotFoundError(f"recipe {path!r} does not exist (shipped recipes: {', '.join(names)})")
    return str(shipped)


def read_recipe_file(path):
    """(resolved path, parsed YAML) of a recipe file or shipped recipe name; bad YAML is one clear error."""
    from ..json_io import read_text

    path = resolve_recipe(path)
    try:
        return path, load_yaml(read_text(path))
    except yaml.YAMLError as error:
        raise ValueError(f"recipe {path}: not valid YAML: {' '.join(str(error).split())}") from None
    except RecursionError:
        raise ValueError(f"recipe {path}: YAML nested too deeply") from None


def load_recipe(path, overrides=()) -> Recipe:
    """Reads a recipe YAML, applies `key.sub=value` overrides, validates it (unknown keys are errors).

    `path` is a file, or the name of a recipe shipped with the package (`anyres/stage2_finetune.yaml`, also written
    `recipes/anyres/stage2_finetune.yaml`), so installed copies work outside the repository too."""
    path, tree = read_recipe_file(path)
    tree = copy.deepcopy(tree) if isinstance(tree, dict) else tree
    if not isinstance(tree, dict):
        raise ValueError(f"recipe {path}: expected a YAML mapping at the top level")
    for text in overrides:
        apply_override(tree, text)
    return recipe_from_dict(tree, path)


__all__ = ["check_engine_installed", "Recipe", "DataSettings", "LossSettings", "LoraSettings", "load_recipe", "resolve_recipe", "recipe_from_dict",
           "apply_override", "parse_override"]
