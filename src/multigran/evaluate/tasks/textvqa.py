"""TextVQA (val): VQA accuracy with EvalAI's answer processing (llava/eval/eval_textvqa.py + m4c_evaluator.py)."""

from pathlib import Path

from ..metrics.vqa import vqa_accuracy
from ..sources import answers_field, read_json, require_field, text_field
from .base import SHORT_ANSWER, PerSampleTask, Sample, where_of


class TextVQA(PerSampleTask):
    name = "textvqa"
    title = "TextVQA"
    files = ("the official `TextVQA_0.5.1_val.json` (images `<image_id>.jpg` in --image-folder, e.g. "
             "`train_images/`), or lmms-eval's textvqa parquet")
    prompt = ("lmms-eval's: `<question>` + `\\nAnswer the question using a single word or phrase.` (no OCR tokens; "
              "`textvqa-ocr` is LLaVA-1.5's prompt with them)")
    metric = "vqa_accuracy"
    max_new_tokens = 16
    with_ocr = False

    def text(self, record, where):
        question = text_field(record, "question", where)
        if self.with_ocr:  # LLaVA-1.5's llava_textvqa_val_v051_ocr.jsonl: question, OCR line, instruction
            tokens = record.get("ocr_tokens") or []
            return f"{question}\nReference OCR token: {', '.join(map(str, tokens))}{SHORT_ANSWER}"
        return question + SHORT_ANSWER

    def from_release(self, path: Path):
        data = require_field(read_json(path), "data", str(path))
        return [Sample(str(require_field(r, "question_id", where_of(path, i))), self.text(r, where_of(path, i)),
                       [f"{require_field(r, 'image_id', where_of(path, i))}.jpg"],
                       answers_field(r, "answers", where_of(path, i)))
                for i, r in enumerate(data)]

    def from_table(self, rows, where):
        return [Sample(str(require_field(r, "question_id", where_of(where, i))), self.text(r, where_of(where, i)),
                       [r.get("image")], answers_field(r, "answers", where_of(where, i)))
                for i, r in enumerate(rows)]

    def sample_score(self, sample, answer):
        return vqa_accuracy(answer, sample.target), True


class TextVQAWithOCR(TextVQA):
    name = "textvqa-ocr"
    title = "TextVQA (OCR prompt)"
    prompt = ("LLaVA-1.5's: `<question>\\nReference OCR token: <tokens, comma-separated>` + "
              "`\\nAnswer the question using a single word or phrase.`")
    with_ocr = True
