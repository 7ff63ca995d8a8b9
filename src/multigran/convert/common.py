"""Shared pieces of the checkpoint converters: reading sharded safetensors, checking keys, writing a multigran dir."""

import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

logger = logging.getLogger(__name__)

SHARD_BYTES = 5 * 1024**3  # shard size of the written checkpoint (Hugging Face's default "5GB")


class CheckpointMismatchError(ValueError):
    """A source checkpoint does not match the model it is converted into; the message names the keys."""


def safetensors_files(src_dir) -> list[Path]:
    """The safetensors files of a checkpoint directory (single file or shards listed in the index)."""
    src_dir = Path(src_dir)
    index = src_dir / "model.safetensors.index.json"
    if not src_dir.is_dir():
        raise FileNotFoundError(f"checkpoint directory {src_dir} does not exist")
    if index.is_file():
        from ..json_io import read_json_file

        data = read_json_file(index)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(name, str) for name in weight_map.values()):
            raise CheckpointMismatchError(f"{index} is not a valid safetensors index (expected "
                                          "{'weight_map': {key: file name}})")
        files = [src_dir / name for name in sorted(set(weight_map.values()))]
    else:
        files = sorted(src_dir.glob("*.safetensors"))
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise CheckpointMismatchError(f"checkpoint shards listed in {index} are missing: {missing}")
    if not files:
        raise CheckpointMismatchError(f"no *.safetensors weights in {src_dir}")
    return files


class SafetensorsCheckpoint:
    """Lazy view of a (sharded) safetensors checkpoint: key -> shape without reading data, tensors on demand."""

    def __init__(self, src_dir):
        self.handles = {}
        self.location = {}
        for path in safetensors_files(src_dir):
            handle = open_safetensors(path)
            self.handles[path] = handle
            for key in handle.keys():
                self.location[key] = path

    def keys(self):
        return list(self.location)

    def shape(self, key) -> torch.Size:
        return torch.Size(self.handles[self.location[key]].get_slice(key).get_shape())

    def tensor(self, key) -> torch.Tensor:
        path = self.location[key]
        try:
            return self.handles[path].get_tensor(key)
        except Exception as error:  # safetensors' own SafetensorError: unreadable data behind a valid header
            raise CheckpointMismatchError(f"{path}: cannot read tensor {key!r} ({error})") from None


def open_safetensors(path):
    """safe_open, with a zero-byte, truncated or garbage file reported as one error naming it."""
    try:
        return safe_open(str(path), framework="pt")
    except Exception as error:  # safetensors raises its own SafetensorError type
        raise CheckpointMismatchError(f"{path}: not a valid safetensors file ({error}): the file is empty, truncated "
                                      "or corrupt") from None


@contextmanager
def writing_directory(dst):
    """Yields a fresh folder next to `dst` to write an output model into; on success its files move into `dst`
    (created if needed, same-named files replaced), on failure it is removed: a failed command leaves no half-written
    model behind."""
    dst = Path(dst)
    if dst.exists() and not dst.is_dir():
        raise ValueError(f"output {dst} exists and is not a directory")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".partial", dir=dst.parent))
    try:
        yield tmp
        dst.mkdir(exist_ok=True)
        for item in sorted(tmp.iterdir()):
            target = dst / item.name
            if target.is_dir() and not item.is_dir():
                shutil.rmtree(target)
            elif item.is_dir() and target.exists():
                shutil.rmtree(target) if target.is_dir() else target.unlink()
            os.replace(item, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def canonical_tower_key(key: str) -> str:
    """transformers >= 5 CLIP/SigLIP vision models have no `vision_model.` level: older checkpoints do."""
    if key.startswith("vision_tower.vision_model."):
        return "vision_tower." + key[len("vision_tower.vision_model."):]
    return key


def tower_weights_from(clip_dir) -> dict:
    """`vision_tower.*` sources from a Hugging Face CLIP/SigLIP (vision) directory, old or new key layout."""
    checkpoint = SafetensorsCheckpoint(clip_dir)
    sources = {}
    for key in checkpoint.keys():
        if key.startswith("vision_model."):
            sources[canonical_tower_key("vision_tower." + key)] = (checkpoint, key)
        elif key.split(".", 1)[0] in ("embeddings", "encoder", "pre_layrnorm", "post_layernorm", "head"):
            sources["vision_tower." + key] = (checkpoint, key)
    return sources


def expected_state(model) -> dict[str, torch.Size]:
    """Key -> shape of everything a model saves (tied weights counted once, under their source name)."""
    state = model.state_dict()
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    return {key: value.shape for key, value in state.items() if key not in tied}


def check_keys(converted: dict[str, torch.Size], expected: dict[str, torch.Size], source: str):
    """Fails with a message naming the keys when the converted checkpoint does not fit the model."""
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    wrong_shape = sorted(
        f"{key}: checkpoint {tuple(converted[key])} vs model {tuple(expected[key])}"
        for key in set(converted) & set(expected)
        if tuple(converted[key]) != tuple(expected[key])
    )
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_preview(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_preview(unexpected)}")
    if wrong_shape:
        problems.append(f"shape mismatches ({len(wrong_shape)}): {_preview(wrong_shape)}")
    if problems:
        raise CheckpointMismatchError(f"{source} does not match the multigran model: " + "; ".join(problems))


def _preview(items, limit=20) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... and {len(items) - limit} more" if len(items) > limit else "")


class ShardWriter:
    """Writes tensors into safetensors shards of at most SHARD_BYTES, then the index (Hugging Face layout)."""

    def __init__(self, dst_dir, shard_bytes: int = SHARD_BYTES):
        self.dst_dir = Path(dst_dir)
        self.dst_dir.mkdir(parents=True, exist_ok=True)
        self.shard_bytes = shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[dict[str, torch.Tensor]] = []
        self.written: list[tuple[str, list[str]]] = []
        self.total_bytes = 0

    def add(self, key: str, tensor: torch.Tensor):
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.shard_bytes:
            self._flush()
        self.pending[key] = tensor.contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def _flush(self):
        name = f"shard-{len(self.written):05d}.safetensors.tmp"
        save_file(self.pending, str(self.dst_dir / name), metadata={"format": "pt"})
        self.written.append((name, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self):
        if self.pending or not self.written:
            self._flush()
        total = len(self.written)
        if total == 1:
            os.replace(self.dst_dir / self.written[0][0], self.dst_dir / "model.safetensors")
            return
        weight_map = {}
        for index, (tmp_name, keys) in enumerate(self.written):
            name = f"model-{index + 1:05d}-of-{total:05d}.safetensors"
            os.replace(self.dst_dir / tmp_name, self.dst_dir / name)
            weight_map.update({key: name for key in keys})
        index_data = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.dst_dir / "model.safetensors.index.json").write_text(json.dumps(index_data, indent=2))


def build_on_meta(config):
    """The multigran model for `config` without allocating its weights (for key/shape checks at any size)."""
    from ..modeling import MultiGranForConditionalGeneration

    with torch.device("meta"):
        return MultiGranForConditionalGeneration(config)


def write_checked(sources: dict, expected, dst_dir, source: str, extra: dict[str, torch.Tensor] | None = None):
    """Checks the new keys against the model first, then streams the tensors into shards.

    `sources` maps each new key to (SafetensorsCheckpoint, key there); `extra` holds tensors built by the converter
    (packed or split ones), keyed by their new name.
    """
    extra = extra or {}
    shapes = {new: checkpoint.shape(old) for new, (checkpoint, old) in sources.items()}
    shapes.update({key: tensor.shape for key, tensor in extra.items()})
    check_keys(shapes, expected, source)
    writer = ShardWriter(dst_dir)
    for new, (checkpoint, old) in sources.items():
        writer.add(new, checkpoint.tensor(old))
    for key, tensor in extra.items():
        writer.add(key, tensor)
    writer.close()
