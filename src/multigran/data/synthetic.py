"""The built-in synthetic granularity benchmark used by `multigran demo`.

A seeded procedural generator of small square images with LLaVA-format questions whose answers need different visual
granularities. Everything is written as real files (PNG + LLaVA JSON + an MG-LLaVA box file), so the demo goes
through the same data path as user data.

Geometry (why one tile)
-----------------------
An image is exactly ONE AnyRes tile: `image_size == tile_size` (default 96 px) with `patch_size` 8, so the vision
tower sees an n x n patch grid (n = 12) and the AnyRes base view (whole image resized to the tile size) is the same
pixels as the tile. The guarantees below are stated on pixels aligned to the patch grid; they hold exactly in every
view the model sees only if no view resamples the image. With 2 x 2 tiles the base view would be a 2x downscale: an
8-px mark becomes half a patch, two marks swap places inside ONE base patch, and that patch's own feature (not an
average of several) changes, so average pooling of the base view would no longer remove the fine information.

AVG-LLaVA's levels pool the n x n grid with kernels (rows x cols) 4x4, 2x4, 2x2, 1x2, 1x1 (level 0 = coarsest). A
"cell" below is one 4x4-patch window (32 px): the image has (n/4) x (n/4) cells (3 x 3 by default).

Every image holds the same four things, whatever is asked (so only the INSTRUCTION tells which level is needed):
- background: one solid palette colour;
- big shape: a circle, ring, triangle or bar about 0.76 of the image wide, centred (+- half a patch), one colour.
  Their 3x3 cell-coverage patterns differ by >= 0.4 of a cell (ring: empty centre cell; bar: empty top/bottom
  rows; triangle: empty top corners), so kind and colours are readable from the 4x4-pooled pixels: COARSE questions.
- two dots: one patch each (exactly `patch_size` px, aligned to the patch grid), two different colours, adjacent,
  inside one cell. Vertical pairs start on an even patch row, horizontal pairs on an even patch column, so the pair
  lies in one window of the 4x4, 2x4 and 2x2 kernels (horizontal pairs also in one 1x2 window). Swapping the two
  colours therefore leaves every pooled window of those levels bit-identical, while the per-patch pixels differ:
  FINE questions ("is the red dot above or below the blue dot?", "what color is the left dot?") are at chance
  (50 %) from levels 0-2 and answerable from level 3 (vertical pairs) or level 4 (horizontal pairs).
- three objects: 1.5-patch squares (12 px) at arbitrary pixel positions (not patch aligned), each with its own
  colour and a 1-px texture (horizontal stripes, vertical stripes or checkered; a permutation of the three) that
  alternates the colour with a greyer shade. All three textures have the same mean over any 2x2 pixel block of the
  object's interior, so any 2x downscale (e.g. MG-LLaVA's low-resolution view) erases the texture, while the box
  crop at full resolution shows it. OBJECT questions ("what pattern does the red object have?", "what color is the
  checkered object?"); their ground-truth boxes go to `boxes.json` (MG-LLaVA box-file format).

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
DIRECTIONS = ("above", "below", "left", "right")
QUESTION_TYPES = ("coarse", "fine", "object")
SUBTYPES = {
    "coarse": ("background_color", "shape_color", "shape_kind"),
    "fine": ("dot_order_vertical", "dot_order_horizontal", "dot_color_vertical", "dot_color_horizontal"),
    "object": ("object_pattern", "object_color"),
}
DEFAULT_QUESTION_MIX = {"coarse": 0.4, "fine": 0.4, "object": 0.2}
SPLITS = ("train", "val", "test", "pretrain", "router")  # a split's index is part of every sample's seed

# LLaVA-1.5's short-answer suffix (its VQAv2/GQA evaluation prompts), also MG-LLaVA's.
QUESTION_SUFFIX = "Answer the question using a single word or phrase."
CAPTION_INSTRUCTION = "Describe the image briefly."
NUM_OBJECTS = 3
BOX_LABEL = "object"
INFO_FILE = "dataset_info.json"
FORMAT_VERSION = 1

_SHAPE_RADIUS = 0.38  # of the image side; see the coverage argument in the module docstring
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
        if self.patch_size < 2 or self.patch_size % 2:
            raise ValueError(
                f"Geometry.patch_size must be even and >= 2 (object textures are 1-px), got {self.patch_size}"
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
    dot_orientation: str  # "vertical" or "horizontal"
    dot_patches: tuple[tuple[int, int], tuple[int, int]]  # (row, col) patch indices; first = upper / left dot
    dot_colors: tuple[str, str]  # colours of the first and second dot
    objects: tuple[SceneObject, ...]  # in reading order (top to bottom, then left to right)
    mark_length: int = 1  # patches a mark spans across the pair's axis: 1 = a dot, 4 = a bar across its cell
    mark_textures: tuple[str, str] | None = None  # 1-px textures of the first and second mark (None: solid)

    @property
    def mark_word(self) -> str:
        return "dot" if self.mark_length == 1 else "bar"


def _check_color(name: str) -> tuple[int, int, int]:
    if name not in PALETTE:
        raise ValueError(f"unknown colour {name!r}; the palette is {sorted(PALETTE)}")
    return PALETTE[name]


def sample_scene(rng: np.random.Generator, geometry: Geometry = Geometry(), fixed_dots: bool = False,
                 bars: bool = False, textured_dots: bool = False) -> Scene:
    """Draw one scene. Colours that must stay visible on top of each other are kept distinct.

    fixed_dots: the dot pair always starts at the same patch (top-left cell, second row/column); only its orientation
    and colours vary. The fine questions then need one patch's features, found by position, instead of a search over
    the image: the easy-to-learn variant a few CPU minutes of training can solve (`multigran demo` uses it).
    bars: each mark is a bar of 4 patches across the pair's axis (a whole cell wide), so it holds 4x the pixels of a
    dot; the pooled windows of levels 0-2 (0-3 for side-by-side bars) still contain both marks whole, so swapping
    their colours leaves them unchanged, exactly as for dots.
    textured_dots: the first (upper / left) dot has 1-px horizontal stripes, the second vertical ones (each half its
    colour, half a greyer shade, see `texture`), so a dot's place in the pair is also visible inside its own patch.
    Both textures hold the same pixels in equal numbers, so swapping the colours still leaves every pooled window
    that holds the pair unchanged.
    """
    if bars and textured_dots:
        raise ValueError("sample_scene: textured_dots applies to dots, not bars")
    colors = list(PALETTE)
    size, p, cell_px = geometry.image_size, geometry.patch_size, geometry.cell_px
    background, shape_color = (colors[i] for i in rng.choice(len(colors), 2, replace=False))
    shape = SHAPES[rng.integers(len(SHAPES))]
    jitter = p // 2
    center = (size / 2 + int(rng.integers(-jitter, jitter + 1)), size / 2 + int(rng.integers(-jitter, jitter + 1)))

    # Dots lie on the background or on the shape, so they avoid both colours.
    free = [c for c in colors if c not in (background, shape_color)]
    dot_colors = tuple(free[i] for i in rng.choice(len(free), 2, replace=False))
    orientation = ("vertical", "horizontal")[rng.integers(2)]
    cell_row, cell_col = (int(v) for v in rng.integers(geometry.cells, size=2))
    along = 2 * int(rng.integers(2))  # pair starts on an even row/col: one 2x2 (and 1x2 if horizontal) window
    across = int(rng.integers(4))
    if fixed_dots:
        cell_row, cell_col, along, across = 0, 0, 0, 1
    length = 4 if bars else 1
    if bars:
        across = 0  # the bar spans its cell
    if orientation == "vertical":
        first = (4 * cell_row + along, 4 * cell_col + across)
        second = (first[0] + 1, first[1])
    else:
        first = (4 * cell_row + across, 4 * cell_col + along)
        second = (first[0], first[1] + 1)

    # Objects: distinct colours (so a colour names one object), a permutation of the textures, anywhere except the
    # dots' cell (so the dots stay the only things there), 2 px apart from each other.
    object_colors = [free[i] for i in rng.choice(len(free), NUM_OBJECTS, replace=False)]
    patterns = [PATTERNS[i] for i in rng.permutation(len(PATTERNS))[:NUM_OBJECTS]]
    s = geometry.object_size
    dot_cell = (cell_col * cell_px, cell_row * cell_px, (cell_col + 1) * cell_px, (cell_row + 1) * cell_px)
    boxes: list[tuple[int, int, int, int]] = []
    for _ in range(100_000):
        if len(boxes) == NUM_OBJECTS:
            break
        x1, y1 = (int(v) for v in rng.integers(0, size - s + 1, size=2))
        box = (x1, y1, x1 + s, y1 + s)
        if _overlaps(box, dot_cell, gap=0) or any(_overlaps(box, other, gap=2) for other in boxes):
            continue
        boxes.append(box)
    if len(boxes) < NUM_OBJECTS:  # not reachable: >= 3 of the >= 4 cells are free and an object is < half a cell
        raise RuntimeError(f"could not place {NUM_OBJECTS} objects in a {size}px image")
    objects = [SceneObject(c, pat, b) for c, pat, b in zip(object_colors, patterns, boxes)]
    objects.sort(key=lambda o: (o.box[1], o.box[0]))
    return Scene(background, shape, shape_color, center, orientation, (first, second), dot_colors, tuple(objects),
                 length, ("horizontal", "vertical") if textured_dots else None)


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
    """(size, size, 3) uint8 object texture: the colour alternating 1-px wise with the colour pulled halfway to grey.

    Every 2x2 block of it holds two pixels of each, so all patterns have the same mean at half resolution.
    """
    rgb = np.array(_check_color(color), dtype=np.int64)
    shade = (rgb + 128) // 2
    v, u = np.mgrid[0:size, 0:size]
    if pattern == "horizontal":
        on = v % 2 == 0
    elif pattern == "vertical":
        on = u % 2 == 0
    elif pattern == "checkered":
        on = (u + v) % 2 == 0
    else:
        raise ValueError(f"unknown pattern {pattern!r}; expected one of {PATTERNS}")
    out = np.where(on[..., None], rgb, shade).astype(np.uint8)
    out.flags.writeable = False  # cached: shared between calls
    return out


def render_scene(scene: Scene, geometry: Geometry = Geometry()) -> np.ndarray:
    """Draw a scene: (image_size, image_size, 3) uint8 RGB."""
    size, p = geometry.image_size, geometry.patch_size
    background = np.array(_check_color(scene.background), dtype=np.uint8)
    shape = np.array(_check_color(scene.shape_color), dtype=np.uint8)
    image = np.where(shape_mask(scene.shape, scene.shape_center, size)[..., None], shape, background)
    rows, cols = (1, scene.mark_length) if scene.dot_orientation == "vertical" else (scene.mark_length, 1)
    textures = scene.mark_textures or (None, None)
    for (row, col), color, pattern in zip(scene.dot_patches, scene.dot_colors, textures):
        if not (0 <= row and row + rows <= geometry.grid and 0 <= col and col + cols <= geometry.grid):
            raise ValueError(f"mark at patch {(row, col)} is outside the {geometry.grid}x{geometry.grid} patch grid")
        fill = _check_color(color) if pattern is None else texture(pattern, color, p)
        image[row * p : (row + rows) * p, col * p : (col + cols) * p] = fill
    for obj in scene.objects:
        x1, y1, x2, y2 = obj.box
        if not (0 <= x1 < x2 <= size and 0 <= y1 < y2 <= size) or x2 - x1 != y2 - y1:
            raise ValueError(f"object box {obj.box} is not a square inside the {size}x{size} image")
        image[y1:y2, x1:x2] = texture(obj.pattern, obj.color, x2 - x1)
    return image


def ask(scene: Scene, question_type: str, rng: np.random.Generator, subtypes=None) -> tuple[str, str, str]:
    """One question about the scene: (subtype, question, answer); `subtypes` restricts the coarse ones asked."""
    if question_type == "coarse":
        allowed = [t for t in SUBTYPES["coarse"] if subtypes is None or t in subtypes]
        subtype = allowed[rng.integers(len(allowed))]
        if subtype == "background_color":
            return subtype, "What color is the background?", scene.background
        if subtype == "shape_color":
            return subtype, "What color is the big shape?", scene.shape_color
        return subtype, "What kind of shape is the big shape?", scene.shape
    if question_type == "fine":
        vertical = scene.dot_orientation == "vertical"
        first, second = scene.dot_colors
        if rng.integers(2) == 0:
            subtype = "dot_order_" + scene.dot_orientation
            named_first = rng.integers(2) == 0  # which dot the question names first
            x, y = (first, second) if named_first else (second, first)
            before, after = ("above", "below") if vertical else ("left", "right")
            relation = "above or below" if vertical else "left or right of"
            mark = scene.mark_word
            return subtype, f"Is the {x} {mark} {relation} the {y} {mark}?", before if named_first else after
        subtype = "dot_color_" + scene.dot_orientation
        which = int(rng.integers(2))
        word = (("upper", "lower") if vertical else ("left", "right"))[which]
        return subtype, f"What color is the {word} {scene.mark_word}?", scene.dot_colors[which]
    if question_type == "object":
        obj = scene.objects[rng.integers(len(scene.objects))]
        if rng.integers(2) == 0:
            return "object_pattern", f"What pattern does the {obj.color} object have?", obj.pattern
        phrase = _PATTERN_PHRASE[obj.pattern]
        return "object_color", f"What color is {phrase}?", obj.color
    raise ValueError(f"unknown question_type {question_type!r}; expected one of {QUESTION_TYPES}")


def caption(scene: Scene) -> str:
    """Short stage-1 caption naming everything in the image."""
    first, second = scene.dot_colors
    relation = "above" if scene.dot_orientation == "vertical" else "left of"
    objects = ", ".join(f"{o.color} {o.pattern}" for o in scene.objects)
    return (
        f"A {scene.shape_color} {scene.shape} on a {scene.background} background. "
        f"A {first} {scene.mark_word} is {relation} a {second} {scene.mark_word}. Objects: {objects}."
    )


def question_prompt(question: str) -> str:
    """The text of the human turn after the image: the question and the one-word instruction."""
    return f"{question}\n{QUESTION_SUFFIX}"


def answer_vocabulary() -> list[str]:
    """Every possible answer (one word each), sorted."""
    return sorted(set(PALETTE) | set(SHAPES) | set(PATTERNS) | set(DIRECTIONS))


def words_of(text: str) -> list[str]:
    """Lower-cased words and single punctuation marks: how the word-level tokenizer splits text."""
    return re.findall(r"\w+|[^\w\s]", text.lower())


def all_words() -> list[str]:
    """Every word that can appear in a question, answer, caption or instruction, sorted."""
    colors, texts = list(PALETTE), [QUESTION_SUFFIX, CAPTION_INSTRUCTION]
    texts += [
        "What color is the background?",
        "What color is the big shape?",
        "What kind of shape is the big shape?",
        "Is the dot above or below the dot? Is the dot left or right of the dot? bar",
        "What color is the upper lower left right dot?",
        "What pattern does the object have?",
        "A on a background. A dot is above left of a dot. Objects: , .",
    ]
    texts += [f"What color is {phrase}?" for phrase in _PATTERN_PHRASE.values()]
    words = set(colors) | set(answer_vocabulary())
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
    fixed_dots: bool = False,
    coarse_subtypes: tuple[str, ...] | None = None,
    bars: bool = False,
    textured_dots: bool = False,
    train_turns: int = 1,
    num_router: int = 0,
) -> dict[str, str]:
    """Write the benchmark under `out_dir` and return the paths of what was written.

    Files: `train.json`, `val.json`, `test.json` (one question per image, LLaVA format plus `question_type`
    ("coarse"|"fine"|"object") and `question_subtype`), `pretrain.json` (captions, `question_type` "caption"; as many
    as `num_train` unless `num_pretrain` is given), `boxes.json` (every record's object boxes, MG-LLaVA format),
    `images/<split>/<id>.png` (paths in the records are relative to `out_dir`) and `dataset_info.json` (the arguments;
    written last). If `dataset_info.json` already records the same arguments and every file exists, nothing is
    regenerated (resumable demo runs). `fixed_dots`, `bars`, `textured_dots` (see `sample_scene`) and `coarse_subtypes` (a subset of
    SUBTYPES["coarse"]) tune the difficulty. `train_turns` > 1 asks that many different questions per training image
    (a multi-turn conversation: more supervised answers per pass over the visual tokens); `router.json` holds
    `num_router` single-question training samples, for training that needs one instruction per image (the AVG
    router).
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
    if not isinstance(train_turns, int) or isinstance(train_turns, bool) or train_turns < 1:
        raise ValueError(f"generate_dataset: train_turns must be an int >= 1, got {train_turns!r}")
    if coarse_subtypes is not None and (not coarse_subtypes or set(coarse_subtypes) - set(SUBTYPES["coarse"])):
        raise ValueError(f"generate_dataset: coarse_subtypes must be a non-empty subset of {SUBTYPES['coarse']}, "
                         f"got {coarse_subtypes!r}")
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
                          fixed_dots=fixed_dots, bars=bars, textured_dots=textured_dots, train_turns=train_turns,
                          coarse_subtypes=None if coarse_subtypes is None else list(coarse_subtypes)),
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
                scene = sample_scene(rng, geometry, fixed_dots, bars, textured_dots)
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
                        subtype, question, answer = ask(scene, kind, rng, coarse_subtypes)
                        if all(question_prompt(question) != q for q, _ in turns):
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
