"""Tests of the synthetic granularity benchmark (multigran.data.synthetic) and the word-level tokenizer.

The key property is checked by construction on pixels, with pooling written out here: permuting the block's three
white-framed squares changes the fine answer but gives bit-identical 4x4, 2x4 and 2x2 average-pooled pixels (the
1x2 and per-patch pixels differ), while coarse answers are recovered from the 4x4-pooled pixels alone by a
nearest-centroid classifier. (tests/test_demo.py checks the same property on the demo model's pooled tokens.)
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


def decode_block(image, patch=8):
    """The block's squares: patch-aligned patches whose 1-px border is one frame colour around a uniform interior.
    Returns {(row, col): (frame, interior colour)} with frame "framed" (black frame) or "plain" (white frame); the
    framed square's interior is not a palette colour (None)."""
    n = image.shape[0] // patch
    found = {}
    frames = {tuple(syn.FRAMED_FRAME): "framed", tuple(syn.PLAIN_FRAME): "plain"}
    for row in range(n):
        for col in range(n):
            square = image[row * patch:(row + 1) * patch, col * patch:(col + 1) * patch]
            border = np.concatenate([square[0], square[-1], square[1:-1, 0], square[1:-1, -1]])
            interior = square[1:-1, 1:-1]
            if (border == border[0]).all() and tuple(border[0]) in frames and (interior == interior[0, 0]).all():
                found[(row, col)] = (frames[tuple(border[0])], palette_name(interior[0, 0]))
    return found


def answer_fine_question(block):
    """The colour of the square left of the (only) black-framed square, from the decoded block."""
    (row, col), = [position for position, (frame, _) in block.items() if frame == "framed"]
    return block[(row, col - 1)][1]


def test_answers_match_what_the_pixels_show(dataset):
    paths, records, boxes = dataset
    checked = Counter()
    for split in ("train", "val", "test"):
        for record in records[split]:
            image = load_image(paths, record)
            question, answer, subtype = question_of(record), answer_of(record), record["question_subtype"]
            objects = [decode_object(image[y1:y2, x1:x2]) for x1, y1, x2, y2 in boxes[record["id"]]["boxes"]]
            assert sorted(p for _, p in objects) == sorted(syn.PATTERNS) and len({c for c, _ in objects}) == 3
            assert "white" not in {c for c, _ in objects}
            assert all(x1 % 2 == 0 and y1 % 2 == 0 for x1, y1, *_ in boxes[record["id"]]["boxes"])  # one stripe phase
            background, shape = commonest_colours(image, 2)
            block = decode_block(image)
            assert len(block) == 4 and [frame for frame, _ in block.values()].count("framed") == 1
            assert [colour for frame, colour in block.values() if frame == "framed"] == [None]
            (top, left) = min(block)
            assert top % 2 == 0 and left % 2 == 0  # one 2x2 window
            assert set(block) == {(top, left), (top, left + 1), (top + 1, left), (top + 1, left + 1)}
            assert len({colour for frame, colour in block.values() if frame == "plain"}) == 3
            framed = next(p for p, (frame, _) in block.items() if frame == "framed")
            assert framed[1] == left + 1  # the right square of its row
            if subtype == "background_color":
                assert answer == background
            elif subtype == "shape_color":
                assert answer == shape
            elif subtype == "left_of_framed":
                assert question == syn.FINE_QUESTION and answer == answer_fine_question(block)
            elif subtype == "object_pattern":
                colour = re.match(r"What pattern does the (\w+) object have\?", question).group(1)
                assert answer == dict(objects)[colour]
            elif subtype == "object_color":
                pattern = next(p for p in syn.PATTERNS if p in question)
                assert answer == {p: c for c, p in objects}[pattern]
            checked[subtype] += 1
    assert set(checked) >= set(syn.SUBTYPES["coarse"][:2]) | set(syn.SUBTYPES["fine"]) | set(syn.SUBTYPES["object"])


# ------------------------------------------------------------------------------- the granularity property itself

LEVEL_KERNELS = [(4, 4), (2, 4), (2, 2), (1, 2), (1, 1)]  # AVG-LLaVA's levels in patches (rows x cols), coarsest first


def permuted_block(scene):
    """The scene with the square left of the framed one swapped with a white-framed square of the other row: a
    different fine answer, the same four squares in the block's 2x2 window."""
    first, second, third = scene.square_colors  # framed row 0: TL, BL, BR; framed row 1: TL, TR, BL
    colors = (second, first, third) if scene.framed_row == 0 else (third, second, first)
    return dataclasses.replace(scene, square_colors=colors)


@pytest.mark.parametrize("tile_size", [64, 96, 128])
def test_fine_answers_are_invisible_after_coarse_pooling_but_visible_per_patch(tile_size):
    """Permuting the white-framed squares changes the fine answer; the pooled pixels of levels 0-2 stay
    bit-identical, those of levels 3 and 4 do not."""
    geometry = syn.Geometry(tile_size, 8)
    for i in range(30):
        rng = np.random.default_rng([11, i])
        scene = syn.sample_scene(rng, geometry)
        other = permuted_block(scene)
        a, b = syn.render_scene(scene, geometry), syn.render_scene(other, geometry)
        assert scene.left_of_framed != other.left_of_framed
        assert answer_fine_question(decode_block(a)) == scene.left_of_framed
        assert answer_fine_question(decode_block(b)) == other.left_of_framed
        for level, kernel in enumerate(LEVEL_KERNELS):
            assert (pooled_sums(a, 8, kernel) == pooled_sums(b, 8, kernel)) == (level <= 2), (i, level)


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
        assert accuracy >= 0.9, (attribute, accuracy)
    assert {t[2] for t in y_eval} == set(syn.SHAPES)


def test_object_textures_are_erased_by_a_2x_downscale_but_not_at_full_resolution():
    for colour in (c for c in syn.PALETTE if c != "white"):  # objects are never white: it is the texture's other colour
        full = [syn.texture(p, colour, 12).astype(np.int64) for p in syn.PATTERNS]
        assert all(((t == syn.PALETTE[colour]).all(-1) | (t == syn.PALETTE["white"]).all(-1)).all() for t in full)
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

    def first_draws_collide(rng, geometry=syn.Geometry(), num_objects=syn.NUM_OBJECTS):
        calls.append(1)
        chosen = np.random.default_rng(0) if len(calls) <= 2 else rng
        return real(chosen, geometry, num_objects)

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
    assert {answer_of(r) for r in records} == set(syn.BLOCK_COLORS)


# ------------------------------------------------------------------------------------------------- vocabulary


def test_every_generated_word_is_in_the_vocabulary(dataset):
    _, records, _ = dataset
    vocabulary, answers = set(syn.all_words()), set(syn.answer_vocabulary())
    assert answers <= vocabulary and len(answers) == len(syn.PALETTE) + len(syn.SHAPES) + len(syn.PATTERNS)
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
    with pytest.raises(ValueError, match=">= 4"):
        syn.Geometry(64, 2)
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
        syn.render_scene(dataclasses.replace(scene, block_origin=(12, 0)))
    with pytest.raises(ValueError, match="block colour 'white'"):
        syn.render_scene(dataclasses.replace(scene, square_colors=("white", "red", "green")))
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
    text = "<image>\n" + syn.FINE_QUESTION
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


def test_subtypes_restrict_the_questions_asked(tmp_path):
    paths = syn.generate_dataset(tmp_path, num_train=40, num_val=0, num_test=0, num_pretrain=0,
                                 subtypes={"coarse": ("background_color", "shape_color"), "object": ("object_pattern",)})
    records = json.load(open(paths["train"]))
    asked = {(r["question_type"], r["question_subtype"]) for r in records}
    assert asked == {("coarse", "background_color"), ("coarse", "shape_color"), ("fine", "left_of_framed"),
                     ("object", "object_pattern")}
    with pytest.raises(ValueError, match="subtypes must map a question type"):
        syn.generate_dataset(tmp_path, num_train=1, subtypes={"coarse": ("shape_size",)})
    with pytest.raises(ValueError, match="subtypes must map a question type"):
        syn.generate_dataset(tmp_path, num_train=1, subtypes={"medium": ("background_color",)})


def test_one_object_is_named_the_object_and_no_object_allows_no_object_question(tmp_path):
    paths = syn.generate_dataset(tmp_path, num_train=30, num_val=0, num_test=0, num_pretrain=0, num_objects=1,
                                 question_mix={"object": 1.0})
    records = json.load(open(paths["train"]))
    boxes = {r["id"]: r for r in json.load(open(paths["boxes"]))}
    for record in records:
        assert question_of(record) in ("What pattern does the object have?", "What color is the object?")
        assert len(boxes[record["id"]]["boxes"]) == 1
    none = syn.generate_dataset(tmp_path / "none", num_train=3, num_val=0, num_test=0, num_pretrain=2, num_objects=0,
                                question_mix={"coarse": 1.0})
    assert all(r["boxes"] == [] for r in json.load(open(none["boxes"])))
    assert "Objects" not in json.load(open(none["pretrain"]))[0]["conversations"][1]["value"]
    with pytest.raises(ValueError, match="num_objects is 0"):
        syn.generate_dataset(tmp_path / "bad", num_train=1, num_objects=0)
    with pytest.raises(ValueError, match="num_objects must be an int from 0 to 3"):
        syn.generate_dataset(tmp_path / "bad", num_train=1, num_objects=4)


def test_multi_turn_training_and_the_router_split(tmp_path):
    paths = syn.generate_dataset(tmp_path, num_train=20, num_val=5, num_test=5, num_pretrain=0, num_router=7,
                                 train_turns=4)
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
    # With only three different questions to ask (two coarse kinds and the fine one), a conversation stops at three:
    # a question asked twice could be answered by copying the earlier answer.
    fewer = syn.generate_dataset(tmp_path / "fewer", num_train=20, num_val=0, num_test=0, num_pretrain=0,
                                 train_turns=4, question_mix={"coarse": 0.5, "fine": 0.5},
                                 subtypes={"coarse": ("background_color", "shape_color")})
    for record in json.load(open(fewer["train"])):
        questions = [t["value"] for t in record["conversations"][::2]]
        assert len(questions) == len(set(questions)) <= 3
