"""Benchmark metrics against cases computed by hand from the official scorers' rules (each case cites the rule)."""

import pytest

from multigran.evaluate.metrics import (ai2d_correct, anls, gqa_correct, iou, mmbench_letter, mme_answer, mme_scores,
                                        mmmu_letter, mmmu_open_correct, parse_box, pope_answer, pope_metrics,
                                        process_answer, reference_box, relaxed_correct, scienceqa_letter,
                                        vqa_accuracy)


# --- VQA accuracy: LLaVA's llava/eval/m4c_evaluator.py (EvalAI's processor, lines 181-218; soft score 225-246) ---

@pytest.mark.parametrize("raw, processed", [
    ("Two dogs!", "2 dogs"),          # "!" not next to a space -> a space (189-194); "two" -> "2" (202)
    ("a dog", "dog"),                 # articles dropped (203)
    ("the Dog.", "dog"),              # lower case (182); a period not before a digit removed (195)
    ("3.5", "3.5"),                   # a period before a digit kept
    ("1,000", "1000"),                # every comma removed by word_tokenize (183)
    ("dont", "don't"),                # contractions (207-209)
    ("yes/no", "yes no"),             # "/" inside a word -> a space
    ("left - right", "left right"),   # "-" next to a space -> removed
    ("what's", "what 's"),            # "'s" split off (183)
])
def test_evalai_answer_processing(raw, processed):
    assert process_answer(raw) == processed


def test_evalai_period_strip_quirk_removes_at_most_32_periods():
    # m4c_evaluator.py:195 passes re.UNICODE (32) as sub's count.
    assert process_answer("wow" + "." * 40) == "wow" + "." * 8


def test_vqa_accuracy_leave_one_out():
    # 3 of 10 humans said "2": leaving out one of them leaves 2 matches (2/3), leaving out another leaves 3 (1).
    references = ["2"] * 3 + ["3"] * 7
    assert vqa_accuracy("two", references) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)
    assert vqa_accuracy("Three.", references) == pytest.approx(1.0)
    # one match: 9 subsets keep it (1/3 each), the one leaving it out scores 0
    assert vqa_accuracy("cat", ["cat"] + ["dog"] * 9) == pytest.approx(9 / 10 / 3)
    assert vqa_accuracy("bird", references) == 0.0


# --- POPE: llava/eval/eval_pope.py ---

@pytest.mark.parametrize("text, parsed", [
    ("No, there is not.", "no"),
    ("Yes. But no.", "yes"),            # only the first sentence (12-13)
    ("There is no cat", "no"),
    ("NO", "yes"),                      # case-sensitive words: only No / not / no (17)
    ("Not sure", "yes"),                # "Not" is not in the list
    ("no.", "no"),
    ("", "yes"),
])
def test_pope_parsing(text, parsed):
    assert pope_answer(text) == parsed


def test_pope_metrics_by_hand():
    # TP = 2 (rows 0, 3), FN = 1 (row 1), FP = 1 (row 2), TN = 0 (eval_pope.py:39-61)
    metrics = pope_metrics(["Yes", "No", "Yes", "yes"], ["yes", "yes", "no", "yes"])
    assert metrics["precision"] == pytest.approx(2 / 3)
    assert metrics["recall"] == pytest.approx(2 / 3)
    assert metrics["f1"] == pytest.approx(2 / 3)
    assert metrics["accuracy"] == pytest.approx(0.5)
    assert metrics["yes_ratio"] == pytest.approx(0.75)


# --- MME: the benchmark's eval_tool/calculation.py (parse_pred_ans; acc, acc+) ---

@pytest.mark.parametrize("text, parsed", [
    ("Yes", "yes"), ("No, it is not", "no"), ("I think yes", "other"), ("Nope", "no"), ("yes and no", "yes"),
])
def test_mme_parsing(text, parsed):
    assert mme_answer(text) == parsed


def test_mme_scores_by_hand():
    items = [
        ("existence", "1.jpg", "Yes", "Yes"), ("existence", "1.jpg", "No", "No"),      # image 1: both right
        ("existence", "2.jpg", "Yes", "Yes"), ("existence", "2.jpg", "Yes", "No"),     # image 2: one right
        ("code_reasoning", "3.png", "No", "Yes"), ("code_reasoning", "3.png", "maybe", "No"),
    ]
    scores = mme_scores(items)
    existence = scores["categories"]["existence"]
    assert existence["acc"] == pytest.approx(75.0) and existence["acc_plus"] == pytest.approx(50.0)
    assert scores["perception"] == pytest.approx(125.0)
    assert scores["cognition"] == pytest.approx(0.0)
    assert "count" in scores["perception_missing"]


# --- multiple choice ---

@pytest.mark.parametrize("text, n, letter", [
    ("B", 3, "B"),
    ("C. blue", 3, "C"),                                     # eval_science_qa.py:67
    ("The answer is A.", 3, "A"),                            # :70-73
    ("The answer is A. The answer is B.", 2, None),          # two matches -> FAILED (:75)
    ("D", 3, None),                                          # past the choices: get_pred_idx -1 (:32-35)
    ("b", 3, None),                                          # letters are upper case
    ("A.", 2, None),                                         # neither a bare letter nor "X. ..."
])
def test_scienceqa_letter(text, n, letter):
    assert scienceqa_letter(text, n) == letter


def test_mmbench_prefetch():
    choices = {"A": "cat", "B": "dog", "C": "bird"}
    assert mmbench_letter("B", choices) == "B"
    assert mmbench_letter("The answer is B.", choices) == "B"            # the ("", ".") affix
    assert mmbench_letter("(C) bird", choices) == "C"
    assert mmbench_letter("A cat", choices) == "A"
    # "A" among more than 3 words may be an article: bare letters give up, the option text decides
    assert mmbench_letter("A dog is on the mat", choices) == "B"
    assert mmbench_letter("B or C", {"A": "red", "B": "green", "C": "blue"}) is None


def test_ai2d_rule():
    assert ai2d_correct("B. dog", "B")
    assert ai2d_correct("b", "B")                   # ignore_case
    assert ai2d_correct(" C.", "C")                 # leading "X." read by the filter
    assert not ai2d_correct("The answer is B", "B")  # anything else is compared whole


def test_mmmu_parsing():
    options = ["apple", "banana", "cherry"]
    assert mmmu_letter("(B) is correct", options) == ("B", True)
    assert mmmu_letter("A", options) == ("A", True)
    assert mmmu_letter("The correct option is clearly banana here", options) == ("B", True)  # > 5 words: content
    assert mmmu_letter("(A) or (C)? I pick (C)", options) == ("C", True)                      # the last mentioned
    random_pick = mmmu_letter("xyz", options, seed="q1")
    assert random_pick[1] is False and random_pick == mmmu_letter("xyz", options, seed="q1")
    assert mmmu_open_correct("12", "The answer is 12.")
    assert not mmmu_open_correct("12", "The answer is 13")
    assert mmmu_open_correct("Paris", "it is paris")


# --- ChartQA relaxed accuracy, DocVQA ANLS, GQA ---

@pytest.mark.parametrize("prediction, target, right", [
    ("10.4", "10", True), ("10.6", "10", False), ("5%", "0.05", True), ("Yes", "yes", True),
    ("0", "0", True), ("0.0", "0", False),   # a zero target falls back to the string match
])
def test_chartqa_relaxed(prediction, target, right):
    assert relaxed_correct(prediction, target) is right


def test_anls():
    assert anls("hello", ["hello"]) == 1.0
    assert anls("helo", ["hello"]) == pytest.approx(0.8)            # distance 1 / length 5
    assert anls("abc", ["xyz"]) == 0.0
    assert anls("ab", ["abcd"]) == 0.0                              # NL = 0.5 is not below the threshold
    assert anls("helo", ["xyz", "hello"]) == pytest.approx(0.8)     # the best reference
    assert anls("  Hello   World ", ["hello world"]) == 1.0


def test_gqa_normalisation():
    assert gqa_correct("Yes.", "yes")
    assert gqa_correct("Left", "left")
    assert not gqa_correct("yes!", "yes")


# --- grounding ---

def test_box_parsing_iou_and_conventions():
    assert parse_box("It is at [0.1, 0.2, 0.5, 0.6].") == [0.1, 0.2, 0.5, 0.6]
    assert parse_box("(0.1, 0.2, 0.5, 0.6)") is None
    assert iou([0, 0, 2, 2], [1, 1, 3, 3]) == pytest.approx(1 / 7)
    # a 100 x 50 image, box x=10 y=10 w=30 h=20
    assert reference_box([10, 10, 30, 20], 100, 50, "normalized") == pytest.approx([0.1, 0.2, 0.4, 0.6])
    # padded to a 100 x 100 square, the image 25 px down
    assert reference_box([10, 10, 30, 20], 100, 50, "square") == pytest.approx([0.1, 0.35, 0.4, 0.55])
