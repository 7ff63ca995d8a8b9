"""ScienceQA-IMG (test questions with an image): LLaVA's answer parsing (llava/eval/eval_science_qa.py)."""

from pathlib import Path

from ..metrics.choice import letters, options_block, scienceqa_letter
from ..sources import RecordError, read_json, require_field, text_field
from .base import OPTION_LETTER, PerSampleTask, Sample, where_of


class ScienceQAImg(PerSampleTask):
    name = "scienceqa-img"
    title = "ScienceQA-IMG"
    files = ("the official folder with `problems.json` and `pid_splits.json` (images `test/<pid>/image.png` under "
             "--image-folder, default the folder itself), or lmms-eval's ScienceQA-IMG parquet")
    prompt = ("`Context: <hint>\\n` (when there is one) + `<question>\\nA. <choice>\\nB. ...` + "
              "`\\nAnswer with the option's letter from the given choices directly.` (LLaVA-1.5's "
              "llava_test_CQM-A.json and lmms-eval's scienceqa_img)")
    metric = "accuracy"
    max_new_tokens = 16

    def build(self, qid, record, image, at):
        choices = require_field(record, "choices", at)
        if not isinstance(choices, list) or not choices:
            raise RecordError(f"{at}: 'choices' should be a non-empty list")
        answer = require_field(record, "answer", at)
        if not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise RecordError(f"{at}: answer {answer!r} is not an index into its {len(choices)} choices")
        letters(len(choices))
        hint = record.get("hint") or ""
        context = f"Context: {hint}\n" if hint else ""
        text = f"{context}{text_field(record, 'question', at)}\n{options_block([str(c) for c in choices])}"
        return Sample(str(qid), text + OPTION_LETTER, [image], {"answer": answer, "n": len(choices)},
                      str(record.get("subject") or "all"))

    def from_release(self, path: Path):
        folder = path if path.is_dir() else path.parent
        problems = read_json(folder / "problems.json")
        split = read_json(folder / "pid_splits.json")
        test_ids = require_field(split, "test", str(folder / "pid_splits.json"))
        samples = []
        for pid in test_ids:
            record = problems.get(pid) if isinstance(problems, dict) else None
            at = f"{folder / 'problems.json'}: problem {pid}"
            if record is None:
                raise RecordError(f"{at}: listed in pid_splits.json but missing")
            if record.get("image"):  # the IMG subset
                samples.append(self.build(pid, record, f"test/{pid}/{record['image']}", at))
        return samples

    def from_table(self, rows, where):
        samples = []
        for i, row in enumerate(rows):
            if row.get("image") is None:
                continue
            samples.append(self.build(row.get("id", i), row, row["image"], where_of(where, i)))
        return samples

    def sample_score(self, sample, answer):
        letter = scienceqa_letter(answer, sample.target["n"])
        return float(letter is not None and "ABCDE".index(letter) == sample.target["answer"]), letter is not None
