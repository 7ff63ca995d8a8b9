"""Multiple-choice answer extraction, each as the benchmark's official scorer does it.

Every extractor returns the chosen option letter, or None when the answer names no option (a parse failure: scored
wrong and counted in the results).
"""

import random
import re
import string

LETTERS = string.ascii_uppercase


def letters(count: int) -> list[str]:
    if not 1 <= count <= len(LETTERS):
        raise ValueError(f"a multiple-choice question needs 1 to {len(LETTERS)} options, got {count}")
    return list(LETTERS[:count])


def options_block(options: list[str]) -> str:
    """"A. first\\nB. second..." (the option list of LLaVA's and lmms-eval's multiple-choice prompts)."""
    return "\n".join(f"{letter}. {option}" for letter, option in zip(letters(len(options)), options))


# ScienceQA: llava/eval/eval_science_qa.py:65-77 (with its options A-E, line 15).
_SQA_PATTERN = re.compile(r"The answer is ([A-Z]).")


def scienceqa_letter(text: str, n_options: int, options: str = "ABCDE") -> str | None:
    """The letter as a whole answer, or "X. ..." at the start, or exactly one "The answer is X." in it; a letter past
    the question's options is a failure (get_pred_idx returns -1)."""
    if text in options:
        answer = text
    elif len(text) >= 3 and text[0] in options and text[1:3] == ". ":
        answer = text[0]
    else:
        found = _SQA_PATTERN.findall(text)
        answer = found[0] if len(found) == 1 else None
    return answer if answer and answer in options[:n_options] else None


# MMBench: the evaluator's answer pre-fetch (lmms_eval/tasks/mmbench/mmbench_evals.py:79-123, lmms-eval 0.7.3, from
# MMBench's release); the ChatGPT matching of what it cannot infer is not done (those answers count as failures).
_MMBENCH_AFFIXES = [("", "."), ("", ","), ("", ":"), ("", ")"), ("", ")."), ("(", ")"), ("(", ")."), (":", ""),
                    (":", ","), (":", "."), (":", ")"), (":", ").")]


def _mmbench_option(text: str, n_choices: int = 5) -> str | None:
    choices = LETTERS[:n_choices]
    splits = [x.strip() for x in text.split()]

    def count(prefix="", suffix=""):
        return sum(prefix + c + suffix in splits for c in choices)

    if count() == 1:
        for ch in choices:
            if "A" in splits and len(splits) > 3:  # "A" may be an article: the release gives up on bare letters
                break
            if ch in splits:
                return ch
    for prefix, suffix in _MMBENCH_AFFIXES:
        if count(prefix, suffix) == 1:
            for ch in choices:
                if prefix + ch + suffix in splits:
                    return ch
    return None


def _mmbench_text(text: str, choices: dict[str, str]) -> str | None:
    text = text.lower()
    candidates = [k for k, v in choices.items() if str(v).lower() in text]
    return candidates[0] if len(candidates) == 1 else None


def mmbench_letter(text: str, choices: dict[str, str]) -> str | None:
    """choices: {"A": option text, ...}. A letter standing alone (or as "A.", "(A)", ...) once, else the one option
    whose text appears in the answer."""
    return _mmbench_option(text) or _mmbench_text(text, choices)


# AI2D (lmms-eval's ai2d task): MultiChoiceRegexFilter keeps the letter of a leading "X." (else the whole answer),
# then exact_match with ignore_case and ignore_punctuation (lmms_eval/tasks/ai2d/utils.py:51-73, ai2d.yaml:40-54).
_AI2D_LEADING = re.compile(r"^\s*([A-Z])\.")


def ai2d_correct(text: str, answer_letter: str) -> bool:
    match = _AI2D_LEADING.match(text)
    filtered = match.group(1) if match else text
    strip = str.maketrans("", "", string.punctuation)  # exact_match's ignore_punctuation
    return filtered.lower().translate(strip) == answer_letter.lower().translate(strip)


def ai2d_letter(text: str, n_options: int) -> str | None:
    """The option letter the AI2D rule reads (None when it reads none; for reporting)."""
    match = _AI2D_LEADING.match(text)
    candidate = (match.group(1) if match else text).strip().upper().translate(str.maketrans("", "", string.punctuation))
    return candidate if candidate in LETTERS[:n_options] and len(candidate) == 1 else None


# MMMU: the benchmark's eval_utils.py (parse_multi_choice_response, parse_open_response, eval_open), as lmms-eval
# transcribes it (lmms_eval/tasks/mmmu/utils.py:341-560). Where no option is found the release picks one at random;
# here the pick is seeded by the question id, so a run, a resumed run and a sharded run agree.
def mmmu_letter(text: str, options: list[str], seed: str = "") -> tuple[str, bool]:
    """-> (letter, parsed): parsed is False when the letter is the release's random fallback."""
    all_choices = letters(len(options))
    index2ans = dict(zip(all_choices, options))
    for char in [",", ".", "!", "?", ";", ":", "'"]:
        text = text.strip(char)
    response = " " + text + " "
    index_ans, with_brackets = True, False
    candidates = [c for c in all_choices if f"({c})" in response]
    if candidates:
        with_brackets = True
    else:
        candidates = [c for c in all_choices if f" {c} " in response]
    if not candidates and len(response.split()) > 5:
        candidates = [k for k, ans in index2ans.items() if ans.lower() in response.lower()]
        index_ans = False
    if not candidates:
        return random.Random(f"mmmu:{seed}").choice(all_choices), False
    if len(candidates) == 1:
        return candidates[0], True
    if index_ans:
        key = (lambda c: response.rfind(f"({c})")) if with_brackets else (lambda c: response.rfind(f" {c} "))
    else:
        key = lambda c: response.lower().rfind(index2ans[c].lower())  # noqa: E731
    starts = [key(c) for c in candidates]
    return candidates[starts.index(max(starts))], True  # the last mentioned (np.argmax: first of equal maxima)


def _mmmu_numbers(text: str) -> list[str]:
    with_commas = re.findall(r"-?\b\d{1,3}(?:,\d{3})+\b", text)
    scientific = re.findall(r"-?\d+(?:\.\d+)?[eE][+-]?\d+", text)
    simple = re.findall(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])", text)
    return with_commas + scientific + simple


def _mmmu_normalize(text: str) -> list:
    text = text.strip()
    try:
        return [round(float(text.replace(",", "")), 2)]
    except ValueError:
        text = text.lower()
        return [" " + text, text + " "] if len(text) == 1 else [text]


def mmmu_open_predictions(response: str) -> list:
    """parse_open_response: the tail after the last key phrase of each sub-sentence, plus the numbers in them."""
    response = response.strip().strip(".").lower()
    parts = re.split(r"\.\s(?=[A-Z])|\n", response)
    indicators = ["could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result "]
    keys = []
    for index, part in enumerate(parts):
        if index == len(parts) - 1:
            indicators = indicators + ["="]
        shortest = None
        for indicator in indicators:
            if indicator in part:
                tail = part.split(indicator)[-1].strip()
                if not shortest or len(tail) < len(shortest):
                    shortest = tail
        if shortest and shortest.strip() not in [":", ",", ".", "!", "?", ";", ":", "'"]:
            keys.append(shortest)
    if not keys:
        keys = [response]
    found = list(keys)
    for key in keys:
        found.extend(_mmmu_numbers(key))
    normalized = []
    for item in found:
        normalized.extend(_mmmu_normalize(item))
    return list(dict.fromkeys(normalized))


def mmmu_open_correct(answer, response: str) -> bool:
    """eval_open: a string gold answer contained in a predicted string, or a numeric one equal to a predicted number."""
    golds = []
    for gold in (answer if isinstance(answer, list) else [answer]):
        golds.extend(_mmmu_normalize(str(gold)))
    for prediction in mmmu_open_predictions(response):
        if isinstance(prediction, str):
            if any(isinstance(g, str) and g in prediction for g in golds):
                return True
        elif prediction in golds:
            return True
    return False


__all__ = ["ai2d_correct", "ai2d_letter", "letters", "mmbench_letter", "mmmu_letter", "mmmu_open_correct",
           "mmmu_open_predictions", "options_block", "scienceqa_letter"]
