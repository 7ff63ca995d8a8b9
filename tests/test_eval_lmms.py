"""The lmms-eval plugin, run by the real lmms-eval package on two local tasks (a generation task and a
multiple-choice one scored by loglikelihood), dataset and task YAML on local disk, no network."""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

UTILS = '''
def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc):
    return doc["question"] + "\\nAnswer the question using a single word or phrase."


def doc_to_target(doc):
    return 0 if doc["answer"] == "yes" else 1
'''

GENERATE_TASK = """
task: multigran_tiny_yesno
dataset_path: {data}
dataset_kwargs:
  load_from_disk: True
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: "answer"
generation_kwargs:
  max_new_tokens: 4
  temperature: 0
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: true
"""

CHOICE_TASK = """
task: multigran_tiny_choice
dataset_path: {data}
dataset_kwargs:
  load_from_disk: True
test_split: test
output_type: multiple_choice
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_choice: ["yes", "no"]
doc_to_target: !function utils.doc_to_target
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def test_lmms_eval_runs_the_multigran_model(tmp_path):
    if importlib.util.find_spec("lmms_eval") is None:
        pytest.fail("lmms-eval is not installed; install it without its torchvision pin: "
                    "pip install --no-deps 'lmms-eval==0.7.3' (its other needs come with multigran's eval/dev extra)")
    import datasets

    from multigran.tiny import build_tiny

    build_tiny(tmp_path / "model", method="avg", seed=0)
    rows = {"question": [f"Is the square {c}?" for c in ("red", "blue", "green")], "answer": ["yes", "no", "yes"],
            "image": [Image.fromarray(np.full((32, 48, 3), 80 * i, dtype=np.uint8)) for i in range(3)]}
    features = datasets.Features({"question": datasets.Value("string"), "answer": datasets.Value("string"),
                                  "image": datasets.Image()})
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(rows, features=features)}).save_to_disk(
        str(tmp_path / "data"))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "utils.py").write_text(UTILS)
    (tasks / "generate.yaml").write_text(GENERATE_TASK.format(data=tmp_path / "data"))
    (tasks / "choice.yaml").write_text(CHOICE_TASK.format(data=tmp_path / "data"))
    visual_log = tmp_path / "visual.jsonl"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    run = subprocess.run(
        [sys.executable, "-m", "lmms_eval", "eval", "--model", "multigran",
         "--model_args", f"pretrained={tmp_path / 'model'},granularity=16,visual_log={visual_log}",
         "--tasks", "multigran_tiny_yesno,multigran_tiny_choice", "--include_path", str(tasks),
         "--batch_size", "1", "--output_path", str(tmp_path / "out"), "--log_samples"],
        env=env, capture_output=True, text=True, timeout=500, cwd=tmp_path)
    assert run.returncode == 0, textwrap.shorten(run.stdout[-3000:] + run.stderr[-3000:], 6000)
    results_file = next((tmp_path / "out").rglob("*_results.json"))
    results = json.loads(results_file.read_text())["results"]

    # generate_until: lmms-eval's exact_match equals ours over the answers it logged
    samples = [json.loads(line) for line in next((tmp_path / "out").rglob("*_samples_multigran_tiny_yesno.jsonl"))
               .read_text().splitlines()]
    answers = {s["doc_id"]: s["filtered_resps"][0] for s in samples}
    expected = sum(answers[i].strip().lower().strip(".!?,") == rows["answer"][i] for i in range(3)) / 3
    assert results["multigran_tiny_yesno"]["exact_match,none"] == pytest.approx(expected)

    # loglikelihood, in lmms-eval's convention (a mean token loss, the lowest wins): acc recomputed from the losses
    choice = [json.loads(line) for line in next((tmp_path / "out").rglob("*_samples_multigran_tiny_choice.jsonl"))
              .read_text().splitlines()]
    correct = []
    for sample in choice:
        losses = [float(pair[0]) for pair in sample["filtered_resps"]]   # (loss, is_greedy) per choice
        assert len(losses) == 2 and all(np.isfinite(losses)) and all(loss > 0 for loss in losses)
        correct.append(int(np.argmin(losses)) == doc_target(rows["answer"][sample["doc_id"]]))
    assert results["multigran_tiny_choice"]["acc,none"] == pytest.approx(sum(correct) / 3)

    # the visual tokens of every request were logged: 3 generations + 3 docs x 2 choices
    logged = [json.loads(line) for line in visual_log.read_text().splitlines()]
    assert len(logged) == 3 + 6
    assert all(entry["images"] == 1 and len(entry["visual_tokens"]) == 1 and entry["visual_tokens"][0] > 0
               and entry["granularity"] == [16] for entry in logged)


def doc_target(answer):
    return 0 if answer == "yes" else 1


class Request:
    def __init__(self, *args):
        self.args = args


def test_plugin_loss_and_answers_match_the_model(tmp_path):
    """The plugin's loglikelihood is the model's own language-model loss over the continuation tokens, and its
    generate_until answer is the model's greedy answer (checked here without lmms-eval's evaluator)."""
    import torch

    from multigran.evaluate.lmms_plugin import MultiGranLMMS
    from multigran.evaluate.runner import build_prompt
    from multigran.tiny import build_tiny

    build_tiny(tmp_path / "model", method="avg", seed=1)
    plugin = MultiGranLMMS(pretrained=str(tmp_path / "model"), granularity=16)
    image = Image.fromarray(np.full((32, 48, 3), 90, dtype=np.uint8))
    plugin.task_dict = {"t": {"test": [{"image": image}]}}
    visual = lambda doc: [doc["image"]]  # noqa: E731
    context = "Is it grey?\nAnswer the question using a single word or phrase."
    [(loss, _)] = [getattr(r, "text", r) for r in plugin.loglikelihood([Request(context, " Yes", visual, 0, "t",
                                                                                  "test")])]
    [answer] = plugin.generate_until([Request(context, {"max_new_tokens": 5, "until": ["\n\n"]}, visual, 0, "t",
                                              "test")])

    processor, model = plugin.processor, plugin.model
    prompt = build_prompt(processor, context, 1)
    n = len(processor.tokenizer(prompt + " Yes")["input_ids"]) - len(processor.tokenizer(prompt)["input_ids"])
    inputs = processor(images=[image], text=prompt + " Yes", granularity=16)
    labels = inputs["input_ids"].clone()
    labels[:, :-n] = -100                                   # only the continuation's tokens are scored
    with torch.no_grad():
        expected = model(**inputs, labels=labels).loss.item()
    assert loss == pytest.approx(expected, rel=1e-5)

    prompt_inputs = processor(images=[image], text=prompt, granularity=16)
    with torch.no_grad():
        output = model.generate(**prompt_inputs, max_new_tokens=5, do_sample=False)
    greedy = processor.batch_decode(output[:, prompt_inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
    assert answer == greedy.split("\n\n")[0].strip()
    assert plugin.visual_reports[-1]["granularity"] == [16]
