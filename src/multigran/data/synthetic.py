"""The built-in synthetic granularity benchmark used by `multigran demo`.

A seeded procedural generator of small square images with LLaVA-format questions whose answers need different visual
granularities. Everything is written as real files (PNG + LLaVA JSON + an MG-LLaVA box file), so the demo goes
through the same data path as user data.

Geometry (why one tile)
-----------------------
An image is exactly ONE AnyRes tile: `image_size == tile_size` (default 96 px) with `patch_size` 8, so the vision
tower sees an n x n patch grid (n = 12) and the AnyRes base view (whole image resized to the tile size) is the same
pixels as the tile. The guarantees below are stated on patches; they hold in every view the model sees only because
no view resamples the image.

AVG-LLaVA's levels pool the n x n grid with kernels (rows x cols) 4x4, 2x4, 2x2, 1x2, 1x1 (level 0 = coarsest).

What an image holds
-------------------
Every image holds the same things, whatever is asked (so only the INSTRUCTION tells which level is needed):
- background: one solid palette colour, and a big shape (circle, ring, triangle or bar, 0.6 of the image wide,
  centred +- half a patch) of another colour. COARSE questions: the background's colour, the shape's colour (and its
  kind, `shape_kind`, which needs the layout of the coarsest cells).
- the block: 2 x 2 squares, each exactly one patch, aligned to even patch rows and columns, so the block lies in one
  window of the 4x4, 2x4 and 2x2 kernels and each of its rows in one 1x2 window. The right square of a random row is
  "the framed square": a black 1-px frame around a white interior; the other three are white 1-px frames around
  interiors of three different colours. FINE question: "What color is the square left of the framed square?".
- up to three objects: 1.5-patch squares (12 px) at even pixel positions (not patch aligned, away from the block), each
  with its own colour (never white) and a 1-px texture (horizontal stripes, vertical stripes or checkered; a
  permutation of the three) that alternates the colour with white. All three textures have the same mean over any
  2x2 pixel block, so any 2x downscale (e.g. MG-LLaVA's low-resolution view) erases the texture, while the box crop
  at full resolution shows it. Even positions keep the stripes in one phase relative to stride-2/4 convolution stems,
  so a high-resolution encoder sees each texture the same way wherever the object is. OBJECT questions ("what
  pattern does the red object have?", "what color is the checkered object?"; with one object, "what pattern does
  the object have?"); their ground-truth boxes go to `boxes.json` (MG-LLaVA box-file format).

Why the fine question needs a fine level, by construction
---------------------------------------------------------
Permuting the three white-framed squares changes the answer (the square left of the framed one gets another colour)
but moves whole patches inside one 2x2 window, so every window of levels 0-2 holds the same patches: their pooled
pixels are bit-identical. For a model whose vision tower has no position embedding (the demo's tiny tower), this holds
for its pooled TOKENS too, exactly and whatever the weights: the tower is then equivariant to permutations of the
patches, the projector works token by token, and an average over a window is symmetric in the window's tokens. So at
levels 0-2 no model of that kind can tell the three candidates apart (at most 1/3 accuracy on average over the
permutations), while at level 3 the framed square and its left neighbour share one 1x2 window (the answer is the
other square in it) and at level 4 every square is its own token.

Splits
------
Sample i of split s is drawn from `numpy.random.default_rng([seed, s, i])`, so the data are deterministic for a seed
and a sample does not depend on how many others are asked for. An image identical (in pixels) to one already drawn in
any split is redrawn, so no image appears twice. Answers are single words from `answer_vocabulary()`; accuracy is
exact match.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image

# Well separated in RGB so that a palette colour stays recognisable after mixing with another one.
PALETTE = {
    "red": (230, 30, 30),
    "green": (40, 170, 60),
    "blue": (40, 70, 230),
    "yellow": (245, 215, 30),
    "purple": (140, 50, 180),
    "orange": (245, 135, 20),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "ring", "triangle", "bar")
PATTERNS = ("horizontal", "vertical", "checkered")
QUESTION_TYPES = ("coarse", "fine", "object")
SUBTYPES = {
    "coarse": ("background_color", "shape_color", "shape_kind"),
    "fine": ("left_of_framed",),
    "object": ("object_pattern", "object_color"),
}
DEFAULT_QUESTION_MIX = {"coarse": 0.4, "fine": 0.4, "object": 0.2}
SPLITS = ("train", "val", "test", "pretrain", "router")  # a split's index is part of every sample's seed

# LLaVA-1.5's short-answer suffix (its VQAv2/GQA evaluation prompts), also MG-LLaVA's.
QUESTION_SUFFIX = "Answer the question using a single word or phrase."
CAPTION_INSTRUCTION = "Describe the image briefly."
FINE_QUESTION = "What color is the square left of the framed square?"
NUM_OBJECTS = 3
BOX_LABEL = "object"
INFO_FILE = "dataset_info.json"
FORMAT_VERSION = 2

# Block squares: interiors from the palette's chromatic colours; frames in two colours outside the palette, so a
# frame is never mistaken for an interior (or for the palette's white and black).
BLOCK_COLORS = tuple(c for c in PALETTE if c not in ("white", "black"))
FRAMED_FRAME, FRAMED_INTERIOR = (0, 0, 0), (255, 255, 255)
PLAIN_FRAME = (255, 255, 255)

_SHAPE_RADIUS = 0.3  # of the image side: the background keeps >= 70 % of the pixels
_PATTERN_PHRASE = {
    "horizontal": "the object with horizontal stripes",
    "vertical": "the object with vertical stripes",
    "checkered": "the checkered object",
}


@dataclass(frozen=True)
class Geometry:
    """Pixel geometry of one image: a single AnyRes tile of `tile_size` px cut into `patch_size` px ViT patches."""

    tile_size: int = 96
    patch_size: int = 8

    def __post_init__(self):
        for name in ("tile_size", "patch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"Geometry.{name} must be an int, got {type(value).__name__}")
        if self.patch_size < 4 or self.patch_size % 2:
            raise ValueError(
                f"Geometry.patch_size must be even and >= 4 (a framed square and 1-px textures), got {self.patch_size}"
            )
        if self.tile_size % (4 * self.patch_size):
            raise ValueError(
                f"Geometry.tile_size ({self.tile_size}) must be a multiple of 4 * patch_size ({4 * self.patch_size}): "
                "the coarsest level pools 4x4-patch cells"
            )
        if self.tile_size // (4 * self.patch_size) < 2:
            raise ValueError(f"Geometry.tile_size ({self.tile_size}) must hold at least 2x2 cells of 4x4 patches")

    @property
    def image_size(self) -> int:
        return self.tile_size

    @property
    def grid(self) -> int:  # patches per side, n
        return self.tile_size // self.patch_size

    @property
    def cell_px(self) -> int:
        return 4 * self.patch_size

    @property
    def cells(self) -> int:  # coarsest-level cells per side, n / 4
        return self.grid // 4

    @property
    def object_size(self) -> int:  # 1.5 patches, even so that every texture has the same mean
        return 2 * ((3 * self.patch_size + 2) // 4)


@dataclass(frozen=True)
class SceneObject:
    color: str
    pattern: str
    box: tuple[int, int, int, int]  # x1, y1, x2, y2 in absolute pixels, x2/y2 exclusive


@dataclass(frozen=True)
class Scene:
    background: str
    shape: str
    shape_color: str
    shape_center: tuple[float, float]  # x, y in pixels
    block_origin: tuple[int, int]  # (row, col) patch of the block's top-left square; both even
    framed_row: int  # 0 or 1: the framed square is the right square of this block row
    square_colors: tuple[str, str, str]  # interiors of the other three squares, in raster order
    objects: tuple[SceneObject, ...]  # in reading order (top to bottom, then left to right)

    @property
    def framed_index(self) -> int:
        return 2 * self.framed_row + 1

    @property
    def left_of_framed(self) -> str:
        return self.square_colors[0 if self.framed_row == 0 else 2]

    def block_patches(self) -> list[tuple[int, int]]:
        """(row, col) of the four squares, raster order."""
        row, col = self.block_origin
        return [(row, col), (row, col + 1), (row + 1, col), (row + 1, col + 1)]


def _check_color(name: str) -> tuple[int, int, int]:
    if name not in PALETTE:
        raise ValueError(f"unknown colour {name!r}; the palette is {sorted(PALETTE)}")
    return PALETTE[name]


def sample_scene(rng: np.random.Generator, geometry: Geometry = Geometry(), num_objects: int = NUM_OBJECTS) -> Scene:
    """Draw one scene (with 0 to 3 objects). Colours that must stay visible on top of each other are kept distinct."""
    colors = list(PALETTE)
    size, p = geometry.image_size, geometry.patch_size
    background, shape_color = (colors[i] for i in rng.choice(len(colors), 2, replace=False))
    shape = SHAPES[rng.integers(len(SHAPES))]
    jitter = p // 2
    center = (size / 2 + int(rng.integers(-jitter, jitter + 1)), size / 2 + int(rng.integers(-jitter, jitter + 1)))

    half = geometry.grid // 2
    origin = (2 * int(rng.integers(half)), 2 * int(rng.integers(half)))  # even row and column: one 2x2 window
    square_colors = tuple(BLOCK_COLORS[i] for i in rng.choice(len(BLOCK_COLORS), 3, replace=False))
    framed_row = int(rng.integers(2))

    # Objects: distinct colours (so a colour names one object) that differ from the background and the shape, a
    # permutation of the textures, away from the block and 2 px apart from each other.
    free = [c for c in colors if c not in (background, shape_color, "white")]  # white would hide the texture
    object_colors = [free[i] for i in rng.choice(len(free), num_objects, replace=False)]
    patterns = [PATTERNS[i] for i in rng.permutation(len(PATTERNS))[:num_objects]]
    s = geometry.object_size
    block_box = (origin[1] * p, origin[0] * p, (origin[1] + 2) * p, (origin[0] + 2) * p)
    boxes: list[tuple[int, int, int, int]] = []
    for _ in range(100_000):
        if len(boxes) == num_objects:
            break
        x1, y1 = (2 * int(v) for v in rng.integers(0, (size - s) // 2 + 1, size=2))  # even: fixed stripe phase
        box = (x1, y1, x1 + s, y1 + s)
        if _overlaps(box, block_box, gap=2) or any(_overlaps(box, other, gap=2) for other in boxes):
            continue
        boxes.append(box)
    if len(boxes) < num_objects:  # not reachable: the block and the objects cover a small part of the image
        raise RuntimeError(f"could not place {num_objects} objects in a {size}px image")
    objects = [SceneObject(c, pat, b) for c, pat, b in zip(object_colors, patterns, boxes)]
    objects.sort(key=lambda o: (o.box[1], o.box[0]))
    return Scene(background, shape, shape_color, center, origin, framed_row, square_colors, tuple(objects))


def _overlaps(a, b, gap):
    return a[0] < b[2] + gap and b[0] < a[2] + gap and a[1] < b[3] + gap and b[1] < a[3] + gap


@functools.lru_cache(maxsize=8)
def _pixel_centres(size: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:size, 0:size] + 0.5
    return x, y


def shape_mask(shape: str, center: tuple[float, float], size: int) -> np.ndarray:
    """(size, size) bool mask of the big shape, tested at pixel centres."""
    radius = _SHAPE_RADIUS * size
    x, y = _pixel_centres(size)
    dx, dy = x - center[0], y - center[1]
    if shape == "circle":
        return dx**2 + dy**2 <= radius**2
    if shape == "ring":
        d2 = dx**2 + dy**2
        return (d2 <= radius**2) & (d2 >= (0.55 * radius) ** 2)
    if shape == "triangle":  # apex up at -radius, base at +0.8 radius, base half-width = radius
        t = (dy + radius) / (1.8 * radius)
        return (t >= 0) & (t <= 1) & (np.abs(dx) <= t * radius)
    if shape == "bar":
        return (np.abs(dx) <= radius) & (np.abs(dy) <= 0.38 * radius)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


@functools.lru_cache(maxsize=256)
def texture(pattern: str, color: str, size: int) -> np.ndarray:
    """(size, size, 3) uint8 object texture: the colour alternating 1-px wise with white.

    Every 2x2 block of it holds two pixels of each, so all patterns have the same mean at half resolution.
    """
    rgb = np.array(_check_color(color), dtype=np.int64)
    white = np.array(PALETTE["white"], dtype=np.int64)
    v, u = np.mgrid[0:size, 0:size]
    if pattern == "horizontal":
        on = v % 2 == 0
    elif pattern == "vertical":
        on = u % 2 == 0
    elif pattern == "checkered":
        on = (u + v) % 2 == 0
    else:
        raise ValueError(f"unknown pattern {pattern!r}; expected one of {PATTERNS}")
    out = np.where(on[..., None], rgb, white).astype(np.uint8)
    out.flags.writeable = False  # cached: shared between calls
    return out


def render_scene(scene: Scene, geometry: Geometry = Geometry()) -> np.ndarray:
    """Draw a scene: (image_size, image_size, 3) uint8 RGB."""
    size, p = geometry.image_size, geometry.patch_size
    background = np.array(_check_color(scene.background), dtype=np.uint8)
    shape = np.array(_check_color(scene.shape_color), dtype=np.uint8)
    image = np.where(shape_mask(scene.shape, scene.shape_center, size)[..., None], shape, background)
    colors = iter(scene.square_colors)
    for index, (row, col) in enumerate(scene.block_patches()):
        if not (0 <= row < geometry.grid and 0 <= col < geometry.grid):
            raise ValueError(f"block square at patch {(row, col)} is outside the {geometry.grid}x{geometry.grid} grid")
        y, x = row * p, col * p
        if index == scene.framed_index:
            frame, interior = FRAMED_FRAME, FRAMED_INTERIOR
        else:
            color = next(colors)
            if color not in BLOCK_COLORS:
                raise ValueError(f"block colour {color!r} is not one of {BLOCK_COLORS}")
            frame, interior = PLAIN_FRAME, PALETTE[color]
        image[y : y + p, x : x + p] = frame
        image[y + 1 : y + p - 1, x + 1 : x + p - 1] = interior
    for obj in scene.objects:
        x1, y1, x2, y2 = obj.box
        if not (0 <= x1 < x2 <= size and 0 <= y1 < y2 <= size) or x2 - x1 != y2 - y1:
            raise ValueError(f"object box {obj.box} is not a square inside the {size}x{size} image")
        image[y1:y2, x1:x2] = texture(obj.pattern, obj.color, x2 - x1)
    return image


def ask(scene: Scene, question_type: str, rng: np.random.Generator, subtypes=None) -> tuple[str, str, str]:
    """One question about the scene: (subtype, question, answer); `subtypes` restricts the subtypes asked."""
    if question_type not in QUESTION_TYPES:
        raise ValueError(f"unknown question_type {question_type!r}; expected one of {QUESTION_TYPES}")
    allowed = [t for t in SUBTYPES[question_type] if subtypes is None or t in subtypes]
    subtype = allowed[rng.integers(len(allowed))]
    if question_type == "coarse":
        if subtype == "background_color":
            return subtype, "What color is the background?", scene.background
        if subtype == "shape_color":
            return subtype, "What color is the big shape?", scene.shape_color
        return subtype, "What kind of shape is the big shape?", scene.shape
    if question_type == "fine":
        return subtype, FINE_QUESTION, scene.left_of_framed
    if not scene.objects:
        raise ValueError("ask: an object question about a scene without objects")
    obj = scene.objects[rng.integers(len(scene.objects))]
    alone = len(scene.objects) == 1  # "the object" names it; with several, its colour or pattern does
    if subtype == "object_pattern":
        name = "the object" if alone else f"the {obj.color} object"
        return subtype, f"What pattern does {name} have?", obj.pattern
    return subtype, f"What color is {'the object' if alone else _PATTERN_PHRASE[obj.pattern]}?", obj.color


def caption(scene: Scene) -> str:
    """Short stage-1 caption naming everything in the image."""
    objects = ", ".join(f"{o.color} {o.pattern}" for o in scene.objects)
    return (
        f"A {scene.shape_color} {scene.shape} on a {scene.background} background. "
        f"The square left of the framed square is {scene.left_of_framed}." + (f" Objects: {objects}." if objects else "")
    )


def question_prompt(question: str) -> str:
    """The text of the human turn after the image: the question and the one-word instruction."""
    return f"{question}\n{QUESTION_SUFFIX}"


def answer_vocabulary() -> list[str]:
    """Every possible answer (one word each), sorted."""
    return sorted(set(PALETTE) | set(SHAPES) | set(PATTERNS))


def words_of(text: str) -> list[str]:
    """Lower-cased words and single punctuation marks: how the word-level tokenizer splits text."""
    return re.findall(r"\w+|[^\w\s]", text.lower())


def all_words() -> list[str]:
    """Every word that can appear in a question, answer, caption or instruction, sorted."""
    texts = [
        QUESTION_SUFFIX,
        CAPTION_INSTRUCTION,
        FINE_QUESTION,
        "What color is the background?",
        "What color is the big shape?",
        "What kind of shape is the big shape?",
        "What pattern does the object have?",
        "What color is the object?",
        "A on a background. The square left of the framed square is. Objects: , .",
        *(f"What color is {phrase}?" for phrase in _PATTERN_PHRASE.values()),
    ]
    words = set(answer_vocabulary())
    for text in texts:
        words.update(words_of(text))
    return sorted(words)


def _hash(image: np.ndarray) -> bytes:
    return hashlib.blake2b(image.tobytes(), digest_size=16).digest()


def _write_json(path: str, data) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)  # a run killed half way never leaves a truncated file behind


def generate_dataset(
    out_dir: str | os.PathLike,
    num_train: int = 3000,
    num_val: int = 300,
    num_test: int = 600,
    num_pretrain: int | None = None,
    seed: int = 0,
    tile_size: int = 96,
    patch_size: int = 8,
    question_mix: dict[str, float] | None = None,
    subtypes: dict[str, tuple[str, ...]] | None = None,
    train_turns: int = 1,
    num_router: int = 0,
    num_objects: int = NUM_OBJECTS,
) -> dict[str, str]:
    """Write the benchmark under `out_dir` and return the paths of what was written.

    Files: `train.json`, `val.json`, `test.json` (one question per image, LLaVA format plus `question_type`
    ("coarse"|"fine"|"object") and `question_subtype`), `pretrain.json` (captions, `question_type` "caption"; as many
    as `num_train` unless `num_pretrain` is given), `boxes.json` (every record's object boxes, MG-LLaVA format),
    `images/<split>/<id>.png` (paths in the records are relative to `out_dir`) and `dataset_info.json` (the arguments;
    written last). If `dataset_info.json` already records the same arguments and every file exists, nothing is
    regenerated (resumable demo runs). `subtypes` ({question type: subset of SUBTYPES[type]}) restricts the questions
    asked of a type. `train_turns` > 1 asks up to that many different questions per training image (a multi-turn
    conversation: more supervised answers per pass over the visual tokens; never the same question twice, which the
    model could answer by copying its earlier answer, so fewer turns when the mix has fewer questions); `router.json` holds
    `num_router` single-question training samples, for training that needs one instruction per image (the AVG
    router). `num_objects` (0-3) objects per image: 0 leaves them out (no object questions, empty box records).
    """
    geometry = Geometry(tile_size, patch_size)
    num_pretrain = num_train if num_pretrain is None else num_pretrain
    counts = {"train": num_train, "val": num_val, "test": num_test, "pretrain": num_pretrain, "router": num_router}
    for split, n in counts.items():
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"generate_dataset: the number of {split} samples must be an int >= 0, got {n!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"generate_dataset: seed must be an int >= 0, got {seed!r}")
    mix = dict(DEFAULT_QUESTION_MIX if question_mix is None else question_mix)
    if set(mix) - set(QUESTION_TYPES) or any(not w >= 0 for w in mix.values()) or sum(mix.values()) <= 0:
        raise ValueError(
            f"generate_dataset: question_mix must map {QUESTION_TYPES} to weights >= 0 (not all 0), got {mix}"
        )
    if not isinstance(num_objects, int) or isinstance(num_objects, bool) or not 0 <= num_objects <= len(PATTERNS):
        raise ValueError(f"generate_dataset: num_objects must be an int from 0 to {len(PATTERNS)}, got {num_objects!r}")
    if num_objects == 0 and mix.get("object", 0) > 0:
        raise ValueError("generate_dataset: question_mix asks object questions but num_objects is 0")
    if not isinstance(train_turns, int) or isinstance(train_turns, bool) or train_turns < 1:
        raise ValueError(f"generate_dataset: train_turns must be an int >= 1, got {train_turns!r}")
    subtypes = {kind: tuple(names) for kind, names in (subtypes or {}).items()}
    for kind, names in subtypes.items():
        if kind not in SUBTYPES or not names or set(names) - set(SUBTYPES[kind]):
            raise ValueError(f"generate_dataset: subtypes must map a question type of {QUESTION_TYPES} to a non-empty "
                             f"subset of its SUBTYPES, got {kind!r}: {names!r}")
    types = [t for t in QUESTION_TYPES if mix.get(t, 0) > 0]
    weights = np.array([mix[t] for t in types], dtype=np.float64)
    weights /= weights.sum()

    root = os.fspath(out_dir)
    paths = {"root": root, "image_folder": root}
    paths.update({name: os.path.join(root, f"{name}.json") for name in (*SPLITS, "boxes")})
    paths["info"] = os.path.join(root, INFO_FILE)
    info = {
        "generator": "multigran.data.synthetic",
        "format_version": FORMAT_VERSION,
        "arguments": dict(counts=counts, seed=seed, tile_size=tile_size, patch_size=patch_size, question_mix=mix,
                          train_turns=train_turns, num_objects=num_objects,
                          subtypes={kind: list(names) for kind, names in sorted(subtypes.items())}),
        "image_size": geometry.image_size,
        "patch_grid": geometry.grid,
        "cells": geometry.cells,
        "question_suffix": QUESTION_SUFFIX,
    }
    if _is_complete(paths, info):
        return paths

    seen: set[bytes] = set()
    box_records = []
    for split_index, split in enumerate(SPLITS):
        os.makedirs(os.path.join(root, "images", split), exist_ok=True)
        records = []
        for i in range(counts[split]):
            rng = np.random.default_rng([seed, split_index, i])
            while True:  # redraw the (astronomically rare) image already used anywhere
                scene = sample_scene(rng, geometry, num_objects)
                image = render_scene(scene, geometry)
                digest = _hash(image)
                if digest not in seen:
                    seen.add(digest)
                    break
            sample_id = f"{split}-{i:06d}"
            relative = f"images/{split}/{sample_id}.png"
            Image.fromarray(image).save(os.path.join(root, relative), format="PNG")
            if split == "pretrain":
                turns, qtype, subtype = [(CAPTION_INSTRUCTION, caption(scene))], "caption", "caption"
            else:
                turns, kinds = [], []
                for _ in range(train_turns if split == "train" else 1):
                    for _attempt in range(20):  # a different question each turn
                        kind = types[rng.choice(len(types), p=weights)]
                        subtype, question, answer = ask(scene, kind, rng, subtypes.get(kind))
                        if all(question_prompt(question) != q for q, _ in turns):
                            break
                    else:  # the mix asks no other question about this image
                        break
                    turns.append((question_prompt(question), answer))
                    kinds.append((kind, subtype))
                qtype, subtype = kinds[0] if len(kinds) == 1 else ("multi", "multi")
            conversations = []
            for index, (human, answer) in enumerate(turns):
                if index == 0:
                    human = f"<image>\n{human}"
                conversations += [{"from": "human", "value": human},
                                  {"from": "gpt", "value": answer}]
            records.append(
                {
                    "id": sample_id,
                    "image": relative,
                    "conversations": conversations,
                    "question_type": qtype,
                    "question_subtype": subtype,
                }
            )
            box_records.append(
                {
                    "id": sample_id,
                    "boxes": [list(o.box) for o in scene.objects],
                    "scores": [1.0] * len(scene.objects),
                    "labels": [BOX_LABEL] * len(scene.objects),
                }
            )
        _write_json(paths[split], records)
    _write_json(paths["boxes"], box_records)
    _write_json(paths["info"], info)
    return paths


def _is_complete(paths: dict[str, str], info: dict) -> bool:
    try:
        with open(paths["info"]) as f:
            if json.load(f) != info:
                return False
    except (OSError, ValueError):
        return False
    return all(os.path.exists(paths[k]) for k in (*SPLITS, "boxes"))
