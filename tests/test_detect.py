"""`multigran detect` (detect.py): OWLv2 box files, end to end on a tiny random OWLv2 checkpoint built here."""

import argparse
import json
import os
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import pre_tokenizers
from transformers import CLIPTokenizer, Owlv2Config, Owlv2ForObjectDetection, Owlv2Processor
from transformers.models.owlv2.image_processing_pil_owlv2 import Owlv2ImageProcessorPil
from transformers.models.owlv2.modeling_owlv2 import Owlv2VisionTransformer

from multigran.data.boxes import read_box_file
from multigran.detect import (
    COCO_CLASSES,
    add_detect_arguments,
    detect,
    detect_command,
    list_images,
    parse_tags,
)

TAGS = ["cat", "dog", "traffic light"]
SIZES = {"wide": (30, 20), "tall": (16, 40), "square": (24, 24), "big": (50, 35), "small": (12, 9)}


@pytest.fixture(scope="module")
def owlv2_dir(tmp_path_factory):
    """A tiny random OWLv2 checkpoint: CLIP byte-level tokenizer (single-character BPE vocabulary, "!" = pad = id 0
    as in the real one; 32 text positions since characters are tokens here, 16 in the real model), 1-layer towers,
    32x32 input with 8x8 patches (a 4x4 box grid), the PIL image processor."""
    path = tmp_path_factory.mktemp("owlv2")
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab.update({c + "</w>": len(alphabet) + i for i, c in enumerate(alphabet)})
    bos, eos = len(vocab), len(vocab) + 1  # EOS must be the largest id: the text pooler takes input_ids.argmax()
    vocab.update({"<|startoftext|>": bos, "<|endoftext|>": eos})
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], pad_token="!", model_max_length=32)
    tower = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    config = Owlv2Config(
        text_config=dict(vocab_size=len(vocab), max_position_embeddings=32, bos_token_id=bos, eos_token_id=eos,
                         pad_token_id=0, **tower),
        vision_config=dict(image_size=32, patch_size=8, **tower),
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = Owlv2ForObjectDetection(config)
    with torch.no_grad():  # trained-like outputs: boxes near their grid cell (box bias), scores spread around 0.5
        for layer in (model.box_head.dense2, model.class_head.logit_shift, model.class_head.logit_scale):
            layer.weight.mul_(0.1)
            layer.bias.zero_()
    model.save_pretrained(path)
    Owlv2Processor(Owlv2ImageProcessorPil(size={"height": 32, "width": 32}), tokenizer).save_pretrained(path)
    return path


def write_images(folder, names, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in names:
        width, height = SIZES[name]
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(folder / f"{name}.png")
    return folder


@contextmanager
def count_vision_images(on_call=None):
    """Counts the images that go through any OWLv2 vision tower (a global forward hook: the model is loaded inside
    detect); on_call(images_so_far) runs before each call."""
    seen = []

    def pre_hook(module, args):
        if isinstance(module, Owlv2VisionTransformer) and on_call is not None:
            on_call(sum(seen))

    def hook(module, args, output):
        if isinstance(module, Owlv2VisionTransformer):
            seen.append(output.last_hidden_state.shape[0])

    handles = [torch.nn.modules.module.register_module_forward_pre_hook(pre_hook),
               torch.nn.modules.module.register_module_forward_hook(hook)]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def run(images, out, model, **kwargs):
    kwargs = {"tags": TAGS, "threshold": 0.0, "device": "cpu", "progress": False, **kwargs}
    return detect(images, out, model, **kwargs)


# --- end to end -------------------------------------------------------------------------------------------------------


def test_box_file_format_boxes_inside_labels_from_tags(owlv2_dir, tmp_path):
    images = write_images(tmp_path / "imgs", ["wide", "tall", "square"])
    out = tmp_path / "boxes.json"
    summary = run(images, out, owlv2_dir, batch_size=2)
    assert (summary.images, summary.processed, summary.already_done, summary.failed) == (3, 3, 0, [])
    raw = json.loads(out.read_text())
    assert isinstance(raw, list) and all(set(r) == {"id", "boxes", "scores", "labels"} for r in raw)
    records = read_box_file(out)  # the project's reader validates the format
    assert sorted(records) == ["square", "tall", "wide"]
    total = 0
    for image_id, record in records.items():
        width, height = SIZES[image_id]
        boxes = torch.tensor(record["boxes"]).reshape(-1, 4)
        total += len(boxes)
        assert len(record["scores"]) == len(record["labels"]) == len(boxes)
        assert ((boxes[:, 0] >= 0) & (boxes[:, 1] >= 0) & (boxes[:, 2] <= width) & (boxes[:, 3] <= height)).all()
        assert ((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).all()
        assert set(record["labels"]) <= set(TAGS)
        assert record["scores"] == sorted(record["scores"], reverse=True) and min(record["scores"]) > 0
    assert total > 0


def reference_detections(model, processor, image, threshold, square=True):
    """Independent reference: Hugging Face's full forward (text encoded with each image), then the post-processing
    written out by hand: score = sigmoid(max logit), label = argmax query, cxcywh -> xyxy scaled by the padded
    square side max(W, H), clipped to the image, rounded to 0.01 px, zero-area boxes dropped, score > threshold."""
    inputs = processor(text=[[f"a photo of {t}" for t in TAGS]], images=[image], return_tensors="pt")
    with torch.no_grad():
        output = model(**inputs)
    logits, boxes = output.logits[0], output.pred_boxes[0].double()
    width, height = image.size
    side_x, side_y = (max(width, height),) * 2 if square else (width, height)
    found = []
    for patch in range(logits.shape[0]):
        score = torch.sigmoid(logits[patch].max()).item()
        cx, cy, w, h = boxes[patch].tolist()
        x1, x2 = min(max((cx - w / 2) * side_x, 0), width), min(max((cx + w / 2) * side_x, 0), width)
        y1, y2 = min(max((cy - h / 2) * side_y, 0), height), min(max((cy + h / 2) * side_y, 0), height)
        x1, y1, x2, y2 = (round(v, 2) for v in (x1, y1, x2, y2))
        if score > threshold and x2 > x1 and y2 > y1:
            found.append((score, [x1, y1, x2, y2], TAGS[int(logits[patch].argmax())]))
    return sorted(found, key=lambda f: -f[0])


def test_detections_match_hf_forward_with_square_target_size(owlv2_dir, tmp_path):
    names = ["wide", "tall", "square"]
    images = write_images(tmp_path / "imgs", names)
    model = Owlv2ForObjectDetection.from_pretrained(owlv2_dir).eval()
    processor = Owlv2Processor.from_pretrained(owlv2_dir, backend="pil")
    pil = {n: Image.open(images / f"{n}.png").convert("RGB") for n in names}
    # A threshold in the middle of the scores, so that it filters.
    scores = [f[0] for n in names for f in reference_detections(model, processor, pil[n], 0.0)]
    threshold = float(np.median(scores))
    out = tmp_path / "boxes.json"
    run(images, out, owlv2_dir, threshold=threshold, batch_size=2)  # a batch mixes image sizes
    records = read_box_file(out)
    kept = 0
    for name in names:
        expected = reference_detections(model, processor, pil[name], threshold)
        record = records[name]
        assert len(record["boxes"]) == len(expected)
        for (score, box, label), got_box, got_score, got_label in zip(
            expected, record["boxes"], record["scores"], record["labels"]
        ):
            assert got_label == label
            assert got_score == pytest.approx(score, rel=1e-5)
            assert got_box == pytest.approx(box, abs=0.01)
        kept += len(expected)
    assert 0 < kept < len(scores)
    # The rule matters: scaling x by W and y by H (the padded square ignored) gives other boxes for a tall image.
    naive = reference_detections(model, processor, pil["tall"], threshold, square=False)
    assert len(naive) == len(records["tall"]["boxes"])
    assert not torch.allclose(torch.tensor([f[1] for f in naive]), torch.tensor(records["tall"]["boxes"]), atol=0.5)


def test_resume_processes_only_new_images(owlv2_dir, tmp_path):
    images = write_images(tmp_path / "imgs", ["wide", "tall", "square"])
    out = tmp_path / "boxes.json"
    with count_vision_images() as seen:
        run(images, out, owlv2_dir, batch_size=2)
    assert sum(seen) == 3
    first = read_box_file(out)
    write_images(images, ["big", "small"], seed=1)
    with count_vision_images() as seen:  # this time with a loader process and the progress bar
        summary = run(images, out, owlv2_dir, batch_size=2, num_workers=1, progress=True)
    assert sum(seen) == 2 and (summary.processed, summary.already_done, summary.records) == (2, 3, 5)
    second = read_box_file(out)
    assert sorted(second) == ["big", "small", "square", "tall", "wide"]
    assert all(second[i] == first[i] for i in first)  # earlier records are kept as they were
    with count_vision_images() as seen:  # nothing left: the model does not run
        summary = run(images, out, owlv2_dir)
    assert sum(seen) == 0 and summary.processed == 0 and summary.already_done == 5


def test_file_is_valid_json_after_every_flush_and_interrupt_keeps_work(owlv2_dir, tmp_path):
    images = write_images(tmp_path / "imgs", ["wide", "tall", "square", "big"])
    out = tmp_path / "boxes.json"
    counts = []

    def check_file(done):  # before image done+1 runs, the file holds the `done` finished images
        if done:
            counts.append(len(json.loads(out.read_text())))

    with count_vision_images(check_file):
        run(images, out, owlv2_dir, batch_size=1, save_every=1)
    assert counts == [1, 2, 3] and len(read_box_file(out)) == 4
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []

    out2 = tmp_path / "interrupted.json"

    def interrupt(done):
        if done == 2:
            raise KeyboardInterrupt

    with count_vision_images(interrupt), pytest.raises(KeyboardInterrupt):
        run(images, out2, owlv2_dir, batch_size=1, save_every=100)
    assert sorted(read_box_file(out2)) == ["big", "square"]  # the first two in sorted order
    with count_vision_images() as seen:
        summary = run(images, out2, owlv2_dir, batch_size=1)
    assert sum(seen) == 2 and summary.already_done == 2 and len(read_box_file(out2)) == 4


def test_bad_images_are_reported_counted_and_skipped(owlv2_dir, tmp_path, capsys):
    images = write_images(tmp_path / "imgs", ["wide", "square"])
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" * 3)
    (images / "notes.png").write_text("this is text")
    listing = tmp_path / "list.txt"
    listing.write_text(
        "imgs/wide.png\n\n# a comment\nimgs/broken.jpg\nimgs/notes.png\nimgs/missing.png\nimgs/square.png\n"
    )
    out = tmp_path / "boxes.json"
    parser = argparse.ArgumentParser()
    add_detect_arguments(parser)
    args = parser.parse_args(["--images", str(listing), "--tags", ",".join(TAGS), "--model", str(owlv2_dir),
                              "--out", str(out), "--threshold", "0", "--device", "cpu", "--num-workers", "0",
                              "--no-progress"])
    summary = detect_command(args)
    assert summary.processed == 2 and summary.images == 5
    failed = dict(summary.failed)
    assert sorted(os.path.basename(p) for p in failed) == ["broken.jpg", "missing.png", "notes.png"]
    assert "does not exist" in failed[str(tmp_path / "imgs/missing.png")]
    assert "not an image" in failed[str(tmp_path / "imgs/notes.png")]
    assert sorted(read_box_file(out)) == ["square", "wide"]
    captured = capsys.readouterr()
    assert "broken.jpg" in captured.err and "missing.png" in captured.err and "3 failed" in captured.out
    again = detect_command(args)  # failed images are retried (and fail again), done ones skipped
    assert again.processed == 0 and again.already_done == 2 and len(again.failed) == 3


# --- ids ------------------------------------------------------------------------------------------------------------


def test_ids_from_stem_or_path_and_collisions(tmp_path):
    write_images(tmp_path / "root/a", ["wide"])
    write_images(tmp_path / "root/b", ["wide", "tall"])
    with pytest.raises(ValueError, match="--id-from path"):
        list_images(tmp_path / "root")
    items = list_images(tmp_path / "root", id_from="path")
    assert [i.ids for i in items] == [["a/wide"], ["b/tall"], ["b/wide"]]
    assert items[0].path == tmp_path / "root/a/wide.png"
    (tmp_path / "root/b/readme.txt").write_text("not an image")  # non-image files are not listed
    assert len(list_images(tmp_path / "root", id_from="path")) == 3
    listing = tmp_path / "list.txt"
    listing.write_text("root/b/tall.png\nroot/a/wide.png\n")
    assert [i.ids for i in list_images(listing)] == [["tall"], ["wide"]]  # list order kept
    assert [i.ids for i in list_images(listing, id_from="path")] == [["root/b/tall"], ["root/a/wide"]]
    with pytest.raises(ValueError, match="neither a folder nor a file"):
        list_images(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        list_images(tmp_path / "empty")


def test_llava_annotation_files_key_records_by_sample_id(owlv2_dir, tmp_path):
    write_images(tmp_path / "coco", ["wide", "tall"])
    samples = [
        {"id": "000001", "image": "wide.png", "conversations": []},
        {"id": 7, "image": "tall.png", "conversations": []},
        {"id": "000002", "image": "wide.png", "conversations": []},  # same image, another sample
        {"id": "text-only", "conversations": []},
    ]
    annotations = tmp_path / "llava.json"
    annotations.write_text(json.dumps(samples))
    out = tmp_path / "boxes.json"
    with count_vision_images() as seen:
        summary = run(annotations, out, owlv2_dir, image_folder=tmp_path / "coco", batch_size=4)
    assert sum(seen) == 2 and summary.images == 2
    records = read_box_file(out)
    assert sorted(records) == ["000001", "000002", "7"]
    assert records["000001"]["boxes"] == records["000002"]["boxes"] and records["000001"]["boxes"]
    questions = tmp_path / "coco/questions.jsonl"  # evaluation files: question_id, images next to the file
    questions.write_text('{"question_id": 3, "image": "tall.png", "text": "?"}\n\n'
                         '{"question_id": 4, "image": "wide.png", "text": "?"}\n')
    assert [(i.ids, i.path.name) for i in list_images(questions)] == [(["3"], "tall.png"), (["4"], "wide.png")]
    annotations.write_text(json.dumps([{"id": 1, "image": "wide.png"}, {"id": 1, "image": "tall.png"}]))
    with pytest.raises(ValueError, match="names two images"):
        list_images(annotations)
    annotations.write_text(json.dumps([{"image": "wide.png"}]))
    with pytest.raises(ValueError, match="neither 'id' nor 'question_id'"):
        list_images(annotations)
    annotations.write_text('[{"id": 1, ')
    with pytest.raises(ValueError, match="llava.json: not valid JSON"):
        list_images(annotations)
    questions.write_text('{"question_id": 3, "image": "tall.png"}\n\n{"question_id": 4, "image": \n')
    with pytest.raises(ValueError, match="questions.jsonl: not valid JSON \\(line 3"):
        list_images(questions)
    annotations.write_text('{"id": 1, "image": "wide.png"}')
    with pytest.raises(ValueError, match="holds a list of samples"):
        list_images(annotations)


# --- tags, arguments, bad input -------------------------------------------------------------------------------------


def test_tags_and_vocabulary(tmp_path):
    assert len(COCO_CLASSES) == 80 and len(set(COCO_CLASSES)) == 80
    assert parse_tags(vocab="coco")[:3] == ["person", "bicycle", "car"] and "toothbrush" in parse_tags(vocab="coco")
    assert parse_tags(" cat, dog ,,cat, traffic light ") == ["cat", "dog", "traffic light"]
    (tmp_path / "tags.txt").write_text("hot dog\n\n  teddy bear \nhot dog\n")
    assert parse_tags(tags_file=tmp_path / "tags.txt") == ["hot dog", "teddy bear"]
    with pytest.raises(ValueError, match="no tags"):
        parse_tags(" , ")
    with pytest.raises(ValueError, match="unknown vocabulary"):
        parse_tags(vocab="lvis")
    with pytest.raises(ValueError, match="exactly one"):
        parse_tags("cat", vocab="coco")


def test_arguments():
    parser = argparse.ArgumentParser()
    add_detect_arguments(parser)
    args = parser.parse_args(["--images", "d", "--vocab", "coco", "--model", "m", "--out", "o.json"])
    assert (args.threshold, args.batch_size, args.id_from, args.dtype, args.tags) == (0.2, 8, "stem", "float32", None)
    for bad in (["--images", "d", "--model", "m", "--out", "o"],  # no tags
                ["--images", "d", "--tags", "cat", "--vocab", "coco", "--model", "m", "--out", "o"],
                ["--images", "d", "--tags", "cat", "--model", "m", "--out", "o", "--id-from", "name"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)


def test_bad_input_is_a_clear_error(owlv2_dir, tmp_path):
    images = write_images(tmp_path / "imgs", ["wide"])
    with pytest.raises(ValueError, match="no config.json"):
        run(images, tmp_path / "o.json", tmp_path)
    clip = tmp_path / "clip"
    clip.mkdir()
    (clip / "config.json").write_text('{"model_type": "clip"}')
    with pytest.raises(ValueError, match="not OWLv2"):
        run(images, tmp_path / "o.json", clip)
    with pytest.raises(ValueError, match="does not exist or is not writable"):
        run(images, tmp_path / "no/such/folder/o.json", owlv2_dir)
    with pytest.raises(ValueError, match="threshold"):
        run(images, tmp_path / "o.json", owlv2_dir, threshold=1.5)
    with pytest.raises(ValueError, match="longer than OWLv2's 32 text tokens"):
        run(images, tmp_path / "o.json", owlv2_dir, tags=["cat", "an extremely long and overly descriptive tag"])
    broken = tmp_path / "broken.json"
    broken.write_text('[{"id": "wide", "boxes": [')
    with pytest.raises(ValueError, match="broken.json: not valid JSON"):
        run(images, broken, owlv2_dir)
    assert broken.read_text() == '[{"id": "wide", "boxes": ['  # never overwritten


def test_multigran_detect_command_line(owlv2_dir, tmp_path, capsys):
    from multigran.cli import main
    from multigran.data.boxes import read_box_file

    names = list(SIZES)[:2]
    write_images(tmp_path / "images", names)
    out = tmp_path / "boxes.json"
    code = main(["detect", "--images", str(tmp_path / "images"), "--tags", "cat,dog", "--model", str(owlv2_dir),
                 "--out", str(out), "--threshold", "0.0", "--no-progress", "--num-workers", "0"])
    assert code == 0, capsys.readouterr().err
    assert set(read_box_file(out)) == set(names)
    assert main(["detect", "--images", str(tmp_path / "images"), "--tags", "cat", "--model", str(tmp_path),
                 "--out", str(tmp_path / "other.json")]) == 2
    assert "multigran: error:" in capsys.readouterr().err
