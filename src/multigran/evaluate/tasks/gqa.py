"""GQA (testdev-balanced): exact match after LLaVA's normalisation, per structural type."""

from pathlib import Path

from ..metrics.text import gqa_correct
from ..sources import RecordError, read_json, require_field, text_field
from .base import SHORT_ANSWER, PerSampleTask, Sample


class GQA(PerSampleTask):
    name = "gqa"
    title = "GQA"
    files = ("the official `testdev_balanced_questions.json` (images `<imageId>.jpg` in --image-folder), or "
             "lmms-eval's GQA parquet with an `image` column (or `imageId` and --image-folder)")
    prompt = "`<question>` + `\\nAnswer the question using a single word or phrase.` (LLaVA-1.5 and lmms-eval)"
    metric = "accuracy"
    max_new_tokens = 16

    def from_release(self, path: Path):
        questions = read_json(path)
        if not isinstance(questions, dict):
            raise RecordError(f"{path}: expected GQA's {{question id: question}} object")
        samples = []
        for qid, record in questions.items():
            where = f"{path}: question {qid}"
            structural = (record.get("types") or {}).get("structural", "all") if isinstance(record, dict) else "all"
            samples.append(Sample(str(qid), text_field(record, "question", where) + SHORT_ANSWER,
                                  [f"{require_field(record, 'imageId', where)}.jpg"],
                                  text_field(record, "answer", where), structural))
        return samples

    def from_table(self, rows, where):
        samples = []
        for i, row in enumerate(rows):
            at = f"{where}: record {i}"
            image = row.get("image") or f"{require_field(row, 'imageId', at)}.jpg"
            samples.append(Sample(str(require_field(row, "id", at)), text_field(row, "question", at) + SHORT_ANSWER,
                                  [image], text_field(row, "answer", at)))
        return samples

    def sample_score(self, sample, answer):
        return float(gqa_correct(answer, sample.target)), True

    def read_submission(self, value, where):
        """GQA's evaluator input: [{"questionId", "prediction"}] (what LLaVA's convert_gqa_for_eval writes)."""
        if isinstance(value, list) and value and all(isinstance(v, dict) and "prediction" in v for v in value):
            return {str(v["questionId"]): str(v["prediction"]) for v in value}
        return None
