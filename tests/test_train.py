"""Training: recipes and overrides, which parameters each recipe trains, per-part learning rates, the modality sampler,
the loss hook and gradient accumulation, metrics and progress, LoRA + merge, and a tiny anyres stage 1 -> stage 2 run."""

import argparse
import dataclasses
import json
import math
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from multigran.train import losses as losses_module
from multigran.train.recipe import apply_override, load_recipe, recipe_from_dict
from multigran.train.trainer import (
    ModalityLengthGroupedSampler,
    build_trainer,
    canonical_name,
    modality_length_grouped_indices,
    parameter_groups,
    set_trainable,
)

REPO = Path(__file__).resolve().parents[1]
# Trainer recipes; those with a top-level `stage:` run their own loop (train/cli.py STAGE_RUNNERS) and are tested there.
RECIPES = sorted(p for p in (REPO / "recipes").rglob("*.yaml")
                 if p.parent.name not in ("fsdp", "deepspeed") and not re.search(r"(?m)^stage:", p.read_text()))
COLOURS = {"red": (255, 0, 0), "blue": (0, 0, 255), "green": (0, 255, 0), "white": (255, 255, 255)}


def make_dataset(root: Path, n: int = 64, text_only: int = 0, question="What colour is the square?"):
    """Coloured squares answered by their colour (+ optional text-only records)."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        name = list(COLOURS)[i % len(COLOURS)]
        Image.new("RGB", (32, 32), COLOURS[name]).save(root / "images" / f"{i}.png")
        records.append({"id": i, "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\n" + question}, {"from": "gpt", "value": name}]})
    for i in range(text_only):
        records.append({"id": f"t{i}", "conversations": [
            {"from": "human", "value": "Say yes" + " please" * (i % 3)}, {"from": "gpt", "value": "Yes."}]})
    (root / "data.json").write_text(json.dumps(records))
    return root / "data.json", root / "images"


def fast_overrides(model_dir, out_dir, data, images, **training):
    values = {"per_device_train_batch_size": 8, "gradient_accumulation_steps": 1, "dataloader_num_workers": 0,
              "save_strategy": "no", "activation_checkpointing": False, "disable_tqdm": True, **training}
    return [f"model={model_dir}", f"output_dir={out_dir}", f"data.path={data}", f"data.image_folder={images}",
            *(f"training.{k}={v}" for k, v in values.items())]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from multigran.tiny import build_tiny

    root = tmp_path_factory.mktemp("train")
    build_tiny(root / "init", method="anyres", seed=0)
    data, images = make_dataset(root, n=64)
    return root, data, images


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread; two threads on shared, busy cores spend their time waiting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- recipes ------------------------------------------------------------------------------------------------------


def test_overrides_are_yaml_and_trainable_keys_keep_their_dots(tmp_path):
    tree = {"model": "m", "output_dir": "o", "data": {"path": "d.json"}, "trainable": {"visual.projector": 1e-3},
            "training": {}}
    for text in ["trainable.language_model.lm_head=1e-4", "trainable.visual.projector=null",
                 "trainable.vision_tower=2.0e-6", "training.num_train_epochs=3", "training.save_strategy=no",
                 "data.image_options={granularity: 36}", "data.path=[a.json, b.jsonl]", "lora={r: 8}"]:
        apply_override(tree, text)
    assert tree["trainable"] == {"language_model.lm_head": 1e-4, "vision_tower": 2e-6}
    assert tree["training"] == {"num_train_epochs": 3, "save_strategy": "no"}  # "no" stays a string
    recipe = recipe_from_dict(tree)
    assert recipe.data.image_options == {"granularity": 36} and recipe.data.path == ["a.json", "b.jsonl"]
    assert recipe.lora.r == 8 and recipe.lora.alpha == 256

    with pytest.raises(ValueError, match="unknown recipe key 'modle'"):
        apply_override(tree, "modle=x")
    with pytest.raises(ValueError, match="not of the form key.sub=value"):
        apply_override(tree, "training.seed")
    with pytest.raises(ValueError, match=r"unknown TrainingArguments \['num_epochs'\]"):
        recipe_from_dict({**tree, "training": {"num_epochs": 1}})
    with pytest.raises(ValueError, match=r"\(data\): unknown key\(s\) \['templates'\]"):
        recipe_from_dict({**tree, "data": {"path": "x", "templates": "plain"}})
    with pytest.raises(ValueError, match="must be a positive learning rate"):
        recipe_from_dict({**tree, "trainable": {"visual": "fast"}})
    with pytest.raises(ValueError, match="'trainable' is required"):
        recipe_from_dict({**tree, "trainable": {}})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_recipe(tmp_path / "none.yaml")


def test_shipped_recipes_load_by_name_from_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outside the repository: the package's own copy is found
    by_name = load_recipe("avg/stage4_rglf.yaml")
    in_repo = load_recipe(REPO / "recipes/avg/stage4_rglf.yaml")
    assert Path(by_name.source).resolve() == Path(in_repo.source).resolve()
    assert by_name == dataclasses.replace(in_repo, source=by_name.source)
    assert load_recipe("recipes/avg/stage4_rglf.yaml").source == by_name.source
    assert by_name.trainable == {"visual.router": 1e-3}
    with pytest.raises(FileNotFoundError, match=r"'avg/stage5.yaml' does not exist \(shipped recipes: .*avg/stage4_rglf"):
        load_recipe("avg/stage5.yaml")


def test_shipped_recipes_parse_with_documented_schema():
    assert len(RECIPES) >= 2
    for path in RECIPES:
        recipe = load_recipe(path)
        text = path.read_text()
        assert "Schema" in text and "trainable" in text, f"{path} lacks the schema comment"
        assert recipe.trainable and recipe.method in ("anyres", "avg", "mg", "uhd")
    stage1 = load_recipe(REPO / "recipes/anyres/stage1_pretrain.yaml")
    assert stage1.trainable == {"visual.projector": 1e-3} and stage1.data.template == "plain"
    t = stage1.training
    assert t["per_device_train_batch_size"] * t["gradient_accumulation_steps"] == 256
    assert (t["lr_scheduler_type"], t["warmup_steps"], t["weight_decay"], t["num_train_epochs"]) == ("cosine", 0.03, 0.0, 1)
    stage2 = load_recipe(REPO / "recipes/anyres/stage2_finetune.yaml")
    assert stage2.trainable == {"visual": 2e-5, "language_model": 2e-5, "vision_tower": 2e-6}
    assert stage2.training["per_device_train_batch_size"] * stage2.training["gradient_accumulation_steps"] == 128
    for name in ("zero2.json", "zero3.json"):
        config = json.loads((REPO / "recipes/deepspeed" / name).read_text())
        assert config["zero_optimization"]["stage"] == int(name[4])
        assert "optimizer" not in config and "scheduler" not in config  # the Trainer's per-part groups are used


@pytest.mark.parametrize("path", RECIPES, ids=[f"{p.parent.name}/{p.name}" for p in RECIPES])
def test_each_recipe_trains_exactly_its_parts(path, tmp_path):
    """One backward step on a tiny model of the recipe's method: the parameters that get a gradient are exactly those
    under the recipe's prefixes (every prefix gets some; nothing else gets any)."""
    from multigran.data.collator import MultiGranCollator
    from multigran.data.llava import LlavaDataset
    from multigran.data.templates import prepare_tokenizer
    from multigran.tiny import build_tiny

    recipe = load_recipe(path)
    # The stage-3/4 recipes of mg and uhd train the adaptive-granularity layer, which those models carry by a setting.
    layer = recipe.method in ("mg", "uhd") and recipe.loss.name in ("avg_multi_granularity", "rglf")
    model, processor = build_tiny(method=recipe.method, seed=0,
                                  method_settings={"adaptive_granularity": {}} if layer else None)
    model.train()
    if prepare_tokenizer(processor.tokenizer, recipe.data.template):
        model.resize_token_embeddings(len(processor.tokenizer))
    data, images = make_dataset(tmp_path, n=2)
    box_file = None
    if recipe.data.box_file:
        box_file = tmp_path / "boxes.json"
        box_file.write_text(json.dumps([{"id": i, "boxes": [[2, 2, 20, 20]], "scores": [0.9], "labels": ["square"]}
                                        for i in range(2)]))
    dataset = LlavaDataset(str(data), processor, template=recipe.data.template, image_folder=str(images),
                           box_file=box_file, image_options=recipe.data.image_options, on_bad_record="error")
    batch = MultiGranCollator.from_tokenizer(processor.tokenizer)([dataset[0], dataset[1]])
    groups = set_trainable(model, recipe.trainable)
    loss, _ = losses_module.get_loss(recipe.loss.name)(model, batch, **recipe.loss.options)
    loss.backward()

    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    under_prefix = {n for n in dict(model.named_parameters())
                    if any(n == k or n.startswith(k + ".") for k in recipe.trainable)}
    assert with_grad <= under_prefix, f"frozen parameters got gradient: {sorted(with_grad - under_prefix)[:5]}"
    assert set(groups) == under_prefix
    assert all(p.requires_grad == (n in under_prefix) for n, p in model.named_parameters())
    reached = {k for k in recipe.trainable if any(n == k or n.startswith(k + ".") for n in with_grad)}
    assert reached == set(recipe.trainable), f"prefixes without gradient: {set(recipe.trainable) - reached}"


# --- parameter groups and optimizer -------------------------------------------------------------------------------


def test_longest_prefix_wins_and_unknown_prefix_is_an_error():
    from multigran.tiny import build_tiny

    model, _ = build_tiny(seed=0)
    groups = parameter_groups(model, {"language_model": 2e-5, "language_model.lm_head": 1e-4, "visual": 1e-3})
    assert groups["language_model.lm_head.weight"] == "language_model.lm_head"
    assert groups["language_model.model.layers.0.mlp.up_proj.weight"] == "language_model"
    assert groups["visual.image_newline"] == "visual"
    assert not any(n.startswith("vision_tower") for n in groups)
    with pytest.raises(ValueError, match=r"\['visual.projektor'\] match no parameter.*visual.projector"):
        parameter_groups(model, {"visual.projektor": 1e-3})
    # "visual.pro" is not a prefix of "visual.projector" at a dot boundary
    with pytest.raises(ValueError, match="match no parameter"):
        parameter_groups(model, {"visual.pro": 1e-3})


def test_canonical_names_under_wrappers():
    assert canonical_name("module.visual.projector.linear_1.weight") == "visual.projector.linear_1.weight"
    assert canonical_name("_fsdp_wrapped_module.language_model._fsdp_wrapped_module.model.norm.weight") == \
        "language_model.model.norm.weight"
    assert canonical_name("base_model.model.visual.modules_to_save.default.projector.linear_1.bias") == \
        "visual.projector.linear_1.bias"
    assert canonical_name("base_model.model.visual.original_module.projector.linear_1.bias") is None
    assert canonical_name("base_model.model.language_model.model.layers.0.self_attn.q_proj.lora_A.default.weight") \
        == "language_model.model.layers.0.self_attn.q_proj.lora_A.default.weight"


def test_optimizer_groups_carry_per_part_learning_rates(workdir):
    root, data, images = workdir
    recipe = load_recipe(REPO / "recipes/anyres/stage2_finetune.yaml", [
        *fast_overrides(root / "init", root / "opt", data, images, weight_decay=0.1),
        "trainable.language_model.lm_head=1.0e-4"])
    trainer = build_trainer(recipe)
    optimizer = trainer.create_optimizer()
    rate = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    wanted = {"visual.": 2e-5, "language_model.lm_head.": 1e-4, "language_model.": 2e-5, "vision_tower.": 2e-6}
    model = trainer.model
    for name, parameter in model.named_parameters():
        expected = next(lr for prefix, lr in wanted.items() if name.startswith(prefix))
        assert rate[id(parameter)] == expected, name
        assert decay[id(parameter)] == (0.0 if ("bias" in name or "norm" in name) else 0.1), name
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))


# --- sampler ------------------------------------------------------------------------------------------------------


def test_modality_length_grouped_sampler():
    lengths = [5, 3, -2, 9, -7, 1, 4, -1, 8, 2, -6, 7, 6, -3, -4, -5, 10, 11, -8, 12]
    batch, world = 2, 2
    sampler = ModalityLengthGroupedSampler(lengths, batch_size=batch, world_size=world, seed=3)
    order = list(sampler)
    assert sorted(order) == list(range(len(lengths)))
    assert list(sampler) == order  # same (seed, epoch) -> same order
    sampler.set_epoch(1)
    assert list(sampler) != order
    megabatch = batch * world
    # every full megabatch but the last holds one modality only
    blocks = [order[i:i + megabatch] for i in range(0, len(order), megabatch)][:-1]
    for block in blocks[:-1]:
        assert len({lengths[i] > 0 for i in block}) == 1, block
    # within a megabatch of one modality, each rank's chunk is sorted longest first by LLaVA's even split
    generator = torch.Generator().manual_seed(3)
    assert modality_length_grouped_indices(lengths, batch, world, generator) == order
    plain = ModalityLengthGroupedSampler(lengths, batch_size=batch, world_size=world, seed=3, group=False)
    assert sorted(plain) == list(range(len(lengths))) and list(plain) == list(plain)
    with pytest.raises(ValueError, match="non-zero"):
        modality_length_grouped_indices([1, 0, -1], 1, 1, generator)


# --- loss hook, gradient accumulation, metrics, progress ----------------------------------------------------------


def test_gradient_accumulation_loss_is_the_token_mean_over_the_accumulated_batch(workdir, tmp_path):
    """With 2 accumulation steps the logged loss is sum(token NLL) / (answer tokens) over both micro-batches
    (Hugging Face's exact accumulation), computed here independently from the initial model."""
    from multigran.data.collator import MultiGranCollator
    from multigran.data.llava import LlavaDataset

    root, _, _ = workdir
    data, images = make_dataset(tmp_path, n=0, text_only=8)  # different answer lengths per micro-batch
    recipe = load_recipe(REPO / "recipes/anyres/stage2_finetune.yaml", [
        *fast_overrides(root / "init", tmp_path / "out", data, images, per_device_train_batch_size=2,
                        gradient_accumulation_steps=2, max_steps=1),
        "data.group_by_modality_length=false"])
    trainer = build_trainer(recipe)
    sampler_order = list(trainer._get_train_sampler())
    model = trainer.model
    collate = MultiGranCollator.from_tokenizer(trainer.processing_class.tokenizer)
    dataset = trainer.train_dataset
    total, count = 0.0, 0
    with torch.no_grad():
        for start in (0, 2):
            batch = collate([dataset[i] for i in sampler_order[start:start + 2]])
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
            targets = batch["labels"][:, 1:]
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets, reduction="none",
                                                    ignore_index=-100)
            total += float(nll.sum())
            count += int((targets != -100).sum())
    trainer.train()
    logged = next(h for h in trainer.state.log_history if "loss" in h)["loss"]
    assert math.isclose(logged, total / count, rel_tol=1e-5)


def test_custom_loss_options_metrics_and_throughput_logged(workdir, tmp_path, monkeypatch, capsys):
    root, data, images = workdir
    seen = []

    def scaled_loss(model, batch, scale=1.0):
        seen.append(scale)
        loss = model(**batch).loss * scale
        return loss, {"half_loss": loss.detach() / 2, "batch_rows": float(batch["input_ids"].shape[0])}

    monkeypatch.setitem(losses_module.LOSSES, "scaled", scaled_loss)
    recipe = load_recipe(REPO / "recipes/anyres/stage1_pretrain.yaml", [
        *fast_overrides(root / "init", tmp_path / "out", data, images, max_steps=3, logging_steps=1,
                        disable_tqdm=False),
        "loss.name=scaled", "loss.options={scale: 2.0}"])
    trainer = build_trainer(recipe)
    trainer.train()
    assert seen and all(scale == 2.0 for scale in seen)
    lines = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    steps = [line for line in lines if "loss" in line]
    assert [line["step"] for line in steps] == [1, 2, 3]
    visual_per_sample = trainer.processing_class.count_image_tokens([Image.new("RGB", (32, 32))])[0]
    for line in steps:
        assert math.isclose(line["half_loss"], line["loss"] / 2, rel_tol=1e-5)
        assert line["batch_rows"] == 8
        # same window, same clock: visual tokens per sample, exactly
        assert math.isclose(line["visual_tokens_per_second"] / line["samples_per_second"], visual_per_sample)
        assert line["lr/visual.projector"] == line["learning_rate"]
    assert "vtok/s" in capsys.readouterr().err  # the progress bar shows throughput


def test_report_to_missing_integration_is_a_clear_error(workdir, tmp_path, monkeypatch):
    import importlib.util

    root, data, images = workdir
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name.startswith("tensorboard")
                        else real(name, *a))
    recipe = load_recipe(REPO / "recipes/anyres/stage1_pretrain.yaml",
                         fast_overrides(root / "init", tmp_path, data, images, report_to="tensorboard"))
    with pytest.raises(ValueError, match="asks for 'tensorboard' but it is not installed"):
        build_trainer(recipe)


def test_precision_and_checkpointing_flags(workdir, tmp_path):
    root, data, images = workdir
    recipe = load_recipe(REPO / "recipes/anyres/stage2_finetune.yaml",
                         fast_overrides(root / "init", tmp_path, data, images, activation_checkpointing=True,
                                        max_steps=1))
    trainer = build_trainer(recipe)
    assert trainer.args.bf16 is (torch.cuda.is_available() and torch.cuda.is_bf16_supported())  # "auto"
    trainer.train()  # the Trainer switches checkpointing on from the recipe flag
    model = trainer.model
    assert model.is_activation_checkpointing

    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])

    def saved_tensors():
        count = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: count.append(1) or t, lambda t: t):
            model(**batch).loss
        return len(count)

    checkpointed = saved_tensors()
    model.activation_checkpointing_disable()
    assert checkpointed < saved_tensors() / 2  # activations inside the layers are recomputed, not kept


# --- LoRA ---------------------------------------------------------------------------------------------------------


def test_lora_train_and_merge_equals_peft_model(workdir, tmp_path):
    from transformers import AutoModelForImageTextToText

    from multigran.train.cli import add_merge_lora_arguments, merge_lora_command

    root, data, images = workdir
    recipe = load_recipe(REPO / "recipes/anyres/stage2_finetune.yaml", [
        *fast_overrides(root / "init", tmp_path / "lora", data, images, max_steps=2),
        "trainable.language_model=null", "trainable.vision_tower=null",
        "lora={r: 4, alpha: 8, dropout: 0.0, learning_rate: 1.0e-2}"])
    from multigran.train.trainer import run_training

    trainer = run_training(recipe)
    peft_model = trainer.model.eval()
    assert type(peft_model).__name__.startswith("Peft")
    trained = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trained and all(".lora_" in n or ".modules_to_save." in n for n in trained)
    assert any(".lora_" in n for n in trained) and any("projector" in n for n in trained)

    parser = argparse.ArgumentParser()
    add_merge_lora_arguments(parser)
    merge_lora_command(parser.parse_args([str(tmp_path / "lora"), str(tmp_path / "merged")]))
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged").eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    with torch.no_grad():
        expected = peft_model(**batch).logits
        base = AutoModelForImageTextToText.from_pretrained(root / "init").eval()(**batch).logits
        torch.testing.assert_close(merged(**batch).logits, expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(base, expected, atol=1e-3)  # the adapters (and projector) did change the model


def test_lora_errors(workdir, tmp_path):
    root, data, images = workdir
    base = fast_overrides(root / "init", tmp_path, data, images)
    with pytest.raises(ValueError, match="trained through its adapters"):
        build_trainer(load_recipe(REPO / "recipes/anyres/stage2_finetune.yaml", [*base, "lora={r: 4}"]))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="QLoRA .* needs a CUDA GPU"):
            build_trainer(load_recipe(REPO / "recipes/anyres/stage1_pretrain.yaml", [*base, "lora={qlora: true}"]))
    with pytest.raises(ValueError, match="no adapter_config.json"):
        from multigran.train.lora import merge_lora

        merge_lora(root / "init", tmp_path / "x")


# --- end to end ---------------------------------------------------------------------------------------------------


def test_anyres_stage1_then_stage2_end_to_end(workdir, tmp_path):
    """Stage 1 (projector, plain) then stage 2 (LLM + visual, vicuna_v1) through `train_command`; the loss falls, the
    saved model reloads with from_pretrained and answers each colour correctly."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from multigran.train.cli import add_train_arguments, train_command

    root, data, images = workdir
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    stage1, stage2 = tmp_path / "stage1", tmp_path / "stage2"
    train_command(parser.parse_args([
        "--recipe", str(REPO / "recipes/anyres/stage1_pretrain.yaml"),
        *fast_overrides(root / "init", stage1, data, images, num_train_epochs=2)]))
    train_command(parser.parse_args([
        "--recipe", str(REPO / "recipes/anyres/stage2_finetune.yaml"), "--output-dir", str(stage2),
        *[o for o in fast_overrides(stage1, stage2, data, images, num_train_epochs=4)
          if not o.startswith("output_dir=")],  # the output dir comes from --output-dir here
        # tiny model, few steps: higher rates than the paper's so that 32 steps visibly learn
        "trainable.visual=1e-3", "trainable.language_model=1e-3", "trainable.vision_tower=null"]))

    for out, steps in ((stage1, 16), (stage2, 32)):
        losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
                  if "loss" in json.loads(line)]
        assert len(losses) == steps
        assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1, losses
    assert (stage2 / "recipe.yaml").is_file() and json.loads((stage2 / "bad_records.json").read_text())["total"] == 0

    model = AutoModelForImageTextToText.from_pretrained(stage2).eval()
    processor = AutoProcessor.from_pretrained(stage2)
    for name, rgb in COLOURS.items():
        prompt = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the square?"}]}],
            add_generation_prompt=True)
        assert prompt.endswith("ASSISTANT:")  # the vicuna_v1 template of stage 2 is saved for inference
        inputs = processor(images=[Image.new("RGB", (32, 32), rgb)], text=prompt)
        output = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        answer = processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        assert answer.strip() == name


def test_recipe_method_settings_lay_over_the_models_for_the_run(tmp_path):
    """`method_settings` in a recipe (e.g. MG-LLaVA's hires_drop_path, the release's stochastic depth of the frozen
    ConvNeXt) reaches the model that trains; a bad value is refused by the method's settings class."""
    from multigran.tiny import build_tiny
    from multigran.train.trainer import load_model_for_training

    build_tiny(tmp_path / "mg", method="mg", seed=0)
    data, images = make_dataset(tmp_path, n=2)
    tree = {"model": str(tmp_path / "mg"), "output_dir": str(tmp_path / "out"), "method": "mg",
            "data": {"path": str(data), "image_folder": str(images)}, "trainable": {"visual": 1e-3},
            "training": {}, "method_settings": {"hires_drop_path": 0.3}}
    model = load_model_for_training(recipe_from_dict(tree, "test"))
    assert model.config.method_settings["hires_drop_path"] == 0.3
    rates = {m.drop_prob for m in model.modules() if type(m).__name__.endswith("DropPath")}
    assert rates and max(rates) == pytest.approx(0.3)
    tree["method_settings"] = {"hires_drop_path": 1.5}
    with pytest.raises(ValueError, match="hires_drop_path"):
        load_model_for_training(recipe_from_dict(tree, "test"))
