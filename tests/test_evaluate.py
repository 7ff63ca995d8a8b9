"""The evaluation runner: exact-match scoring by hand-made predictions, and an end-to-end `multigran eval` run."""

import json

import numpy as np
import pytest
from PIL import Image

from multigran.cli import main
from multigran.evaluate.runner import exact_match, load_question_file, question_and_answer, summarize


def test_exact_match_normalises_case_punctuation_and_spaces():
    assert exact_match(" Red. ", "red")
    assert exact_match("LEFT", "left")
    assert not exact_match("red dot", "red")
    assert not exact_match("", "red")


def test_summary_by_hand():
    predictions = [
        {"question_type": "coarse", "correct": True, "visual_tokens": 10, "granularity": 9},
        {"question_type": "coarse", "correct": False, "visual_tokens": 30, "granularity": 9},
        {"question_type": "fine", "correct": True, "visual_tokens": 50, "granularity": 144},
    ]
    summary = summarize(predictions, prefill_seconds=0.5)
    assert summary["accuracy"] == pytest.approx(200 / 3)
    assert summary["accuracy_by_type"] == {"coarse": 50.0, "fine": 100.0}
    assert summary["mean_visual_tokens"] == 30
    assert summary["granularity_by_type"] == {"coarse": {"9": 2}, "fine": {"144": 1}}


def test_bad_question_file_names_the_place(tmp_path):
    path = tmp_path / "q.json"
    path.write_text('[{"id": 1}\n, oops]')
    with pytest.raises(ValueError, match=r"q.json: not valid JSON \(line 2"):
        load_question_file(path)
    deep = tmp_path / "deep.jsonl"
    deep.write_text('{"a": ' * 50000 + "1" + "}" * 50000 + "\n")
    with pytest.raises(ValueError, match=r"deep.jsonl: line 1: JSON nested more than"):
        load_question_file(deep)


def test_list_answers_and_llava_question_files():
    # a list of reference answers (this crashed with AttributeError before): right if any matches
    record = {"id": 1, "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                         {"from": "gpt", "value": ["Red", "crimson"]}]}
    question, answers = question_and_answer(record, "q.json")
    assert answers == ["Red", "crimson"] and exact_match("crimson.", answers) and not exact_match("blue", answers)
    # LLaVA's evaluation question files: {"question_id", "image", "text"}, an optional answer
    assert question_and_answer({"question_id": 7, "image": "a.jpg", "text": " Is it red? "}, "q.jsonl") == \
        ("Is it red?", None)
    assert question_and_answer({"question_id": 7, "text": "Q", "answer": ["x", "y"]}, "q.jsonl") == ("Q", ["x", "y"])
    with pytest.raises(ValueError, match=r"q.jsonl: record 7: 'answer' should be a string or a list of strings"):
        question_and_answer({"question_id": 7, "text": "Q", "answer": 3}, "q.jsonl")
    with pytest.raises(ValueError, match=r"q.json: record 2 needs 'conversations'"):
        question_and_answer({"id": 2, "conversations": "oops"}, "q.json")
    # records without an answer are answered but not scored
    summary = summarize([{"question_type": "all", "correct": None}, {"question_type": "all", "correct": True}])
    assert summary["accuracy"] == 100.0


def test_eval_command_end_to_end(tmp_path, capsys):
    from multigran.tiny import build_tiny

    build_tiny(tmp_path / "model", method="avg", image_size=64, patch_size=8)
    records = []
    for i in range(3):
        Image.fromarray(np.full((64, 64, 3), 40 * i, dtype=np.uint8)).save(tmp_path / f"{i}.png")
        records.append({"id": i, "image": f"{i}.png", "question_type": "coarse" if i else "fine",
                        "conversations": [{"from": "human", "value": "<image>\nWhat colour?"},
                                          {"from": "gpt", "value": "red"}]})
    (tmp_path / "test.json").write_text(json.dumps(records))
    code = main(["eval", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "test.json"),
                 "--image-folder", str(tmp_path), "--granularity", "16", "--out", str(tmp_path / "p.jsonl"),
                 "--max-new-tokens", "2"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    lines = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and summary["samples"] == 3
    assert all(line["granularity"] == 16 for line in lines)
    # The summary is the mean of the per-record results written next to it.
    assert summary["accuracy"] == pytest.approx(100 * sum(line["correct"] for line in lines) / 3)
    assert summary["mean_visual_tokens"] == pytest.approx(sum(line["visual_tokens"] for line in lines) / 3)
    assert summary["prefill_seconds"] > 0

    # written to a temporary file and renamed (never truncated in place): no temporary file is left behind
    assert not list(tmp_path.glob(".p.jsonl.*"))
