"""FSDP2 training on 2 CPU processes (gloo), sharded exactly as the shipped `recipes/fsdp/fsdp2.yaml` asks.

accelerate engages FSDP only for multi-GPU runs, so `accelerate launch` with the FSDP config cannot train FSDP on CPU
through the Trainer (it stops with a clear error: test_train_distributed.py). PyTorch's FSDP2 itself runs on CPU, so
here `accelerate launch` with the shipped config (2 CPU processes, fp32) starts a loop that:
- builds accelerate's FSDP plugin from the environment launch set from that config, and shards the model with
  accelerate's own FSDP2 preparation (`multigran.train.fsdp.shard_fsdp2`): every CLIPEncoderLayer and
  LlamaDecoderLayer, the input embeddings and the output head in their own units, the rest in the root unit;
- takes data, loss and optimizer from the Trainer that `build_trainer` makes for anyres stage 2 (its per-rank
  dataloader, `compute_loss` with the token count of the global batch, per-part optimizer groups), and runs the
  Trainer's step (forward, backward, optimizer step) on the sharded model.
Both ranks' gathered weights must be identical, and equal (float tolerance) to the Trainer's own single-process run
(`run_training`) on the same global batch. Answers have different lengths, so only a loss normalised by the global
token count (not the mean of the ranks' means) gives equal weights.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train_distributed import RECIPES, SCRIPT, free_port, recipes, run  # noqa: E402  (one data and run setup)

# Runs in each rank under `accelerate launch`: argv[1] is one [recipe, overrides] pair.
FSDP_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch
    torch.set_num_threads(1)
    from accelerate.utils import FullyShardedDataParallelPlugin
    from safetensors.torch import save_file
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor
    import multigran.data.llava as llava
    import multigran.train.trainer as trainer_module
    from multigran.train.fsdp import fsdp2_wrapped_classes, full_state_dict, shard_fsdp2
    from multigran.train.recipe import load_recipe

    read = []
    original_getitem = llava.LlavaDataset.__getitem__
    def recording_getitem(self, index):
        read.append(int(index))
        return original_getitem(self, index)
    llava.LlavaDataset.__getitem__ = recording_getitem

    recipe_path, overrides = json.loads(sys.argv[1])
    # The plugin accelerate builds from the launch config (FSDP_* variables), before the Trainer sees the environment:
    # the Trainer here only supplies data, loss and optimizer, and would (rightly) refuse an FSDP config it cannot
    # engage on CPU.
    plugin = FullyShardedDataParallelPlugin()
    assert os.environ.pop("ACCELERATE_USE_FSDP") == "true"
    recipe = load_recipe(recipe_path, overrides)
    model = trainer_module.load_model_for_training(recipe)
    for module in model.modules():  # no dropout: its draws differ between 1 and 2 processes
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            module.p = 0.0
    trainer = trainer_module.build_trainer(recipe, model=model)
    rank, world = trainer.args.process_index, trainer.args.world_size
    assert world == 2 and torch.distributed.get_backend() == "gloo"

    wrapped_classes = fsdp2_wrapped_classes(model, plugin)
    layers = {name: type(module).__name__ for name, module in model.named_modules()
              if type(module).__name__ in wrapped_classes}
    model = shard_fsdp2(model, plugin)
    units = sorted(name for name, module in model.named_modules() if isinstance(module, FSDPModule))
    local = {name: [p.to_local().numel(), p.numel()] for name, p in model.named_parameters()
             if isinstance(p, DTensor)}
    optimizer = trainer.create_optimizer(model=model)  # per-part groups over the sharded parameters

    # The Trainer's training step (transformers Trainer.training_step, gradient accumulation 1, no clipping).
    model.train()
    batches = iter(trainer.get_train_dataloader())
    losses = []
    for _ in range(trainer.args.max_steps):
        samples, num_items_in_batch = trainer.get_batch_samples(batches, 1, trainer.args.device)
        inputs = trainer._prepare_inputs(samples[0])
        loss = trainer.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())

    state = full_state_dict(model)
    save_file(state, os.path.join(recipe.output_dir, f"rank{rank}.safetensors"))
    with open(os.path.join(recipe.output_dir, f"fsdp{rank}.json"), "w") as handle:
        json.dump({"read": read, "units": units, "local": local, "wrapped_classes": wrapped_classes, "layers": layers,
                   "losses": losses, "num_parameters": len(list(model.parameters()))}, handle)
""")


def write_data(root: Path):
    """8 image samples of one size, answers of different lengths (4 per optimizer step)."""
    (root / "images").mkdir()
    answers = ["It is red.", "Blue.", "It is a green square on a white page, I think.", "Yellow, mostly."]
    records = []
    for i in range(8):
        colour = [(255, 0, 0), (0, 0, 255), (0, 160, 0), (200, 200, 0)][i % 4]
        Image.new("RGB", (48, 32), colour).save(root / "images" / f"{i}.png")
        records.append({"id": i, "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": answers[i % 4]}]})
    (root / "data.json").write_text(json.dumps(records))


def test_fsdp2_anyres_stage2_two_cpu_processes_equals_one_process(tmp_path):
    write_data(tmp_path)
    (tmp_path / "train.py").write_text(SCRIPT)
    (tmp_path / "train_fsdp.py").write_text(FSDP_SCRIPT)
    # The shipped config, for 2 CPU processes in full precision (bf16 would not compare with the fp32 reference).
    config = (RECIPES / "fsdp/fsdp2.yaml").read_text()
    for old, new in [("num_processes: 8", "num_processes: 2"), ("use_cpu: false", "use_cpu: true"),
                     ("mixed_precision: bf16", "mixed_precision: 'no'")]:
        assert old in config, old
        config = config.replace(old, new)
    (tmp_path / "fsdp.yaml").write_text(config)

    (fsdp_run,) = recipes(tmp_path, "fsdp", ["anyres"])
    run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(tmp_path / "fsdp.yaml"),
         "--main_process_port", str(free_port()), str(tmp_path / "train_fsdp.py"), json.dumps(fsdp_run)])
    (single_run,) = recipes(tmp_path, "single", ["anyres"])
    single_run[1].append("training.per_device_train_batch_size=4")  # the same global batch in one process
    run([sys.executable, str(tmp_path / "train.py"), json.dumps([single_run])])

    out = tmp_path / "fsdp" / "anyres"
    info = [json.loads((out / f"fsdp{r}.json").read_text()) for r in (0, 1)]
    # Sharded as the config says: each named layer class and the embedding / head in units of their own.
    assert info[0]["wrapped_classes"] == ["LlamaDecoderLayer", "CLIPEncoderLayer"]
    units = info[0]["units"]
    assert "" in units and "language_model.model.embed_tokens" in units and "language_model.lm_head" in units
    layers = info[0]["layers"]
    assert sorted(set(layers.values())) == ["CLIPEncoderLayer", "LlamaDecoderLayer"]
    assert set(layers) <= set(units), sorted(set(layers) - set(units))
    # Every parameter is a DTensor split between the ranks: each holds its own part, together the whole.
    assert len(info[0]["local"]) == info[0]["num_parameters"]
    for name, (local0, full) in info[0]["local"].items():
        local1, _ = info[1]["local"][name]
        assert local0 + local1 == full and (full < 2 or local0 < full), name
    # Each rank's loss is its part's token-loss sum over the global token count, x 2 (gradients are averaged over the
    # ranks): their mean is the loss of the global batch, as the single process logged it step by step.
    logged = [json.loads(line) for line in (tmp_path / "single/anyres/metrics.jsonl").read_text().splitlines()]
    single_losses = [entry["loss"] for entry in logged if "loss" in entry]
    mean_losses = [(a + b) / 2 for a, b in zip(info[0]["losses"], info[1]["losses"])]
    torch.testing.assert_close(mean_losses, single_losses, atol=1e-5, rtol=1e-5)

    rank0, rank1 = load_file(out / "rank0.safetensors"), load_file(out / "rank1.safetensors")
    single = load_file(tmp_path / "single" / "anyres" / "rank0.safetensors")
    initial = load_file(tmp_path / "init_anyres" / "model.safetensors")
    assert rank0.keys() == rank1.keys() == single.keys()
    changed = []
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
        torch.testing.assert_close(rank0[key], single[key], atol=1e-5, rtol=1e-4, msg=f"anyres fsdp: {key}")
        if key in initial and not torch.equal(rank0[key], initial[key]):
            changed.append(key)
    assert any(k.startswith("language_model.model.layers.") for k in changed)
    assert any(k.startswith("visual.") for k in changed)
    assert not any(k.startswith("vision_tower") for k in changed)  # frozen in this recipe
    read0, read1 = info[0]["read"], info[1]["read"]
    assert len(read0) == len(read1) == 4 and sorted(read0 + read1) == list(range(8))  # each rank its own half


def test_every_method_wraps_its_vision_and_language_layers(tmp_path):
    """Without fsdp_transformer_layer_cls_to_wrap, accelerate wraps the model's `_no_split_modules`: transformers
    gathers them from the vision tower and the LLM, so every method's layers get FSDP units of their own. A class the
    config names but the model lacks is a clear error before any sharding."""
    import pytest
    from accelerate.utils import FullyShardedDataParallelPlugin
    from transformers import AutoModelForImageTextToText

    from multigran.tiny import build_tiny
    from multigran.train.fsdp import fsdp2_wrapped_classes, shard_fsdp2

    by_no_split = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap")
    assert by_no_split.transformer_cls_names_to_wrap is None
    for method in ["anyres", "avg", "mg", "uhd"]:
        build_tiny(tmp_path / method, method=method, seed=0)
        model = AutoModelForImageTextToText.from_pretrained(tmp_path / method)
        wrapped = fsdp2_wrapped_classes(model, by_no_split)
        assert {"CLIPEncoderLayer", "LlamaDecoderLayer"} <= set(wrapped), (method, wrapped)
        present = {type(m).__name__ for m in model.modules()}
        assert set(wrapped) <= present, method

    misnamed = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                              transformer_cls_names_to_wrap=["Qwen2DecoderLayer", "CLIPEncoderLayer"])
    with pytest.raises(ValueError, match=r"names \['Qwen2DecoderLayer'\], not in this model"):
        fsdp2_wrapped_classes(model, misnamed)
    with pytest.raises(ValueError, match="needs an initialised process group"):
        shard_fsdp2(model, by_no_split)
