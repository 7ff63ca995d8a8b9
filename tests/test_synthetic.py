"""Tests of the synthetic granularity benchmark (multigran.data.synthetic) and the word-level tokenizer.

The key property is checked by construction on pixels, with pooling written out here: the two answers of a fine
question give bit-identical 4x4 (and 2x4, 2x2) average-pooled pixels but different per-patch pixels, while coarse
answers are recovered from the 4x4-pooled pixels alone by a nearest-centroid classifier.
"""

import dataclasses
import hashlib
import json
import os
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image
from transformers import AutoTokenizer

from multigran.data import synthetic as syn
from multigran.data.word_tokenizer import SPECIAL_TOKENS, build_word_tokenizer

RECORD_KEYS = {"id", "image", "conversations", "question_type", "question_subtype"}
SPLITS = ("train", "val", "test", "pretrain")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    paths = syn.generate_dataset(out, num_train=150, num_val=40, num_test=60, num_pretrain=30, seed=3)
    records = {split: json.load(open(paths[split])) for split in SPLITS}
    boxes = {entry["id"]: entry for entry in json.load(open(paths["boxes"]))}
    return paths, records, boxes


def load_image(paths, record):
    return np.asarray(Image.open(os.path.join(paths["image_folder"], record["image"])).convert("RGB"))


def question_of(record):
    return record["conversations"][0]["value"].split("\n")[1]


def answer_of(record):
    return record["conversations"][1]["value"]


def pooled_sums(image, patch, kernel):
    """Slow reference pooling: pixel sums over every (kernel_rows x kernel_cols)-patch window, by explicit loops."""
    rows, cols = kernel[0] * patch, kernel[1] * patch
    out = {}
    for top in range(0, image.shape[0], rows):
        for left in range(0, image.shape[1], cols):
            out[(top, left)] = image[top : top + rows, left : left + cols].astype(np.int64).sum(axis=(0, 1)).tolist()
    return out


NAME_OF_RGB = {rgb: name for name, rgb in syn.PALETTE.items()}


def palette_name(rgb):
    return NAME_OF_RGB.get(tuple(int(v) for v in rgb))


# --------------------------------------------------------------------------------------------------------- formats


def test_records_follow_the_llava_format_and_images_are_small_pngs(dataset):
    paths, records, _ = dataset
    assert [len(records[s]) for s in SPLITS] == [150, 40, 60, 30]
    ids = [r["id"] for s in SPLITS for r in records[s]]
    assert len(ids) == len(set(ids))
    answers = set(syn.answer_vocabulary())
    for split in SPLITS:
        for record in records[split]:
            assert set(record) == RECORD_KEYS
            assert record["image"] == f"images/{split}/{record['id']}.png"
            human, gpt = record["conversations"]
            assert human["from"] == "human" and gpt["from"] == "gpt"
            assert human["value"].startswith("<image>\n") and human["value"].count("<image>") == 1
            path = os.path.join(paths["image_folder"], record["image"])
            assert os.path.getsize(path) < 4096
            with Image.open(path) as image:
                assert image.format == "PNG" and image.mode == "RGB" and image.size == (96, 96)
            if split == "pretrain":
                assert record["question_type"] == record["question_subtype"] == "caption"
                assert human["value"] == "<image>\n" + syn.CAPTION_INSTRUCTION
                assert len(gpt["value"].split()) > 10
            else:
                assert record["question_type"] in syn.QUESTION_TYPES
                assert record["question_subtype"] in syn.SUBTYPES[record["question_type"]]
                assert human["value"].endswith("?\n" + syn.QUESTION_SUFFIX)
                assert gpt["value"] in answers
    types = Counter(r["question_type"] for r in records["train"])
    assert set(types) == set(syn.QUESTION_TYPES)  # the default mix asks all three kinds


def test_box_file_follows_the_mg_llava_format(dataset):
    _, records, boxes = dataset
    assert set(boxes) == {r["id"] for s in SPLITS for r in records[s]}
    for entry in boxes.values():
        assert set(entry) == {"id", "boxes", "scores", "labels"}
        assert len(entry["boxes"]) == len(entry["scores"]) == len(entry["labels"]) == syn.NUM_OBJECTS
        assert entry["scores"] == [1.0] * syn.NUM_OBJECTS
        assert all(isinstance(label, str) and label for label in entry["labels"])
        for x1, y1, x2, y2 in entry["boxes"]:
            assert 0 <= x1 < x2 <= 96 and 0 <= y1 < y2 <= 96 and x2 - x1 == y2 - y1 == 12


# ---------------------------------------------------------------------- answers are right (independent decoders)


def decode_object(crop):
    """Colour and texture of an object crop, read from its pixels: stripes are constant along rows or columns."""
    rows_constant = all((crop[v] == crop[v, 0]).all() for v in range(crop.shape[0]))
    cols_constant = all((crop[:, u] == crop[0, u]).all() for u in range(crop.shape[1]))
    assert not (rows_constant and cols_constant), "an object must be textured"
    if rows_constant:
        pattern = "horizontal"
    elif cols_constant:
        pattern = "vertical"
    else:
        assert (crop[0, 0] == crop[1, 1]).all() and (crop[0, 1] == crop[1, 0]).all()
        assert (crop[0, 0] != crop[0, 1]).any()
        pattern = "checkered"
    return palette_name(crop[0, 0]), pattern


def commonest_colours(image, k):
    packed = image.reshape(-1, 3).astype(np.int64) @ np.array([1 << 16, 1 << 8, 1])
    codes, counts = np.unique(packed, return_counts=True)
    top = codes[np.argsort(-counts, kind="stable")[:k]]
    return [palette_name((c >> 16, (c >> 8) & 255, c & 255)) for c in top]


def decode_dots(image, exclude, patch=8):
    """The dots: patch-aligned uniform patches whose colour is not in `exclude` (background and shape colours)."""
    n = image.shape[0] // patch
    blocks = image.reshape(n, patch, n, patch, 3)
    uniform = (blocks == blocks[:, :1, :, :1]).all(axis=(1, 3, 4))  # (n, n)
    dots = {}
    for row, col in zip(*np.nonzero(uniform)):
        colour = palette_name(image[row * patch, col * patch])
        if colour not in exclude:
            assert colour not in dots
            dots[colour] = (int(row), int(col))
    return dots


def answer_fine_question(dots, question):
    """Answer a dot question from the dot positions {colour: (row, col)}."""
    (c1, (r1, k1)), (c2, (r2, k2)) = sorted(dots.items(), key=lambda item: item[1])  # upper/left first
    vertical = r2 > r1
    match = re.match(r"Is the (\w+) dot (above or below|left or right of) the (\w+) dot\?", question)
    if match:
        x, relation, y = match.groups()
        assert {x, y} == {c1, c2} and (relation == "above or below") == vertical
        return ("above" if x == c1 else "below") if vertical else ("left" if x == c1 else "right")
    word = re.match(r"What color is the (upper|lower|left|right) dot\?", question).group(1)
    assert (word in ("upper", "lower")) == vertical
    return {"upper": c1, "left": c1, "lower": c2, "right": c2}[word]


def test_answers_match_what_the_pixels_show(dataset):
    paths, records, boxes = dataset
    checked = Counter()
    for split in ("train", "val", "test"):
        for record in records[split]:
            image = load_image(paths, record)
            question, answer, subtype = question_of(record), answer_of(record), record["question_subtype"]
            objects = [decode_object(image[y1:y2, x1:x2]) for x1, y1, x2, y2 in boxes[record["id"]]["boxes"]]
            assert sorted(p for _, p in objects) == sorted(syn.PATTERNS) and len({c for c, _ in objects}) == 3
            background, shape = commonest_colours(image, 2)
            dots = decode_dots(image, exclude=(background, shape))
            assert len(dots) == 2
            (r1, k1), (r2, k2) = sorted(dots.values())  # upper/left first
            assert (r2 - r1, k2 - k1) in ((1, 0), (0, 1))
            assert r1 // 4 == r2 // 4 and k1 // 4 == k2 // 4  # one coarsest-level cell
            assert (r1 % 2 == 0) if r2 > r1 else (k1 % 2 == 0)  # one 2x2 window
            orientation = "vertical" if r2 > r1 else "horizontal"
            if subtype == "background_color":
                assert answer == background
            elif subtype == "shape_color":
                assert answer == shape
            elif record["question_type"] == "fine":
                assert subtype.endswith(orientation)
                assert answer == answer_fine_question(dots, question)
            elif subtype == "object_pattern":
                colour = re.match(r"What pattern does the (\w+) object have\?", question).group(1)
                assert answer == dict(objects)[colour]
            elif subtype == "object_color":
                pattern = next(p for p in syn.PATTERNS if p in question)
                assert answer == {p: c for c, p in objects}[pattern]
            checked[subtype] += 1
    assert set(checked) >= set(syn.SUBTYPES["coarse"][:2]) | set(syn.SUBTYPES["fine"]) | set(syn.SUBTYPES["object"])


# ------------------------------------------------------------------------------- the granularity property itself


@pytest.mark.parametrize("tile_size", [64, 96, 128])
def test_fine_answers_are_invisible_after_coarse_pooling_but_visible_per_patch(tile_size):
    """Swapping the two dots flips every fine answer; the pooled pixels of levels 0-2 (and 3 for horizontal pairs)
    stay bit-identical, the per-patch pixels do not. Levels: AVG-LLaVA's kernels in patches, rows x cols."""
    geometry = syn.Geometry(tile_size, 8)
    same = Counter()
    for i in range(40):
        rng = np.random.default_rng([11, i])
        scene = syn.sample_scene(rng, geometry)
        flipped = dataclasses.replace(scene, dot_colors=scene.dot_colors[::-1])
        a, b = syn.render_scene(scene, geometry), syn.render_scene(flipped, geometry)
        exclude = (scene.background, scene.shape_color)
        for _ in range(4):  # every fine question has the other answer on the flipped scene
            _, question, answer = syn.ask(scene, "fine", rng)
            assert answer == answer_fine_question(decode_dots(a, exclude), question)
            assert answer != answer_fine_question(decode_dots(b, exclude), question)
        for level, kernel in enumerate([(4, 4), (2, 4), (2, 2), (1, 2), (1, 1)]):
            equal = pooled_sums(a, 8, kernel) == pooled_sums(b, 8, kernel)
            same[level, scene.dot_orientation] += equal
    assert same[0, "vertical"] + same[0, "horizontal"] == 40  # coarsest: always identical
    for orientation in ("vertical", "horizontal"):
        n = same[0, orientation]
        assert n > 5
        assert same[1, orientation] == same[2, orientation] == n
        assert same[3, orientation] == (n if orientation == "horizontal" else 0)
        assert same[4, orientation] == 0  # finest: always different


def test_coarse_answers_are_recovered_from_coarsest_pooled_pixels():
    """Nearest-centroid classifier on the 3x3 grid of 4x4-patch cell means (27 numbers), classes = (background,
    shape colour, shape kind), fitted on one set of scenes and scored on another."""
    geometry = syn.Geometry(96, 8)

    def features(seed, n):
        x, y = [], []
        for i in range(n):
            scene = syn.sample_scene(np.random.default_rng([seed, i]), geometry)
            image = syn.render_scene(scene, geometry).astype(np.float64)
            x.append(image.reshape(3, 32, 3, 32, 3).mean(axis=(1, 3)).ravel())
            y.append((scene.background, scene.shape_color, scene.shape))
        return np.array(x), y

    x_fit, y_fit = features(21, 1200)
    x_eval, y_eval = features(22, 300)
    classes = sorted(set(y_fit))
    centroids = np.stack([x_fit[[label == c for label in y_fit]].mean(axis=0) for c in classes])
    nearest = ((x_eval[:, None] - centroids[None]) ** 2).sum(-1).argmin(axis=1)
    predicted = [classes[j] for j in nearest]
    for attribute in range(3):  # background colour, shape colour, shape kind
        accuracy = np.mean([p[attribute] == t[attribute] for p, t in zip(predicted, y_eval)])
        assert accuracy >= 0.95, (attribute, accuracy)
    assert {t[2] for t in y_eval} == set(syn.SHAPES)


def test_object_textures_are_erased_by_a_2x_downscale_but_not_at_full_resolution():
    for colour in syn.PALETTE:
        full = [syn.texture(p, colour, 12).astype(np.int64) for p in syn.PATTERNS]
        half = [t.reshape(6, 2, 6, 2, 3).sum(axis=(1, 3)) for t in full]
        assert all((h == half[0]).all() for h in half)
        assert all((full[i] != full[j]).any() for i in range(3) for j in range(i + 1, 3))


# ------------------------------------------------------------------------------------- splits and determinism


def image_hashes(paths, records):
    return {r["id"]: hashlib.sha256(open(os.path.join(paths["image_folder"], r["image"]), "rb").read()).hexdigest()
            for r in records}


def test_no_image_is_shared_between_or_within_splits(dataset):
    paths, records, _ = dataset
    hashes = [h for split in SPLITS for h in image_hashes(paths, records[split]).values()]
    assert len(hashes) == 280 and len(set(hashes)) == len(hashes)


def test_generation_is_deterministic_per_seed_and_per_sample(tmp_path):
    kwargs = dict(num_train=12, num_val=4, num_test=4, num_pretrain=3)
    a = syn.generate_dataset(tmp_path / "a", seed=5, **kwargs)
    b = syn.generate_dataset(tmp_path / "b", seed=5, **kwargs)
    c = syn.generate_dataset(tmp_path / "c", seed=6, **kwargs)
    fewer = syn.generate_dataset(tmp_path / "fewer", seed=5, **{**kwargs, "num_train": 6})
    for name in (*SPLITS, "boxes"):
        assert open(a[name], "rb").read() == open(b[name], "rb").read()
    records = {k: {s: json.load(open(p[s])) for s in SPLITS} for k, p in dict(a=a, b=b, c=c, fewer=fewer).items()}
    for split in SPLITS:
        assert image_hashes(a, records["a"][split]) == image_hashes(b, records["b"][split])
        other_seed = set(image_hashes(c, records["c"][split]).values())
        assert not set(image_hashes(a, records["a"][split]).values()) & other_seed
    # a sample does not depend on how many others were drawn
    assert records["fewer"]["train"] == records["a"]["train"][:6]
    first_six = dict(list(image_hashes(a, records["a"]["train"]).items())[:6])
    assert image_hashes(fewer, records["fewer"]["train"]) == first_six
    assert records["fewer"]["test"] == records["a"]["test"]


def test_an_image_drawn_twice_is_redrawn(tmp_path, monkeypatch):
    real = syn.sample_scene
    calls = []

    def first_draws_collide(rng, geometry=syn.Geometry(), fixed_dots=False, bars=False, textured_dots=False):
        calls.append(1)
        chosen = np.random.default_rng(0) if len(calls) <= 2 else rng
        return real(chosen, geometry, fixed_dots, bars, textured_dots)

    monkeypatch.setattr(syn, "sample_scene", first_draws_collide)
    paths = syn.generate_dataset(tmp_path, num_train=1, num_val=1, num_test=0, num_pretrain=0)
    assert len(calls) == 3  # train-0 drew the scene, val-0 drew it again and was redrawn
    hashes = [h for s in ("train", "val") for h in image_hashes(paths, json.load(open(paths[s]))).values()]
    assert len(set(hashes)) == 2


def test_a_complete_dataset_is_reused_and_a_different_request_regenerates(tmp_path):
    kwargs = dict(num_train=4, num_val=2, num_test=2, num_pretrain=0, seed=1)
    paths = syn.generate_dataset(tmp_path, **kwargs)
    os.utime(paths["train"], (1, 1))
    assert syn.generate_dataset(tmp_path, **kwargs) == paths
    assert os.path.getmtime(paths["train"]) == 1  # untouched
    syn.generate_dataset(tmp_path, **{**kwargs, "num_train": 5})
    assert len(json.load(open(paths["train"]))) == 5


def test_question_mix_selects_the_kinds_asked(tmp_path):
    paths = syn.generate_dataset(
        tmp_path, num_train=60, num_val=0, num_test=0, num_pretrain=0, question_mix={"fine": 1.0}
    )
    records = json.load(open(paths["train"]))
    assert {r["question_type"] for r in records} == {"fine"}
    assert {"above", "below", "left", "right"} <= {answer_of(r) for r in records}


# ------------------------------------------------------------------------------------------------- vocabulary


def test_every_generated_word_is_in_the_vocabulary(dataset):
    _, records, _ = dataset
    vocabulary, answers = set(syn.all_words()), set(syn.answer_vocabulary())
    assert answers <= vocabulary and len(answers) == len(syn.PALETTE) + 4 + 3 + 4
    for split in SPLITS:
        for record in records[split]:
            for turn in record["conversations"]:
                words = re.findall(r"\w+|[^\w\s]", turn["value"].replace("<image>", "").lower())
                assert set(words) <= vocabulary, set(words) - vocabulary
    assert syn.question_prompt("What?") == "What?\n" + syn.QUESTION_SUFFIX


# ------------------------------------------------------------------------------------------------- bad input


def test_bad_arguments_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="multiple of 4 \\* patch_size"):
        syn.Geometry(100, 8)
    with pytest.raises(ValueError, match="at least 2x2 cells"):
        syn.Geometry(32, 8)
    with pytest.raises(ValueError, match="even"):
        syn.Geometry(96, 3)
    with pytest.raises(TypeError, match="tile_size"):
        syn.Geometry(96.0, 8)
    with pytest.raises(ValueError, match="train"):
        syn.generate_dataset(tmp_path, num_train=-1)
    with pytest.raises(ValueError, match="seed"):
        syn.generate_dataset(tmp_path, num_train=1, seed=-2)
    with pytest.raises(ValueError, match="question_mix"):
        syn.generate_dataset(tmp_path, num_train=1, question_mix={"medium": 1.0})
    scene = syn.sample_scene(np.random.default_rng(0))
    with pytest.raises(ValueError, match="question_type"):
        syn.ask(scene, "medium", np.random.default_rng(0))
    with pytest.raises(ValueError, match="colour 'teal'"):
        syn.render_scene(dataclasses.replace(scene, background="teal"))
    with pytest.raises(ValueError, match="outside"):
        syn.render_scene(dataclasses.replace(scene, dot_patches=((12, 0), (12, 1))))
    assert not os.path.exists(os.path.join(tmp_path, "train.json"))


# -------------------------------------------------------------------------------------------- word tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_word_tokenizer(syn.all_words())


def test_tokenizer_gives_one_token_per_generator_word_and_never_unk(tokenizer, dataset):
    _, records, _ = dataset
    assert tokenizer.convert_ids_to_tokens(list(range(5))) == list(SPECIAL_TOKENS)
    assert tokenizer.image_token == "<image>" and tokenizer.image_token_id == 4
    ids = (tokenizer.unk_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    assert ids == (0, 1, 2, 3)
    for word in syn.all_words():
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and ids[0] != tokenizer.unk_token_id and tokenizer.convert_ids_to_tokens(ids) == [word]
    for split in SPLITS:
        for record in records[split]:
            for turn in record["conversations"]:
                ids = tokenizer(turn["value"])["input_ids"]
                assert tokenizer.unk_token_id not in ids
                assert ids.count(tokenizer.image_token_id) == (turn["from"] == "human")


def test_tokenizer_round_trip_gives_space_separated_words(tokenizer):
    text = "What color is the big shape?\nAnswer the question using a single word or phrase."
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and len(ids) == 1 + 17
    assert tokenizer.decode(ids, skip_special_tokens=True) == (
        "what color is the big shape ? answer the question using a single word or phrase ."
    )
    answer = tokenizer("checkered", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert tokenizer.decode(answer, skip_special_tokens=True) == "checkered"
    assert tokenizer.decode(tokenizer("Red blue", add_special_tokens=False)["input_ids"]) == "red blue"
    assert tokenizer("zebra", add_special_tokens=False)["input_ids"] == [tokenizer.unk_token_id]


def test_chat_template_for_one_image_message(tokenizer):
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the background?"}]}
    prompt = tokenizer.apply_chat_template([user], add_generation_prompt=True, tokenize=False)
    assert prompt == "<s>USER: <image>\nWhat color is the background? ASSISTANT:"
    ids = tokenizer.apply_chat_template([user], add_generation_prompt=True)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == [
        "<s>", "user", ":", "<image>", "what", "color", "is", "the", "background", "?", "assistant", ":"
    ]
    chat = [user, {"role": "assistant", "content": "red"}, {"role": "user", "content": "What color is the big shape?"}]
    assert tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) == (
        "<s>USER: <image>\nWhat color is the background? ASSISTANT: red</s>"
        "USER: What color is the big shape? ASSISTANT:"
    )


def test_tokenizer_saves_and_reloads_with_autotokenizer(tmp_path, tokenizer):
    saved = build_word_tokenizer(syn.all_words(), out_dir=tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded.get_vocab() == saved.get_vocab() == tokenizer.get_vocab()
    text = "<image>\nIs the red dot above or below the blue dot?"
    assert reloaded(text)["input_ids"] == saved(text)["input_ids"]
    assert reloaded.image_token_id == 4 and reloaded.eos_token == "</s>" and reloaded.pad_token_id == 1
    content = [{"type": "image"}, {"type": "text", "text": "What color is the big shape?"}]
    message = [{"role": "user", "content": content}]
    assert reloaded.apply_chat_template(message, add_generation_prompt=True, tokenize=False) == (
        saved.apply_chat_template(message, add_generation_prompt=True, tokenize=False)
    )


def test_tokenizer_rejects_bad_words():
    with pytest.raises(ValueError, match="'big shape' is not a single word"):
        build_word_tokenizer(["red", "big shape"])
    with pytest.raises(TypeError, match="must be a str"):
        build_word_tokenizer(["red", 3])
    with pytest.raises(TypeError, match="not a single string"):
        build_word_tokenizer("red")


def test_fixed_dots_and_coarse_subtypes(tmp_path):
    """The demo's easier variant: the dot pair always at the same patches, only the chosen coarse questions."""
    paths = syn.generate_dataset(tmp_path, num_train=40, num_val=0, num_test=0, num_pretrain=0, fixed_dots=True,
                                 coarse_subtypes=("background_color", "shape_color"))
    records = json.load(open(paths["train"]))
    assert {r["question_subtype"] for r in records if r["question_type"] == "coarse"} <= {"background_color",
                                                                                         "shape_color"}
    for i in range(20):
        scene = syn.sample_scene(np.random.default_rng(i), syn.Geometry(), fixed_dots=True)
        first, second = scene.dot_patches
        assert first == ((0, 1) if scene.dot_orientation == "vertical" else (1, 0))
        assert second == (first[0] + 1, first[1]) if scene.dot_orientation == "vertical" else (first[0], first[1] + 1)
    with pytest.raises(ValueError, match="coarse_subtypes must be a non-empty subset"):
        syn.generate_dataset(tmp_path, num_train=1, coarse_subtypes=("shape_size",))


@pytest.mark.parametrize("fixed_dots", [False, True])
def test_textured_dots_keep_the_pooling_property(fixed_dots):
    """Striped dots (horizontal stripes on the first, vertical on the second): swapping their colours still leaves
    levels 0-2 (and 3 for side-by-side dots) bit-identical while the finest level changes."""
    geometry = syn.Geometry(96, 8)
    for i in range(12):
        scene = syn.sample_scene(np.random.default_rng([6, i]), geometry, fixed_dots=fixed_dots, textured_dots=True)
        flipped = dataclasses.replace(scene, dot_colors=scene.dot_colors[::-1])
        a, b = syn.render_scene(scene, geometry), syn.render_scene(flipped, geometry)
        (r1, c1), _ = scene.dot_patches
        first = a[r1 * 8:(r1 + 1) * 8, c1 * 8:(c1 + 1) * 8]
        assert (first[0] != first[1]).any() and (first[:, 0] == first[:, 1]).all()  # horizontal stripes
        for level, kernel in enumerate([(4, 4), (2, 4), (2, 2), (1, 2), (1, 1)]):
            equal = (pooled_sums(a, 8, kernel) == pooled_sums(b, 8, kernel))
            assert equal == (level <= 2 or (level == 3 and scene.dot_orientation == "horizontal")), level


@pytest.mark.parametrize("fixed_dots", [False, True])
def test_bars_keep_the_pooling_property(fixed_dots):
    """Bars (4 patches each) instead of dots: swapping their colours still leaves levels 0-2 (and 3 for side-by-side
    bars) bit-identical while the finest level changes."""
    geometry = syn.Geometry(96, 8)
    for i in range(12):
        scene = syn.sample_scene(np.random.default_rng([5, i]), geometry, fixed_dots=fixed_dots, bars=True)
        assert scene.mark_word == "bar"
        flipped = dataclasses.replace(scene, dot_colors=scene.dot_colors[::-1])
        a, b = syn.render_scene(scene, geometry), syn.render_scene(flipped, geometry)
        assert (a != b).any(axis=-1).sum() == 2 * 4 * 8 * 8  # two 4-patch bars of 8x8-pixel patches changed
        for level, kernel in enumerate([(4, 4), (2, 4), (2, 2), (1, 2), (1, 1)]):
            equal = (pooled_sums(a, 8, kernel) == pooled_sums(b, 8, kernel))
            expected = level <= 2 or (level == 3 and scene.dot_orientation == "horizontal")
            assert equal == expected, (level, scene.dot_orientation)
        assert "bar" in syn.ask(scene, "fine", np.random.default_rng(i))[1]


def test_multi_turn_training_and_the_router_split(tmp_path):
    paths = syn.generate_dataset(tmp_path, num_train=20, num_val=5, num_test=5, num_pretrain=0, num_router=7,
                                 train_turns=4, fixed_dots=True)
    train = json.load(open(paths["train"]))
    for record in train:
        turns = record["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * 4
        assert turns[0]["value"].startswith("<image>\n") and all("<image>" not in t["value"] for t in turns[1:])
        assert len({t["value"] for t in turns[::2]}) == 4  # four different questions about the one image
    router = json.load(open(paths["router"]))
    assert len(router) == 7 and all(len(r["conversations"]) == 2 for r in router)
    hashes = [h for split in ("train", "val", "test", "router") for h in image_hashes(paths, json.load(open(paths[split]))).values()]
    assert len(set(hashes)) == len(hashes)  # no image in two places
