"""Chat-completion requests: OpenAI's JSON body -> a checked `ChatRequest`, or a `RequestError` naming the field.

Everything a client can get wrong is caught here, before the request reaches the model: the error says which field
(`param`, in OpenAI's dotted form such as `messages[1].content[0].image_url.url`) and what it accepts.
"""

import json
import math
from dataclasses import dataclass, field

from .scheduler import Sampling

ROLES = ("system", "developer", "user", "assistant")  # "developer" is OpenAI's newer name for "system"
PART_TYPES = ("text", "image_url")
MAX_STOP_STRINGS = 4  # as OpenAI

# OpenAI fields this server does not implement: accepted only at their "off" value, so no request silently loses one.
UNSUPPORTED = {
    "tools": lambda v: not v, "functions": lambda v: not v, "tool_choice": lambda v: v in (None, "none"),
    "function_call": lambda v: v in (None, "none"), "logprobs": lambda v: not v, "top_logprobs": lambda v: not v,
    "logit_bias": lambda v: not v, "frequency_penalty": lambda v: not v, "presence_penalty": lambda v: not v,
    "response_format": lambda v: v is None or (isinstance(v, dict) and v.get("type") == "text"),
    "audio": lambda v: v is None, "modalities": lambda v: v in (None, ["text"]),
}


class RequestError(Exception):
    """A request the server refuses; `body()` is OpenAI's error object."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400,
                 type: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.type = message, param, code, status, type
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class ModelInfo:
    """What the served model accepts: its name, method and the per-request options its method takes."""

    name: str
    method: str
    processor_options: frozenset = frozenset()  # e.g. {"granularity"} (adaptive granularity), {"boxes"} (mg)
    visual_options: frozenset = frozenset()  # e.g. {"max_visual_tokens", "granularity_bias"} (adaptive granularity)
    levels: tuple = ()  # fixed granularities (tokens per crop), when the method has levels
    auto: bool = False  # whether granularity "auto" (a router) is available
    max_batch_size: int = 16
    max_images: int = 8
    default_max_tokens: int = 512

    @property
    def granularities(self) -> list:
        return (["auto"] if self.auto else []) + list(self.levels)


@dataclass
class ChatRequest:
    messages: list[dict]  # transformers' chat format; an image is a {"type": "image"} part
    images: list[tuple[str, str]]  # (url, param) in prompt order
    sampling: Sampling
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    processor_options: dict = field(default_factory=dict)
    visual_options: dict = field(default_factory=dict)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


def _type_name(value) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")


def parse_chat_request(raw: bytes, info: ModelInfo) -> ChatRequest:
    """The request body -> ChatRequest; raises RequestError (HTTP 400, or 404 for an unknown model)."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RequestError(f"the request body is not valid JSON: {error}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, got {_type_name(body)}", code="invalid_json")

    model = body.get("model")
    if not isinstance(model, str):
        raise RequestError(f"'model' must be a string (this server serves {info.name!r})", "model")
    if model != info.name:
        raise RequestError(f"the model {model!r} does not exist: this server serves {info.name!r}", "model",
                           "model_not_found", status=404)
    for name, is_off in UNSUPPORTED.items():
        if name in body and not is_off(body[name]):
            raise RequestError(f"'{name}' is not supported by this server", name, "unsupported_parameter")

    messages, images = parse_messages(body.get("messages"))
    if len(images) > info.max_images:
        raise RequestError(f"the request holds {len(images)} images; this server takes at most {info.max_images} "
                           "per request (--max-images)", images[info.max_images][1], "too_many_images")

    stream = _optional(body, "stream", bool, False, "a boolean")
    stream_options = _optional(body, "stream_options", dict, None, "an object")
    include_usage = False
    if stream_options is not None:
        if not stream:
            raise RequestError("'stream_options' is only allowed with 'stream': true", "stream_options")
        include_usage = _optional(stream_options, "include_usage", bool, False, "a boolean", "stream_options.")
    n = _optional(body, "n", int, 1, "an integer")
    if not 1 <= n <= info.max_batch_size:
        raise RequestError(f"'n' must be between 1 and {info.max_batch_size} (this server's batch size), got {n}",
                           "n")
    return ChatRequest(
        messages=messages, images=images, sampling=parse_sampling(body, info), n=n, stream=stream,
        include_usage=include_usage, **parse_method_options(body, info, len(images)),
    )


def _optional(body: dict, name: str, kind, default, described: str, prefix: str = ""):
    value = body.get(name)
    if value is None:
        return default
    ok = _is_int(value) if kind is int else isinstance(value, kind)
    if not ok:
        raise RequestError(f"'{prefix}{name}' must be {described}, got {_type_name(value)} {value!r:.40}",
                           prefix + name)
    return value


def parse_messages(messages) -> tuple[list[dict], list[tuple[str, str]]]:
    """OpenAI messages -> transformers' chat messages and the images' URLs in order."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty array of {role, content} objects", "messages")
    converted, images = [], []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise RequestError(f"{where} must be an object with 'role' and 'content', got {_type_name(message)}",
                               where)
        role = message.get("role")
        if role not in ROLES:
            raise RequestError(f"{where}.role {role!r} is not supported; allowed roles: {list(ROLES)}",
                               f"{where}.role")
        role = "system" if role == "developer" else role
        content = message.get("content")
        if isinstance(content, str):
            converted.append({"role": role, "content": [{"type": "text", "text": content}]})
            continue
        if not isinstance(content, list):
            raise RequestError(f"{where}.content must be a string or an array of content parts, got "
                               f"{_type_name(content)}", f"{where}.content")
        parts = []
        for j, part in enumerate(content):
            at = f"{where}.content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in PART_TYPES:
                raise RequestError(f"{at}.type {kind!r} is not supported; allowed content types: {list(PART_TYPES)}",
                                   f"{at}.type")
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise RequestError(f"{at}.text must be a string", f"{at}.text")
                parts.append({"type": "text", "text": part["text"]})
                continue
            if role != "user":
                raise RequestError(f"{at}: images are only allowed in user messages (this one is {role!r})", at)
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str) or not url:
                raise RequestError(f"{at}.image_url must be an object {{\"url\": \"data:image/...;base64,... | "
                                   "http(s)://... | a local path\"}", f"{at}.image_url")
            images.append((url, f"{at}.image_url.url"))
            parts.append({"type": "image"})
        converted.append({"role": role, "content": parts})
    return converted, images


def parse_sampling(body: dict, info: ModelInfo) -> Sampling:
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    if max_tokens is None:
        max_tokens = info.default_max_tokens
    elif not _is_int(max_tokens) or max_tokens < 1:
        raise RequestError(f"'{name}' must be a positive integer, got {max_tokens!r:.40}", name)
    temperature = body.get("temperature", 1.0)
    if temperature is None:
        temperature = 1.0
    if not _is_number(temperature) or not 0 <= temperature <= 2:
        raise RequestError(f"'temperature' must be a number between 0 and 2, got {temperature!r:.40}", "temperature")
    top_p = body.get("top_p", 1.0)
    if top_p is None:
        top_p = 1.0
    if not _is_number(top_p) or not 0 < top_p <= 1:
        raise RequestError(f"'top_p' must be a number in (0, 1], got {top_p!r:.40}", "top_p")
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise RequestError(f"'seed' must be an integer, got {seed!r:.40}", "seed")
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > MAX_STOP_STRINGS or not all(isinstance(s, str) and s for s in stop):
        raise RequestError(f"'stop' must be a non-empty string or an array of at most {MAX_STOP_STRINGS} non-empty "
                           "strings", "stop")
    return Sampling(max_tokens=max_tokens, temperature=float(temperature), top_p=float(top_p), stop=tuple(stop),
                    seed=seed)


def parse_method_options(body: dict, info: ModelInfo, n_images: int) -> dict:
    """The extra-body fields: `granularity`, `max_visual_tokens`, `granularity_bias` (adaptive granularity) and `boxes` (mg)."""
    processor_options, visual_options = {}, {}
    for name in ("granularity", "max_visual_tokens", "granularity_bias", "boxes"):
        value = body.get(name)
        if value is None:
            continue
        if name not in info.processor_options | info.visual_options:
            takes = sorted(info.processor_options | info.visual_options)
            raise RequestError(f"'{name}' does not apply to this model (method {info.method!r}; it takes "
                               f"{takes or 'no per-request visual options'})", name, "unsupported_parameter")
        if name == "granularity":
            allowed = info.granularities
            level = value if _is_int(value) else int(value) if isinstance(value, str) and value.isdigit() else value
            if level not in allowed:
                raise RequestError(f"'granularity' must be one of {allowed} ('auto' lets the router choose; a number "
                                   f"is visual tokens per crop), got {value!r:.40}", "granularity")
            processor_options["granularity"] = level
        elif name == "max_visual_tokens":
            if not _is_int(value) or value < 1:
                raise RequestError(f"'max_visual_tokens' must be a positive integer (a budget of visual tokens per "
                                   f"image for granularity 'auto'), got {value!r:.40}", "max_visual_tokens")
            visual_options[name] = value
        elif name == "granularity_bias":
            if not _is_number(value):
                raise RequestError(f"'granularity_bias' must be a finite number (nats per 1000 visual tokens; > 0 "
                                   f"favours coarser levels), got {value!r:.40}", "granularity_bias")
            visual_options[name] = float(value)
        else:
            processor_options["boxes"] = parse_boxes(value, n_images)
    if visual_options and processor_options.get("granularity", "auto") != "auto":
        name = sorted(visual_options)[0]
        raise RequestError(f"'{name}' only applies with granularity 'auto' (got granularity "
                           f"{processor_options['granularity']!r})", name)
    return {"processor_options": processor_options, "visual_options": visual_options}


def parse_boxes(value, n_images: int) -> list:
    """`boxes`: per image, a list of [x1, y1, x2, y2] in the image's pixels (or null); one image may give its list
    alone. Only JSON data: the server never reads a box file named by a client."""
    if n_images == 0:
        raise RequestError("'boxes' were given but the request holds no image", "boxes")
    if not isinstance(value, list):
        raise RequestError(f"'boxes' must be an array (per image, a list of [x1, y1, x2, y2]), got "
                           f"{_type_name(value)}", "boxes")

    def is_box(item):
        return isinstance(item, list) and len(item) == 4 and all(_is_number(x) for x in item)

    if value and all(is_box(item) for item in value):
        value = [value]  # one image's boxes
    if len(value) != n_images:
        raise RequestError(f"'boxes' has {len(value)} entries for {n_images} image(s): give one list per image",
                           "boxes")
    for i, entry in enumerate(value):
        if entry is not None and not (isinstance(entry, list) and all(is_box(item) for item in entry)):
            raise RequestError(f"boxes[{i}] must be a list of [x1, y1, x2, y2] numbers (or null)", f"boxes[{i}]")
    return value
