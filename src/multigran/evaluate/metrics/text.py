"""Short-answer metrics: ChartQA's relaxed accuracy, DocVQA's ANLS, GQA's exact match."""


def relaxed_correct(prediction: str, target: str, max_relative_change: float = 0.05) -> bool:
    """ChartQA relaxed accuracy (Methani et al. 2020 / pix2struct, as lmms-eval's chartqa task): numbers (a trailing
    "%" divides by 100) within 5 % of a non-zero target, otherwise an exact case-insensitive string match."""
    def to_float(text):
        try:
            return float(text.rstrip("%")) / 100.0 if text.endswith("%") else float(text)
        except ValueError:
            return None

    predicted, expected = to_float(prediction), to_float(target)
    if predicted is not None and expected:  # a zero target falls through to the string match, as released
        return abs(predicted - expected) / abs(expected) <= max_relative_change
    return prediction.lower() == target.lower()


def levenshtein(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def anls(prediction: str, references: list[str], threshold: float = 0.5) -> float:
    """Average Normalized Levenshtein Similarity of one answer (Biten et al. 2019; the DocVQA/ST-VQA evaluation):
    answers lower-cased with whitespace collapsed; NL = distance / max(length); the best reference counts; a
    similarity 1 - NL is kept when NL < threshold, else 0."""
    if not references:
        raise ValueError("ANLS needs at least one reference answer")
    predicted = " ".join(prediction.strip().lower().split())
    best = 0.0
    for reference in references:
        gold = " ".join(reference.strip().lower().split())
        length = max(len(gold), len(predicted))
        distance = levenshtein(gold, predicted) / length if length else 0.0
        best = max(best, 1.0 - distance if distance < threshold else 0.0)
    return best


def gqa_normalize(prediction: str) -> str:
    """LLaVA's conversion for GQA's evaluator (scripts/convert_gqa_for_eval.py:14): trailing periods stripped, lower
    case; the evaluator then compares it with the answer as is (eval.py: `predicted == gold`)."""
    return prediction.rstrip(".").lower()


def gqa_correct(prediction: str, answer: str) -> bool:
    return gqa_normalize(prediction) == answer


__all__ = ["anls", "gqa_correct", "gqa_normalize", "levenshtein", "relaxed_correct"]
