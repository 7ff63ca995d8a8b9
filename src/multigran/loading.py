"""Loading saved multigran models and processors for the commands, the server and evaluation.

A model directory is checked before anything is trusted: its JSON files parse (errors name the file and line), its
config says `model_type: "multigran"`, its weight files are readable safetensors (a zero-byte, truncated or garbage
file is named) or plain-tensor `.bin` files (read with `torch.load(weights_only=True)`: a pickle carrying Python
objects is refused, never run), its chat template compiles, and its weights match the model exactly: missing,
unexpected and mis-shaped weights are refused with the keys (the first few and a count) and the file. transformers
would otherwise fill missing weights randomly and the model would answer garbage.
`allow_missing=True` (`--allow-missing-weights` in `multigran train`) loads a deliberately partial checkpoint: the
missing weights start from the model's initialisation and are logged; unexpected and mis-shaped ones stay errors.
"""

import logging
import pickle
import re
import warnings
from contextlib import contextmanager
from pathlib import Path

from .json_io import MAX_JSON_DEPTH, read_json_file

logger = logging.getLogger(__name__)

DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
DTYPES = ("auto", "float32", "bfloat16", "float16")
# JSON files a model directory may hold; each is checked (and named) before transformers reads it.
JSON_FILES = ("config.json", "generation_config.json", "processor_config.json", "preprocessor_config.json",
              "tokenizer_config.json", "tokenizer.json", "special_tokens_map.json", "chat_template.json",
              "model.safetensors.index.json", "pytorch_model.bin.index.json")
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json", "processor_config.json", "tokenizer_config.json")
PREVIEW = 5  # keys shown in a message before "... (N in all)"


class WeightsMismatchError(ValueError):
    """A model directory's weights do not fit its config; the message names the keys and the file."""


def resolve_device_dtype(device: str, dtype: str):
    """("auto"|"cpu"|"cuda[:N]", "auto"|dtype name) -> (device string, torch dtype). "auto": CUDA with bf16 if
    available, else the CPU in float32."""
    import torch

    if not isinstance(device, str) or not DEVICE_PATTERN.match(device):
        raise ValueError(f"--device {device!r} is not a device this tool runs on: use auto, cpu, cuda or cuda:N")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device} was asked for but CUDA is not available on this machine")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                             f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    return device, getattr(torch, dtype)


def check_model_dir(path):
    if not (Path(path) / "config.json").is_file():
        raise ValueError(f"{path} is not a model directory (no config.json); create one with `multigran init-tiny` "
                         "or `multigran convert`")


def check_json_files(path):
    """Every JSON file of the model directory parses (errors name the file, line and column)."""
    for name in JSON_FILES:
        if (Path(path) / name).is_file():  # a tokenizer's vocabulary is big and flat: the parser bounds its depth
            read_json_file(Path(path) / name, max_depth=None if name == "tokenizer.json" else MAX_JSON_DEPTH)


def read_model_config(path) -> dict:
    """config.json of a multigran model directory, checked: JSON, a mapping, model_type "multigran"."""
    check_model_dir(path)
    config_file = Path(path) / "config.json"
    data = read_json_file(config_file)
    if not isinstance(data, dict):
        raise ValueError(f"{config_file}: expected a JSON object, got {type(data).__name__}")
    if data.get("model_type") != "multigran":
        raise ValueError(
            f"{config_file}: model_type is {data.get('model_type')!r}, not 'multigran': this is not a multigran model "
            "(convert a released checkpoint with `multigran convert`)"
        )
    return data


def load_config(path):
    """The MultiGranConfig of a model directory; a bad field is one error naming config.json."""
    from .configuration import MultiGranConfig

    read_model_config(path)
    check_json_files(path)
    with _quiet_transformers():
        try:
            return MultiGranConfig.from_pretrained(path)
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise ValueError(f"{Path(path) / 'config.json'}: {type(error).__name__}: {error}") from None


def weight_files(path) -> list[Path]:
    """The weight files a model directory holds (safetensors preferred, as transformers does)."""
    path = Path(path)
    for index_name, pattern in (("model.safetensors.index.json", "*.safetensors"), ("pytorch_model.bin.index.json", "*.bin")):
        index = path / index_name
        if index.is_file():
            data = read_json_file(index)
            weight_map = data.get("weight_map") if isinstance(data, dict) else None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise ValueError(f"{index}: a weight index holds {{'weight_map': {{key: file name}}}}")
            files = [path / name for name in sorted(set(weight_map.values()))]
            absent = [f.name for f in files if not f.is_file()]
            if absent:
                raise ValueError(f"{index} lists weight files that are not there: {_preview(absent)}")
            return files
        files = sorted(path.glob(pattern))
        if files:
            return files
    raise ValueError(f"{path} holds no weights (no *.safetensors or pytorch_model.bin)")


def check_weight_files(path) -> dict[str, Path]:
    """Opens every safetensors file's header (cheap); returns checkpoint key -> file. A zero-byte, truncated or
    garbage file is one error naming it."""
    from safetensors import safe_open

    location = {}
    for file in weight_files(path):
        if file.suffix != ".safetensors":
            continue
        try:
            with safe_open(str(file), framework="pt") as handle:
                location.update({key: file for key in handle.keys()})
        except Exception as error:  # safetensors raises its own SafetensorError (and OSError for unreadable files)
            raise ValueError(f"{file}: not a valid safetensors file ({error}): the file is empty, truncated or "
                             "corrupt; copy or convert it again") from None
    return location


def _preview(items, limit: int = PREVIEW) -> str:
    items = sorted(items)
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def check_loading_info(info: dict, path, location: dict | None = None, allow_missing: bool = False):
    """transformers' loading info (`from_pretrained(..., output_loading_info=True)`) -> a WeightsMismatchError naming
    the missing, unexpected and mis-shaped keys and their files; missing keys are only logged with allow_missing."""
    location = location or {}
    files = sorted({str(f) for f in location.values()}) or [str(path)]

    def where(keys):
        found = sorted({str(location[k]) for k in keys if k in location})
        return ", ".join(found or files)

    missing = sorted(info.get("missing_keys") or ())
    unexpected = sorted(info.get("unexpected_keys") or ())
    mismatched = sorted(info.get("mismatched_keys") or ())
    problems = []
    if missing and not allow_missing:
        problems.append(f"{len(missing)} weight(s) the model needs are missing from {', '.join(files)}: "
                        f"{_preview(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected weight(s) in {where(unexpected)}: {_preview(unexpected)}")
    if mismatched:
        shapes = [f"{key} {tuple(saved)} vs model {tuple(wanted)}" for key, saved, wanted in mismatched]
        problems.append(f"{len(mismatched)} mis-shaped weight(s) in {where([m[0] for m in mismatched])}: "
                        f"{_preview(shapes)}")
    for message in info.get("error_msgs") or ():
        problems.append(str(message).splitlines()[0])
    if problems:
        hint = "" if allow_missing or not missing else " (load a deliberately partial checkpoint with allow_missing=True / --allow-missing-weights)"
        raise WeightsMismatchError(f"{path}: the weights do not match config.json: " + "; ".join(problems) + hint)
    if missing:
        logger.warning("%s: %d missing weight(s) start from their initialisation (allow_missing): %s", path,
                       len(missing), _preview(missing))


@contextmanager
def _quiet_transformers():
    """transformers prints a load report and progress bars to stderr; our errors say it in one line instead."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def from_pretrained_checked(path, allow_missing: bool, **kwargs):
    """AutoModelForImageTextToText.from_pretrained with every weight checked; returns the model."""
    from transformers import AutoModelForImageTextToText

    import multigran  # noqa: F401  (registers the Auto classes)

    load_config(path)
    with _quiet_transformers(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="torch._weights_only_unpickler")  # the error below says it
        try:
            # The model's from_pretrained checks every weight against config.json (keys, files, shapes).
            model = AutoModelForImageTextToText.from_pretrained(path, allow_missing=allow_missing, **kwargs)
        except pickle.UnpicklingError:
            raise ValueError(f"{_bin_files(path)}: not a plain tensor checkpoint: it holds pickled Python objects, "
                             "which are refused (never unpickled); convert the weights to safetensors") from None
        except (EOFError, RuntimeError, OSError) as error:
            if not _bin_files(path):
                raise
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ValueError(f"{_bin_files(path)}: not a readable PyTorch checkpoint ({first[:200]}); the file is "
                             "empty, truncated or corrupt") from None
    return model


def _bin_files(path) -> str:
    return ", ".join(str(f) for f in weight_files(path) if f.suffix == ".bin")


def check_model_weights(path, allow_missing: bool = False):
    """Checks a model directory (config, JSON files, weight files, every key and shape) without reading the weights
    (the model is built on the meta device): for commands that load the model later themselves (`train`)."""
    # use_kernels=False: transformers >= 5.25 kernelizes every loaded model by default, and refuses the meta device.
    from_pretrained_checked(path, allow_missing, device_map="meta", use_kernels=False)


def check_chat_template(processor, path):
    """A broken Jinja chat template is one error naming its file (instead of a Jinja traceback at the first prompt)."""
    template = getattr(processor, "chat_template", None)
    if not template:
        return
    import jinja2

    files = [name for name in CHAT_TEMPLATE_FILES if (Path(path) / name).is_file()]
    where = Path(path) / (files[0] if files else "chat_template.jinja")
    content = [{"type": "image"}, {"type": "text", "text": "Describe the image."}]
    try:
        processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    except (jinja2.TemplateError, TypeError, ValueError, KeyError, AttributeError, IndexError) as error:
        raise ValueError(f"{where}: the chat template is broken: {type(error).__name__}: {error}") from None


def load_processor(path):
    """The saved MultiGranProcessor of a model directory, every file checked (errors name the file)."""
    from transformers import AutoProcessor

    import multigran  # noqa: F401  (registers the Auto classes)

    read_model_config(path)
    check_json_files(path)
    with _quiet_transformers():
        try:
            processor = AutoProcessor.from_pretrained(path)
        except (OSError, ImportError):
            raise
        except Exception as error:  # tokenizers/transformers raise many kinds on a broken tokenizer or processor file
            first = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise ValueError(f"{path}: cannot load the processor ({type(error).__name__}: {first[:300]}); check "
                             "processor_config.json, tokenizer.json and tokenizer_config.json") from None
    check_chat_template(processor, path)
    return processor


def load_model(path, device="auto", dtype="auto", allow_missing: bool = False):
    """Loads a saved multigran model onto a device, in a dtype ("auto": bf16 on CUDA, fp32 on CPU), in eval mode.
    Refuses missing, unexpected and mis-shaped weights (see the module docstring); `allow_missing` loads a
    deliberately partial checkpoint."""
    device, torch_dtype = resolve_device_dtype(device, dtype)
    return from_pretrained_checked(path, allow_missing, dtype=torch_dtype).to(device).eval()


__all__ = ["WeightsMismatchError", "check_chat_template", "check_loading_info", "check_model_dir", "check_model_weights",
           "check_weight_files", "from_pretrained_checked", "load_config", "load_model", "load_processor", "read_model_config",
           "resolve_device_dtype"]
