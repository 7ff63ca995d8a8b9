"""DocVQA (val): ANLS with threshold 0.5."""

from pathlib import Path

from ..metrics.text import anls
from ..sources import answers_field, read_json, require_field, text_field
from .base import SHORT_ANSWER, PerSampleTask, Sample, where_of


class DocVQA(PerSampleTask):
    name = "docvqa"
    title = "DocVQA"
    files = ("the official `val_v1.0.json` (its `image` paths, e.g. `documents/xxx.png`, under --image-folder, "
             "default the file's folder), or lmms-eval's DocVQA parquet (validation)")
    prompt = "`<question>` + `\\nAnswer the question using a single word or phrase.` (lmms-eval's docvqa)"
    metric = "anls"
    max_new_tokens = 32

    def from_release(self, path: Path):
        records = require_field(read_json(path), "data", str(path))
        return [Sample(str(require_field(r, "questionId", where_of(path, i))),
                       text_field(r, "question", where_of(path, i)) + SHORT_ANSWER,
                       [text_field(r, "image", where_of(path, i))], answers_field(r, "answers", where_of(path, i)))
                for i, r in enumerate(records)]

    def from_table(self, rows, where):
        return [Sample(str(require_field(r, "questionId", where_of(where, i))),
                       text_field(r, "question", where_of(where, i)) + SHORT_ANSWER, [r.get("image")],
                       answers_field(r, "answers", where_of(where, i)))
                for i, r in enumerate(rows)]

    def sample_score(self, sample, answer):
        return anls(answer, sample.target), True

    def read_submission(self, value, where):
        """The DocVQA server's submission: [{"questionId", "answer"}]."""
        if isinstance(value, list) and value and all(isinstance(v, dict) and "questionId" in v for v in value):
            return {str(v["questionId"]): str(v.get("answer", "")) for v in value}
        return None
