"""MME: acc and acc+ per category, perception (10 categories, max 2000) and cognition (4, max 800) totals."""

from pathlib import Path

from ..metrics.yesno import MME_COGNITION, MME_PERCEPTION, mme_answer, mme_scores
from ..sources import RecordError, require_field, text_field
from .base import SHORT_ANSWER, Sample, Task, where_of

IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg")


class MME(Task):
    name = "mme"
    title = "MME"
    files = ("the official `MME_Benchmark_release_version/` folder (one folder per category: images with their "
             "question `.txt` beside them, or `images/` + `questions_answers_YN/`), or lmms-eval's MME parquet")
    prompt = ("`<question>` (it ends with `Please answer yes or no.`) + "
              "`\\nAnswer the question using a single word or phrase.` (LLaVA-1.5 and lmms-eval)")
    metric = "perception"
    max_new_tokens = 16

    def from_release(self, path: Path):
        if not path.is_dir():
            raise RecordError(f"{path}: task mme reads the MME_Benchmark_release_version folder")
        samples = []
        for category in MME_PERCEPTION + MME_COGNITION:
            folder = path / category
            if not folder.is_dir():
                continue
            questions = folder / "questions_answers_YN"
            images = folder / "images"
            text_folder, image_folder = (questions, images) if questions.is_dir() else (folder, folder)
            for text_file in sorted(text_folder.glob("*.txt")):
                image = next((image_folder / (text_file.stem + s) for s in IMAGE_SUFFIXES
                              if (image_folder / (text_file.stem + s)).is_file()), None)
                if image is None:
                    raise RecordError(f"{text_file}: no image {text_file.stem}.jpg/.png beside it")
                lines = [line for line in text_file.read_text(encoding="utf-8").splitlines() if line.strip()]
                for k, line in enumerate(lines):
                    question, tab, answer = line.rpartition("\t")
                    if not tab or answer.strip() not in ("Yes", "No"):
                        raise RecordError(f"{text_file}: line {k + 1}: expected 'question<TAB>Yes|No'")
                    key = f"{category}/{image.name}"
                    samples.append(Sample(f"{key}#{k}", question.strip() + SHORT_ANSWER, [str(image)],
                                          answer.strip(), category, {"image_key": key}))
        if not samples:
            raise RecordError(f"{path}: no MME category folders ({', '.join(MME_PERCEPTION[:3])}, ...) found")
        return samples

    def from_table(self, rows, where):
        samples, seen = [], {}
        for i, row in enumerate(rows):
            at = where_of(where, i)
            key = str(require_field(row, "question_id", at))  # "category/image.png", two questions each
            k = seen[key] = seen.get(key, -1) + 1
            samples.append(Sample(f"{key}#{k}", text_field(row, "question", at).strip() + SHORT_ANSWER,
                                  [row.get("image")], text_field(row, "answer", at).strip(),
                                  text_field(row, "category", at), {"image_key": key}))
        return samples

    def score(self, samples, answers):
        result = mme_scores((s.category, s.info["image_key"], answers.get(s.question_id, ""), s.target)
                            for s in samples)
        return {"score": result["perception"], "metrics": {"perception": result["perception"],
                                                             "cognition": result["cognition"]},
                "by_category": result["categories"],
                "unparsed": sum(mme_answer(answers.get(s.question_id, "")) == "other" for s in samples),
                "missing_categories": result["perception_missing"] + result["cognition_missing"]}
