"""SEED-Bench (image questions, dimensions 1-9): exact letter match per question type
(LLaVA's scripts/convert_seed_for_submission.py:34)."""

from pathlib import Path

from ..metrics.choice import options_block
from ..sources import RecordError, read_json, require_field, text_field
from .base import OPTION_LETTER, PerSampleTask, Sample, where_of


class SEEDBench(PerSampleTask):
    name = "seed-bench"
    title = "SEED-Bench (image)"
    files = ("the official `SEED-Bench.json` (images `<data_id>` in --image-folder, i.e. `SEED-Bench-image/`), or "
             "lmms-eval's SEED-Bench parquet; video questions are left out")
    prompt = ("`<question>\\nA. <choice_a>\\nB. ...\\nD. <choice_d>` + `\\nAnswer with the option's letter from the "
              "given choices directly.` (LLaVA-1.5's llava-seed-bench.jsonl)")
    metric = "accuracy"
    max_new_tokens = 16

    def build(self, record, image, at, type_names):
        answer = text_field(record, "answer", at)
        if answer not in "ABCD" or len(answer) != 1:
            raise RecordError(f"{at}: answer {answer!r} should be one of A, B, C, D")
        choices = [text_field(record, f"choice_{c}", at) for c in "abcd"]
        text = text_field(record, "question", at) + "\n" + options_block(choices)
        kind = record.get("question_type_id", "all")
        return Sample(str(require_field(record, "question_id", at)), text + OPTION_LETTER, [image], answer,
                      type_names.get(kind, str(kind)))

    def from_release(self, path: Path):
        data = read_json(path)
        names = {v: k for k, v in (data.get("question_type") or {}).items()} if isinstance(data, dict) else {}
        questions = require_field(data, "questions", str(path))
        return [self.build(q, text_field(q, "data_id", where_of(path, i)), where_of(path, i), names)
                for i, q in enumerate(questions) if q.get("data_type", "image") == "image"]

    def from_table(self, rows, where):
        samples = []
        for i, row in enumerate(rows):
            if row.get("data_type", "image") != "image":
                continue
            image = row.get("image")
            samples.append(self.build(row, image[0] if isinstance(image, list) else image, where_of(where, i), {}))
        return samples

    def sample_score(self, sample, answer):
        return float(answer == sample.target), answer in ("A", "B", "C", "D")
