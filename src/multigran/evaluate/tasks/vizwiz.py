"""VizWiz-VQA (val): VQA accuracy; test answers are scored by the benchmark's server."""

from pathlib import Path

from ..metrics.vqa import vqa_accuracy
from ..sources import answers_field, read_json, require_field, text_field
from .base import SHORT_ANSWER, PerSampleTask, Sample, where_of

UNANSWERABLE = "\nWhen the provided information is insufficient, respond with 'Unanswerable'."


class VizWiz(PerSampleTask):
    name = "vizwiz"
    title = "VizWiz"
    files = "the official `val.json` (images `VizWiz_val_*.jpg` in --image-folder), or lmms-eval's VizWiz-VQA parquet"
    prompt = ("`<question>` + `\\nWhen the provided information is insufficient, respond with 'Unanswerable'.` + "
              "`\\nAnswer the question using a single word or phrase.` (LLaVA-1.5 and lmms-eval)")
    metric = "vqa_accuracy"
    max_new_tokens = 16

    def from_release(self, path: Path):
        records = read_json(path)
        samples = []
        for i, record in enumerate(records if isinstance(records, list) else []):
            where = where_of(path, i)
            image = text_field(record, "image", where)
            samples.append(Sample(image, text_field(record, "question", where) + UNANSWERABLE + SHORT_ANSWER, [image],
                                  answers_field(record, "answers", where), record.get("answer_type") or "all"))
        return samples

    def from_table(self, rows, where):
        return [Sample(str(require_field(r, "question_id", where_of(where, i))),
                       text_field(r, "question", where_of(where, i)) + UNANSWERABLE + SHORT_ANSWER, [r.get("image")],
                       answers_field(r, "answers", where_of(where, i)), r.get("category") or "all")
                for i, r in enumerate(rows)]

    def sample_score(self, sample, answer):
        return vqa_accuracy(answer, sample.target), True
