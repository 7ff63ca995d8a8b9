"""Hugging Face `Trainer` glue: per-part learning rates, trainable parts, the modality-grouped sampler, pluggable
losses, progress and metrics. Everything else (DDP, FSDP, DeepSpeed ZeRO, mixed precision, checkpointing, resume) is
the Trainer's own, so `torchrun` / `accelerate launch` / `deepspeed` configurations work unchanged.

`build_trainer(recipe)` turns a recipe into a ready `MultiGranTrainer`; `run_training(recipe)` trains and saves.
"""

import inspect
import json
import logging
import os
import re
import time

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from .losses import get_loss

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"

# Wrapper segments that DDP / FSDP / activation checkpointing / peft put into parameter names.
_WRAPPER_SEGMENTS = re.compile(r"(^|\.)(module|_fsdp_wrapped_module|_checkpoint_wrapped_module|_orig_mod)(?=\.)")


def canonical_name(name: str) -> str | None:
    """A parameter name as the plain MultiGranForConditionalGeneration spells it (None for peft's frozen originals).

    Strips wrapper segments (`module.`, `_fsdp_wrapped_module.`, peft's `base_model.model.` and
    `.modules_to_save.default`), so recipe prefixes match under every engine.
    """
    name = _WRAPPER_SEGMENTS.sub(r"\1", name).lstrip(".")
    name = name.replace("..", ".")
    if name.startswith("base_model.model."):
        name = name[len("base_model.model."):]
    if ".original_module." in name:
        return None
    return re.sub(r"\.modules_to_save\.[^.]+(?=\.)", "", name)


def is_lora_parameter(name: str) -> bool:
    return ".lora_" in name


def match_prefix(name: str, prefixes) -> str | None:
    """The longest prefix that `name` equals or starts with at a dot boundary."""
    best = None
    for prefix in prefixes:
        if (name == prefix or name.startswith(prefix + ".")) and (best is None or len(prefix) > len(best)):
            best = prefix
    return best


def parameter_groups(model, trainable: dict, lora_learning_rate: float | None = None) -> dict[str, str]:
    """Parameter name -> the recipe part that trains it ("lora" for LoRA adapters); parameters absent are frozen.

    Raises ValueError for a prefix that matches no parameter (a typo would otherwise freeze the part silently).
    """
    groups, matched = {}, set()
    for name, _ in model.named_parameters():
        canonical = canonical_name(name)
        if canonical is None:
            continue
        if lora_learning_rate is not None and is_lora_parameter(canonical):
            groups[name] = "lora"
            continue
        prefix = match_prefix(canonical, trainable)
        if prefix is not None:
            groups[name] = prefix
            matched.add(prefix)
    missing = sorted(set(trainable) - matched)
    if missing:
        tops = sorted({canonical_name(n).split(".")[0] for n, _ in model.named_parameters() if canonical_name(n)})
        children = sorted({".".join(canonical_name(n).split(".")[:2]) for n, _ in model.named_parameters()
                           if canonical_name(n) and canonical_name(n).startswith("visual.")})
        raise ValueError(
            f"trainable prefix(es) {missing} match no parameter of the model; top-level parts: {tops}, "
            f"visual parts: {children}"
        )
    return groups


def learning_rates(trainable: dict, lora_learning_rate: float | None = None) -> dict[str, float]:
    rates = dict(trainable)
    if lora_learning_rate is not None:
        rates["lora"] = lora_learning_rate
    return rates


def set_trainable(model, trainable: dict, lora_learning_rate: float | None = None) -> dict[str, str]:
    """Freezes everything except the recipe's trainable parts (and LoRA adapters); returns parameter_groups."""
    groups = parameter_groups(model, trainable, lora_learning_rate)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name in groups)
    return groups


def unwrap(model):
    """The MultiGranForConditionalGeneration inside DDP / DeepSpeed / peft wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        elif type(model).__name__.startswith("Peft") and hasattr(model, "base_model"):
            model = model.base_model.model
        else:
            return model


# --- sampler ------------------------------------------------------------------------------------------------------


def split_to_even_chunks(indices, lengths, num_chunks):
    """LLaVA: deal indices (longest first) into `num_chunks` chunks of equal size, each to the shortest chunk."""
    if len(indices) % num_chunks != 0:
        return [indices[i::num_chunks] for i in range(num_chunks)]
    per_chunk = len(indices) // num_chunks
    chunks = [[] for _ in range(num_chunks)]
    chunk_lengths = [0] * num_chunks
    for index in indices:
        shortest = chunk_lengths.index(min(chunk_lengths))
        chunks[shortest].append(index)
        chunk_lengths[shortest] += lengths[index]
        if len(chunks[shortest]) == per_chunk:
            chunk_lengths[shortest] = float("inf")
    return chunks


def length_grouped_indices(lengths, batch_size, world_size, generator):
    """LLaVA's `get_length_grouped_indices`: shuffle, cut into megabatches of world_size * batch_size, sort each by
    length (longest first) and split it into world_size chunks of balanced length."""
    permutation = torch.randperm(len(lengths), generator=generator).tolist()
    megabatch_size = world_size * batch_size
    megabatches = [permutation[i:i + megabatch_size] for i in range(0, len(lengths), megabatch_size)]
    megabatches = [sorted(m, key=lambda i: lengths[i], reverse=True) for m in megabatches]
    megabatches = [split_to_even_chunks(m, lengths, world_size) for m in megabatches]
    return [i for megabatch in megabatches for chunk in megabatch for i in chunk]


def modality_length_grouped_indices(lengths, batch_size, world_size, generator):
    """LLaVA's `get_modality_length_grouped_indices`: lengths > 0 are image samples, < 0 text-only; each modality is
    length-grouped on its own, megabatches are shuffled, the two leftover partial megabatches form the last one.
    Differences from LLaVA: one seeded generator for every shuffle (LLaVA uses the global RNG for the inner ones), so
    the order is a pure function of (seed, epoch) — what exact resume needs."""
    if any(length == 0 for length in lengths):
        raise ValueError("modality lengths must be non-zero (positive: with images, negative: text-only)")
    if all(length > 0 for length in lengths) or all(length < 0 for length in lengths):
        return length_grouped_indices([abs(x) for x in lengths], batch_size, world_size, generator)
    image_indices = [i for i, length in enumerate(lengths) if length > 0]
    text_indices = [i for i, length in enumerate(lengths) if length < 0]
    image_order = [image_indices[i] for i in length_grouped_indices(
        [lengths[i] for i in image_indices], batch_size, world_size, generator)]
    text_order = [text_indices[i] for i in length_grouped_indices(
        [-lengths[i] for i in text_indices], batch_size, world_size, generator)]
    megabatch_size = world_size * batch_size
    image_megabatches = [image_order[i:i + megabatch_size] for i in range(0, len(image_order), megabatch_size)]
    text_megabatches = [text_order[i:i + megabatch_size] for i in range(0, len(text_order), megabatch_size)]
    leftover = image_megabatches[-1] + text_megabatches[-1]
    megabatches = image_megabatches[:-1] + text_megabatches[:-1]
    megabatches = [megabatches[i] for i in torch.randperm(len(megabatches), generator=generator).tolist()]
    if leftover:
        megabatches.append(sorted(leftover))
    return [i for megabatch in megabatches for i in megabatch]


class ModalityLengthGroupedSampler(torch.utils.data.Sampler):
    """Index order of one epoch: grouped by modality and length (`group_by_modality_length`), or a plain shuffle.

    The same (seed, epoch) gives the same order on every rank and after a resume; accelerate shards the batches
    across ranks. `world_size` here is ranks x gradient-accumulation steps (LLaVA's choice: the samples of one
    optimizer step have similar lengths).
    """

    def __init__(self, lengths, batch_size: int, world_size: int = 1, seed: int = 0, group: bool = True):
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.world_size = world_size
        self.seed = seed
        self.group = group
        self.epoch = 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        return len(self.lengths)

    def __iter__(self):
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        if not self.group:
            return iter(torch.randperm(len(self.lengths), generator=generator).tolist())
        return iter(modality_length_grouped_indices(self.lengths, self.batch_size, self.world_size, generator))


# --- progress and metrics -----------------------------------------------------------------------------------------


class MetricsLogCallback(TrainerCallback):
    """Appends every log (loss, learning rates, throughput, loss metrics) as one JSON line to output_dir/metrics.jsonl
    on the main process. On resume the lines after the checkpoint's step are dropped (they will be logged again)."""

    def __init__(self, path):
        self.path = path

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        kept = []
        if state.global_step > 0 and os.path.isfile(self.path):
            with open(self.path, encoding="utf-8") as handle:
                for line in handle:
                    try:
                        entry = json.loads(line)
                    except json.JSONDecodeError:  # a line cut by a hard kill
                        continue
                    if entry.get("step", 0) <= state.global_step:
                        kept.append(line if line.endswith("\n") else line + "\n")
        with open(self.path, "w", encoding="utf-8") as handle:
            handle.writelines(kept)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        entry = {"step": state.global_step, **{k: _plain(v) for k, v in logs.items()}}
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry) + "\n")
            handle.flush()


def _plain(value):
    if torch.is_tensor(value):
        return value.item()
    return value


class TrainingProgressCallback(TrainerCallback):
    """A tqdm bar (main process) showing loss, learning rate, samples/s and visual tokens/s."""

    def __init__(self):
        self.bar = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and not args.disable_tqdm:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train", dynamic_ncols=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is None or not logs or "loss" not in logs:
            return
        shown = {"loss": f"{logs['loss']:.4f}", "lr": f"{logs.get('learning_rate', 0):.2e}"}
        if "samples_per_second" in logs:
            shown["samples/s"] = f"{logs['samples_per_second']:.1f}"
            shown["vtok/s"] = f"{logs['visual_tokens_per_second']:.0f}"
        self.bar.set_postfix(shown, refresh=False)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# --- the trainer --------------------------------------------------------------------------------------------------


class MultiGranTrainer(Trainer):
    """`Trainer` with per-part learning rates, the modality-grouped sampler and a loss from `LOSSES`.

    Args (besides the Trainer's):
        learning_rates: part name -> learning rate (recipe `trainable` prefixes, plus "lora").
        parameter_group_of: parameter name -> part name (from `set_trainable`); parameters absent are frozen.
        loss_name / loss_options: the loss (`multigran.train.losses.LOSSES`) and its options.
        modality_lengths: per-sample lengths, > 0 with images and < 0 text-only (`LlavaDataset.modality_lengths`).
        group_by_modality_length: use LLaVA's grouping (else a seeded shuffle).
        image_token_id: to count visual tokens per batch.
    """

    def __init__(self, *args, learning_rates: dict, parameter_group_of: dict, loss_name: str = "lm",
                 loss_options: dict | None = None, modality_lengths=None, group_by_modality_length: bool = True,
                 image_token_id: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.learning_rates = dict(learning_rates)
        self.parameter_group_of = dict(parameter_group_of)
        self.loss_fn = get_loss(loss_name)
        self.loss_options = dict(loss_options or {})
        self.loss_takes_items = "num_items_in_batch" in inspect.signature(self.loss_fn).parameters
        self.modality_lengths = modality_lengths
        self.group_by_modality_length = group_by_modality_length
        self.image_token_id = image_token_id
        self._reset_window()
        for callback in (ProgressCallback, PrinterCallback):
            self.remove_callback(callback)
        self.add_callback(TrainingProgressCallback())
        self.add_callback(MetricsLogCallback(os.path.join(self.args.output_dir, METRICS_FILE)))

    # optimizer: one group per (part, weight decay), each with the part's learning rate
    def create_optimizer(self, model=None):
        opt_model = self.model if model is None else model
        if self.optimizer is None:
            decay = set(self.get_decay_parameter_names(opt_model))
            by_group = {canonical_name(n): g for n, g in self.parameter_group_of.items() if canonical_name(n)}
            groups = {}
            for name, parameter in opt_model.named_parameters():
                if not parameter.requires_grad:
                    continue
                part = by_group.get(canonical_name(name))
                if part is None:
                    raise ValueError(f"parameter {name} requires grad but no recipe part trains it")
                weight_decay = self.args.weight_decay if name in decay else 0.0
                groups.setdefault((part, weight_decay), []).append(parameter)
            if not groups:
                raise ValueError("no parameter is trainable: the recipe's `trainable` selects nothing")
            param_groups = [
                {"params": params, "lr": self.learning_rates[part], "weight_decay": wd, "name": part}
                for (part, wd), params in groups.items()
            ]
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            for key in ("params", "model", "optimizer_dict"):
                if key in optimizer_kwargs:
                    raise ValueError(f"optimizer {self.args.optim!r} builds its own parameter groups; per-part "
                                     "learning rates need a standard optimizer (e.g. adamw_torch)")
            self.optimizer = optimizer_cls(param_groups, **optimizer_kwargs)
        return self.optimizer

    def _get_train_sampler(self, train_dataset=None):
        dataset = self.train_dataset if train_dataset is None else train_dataset
        lengths = self.modality_lengths
        if lengths is None:
            lengths = getattr(dataset, "modality_lengths", None) or [1] * len(dataset)
        return ModalityLengthGroupedSampler(
            lengths, batch_size=self.args.train_batch_size,
            world_size=max(1, self.args.world_size) * self.args.gradient_accumulation_steps,
            seed=self.args.data_seed if self.args.data_seed is not None else self.args.seed,
            group=self.group_by_modality_length,
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        options = dict(self.loss_options)
        uses_items = self.loss_takes_items and num_items_in_batch is not None
        if uses_items:
            options["num_items_in_batch"] = num_items_in_batch
        loss, metrics = self.loss_fn(model, inputs, **options)
        # A loss normalised by the accumulated token count is already scaled for accumulation; a per-batch mean is not.
        self.loss_is_scaled_for_ga = uses_items
        if uses_items and self.args.average_tokens_across_devices:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients; the count was summed over ranks
        if model.training:
            self._record(inputs, metrics)
            if self.optimizer is not None:  # the rates of the coming optimizer step (the scheduler steps after it)
                self._window["lrs"] = {g.get("name", "default"): g["lr"] for g in self.optimizer.param_groups}
        return (loss, {"loss": loss, **metrics}) if return_outputs else loss

    def _reset_window(self):
        self._window = {"samples": 0, "visual_tokens": 0, "metrics": {}, "lrs": {}, "start": time.perf_counter()}

    def _record(self, inputs, metrics):
        """Adds a step to the logging window. A loss that runs the LM on other sequences than the batch's (AVG's
        losses, one forward per granularity) reports the visual tokens it used as the `visual_tokens` metric;
        otherwise they are the batch's image placeholders."""
        window = self._window
        input_ids = inputs["input_ids"]
        window["samples"] += input_ids.shape[0]
        metrics = dict(metrics)
        if "visual_tokens" in metrics:
            window["visual_tokens"] += int(metrics.pop("visual_tokens"))
        elif self.image_token_id is not None:
            window["visual_tokens"] += int((input_ids == self.image_token_id).sum())
        for key, value in metrics.items():
            total, count = window["metrics"].get(key, (0.0, 0))
            window["metrics"][key] = (total + float(value), count + 1)

    def log(self, logs, start_time=None):
        if "loss" in logs:  # a training-step log: add throughput (summed over ranks), part LRs, loss metrics
            window = self._window
            elapsed = max(time.perf_counter() - window["start"], 1e-9)
            counts = torch.tensor([window["samples"], window["visual_tokens"]], dtype=torch.float64,
                                  device=self.args.device)
            if self.args.world_size > 1:
                counts = self.accelerator.reduce(counts, reduction="sum")
            logs["samples_per_second"] = counts[0].item() / elapsed
            logs["visual_tokens_per_second"] = counts[1].item() / elapsed
            for key, (total, count) in window["metrics"].items():
                logs[key] = total / max(count, 1)
            for name, lr in window["lrs"].items():
                logs[f"lr/{name}"] = lr
            self._reset_window()
        super().log(logs, start_time)


# --- from a recipe ------------------------------------------------------------------------------------------------


def resolve_precision(training: dict) -> dict:
    """bf16/fp16 "auto": bf16 where CUDA supports it, else full precision."""
    training = dict(training)
    cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    for key in ("bf16", "fp16"):
        if training.get(key) == "auto":
            training[key] = cuda_bf16 if key == "bf16" else False
    return training


def check_report_to(report_to):
    """Clear error when TensorBoard / W&B are asked for but not installed."""
    import importlib.util

    wanted = [report_to] if isinstance(report_to, str) else list(report_to or [])
    packages = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}
    for name in wanted:
        if name in packages and not any(importlib.util.find_spec(p) for p in packages[name]):
            raise ValueError(f"training.report_to asks for {name!r} but it is not installed: pip install {name}")


def training_arguments(recipe) -> TrainingArguments:
    training = resolve_precision(recipe.training)
    training.setdefault("report_to", "none")
    check_report_to(training["report_to"])
    training.setdefault("logging_steps", 1)
    training.setdefault("dataloader_pin_memory", torch.cuda.is_available())
    training.setdefault("save_strategy", "steps")
    training.setdefault("ddp_find_unused_parameters", True)  # a text-only batch leaves the visual parts unused
    if training.get("activation_checkpointing") or training.get("gradient_checkpointing"):
        training.setdefault("activation_checkpointing_kwargs", {"use_reentrant": False})
    training["remove_unused_columns"] = False  # the batch holds exactly the model inputs (method inputs included)
    return TrainingArguments(output_dir=recipe.output_dir, **training)


def load_model_for_training(recipe, allow_missing: bool = False):
    """The recipe's model, every weight checked (`allow_missing`: a deliberately partial checkpoint, e.g. a stage-1
    model from parts, `multigran train --allow-missing-weights`)."""
    from transformers import AutoModelForImageTextToText

    import multigran  # noqa: F401  (registers the Auto classes)

    if not os.path.isfile(os.path.join(recipe.model, "config.json")):
        raise ValueError(f"recipe model {recipe.model!r} is not a multigran model directory (no config.json)")
    dtype = recipe.model_dtype
    if dtype == "auto":
        dtype = "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"
    kwargs = {"dtype": getattr(torch, dtype), "allow_missing": allow_missing}
    if recipe.lora is not None and recipe.lora.qlora:
        from .lora import qlora_quantization_config

        kwargs["quantization_config"] = qlora_quantization_config()
    if recipe.method_settings:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(recipe.model)
        config.method_settings = {**config.method_settings, **recipe.method_settings}
        # the method's settings class validates them when the model is built
        kwargs["config"] = config
    model = AutoModelForImageTextToText.from_pretrained(recipe.model, **kwargs)
    if recipe.method is not None and model.config.method != recipe.method:
        raise ValueError(f"the recipe is for method {recipe.method!r} but {recipe.model} is a "
                         f"{model.config.method!r} model")
    return model


def build_trainer(recipe, model=None, processor=None):
    """Model, processor, data and Trainer for one recipe (nothing is trained yet)."""
    from transformers import AutoProcessor

    from ..data.collator import MultiGranCollator
    from ..data.llava import LlavaDataset
    from ..data.templates import prepare_tokenizer

    args = training_arguments(recipe)
    if model is None and not os.path.isfile(os.path.join(recipe.model, "config.json")):
        raise ValueError(f"recipe model {recipe.model!r} is not a multigran model directory (no config.json)")
    processor = processor if processor is not None else AutoProcessor.from_pretrained(recipe.model)
    model = model if model is not None else load_model_for_training(recipe)
    added = prepare_tokenizer(processor.tokenizer, recipe.data.template)
    if added:
        if recipe.lora is not None:
            raise ValueError(f"the tokenizer lacks the {recipe.data.template} template's tokens {added}: with LoRA their "
                             "new embeddings could not be trained or merged; use a tokenizer that has them")
        logger.warning("added the %s template's tokens %s to the tokenizer; resizing the embeddings",
                       recipe.data.template, added)
        model.resize_token_embeddings(len(processor.tokenizer))

    lora_lr = None
    if recipe.lora is not None:
        from .lora import apply_lora

        model = apply_lora(model, recipe.lora, list(recipe.trainable))
        lora_lr = recipe.lora.learning_rate
    groups = set_trainable(model, recipe.trainable, lora_lr)
    if args.activation_checkpointing:
        model.config.use_cache = False

    data = recipe.data
    dataset = LlavaDataset(
        data.path, processor, template=data.template, image_folder=data.image_folder, box_file=data.box_file,
        max_length=data.max_length, on_bad_record=data.on_bad_record, image_options=data.image_options,
        seed=data.seed, require_answer=data.require_answer,
    )
    trainer = MultiGranTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=processor,
        data_collator=MultiGranCollator.from_tokenizer(processor.tokenizer),
        learning_rates=learning_rates(recipe.trainable, lora_lr), parameter_group_of=groups,
        loss_name=recipe.loss.name, loss_options=recipe.loss.options, modality_lengths=dataset.modality_lengths,
        group_by_modality_length=data.group_by_modality_length, image_token_id=processor.image_token_id,
    )
    check_fsdp_engaged(trainer)
    return trainer


def check_fsdp_engaged(trainer):
    """`accelerate launch` with an FSDP config (recipes/fsdp/) must give an FSDP run: accelerate engages FSDP on
    multi-GPU (and other accelerator) runs only, and on CPU processes would silently train plain DDP instead."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and not trainer.is_fsdp_enabled:
        raise ValueError(
            f"the accelerate config asks for FSDP but accelerate runs it on GPUs only; this {trainer.args.world_size}-"
            f"process run on {trainer.args.device.type} would be plain DDP: use `torchrun` (DDP) on CPU, or GPUs for FSDP"
        )


def latest_complete_checkpoint(output_dir) -> str | None:
    """The newest checkpoint-N in output_dir whose trainer_state.json (written last) is complete."""
    if not os.path.isdir(output_dir):
        return None
    found = []
    for name in os.listdir(output_dir):
        match = re.fullmatch(r"checkpoint-(\d+)", name)
        state = os.path.join(output_dir, name, "trainer_state.json")
        if not match or not os.path.isfile(state):
            continue
        try:
            with open(state, encoding="utf-8") as handle:
                json.load(handle)
        except (json.JSONDecodeError, OSError):  # cut by a hard kill while saving
            continue
        found.append((int(match.group(1)), os.path.join(output_dir, name)))
    return max(found)[1] if found else None


def resume_checkpoint(recipe) -> str | None:
    if recipe.resume in (False, None, "", "false"):
        return None
    if recipe.resume is True or recipe.resume == "true":
        checkpoint = latest_complete_checkpoint(recipe.output_dir)
        if checkpoint is None:
            raise ValueError(f"resume asked for but {recipe.output_dir} holds no complete checkpoint")
        return checkpoint
    if not os.path.isdir(str(recipe.resume)):
        raise ValueError(f"resume checkpoint {recipe.resume!r} does not exist")
    return str(recipe.resume)


def save_final(trainer, recipe):
    """Saves the trained model (or adapters) and a processor whose chat template matches the training template."""
    import yaml

    from ..data.templates import inference_chat_template, stop_token_ids

    output_dir = recipe.output_dir
    processor = trainer.processing_class
    template = inference_chat_template(recipe.data.template, processor.tokenizer)
    if template:
        processor.chat_template = template
        processor.tokenizer.chat_template = template
    model = unwrap(trainer.model)
    stops = stop_token_ids(processor.tokenizer, recipe.data.template)
    if stops and getattr(model, "generation_config", None) is not None:
        model.generation_config.eos_token_id = stops if len(stops) > 1 else stops[0]
        model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.config.use_cache = True
    trainer.save_model(output_dir)
    if trainer.args.should_save:
        processor.save_pretrained(output_dir)
        with open(os.path.join(output_dir, "recipe.yaml"), "w", encoding="utf-8") as handle:
            yaml.safe_dump(recipe.to_dict(), handle, sort_keys=False)


def run_training(recipe, model=None, processor=None):
    """Trains one recipe end to end; returns the Trainer (its `state.log_history` holds the logs)."""
    trainer = build_trainer(recipe, model=model, processor=processor)
    dataset = trainer.train_dataset
    trainer.train(resume_from_checkpoint=resume_checkpoint(recipe))
    save_final(trainer, recipe)
    summary = dataset.bad_record_summary()
    if summary["total"]:
        logger.warning("%s", dataset.bad_record_summary_text())
    if trainer.args.should_save:
        with open(os.path.join(recipe.output_dir, "bad_records.json"), "w", encoding="utf-8") as handle:
            json.dump({**summary, "records": [vars(r) for r in dataset.bad_records]}, handle, indent=1)
    return trainer


__all__ = [
    "MultiGranTrainer",
    "ModalityLengthGroupedSampler",
    "MetricsLogCallback",
    "TrainingProgressCallback",
    "build_trainer",
    "run_training",
    "set_trainable",
    "parameter_groups",
    "canonical_name",
    "latest_complete_checkpoint",
    "modality_length_grouped_indices",
    "unwrap",
    "METRICS_FILE",
]
