"""LLaVA-format training data: JSON / JSONL files, image folders, YAML mixtures, MG box files; lazy loading.

Sources (`data.path` in a recipe; one or a list):
- `*.json`: a JSON list of records {"id", "image" (path relative to the image folder, or a list of them),
  "conversations": [{"from": "human"|"gpt"|"system", "value": "<image>\\n..."}, ...]}; text-only records omit "image".
- `*.jsonl`: one such record per line (a bad line is one bad record, reported with its line number).
- `*.yaml` / `*.yml`: a mixture, LLaVA-NeXT style:
      datasets:
        - json_path: a.json            # relative paths are relative to the YAML file's folder
          sampling_strategy: first:50%  # all | first:N | end:N | random:N, N a count or a percentage
          image_folder: images/a        # optional, overrides the dataset's image folder for this file
          box_file: a_boxes.json        # optional MG box file for this file
  `random` sampling is seeded (the dataset's seed and the file path), so every run and every rank sees the same records.
- a directory: an image folder (every image below it, sorted). Each image is one record with the turn "<image>"; a
  caption in a sibling text file of the same stem (`cat.png` + `cat.txt`) becomes the gpt answer (pretraining/captioning);
  without captions the records have no answer (for image-only stages such as UHD's stage 0).

Bad records. Cheap structural checks run at load time (JSON, record type, conversation roles and order, number of
`<image>` placeholders vs images, image files present, box record present); images are decoded in `__getitem__`,
where decode failures, over-long samples and failing image steps are caught. Every bad record is logged with its file,
record id and (JSONL) line number, then skipped or raised per `on_bad_record` ("skip" | "error"). A skipped record at
`__getitem__` time is replaced by the next valid index (deterministic: the same index always gives the same sample).
`dataset.bad_records` lists them and `dataset.bad_record_summary()` counts them by reason; with DataLoader workers, the
runtime ones are counted in the worker process that met them (and logged there).
A `.json` file that is not valid JSON is an error in both modes (no record of it can be trusted).
"""

import logging
import math
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from ..image_io import ImageLoadError, load_image
from ..json_io import JsonFileError, parse_json, read_json_file, read_jsonl_lines, read_text
from .templates import ConversationError, check_template_name, encode_conversation, normalize_conversation

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
ON_BAD_RECORD = ("skip", "error")


class BadRecordError(ValueError):
    """A bad training record under on_bad_record="error"; the message names the file, record id and line."""


@dataclass
class Source:
    """Where records come from: a file (or folder), its image folder and its box records."""

    path: str
    image_folder: str | None = None
    box_records: dict | None = None
    box_file: str | None = None


@dataclass
class Record:
    data: dict
    source: Source
    line: int | None = None  # 1-based line of a JSONL record
    index: int = 0  # position in its file

    @property
    def record_id(self):
        return self.data.get("id", f"#{self.index}") if isinstance(self.data, dict) else f"#{self.index}"

    def where(self) -> str:
        line = f", line {self.line}" if self.line is not None else ""
        return f"{self.source.path}{line}, record id {str(self.record_id)!r}"


@dataclass
class BadRecord:
    where: str
    reason: str
    stage: str  # "load" (structural check) or "getitem" (image decode, length, image step)


@dataclass
class BadRecordLog:
    """Reports bad records (logged, kept) and raises under on_bad_record="error"."""

    on_bad_record: str = "skip"
    records: list = field(default_factory=list)

    def __post_init__(self):
        if self.on_bad_record not in ON_BAD_RECORD:
            raise ValueError(f"on_bad_record must be one of {ON_BAD_RECORD}, got {self.on_bad_record!r}")

    def report(self, where: str, reason: str, stage: str):
        if self.on_bad_record == "error":
            raise BadRecordError(f"{where}: {reason} (set data.on_bad_record: skip to skip such records)")
        logger.warning("skipping bad record (%s): %s: %s", stage, where, reason)
        self.records.append(BadRecord(where, reason, stage))


# --- reading ------------------------------------------------------------------------------------------------------


def read_json_records(source: Source, log: BadRecordLog) -> list[Record]:
    """A .json list or a .jsonl file -> Records (bad JSONL lines reported with their line number and left out)."""
    path = source.path
    if path.endswith(".jsonl"):
        records = []
        for number, line, problem in read_jsonl_lines(path):
            if problem is None:
                try:
                    data = parse_json(line, f"{path}, line {number}")
                except JsonFileError as error:
                    problem = str(error).removeprefix(f"{path}, line {number}: ")
            if problem is not None:
                log.report(f"{path}, line {number}", problem, "load")
                continue
            records.append(Record(data, source, line=number, index=len(records)))
        return records
    data = read_json_file(path)
    if not isinstance(data, list):
        raise ValueError(f"{path}: a LLaVA data file holds a JSON list of records, got {type(data).__name__}")
    return [Record(item, source, index=index) for index, item in enumerate(data)]


def read_image_folder(source: Source, log: BadRecordLog | None = None) -> list[Record]:
    """Every image below the folder -> a record; a same-stem .txt file next to an image is its caption."""
    log = log or BadRecordLog()
    root = Path(source.path)
    records = []
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()):
        relative = path.relative_to(root).as_posix()
        turns = [{"from": "human", "value": "<image>"}]
        caption = path.with_suffix(".txt")
        if caption.is_file():
            try:
                turns.append({"from": "gpt", "value": read_text(caption).strip()})
            except JsonFileError as error:
                log.report(f"{root}, record id {relative!r}", f"caption {error}", "load")
                continue
        records.append(Record({"id": relative, "image": relative, "conversations": turns}, source, index=len(records)))
    if not records:
        raise ValueError(f"{root}: the image folder holds no image ({', '.join(IMAGE_EXTENSIONS)})")
    return records


def parse_sampling(strategy: str, total: int, where: str) -> tuple[str, int]:
    """"all" | "first:N" | "end:N" | "random:N" (N a count or "P%") -> (kind, count)."""
    strategy = str(strategy).strip()
    if strategy == "all":
        return "all", total
    kind, _, amount = strategy.partition(":")
    if kind not in ("first", "end", "random") or not amount:
        raise ValueError(f"{where}: sampling_strategy {strategy!r} is not all, first:N, end:N or random:N (N or N%)")
    try:
        if amount.endswith("%"):
            count = math.ceil(float(amount[:-1]) * total / 100)  # LLaVA-NeXT rounds up
        else:
            count = int(amount)
    except ValueError:
        raise ValueError(f"{where}: sampling_strategy {strategy!r}: {amount!r} is not a number or percentage") from None
    if count < 0:
        raise ValueError(f"{where}: sampling_strategy {strategy!r} asks for a negative number of records")
    return kind, min(count, total)


def sample_records(records: list, strategy: str, seed: int, where: str) -> list:
    kind, count = parse_sampling(strategy, len(records), where)
    if kind == "all":
        return records
    if kind == "first":
        return records[:count]
    if kind == "end":
        return records[len(records) - count:]
    rng = random.Random(f"{seed}:{where}")  # string seeds are stable across runs and processes
    return [records[i] for i in sorted(rng.sample(range(len(records)), count))]


def _load_box_file(path):
    from .boxes import read_box_file  # lazy: only MG data has box files

    return read_box_file(path)


def read_mixture(path: str, seed: int, image_folder, box_file, log: BadRecordLog) -> list[Record]:
    try:
        spec = yaml.safe_load(read_text(path))
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not valid YAML: {' '.join(str(error).split())}") from None
    except RecursionError:
        raise ValueError(f"{path}: YAML nested too deeply") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("datasets"), list) or not spec["datasets"]:
        raise ValueError(f"{path}: a data mixture is a YAML mapping with a non-empty 'datasets' list")
    folder = Path(path).parent
    records = []
    for index, entry in enumerate(spec["datasets"]):
        where = f"{path}, datasets[{index}]"
        if not isinstance(entry, dict) or "json_path" not in entry:
            raise ValueError(f"{where}: each dataset needs a 'json_path'")
        unknown = set(entry) - {"json_path", "sampling_strategy", "image_folder", "box_file"}
        if unknown:
            raise ValueError(f"{where}: unknown keys {sorted(map(str, unknown))}")
        for key in ("json_path", "sampling_strategy", "image_folder", "box_file"):
            if entry.get(key) is not None and not isinstance(entry[key], str):
                raise ValueError(f"{where}: {key} must be a string, got {type(entry[key]).__name__} ({entry[key]!r})")

        def resolve(value):
            return None if value is None else str(folder / value) if not os.path.isabs(value) else value

        source = make_source(
            resolve(entry["json_path"]), resolve(entry.get("image_folder")) or image_folder,
            resolve(entry.get("box_file")) or box_file,
        )
        file_records = read_json_records(source, log)
        records += sample_records(file_records, entry.get("sampling_strategy", "all"), seed, source.path)
    return records


def make_source(path, image_folder=None, box_file=None) -> Source:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"training data {path!r} does not exist (set data.path)")
    if box_file and not os.path.isfile(box_file):
        raise FileNotFoundError(f"box file {box_file!r} does not exist (set data.box_file to a box file written by "
                                "`multigran detect`)")
    boxes = _load_box_file(box_file) if box_file else None
    return Source(path, image_folder=image_folder, box_records=boxes, box_file=box_file)


def load_records(paths, image_folder=None, box_file=None, seed: int = 0, log: BadRecordLog | None = None):
    """One path or a list (JSON, JSONL, mixture YAML, image folder) -> raw Records (not yet checked)."""
    log = log or BadRecordLog()
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths) if isinstance(paths, (list, tuple)) else None
    if not paths:
        raise ValueError("no training data given (set data.path to a file, a list of files or an image folder)")
    if not all(isinstance(path, (str, os.PathLike)) for path in paths):
        raise ValueError(f"data.path must be a path or a list of paths, got {paths!r}")
    records = []
    for path in paths:
        path = os.fspath(path)
        if path.endswith((".yaml", ".yml")):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"data mixture {path!r} does not exist")
            records += read_mixture(path, seed, image_folder, box_file, log)
        elif os.path.isdir(path):
            records += read_image_folder(Source(path, image_folder=path, box_records=None), log)
        elif path.endswith((".json", ".jsonl")):
            records += read_json_records(make_source(path, image_folder, box_file), log)
        else:
            raise ValueError(f"training data {path!r}: expected a .json, .jsonl, .yaml mixture or an image folder")
    return records


# --- checks -------------------------------------------------------------------------------------------------------


def record_images(data: dict) -> list[str]:
    image = data.get("image")
    if image is None:
        return []
    images = [image] if isinstance(image, str) else image
    if not isinstance(images, list) or not all(isinstance(item, str) and item for item in images):
        raise ConversationError(f"field 'image' must be a path or a list of paths, got {_short(image)}")
    return images


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:limit]}{'...' if len(text) > limit else ''}"


def image_path(record: Record, name: str) -> str:
    folder = record.source.image_folder
    return name if folder is None or os.path.isabs(name) else os.path.join(folder, name)


def check_record(record: Record, image_token: str, require_answer: bool, check_files: bool = True):
    """Cheap structural checks of one record; raises ConversationError naming the problem."""
    data = record.data
    if not isinstance(data, dict):
        raise ConversationError(f"a record must be a JSON object, got {type(data).__name__}")
    if "conversations" not in data:
        raise ConversationError("the record has no field 'conversations'")
    if "id" in data and (isinstance(data["id"], bool) or not isinstance(data["id"], (str, int))):
        raise ConversationError(f"field 'id' must be a string or an integer, got {_short(data['id'])}")
    turns = normalize_conversation(data["conversations"], require_answer=require_answer)
    images = record_images(data)
    placeholders = sum(turn.text.count(image_token) for turn in turns)
    if placeholders != len(images):
        raise ConversationError(
            f"the conversation holds {placeholders} {image_token!r} placeholder(s) for {len(images)} image(s)"
        )
    if check_files:
        for name in images:
            path = image_path(record, name)
            if not os.path.isfile(path):
                raise ConversationError(f"image file {path!r} does not exist")
    if record.source.box_records is not None and str(data.get("id")) not in record.source.box_records:
        raise ConversationError(f"no box record with id {str(data.get('id'))!r} in {record.source.box_file}")


def approximate_length(data: dict) -> int:
    """Words of the conversation (LLaVA's cheap length for grouping); the image tokens are not known before decoding."""
    return sum(len(turn.get("value", turn.get("content", "")).split()) for turn in data["conversations"])


# --- the dataset --------------------------------------------------------------------------------------------------


class LlavaDataset(torch.utils.data.Dataset):
    """LLaVA-format records -> model inputs, images decoded lazily in `__getitem__`.

    Each item: {"input_ids": (T,), "labels": (T,), plus the method's image tensors for the item's images
    (`pixel_values`, `image_sizes`, ... as the processor's image step returns them, images on dim 0)}.

    Args:
        paths: one or a list of .json / .jsonl / mixture .yaml files / image folders (see the module docstring).
        processor: a MultiGranProcessor (its tokenizer must already hold the template's special tokens).
        template: conversation template name (see `multigran.data.templates`).
        image_folder: folder that image paths are relative to (per-file override in a mixture).
        box_file: MG box file joined by str(record id) (the record's boxes are passed to the image step).
        max_length: samples longer than this (text + visual tokens) are bad records (never truncated).
        on_bad_record: "skip" (report and skip) or "error" (raise with file, id and line).
        image_options: keyword options for the method's image step (e.g. {"granularity": 36}).
        seed: seed of `random:N` mixture sampling.
        require_answer: records must end with a gpt turn (False for image-only data).
    """

    def __init__(self, paths, processor, template: str = "vicuna_v1", image_folder=None, box_file=None,
                 max_length: int | None = None, on_bad_record: str = "skip", image_options: dict | None = None,
                 seed: int = 0, require_answer: bool = True):
        check_template_name(template)
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1):
            raise ValueError(f"data.max_length must be a positive int (tokens) or null, got {max_length!r}")
        if not isinstance(image_options or {}, dict):
            raise ValueError(f"data.image_options must be a mapping of the method's image options, got {image_options!r}")
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_token = processor.image_token
        self.template = template
        self.max_length = max_length
        self.image_options = dict(image_options or {})
        self.require_answer = require_answer
        self.log = BadRecordLog(on_bad_record)
        self.records = []
        for record in load_records(paths, image_folder, box_file, seed, self.log):
            try:
                check_record(record, self.image_token, require_answer)
            except ConversationError as error:
                self.log.report(record.where(), str(error), "load")
                continue
            self.records.append(record)
        self._failed: set[int] = set()
        check_options = getattr(processor.image_processor, "check_options", None)
        if check_options is not None:  # a wrong option would fail every sample: say so once, now
            with_boxes = any(r.source.box_records is not None for r in self.records)
            try:
                check_options({**self.image_options, **({"boxes": None} if with_boxes else {})})
            except ValueError as error:
                raise ValueError(f"data.image_options / box_file: {error}") from None
        if self.log.records:
            logger.warning("%s", self.bad_record_summary_text())
        if not self.records:
            raise ValueError(f"no valid training record in {paths!r} ({self.bad_record_summary_text()})")

    @property
    def on_bad_record(self) -> str:
        return self.log.on_bad_record

    @property
    def bad_records(self) -> list[BadRecord]:
        return self.log.records

    def bad_record_summary(self) -> dict:
        """{"total": n, "load": n, "getitem": n, "by_reason": {...}} of the records skipped so far."""
        reasons = Counter(record.reason.split(":")[0].split(" (")[0] for record in self.bad_records)
        stages = Counter(record.stage for record in self.bad_records)
        return {"total": len(self.bad_records), "load": stages["load"], "getitem": stages["getitem"],
                "by_reason": dict(reasons)}

    def bad_record_summary_text(self) -> str:
        summary = self.bad_record_summary()
        return (f"{summary['total']} bad record(s) skipped ({summary['load']} at load, {summary['getitem']} when "
                f"read){'' if not summary['total'] else ': see the warnings above'}")

    def __len__(self):
        return len(self.records)

    @property
    def modality_lengths(self) -> list[int]:
        """Approximate length per record, positive for records with images and negative for text-only ones (LLaVA's
        convention for `group_by_modality_length`)."""
        return [
            approximate_length(r.data) if r.data.get("image") is not None else -max(approximate_length(r.data), 1)
            for r in self.records
        ]

    def __getitem__(self, index: int) -> dict:
        for offset in range(len(self.records)):
            current = (index + offset) % len(self.records)
            if current in self._failed:
                continue
            try:
                return self.build_sample(self.records[current])
            except (ImageLoadError, ConversationError, OSError) as error:
                self._failed.add(current)
                self.log.report(self.records[current].where(), str(error), "getitem")
        raise ValueError(f"every record failed ({self.bad_record_summary_text()})")

    def build_sample(self, record: Record) -> dict:
        data = record.data
        images = [load_image(image_path(record, name)) for name in record_images(data)]
        sample, counts = {}, []
        if images:
            options = dict(self.image_options)
            if record.source.box_records is not None:
                # One box record per sample (MG); the method's image step takes one per image.
                options["boxes"] = [record.source.box_records[str(data["id"])]] * len(images)
                # MG's text_max_length rule needs the text length with one token per image (the release's len).
                options["text_length"] = len(encode_conversation(
                    data["conversations"], self.tokenizer, self.template, [1] * len(images), self.image_token, None,
                    self.require_answer,
                )[0])
            try:
                vision = dict(self.processor.image_processor.preprocess(images, **options))
            except ValueError as error:  # the image step rejects this input: a bad record, not a crash
                raise ConversationError(f"the image step failed: {error}") from None
            counts = list(vision.pop("image_token_counts"))
            sample.update(vision)
        input_ids, labels = encode_conversation(
            data["conversations"], self.tokenizer, self.template, counts, self.image_token, self.max_length,
            self.require_answer,
        )
        sample["input_ids"] = torch.tensor(input_ids, dtype=torch.long)
        sample["labels"] = torch.tensor(labels, dtype=torch.long)
        return sample


__all__ = [
    "LlavaDataset",
    "BadRecordError",
    "BadRecord",
    "load_records",
    "parse_sampling",
    "sample_records",
    "read_image_folder",
]
