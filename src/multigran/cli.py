"""`multigran <command>`: the command-line interface.

Every command reports bad input as one line on stderr (`multigran: error: ...`) and exits non-zero
(set MULTIGRAN_DEBUG=1 for the full traceback).
"""

import argparse
import json
import os
import sys

from .loading import load_model, load_processor

COMMANDS = {}


def command(name, help_text):
    def register(function):
        COMMANDS[name] = (function, help_text)
        return function

    return register


def build_prompt(processor, text: str, n_images: int) -> str:
    if processor.chat_template:
        content = [{"type": "image"}] * n_images + [{"type": "text", "text": text}]
        return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    return (processor.image_token + "\n") * n_images + text


def parse_granularity(value: str):
    return value if value == "auto" else int(value)


@command("generate", "answer a prompt about one or more images, streaming the answer to stdout")
def generate_command(args):
    from transformers import TextStreamer

    processor = load_processor(args.model)
    images = args.image or []
    prompt = build_prompt(processor, args.prompt, len(images))
    options = {}
    if args.granularity is not None:
        options["granularity"] = parse_granularity(args.granularity)
    if args.boxes is not None:
        from .pipelines.mg import read_box_argument

        options["boxes"] = read_box_argument(args.boxes, images)  # a box file's records are matched by image stem
    inputs = processor(images=images or None, text=prompt, **options)  # bad input fails before the model loads
    model = load_model(args.model, args.device, args.dtype)
    inputs = inputs.to(model.device)
    streamer = TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    method_options = {}
    if args.max_visual_tokens is not None:
        method_options["max_visual_tokens"] = args.max_visual_tokens
    if args.granularity_bias is not None:
        method_options["granularity_bias"] = args.granularity_bias
    output = model.generate(
        **inputs, **method_options, max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
        temperature=args.temperature if args.temperature > 0 else None, streamer=streamer,
        return_dict_in_generate=True,
    )
    report = getattr(output, "visual_report", None)
    if args.report and report:
        print(json.dumps(report), file=sys.stderr)


def add_generate_arguments(parser):
    parser.add_argument("--model", required=True, help="a multigran model directory")
    parser.add_argument("--image", action="append", help="image path (repeat for several images)")
    parser.add_argument("--prompt", required=True, help="the question or instruction")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy decoding")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--granularity", help="visual granularity: 'auto' (router) or tokens per crop (method avg)")
    parser.add_argument("--max-visual-tokens", type=int,
                        help="auto granularity: the most probable level whose visual tokens per image fit (method avg)")
    parser.add_argument("--granularity-bias", type=float,
                        help="auto granularity: cost in nats per 1000 visual tokens, > 0 favours coarser levels (avg)")
    parser.add_argument("--boxes", help="object boxes (method mg): a box-file path or a JSON list of [x1,y1,x2,y2]")
    parser.add_argument("--report", action="store_true", help="print the per-image visual report (JSON) to stderr")


@command("convert", "convert a released checkpoint into a multigran directory")
def convert_command(args):
    from . import convert

    if args.source == "llava-next":
        convert.from_llava_next(args.src, args.dst)
    elif args.source == "avg-llava":
        convert.from_avg_llava(args.src, args.dst, clip_dir=args.clip)
    elif args.source == "uhd-v2":
        from .convert.uhd_v2 import from_uhd_v2

        from_uhd_v2(args.src, args.dst, jbu_ckpt=args.jbu, clip_dir=args.clip)
    elif args.source == "mg-llava":
        from .convert.mg_llava import from_mg_llava

        from_mg_llava(args.src, args.clip, args.convnext, args.dst, llm_config=args.llm_config)
    print(f"wrote {args.dst}")


def add_convert_arguments(parser):
    parser.add_argument("source", choices=["llava-next", "avg-llava", "uhd-v2", "mg-llava"],
                        help="format of the source checkpoint")
    parser.add_argument("src", help="source checkpoint directory")
    parser.add_argument("dst", help="output directory")
    parser.add_argument("--clip", help="avg-llava, uhd-v2: a Hugging Face CLIP directory (tower config/weights when "
                        "missing); mg-llava: required, the CLIP tower")
    parser.add_argument("--jbu", help="uhd-v2: the stage-0 JBU checkpoint (clip-large-jbu.ckpt), when SRC lacks the JBU")
    parser.add_argument("--convnext", help="mg-llava: OpenCLIP convnext_large_d_320 weights (file or folder) or a Hugging "
                        "Face ConvNext directory")
    parser.add_argument("--llm-config", help="mg-llava: the base LLM's Hugging Face directory or config.json (config and "
                        "tokenizer; the .pth has none)")


@command("init-tiny", "create a tiny random multigran checkpoint (for trying the tools without downloads)")
def init_tiny_command(args):
    from .tiny import build_tiny

    build_tiny(args.dir, method=args.method, seed=args.seed)
    print(f"wrote a tiny random '{args.method}' model to {args.dir}")


def add_init_tiny_arguments(parser):
    parser.add_argument("dir", help="output directory")
    parser.add_argument("--method", default="anyres")
    parser.add_argument("--seed", type=int, default=0)


@command("eval", "answer a LLaVA-format question file and report accuracy, visual tokens and prefill latency")
def eval_command(args):
    from .data.boxes import read_box_file
    from .evaluate.runner import evaluate_records, load_question_file

    processor = load_processor(args.model)
    records = load_question_file(args.data)
    if args.limit:
        records = records[: args.limit]
    model = load_model(args.model, args.device, args.dtype)
    options = {} if args.granularity is None else {"granularity": parse_granularity(args.granularity)}
    generate_options = {}
    if args.max_visual_tokens is not None:
        generate_options["max_visual_tokens"] = args.max_visual_tokens
    if args.granularity_bias is not None:
        generate_options["granularity_bias"] = args.granularity_bias
    boxes = read_box_file(args.boxes) if args.boxes else None
    result = evaluate_records(model, processor, records, args.image_folder, where=args.data,
                              processor_options=options, generate_options=generate_options, boxes=boxes,
                              batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
    if args.out:
        with open(args.out, "w") as handle:
            for entry in result["predictions"]:
                handle.write(json.dumps(entry) + "\n")
    print(json.dumps(result["summary"], indent=2))


def add_eval_arguments(parser):
    parser.add_argument("--model", required=True, help="a multigran model directory")
    parser.add_argument("--data", required=True, help="LLaVA-format question file (.json list or .jsonl)")
    parser.add_argument("--image-folder", default=".", help="folder the records' image paths are relative to")
    parser.add_argument("--granularity", help="'auto' or tokens per crop (method avg)")
    parser.add_argument("--max-visual-tokens", type=int)
    parser.add_argument("--granularity-bias", type=float)
    parser.add_argument("--boxes", help="box file (method mg), joined by record id")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--limit", type=int, help="only the first N records")
    parser.add_argument("--out", help="write per-record predictions (JSONL) here")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])


@command("detect", "detect object boxes with OWLv2 and write an MG-LLaVA box file (resumable)")
def detect_command(args):
    from .detect import detect_command as run_detect

    run_detect(args)


def add_detect_arguments(parser):
    from .detect import add_detect_arguments as add

    add(parser)


@command("demo", "the built-in synthetic granularity benchmark: data, every training stage, evaluation, report")
def demo_command(args):
    from .demo import run_demo

    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    results = run_demo(args.out, quick=args.quick, methods=methods, seed=args.seed)
    print(f"report: {args.out}/report.md  results: {args.out}/results.json  ({results['seconds'] / 60:.1f} min)")
    for name, target in results.get("targets", {}).items():
        print(f"  {'met    ' if target['met'] else 'MISSED '} {name}: {target['value']:.1f} (wanted {target['target']})")


def add_demo_arguments(parser):
    parser.add_argument("--out", default="demo_out", help="output directory (an interrupted run resumes there)")
    parser.add_argument("--quick", action="store_true", help="a small run (well under 2 minutes) that checks the plumbing")
    parser.add_argument("--methods", default="anyres,avg",
                        help="comma-separated from anyres, avg, mg, uhd (anyres, the base of the others, always runs)")
    parser.add_argument("--seed", type=int, default=0)


@command("init", "compose a new model from a Hugging Face vision tower and causal LM (the start of stage 1)")
def init_command(args):
    from .convert.compose import compose

    fields = {}
    if args.feature_layer is not None:
        fields["vision_feature_layer"] = args.feature_layer
    compose(args.dir, args.method, args.vision, args.llm, json.loads(args.settings) if args.settings else None,
            hires_dir=args.hires, chat_template=args.chat_template and open(args.chat_template).read(), **fields)
    print(f"wrote a new '{args.method}' model to {args.dir}")


def add_init_arguments(parser):
    parser.add_argument("dir", help="output directory")
    parser.add_argument("--method", default="anyres", help="anyres, avg, mg or uhd")
    parser.add_argument("--vision", required=True, help="Hugging Face CLIP/SigLIP directory (e.g. clip-vit-large-patch14-336)")
    parser.add_argument("--llm", required=True, help="Hugging Face causal-LM directory with its tokenizer")
    parser.add_argument("--hires", help="mg: the high-res ConvNeXt (OpenCLIP weights or a Hugging Face ConvNext dir)")
    parser.add_argument("--settings", help="method_settings as JSON")
    parser.add_argument("--feature-layer", type=int, help="vision_feature_layer (default -2)")
    parser.add_argument("--chat-template", help="a Jinja chat-template file (default: the LLM tokenizer's)")


@command("switch-method", "re-use a checkpoint's weights under another method (e.g. anyres -> avg for AVG stage 3)")
def switch_method_command(args):
    from .convert.method import switch_method

    report = switch_method(args.src, args.dst, args.to, json.loads(args.settings) if args.settings else None)
    print(f"wrote {args.dst}: {len(report['new'])} new tensors ({args.to}'s own modules), "
          f"{len(report['dropped'])} dropped")


def add_switch_method_arguments(parser):
    parser.add_argument("src", help="a multigran model directory")
    parser.add_argument("dst", help="output directory")
    parser.add_argument("--to", required=True, help="the new method (anyres, avg, mg, uhd)")
    parser.add_argument("--settings", help="its method_settings as JSON, e.g. '{\"compat\": false}'")


ARGUMENTS = {
    "generate": add_generate_arguments,
    "convert": add_convert_arguments,
    "init-tiny": add_init_tiny_arguments,
    "eval": add_eval_arguments,
    "detect": add_detect_arguments,
    "switch-method": add_switch_method_arguments,
    "init": add_init_arguments,
    "demo": add_demo_arguments,
}


from .train.cli import add_merge_lora_arguments, add_train_arguments, merge_lora_command, train_command  # noqa: E402

COMMANDS["train"] = (train_command, "train one stage from a YAML recipe (Hugging Face Trainer: DDP, FSDP, DeepSpeed)")
COMMANDS["merge-lora"] = (merge_lora_command, "merge LoRA adapters into the base weights and save a plain model")
ARGUMENTS["train"] = add_train_arguments
ARGUMENTS["merge-lora"] = add_merge_lora_arguments


def build_parser():
    from . import __version__

    parser = argparse.ArgumentParser(prog="multigran", description="Multi-granularity vision-language models.")
    parser.add_argument("--version", action="version", version=f"multigran {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (function, help_text) in COMMANDS.items():
        child = sub.add_parser(name, help=help_text, description=help_text)
        ARGUMENTS[name](child)
        child.set_defaults(function=function)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.function(args)
    except (ValueError, TypeError, FileNotFoundError, OSError, ImportError) as error:
        if os.environ.get("MULTIGRAN_DEBUG"):
            raise
        print(f"multigran: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("multigran: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
