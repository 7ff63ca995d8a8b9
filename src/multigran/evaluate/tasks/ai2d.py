"""AI2D (test): lmms-eval's ai2d task (a leading "X." read as the letter, then exact match)."""

from pathlib import Path

from ..metrics.choice import ai2d_correct, ai2d_letter, letters, options_block
from ..sources import RecordError, read_json, require_field, text_field
from .base import OPTION_LETTER, PerSampleTask, Sample, where_of


class AI2D(PerSampleTask):
    name = "ai2d"
    title = "AI2D"
    files = ("lmms-eval's ai2d parquet, or the official release folder (`questions/<image>.json`, images in "
             "`images/` under --image-folder, default the folder itself)")
    prompt = ("`<question>\\nA. <option>\\nB. ...` + `\\nAnswer with the option's letter from the given choices "
              "directly.` (lmms-eval's ai2d, the `mcq` format)")
    metric = "accuracy"
    max_new_tokens = 16

    def build(self, qid, question, options, answer, image, at):
        if not isinstance(options, list) or not options:
            raise RecordError(f"{at}: options should be a non-empty list")
        try:
            answer = int(answer)
        except (TypeError, ValueError):
            raise RecordError(f"{at}: answer {answer!r} is not an option index") from None
        if not 0 <= answer < len(options):
            raise RecordError(f"{at}: answer {answer} is not an index into its {len(options)} options")
        return Sample(str(qid), f"{question}\n{options_block([str(o) for o in options])}{OPTION_LETTER}", [image],
                      {"answer": letters(len(options))[answer], "n": len(options)})

    def from_table(self, rows, where):
        return [self.build(row.get("id", i), text_field(row, "question", where_of(where, i)), row.get("options"),
                           require_field(row, "answer", where_of(where, i)), row.get("image"), where_of(where, i))
                for i, row in enumerate(rows)]

    def from_release(self, path: Path):
        folder = path / "questions" if (path / "questions").is_dir() else path
        samples = []
        for file in sorted(folder.glob("*.json")):
            data = read_json(file)
            image = f"images/{require_field(data, 'imageName', str(file))}"
            for text, q in require_field(data, "questions", str(file)).items():
                at = f"{file}: question {text[:40]!r}"
                samples.append(self.build(require_field(q, "questionId", at), text, q.get("answerTexts"),
                                          require_field(q, "correctAnswer", at), image, at))
        if not samples:
            raise RecordError(f"{path}: no AI2D question files (questions/*.json)")
        return samples

    def sample_score(self, sample, answer):
        return float(ai2d_correct(answer, sample.target["answer"])), ai2d_letter(answer, sample.target["n"]) is not None


