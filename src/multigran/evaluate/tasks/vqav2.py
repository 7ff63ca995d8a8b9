"""VQAv2 (val or a labelled split): VQA accuracy with EvalAI's answer processing."""

from pathlib import Path

from ..metrics.vqa import process_answer, vqa_accuracy
from ..sources import RecordError, answers_field, read_json, require_field, text_field
from .base import SHORT_ANSWER, PerSampleTask, Sample, where_of


class VQAv2(PerSampleTask):
    name = "vqav2"
    title = "VQAv2"
    files = ("the official `v2_OpenEnded_mscoco_<split>_questions.json` with `v2_mscoco_<split>_annotations.json` "
             "beside it (images `COCO_<split>_<image_id:012d>.jpg` in --image-folder), or lmms-eval's VQAv2 parquet")
    prompt = "`<question>` + `\\nAnswer the question using a single word or phrase.` (LLaVA-1.5 and lmms-eval)"
    metric = "vqa_accuracy"
    max_new_tokens = 16

    def from_release(self, path: Path):
        questions_file = path if path.is_file() else next(iter(sorted(path.glob("*questions.json"))), None)
        if questions_file is None:
            raise RecordError(f"{path}: no *questions.json file (VQAv2's release) in this folder")
        annotations_file = Path(str(questions_file).replace("OpenEnded_", "").replace("questions", "annotations"))
        if not annotations_file.is_file():
            raise RecordError(f"{questions_file}: its annotations file {annotations_file} is missing "
                              "(test splits are scored by EvalAI's server: use `--predictions` there)")
        released = read_json(questions_file)
        questions = require_field(released, "questions", str(questions_file))
        split = released.get("data_subtype", "val2014")
        annotations = {a["question_id"]: a for a in require_field(read_json(annotations_file), "annotations",
                                                                 str(annotations_file))}
        samples = []
        for index, question in enumerate(questions):
            where = where_of(questions_file, index)
            qid = require_field(question, "question_id", where)
            annotation = annotations.get(qid)
            if annotation is None:
                raise RecordError(f"{where}: question {qid} has no annotation in {annotations_file}")
            image = f"COCO_{split}_{int(require_field(question, 'image_id', where)):012d}.jpg"
            samples.append(Sample(str(qid), text_field(question, "question", where) + SHORT_ANSWER, [image],
                                  answers_field(annotation, "answers", where), annotation.get("answer_type", "all")))
        return samples

    def from_table(self, rows, where):
        return [Sample(str(require_field(row, "question_id", where_of(where, i))),
                       text_field(row, "question", where_of(where, i)) + SHORT_ANSWER, [row.get("image")],
                       answers_field(row, "answers", where_of(where, i)), row.get("answer_type") or "all")
                for i, row in enumerate(rows)]

    def sample_score(self, sample, answer):
        return vqa_accuracy(answer, sample.target), True

    def read_submission(self, value, where):
        """EvalAI's submission: [{"question_id", "answer"}] (what LLaVA's convert_vqav2_for_submission writes)."""
        if isinstance(value, list) and value and all(isinstance(v, dict) and "answer" in v for v in value):
            return {str(v["question_id"]): str(v["answer"]) for v in value}
        return None

    @staticmethod
    def submission_answer(text: str) -> str:
        return process_answer(text)
