"""MMMU (validation): MMMU's answer parsing for multiple-choice and open questions, accuracy per subject."""

import ast

from ..metrics.choice import mmmu_letter, mmmu_open_correct, options_block
from ..sources import RecordError, require_field, text_field
from .base import PerSampleTask, Sample, where_of

MULTI_CHOICE = "Answer with the option's letter from the given choices directly."
OPEN = "Answer the question using a single word or phrase."


class MMMU(PerSampleTask):
    name = "mmmu"
    title = "MMMU"
    files = "the official MMMU parquet files (the release is itself parquet; lmms-eval's MMMU export is the same)"
    prompt = ("lmms-eval's mmmu_val: `<question>\\nA. <option>\\n...\\n\\nAnswer with the option's letter from the "
              "given choices directly.`; open questions `<question>\\n\\nAnswer the question using a single word or "
              "phrase.`; the question's images first, its `<image i>` marks left in the text")
    metric = "accuracy"
    max_new_tokens = 16

    def from_table(self, rows, where):
        samples = []
        for i, row in enumerate(rows):
            at = where_of(where, i)
            qid = text_field(row, "id", at)
            question = text_field(row, "question", at)
            kind = row.get("question_type", "multiple-choice")
            images = [row[f"image_{k}"] for k in range(1, 8) if row.get(f"image_{k}")]
            if kind == "multiple-choice":
                try:
                    options = ast.literal_eval(text_field(row, "options", at))  # the release stores a list's repr
                except (ValueError, SyntaxError):
                    raise RecordError(f"{at}: 'options' is not a list literal") from None
                if not isinstance(options, list) or not options:
                    raise RecordError(f"{at}: 'options' should be a non-empty list")
                text = f"{question}\n{options_block([str(o) for o in options])}\n\n{MULTI_CHOICE}"
            else:
                options, text = None, f"{question}\n\n{OPEN}"
            subject = qid.split("_")[1] if qid.count("_") >= 2 else "all"
            samples.append(Sample(qid, text, images, {"answer": require_field(row, "answer", at),
                                                      "options": options}, subject))
        return samples

    def sample_score(self, sample, answer):
        options = sample.target["options"]
        if options is None:
            return float(mmmu_open_correct(sample.target["answer"], answer)), True
        letter, parsed = mmmu_letter(answer, [str(o) for o in options], seed=sample.question_id)
        gold = sample.target["answer"]
        return float(letter in gold if isinstance(gold, list) else letter == gold), parsed
