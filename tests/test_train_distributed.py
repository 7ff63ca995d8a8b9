"""Distributed training on 2 CPU processes (gloo) through the Hugging Face Trainer, with the shipped recipes:

- DDP (`torchrun --nproc_per_node 2`): anyres stage 2, AVG-LLaVA stage 3 (every granularity) and stage 4 (RGLF),
  MG-LLaVA stage 2 and LLaVA-UHD v2 stage 2, one after the other in the same two processes. Both ranks end with
  identical weights, equal (float tolerance) to one process training on the same global batch, and each rank read its
  own half of the data.
- FSDP (`accelerate launch` with the shipped `recipes/fsdp/fsdp2.yaml`): accelerate engages FSDP on GPUs only, so on
  2 CPU processes the run must stop with a clear error rather than train plain DDP under an FSDP config.

Tiny models, 2 optimizer steps of global batch 4 (2 per rank), plain SGD so that equal gradients give equal weights,
dropout off (its random draws are the one thing that differs between 1 and 2 processes).
Every sample has the same length, so the mean loss over the global batch equals the mean of the ranks' means.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "src/multigran/recipes"

# Runs in each rank: trains every recipe given (one JSON list of override lists), saves each rank's weights and the
# sample indices it read.
SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch
    torch.set_num_threads(1)
    from safetensors.torch import save_file
    import multigran.data.llava as llava
    import multigran.train.trainer as trainer_module
    from multigran.train.recipe import load_recipe

    rank = int(os.environ.get("RANK", 0))
    read = []
    original_getitem = llava.LlavaDataset.__getitem__
    def recording_getitem(self, index):
        read.append(int(index))
        return original_getitem(self, index)
    llava.LlavaDataset.__getitem__ = recording_getitem

    for recipe_path, overrides in json.loads(sys.argv[1]):
        read.clear()
        recipe = load_recipe(recipe_path, overrides)
        # No dropout (AVG's router layer, UHD's JBU fix-up): its draws differ between 1 and 2 processes.
        model = trainer_module.load_model_for_training(recipe)
        for module in model.modules():
            if isinstance(module, torch.nn.modules.dropout._DropoutNd):
                module.p = 0.0
            elif isinstance(module, torch.nn.MultiheadAttention):
                module.dropout = 0.0
        trainer = trainer_module.run_training(recipe, model=model)
        world = int(os.environ.get("WORLD_SIZE", 1))
        assert trainer.args.world_size == world
        if world > 1:
            assert torch.distributed.get_backend() == "gloo"
            wrapper = type(trainer.model_wrapped).__name__
            if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
                assert trainer.is_fsdp_enabled, wrapper
                state = trainer.accelerator.get_state_dict(trainer.model)
            else:
                assert wrapper == "DistributedDataParallel", wrapper
                state = trainer_module.unwrap(trainer.model).state_dict()
        else:
            state = trainer.model.state_dict()
        if state is not None:
            weights = {k: v.detach().cpu().contiguous() for k, v in state.items()}
            save_file(weights, os.path.join(recipe.output_dir, f"rank{rank}.safetensors"))
        with open(os.path.join(recipe.output_dir, f"read{rank}.json"), "w") as handle:
            json.dump(read, handle)
""")

COMMON = [
    "data.max_length=1024", "data.template=vicuna_v1", "training.per_device_train_batch_size=2",
    "training.gradient_accumulation_steps=1", "training.max_steps=2", "training.save_strategy=no",
    "training.dataloader_num_workers=0", "training.activation_checkpointing=false", "training.disable_tqdm=true",
    "training.use_cpu=true", "training.optim=sgd", "training.lr_scheduler_type=constant", "training.warmup_steps=0",
    "training.bf16=false", "training.max_grad_norm=0",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_data(root: Path):
    """8 image samples of one size and one answer length (4 per optimizer step) + their MG box file."""
    (root / "images").mkdir()
    records, boxes = [], []
    for i in range(8):
        colour = [(255, 0, 0), (0, 0, 255), (0, 160, 0), (200, 200, 0)][i % 4]
        Image.new("RGB", (48, 32), colour).save(root / "images" / f"{i}.png")
        records.append({"id": i, "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": "It is red."}]})
        boxes.append({"id": i, "boxes": [[2, 2, 30, 20]], "scores": [0.9], "labels": ["square"]})
    (root / "data.json").write_text(json.dumps(records))
    (root / "boxes.json").write_text(json.dumps(boxes))


def recipes(root: Path, tag: str, methods):
    from multigran.tiny import build_tiny

    runs = []
    plans = {
        "anyres": ("anyres/stage2_finetune.yaml", ["trainable.vision_tower=null", "trainable.visual=1e-2",
                                                   "trainable.language_model=1e-2"]),
        "avg_stage3": ("avg/stage3_multigranularity.yaml", ["trainable.visual.projector=1e-2",
                                                             "trainable.visual.image_newline=1e-2",
                                                             "trainable.language_model=1e-2"]),
        "avg_stage4": ("avg/stage4_rglf.yaml", ["trainable.visual.router=1e-1"]),
        "mg": ("mg/stage2_finetune.yaml", [f"data.box_file={root / 'boxes.json'}"]),
        "uhd": ("uhd/stage2_finetune.yaml", ["data.image_options={max_slices: 2}"]),
    }
    for name in methods:
        method = name.split("_")[0]
        model_dir = root / f"init_{method}"
        if not model_dir.exists():
            build_tiny(model_dir, method=method, seed=0)
        recipe, extra = plans[name]
        runs.append([str(RECIPES / recipe), [f"model={model_dir}", f"output_dir={root / tag / name}",
                                             f"data.path={root / 'data.json'}",
                                             f"data.image_folder={root / 'images'}", *COMMON, *extra]])
    return runs


def run(command, env_extra=None):
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           **(env_extra or {})}
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stderr[-5000:]


def single_process(root: Path, script: Path, methods):
    runs = recipes(root, "single", methods)
    for _, overrides in runs:
        overrides.append("training.per_device_train_batch_size=4")  # the same global batch in one process
    run([sys.executable, str(script), json.dumps(runs)])


def check_run(root: Path, name: str, tag: str):
    out = root / tag / name
    rank0, rank1 = load_file(out / "rank0.safetensors"), load_file(out / "rank1.safetensors")
    single = load_file(root / "single" / name / "rank0.safetensors")
    initial = load_file(root / f"init_{name.split('_')[0]}" / "model.safetensors")
    assert rank0.keys() == rank1.keys() == single.keys(), name
    changed = []
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), (name, key)
        torch.testing.assert_close(rank0[key], single[key], atol=1e-5, rtol=1e-4, msg=f"{name}: {key}")
        if key in initial and not torch.equal(rank0[key], initial[key]):
            changed.append(key)
    assert changed, f"{name}: training changed no weight"
    read0, read1 = (json.loads((out / f"read{r}.json").read_text()) for r in (0, 1))
    assert len(read0) == len(read1) == 4 and sorted(read0 + read1) == list(range(8))  # each rank its own half
    return changed


def test_ddp_every_method_two_processes(tmp_path):
    write_data(tmp_path)
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    methods = ["anyres", "avg_stage3", "avg_stage4", "mg", "uhd"]
    runs = recipes(tmp_path, "ddp", methods)
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()), str(script), json.dumps(runs)])
    single_process(tmp_path, script, methods)
    changed = {name: check_run(tmp_path, name, "ddp") for name in methods}
    assert all(k.startswith("visual.router") for k in changed["avg_stage4"])  # RGLF trains the router only
    assert any(k.startswith("visual.fuse_module") for k in changed["mg"])
    assert any(k.startswith("visual.mm_projector") for k in changed["uhd"])
    assert not any(k.startswith("vision_tower") for k in changed["anyres"])  # frozen here


def test_shipped_fsdp_config_on_cpu_processes_refuses_to_run_as_ddp(tmp_path):
    """accelerate engages FSDP on multi-GPU runs only: launched on 2 CPU processes with the shipped FSDP config, the
    Trainer would silently train plain DDP. The run stops with one clear error instead."""
    write_data(tmp_path)
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    config = (RECIPES / "fsdp/fsdp2.yaml").read_text()
    config = config.replace("num_processes: 8", "num_processes: 2").replace("use_cpu: false", "use_cpu: true")
    config = config.replace("mixed_precision: bf16", "mixed_precision: 'no'")
    (tmp_path / "fsdp.yaml").write_text(config)
    runs = recipes(tmp_path, "fsdp", ["anyres"])
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(tmp_path / "fsdp.yaml"),
         "--main_process_port", str(free_port()), str(script), json.dumps(runs)],
        capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode != 0
    assert "the accelerate config asks for FSDP but accelerate runs it on GPUs only" in result.stderr
    assert not (tmp_path / "fsdp" / "anyres" / "rank0.safetensors").exists()
