"""Benchmark tasks read from small files in each release's format (and lmms-eval's exports), build LLaVA's prompts,
and score a predictions file without a model (`multigran eval --task ... --predictions ...`)."""

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from multigran.cli import main
from multigran.evaluate.tasks import TASKS, get_task


def png_bytes(value=0, size=(8, 8)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size[1], size[0], 3), value, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def score(tmp_path, task, data, predictions, *extra):
    out = tmp_path / f"out_{task}"
    code = main(["eval", "--task", task, "--data", str(data), "--predictions", str(predictions), "--out", str(out),
                 *extra])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert (out / "results.md").read_text().startswith(f"# {get_task(task).title}")
    return results["settings"][0]


def test_every_task_documents_its_files_prompt_and_metric():
    for name, task_class in TASKS.items():
        assert task_class.name == name
        assert task_class.files and task_class.prompt and task_class.metric and task_class.max_new_tokens >= 1


def test_uhd_models_get_the_release_pre_resize_per_benchmark():
    import argparse

    from multigran.evaluate.cli import processor_settings

    def options(task, method="uhd", granularity=None):
        return processor_settings(argparse.Namespace(granularity=granularity), get_task(task), method)

    # LLaVA-UHD v2's evaluation: long side 1536 for TextVQA, no resize for AI2D / MMBench, 1024 otherwise
    assert options("textvqa") == [("default", {"pre_resize_long_side": 1536})]
    assert options("ai2d") == [("default", {"pre_resize_long_side": None})]
    assert options("mmbench-single") == [("default", {"pre_resize_long_side": None})]
    assert options("pope") == [("default", {"pre_resize_long_side": 1024})]
    assert options("pope", method="avg", granularity="36,auto") == [("granularity=36", {"granularity": 36}),
                                                                     ("granularity=auto", {"granularity": "auto"})]


def test_vqav2_release_and_submission_format(tmp_path):
    (tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json").write_text(json.dumps({
        "data_subtype": "val2014",
        "questions": [{"question_id": 1, "image_id": 42, "question": "How many dogs?"},
                      {"question_id": 2, "image_id": 43, "question": "What color?"}]}))
    (tmp_path / "v2_mscoco_val2014_annotations.json").write_text(json.dumps({"annotations": [
        {"question_id": 1, "answer_type": "number", "answers": [{"answer": "2"}] * 3 + [{"answer": "3"}] * 7},
        {"question_id": 2, "answer_type": "other", "answers": [{"answer": "red"}] * 10}]}))
    samples = get_task("vqav2").load(tmp_path)
    assert samples[0].images == ["COCO_val2014_000000000042.jpg"]
    assert samples[0].text == "How many dogs?\nAnswer the question using a single word or phrase."
    predictions = tmp_path / "answers.json"  # EvalAI's submission format
    predictions.write_text(json.dumps([{"question_id": 1, "answer": "two"}, {"question_id": 2, "answer": "Red"}]))
    result = score(tmp_path, "vqav2", tmp_path, predictions)
    assert result["score"] == pytest.approx(100 * (0.9 + 1.0) / 2)
    assert result["by_category"] == {"number": pytest.approx(90.0), "other": pytest.approx(100.0)}


def test_textvqa_ocr_prompt_and_llava_answers(tmp_path):
    data = tmp_path / "TextVQA_0.5.1_val.json"
    data.write_text(json.dumps({"data": [{"question_id": 7, "image_id": "abc", "question": "what brand?",
                                          "ocr_tokens": ["coca", "cola"], "answers": ["coca cola"] * 10}]}))
    sample = get_task("textvqa-ocr").load(data)[0]
    assert sample.text == ("what brand?\nReference OCR token: coca, cola\n"
                           "Answer the question using a single word or phrase.")
    assert get_task("textvqa").load(data)[0].text == "what brand?\nAnswer the question using a single word or phrase."
    answers = write_jsonl(tmp_path / "a.jsonl", [{"question_id": 7, "text": "Coca-Cola"}])
    # "-" inside a word becomes a space: "coca cola" matches all 10 references
    assert score(tmp_path, "textvqa", data, answers)["score"] == pytest.approx(100.0)


def test_pope_release_folder(tmp_path):
    for split in ("random", "adversarial"):
        write_jsonl(tmp_path / f"coco_pope_{split}.json", [
            {"question_id": 1, "image": "a.jpg", "text": "Is there a cat?", "label": "yes"},
            {"question_id": 2, "image": "b.jpg", "text": "Is there a dog?", "label": "no"}])
    answers = write_jsonl(tmp_path / "p.jsonl", [
        {"question_id": "random/1", "text": "Yes"}, {"question_id": "random/2", "text": "No."},
        {"question_id": "adversarial/1", "text": "Yes"}, {"question_id": "adversarial/2", "text": "Yes"}])
    result = score(tmp_path, "pope", tmp_path, answers)
    assert result["by_category"]["random"]["f1"] == pytest.approx(100.0)
    assert result["by_category"]["adversarial"]["accuracy"] == pytest.approx(50.0)
    # adversarial: TP 1, FP 1 -> precision 1/2, recall 1, F1 2/3; the score is the mean F1 over the splits
    assert result["score"] == pytest.approx(100 * (1 + 2 / 3) / 2)


def test_mme_release_folder_and_duplicate_llava_ids(tmp_path):
    root = tmp_path / "MME_Benchmark_release_version"
    (root / "existence").mkdir(parents=True)
    (root / "existence" / "0001.png").write_bytes(png_bytes())
    (root / "existence" / "0001.txt").write_text("Is there a dog? Please answer yes or no.\tYes\n"
                                                 "Is there a cat? Please answer yes or no.\tNo\n")
    (root / "celebrity" / "images").mkdir(parents=True)
    (root / "celebrity" / "questions_answers_YN").mkdir()
    (root / "celebrity" / "images" / "x.jpg").write_bytes(png_bytes())
    (root / "celebrity" / "questions_answers_YN" / "x.txt").write_text("Is it A? Please answer yes or no.\tYes\n"
                                                                         "Is it B? Please answer yes or no.\tNo\n")
    samples = get_task("mme").load(root)
    assert [s.question_id for s in samples] == ["existence/0001.png#0", "existence/0001.png#1",
                                                "celebrity/x.jpg#0", "celebrity/x.jpg#1"]
    # LLaVA's answer file repeats an image's id for its two questions: the k-th occurrence is question k
    answers = write_jsonl(tmp_path / "a.jsonl", [
        {"question_id": "existence/0001.png", "text": "Yes"}, {"question_id": "existence/0001.png", "text": "No"},
        {"question_id": "celebrity/x.jpg", "text": "Yes"}, {"question_id": "celebrity/x.jpg", "text": "Yes"}])
    result = score(tmp_path, "mme", root, answers)
    assert result["by_category"]["existence"]["score"] == pytest.approx(200.0)
    assert result["by_category"]["celebrity"]["score"] == pytest.approx(50.0)      # acc 50 + acc+ 0
    assert result["metrics"]["perception"] == pytest.approx(250.0)


def test_mmbench_circular(tmp_path):
    image = base64.b64encode(png_bytes()).decode()
    tsv = tmp_path / "mmbench_dev.tsv"
    tsv.write_text("index\tquestion\thint\tA\tB\tC\tD\tanswer\tcategory\timage\n"
                   f"10\tWhat is it?\tnan\tcat\tdog\tbird\tnan\tB\tanimals\t{image}\n"
                   f"11\tWhich color?\tLook closely.\tred\tblue\tnan\tnan\tA\tcolors\t{image}\n")
    samples = get_task("mmbench").load(tsv)
    assert [s.question_id for s in samples] == ["10#0", "10#1", "10#2", "11#0", "11#1"]
    # round 1 shows the options rotated once under the same letters (llava/eval/model_vqa_mmbench.py:87-139)
    assert samples[1].text == ("What is it?\nA. dog\nB. bird\nC. cat\n"
                               "Answer with the option's letter from the given choices directly.")
    assert samples[3].text.startswith("Look closely.\nWhich color?\nA. red\nB. blue")
    assert [s.target["answer"] for s in samples] == ["B", "A", "C", "A", "B"]
    answers = write_jsonl(tmp_path / "a.jsonl", [
        {"question_id": 10, "round_id": 0, "text": "B"}, {"question_id": 10, "round_id": 1, "text": "A"},
        {"question_id": 10, "round_id": 2, "text": "C. cat"},
        {"question_id": 11, "round_id": 0, "text": "A"}, {"question_id": 11, "round_id": 1, "text": "A"}])
    result = score(tmp_path, "mmbench", tsv, answers)
    assert result["score"] == pytest.approx(50.0)          # question 10 right in every round, 11 wrong in round 1
    assert result["by_category"] == {"animals": 100.0, "colors": 0.0}
    single = score(tmp_path, "mmbench-single", tsv, answers)
    assert single["score"] == pytest.approx(100.0)


def test_scienceqa_img_release(tmp_path):
    (tmp_path / "problems.json").write_text(json.dumps({
        "1": {"question": "Which is a mammal?", "choices": ["frog", "whale"], "answer": 1, "hint": "",
              "image": "image.png", "subject": "natural science"},
        "2": {"question": "Pick one.", "choices": ["x", "y", "z"], "answer": 0, "hint": "A context.",
              "image": "image.png", "subject": "language science"},
        "3": {"question": "No image here.", "choices": ["a", "b"], "answer": 0, "hint": "", "image": None}}))
    (tmp_path / "pid_splits.json").write_text(json.dumps({"test": ["1", "2", "3"]}))
    samples = get_task("scienceqa-img").load(tmp_path)
    assert [s.question_id for s in samples] == ["1", "2"]      # only questions with an image
    assert samples[0].images == ["test/1/image.png"]
    assert samples[1].text == ("Context: A context.\nPick one.\nA. x\nB. y\nC. z\n"
                               "Answer with the option's letter from the given choices directly.")
    answers = write_jsonl(tmp_path / "a.jsonl", [{"question_id": "1", "text": "B"},
                                                 {"question_id": "2", "text": "D"}])
    result = score(tmp_path, "scienceqa-img", tmp_path, answers)
    assert result["score"] == pytest.approx(50.0)
    assert result["failures"]["unparsed"] == 1        # "D" names no option of question 2


def test_seed_chartqa_docvqa_gqa_vizwiz_releases(tmp_path):
    seed = tmp_path / "SEED-Bench.json"
    seed.write_text(json.dumps({"question_type": {"Scene Understanding": 1}, "questions": [
        {"question_id": "5", "data_id": "a.jpg", "data_type": "image", "question_type_id": 1, "question": "Q?",
         "choice_a": "1", "choice_b": "2", "choice_c": "3", "choice_d": "4", "answer": "C"},
        {"question_id": "6", "data_id": "v.mp4", "data_type": "video", "question_type_id": 10, "question": "V?",
         "choice_a": "1", "choice_b": "2", "choice_c": "3", "choice_d": "4", "answer": "A"}]}))
    assert [s.question_id for s in get_task("seed-bench").load(seed)] == ["5"]
    # LLaVA's convert_seed_for_submission upload file: {"question_id", "prediction"} per line
    upload = write_jsonl(tmp_path / "s.jsonl", [{"question_id": "5", "prediction": "C"}])
    assert score(tmp_path, "seed-bench", seed, upload)["score"] == 100.0
    assert score(tmp_path, "seed-bench", seed, write_jsonl(tmp_path / "s2.jsonl", [
        {"question_id": 5, "text": "C."}]))["score"] == 0.0       # the release compares the text exactly

    chart = tmp_path / "chart"
    chart.mkdir()
    (chart / "test_human.json").write_text(json.dumps([{"imgname": "1.png", "query": "Max?", "label": "20"}]))
    (chart / "test_augmented.json").write_text(json.dumps([{"imgname": "2.png", "query": "Min?", "label": "Yes"}]))
    answers = write_jsonl(tmp_path / "c.jsonl", [{"question_id": "human/0", "text": "20.9"},
                                                 {"question_id": "augmented/0", "text": "no"}])
    result = score(tmp_path, "chartqa", chart, answers)
    assert result["by_category"] == {"augmented": 0.0, "human": 100.0}

    doc = tmp_path / "val_v1.0.json"
    doc.write_text(json.dumps({"data": [{"questionId": 3, "question": "Date?", "image": "documents/d.png",
                                         "answers": ["May 1", "1 May"]}]}))
    result = score(tmp_path, "docvqa", doc, write_jsonl(tmp_path / "d.jsonl", [{"question_id": 3, "text": "may 2"}]))
    assert result["score"] == pytest.approx(80.0)        # distance 1 / 5 from "may 1"

    gqa = tmp_path / "testdev_balanced_questions.json"
    gqa.write_text(json.dumps({"q1": {"imageId": "n1", "question": "Left?", "answer": "yes",
                                      "types": {"structural": "verify"}},
                               "q2": {"imageId": "n2", "question": "What?", "answer": "cat",
                                      "types": {"structural": "query"}}}))
    submission = tmp_path / "gqa_predictions.json"   # GQA's evaluator input, as convert_gqa_for_eval writes it
    submission.write_text(json.dumps([{"questionId": "q1", "prediction": "yes"},
                                      {"questionId": "q2", "prediction": "dog"}]))
    result = score(tmp_path, "gqa", gqa, submission)
    assert result["score"] == 50.0 and result["by_category"] == {"query": 0.0, "verify": 100.0}

    vizwiz = tmp_path / "val.json"
    vizwiz.write_text(json.dumps([{"image": "VizWiz_val_00000001.jpg", "question": "What is this?",
                                   "answers": [{"answer": "unanswerable"}] * 10, "answer_type": "unanswerable"}]))
    sample = get_task("vizwiz").load(vizwiz)[0]
    assert "respond with 'Unanswerable'" in sample.text
    result = score(tmp_path, "vizwiz", vizwiz,
                   write_jsonl(tmp_path / "v.jsonl", [{"question_id": "VizWiz_val_00000001.jpg",
                                                       "text": "Unanswerable"}]))
    assert result["score"] == 100.0


def test_lmms_eval_exports_parquet_and_save_to_disk(tmp_path):
    import datasets

    image = {"bytes": png_bytes(size=(100, 50)), "path": None}
    features = datasets.Features({"id": datasets.Value("string"), "question": datasets.Value("string"),
                                  "options": datasets.Value("string"), "answer": datasets.Value("string"),
                                  "question_type": datasets.Value("string"), "image_1": datasets.Image()})
    mmmu = datasets.Dataset.from_dict({
        "id": ["validation_Art_1", "validation_Math_2"], "question": ["Which? <image 1>", "How many?"],
        "options": ["['red', 'blue']", "[]"], "answer": ["B", "12"],
        "question_type": ["multiple-choice", "open"], "image_1": [image, image]}, features=features)
    mmmu.to_parquet(str(tmp_path / "validation-00000-of-00001.parquet"))
    samples = get_task("mmmu").load(tmp_path)
    assert samples[0].text == ("Which? <image 1>\nA. red\nB. blue\n\n"
                               "Answer with the option's letter from the given choices directly.")
    assert samples[1].text == "How many?\n\nAnswer the question using a single word or phrase."
    answers = write_jsonl(tmp_path / "m.jsonl", [{"question_id": "validation_Art_1", "text": "(B)"},
                                                 {"question_id": "validation_Math_2", "text": "The total is 12."}])
    result = score(tmp_path, "mmmu", tmp_path, answers)
    assert result["score"] == 100.0 and set(result["by_category"]) == {"Art", "Math"}

    # lmms-eval's RefCOCO export (a `datasets.save_to_disk` folder): bbox [x, y, w, h] in pixels of a 100 x 20 image
    wide = {"bytes": png_bytes(size=(100, 20)), "path": None}
    features = datasets.Features({"question_id": datasets.Value("string"), "answer": datasets.Value("string"),
                                  "bbox": datasets.Sequence(datasets.Value("float32")), "image": datasets.Image()})
    refcoco = datasets.Dataset.from_dict({"question_id": ["r1"], "answer": ["the left cat"], "bbox": [[10, 5, 30, 10]],
                                          "image": [wide]}, features=features)
    refcoco.save_to_disk(str(tmp_path / "refcoco"))
    sample = get_task("refcoco").load(tmp_path / "refcoco")[0]
    assert sample.text == "Please provide the bounding box coordinate of the region this sentence describes: " \
                          "the left cat."
    assert sample.target == pytest.approx([0.1, 0.45, 0.4, 0.55])    # padded to 100 x 100, the image 40 px down
    square = write_jsonl(tmp_path / "r.jsonl", [{"question_id": "r1", "text": "[0.1, 0.45, 0.4, 0.55]"}])
    assert score(tmp_path, "refcoco", tmp_path / "refcoco", square)["score"] == 100.0
    # the same answer read in the image's own frame misses the reference [0.1, 0.25, 0.4, 0.75] (IoU 0.2)
    result = score(tmp_path, "refcoco", tmp_path / "refcoco", square, "--box-format", "normalized")
    assert result["score"] == 0.0 and result["metrics"]["mean_iou"] == pytest.approx(20.0)
    assert result["box_format"] == "normalized"


def test_ai2d_export_and_missing_predictions_counted(tmp_path):
    import datasets

    features = datasets.Features({"question": datasets.Value("string"), "answer": datasets.Value("string"),
                                  "options": datasets.Sequence(datasets.Value("string")), "image": datasets.Image()})
    ai2d = datasets.Dataset.from_dict({"question": ["Which part?"], "options": [["root", "leaf", "stem"]],
                                       "answer": ["1"], "image": [{"bytes": png_bytes(), "path": None}]},
                                      features=features)
    ai2d.to_parquet(str(tmp_path / "ai2d.parquet"))
    sample = get_task("ai2d").load(tmp_path / "ai2d.parquet")[0]
    assert sample.text == ("Which part?\nA. root\nB. leaf\nC. stem\n"
                           "Answer with the option's letter from the given choices directly.")
    right = score(tmp_path, "ai2d", tmp_path / "ai2d.parquet",
                  write_jsonl(tmp_path / "a.jsonl", [{"question_id": "0", "text": "B. leaf"}]))
    assert right["score"] == 100.0
    none = score(tmp_path, "ai2d", tmp_path / "ai2d.parquet", write_jsonl(tmp_path / "b.jsonl", [
        {"question_id": "other", "text": "B"}]))
    assert none["score"] == 0.0 and none["failures"]["missing"] == 1


def test_bad_inputs_are_one_line_naming_file_and_record(tmp_path, capsys):
    bad = tmp_path / "TextVQA_0.5.1_val.json"
    bad.write_text(json.dumps({"data": [{"question_id": 1, "image_id": "a", "question": "q", "answers": "x"},
                                        {"question_id": 2, "image_id": "b", "question": 5, "answers": ["y"]}]}))
    answers = write_jsonl(tmp_path / "a.jsonl", [{"question_id": 1, "text": "x"}])
    code = main(["eval", "--task", "textvqa", "--data", str(bad), "--predictions", str(answers),
                 "--out", str(tmp_path / "o")])
    error = capsys.readouterr().err.strip()
    assert code == 2 and len(error.splitlines()) == 1
    assert "TextVQA_0.5.1_val.json: record 1: field 'question' should be a string" in error

    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100000 + "]" * 100000)   # nesting past any format: refused, never a RecursionError
    assert main(["eval", "--task", "vizwiz", "--data", str(deep), "--predictions", str(answers),
                 "--out", str(tmp_path / "o")]) == 2
    assert "nested more than" in capsys.readouterr().err

    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"question_id": 1, "text": "x"}\n{"question_id": 2, "text": \n')
    good = tmp_path / "val.json"
    good.write_text(json.dumps([{"image": "a.jpg", "question": "q", "answers": ["x"]}]))
    assert main(["eval", "--task", "vizwiz", "--data", str(good), "--predictions", str(broken),
                 "--out", str(tmp_path / "o")]) == 2
    assert "broken.jsonl: line 2" in capsys.readouterr().err

    assert main(["eval", "--task", "nope", "--data", str(good), "--predictions", str(broken)]) == 2
    assert "unknown benchmark; known: vqav2" in capsys.readouterr().err

    tsv = tmp_path / "mmbench.tsv"   # an answer letter that is not one of the question's options
    tsv.write_text("index\tquestion\thint\tA\tB\tC\tD\tanswer\tcategory\timage\n"
                   "1\tQ?\tnan\tx\ty\tnan\tnan\tC\tc\tAAAA\n")
    assert main(["eval", "--task", "mmbench", "--data", str(tsv), "--predictions", str(broken)]) == 2
    assert "mmbench.tsv: record 0: answer 'C' is not one of its options A, B" in capsys.readouterr().err

    write_jsonl(tmp_path / "coco_pope_random.json", [{"question_id": 1, "image": "a.jpg", "text": "Q", "label": "Y"}])
    assert main(["eval", "--task", "pope", "--data", str(tmp_path / "coco_pope_random.json"),
                 "--predictions", str(broken)]) == 2
    assert "coco_pope_random.json: line 1: label 'Y' should be 'yes' or 'no'" in capsys.readouterr().err

    sqa = tmp_path / "sqa"
    sqa.mkdir()
    (sqa / "problems.json").write_text(json.dumps({"1": {"question": "Q", "choices": "ab", "answer": 0,
                                                        "image": "image.png"}}))
    (sqa / "pid_splits.json").write_text(json.dumps({"test": ["1"]}))
    assert main(["eval", "--task", "scienceqa-img", "--data", str(sqa), "--predictions", str(broken)]) == 2
    assert "problems.json: problem 1: 'choices' should be a non-empty list" in capsys.readouterr().err


@pytest.mark.parametrize("option, value, message", [
    ("--limit", "0", "--limit: expected an integer >= 1, got '0'"),
    ("--batch-size", "-2", "--batch-size: expected an integer >= 1, got '-2'"),
    ("--max-new-tokens", "x", "--max-new-tokens: expected an integer >= 1, got 'x'"),
    ("--latency-samples", "-1", "--latency-samples: expected an integer >= 0, got '-1'"),
])
def test_option_ranges(tmp_path, capsys, option, value, message):
    try:
        code = main(["eval", "--task", "pope", "--data", str(tmp_path), "--predictions", "p.jsonl", option, value])
    except SystemExit as exit_info:  # argparse's own exit
        code = exit_info.code
    assert code == 2
    assert message in capsys.readouterr().err
