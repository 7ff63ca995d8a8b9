"""`multigran eval --task` with a tiny model: granularities side by side, failures counted, a resumed run after
SIGKILL, and a 2-process sharded run (torchrun, gloo) that scores exactly as one process."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from multigran.cli import main

N_QUESTIONS = 12


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """A tiny AVG model and a POPE-format benchmark (two splits, 6 questions each, one image missing)."""
    from multigran.tiny import build_tiny

    root = tmp_path_factory.mktemp("eval_run")
    build_tiny(root / "model", method="avg", seed=0)
    data = root / "pope"
    data.mkdir()
    for i in range(N_QUESTIONS // 2):
        Image.fromarray(np.full((32, 48, 3), 30 * i, dtype=np.uint8)).save(data / f"{i}.png")
    for split in ("random", "popular"):
        with open(data / f"coco_pope_{split}.json", "w") as handle:
            for i in range(N_QUESTIONS // 2):
                image = "missing.png" if (split, i) == ("popular", 5) else f"{i}.png"
                handle.write(json.dumps({"question_id": i, "image": image, "text": f"Is there a dot {i}?",
                                         "label": "yes" if i % 2 else "no"}) + "\n")
    return root


def eval_args(bench, out, *extra):
    return ["eval", "--task", "pope", "--model", str(bench / "model"), "--data", str(bench / "pope"),
            "--out", str(out), "--max-new-tokens", "4", "--latency-samples", "1", "--no-progress", *extra]


def log_lines(folder):
    return [json.loads(line) for path in sorted(folder.glob("rank*.jsonl")) for line in path.read_text().splitlines()]


def test_granularities_side_by_side_with_failures_counted(bench, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(eval_args(bench, out, "--granularity", "4,16,auto", "--batch-size", "4")) == 0
    table = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    names = [s["name"] for s in results["settings"]]
    assert names == ["granularity=4", "granularity=16", "granularity=auto"]
    for name in names:
        assert f"| {name} |" in table
    by_name = {s["name"]: s for s in results["settings"]}
    for setting in results["settings"]:
        assert setting["samples"] == N_QUESTIONS
        assert setting["failures"]["errors"] == 1 and "missing.png" in setting["failures"]["first_errors"][0]
        records = log_lines(out / "predictions" / setting["name"])
        answered = [r for r in records if "error" not in r]
        tokens = [t for r in answered for t in r["visual_tokens"]]
        assert setting["efficiency"]["mean_visual_tokens_per_image"] == pytest.approx(sum(tokens) / len(tokens))
        assert setting["efficiency"]["prefill_seconds"] > 0 and setting["efficiency"]["tokens_per_second"] > 0
        # the score is POPE's, recomputed here from the logged answers (LLaVA's rule: "no" if No/not/no)
        texts = {r["question_id"]: r["text"] for r in answered}
        for split in ("random", "popular"):
            ids = [f"{split}/{i}" for i in range(N_QUESTIONS // 2)]
            predicted = ["no" if {"No", "not", "no"} & set(texts.get(q, "").split(".")[0].replace(",", "").split(" "))
                         else "yes" for q in ids]
            labels = ["yes" if i % 2 else "no" for i in range(N_QUESTIONS // 2)]
            accuracy = 100 * sum(p == t for p, t in zip(predicted, labels)) / len(labels)
            assert setting["by_category"][split]["accuracy"] == pytest.approx(accuracy)
    # fixed levels: every image at that level; more tokens per image at the finer level
    assert by_name["granularity=4"]["efficiency"]["granularity_distribution"] == {"4": N_QUESTIONS - 1}
    assert by_name["granularity=16"]["efficiency"]["granularity_distribution"] == {"16": N_QUESTIONS - 1}
    assert (by_name["granularity=16"]["efficiency"]["mean_visual_tokens_per_image"]
            > by_name["granularity=4"]["efficiency"]["mean_visual_tokens_per_image"])
    assert sum(by_name["granularity=auto"]["efficiency"]["granularity_distribution"].values()) == N_QUESTIONS - 1
    assert "Is there a dot 0?\nAnswer the question using a single word or phrase." in results["example_prompt"]
    assert results["generation"]["max_new_tokens"] == 4 and results["generation"]["do_sample"] is False

    # a second run over the same folder answers nothing again and scores the same
    before = {n: len(log_lines(out / "predictions" / n)) for n in names}
    assert main(eval_args(bench, out, "--granularity", "4,16,auto", "--batch-size", "4")) == 0
    again = json.loads((out / "results.json").read_text())
    assert {n: len(log_lines(out / "predictions" / n)) for n in names} == {n: before[n] + 1 for n in names}  # the
    # missing image is retried (and fails again); nothing else is answered twice
    assert [s["score"] for s in again["settings"]] == [s["score"] for s in results["settings"]]
    assert not list(out.glob(".*.tmp"))

    # another benchmark into the same folder is refused
    assert main(eval_args(bench, out, "--limit", "3")) == 2
    assert "holds another run" in capsys.readouterr().err


SHARD_ARGS = ("--granularity", "16", "--batch-size", "1", "--max-new-tokens", "12")


@pytest.fixture(scope="module")
def reference(bench):
    """One uninterrupted single-process run: (its setting's result, its answers)."""
    out = bench / "reference"
    assert main(eval_args(bench, out, *SHARD_ARGS)) == 0
    result = json.loads((out / "results.json").read_text())["settings"][0]
    return result, {r["question_id"]: r["text"] for r in log_lines(out / "predictions" / "granularity=16")}


def test_sigkill_then_resume_loses_nothing_and_answers_nothing_twice(bench, reference, tmp_path):
    out = tmp_path / "out"
    log = out / "predictions" / "granularity=16" / "rank0.jsonl"
    process = subprocess.Popen([sys.executable, "-m", "multigran.cli", *eval_args(bench, out, *SHARD_ARGS)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and process.poll() is None:
            if log.exists() and log.read_bytes().count(b"\n") >= 2:
                break
            time.sleep(0.002)
        assert process.poll() is None, "the run ended before it could be killed"
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    killed = [json.loads(line) for line in log.read_bytes().split(b"\n")[:-1]]  # complete lines at the kill
    assert 2 <= len(killed) < N_QUESTIONS
    assert not (out / "results.json").exists()

    assert main(eval_args(bench, out, *SHARD_ARGS)) == 0
    records = log_lines(out / "predictions" / "granularity=16")
    ids = [r["question_id"] for r in records]
    assert len(ids) == len(set(ids)) == N_QUESTIONS       # each question once: nothing lost, nothing twice
    assert records[: len(killed)] == killed                 # the answers before the kill are kept as they were
    resumed = json.loads((out / "results.json").read_text())["settings"][0]
    fresh, texts = reference
    assert resumed["metrics"] == fresh["metrics"] and resumed["by_category"] == fresh["by_category"]
    assert {r["question_id"]: r["text"] for r in records} == texts


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_process_sharded_run_scores_as_one_process(bench, reference, tmp_path):
    sharded = tmp_path / "sharded"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), "-m", "multigran.cli", *eval_args(bench, sharded, *SHARD_ARGS)]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stderr[-3000:]
    folder = sharded / "predictions" / "granularity=16"
    rank0 = [json.loads(line)["question_id"] for line in (folder / "rank0.jsonl").read_text().splitlines()]
    rank1 = [json.loads(line)["question_id"] for line in (folder / "rank1.jsonl").read_text().splitlines()]
    assert rank0 and rank1 and not set(rank0) & set(rank1) and len(rank0) + len(rank1) == N_QUESTIONS
    one, texts = reference
    results = json.loads((sharded / "results.json").read_text())
    two = results["settings"][0]
    assert two["metrics"] == one["metrics"] and two["by_category"] == one["by_category"]
    assert two["failures"] == one["failures"]
    assert two["efficiency"]["mean_visual_tokens_per_image"] == one["efficiency"]["mean_visual_tokens_per_image"]
    assert {r["question_id"]: r["text"] for r in log_lines(folder)} == texts
    assert results["generation"]["processes"] == 2
