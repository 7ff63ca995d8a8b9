"""Reading JSON (and JSONL) files given by users, with one clear error that names the file and where in it.

Every reader of user-supplied JSON goes through here: model directories' config files, training data, box files,
`--settings`. Undecodable UTF-8 is reported with its line, invalid JSON with its line and column, and nesting deeper
than MAX_JSON_DEPTH (no record format here nests beyond ~6 levels) is refused instead of ending in a RecursionError.
A UTF-8 byte-order mark is accepted (documented conversion). NaN/Infinity literals are refused where numbers must be
finite (`allow_nan=False`).
"""

import json
import os

MAX_JSON_DEPTH = 100


class JsonFileError(ValueError):
    """A JSON input that cannot be read; the message names the file (or option) and the line."""


def decode_utf8(data: bytes, where: str) -> str:
    """bytes -> str, naming the line of the first undecodable byte."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise JsonFileError(
            f"{where}: not UTF-8 text (byte 0x{data[error.start]:02x} at line {line}, offset {error.start}); "
            "save the file as UTF-8"
        ) from None


def _reject_constant(name):
    raise ValueError(f"{name} is not a number JSON allows here")


def _finite_float(text):
    value = float(text)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{text} is out of the range of finite numbers")
    return value


def check_depth(value, where: str, max_depth: int | None = MAX_JSON_DEPTH):
    """Refuses containers nested deeper than max_depth (iterative: never a RecursionError itself)."""
    if max_depth is None:  # the parser's own recursion bound is enough (large files such as tokenizer.json)
        return value
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, dict)):
            if depth > max_depth:
                raise JsonFileError(f"{where}: JSON nested more than {max_depth} levels deep")
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return value


def parse_json(text: str, where: str, max_depth: int | None = MAX_JSON_DEPTH, allow_nan: bool = True):
    """JSON text -> value; errors name `where`, the line and the column."""
    try:
        value = json.loads(text, **({} if allow_nan else {"parse_constant": _reject_constant,
                                                          "parse_float": _finite_float}))
    except json.JSONDecodeError as error:
        raise JsonFileError(f"{where}: not valid JSON (line {error.lineno}, column {error.colno}: {error.msg})") from None
    except RecursionError:
        depth = f"more than {max_depth} levels deep" if max_depth else "too deeply"
        raise JsonFileError(f"{where}: JSON nested {depth}") from None
    except ValueError as error:  # a NaN/Infinity literal with allow_nan=False
        raise JsonFileError(f"{where}: {error}") from None
    return check_depth(value, where, max_depth)


def read_text(path) -> str:
    """A user's text file -> str (UTF-8); a missing file or a folder is one clear error."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise JsonFileError(f"{path} is a directory, not a file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist")
    with open(path, "rb") as handle:
        return decode_utf8(handle.read(), path)


def read_json_file(path, max_depth: int | None = MAX_JSON_DEPTH, allow_nan: bool = True):
    """A JSON file -> value (errors name the file, line and column)."""
    return parse_json(read_text(path), os.fspath(path), max_depth, allow_nan)


def read_jsonl_lines(path):
    """A JSONL file -> [(line number, text or None, problem or None)] for its non-blank lines. Line numbers count
    '\\n' (as editors and `wc -l` do); a line that is not UTF-8 comes with text None and the problem, so a reader can
    skip that one record."""
    path = os.fspath(path)
    with open(path, "rb") as handle:
        data = handle.read()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    lines = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            lines.append((number, None, f"not UTF-8 text (byte 0x{raw[error.start]:02x} at column {error.start + 1})"))
            continue
        if text.strip():
            lines.append((number, text, None))
    return lines


__all__ = ["JsonFileError", "MAX_JSON_DEPTH", "check_depth", "decode_utf8", "parse_json", "read_json_file",
           "read_jsonl_lines", "read_text"]
