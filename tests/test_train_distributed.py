"""DDP through the Hugging Face Trainer: `torchrun --nproc_per_node 2` on CPU (gloo) trains a tiny anyres model; both
ranks end with identical weights that differ from the initial ones, and each rank read its own half of the data."""

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

SCRIPT = textwrap.dedent("""
    import argparse, json, os, sys
    import torch
    torch.set_num_threads(1)
    from safetensors.torch import save_file
    import multigran.data.llava as llava
    import multigran.train.trainer as trainer_module
    from multigran.train.cli import add_train_arguments, train_command

    rank = int(os.environ["RANK"])
    read = []
    original_getitem = llava.LlavaDataset.__getitem__
    def recording_getitem(self, index):
        read.append(int(index))
        return original_getitem(self, index)
    llava.LlavaDataset.__getitem__ = recording_getitem

    original_save = trainer_module.save_final
    def save_final_and_rank_weights(trainer, recipe):
        original_save(trainer, recipe)
        assert trainer.args.world_size == 2 and trainer.args.parallel_mode.value == "distributed"
        assert type(trainer.model_wrapped).__name__ == "DistributedDataParallel"
        assert torch.distributed.get_backend() == "gloo"
        weights = {k: v.detach().contiguous() for k, v in trainer_module.unwrap(trainer.model).state_dict().items()}
        save_file(weights, os.path.join(recipe.output_dir, f"rank{rank}.safetensors"))
        with open(os.path.join(recipe.output_dir, f"read{rank}.json"), "w") as handle:
            json.dump(read, handle)
    trainer_module.save_final = save_final_and_rank_weights

    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    train_command(parser.parse_args(sys.argv[1:]))
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_cpu_processes_end_with_identical_weights(tmp_path):
    from multigran.tiny import build_tiny

    build_tiny(tmp_path / "init", method="anyres", seed=0)
    (tmp_path / "images").mkdir()
    records = []
    for i in range(16):
        Image.new("RGB", (32, 32), [(255, 0, 0), (0, 0, 255)][i % 2]).save(tmp_path / "images" / f"{i}.png")
        records.append({"id": i, "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": ["red", "blue"][i % 2]}]})
    for i in range(4):
        records.append({"id": f"t{i}", "conversations": [{"from": "human", "value": "Hi" + "!" * i},
                                                         {"from": "gpt", "value": "Hello."}]})
    (tmp_path / "data.json").write_text(json.dumps(records))
    script = tmp_path / "ddp_train.py"
    script.write_text(SCRIPT)
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()), str(script),
        "--recipe", str(REPO / "recipes/anyres/stage2_finetune.yaml"),
        f"model={tmp_path / 'init'}", f"output_dir={out}", f"data.path={tmp_path / 'data.json'}",
        f"data.image_folder={tmp_path / 'images'}", "data.max_length=512", "trainable.vision_tower=null",
        "trainable.visual=1e-3", "trainable.language_model=1e-3",
        # 20 samples / (2 ranks x batch 2 x accumulation 1) = 5 optimizer steps
        "training.per_device_train_batch_size=2", "training.gradient_accumulation_steps=1",
        "training.num_train_epochs=1", "training.save_strategy=no", "training.dataloader_num_workers=0",
        "training.activation_checkpointing=false", "training.disable_tqdm=true", "training.use_cpu=true",
    ]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, capture_output=True, text=True, timeout=180, env=env)
    assert result.returncode == 0, result.stderr[-4000:]

    rank0, rank1 = load_file(out / "rank0.safetensors"), load_file(out / "rank1.safetensors")
    initial = load_file(tmp_path / "init" / "model.safetensors")
    assert rank0.keys() == rank1.keys()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    changed = [name for name in rank0 if not torch.equal(rank0[name], initial[name])]
    assert any(n.startswith("visual.projector") for n in changed) and any(n.startswith("language_model") for n in changed)
    assert not any(n.startswith("vision_tower") for n in changed)  # frozen in this recipe

    read0 = json.loads((out / "read0.json").read_text())
    read1 = json.loads((out / "read1.json").read_text())
    assert len(read0) == len(read1) == 10
    assert sorted(read0 + read1) == list(range(20))  # the ranks split the epoch, no sample twice

    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if "loss" in s]
    assert [s["step"] for s in steps] == [1, 2, 3, 4, 5]  # rank 0 logs once per optimizer step
