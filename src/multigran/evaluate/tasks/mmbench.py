"""MMBench (dev, English): circular evaluation (each question asked once per rotation of its options; right only if
every rotation is right), with MMBench's answer pre-fetch."""

from pathlib import Path

from ..metrics.choice import LETTERS, mmbench_letter
from ..sources import RecordError, read_tsv, require_field, text_field
from .base import OPTION_LETTER, Sample, Task, mean_percent, where_of


def _is_none(value) -> bool:
    """llava/eval/model_vqa_mmbench.py:33-42: None, NaN, 'nan' and 'none' mean "no hint" / "no option"."""
    return value is None or (isinstance(value, float) and value != value) or (
        isinstance(value, str) and value.strip().lower() in ("nan", "none", ""))


class MMBench(Task):
    name = "mmbench"
    title = "MMBench"
    files = ("the official TSV (`mmbench_dev_20230712.tsv`, images as base64), or lmms-eval's MMBench parquet "
             "(`en` dev)")
    prompt = ("llava/eval/model_vqa_mmbench.py: `<hint>\\n` (when present) + `<question>` + `\\nA. <option>` ... + "
              "`\\nAnswer with the option's letter from the given choices directly.`; circular: round r shows the "
              "options rotated r times under the same letters")
    metric = "circular_accuracy"
    max_new_tokens = 16
    circular = True

    def build(self, row, at):
        options = []
        for letter in "ABCD":
            if _is_none(row.get(letter)):
                break
            options.append(str(row[letter]))
        answer = text_field(row, "answer", at).strip()
        if answer not in LETTERS[:len(options)]:
            shown = ", ".join(LETTERS[:len(options)])
            raise RecordError(f"{at}: answer {answer!r} is not one of its options {shown}")
        question = text_field(row, "question", at)
        if not _is_none(row.get("hint")):
            question = f"{row['hint']}\n{question}"
        index = str(require_field(row, "index", at))
        chars = list(LETTERS[:len(options)])
        samples = []
        for round_index in range(len(options) if self.circular else 1):
            text = question + "".join(f"\n{LETTERS[i]}. {option}" for i, option in enumerate(options))
            shown = dict(zip(LETTERS, options))
            correct = LETTERS[chars.index(answer)]  # where the right option is shown this round
            samples.append(Sample(f"{index}#{round_index}", text + OPTION_LETTER, [row.get("image")],
                                  {"answer": correct, "choices": shown}, str(row.get("category") or "all"),
                                  {"index": index}))
            options, chars = options[1:] + options[:1], chars[1:] + chars[:1]  # rotate (model_vqa_mmbench.py:138)
        return samples

    def from_release(self, path: Path):
        if path.suffix != ".tsv":
            raise RecordError(f"{path}: task {self.name} reads MMBench's .tsv release or lmms-eval's parquet")
        return [s for i, row in enumerate(read_tsv(path)) for s in self.build(row, where_of(path, i))]

    def from_table(self, rows, where):
        return [s for i, row in enumerate(rows) for s in self.build(row, where_of(where, i))]

    def score(self, samples, answers):
        questions: dict[str, list[bool]] = {}
        categories: dict[str, str] = {}
        unparsed = 0
        for sample in samples:
            letter = mmbench_letter(answers.get(sample.question_id, ""), dict(sample.target["choices"]))
            unparsed += letter is None
            questions.setdefault(sample.info["index"], []).append(letter == sample.target["answer"])
            categories[sample.info["index"]] = sample.category
        passed = {index: all(flags) for index, flags in questions.items()}
        groups: dict[str, list[bool]] = {}
        for index, ok in passed.items():
            groups.setdefault(categories[index], []).append(ok)
        score = mean_percent(passed.values())
        return {"score": score, "metrics": {self.metric: score}, "unparsed": unparsed,
                "by_category": {c: mean_percent(v) for c, v in sorted(groups.items())}}


class MMBenchSingle(MMBench):
    name = "mmbench-single"
    title = "MMBench (single pass)"
    prompt = "as `mmbench`, one round (the options in their released order)"
    metric = "accuracy"
    circular = False
