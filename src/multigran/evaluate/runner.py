"""Evaluation on LLaVA-format question files: greedy answers, exact-match accuracy per question type, visual tokens
per image and prefill latency, for one visual setting (e.g. a fixed granularity or the router)."""

import re
import statistics
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..image_io import load_image

_PUNCTUATION = re.compile(r"[^\w\s]")


def normalize_answer(text: str) -> str:
    """Lower-case, punctuation removed, whitespace collapsed (LLaVA-style short-answer matching)."""
    return " ".join(_PUNCTUATION.sub(" ", text.lower()).split())


def exact_match(prediction: str, answer) -> bool:
    """The prediction matches the answer, or any of a list of reference answers."""
    answers = answer if isinstance(answer, list) else [answer]
    return any(normalize_answer(prediction) == normalize_answer(a) for a in answers)


def question_and_answer(record: dict, where: str) -> tuple[str, str | list[str] | None]:
    """A record's question (with its `<image>` placeholders if it has them) and its reference answer(s).

    Two formats: LLaVA training records (the first human and the first gpt turn of `conversations`) and LLaVA's
    evaluation question files (`{"question_id", "image", "text"}`, with an optional `answer` / `answers`: a string
    or a list of strings; without one the record is answered but not scored)."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: a record should be a JSON object, got {type(record).__name__}")
    name = record.get("id", record.get("question_id"))
    if "conversations" not in record and isinstance(record.get("text"), str):
        answer = record.get("answer", record.get("answers"))
        if answer is not None and not (isinstance(answer, str) or (
                isinstance(answer, list) and answer and all(isinstance(a, str) for a in answer))):
            raise ValueError(f"{where}: record {name!r}: 'answer' should be a string or a list of strings")
        return record["text"].strip(), (answer.strip() if isinstance(answer, str) else answer)
    turns = record.get("conversations")
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise ValueError(f"{where}: record {name!r} needs 'conversations' (a list of turns) or 'text'")
    human = next((t.get("value") for t in turns if t.get("from") == "human"), None)
    answer = next((t.get("value") for t in turns if t.get("from") == "gpt"), None)
    if not isinstance(human, str) or answer is None:
        raise ValueError(f"{where}: record {name!r} needs a human and a gpt turn")
    if isinstance(answer, list):
        if not answer or not all(isinstance(a, str) for a in answer):
            raise ValueError(f"{where}: record {name!r}: the gpt turn should be a string or a list of strings")
        return human.strip(), [a.strip() for a in answer]
    if not isinstance(answer, str):
        raise ValueError(f"{where}: record {name!r}: the gpt turn should be a string, got {type(answer).__name__}")
    return human.strip(), answer.strip()


def record_image(record: dict, image_folder: Path, where: str):
    """The record's image (`image`: a path relative to the image folder), or None for a text-only record (no
    `image`, null or ""). Any other value is one error naming the file, record and field (instead of a TypeError
    from joining a path with a number or a list)."""
    image = record.get("image")
    if image is None or image == "":
        return None
    if not isinstance(image, str):
        name = record.get("id", record.get("question_id"))
        raise ValueError(f"{where}: record {name!r}: 'image' should be a file name (a string), got "
                         f"{type(image).__name__} {str(image)[:50]}")
    return load_image(image_folder / image)


def build_prompt(processor, question: str, n_images: int) -> str:
    """The chat prompt of a human turn: its text as is when it places its `<image>` placeholders itself (as the
    training data did), else the images first."""
    if "<image>" in question or not n_images:
        content = question
    else:
        content = [{"type": "image"}] * n_images + [{"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def evaluate_records(model, processor, records, image_folder, *, where="records", processor_options=None,
                     generate_options=None, boxes=None, batch_size=16, max_new_tokens=8, latency_samples=16,
                     progress=True) -> dict:
    """Answers every record greedily; returns {"predictions": [...], "summary": {...}}.

    processor_options: method options of the processor (e.g. {"granularity": 144}); generate_options: of generate
    (e.g. {"granularity_bias": 0.5}); boxes: {str(id): box record} for MG-LLaVA (passed as the `boxes` option).
    Prefill latency is timed separately at batch size 1 on the first `latency_samples` records.
    """
    processor_options = dict(processor_options or {})
    generate_options = dict(generate_options or {})
    image_folder = Path(image_folder)
    processor.tokenizer.padding_side = "left"
    device = model.device
    predictions = []
    batches = [records[i:i + batch_size] for i in range(0, len(records), batch_size)]
    for batch in tqdm(batches, desc="evaluate", disable=not progress, unit="batch"):
        questions, answers, images = [], [], []
        for record in batch:
            question, answer = question_and_answer(record, where)
            questions.append(question)
            answers.append(answer)
            images.append(record_image(record, image_folder, where))
        options = dict(processor_options)
        if boxes is not None:  # one entry per image
            options["boxes"] = [boxes.get(str(r.get("id", r.get("question_id")))) for r, image in zip(batch, images)
                                if image is not None]
        prompts = [build_prompt(processor, q, int(image is not None)) for q, image in zip(questions, images)]
        inputs = processor(images=[im for im in images if im is not None] or None, text=prompts, **options)
        inputs = inputs.to(device)
        with torch.inference_mode():
            output = model.generate(**inputs, **generate_options, max_new_tokens=max_new_tokens, do_sample=False)
        report = getattr(model, "last_visual_report", None) or []
        texts = processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        placeholder = (inputs["input_ids"] == processor.image_token_id).sum(dim=1).tolist()
        image_index = 0
        for row, (record, answer, text) in enumerate(zip(batch, answers, texts)):
            entry = {"id": record.get("id", record.get("question_id")),
                     "question_type": record.get("question_type", record.get("category", "all")),
                     "answer": answer, "prediction": text.strip(),
                     "correct": None if answer is None else exact_match(text, answer)}
            if "question_subtype" in record:
                entry["question_subtype"] = record["question_subtype"]
            if images[row] is not None:
                info = report[image_index] if image_index < len(report) else {"visual_tokens": placeholder[row]}
                entry["visual_tokens"] = info["visual_tokens"]
                if "granularity" in info:
                    entry["granularity"] = info["granularity"]
                image_index += 1
            predictions.append(entry)
    latency = measure_prefill(model, processor, records[:latency_samples], image_folder, processor_options,
                              generate_options, boxes)
    return {"predictions": predictions, "summary": summarize(predictions, latency)}


def measure_prefill(model, processor, records, image_folder, processor_options, generate_options, boxes):
    """Seconds of one prompt's prefill (batch 1): image encoding, routing if any, and the LM over the prompt."""
    seconds = []
    for record in records:
        question, _ = question_and_answer(record, "records")
        image = record_image(record, image_folder, "records")
        options = dict(processor_options)
        if boxes is not None and image is not None:
            options["boxes"] = [boxes.get(str(record.get("id", record.get("question_id"))))]
        inputs = processor(images=image, text=build_prompt(processor, question, int(image is not None)),
                           **options).to(model.device)
        with torch.inference_mode():
            start = time.perf_counter()
            model.generate(**inputs, **generate_options, max_new_tokens=1, do_sample=False)
            if model.device.type == "cuda":
                torch.cuda.synchronize(model.device)
            seconds.append(time.perf_counter() - start)
    return statistics.median(seconds) if seconds else None


def summarize(predictions, prefill_seconds=None) -> dict:
    """Accuracy overall and per question type, mean visual tokens, the granularity distribution per type."""
    def accuracy(items):
        items = [p for p in items if p.get("correct") is not None]  # records without an answer are not scored
        return 100.0 * sum(p["correct"] for p in items) / len(items) if items else None

    types = sorted({p["question_type"] for p in predictions})
    with_tokens = [p["visual_tokens"] for p in predictions if "visual_tokens" in p]
    summary = {
        "samples": len(predictions),
        "accuracy": accuracy(predictions),
        "accuracy_by_type": {t: accuracy([p for p in predictions if p["question_type"] == t]) for t in types},
        "mean_visual_tokens": statistics.mean(with_tokens) if with_tokens else 0.0,
        "prefill_seconds": prefill_seconds,
    }
    subtypes = sorted({p["question_subtype"] for p in predictions if "question_subtype" in p})
    if subtypes:
        summary["accuracy_by_subtype"] = {
            s: accuracy([p for p in predictions if p.get("question_subtype") == s]) for s in subtypes
        }
    if any("granularity" in p for p in predictions):
        summary["granularity_by_type"] = {
            t: _counts([p["granularity"] for p in predictions if p["question_type"] == t and "granularity" in p])
            for t in types
        }
    return summary


def _counts(values) -> dict:
    out = {}
    for value in values:
        out[str(value)] = out.get(str(value), 0) + 1
    return dict(sorted(out.items(), key=lambda item: int(item[0])))


def load_question_file(path) -> list[dict]:
    """A LLaVA-format JSON list or JSONL file of records, with errors naming the file and line (nesting depth
    bounded: a RecursionError never escapes)."""
    from ..json_io import parse_json, read_json_file, read_jsonl_lines

    path = Path(path)
    if path.suffix == ".jsonl":
        records = []
        for number, text, problem in read_jsonl_lines(path):
            if problem:
                raise ValueError(f"{path}: line {number}: {problem}")
            records.append(parse_json(text, f"{path}: line {number}"))
    else:
        records = read_json_file(path)
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of records")
    return records
