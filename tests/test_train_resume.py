"""Resume after a hard kill: SIGKILL a training process mid-epoch after a checkpoint, resume with `--resume`, and the
loss curve after the checkpoint equals an uninterrupted run's (same data order, optimizer and scheduler state)."""

import argparse
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes/anyres/stage2_finetune.yaml"


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread; two threads on shared, busy cores spend their time waiting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_data(root: Path):
    (root / "images").mkdir(parents=True)
    colours = [(255, 0, 0), (0, 0, 255), (0, 255, 0)]
    records = []
    for i in range(18):
        Image.new("RGB", (32 + 32 * (i % 2), 32), colours[i % 3]).save(root / "images" / f"{i}.png")
        records.append({"id": i, "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": ["red", "blue", "green"][i % 3]}]})
    for i in range(6):
        records.append({"id": f"t{i}", "conversations": [
            {"from": "human", "value": "Count" + " one" * i}, {"from": "gpt", "value": str(i)}]})
    (root / "data.json").write_text(json.dumps(records))


def overrides(root: Path, out: Path):
    # 24 samples, batch 2 x accumulation 2 -> 6 optimizer steps per epoch, 2 epochs; a checkpoint every 4 steps.
    return [f"model={root / 'init'}", f"output_dir={out}", f"data.path={root / 'data.json'}",
            f"data.image_folder={root / 'images'}", "data.max_length=512", "trainable.vision_tower=null",
            "trainable.visual=1e-3", "trainable.language_model=1e-3", "training.per_device_train_batch_size=2",
            "training.gradient_accumulation_steps=2", "training.num_train_epochs=2", "training.save_steps=4",
            "training.dataloader_num_workers=0", "training.activation_checkpointing=false",
            "training.disable_tqdm=true", "training.warmup_steps=2"]


SCRIPT = textwrap.dedent("""
    import argparse, sys, time
    import torch
    torch.set_num_threads({threads})
    import multigran.train.trainer as trainer_module
    from multigran.train.cli import add_train_arguments, train_command

    def slow_after_checkpoint(self, args, state, control, **kwargs):
        if state.global_step >= 4:
            time.sleep(0.5)  # leave time to be killed while computing the steps after checkpoint-4

    trainer_module.TrainingProgressCallback.on_step_begin = slow_after_checkpoint
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    train_command(parser.parse_args(sys.argv[1:]))
""")


def train_in_process(argv):
    from multigran.train.cli import add_train_arguments, train_command

    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    train_command(parser.parse_args(argv))


def logged(out: Path) -> dict:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {line["step"]: line for line in lines if "loss" in line}


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    from multigran.tiny import build_tiny

    build_tiny(tmp_path / "init", method="anyres", seed=0)
    make_data(tmp_path)
    killed_dir, full_dir = tmp_path / "killed", tmp_path / "full"

    script = tmp_path / "train.py"
    script.write_text(SCRIPT.format(threads=torch.get_num_threads()))
    process = subprocess.Popen(
        [sys.executable, str(script), "--recipe", str(RECIPE), *overrides(tmp_path, killed_dir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )
    checkpoint_state = killed_dir / "checkpoint-4" / "trainer_state.json"
    deadline = time.time() + 120
    try:
        while time.time() < deadline:
            if checkpoint_state.is_file() and 5 in logged(killed_dir):  # past the checkpoint, mid-epoch
                break
            if process.poll() is not None:
                raise AssertionError(f"training ended before it could be killed: {process.stderr.read()[-2000:]}")
            time.sleep(0.05)
        else:
            raise AssertionError("no checkpoint-4 within 120 s")
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    assert not (killed_dir / "model.safetensors").exists()  # it really died before the end
    killed_steps = max(logged(killed_dir))
    assert 5 <= killed_steps < 12

    train_in_process(["--recipe", str(RECIPE), "--resume", *overrides(tmp_path, killed_dir)])
    train_in_process(["--recipe", str(RECIPE), *overrides(tmp_path, full_dir)])

    resumed, full = logged(killed_dir), logged(full_dir)
    assert sorted(full) == list(range(1, 13)) and sorted(resumed) == list(range(1, 13))  # re-logged steps replaced
    for step in range(5, 13):  # every step after the checkpoint, across the epoch boundary (step 6)
        for key in ("loss", "grad_norm", "learning_rate"):
            assert abs(resumed[step][key] - full[step][key]) <= 1e-6, (step, key, resumed[step][key], full[step][key])
    final_resumed = load_file(killed_dir / "model.safetensors")
    final_full = load_file(full_dir / "model.safetensors")
    for name, tensor in final_full.items():
        torch.testing.assert_close(final_resumed[name], tensor, atol=1e-6, rtol=0)
    initial = load_file(tmp_path / "init" / "model.safetensors")
    assert not torch.equal(initial["visual.projector.linear_1.weight"], final_full["visual.projector.linear_1.weight"])
