"""LLaVA data: JSON / JSONL / mixtures / image folders / box files, bad-record reporting, lazy decoding, collation."""

import json
import logging

import pytest
import torch
import yaml
from PIL import Image

from multigran.data.collator import MultiGranCollator
from multigran.data.llava import BadRecordError, LlavaDataset, load_records, parse_sampling, sample_records


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from multigran.tiny import build_tiny

    model, processor = build_tiny(method="anyres", seed=0)
    return model, processor


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread; two threads on shared, busy cores spend their time waiting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def turns(question="<image>\nWhat colour is it?", answer="Red."):
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


@pytest.fixture()
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (32, 32), (255, 0, 0)).save(folder / "red.png")
    Image.new("RGB", (96, 32), (0, 0, 255)).save(folder / "wide.png")  # 3x1 tiles: 4 crops instead of 3
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return folder


def write_json(path, records):
    path.write_text(json.dumps(records))
    return str(path)


def test_json_record_to_model_inputs(tiny, tmp_path, images):
    model, processor = tiny
    path = write_json(tmp_path / "data.json", [
        {"id": 7, "image": "red.png", "conversations": turns()},
        {"id": "two", "image": ["red.png", "wide.png"],
         "conversations": turns("<image>\n<image>\nCompare them.", "Different.")},
        {"id": "text", "conversations": turns("Say hi.", "Hi.")},
    ])
    dataset = LlavaDataset(path, processor, template="vicuna_v1", image_folder=str(images))
    assert len(dataset) == 3 and dataset.bad_record_summary()["total"] == 0

    one = dataset[0]
    counts = processor.count_image_tokens([Image.new("RGB", (32, 32))])
    image_positions = one["input_ids"] == processor.image_token_id
    assert int(image_positions.sum()) == counts[0]
    assert (one["labels"][image_positions] == -100).all()
    answer = processor.tokenizer.decode(one["labels"][one["labels"] != -100])
    assert answer == " Red.</s>"
    assert one["pixel_values"].shape[0] == 1 and one["image_sizes"].tolist() == [[32, 32]]

    two = dataset[1]
    assert two["pixel_values"].shape[0] == 2 and two["image_sizes"].tolist() == [[32, 32], [32, 96]]
    wide = processor.count_image_tokens([Image.new("RGB", (96, 32))])[0]
    assert int((two["input_ids"] == processor.image_token_id).sum()) == counts[0] + wide

    text = dataset[2]
    assert set(text) == {"input_ids", "labels"}
    lengths = dataset.modality_lengths
    assert lengths[0] > 0 and lengths[1] > 0 and lengths[2] < 0


def test_jsonl_and_bad_records_reported_with_file_id_and_line(tiny, tmp_path, images, caplog):
    _, processor = tiny
    lines = [
        json.dumps({"id": "ok", "image": "red.png", "conversations": turns()}),
        "{not json",
        json.dumps({"id": "missing", "image": "nowhere.png", "conversations": turns()}),
        json.dumps({"id": "count", "image": "red.png", "conversations": turns("No placeholder here.")}),
        json.dumps({"id": "empty", "conversations": []}),
        json.dumps({"id": "roles", "conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}]}),
        json.dumps({"id": "ok2", "conversations": turns("Text only.", "Yes.")}),
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING, logger="multigran.data.llava"):
        dataset = LlavaDataset(str(path), processor, image_folder=str(images))
    assert [r.data["id"] for r in dataset.records] == ["ok", "ok2"]
    summary = dataset.bad_record_summary()
    assert summary["total"] == 5 and summary["load"] == 5 and summary["getitem"] == 0
    wheres = [r.where for r in dataset.bad_records]
    assert wheres[0] == f"{path}, line 2"
    assert wheres[1:] == [f"{path}, line {n}, record id {i!r}" for n, i in
                          [(3, "missing"), (4, "count"), (5, "empty"), (6, "roles")]]
    reasons = " | ".join(r.reason for r in dataset.bad_records)
    for fragment in ("not valid JSON", "does not exist", "0 '<image>' placeholder(s) for 1 image", "empty",
                     "turn 0 is from the assistant"):
        assert fragment in reasons
    assert sum("skipping bad record" in m for m in caplog.messages) == 5  # each one logged, never silent

    with pytest.raises(BadRecordError, match=f"{path}, line 2: not valid JSON"):
        LlavaDataset(str(path), processor, image_folder=str(images), on_bad_record="error")
    lines[1] = json.dumps({"id": "fine", "conversations": turns("Hi.", "Hi.")})
    path.write_text("\n".join(lines))
    with pytest.raises(BadRecordError, match=r"line 3, record id 'missing': image file .*nowhere.png.* does not exist"):
        LlavaDataset(str(path), processor, image_folder=str(images), on_bad_record="error")


def test_decode_failure_at_getitem_skips_to_next_or_raises(tiny, tmp_path, images):
    _, processor = tiny
    path = write_json(tmp_path / "data.json", [
        {"id": "a", "image": "red.png", "conversations": turns(answer="First.")},
        {"id": "bad", "image": "corrupt.png", "conversations": turns()},
        {"id": "c", "image": "red.png", "conversations": turns(answer="Third.")},
    ])
    dataset = LlavaDataset(path, processor, image_folder=str(images))
    assert len(dataset) == 3  # the file exists: only decoding finds it broken
    third = dataset[2]
    replaced = dataset[1]  # deterministic replacement: the next valid index
    assert torch.equal(replaced["input_ids"], third["input_ids"])
    assert torch.equal(dataset[1]["input_ids"], third["input_ids"])
    summary = dataset.bad_record_summary()
    assert summary == {"total": 1, "load": 0, "getitem": 1, "by_reason": summary["by_reason"]}
    assert "record id 'bad'" in dataset.bad_records[0].where
    assert "is not an image PIL can read" in dataset.bad_records[0].reason

    strict = LlavaDataset(path, processor, image_folder=str(images), on_bad_record="error")
    with pytest.raises(BadRecordError, match=r"data.json, record id 'bad': image file .*corrupt.png.* is not an image"):
        strict[1]


def test_too_long_sample_is_a_bad_record(tiny, tmp_path, images):
    _, processor = tiny
    path = write_json(tmp_path / "data.json", [
        {"id": "long", "image": "red.png", "conversations": turns()},
        {"id": "short", "conversations": turns("Hi.", "Hi.")},
    ])
    dataset = LlavaDataset(path, processor, image_folder=str(images), max_length=200)
    sample = dataset[0]  # 136 visual + 120 text tokens > 200: replaced by the next record, never cut inside the image
    assert processor.image_token_id not in sample["input_ids"].tolist()
    assert "max_length is 200" in dataset.bad_records[0].reason
    with pytest.raises(BadRecordError, match="record id 'long'.*max_length is 200"):
        LlavaDataset(path, processor, image_folder=str(images), max_length=200, on_bad_record="error")[0]


def test_mixture_sampling(tiny, tmp_path, images):
    _, processor = tiny
    sub = tmp_path / "sub"
    sub.mkdir()
    write_json(sub / "a.json", [{"id": f"a{i}", "conversations": turns("Hi.", str(i))} for i in range(10)])
    write_json(sub / "b.json", [{"id": f"b{i}", "conversations": turns("Hi.", str(i))} for i in range(10)])
    write_json(sub / "c.json", [{"id": f"c{i}", "image": "red.png", "conversations": turns()} for i in range(8)])
    mixture = tmp_path / "mix.yaml"
    mixture.write_text(yaml.safe_dump({"datasets": [
        {"json_path": "sub/a.json", "sampling_strategy": "first:30%"},
        {"json_path": "sub/b.json", "sampling_strategy": "end:2"},
        {"json_path": "sub/c.json", "sampling_strategy": "random:3", "image_folder": str(images)},
        {"json_path": "sub/a.json", "sampling_strategy": "all"},
    ]}))
    dataset = LlavaDataset(str(mixture), processor, seed=5)
    ids = [r.data["id"] for r in dataset.records]
    assert ids[:5] == ["a0", "a1", "a2", "b8", "b9"]
    randoms = ids[5:8]
    assert len(set(randoms)) == 3 and all(i.startswith("c") for i in randoms)
    assert ids[8:] == [f"a{i}" for i in range(10)]
    again = [r.data["id"] for r in LlavaDataset(str(mixture), processor, seed=5).records]
    assert again == ids  # seeded
    others = {tuple(r.data["id"] for r in LlavaDataset(str(mixture), processor, seed=s).records[5:8]) for s in range(8)}
    assert len(others) > 1  # the seed matters
    assert dataset[5]["pixel_values"].shape[0] == 1  # per-file image folder applied

    assert parse_sampling("first:50%", 7, "x") == ("first", 4)  # rounded up as LLaVA-NeXT
    assert sample_records(list(range(5)), "end:10", 0, "x") == list(range(5))
    for bad in ("first", "middle:3", "random:abc", "first:-1"):
        with pytest.raises(ValueError, match="sampling_strategy"):
            parse_sampling(bad, 10, "mix.yaml, datasets[0]")
    (tmp_path / "bad.yaml").write_text("datasets:\n  - path: a.json\n")
    with pytest.raises(ValueError, match="needs a 'json_path'"):
        load_records(str(tmp_path / "bad.yaml"))


def test_image_folder(tiny, tmp_path):
    _, processor = tiny
    folder = tmp_path / "folder"
    (folder / "nested").mkdir(parents=True)
    Image.new("RGB", (32, 32), (0, 255, 0)).save(folder / "nested" / "green.png")
    Image.new("RGB", (32, 32), (255, 0, 0)).save(folder / "red.jpg")
    (folder / "red.txt").write_text("A red square.\n")
    (folder / "notes.md").write_text("not an image")

    records = load_records(str(folder))
    assert [r.data["id"] for r in records] == ["nested/green.png", "red.jpg"]
    assert records[1].data["conversations"][1] == {"from": "gpt", "value": "A red square."}

    with pytest.raises(ValueError, match="ends with a human turn"):
        LlavaDataset(str(folder), processor, template="plain", on_bad_record="error")
    captioned = LlavaDataset(str(folder), processor, template="plain")  # the uncaptioned image is skipped
    assert len(captioned) == 1 and captioned.bad_record_summary()["total"] == 1
    sample = captioned[0]
    assert processor.tokenizer.decode(sample["labels"][sample["labels"] != -100]) == "A red square.\n"
    image_only = LlavaDataset(str(folder), processor, template="plain", require_answer=False)
    assert len(image_only) == 2 and (image_only[0]["labels"] == -100).all()


def test_box_file_join(tiny, tmp_path, images, monkeypatch):
    _, processor = tiny
    boxes = [{"id": 1, "boxes": [[0, 0, 10, 10]], "scores": [0.9], "labels": ["square"]}]
    box_path = tmp_path / "boxes.json"
    box_path.write_text(json.dumps(boxes))
    path = write_json(tmp_path / "data.json", [
        {"id": 1, "image": "red.png", "conversations": turns()},
        {"id": 2, "image": "red.png", "conversations": turns()},
    ])
    with pytest.raises(ValueError, match=r"box_file: option\(s\) \['boxes'\] do not apply to method 'anyres'"):
        LlavaDataset(path, processor, image_folder=str(images), box_file=str(box_path))
    # A method whose image step takes boxes (MG) gets the joined record, one per image:
    monkeypatch.setattr(processor.image_processor, "check_options", lambda options: None)
    dataset = LlavaDataset(path, processor, image_folder=str(images), box_file=str(box_path))
    assert len(dataset) == 1
    assert "no box record with id '2'" in dataset.bad_records[0].reason
    seen = {}
    original = processor.image_processor.preprocess

    def spy(images_, **options):
        seen.update(options)
        return original(images_)

    monkeypatch.setattr(processor.image_processor, "preprocess", spy)
    dataset[0]
    assert seen["boxes"][0]["boxes"] == [[0, 0, 10, 10]] and seen["boxes"][0]["labels"] == ["square"]


def test_unreadable_inputs_raise_clear_errors(tiny, tmp_path):
    _, processor = tiny
    (tmp_path / "broken.json").write_text('[{"id": 1,')
    with pytest.raises(ValueError, match=r"broken.json: not valid JSON \(line 1"):
        LlavaDataset(str(tmp_path / "broken.json"), processor)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LlavaDataset(str(tmp_path / "absent.json"), processor)
    (tmp_path / "dict.json").write_text('{"a": 1}')
    with pytest.raises(ValueError, match="holds a JSON list of records, got dict"):
        LlavaDataset(str(tmp_path / "dict.json"), processor)
    (tmp_path / "data.csv").write_text("x")
    with pytest.raises(ValueError, match="expected a .json, .jsonl, .yaml mixture or an image folder"):
        LlavaDataset(str(tmp_path / "data.csv"), processor)
    write_json(tmp_path / "allbad.json", [{"id": 1, "conversations": []}])
    with pytest.raises(ValueError, match="no valid training record"):
        LlavaDataset(str(tmp_path / "allbad.json"), processor)
    write_json(tmp_path / "ok.json", [{"id": 1, "conversations": turns("Hi.", "Hi.")}])
    with pytest.raises(ValueError, match=r"image_options / box_file: option\(s\) \['granularity'\] do not apply"):
        LlavaDataset(str(tmp_path / "ok.json"), processor, image_options={"granularity": 36})
    with pytest.raises(ValueError, match="on_bad_record must be one of"):
        LlavaDataset(str(tmp_path / "allbad.json"), processor, on_bad_record="ignore")


def test_collated_batch_gives_the_same_logits_as_single_samples(tiny, tmp_path, images):
    model, processor = tiny
    path = write_json(tmp_path / "data.json", [
        {"id": 0, "image": "wide.png", "conversations": turns(answer="A long blue rectangle.")},
        {"id": 1, "conversations": turns("Text only.", "Yes.")},
        {"id": 2, "image": ["red.png", "wide.png"], "conversations": turns("<image> and <image>?", "Both.")},
        {"id": 3, "image": "red.png", "conversations": turns()},
    ])
    dataset = LlavaDataset(path, processor, image_folder=str(images))
    samples = [dataset[i] for i in range(4)]
    collate = MultiGranCollator.from_tokenizer(processor.tokenizer)
    batch = collate(samples)
    lengths = [len(s["input_ids"]) for s in samples]
    assert batch["input_ids"].shape == (4, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert (batch["labels"][1, lengths[1]:] == -100).all()
    assert (batch["input_ids"][1, lengths[1]:] == processor.tokenizer.pad_token_id).all()
    # 4 images in sample order; wide ones have 4 crops, the red one 3 (zero-padded to 4)
    assert batch["pixel_values"].shape[:2] == (4, 4)
    assert batch["image_sizes"].tolist() == [[32, 96], [32, 32], [32, 96], [32, 32]]
    assert (batch["pixel_values"][1, 3] == 0).all()

    with torch.no_grad():
        batched = model(**batch).logits
        for row, sample in enumerate(samples):
            single = collate([sample])
            alone = model(**single).logits[0]
            torch.testing.assert_close(batched[row, :lengths[row]], alone, atol=1e-4, rtol=1e-4)

    left = MultiGranCollator.from_tokenizer(processor.tokenizer, padding_side="left")(samples)
    assert left["attention_mask"][1, -lengths[1]:].all() and not left["attention_mask"][1, 0]


def test_jsonl_line_numbers_count_every_line(tiny, tmp_path, images):
    """Blank lines count: a bad line 5 is reported as line 5 (as editors and `wc -l` number it)."""
    _, processor = tiny
    good = json.dumps({"id": "ok", "image": "red.png", "conversations": turns()})
    path = tmp_path / "data.jsonl"
    path.write_bytes(("\n".join([good, "", good, "\r", "[1, 2]", good]) + "\n").encode()
                     + b'{"id": "caf\xe9", "conversations": []}\n')
    dataset = LlavaDataset(str(path), processor, image_folder=str(images))
    assert [r.line for r in dataset.records] == [1, 3, 6]
    wheres = {r.where: r.reason for r in dataset.bad_records}
    assert wheres[f"{path}, line 5, record id '#2'"] == "a record must be a JSON object, got list"
    assert wheres[f"{path}, line 7"] == "not UTF-8 text (byte 0xe9 at column 12)"
    with pytest.raises(BadRecordError, match=r"data.jsonl, line 7: not UTF-8 text"):  # read first, so reported first
        LlavaDataset(str(path), processor, image_folder=str(images), on_bad_record="error")
    path.write_bytes(path.read_bytes().replace(b"caf\xe9", b"cafe"))
    with pytest.raises(BadRecordError, match=r"data.jsonl, line 5, record id '#2': a record must be a JSON object"):
        LlavaDataset(str(path), processor, image_folder=str(images), on_bad_record="error")


@pytest.mark.parametrize("record, message", [
    ({"id": "a", "image": 3, "conversations": turns()}, "field 'image' must be a path or a list of paths, got int 3"),
    ({"id": "a", "image": [1, 2], "conversations": turns()}, "field 'image' must be a path or a list of paths, got list"),
    ({"id": "a", "conversations": "hello"}, "field 'conversations' must be a list of turns, got str"),
    ({"id": "a", "conversations": {"from": "human"}}, "field 'conversations' must be a list of turns, got dict"),
    ({"id": "a", "conversations": [{"from": "human"}]}, "turn 0 has no field 'value'"),
    ({"id": "a", "conversations": [{"from": "human", "value": 5}, {"from": "gpt", "value": "x"}]},
     "turn 0 has a int value \\(field 'value'\\)"),
    ({"id": ["a"], "conversations": turns("Hi.", "Hi.")}, "field 'id' must be a string or an integer, got list"),
    ({"id": "a", "text": "no conversations"}, "the record has no field 'conversations'"),
])
def test_record_fields_are_named(tiny, tmp_path, images, record, message):
    _, processor = tiny
    path = write_json(tmp_path / "data.json", [{"id": "fine", "conversations": turns("Hi.", "Hi.")}, record])
    with pytest.raises(BadRecordError, match=f"data.json, record id .*: {message}"):
        LlavaDataset(path, processor, image_folder=str(images), on_bad_record="error")


def test_undecodable_and_deeply_nested_files_are_named(tiny, tmp_path):
    _, processor = tiny
    path = tmp_path / "latin1.json"
    path.write_bytes(b'[\n{"id": "caf\xe9"}]')
    with pytest.raises(ValueError, match=r"latin1.json: not UTF-8 text \(byte 0xe9 at line 2"):
        LlavaDataset(str(path), processor)
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match="deep.json: JSON nested more than 100 levels deep"):
        LlavaDataset(str(deep), processor)
    lines = tmp_path / "deep.jsonl"
    lines.write_text(json.dumps({"id": 1, "conversations": turns("Hi.", "Hi.")}) + "\n" + "[" * 5000 + "]" * 5000)
    with pytest.raises(BadRecordError, match="deep.jsonl, line 2: JSON nested more than 100 levels deep"):
        LlavaDataset(str(lines), processor, on_bad_record="error")
    mixture = tmp_path / "mix.yaml"
    mixture.write_text("datasets:\n  - json_path: 3\n")
    with pytest.raises(ValueError, match=r"mix.yaml, datasets\[0\]: json_path must be a string, got int"):
        LlavaDataset(str(mixture), processor)


def test_undecodable_caption_is_a_bad_record(tiny, tmp_path):
    _, processor = tiny
    folder = tmp_path / "captioned"
    folder.mkdir()
    for name in ("a", "b"):
        Image.new("RGB", (32, 32)).save(folder / f"{name}.png")
    (folder / "a.txt").write_text("A black square.")
    (folder / "b.txt").write_bytes(b"caf\xe9")
    dataset = LlavaDataset(str(folder), processor, template="plain")
    assert [r.data["id"] for r in dataset.records] == ["a.png"]
    assert "b.txt: not UTF-8 text" in dataset.bad_records[0].reason


def test_dataset_options_are_validated(tiny, tmp_path):
    _, processor = tiny
    path = write_json(tmp_path / "data.json", [{"id": "fine", "conversations": turns("Hi.", "Hi.")}])
    for options, message in [({"template": "bogus"}, "unknown conversation template 'bogus'"),
                             ({"max_length": 0}, "data.max_length must be a positive int"),
                             ({"max_length": 2.5}, "data.max_length must be a positive int"),
                             ({"image_options": [1]}, "data.image_options must be a mapping"),
                             ({"box_file": str(tmp_path / "none.json")}, "set data.box_file")]:
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            LlavaDataset(path, processor, **options)
