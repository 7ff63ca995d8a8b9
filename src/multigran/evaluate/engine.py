"""Answering a benchmark's samples with a model: batched greedy generation, per-image visual-token reports, timing,
and an append-only predictions log per process that a later run resumes.

Sharded runs (`torchrun` / `accelerate launch`): process r of w answers samples r, r + w, r + 2w, ... into its own
log `rank<r>.jsonl`; every process skips what any log of the setting already holds, so a run resumed with another
number of processes loses nothing and answers nothing twice. Rank 0 merges the logs (a question answered twice keeps
its last answer) and scores them.
"""

import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from ..json_io import parse_json
from .runner import build_prompt
from .sources import RecordError, open_image


class PredictionLog:
    """One process's JSONL of answers: appended and flushed record by record; a line torn by a kill is dropped."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            data = self.path.read_bytes()
            if data and not data.endswith(b"\n"):  # the process died mid-line: keep the complete records only
                with open(self.path, "r+b") as handle:
                    handle.truncate(data.rfind(b"\n") + 1)
        self.handle = open(self.path, "a", encoding="utf-8")

    def append(self, record: dict):
        self.handle.write(json.dumps(record) + "\n")
        self.handle.flush()

    def close(self):
        self.handle.close()


def read_logs(folder: Path) -> dict[str, dict]:
    """Every rank's log of a setting -> {question_id: record}; the last answer of a question wins; records that
    failed (an unreadable image, ...) are kept only until an answer replaces them."""
    merged = {}
    for path in sorted(Path(folder).glob("rank*.jsonl")):
        data = path.read_bytes()
        lines = data.split(b"\n")
        if lines and lines[-1] and not data.endswith(b"\n"):
            lines = lines[:-1]  # a line still being written (or torn by a kill)
        for number, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            record = parse_json(raw.decode("utf-8", "replace"), f"{path}: line {number}")
            if not isinstance(record, dict) or "question_id" not in record:
                raise RecordError(f"{path}: line {number}: not a prediction record")
            previous = merged.get(record["question_id"])
            if previous is None or "error" not in record or "error" in previous:
                merged[record["question_id"]] = record
    return merged


def shard(samples, rank: int, world_size: int):
    return samples[rank::world_size]


def _count_new_tokens(generated: torch.Tensor, pad_id) -> list[int]:
    """Generated tokens per row (padding after an early end excluded)."""
    if pad_id is None:
        return [generated.shape[1]] * generated.shape[0]
    return (generated != pad_id).sum(dim=1).tolist()


def answer(model, processor, samples, log: PredictionLog, *, image_folder, processor_options=None,
           generate_options=None, boxes=None, batch_size=8, max_new_tokens=16, progress=True, warn=None):
    """Answers `samples` greedily in batches, appending one record per sample to `log`.

    A sample whose image cannot be read is logged with its error (and counted by the scorer); a batch the model
    rejects is retried sample by sample so one bad record fails alone."""
    from tqdm.auto import tqdm

    warn = warn or (lambda message: print(f"multigran: warning: {message}", file=sys.stderr))
    processor_options = dict(processor_options or {})
    generate_options = dict(generate_options or {})
    processor.tokenizer.padding_side = "left"
    pad_id = processor.tokenizer.pad_token_id
    batches = [samples[i:i + batch_size] for i in range(0, len(samples), batch_size)]
    for batch in tqdm(batches, desc="answer", disable=not progress, unit="batch"):
        ready = []
        for sample in batch:
            try:
                images = [open_image(ref, image_folder, f"sample {sample.question_id}") for ref in sample.images]
                ready.append((sample, images))
            except RecordError as error:
                warn(str(error))
                log.append({"question_id": sample.question_id, "text": "", "error": str(error)})
        groups = [ready] if ready else []
        while groups:
            group = groups.pop(0)
            try:
                records = _generate(model, processor, group, processor_options, generate_options, boxes,
                                    max_new_tokens, pad_id)
            except (ValueError, RuntimeError) as error:
                if len(group) > 1:
                    groups[:0] = [[item] for item in group]
                    continue
                message = f"sample {group[0][0].question_id}: {error}"
                warn(message)
                records = [{"question_id": group[0][0].question_id, "text": "", "error": message}]
            for record in records:
                log.append(record)


def _sample_options(processor_options, boxes, group):
    options = dict(processor_options)
    if boxes is not None:  # MG-LLaVA: one box record per image, joined by question id
        options["boxes"] = [boxes.get(sample.question_id) for sample, images in group for _ in images]
    return options


def _generate(model, processor, group, processor_options, generate_options, boxes, max_new_tokens, pad_id):
    images = [image for _, sample_images in group for image in sample_images]
    prompts = [build_prompt(processor, sample.text, len(sample_images)) for sample, sample_images in group]
    inputs = processor(images=images or None, text=prompts, **_sample_options(processor_options, boxes, group))
    inputs = inputs.to(model.device)
    start = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(**inputs, **generate_options, max_new_tokens=max_new_tokens, do_sample=False)
    _synchronize(model)
    seconds = time.perf_counter() - start
    generated = output[:, inputs["input_ids"].shape[1]:]
    texts = processor.batch_decode(generated, skip_special_tokens=True)
    counts = _count_new_tokens(generated, pad_id)
    report = list(getattr(model, "last_visual_report", None) or [])
    placeholders = (inputs["input_ids"] == processor.image_token_id).sum(dim=1).tolist()
    records, cursor = [], 0
    for row, ((sample, sample_images), text) in enumerate(zip(group, texts)):
        entries = report[cursor:cursor + len(sample_images)]
        cursor += len(sample_images)
        if len(entries) == len(sample_images):
            tokens = [int(e["visual_tokens"]) for e in entries]
            granularity = [e["granularity"] for e in entries if "granularity" in e]
        else:  # no report from this model: the prompt's placeholders, split evenly
            tokens = [placeholders[row] // max(1, len(sample_images))] * len(sample_images)
            granularity = []
        record = {"question_id": sample.question_id, "text": text.strip(), "visual_tokens": tokens,
                  "new_tokens": int(counts[row]), "seconds": seconds / len(group)}
        if granularity:
            record["granularity"] = granularity
        records.append(record)
    return records


def _synchronize(model):
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)


def measure_prefill(model, processor, samples, *, image_folder, processor_options=None, generate_options=None,
                    boxes=None) -> float | None:
    """Median seconds of one prompt's prefill at batch size 1 (image encoding, routing if any, the LM over the
    prompt, one token out), after one warm-up."""
    timings = []
    for index, sample in enumerate(samples):
        try:
            images = [open_image(ref, image_folder, f"sample {sample.question_id}") for ref in sample.images]
        except RecordError:
            continue
        options = _sample_options(processor_options or {}, boxes, [(sample, images)])
        inputs = processor(images=images or None, text=build_prompt(processor, sample.text, len(images)),
                           **options).to(model.device)
        with torch.inference_mode():
            start = time.perf_counter()
            model.generate(**inputs, **(generate_options or {}), max_new_tokens=1, do_sample=False)
            _synchronize(model)
        if index or len(samples) == 1:  # the first call warms up kernels and caches
            timings.append(time.perf_counter() - start)
    return statistics.median(timings) if timings else None


def efficiency(records, prefill_seconds=None) -> dict:
    """Mean visual tokens per image, the granularity distribution, tokens/s, prefill latency."""
    answered = [r for r in records if "error" not in r]
    per_image = [t for r in answered for t in r.get("visual_tokens", [])]
    distribution: dict[str, int] = {}
    for record in answered:
        for level in record.get("granularity", []):
            distribution[str(level)] = distribution.get(str(level), 0) + 1
    seconds = sum(r.get("seconds", 0.0) for r in answered)
    tokens = sum(r.get("new_tokens", 0) for r in answered)
    return {
        "mean_visual_tokens_per_image": statistics.mean(per_image) if per_image else None,
        "granularity_distribution": dict(sorted(distribution.items(), key=lambda kv: _level_key(kv[0]))),
        "prefill_seconds": prefill_seconds,
        "tokens_per_second": tokens / seconds if seconds > 0 else None,
        "mean_new_tokens": tokens / len(answered) if answered else None,
        "answer_seconds": seconds,
    }


def _level_key(level: str):
    return (0, int(level)) if level.lstrip("-").isdigit() else (1, level)


def distributed_context():
    """(rank, world size, local rank) from torchrun / accelerate's environment; joins the process group (gloo on
    CPU, NCCL on CUDA) when there is more than one process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world_size > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return rank, world_size, local_rank


def barrier(world_size: int):
    if world_size > 1:
        import torch.distributed as dist

        dist.barrier()


__all__ = ["PredictionLog", "answer", "barrier", "distributed_context", "efficiency", "measure_prefill",
           "read_logs", "shard"]
