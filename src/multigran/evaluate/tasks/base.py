"""What every benchmark task provides: its samples (read from the released files or lmms-eval's export), the prompt
LLaVA's evaluation uses for it, and its official score."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..sources import RecordError, table_files

SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
OPTION_LETTER = "\nAnswer with the option's letter from the given choices directly."


@dataclass
class Sample:
    question_id: str      # unique within the task: the key of predictions files
    text: str             # the user turn after its images (question + the task's instruction)
    images: list          # image references, opened when the sample is answered (see sources.open_image)
    target: Any = None    # what the metric compares with
    category: str = "all"
    info: dict = field(default_factory=dict)


class Task:
    """A benchmark. Subclasses set the class attributes and implement from_release / from_table and score."""

    name = ""
    title = ""
    files = ""            # README: the data files --data accepts
    prompt = ""           # README: the prompt, as LLaVA's (or lmms-eval's) evaluation builds it
    metric = ""           # the name of the main score
    max_new_tokens = 16   # the generation budget of LLaVA's / lmms-eval's script

    def __init__(self, **options):
        self.options = options

    def load(self, data) -> list[Sample]:
        data = Path(data)
        if not data.exists():
            raise FileNotFoundError(f"--data {data} does not exist")
        if table_files(data):
            from ..sources import read_table

            samples = self.from_table(read_table(data), str(data))
        else:
            samples = self.from_release(data)
        seen = set()
        for sample in samples:
            if sample.question_id in seen:
                raise RecordError(f"{data}: question id {sample.question_id!r} appears twice")
            seen.add(sample.question_id)
        if not samples:
            raise RecordError(f"{data}: no {self.title or self.name} samples found")
        return samples

    def from_release(self, path: Path) -> list[Sample]:
        raise RecordError(f"{path}: task {self.name} reads {self.files}")

    def from_table(self, rows: list[dict], where: str) -> list[Sample]:
        raise RecordError(f"{where}: task {self.name} has no lmms-eval export reader; give {self.files}")

    def score(self, samples: list[Sample], answers: dict[str, str]) -> dict:
        """-> {"score": main score in %, "metrics": {...}, "by_category": {...}, "unparsed": n}."""
        raise NotImplementedError

    def read_submission(self, value, where: str) -> dict[str, str] | None:
        """The task's own submission format (parsed JSON) -> {question_id: answer}; None if not that format."""
        return None


class PerSampleTask(Task):
    """A task whose score is the mean of a per-sample score in [0, 1] (overall and per category)."""

    def sample_score(self, sample: Sample, answer: str) -> tuple[float, bool]:
        """-> (score in [0, 1], whether the answer could be read: False counts as an unparsed answer)."""
        raise NotImplementedError

    def score(self, samples, answers):
        values, unparsed = {}, 0
        for sample in samples:
            value, parsed = self.sample_score(sample, answers.get(sample.question_id, ""))
            values[sample.question_id] = value
            unparsed += not parsed
        return {"score": mean_percent(values.values()), "metrics": {self.metric: mean_percent(values.values())},
                "by_category": per_category(samples, values), "unparsed": unparsed}


def mean_percent(values) -> float | None:
    values = list(values)
    return 100.0 * sum(values) / len(values) if values else None


def per_category(samples, flags: dict[str, float]) -> dict:
    """Mean of per-sample scores (in %) per category, for categories with more than one member set."""
    groups: dict[str, list[float]] = {}
    for sample in samples:
        groups.setdefault(sample.category, []).append(flags[sample.question_id])
    return {name: mean_percent(values) for name, values in sorted(groups.items())} if len(groups) > 1 else {}


def where_of(path, index) -> str:
    return f"{path}: record {index}"


__all__ = ["OPTION_LETTER", "SHORT_ANSWER", "PerSampleTask", "Sample", "Task", "mean_percent", "per_category",
           "where_of"]
