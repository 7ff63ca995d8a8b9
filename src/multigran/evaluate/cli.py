"""`multigran eval`: a benchmark (`--task NAME`, scored by its official metric, resumable, shardable with torchrun /
accelerate launch), a predictions file scored without a model (`--predictions FILE`), or, without --task, a
LLaVA-format question file answered and scored by exact match (the original records mode)."""

import argparse
import json
import sys
from pathlib import Path

RUN_FILE = "run.json"


def int_at_least(minimum: int):
    def parse(text):
        try:
            value = int(text)
        except (TypeError, ValueError):
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value

    return parse


def granularity_list(text: str) -> list:
    """--granularity 36,144,auto -> [36, 144, "auto"] (each one a setting, run side by side)."""
    from ..cli import parse_granularity

    values = [part.strip() for part in text.split(",") if part.strip()]
    if not values:
        raise ValueError(f"--granularity {text!r}: expected 'auto' or visual tokens per crop, comma-separated")
    return [parse_granularity(value) for value in values]


def add_eval_arguments(parser):
    from .tasks import TASKS

    parser.add_argument("--task", help=f"a benchmark: {', '.join(TASKS)} (without it: a LLaVA-format record file, "
                        "exact match)")
    parser.add_argument("--data", required=True, help="the benchmark's released file or folder, or lmms-eval's "
                        "parquet export (see the README's table)")
    parser.add_argument("--image-folder", help="folder the records' image paths are relative to (default: the data "
                        "folder, or the data file's folder)")
    parser.add_argument("--model", help="a multigran model directory (not needed with --predictions)")
    parser.add_argument("--predictions", help="score this predictions file instead of running a model: LLaVA's "
                        "answer JSONL ({\"question_id\", \"text\"}) or the task's submission JSON")
    parser.add_argument("--granularity", help="'auto' or tokens per crop; several, comma-separated, run side by side "
                        "(e.g. 36,144,576,auto)")
    parser.add_argument("--max-visual-tokens", type=int_at_least(1), help="auto granularity: the token budget")
    parser.add_argument("--granularity-bias", type=float, help="auto granularity: cost in nats per 1000 tokens")
    parser.add_argument("--boxes", help="box file (method mg), joined by question id (records mode: by record id)")
    parser.add_argument("--box-format", default="square", choices=["square", "normalized"],
                        help="RefCOCO: the model's box convention (square: LLaVA-1.5's padded square; normalized: "
                        "the image's own [0, 1] frame, lmms-eval's)")
    parser.add_argument("--batch-size", type=int_at_least(1), default=8, help="prompts per generate call (>= 1)")
    parser.add_argument("--max-new-tokens", type=int_at_least(1), help="default: the task's (LLaVA's script's)")
    parser.add_argument("--latency-samples", type=int_at_least(0), default=8,
                        help="samples timed at batch size 1 for the prefill latency (0: none)")
    parser.add_argument("--limit", type=int_at_least(1), help="only the first N samples (>= 1)")
    parser.add_argument("--out", help="--task: output folder (predictions, results.json, results.md; an interrupted "
                        "run resumes there; default eval_out/<task>); records mode: the predictions JSONL")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def eval_command(args):
    if args.task is None:
        return records_command(args)
    from .tasks import get_task

    task = get_task(args.task, box_format=args.box_format)
    if args.model is None and args.predictions is None:
        raise ValueError("--task needs --model (to answer) or --predictions FILE (to score answers made elsewhere)")
    data = Path(args.data)
    samples = task.load(data)
    if args.limit:
        samples = samples[: args.limit]
    out = Path(args.out or Path("eval_out") / task.name)
    if args.predictions:
        from .results import read_predictions

        records = read_predictions(task, samples, args.predictions)
        settings = [setting_result(task, samples, records, "predictions", None, None)]
        return finish(task, data, out, settings, generation=None, example=None)
    return run_model(args, task, data, samples, out)


def processor_settings(args, task, method) -> list[tuple[str, dict]]:
    """(name, processor options) per setting: one per --granularity value, or the model's default."""
    base = {}
    if method == "uhd":
        from ..pipelines import uhd

        # the release's per-benchmark evaluation pre-resize (None: none, e.g. AI2D and MMBench)
        base["pre_resize_long_side"] = uhd.uhd_eval_pre_resize(task.name)
    if args.granularity is None:
        return [("default", base)]
    return [(f"granularity={g}", {**base, "granularity": g}) for g in granularity_list(args.granularity)]


def run_model(args, task, data, samples, out):
    from ..data.boxes import read_box_file
    from ..loading import load_model, load_processor
    from .engine import answer, barrier, distributed_context, measure_prefill, read_logs, shard

    processor = load_processor(args.model)
    rank, world_size, local_rank = distributed_context()
    device = args.device
    if world_size > 1 and device == "auto":
        import torch

        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    check_run(out, task, data, len(samples), args.model, rank)
    model = load_model(args.model, device, args.dtype)
    method = getattr(model.config, "method", None)
    settings = processor_settings(args, task, method)
    generate_options = {}
    if args.max_visual_tokens is not None:
        generate_options["max_visual_tokens"] = args.max_visual_tokens
    if args.granularity_bias is not None:
        generate_options["granularity_bias"] = args.granularity_bias
    boxes = read_box_file(args.boxes) if args.boxes else None
    image_folder = Path(args.image_folder) if args.image_folder else (data if data.is_dir() else data.parent)
    max_new_tokens = args.max_new_tokens or task.max_new_tokens
    from .engine import PredictionLog

    for name, options in settings:
        folder = out / "predictions" / name
        done = read_logs(folder)
        todo = [s for s in shard(samples, rank, world_size)
                if s.question_id not in done or "error" in done[s.question_id]]
        log = PredictionLog(folder / f"rank{rank}.jsonl")
        try:
            answer(model, processor, todo, log, image_folder=image_folder, processor_options=options,
                   generate_options=generate_options, boxes=boxes, batch_size=args.batch_size,
                   max_new_tokens=max_new_tokens, progress=not args.no_progress)
        finally:
            log.close()
        timing = folder / "prefill.json"
        if rank == 0 and args.latency_samples and not timing.exists():
            seconds = measure_prefill(model, processor, samples[: args.latency_samples + 1], image_folder=image_folder,
                                      processor_options=options, generate_options=generate_options, boxes=boxes)
            from .results import write_atomic

            write_atomic(timing, json.dumps({"prefill_seconds": seconds}) + "\n")
    barrier(world_size)
    if rank != 0:
        return None
    from .runner import build_prompt

    results = []
    for name, options in settings:
        folder = out / "predictions" / name
        timing = folder / "prefill.json"
        prefill = json.loads(timing.read_text())["prefill_seconds"] if timing.exists() else None
        results.append(setting_result(task, samples, read_logs(folder), name, options, prefill))
    generation = {"decoding": "greedy", "do_sample": False, "max_new_tokens": max_new_tokens,
                  "batch_size": args.batch_size, "padding": "left", "dtype": str(model.dtype).removeprefix("torch."),
                  "device": str(model.device), "processes": world_size, **generate_options}
    example = build_prompt(processor, samples[0].text, len(samples[0].images))
    return finish(task, data, out, results, generation, example)


def setting_result(task, samples, records, name, options, prefill) -> dict:
    from .engine import efficiency
    from .results import score_setting

    result = {"name": name, "processor_options": options}
    result.update(score_setting(task, samples, records))
    result["efficiency"] = efficiency(list(records.values()), prefill) if options is not None else None
    return result


def finish(task, data, out, settings, generation, example):
    from .results import render_table, write_results

    results = {"task": task.name, "title": task.title, "data": str(data), "metric": task.metric,
               "prompt_doc": task.prompt, "example_prompt": example, "generation": generation, "settings": settings}
    write_results(out, results)
    print(render_table(results))
    print(f"results: {out / 'results.json'}  table: {out / 'results.md'}", file=sys.stderr)
    return results


def check_run(out: Path, task, data: Path, n_samples: int, model, rank: int):
    """An output folder holds one run (task, data, samples, model): resuming into it with other inputs would mix
    answers, so it is refused."""
    from .results import write_atomic

    run = {"task": task.name, "data": str(data.resolve()), "samples": n_samples, "model": str(Path(model).resolve())}
    path = out / RUN_FILE
    if path.exists():
        from ..json_io import read_json_file

        previous = read_json_file(path)
        if previous != run:
            changed = ", ".join(k for k in run if previous.get(k) != run[k]) if isinstance(previous, dict) else "all"
            raise ValueError(f"{out} holds another run ({changed} differ: see {path}); choose another --out or "
                             "delete it")
    elif rank == 0:
        write_atomic(path, json.dumps(run, indent=2) + "\n")


def records_command(args):
    """The original mode: a LLaVA-format question file, greedy answers, exact match per question type."""
    from ..data.boxes import read_box_file
    from ..loading import load_model, load_processor
    from .results import write_atomic
    from .runner import evaluate_records, load_question_file

    if args.model is None:
        raise ValueError("eval without --task answers a LLaVA-format record file: it needs --model")
    if args.predictions is not None:
        raise ValueError("--predictions needs --task (the benchmark whose metric scores them)")
    processor = load_processor(args.model)
    records = load_question_file(args.data)
    if args.limit:
        records = records[: args.limit]
    model = load_model(args.model, args.device, args.dtype)
    granularities = granularity_list(args.granularity) if args.granularity else [None]
    if len(granularities) > 1:
        raise ValueError("records mode runs one --granularity; use --task for several side by side")
    options = {} if granularities[0] is None else {"granularity": granularities[0]}
    generate_options = {}
    if args.max_visual_tokens is not None:
        generate_options["max_visual_tokens"] = args.max_visual_tokens
    if args.granularity_bias is not None:
        generate_options["granularity_bias"] = args.granularity_bias
    boxes = read_box_file(args.boxes) if args.boxes else None
    result = evaluate_records(model, processor, records, args.image_folder or ".", where=args.data,
                              processor_options=options, generate_options=generate_options, boxes=boxes,
                              batch_size=args.batch_size, max_new_tokens=args.max_new_tokens or 8,
                              latency_samples=args.latency_samples, progress=not args.no_progress)
    if args.out:  # written whole and renamed: an interrupted run leaves the previous file intact
        write_atomic(args.out, "".join(json.dumps(entry) + "\n" for entry in result["predictions"]))
    print(json.dumps(result["summary"], indent=2))
    return result


__all__ = ["add_eval_arguments", "eval_command"]
