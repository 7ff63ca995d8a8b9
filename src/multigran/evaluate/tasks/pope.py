"""POPE (COCO random / popular / adversarial): LLaVA's yes/no parsing; accuracy, precision, recall, F1, yes-ratio."""

from pathlib import Path

from ..metrics.yesno import pope_metrics
from ..sources import RecordError, read_jsonl, require_field, text_field
from .base import SHORT_ANSWER, Sample, Task, where_of

SPLITS = ("adversarial", "popular", "random")


class POPE(Task):
    name = "pope"
    title = "POPE"
    files = ("the official `coco_pope_{random,popular,adversarial}.json` (JSONL; a folder of them or one file; COCO "
             "val2014 images in --image-folder), or lmms-eval's POPE parquet")
    prompt = "`<text>` + `\\nAnswer the question using a single word or phrase.` (LLaVA-1.5 and lmms-eval)"
    metric = "f1"
    max_new_tokens = 128

    def from_release(self, path: Path):
        files = [path] if path.is_file() else sorted(path.glob("coco_pope_*.json"))
        if not files:
            raise RecordError(f"{path}: no coco_pope_<split>.json files (POPE's release) in this folder")
        samples = []
        for file in files:
            split = file.stem.removeprefix("coco_pope_")
            for number, record in read_jsonl(file):
                where = f"{file}: line {number}"
                label = text_field(record, "label", where)
                if label not in ("yes", "no"):
                    raise RecordError(f"{where}: label {label!r} should be 'yes' or 'no'")
                samples.append(Sample(f"{split}/{require_field(record, 'question_id', where)}",
                                      text_field(record, "text", where) + SHORT_ANSWER,
                                      [text_field(record, "image", where)], label, split))
        return samples

    def from_table(self, rows, where):
        samples = []
        for i, row in enumerate(rows):
            at = where_of(where, i)
            label = text_field(row, "answer", at).strip().lower()
            if label not in ("yes", "no"):
                raise RecordError(f"{at}: answer {label!r} should be 'yes' or 'no'")
            split = row.get("category") or "all"
            samples.append(Sample(f"{split}/{require_field(row, 'question_id', at)}",
                                  text_field(row, "question", at).strip() + SHORT_ANSWER, [row.get("image")], label,
                                  split))
        return samples

    def score(self, samples, answers):
        splits = sorted({s.category for s in samples})
        by_split = {}
        for split in splits:
            members = [s for s in samples if s.category == split]
            by_split[split] = pope_metrics([answers.get(s.question_id, "") for s in members],
                                           [s.target for s in members])
        keys = ("accuracy", "precision", "recall", "f1", "yes_ratio")
        mean = {k: _mean_percent([m[k] for m in by_split.values()]) for k in keys}
        return {"score": mean["f1"], "metrics": mean,
                "by_category": {split: {k: _percent(m[k]) for k in keys} for split, m in by_split.items()},
                "unparsed": 0}


def _percent(value):
    return None if value is None else 100.0 * value


def _mean_percent(values):
    return None if not values or any(v is None for v in values) else 100.0 * sum(values) / len(values)
