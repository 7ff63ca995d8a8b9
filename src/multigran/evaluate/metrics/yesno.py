"""Yes/no benchmarks: POPE (LLaVA's evaluator) and MME (the benchmark's calculation script)."""


def pope_answer(text: str) -> str:
    """LLaVA's POPE parsing (llava/eval/eval_pope.py:8-20): keep the first sentence, drop commas; "no" when the words
    contain No / not / no, else "yes" (so an empty or off-topic answer counts as "yes")."""
    if text.find(".") != -1:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def pope_metrics(predictions: list[str], labels: list[str]) -> dict:
    """Accuracy, precision, recall, F1 (positive = "yes") and the predicted-yes ratio, in [0, 1]
    (llava/eval/eval_pope.py:22-61). A label other than "no" counts as "yes", as there. Precision / recall / F1 are
    None where the release would divide by zero."""
    if len(predictions) != len(labels):
        raise ValueError(f"POPE: {len(predictions)} predictions for {len(labels)} labels")
    if not labels:
        return {"accuracy": None, "precision": None, "recall": None, "f1": None, "yes_ratio": None, "samples": 0}
    predicted = [0 if pope_answer(text) == "no" else 1 for text in predictions]
    truth = [0 if label == "no" else 1 for label in labels]
    tp = sum(p == 1 and t == 1 for p, t in zip(predicted, truth))
    fp = sum(p == 1 and t == 0 for p, t in zip(predicted, truth))
    tn = sum(p == 0 and t == 0 for p, t in zip(predicted, truth))
    fn = sum(p == 0 and t == 1 for p, t in zip(predicted, truth))
    precision = tp / (tp + fp) if tp + fp else None
    recall = tp / (tp + fn) if tp + fn else None
    f1 = 2 * precision * recall / (precision + recall) if precision and recall else None
    return {"accuracy": (tp + tn) / len(truth), "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": predicted.count(1) / len(predicted), "samples": len(truth),
            "tp": tp, "fp": fp, "tn": tn, "fn": fn}


# MME's categories (eval_tool/calculation.py: eval_type_dict).
MME_PERCEPTION = ["existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
                  "OCR"]
MME_COGNITION = ["commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning"]


def mme_answer(text: str) -> str:
    """MME's parse_pred_ans (calculation.py), on the lower-cased answer: "yes"/"no" exactly, else "yes" or "no"
    found in the first 4 characters (yes first), else "other" (always wrong)."""
    text = text.lower()
    if text in ("yes", "no"):
        return text
    prefix = text[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return "other"


def mme_scores(items) -> dict:
    """items: (category, image key, prediction, answer) per question (two per image in MME).

    Per category: acc = % of questions right, acc+ = % of images with every question right, score = acc + acc+;
    perception = sum of the 10 perception scores (max 2000), cognition = sum of the 4 (max 800). A category absent
    from the data is left out of the totals (and reported missing)."""
    by_category: dict[str, dict[str, list[bool]]] = {}
    for category, image, prediction, answer in items:
        right = mme_answer(prediction) == answer.strip().lower()
        by_category.setdefault(category, {}).setdefault(image, []).append(right)
    categories = {}
    for category, images in by_category.items():
        flags = [flag for answers in images.values() for flag in answers]
        acc = 100.0 * sum(flags) / len(flags)
        acc_plus = 100.0 * sum(all(answers) for answers in images.values()) / len(images)
        categories[category] = {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus, "questions": len(flags)}
    totals = {}
    for name, members in (("perception", MME_PERCEPTION), ("cognition", MME_COGNITION)):
        present = [c for c in members if c in categories]
        totals[name] = sum(categories[c]["score"] for c in present) if present else None
        totals[f"{name}_missing"] = [c for c in members if c not in categories]
    return {"categories": categories, **totals}


__all__ = ["MME_COGNITION", "MME_PERCEPTION", "mme_answer", "mme_scores", "pope_answer", "pope_metrics"]
