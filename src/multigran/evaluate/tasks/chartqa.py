"""ChartQA (test, human + augmented): relaxed accuracy (5 % numeric tolerance)."""

from pathlib import Path

from ..metrics.text import relaxed_correct
from ..sources import RecordError, read_json, text_field
from .base import PerSampleTask, Sample, where_of

SINGLE_WORD = "\nAnswer the question with a single word."


class ChartQA(PerSampleTask):
    name = "chartqa"
    title = "ChartQA"
    files = ("the official `test/` folder (`test_human.json`, `test_augmented.json`; images `png/<imgname>` under "
             "--image-folder, default that folder), one of those files, or lmms-eval's ChartQA parquet")
    prompt = "`<question>` + `\\nAnswer the question with a single word.` (lmms-eval's chartqa)"
    metric = "relaxed_accuracy"
    max_new_tokens = 16

    def from_release(self, path: Path):
        files = [path] if path.is_file() else sorted(path.glob("test_*.json"))
        if not files:
            raise RecordError(f"{path}: no test_human.json / test_augmented.json (ChartQA's release)")
        samples = []
        for file in files:
            split = file.stem.removeprefix("test_")
            records = read_json(file)
            for i, record in enumerate(records if isinstance(records, list) else []):
                at = where_of(file, i)
                image = text_field(record, "imgname", at)
                samples.append(Sample(f"{split}/{i}", text_field(record, "query", at) + SINGLE_WORD,
                                      [f"png/{image}"], text_field(record, "label", at), split))
        return samples

    def from_table(self, rows, where):
        return [Sample(f"{row.get('type', 'test')}/{i}", text_field(row, "question", where_of(where, i)) + SINGLE_WORD,
                       [row.get("image")], text_field(row, "answer", where_of(where, i)), row.get("type") or "all")
                for i, row in enumerate(rows)]

    def sample_score(self, sample, answer):
        return float(relaxed_correct(answer, sample.target)), True
