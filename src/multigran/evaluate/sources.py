"""Reading benchmark files from local disk: JSON / JSONL / TSV releases and lmms-eval's Hugging Face exports
(parquet files, or a `datasets.save_to_disk` folder of arrow files), with errors that name the file and the record.
"""

import base64
import csv
import io
from pathlib import Path

from ..json_io import JsonFileError, parse_json, read_json_file, read_jsonl_lines

TABLE_SUFFIXES = (".parquet", ".arrow")


class RecordError(ValueError):
    """A benchmark record that cannot be used; the message names the file and the record."""


def read_json(path):
    return read_json_file(path)


def read_jsonl(path) -> list[tuple[int, dict]]:
    """(line number, record) for every non-blank line; a bad line is an error naming the file and line."""
    records = []
    for number, text, problem in read_jsonl_lines(path):
        where = f"{path}: line {number}"
        if problem:
            raise RecordError(f"{where}: {problem}")
        value = parse_json(text, where)
        if not isinstance(value, dict):
            raise RecordError(f"{where}: expected a JSON object, got {type(value).__name__}")
        records.append((number, value))
    return records


def read_json_or_jsonl(path):
    """A .jsonl file -> list of records; a .json file -> its value."""
    path = Path(path)
    return [record for _, record in read_jsonl(path)] if path.suffix == ".jsonl" else read_json(path)


def table_files(path) -> list[Path]:
    """The parquet / arrow files of an lmms-eval export: the file itself, or every one under the folder (sorted)."""
    path = Path(path)
    if path.is_file():
        return [path] if path.suffix in TABLE_SUFFIXES else []
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.suffix in TABLE_SUFFIXES and p.is_file())
    return []


def read_table(path) -> list[dict]:
    """Rows of parquet / arrow files as dicts (images stay as their {"bytes", "path"} structs until opened)."""
    from ..extras import require

    require("pyarrow", "eval")
    import pyarrow
    import pyarrow.ipc
    import pyarrow.parquet as parquet

    rows = []
    for file in table_files(path):
        try:
            if file.suffix == ".parquet":
                table = parquet.read_table(file)
            else:
                with pyarrow.memory_map(str(file)) as source:
                    try:
                        table = pyarrow.ipc.open_stream(source).read_all()  # datasets.save_to_disk
                    except pyarrow.ArrowInvalid:
                        table = pyarrow.ipc.open_file(source).read_all()
        except (pyarrow.ArrowException, OSError) as error:
            raise RecordError(f"{file}: not a readable {file.suffix[1:]} table ({error})") from None
        rows.extend(table.to_pylist())
    if not rows and not table_files(path):
        raise RecordError(f"{path}: no .parquet or .arrow files found")
    return rows


def read_tsv(path) -> list[dict]:
    """A TSV with a header row (MMBench's release: images as base64 in the `image` column)."""
    csv.field_size_limit(1 << 30)
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def open_image(reference, image_folder, where: str):
    """A sample's image -> RGB PIL image: a path (relative to image_folder), an HF image struct {"bytes", "path"},
    raw bytes, base64 text (MMBench TSV) or a PIL image."""
    from PIL import Image

    from ..image_io import load_image

    try:
        if isinstance(reference, dict):
            if reference.get("bytes"):
                return load_image(Image.open(io.BytesIO(reference["bytes"])))
            reference = reference.get("path")
            if not reference:
                raise ValueError("the image struct has neither bytes nor a path")
        if isinstance(reference, bytes):
            return load_image(Image.open(io.BytesIO(reference)))
        if isinstance(reference, str) and not reference.startswith(("data:", "http://", "https://")):
            path = Path(image_folder or ".") / reference
            if path.is_file() or len(reference) < 256:
                if not path.is_file():
                    raise FileNotFoundError(f"image file {path} does not exist")
                return load_image(path)
            return load_image(Image.open(io.BytesIO(base64.b64decode(reference))))
        return load_image(reference)
    except (OSError, ValueError) as error:
        raise RecordError(f"{where}: {error}") from None


def require_field(record: dict, key: str, where: str):
    if not isinstance(record, dict):
        raise RecordError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if key not in record or record[key] is None:
        raise RecordError(f"{where}: missing field {key!r}")
    return record[key]


def text_field(record: dict, key: str, where: str) -> str:
    value = require_field(record, key, where)
    if not isinstance(value, str):
        raise RecordError(f"{where}: field {key!r} should be a string, got {type(value).__name__}")
    return value


def answers_field(record: dict, key: str, where: str) -> list[str]:
    """A list of reference answers: strings, or VQA-style {"answer": ...} objects (a single string is one answer)."""
    value = require_field(record, key, where)
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not value:
        raise RecordError(f"{where}: field {key!r} should be a non-empty list of answers")
    out = []
    for item in value:
        item = item.get("answer") if isinstance(item, dict) else item
        if not isinstance(item, str):
            raise RecordError(f"{where}: field {key!r} holds a {type(item).__name__}, not an answer string")
        out.append(item)
    return out


__all__ = ["JsonFileError", "RecordError", "answers_field", "open_image", "read_json", "read_json_or_jsonl",
           "read_jsonl", "read_table", "read_tsv", "require_field", "table_files", "text_field"]
