"""`multigran <command>`: the command-line interface.

Every command reports bad input as one line on stderr (`multigran: error: ...`) and exits non-zero
(set MULTIGRAN_DEBUG=1 for the full traceback).
"""

import argparse
import os
import sys

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
    """--granularity: "auto" or a positive number of tokens per crop (the model's levels are checked by its method)."""
    if value == "auto":
        return value
    try:
        tokens = int(value)
    except (TypeError, ValueError):
        tokens = 0
    if tokens < 1:
        raise ValueError(f"--granularity {value!r}: expected 'auto' or a positive number of visual tokens per crop "
                         "(one of the model's levels, e.g. 36, 144, 576)")
    return tokens


def parse_settings(text, option: str = "--settings") -> dict | None:
    """A JSON object option (method settings) -> dict; errors name the option and the column."""
    if text is None:
        return None
    from .json_io import parse_json

    value = parse_json(text, f"{option} {text[:60]!r}", allow_nan=False)
    if not isinstance(value, dict):
        raise ValueError(f"{option}: expected a JSON object such as '{{\"compat\": false}}', got {type(value).__name__}")
    return value


@command("generate", "answer prompts about images (several --prompt or a --requests JSONL), streaming to stdout")
def generate_command(args):
    from .generate_cli import generate_command as run_generate

    run_generate(args)


def add_generate_arguments(parser):
    from .generate_cli import add_generate_arguments as add

    add(parser)


@command("convert", "convert a released checkpoint into a multigran directory")
def convert_command(args):
    from . import convert
    from .convert.common import writing_directory

    from .loading import check_json_files

    if not os.path.exists(args.src):
        raise FileNotFoundError(f"source checkpoint {args.src} does not exist")
    for folder in (args.src, args.clip, args.llm_config, args.convnext):
        if folder and os.path.isdir(folder):
            check_json_files(folder)  # a broken config file is named here, before any converter reads it
    with writing_directory(args.dst) as dst:  # nothing appears at DST unless the conversion succeeds
        if args.source == "llava-next":
            convert.from_llava_next(args.src, dst)
        elif args.source == "avg-llava":
            convert.from_avg_llava(args.src, dst, clip_dir=args.clip)
        elif args.source == "uhd-v2":
            from .convert.uhd_v2 import from_uhd_v2

            from_uhd_v2(args.src, dst, jbu_ckpt=args.jbu, clip_dir=args.clip, separators=args.separators)
        elif args.source == "mg-llava":
            from .convert.mg_llava import from_mg_llava

            from_mg_llava(args.src, args.clip, args.convnext, dst, llm_config=args.llm_config)
    print(f"wrote {args.dst}")


def add_convert_arguments(parser):
    parser.add_argument("source", choices=["llava-next", "avg-llava", "uhd-v2", "mg-llava"],
                        help="format of the source checkpoint")
    parser.add_argument("src", help="source checkpoint directory")
    parser.add_argument("dst", help="output directory")
    parser.add_argument("--clip", help="avg-llava, uhd-v2: a Hugging Face CLIP directory (tower config/weights when "
                        "missing); mg-llava: required, the CLIP tower")
    parser.add_argument("--jbu", help="uhd-v2: the stage-0 JBU checkpoint (clip-large-jbu.ckpt), when SRC lacks the JBU")
    parser.add_argument("--separators", choices=["release", "tokenizer"], default="release",
                        help="uhd-v2: slice separators from the release's hard-coded Llama ids 29892/13 (what the "
                        "checkpoint was trained with, default) or from the tokenizer's own ',' and newline")
    parser.add_argument("--convnext", help="mg-llava: OpenCLIP convnext_large_d_320 weights (file or folder) or a Hugging "
                        "Face ConvNext directory")
    parser.add_argument("--llm-config", help="mg-llava: the base LLM's Hugging Face directory or config.json (config and "
                        "tokenizer; the .pth has none)")


@command("export", "write a multigran model in another library's native format (anyres -> transformers LLaVA-NeXT)")
def export_command(args):
    from .convert.common import writing_directory
    from .convert.export_llava_next import export_llava_next

    if not os.path.isdir(args.src):
        raise FileNotFoundError(f"model directory {args.src} does not exist")
    with writing_directory(args.dst) as dst:  # nothing appears at DST unless the export succeeds
        export_llava_next(args.src, dst)
    print(f"wrote {args.dst}")


def add_export_arguments(parser):
    parser.add_argument("format", choices=["llava-next"],
                        help="llava-next: a LlavaNextForConditionalGeneration checkpoint + processor (anyres models)")
    parser.add_argument("src", help="a multigran model directory")
    parser.add_argument("dst", help="output directory")


@command("init-tiny", "create a tiny random multigran checkpoint (for trying the tools without downloads)")
def init_tiny_command(args):
    from .convert.common import writing_directory
    from .pipelines import PIPELINES
    from .tiny import build_tiny

    if args.method not in PIPELINES:
        raise ValueError(f"--method {args.method!r}: expected one of {', '.join(sorted(PIPELINES))}")
    with writing_directory(args.dir) as out:
        build_tiny(out, method=args.method, seed=args.seed)
    print(f"wrote a tiny random '{args.method}' model to {args.dir}")


def add_init_tiny_arguments(parser):
    parser.add_argument("dir", help="output directory")
    parser.add_argument("--method", default="anyres")
    parser.add_argument("--seed", type=int, default=0)


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
                        help="comma-separated from anyres, avg, mg, uhd, mg+avg, uhd+avg (the composed models: the "
                             "method + AVG-LLaVA's adaptive-granularity layer; mg+avg runs whenever mg and avg do; "
                             "anyres, the base of the others, always runs)")
    parser.add_argument("--seed", type=int, default=0)


@command("init", "compose a new model from a Hugging Face vision tower and causal LM (the start of stage 1)")
def init_command(args):
    from .convert.common import writing_directory
    from .convert.compose import compose
    from .json_io import read_text

    fields = {}
    if args.feature_layer is not None:
        fields["vision_feature_layer"] = args.feature_layer
    settings = parse_settings(args.settings)
    template = read_text(args.chat_template) if args.chat_template else None
    with writing_directory(args.dir) as out:
        compose(out, args.method, args.vision, args.llm, settings, hires_dir=args.hires, chat_template=template,
                **fields)
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
    from .convert.common import writing_directory
    from .convert.method import switch_method

    settings = parse_settings(args.settings)
    with writing_directory(args.dst) as dst:
        report = switch_method(args.src, dst, args.to, settings)
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
    "export": add_export_arguments,
    "init-tiny": add_init_tiny_arguments,
    "detect": add_detect_arguments,
    "switch-method": add_switch_method_arguments,
    "init": add_init_arguments,
    "demo": add_demo_arguments,
}


from .evaluate.cli import add_eval_arguments, eval_command  # noqa: E402

COMMANDS["eval"] = (eval_command, "score a benchmark (official metrics, tokens and speed per granularity; resumable, "
                    "shardable), a predictions file, or a LLaVA-format record file")
ARGUMENTS["eval"] = add_eval_arguments

from .train.cli import add_merge_lora_arguments, add_train_arguments, merge_lora_command, train_command  # noqa: E402

COMMANDS["train"] = (train_command, "train one stage from a YAML recipe (Hugging Face Trainer: DDP, FSDP, DeepSpeed)")
COMMANDS["merge-lora"] = (merge_lora_command, "merge LoRA adapters into the base weights and save a plain model")
ARGUMENTS["train"] = add_train_arguments
ARGUMENTS["merge-lora"] = add_merge_lora_arguments

from .serve.cli import add_serve_arguments, serve_command  # noqa: E402  (FastAPI is imported when it runs)

COMMANDS["serve"] = (serve_command, "an OpenAI-compatible server with dynamic batching and a web page (FastAPI)")
ARGUMENTS["serve"] = add_serve_arguments


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its usage errors in our one-line form (`multigran: error: ...`, exit code 2)."""

    def error(self, message):
        command = self.prog.removeprefix("multigran").strip()
        print(f"multigran: error: {command + ': ' if command else ''}{message} (see `{self.prog} --help`)",
              file=sys.stderr)
        sys.exit(2)


def build_parser():
    from . import __version__

    parser = ArgumentParser(prog="multigran", description="Multi-granularity vision-language models.")
    parser.add_argument("--version", action="version", version=f"multigran {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (function, help_text) in COMMANDS.items():
        child = sub.add_parser(name, help=help_text, description=help_text)
        ARGUMENTS[name](child)
        child.set_defaults(function=function)
    return parser


def one_line(error: BaseException, limit: int = 2000) -> str:
    """An exception's message on one line (some libraries' messages span several)."""
    text = " ".join(str(error).split())
    if isinstance(error, KeyError) and len(error.args) == 1:
        text = f"no key {error.args[0]!r}"
    return text[:limit] + (" ..." if len(text) > limit else "")


# Errors that describe bad input (the library raises these with messages that name the culprit).
INPUT_ERRORS = (ValueError, TypeError, OSError, ImportError)


def main(argv=None):
    """Runs one command; returns the exit code (0 ok, 2 bad input, 1 an unexpected error, 130 interrupted)."""
    debug = bool(os.environ.get("MULTIGRAN_DEBUG"))
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit:  # --help, --version, usage errors (already printed in one line)
        return exit.code if isinstance(exit.code, int) else 2
    try:
        args.function(args)
    except INPUT_ERRORS as error:
        if debug:
            raise
        print(f"multigran: error: {one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("multigran: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # a backstop: every known bad input is reported at its source, in one line
        if debug:
            raise
        kind = "the input is nested too deeply" if isinstance(error, RecursionError) else type(error).__name__
        print(f"multigran: error: {kind}: {one_line(error)} (unexpected; set MULTIGRAN_DEBUG=1 for the traceback)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
