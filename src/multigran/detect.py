"""`multigran detect`: offline OWLv2 object detection that writes MG-LLaVA box files.

MG-LLaVA's release tags each image with RAM++, then detects "a photo of <tag>" with OWLv2
(google/owlv2-large-patch14-ensemble) at score threshold 0.2 and writes one box-file record per sample:
{"id", "boxes": [[x1, y1, x2, y2], ...], "scores", "labels"} in absolute pixels of the ORIGINAL image, with no NMS
(NMS and the 768-canvas transforms happen at load time, see multigran.data.boxes). RAM++ is not in transformers, so the
tags here are given by the user (--tags, --tags-file) or a built-in vocabulary (--vocab coco): every image is queried
with the same tag list. Spec: shared/spec/mg-llava.md, "Box pipeline".

Details that follow the release / Hugging Face OWLv2:
- OWLv2's processor pads every image bottom/right to a square before resizing, so normalised boxes are relative to
  the padded square: they are scaled by the target size (max(W, H), max(W, H)), not (H, W).
- One label per predicted box (the best-scoring query), scores = sigmoid(logit), kept when score > threshold; this is
  Hugging Face's `post_process_object_detection`, called as is. (transformers 5.x scales by max(H, W) whatever target
  size it is given; older versions, the release's, scale by the given size, hence the explicit square.)
- Preprocessing always uses the PIL/numpy image processor (the release's, and the same output with or without
  torchvision installed).
Additions: boxes are clipped to the image and rounded to 0.01 px (smaller files), then boxes left with no area
(predicted inside the padding, or thinner than 0.01 px) are dropped; each record is sorted by descending score. The
text queries are encoded once per run, not once per batch as `Owlv2ForObjectDetection.forward` does (tested to give
the same detections).

Which images, and their ids (the key the training / evaluation data looks boxes up by: str(sample "id"), else
"question_id"):
- a LLaVA annotation file (.json list or .jsonl, e.g. llava_v1_5_mix665k.json or an evaluation question file): one
  record per sample id (else question_id), from the sample's "image" (relative to --image-folder, default the file's
  folder); an image shared by several samples is detected once. Samples without an image are skipped (they get a
  dummy box at load time). This is the exact join, and the only one for evaluation files keyed by question_id.
- a folder (all image files under it, recursively, sorted) or a text file listing image paths (one per line, relative
  to the list's folder; blank lines and lines starting with # are skipped): ids are the file stem (--id-from stem,
  the default: LLaVA-1.5's COCO samples have id == image stem, e.g. "000000033471"), or the path without its
  extension, relative to the folder / as written in the list (--id-from path, e.g. "coco/train2017/000000033471",
  which is LLaVA's "image" field without the extension). Two images with the same id are an error.

Resumable: ids already in the output file are skipped, and the file is rewritten atomically (write_box_file) every
--save-every images, at the end, and when the run stops on an error or Ctrl-C, so a re-run finishes the work. Each
flush rewrites the whole file (about 0.2 ms per record), so keep --save-every large for big datasets. An image that
cannot be read is reported (file and reason), counted in the summary and left out of the file (a re-run retries it).
"""

from __future__ import annotations

import functools
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .data.boxes import read_box_file, write_box_file
from .extras import require
from .image_io import ImageLoadError, load_image

# Release settings (MG-LLaVA's offline box generation with OWLv2).
THRESHOLD = 0.2
PROMPT = "a photo of {}"

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}

# The 80 COCO detection classes (the names of the COCO 2017 annotations, in category-id order).
COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)  # fmt: skip
VOCABULARIES = {"coco": COCO_CLASSES}


@dataclass
class ImageItem:
    path: Path
    ids: list[str]  # one id per sample using this image (several only for LLaVA annotation files)


@dataclass
class DetectSummary:
    out: str
    images: int = 0  # distinct images listed
    already_done: int = 0  # images whose ids were all in the output file already
    processed: int = 0  # images run through the detector in this run
    failed: list[tuple[str, str]] = field(default_factory=list)  # (image path, reason)
    records: int = 0  # records in the output file at the end

    def __str__(self) -> str:
        return (
            f"wrote {self.records} records to {self.out}: {self.processed} images detected, {self.already_done} "
            f"already in the file, {len(self.failed)} failed (of {self.images})"
        )


# --- inputs -------------------------------------------------------------------------------------------------------


def parse_tags(tags: str | list[str] | None = None, tags_file=None, vocab: str | None = None) -> list[str]:
    """The tag list from exactly one of: a comma-separated string (or a list), a file with one tag per line, or a
    built-in vocabulary name. Tags are stripped; empty entries and repeats are dropped (order kept)."""
    if sum(x is not None for x in (tags, tags_file, vocab)) != 1:
        raise ValueError("give exactly one of --tags, --tags-file or --vocab")
    if vocab is not None:
        if vocab not in VOCABULARIES:
            raise ValueError(f"unknown vocabulary {vocab!r}; built in: {sorted(VOCABULARIES)}")
        names = list(VOCABULARIES[vocab])
    elif tags_file is not None:
        names = Path(tags_file).read_text(encoding="utf-8").splitlines()
    else:
        names = tags.split(",") if isinstance(tags, str) else list(tags)
    names = list(dict.fromkeys(name.strip() for name in names if name.strip()))
    if not names:
        raise ValueError(f"no tags given (got {tags if tags is not None else tags_file!r})")
    return names


def list_images(images, id_from: str = "stem", image_folder=None) -> list[ImageItem]:
    """The images to detect and their ids; see the module docstring for the three input kinds."""
    if id_from not in ("stem", "path"):
        raise ValueError(f"id_from must be 'stem' or 'path', got {id_from!r}")
    source = Path(images)
    if source.is_dir():
        paths = sorted(
            (p for p in source.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()),
            key=lambda p: p.relative_to(source).as_posix(),
        )
        named = [(p, p.relative_to(source).as_posix()) for p in paths]
    elif source.is_file() and source.suffix.lower() in (".json", ".jsonl"):
        return _llava_images(source, Path(image_folder) if image_folder is not None else source.parent)
    elif source.is_file():
        lines = [line.strip() for line in source.read_text(encoding="utf-8").splitlines()]
        named = [(source.parent / line, line) for line in lines if line and not line.startswith("#")]
    else:
        raise ValueError(f"--images {str(source)!r} is neither a folder nor a file")
    if not named:
        raise ValueError(f"no image files found in {str(source)!r} (extensions {sorted(IMAGE_EXTENSIONS)})")
    items, seen = [], {}
    for path, name in named:
        image_id = Path(name).stem if id_from == "stem" else str(Path(name).with_suffix("").as_posix())
        if image_id in seen:
            raise ValueError(
                f"images {seen[image_id]!r} and {name!r} both get the id {image_id!r}"
                + ("; use --id-from path" if id_from == "stem" else "")
            )
        seen[image_id] = name
        items.append(ImageItem(path, [image_id]))
    return items


def _llava_images(path: Path, image_folder: Path) -> list[ImageItem]:
    text = path.read_text(encoding="utf-8")
    jsonl = path.suffix.lower() == ".jsonl"
    chunks = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()] if jsonl else [(1, text)]
    parsed = []
    for first_line, chunk in chunks:
        try:
            parsed.append(json.loads(chunk))
        except json.JSONDecodeError as e:
            line = first_line + e.lineno - 1
            raise ValueError(f"{path}: not valid JSON (line {line}, column {e.colno}: {e.msg})") from None
    samples = parsed if jsonl else parsed[0]
    if not isinstance(samples, list):
        raise ValueError(f"{path}: a LLaVA annotation file holds a list of samples, got {type(samples).__name__}")
    by_image: dict[str, ImageItem] = {}
    image_of_id: dict[str, str] = {}
    for index, sample in enumerate(samples):
        if not isinstance(sample, dict):
            raise ValueError(f"{path}: sample {index} is not a JSON object")
        image = sample.get("image")
        if image is None:
            continue  # text-only sample: no boxes to detect
        if not isinstance(image, str):
            raise ValueError(f"{path}: sample {index} has 'image' {image!r}; one image path per sample is supported")
        key = "id" if sample.get("id") is not None else "question_id"
        if sample.get(key) is None:
            raise ValueError(f"{path}: sample {index} has neither 'id' nor 'question_id'")
        sample_id = str(sample[key])
        if image_of_id.setdefault(sample_id, image) != image:
            raise ValueError(
                f"{path}: sample {key} {sample_id!r} names two images, {image_of_id[sample_id]!r} and {image!r}"
            )
        item = by_image.setdefault(image, ImageItem(image_folder / image, []))
        if sample_id not in item.ids:
            item.ids.append(sample_id)
    if not by_image:
        raise ValueError(f"{path}: no sample has an 'image'")
    return list(by_image.values())


# --- detection ----------------------------------------------------------------------------------------------------


def load_detector(model_dir, device: str = "auto", dtype: str = "float32"):
    """(Owlv2ForObjectDetection, Owlv2Processor) from a local checkpoint folder; never downloads."""
    from transformers import Owlv2ForObjectDetection, Owlv2Processor
    from transformers.utils import logging as hf_logging

    from .loading import resolve_device_dtype

    require("scipy", "detect")  # transformers' OWLv2 image processor needs it

    config_file = Path(model_dir) / "config.json"
    if not config_file.is_file():
        raise ValueError(f"--model {str(model_dir)!r} is not a model folder (no config.json)")
    model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    if model_type != "owlv2":
        raise ValueError(f"--model {str(model_dir)!r} is a {model_type!r} checkpoint, not OWLv2 (model_type 'owlv2')")
    device, torch_dtype = resolve_device_dtype(device, dtype)
    hf_logging.disable_progress_bar()
    processor = Owlv2Processor.from_pretrained(model_dir, local_files_only=True, backend="pil")
    model = Owlv2ForObjectDetection.from_pretrained(model_dir, local_files_only=True, dtype=torch_dtype)
    return model.to(device).eval(), processor


def _load_batch(image_processor, items: list[ImageItem]):
    """Read and preprocess a batch (in DataLoader workers): (loaded [(item, (W, H))], pixel values (B, 3, S, S) or
    None, failures [(item, reason)])."""
    loaded, pixels, failures = [], [], []
    for item in items:
        try:
            image = load_image(item.path)
        except ImageLoadError as error:
            failures.append((item, str(error)))
            continue
        try:
            pixel_values = image_processor(images=image, return_tensors="pt")["pixel_values"]  # (1, 3, S, S)
        except ValueError as error:
            failures.append((item, f"preprocessing failed: {error}"))
            continue
        loaded.append((item, image.size))
        pixels.append(pixel_values)
    return loaded, (torch.cat(pixels) if pixels else None), failures


@torch.inference_mode()
def encode_queries(model, processor, tags: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Text queries "a photo of <tag>" -> (normalised embeddings (Q, P), query mask (Q,)), as in
    Owlv2ForObjectDetection.forward, computed once per run."""
    prompts = [PROMPT.format(tag) for tag in tags]
    limit = model.config.text_config.max_position_embeddings
    too_long = [tag for tag, ids in zip(tags, processor.tokenizer(prompts)["input_ids"]) if len(ids) > limit]
    if too_long:
        raise ValueError(f"the prompts for tags {too_long} are longer than OWLv2's {limit} text tokens; shorten them")
    text = processor(text=prompts, return_tensors="pt")  # padded to the tokenizer's max length, as the release
    device = model.device
    input_ids, attention_mask = text["input_ids"].to(device), text["attention_mask"].to(device)
    embeds = model.owlv2.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output
    embeds = embeds / torch.linalg.norm(embeds, ord=2, dim=-1, keepdim=True)
    return embeds, input_ids[:, 0] > 0  # forward's rule: a query starting with token 0 is padding


@torch.inference_mode()
def detect_batch(model, image_processor, pixel_values, sizes, query_embeds, query_mask, tags, threshold=THRESHOLD):
    """One batch of preprocessed images -> one {"boxes", "scores", "labels"} per image, in original-image pixels.

    sizes: the original (W, H) of each image.
    """
    from transformers.models.owlv2.modeling_owlv2 import Owlv2ObjectDetectionOutput

    pixel_values = pixel_values.to(model.device, model.dtype)
    feature_map = model.image_embedder(pixel_values=pixel_values)[0]  # (B, h, w, D)
    batch, h, w, dim = feature_map.shape
    image_feats = feature_map.reshape(batch, h * w, dim)
    logits, _ = model.class_predictor(
        image_feats, query_embeds.expand(batch, -1, -1), query_mask.expand(batch, -1)
    )  # (B, h*w, Q)
    pred_boxes = model.box_predictor(image_feats, feature_map)  # (B, h*w, 4) cxcywh relative to the padded square
    outputs = Owlv2ObjectDetectionOutput(logits=logits.float(), pred_boxes=pred_boxes.float())
    squares = [(max(width, height), max(width, height)) for width, height in sizes]  # OWLv2 pads bottom/right
    results = image_processor.post_process_object_detection(outputs, threshold=threshold, target_sizes=squares)
    detections = []
    for result, (width, height) in zip(results, sizes):
        order = result["scores"].argsort(descending=True, stable=True)
        boxes = result["boxes"][order].cpu().double()
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        boxes = torch.round(boxes * 100) / 100
        # Boxes predicted inside the padding (or thinner than 0.01 px) have no area left.
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        detections.append({
            "boxes": boxes[keep].tolist(),
            "scores": result["scores"][order][keep].tolist(),
            "labels": [tags[i] for i in result["labels"][order][keep].tolist()],
        })
    return detections


def detect(
    images,
    out,
    model_dir,
    tags: str | list[str] | None = None,
    *,
    tags_file=None,
    vocab: str | None = None,
    batch_size: int = 8,
    threshold: float = THRESHOLD,
    device: str = "auto",
    dtype: str = "float32",
    id_from: str = "stem",
    image_folder=None,
    save_every: int = 1000,
    num_workers: int = 0,
    progress: bool = True,
) -> DetectSummary:
    """Detect the tags in the images with the OWLv2 checkpoint folder `model_dir`; add the records to the box file
    `out` (created if missing).

    Returns a summary (also of the failed images). See the module docstring for inputs, ids and resuming.
    """
    require("scipy", "detect")  # before any work: transformers' OWLv2 image processor needs it
    if batch_size < 1 or save_every < 1 or num_workers < 0:
        raise ValueError(f"batch_size and save_every must be >= 1 and num_workers >= 0, got {batch_size}, "
                         f"{save_every}, {num_workers}")
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"threshold must be in [0, 1), got {threshold}")
    tag_list = parse_tags(tags, tags_file, vocab)
    items = list_images(images, id_from, image_folder)
    out = os.fspath(out)
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise ValueError(f"--out {out!r}: folder {folder!r} does not exist or is not writable")
    records = read_box_file(out) if os.path.exists(out) else {}  # a broken file is an error, never overwritten
    pending = [item for item in items if not all(i in records for i in item.ids)]
    summary = DetectSummary(out=out, images=len(items), already_done=len(items) - len(pending))
    if pending:
        model, processor = load_detector(model_dir, device, dtype)
        query_embeds, query_mask = encode_queries(model, processor, tag_list)
        batches = torch.utils.data.DataLoader(
            pending, batch_size=batch_size, num_workers=num_workers,
            collate_fn=functools.partial(_load_batch, processor.image_processor),
        )
        bar = tqdm(total=len(pending), unit="img", desc="detect", disable=not progress, file=sys.stderr)
        since_flush = 0
        try:
            for loaded, pixel_values, failures in batches:
                for item, reason in failures:
                    summary.failed.append((str(item.path), reason))
                    tqdm.write(f"multigran detect: skipped {item.path}: {reason}", file=sys.stderr)
                if loaded:
                    sizes = [size for _, size in loaded]
                    detections = detect_batch(model, processor.image_processor, pixel_values, sizes,
                                              query_embeds, query_mask, tag_list, threshold)
                    for (item, _), detection in zip(loaded, detections):
                        for image_id in item.ids:
                            records[image_id] = {"id": image_id, **detection}
                    summary.processed += len(loaded)
                    since_flush += len(loaded)
                bar.update(len(loaded) + len(failures))
                if since_flush >= save_every:
                    write_box_file(out, records)
                    since_flush = 0
        finally:  # keep the finished work on errors and Ctrl-C too
            bar.close()
            if since_flush:
                write_box_file(out, records)
    if not os.path.exists(out):  # nothing detected (all images failed or nothing pending): still write the file
        write_box_file(out, records)
    summary.records = len(records)
    return summary


# --- command line -------------------------------------------------------------------------------------------------


def add_detect_arguments(parser):
    parser.add_argument("--images", required=True,
                        help="a folder of images, a text file listing image paths, or a LLaVA .json/.jsonl file")
    parser.add_argument("--image-folder", help="LLaVA annotation input: folder the 'image' paths are relative to "
                                               "(default: the annotation file's folder)")
    parser.add_argument("--id-from", choices=["stem", "path"], default="stem",
                        help="folder/list input: record id = file stem (default) or path without extension")
    tags = parser.add_mutually_exclusive_group(required=True)
    tags.add_argument("--tags", help='comma-separated tags, e.g. "cat,dog,traffic light"')
    tags.add_argument("--tags-file", help="a text file with one tag per line")
    tags.add_argument("--vocab", choices=sorted(VOCABULARIES), help="a built-in tag vocabulary")
    parser.add_argument("--model", required=True, help="a local OWLv2 checkpoint folder (Owlv2ForObjectDetection)")
    parser.add_argument("--out", required=True, help="the box file to write (existing ids are kept and skipped)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threshold", type=float, default=THRESHOLD, help=f"score threshold (release: {THRESHOLD})")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="model dtype (default float32: bf16 box coordinates are off by ~0.4%% of the image side)")
    parser.add_argument("--save-every", type=int, default=1000, help="rewrite the output file every N images")
    parser.add_argument("--num-workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="image loading / preprocessing processes (0: in the main process)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def detect_command(args):
    summary = detect(
        args.images, args.out, args.model, args.tags, tags_file=args.tags_file, vocab=args.vocab,
        batch_size=args.batch_size, threshold=args.threshold, device=args.device, dtype=args.dtype,
        id_from=args.id_from, image_folder=args.image_folder, save_every=args.save_every,
        num_workers=args.num_workers, progress=not args.no_progress,
    )
    print(summary)
    if summary.failed:
        print(f"{len(summary.failed)} images could not be read and have no record:", file=sys.stderr)
        for path, reason in summary.failed[:20]:
            print(f"  {path}: {reason}", file=sys.stderr)
        if len(summary.failed) > 20:
            print(f"  ... and {len(summary.failed) - 20} more", file=sys.stderr)
    return summary


__all__ = ["detect", "detect_command", "add_detect_arguments", "parse_tags", "list_images", "COCO_CLASSES"]
