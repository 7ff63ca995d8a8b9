"""`multigran generate`: answer one or more prompts about images with the usual Hugging Face decoding options.

Each `--prompt` is one request about the `--image`s given (its answer streams to stdout, then a newline); a
`--requests FILE.jsonl` holds one request per line (`{"prompt": ..., "images": [...], "system": ..., "boxes": ...,
"granularity": ..., "id": ...}`) and gives one JSON line per request (`{"id", "answer", "visual_report"}`).
The model loads once for all requests. Every option is checked where it enters, with its allowed range in the error.
"""

import argparse
import json
import math
import sys

from .loading import DEVICE_PATTERN, DTYPES, load_model, load_processor, resolve_device_dtype

REQUEST_KEYS = {"id", "prompt", "images", "image", "system", "boxes", "granularity"}


# --- option types: each names the allowed range when a value is outside it -------------------------------------------


def number(text: str, kind=float):
    try:
        value = kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def ranged(kind, low=None, high=None, low_open=False, range_text=""):
    def parse(text):
        value = number(text, kind)
        below = low is not None and (value <= low if low_open else value < low)
        if below or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{text} is outside its range: {range_text}")
        return value

    return parse


temperature_type = ranged(float, 0.0, range_text="a finite number >= 0 (0 = greedy decoding)")
top_p_type = ranged(float, 0.0, 1.0, low_open=True, range_text="0 < top-p <= 1 (1 = off)")
top_k_type = ranged(int, 0, range_text="an integer >= 0 (0 = off)")
beams_type = ranged(int, 1, range_text="an integer >= 1 (1 = no beam search)")
new_tokens_type = ranged(int, 1, 1 << 20, range_text="an integer from 1 to 1048576")
repetition_penalty_type = ranged(float, 0.0, low_open=True, range_text="a finite number > 0 (1 = off, > 1 penalises)")
visual_tokens_type = ranged(int, 1, range_text="an integer >= 1")
bias_type = ranged(float, range_text="a finite number")
seed_type = ranged(int, 0, (1 << 63) - 1, range_text="an integer from 0 to 2^63 - 1")


def device_type(text: str) -> str:
    if not DEVICE_PATTERN.match(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: use cpu, cuda, cuda:N or auto")
    return text  # whether CUDA (or device N) exists is checked when the model loads


def add_generate_arguments(parser):
    parser.add_argument("--model", required=True, help="a multigran model directory")
    parser.add_argument("--image", action="append",
                        help="image path, http(s) URL or data URI (repeat for several images; used by every --prompt)")
    parser.add_argument("--prompt", action="append",
                        help="the question or instruction (repeat for several requests about the same images)")
    parser.add_argument("--requests", metavar="FILE.jsonl",
                        help="one request per line: {\"prompt\": ..., \"images\": [...], optional \"system\", "
                             "\"boxes\", \"granularity\", \"id\"}; prints one JSON line per request")
    parser.add_argument("--system", help="a system prompt (for every request without its own)")
    parser.add_argument("--max-new-tokens", type=new_tokens_type, default=128, help="default 128")
    parser.add_argument("--temperature", type=temperature_type, default=0.0,
                        help="sampling temperature >= 0; 0 (default) = greedy decoding (or beam search with --num-beams)")
    parser.add_argument("--top-p", type=top_p_type, help="nucleus sampling: 0 < p <= 1 (with --temperature > 0)")
    parser.add_argument("--top-k", type=top_k_type, help="sample from the k most likely tokens; 0 = off "
                        "(with --temperature > 0)")
    parser.add_argument("--seed", type=seed_type, help="random seed, for reproducible sampling")
    parser.add_argument("--num-beams", type=beams_type, default=1,
                        help="beam search with this many beams (>= 1; answers are printed when complete, not streamed)")
    parser.add_argument("--repetition-penalty", type=repetition_penalty_type,
                        help="> 0; 1 = off, > 1 discourages repeating tokens")
    parser.add_argument("--device", type=device_type, default="auto",
                        help="cpu, cuda, cuda:N or auto (default: cuda if available)")
    parser.add_argument("--dtype", default="auto", choices=list(DTYPES))
    parser.add_argument("--granularity", help="visual granularity: 'auto' (router) or tokens per grid (models with adaptive granularity: avg, "
                        "mg / uhd with the layer)")
    parser.add_argument("--max-visual-tokens", type=visual_tokens_type,
                        help="auto granularity: the most probable level whose visual tokens per image fit")
    parser.add_argument("--granularity-bias", type=bias_type,
                        help="auto granularity: cost in nats per 1000 visual tokens, > 0 favours coarser levels")
    parser.add_argument("--boxes", help="object boxes (method mg): a box-file path or a JSON list of [x1,y1,x2,y2]")
    parser.add_argument("--report", action="store_true",
                        help="print each request's per-image visual report (JSON: visual tokens, granularity, ...) to "
                             "stderr")


# --- requests ----------------------------------------------------------------------------------------------------


def read_requests(path) -> list[dict]:
    """A JSONL request file -> requests; errors name the file, line and key."""
    requests = []
    try:
        handle = open(path, encoding="utf-8")
    except OSError as error:
        raise ValueError(f"--requests {path}: cannot be read ({error.strerror or error})") from None
    with handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"--requests {path}, line {line_number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
            unknown = sorted(set(record) - REQUEST_KEYS)
            if unknown:
                raise ValueError(f"{where}: unknown key(s) {unknown} (allowed: {sorted(REQUEST_KEYS)})")
            if not isinstance(record.get("prompt"), str) or not record["prompt"].strip():
                raise ValueError(f"{where}: \"prompt\" must be a non-empty string")
            images = record.get("images", record.get("image", []))
            images = [images] if isinstance(images, str) else images
            if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
                raise ValueError(f"{where}: \"images\" must be a list of image paths, URLs or data URIs")
            if "system" in record and not isinstance(record["system"], str):
                raise ValueError(f"{where}: \"system\" must be a string")
            requests.append({"id": record.get("id", line_number), "prompt": record["prompt"], "images": images,
                             "system": record.get("system"), "boxes": record.get("boxes"),
                             "granularity": record.get("granularity"), "where": where})
    if not requests:
        raise ValueError(f"--requests {path}: holds no request")
    return requests


def build_messages_prompt(processor, text: str, n_images: int, system: str | None) -> str:
    """The chat-template prompt of one request (images first, as LLaVA), or a plain one without a template."""
    if processor.chat_template:
        messages = [{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []
        content = [{"type": "image"}] * n_images + [{"type": "text", "text": text}]
        messages.append({"role": "user", "content": content})
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    return (system + "\n" if system else "") + (processor.image_token + "\n") * n_images + text


def decoding_options(args) -> dict:
    """The transformers `generate` keywords of the command-line options."""
    sampling = args.temperature > 0
    if not sampling and (args.top_p is not None or args.top_k is not None):
        raise ValueError("--top-p and --top-k apply to sampling: give --temperature > 0 too")
    options = {"max_new_tokens": args.max_new_tokens, "do_sample": sampling, "num_beams": args.num_beams}
    if sampling:
        options["temperature"] = args.temperature
        if args.top_p is not None:
            options["top_p"] = args.top_p
        if args.top_k is not None:
            options["top_k"] = args.top_k
    if args.repetition_penalty is not None:
        options["repetition_penalty"] = args.repetition_penalty
    if args.max_visual_tokens is not None:
        options["max_visual_tokens"] = args.max_visual_tokens
    if args.granularity_bias is not None:
        options["granularity_bias"] = args.granularity_bias
    return options


def prepare(processor, args, request) -> dict:
    """Processor inputs of one request (bad input fails here, before the model loads)."""
    from .cli import parse_granularity

    images = request["images"]
    options = {}
    granularity = request.get("granularity") or args.granularity
    if granularity is not None:
        options["granularity"] = parse_granularity(str(granularity))
    boxes = request.get("boxes") if request.get("boxes") is not None else args.boxes
    if boxes is not None:
        from .pipelines.mg import read_box_argument

        # a box file's records are matched by image stem; a JSON list gives the boxes themselves
        options["boxes"] = read_box_argument(boxes if isinstance(boxes, str) else json.dumps(boxes), images)
    prompt = build_messages_prompt(processor, request["prompt"], len(images), request.get("system") or args.system)
    try:
        return processor(images=images or None, text=prompt, **options)
    except ValueError as error:
        where = request.get("where")
        raise ValueError(f"{where}: {error}" if where else str(error)) from None


def generate_command(args):
    import torch
    from transformers import TextStreamer

    if (args.prompt is None) == (args.requests is None):
        raise ValueError("give the question with --prompt (repeatable) or a --requests FILE.jsonl, not both")
    resolve_device_dtype(args.device, args.dtype)
    processor = load_processor(args.model)
    if args.requests is not None:
        if args.image:
            raise ValueError("--image applies to --prompt; with --requests each line names its own \"images\"")
        requests = read_requests(args.requests)
    else:
        for index, text in enumerate(args.prompt):
            if not text.strip():
                raise ValueError(f"--prompt number {index + 1} is empty")
        requests = [{"id": i + 1, "prompt": p, "images": list(args.image or [])} for i, p in enumerate(args.prompt)]
    options = decoding_options(args)
    inputs = [prepare(processor, args, request) for request in requests]
    model = load_model(args.model, args.device, args.dtype)
    as_jsonl = args.requests is not None
    for request, batch in zip(requests, inputs):
        if args.seed is not None:
            torch.manual_seed(args.seed)  # each request draws as if run alone
        stream = not as_jsonl and args.num_beams == 1
        streamer = TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
        batch = batch.to(model.device)
        output = model.generate(**batch, **options, streamer=streamer, return_dict_in_generate=True)
        answer_ids = output.sequences[0, batch["input_ids"].shape[1]:]
        answer = processor.decode(answer_ids, skip_special_tokens=True)
        report = getattr(output, "visual_report", None)
        if as_jsonl:
            print(json.dumps({"id": request["id"], "answer": answer, "visual_report": report}), flush=True)
        elif not stream:
            print(answer, flush=True)
        elif len(requests) > 1:
            print(flush=True)  # TextStreamer ends each answer with a newline; a blank line separates requests
        if args.report and report is not None:
            print(json.dumps(report), file=sys.stderr, flush=True)


__all__ = ["add_generate_arguments", "generate_command", "read_requests", "decoding_options"]
