"""Fuzz: a seeded corpus of bad (and a few good) inputs through every entry point.

Every CLI case runs in-process through `multigran.cli.main(argv)` and must end in one of two ways:
- bad input: a non-zero exit code, stderr ending in exactly ONE line `multigran: error: ...` that names the culprit
  (the file, key, field or option given in the case), no traceback anywhere, and no output left behind;
- good input: exit code 0 (and, where the case says, the expected output).
Python API cases (processor, model) must raise ValueError/TypeError naming the culprit, never another exception type.

The corpus is generated from a fixed seed, so a failure names a reproducible case. `CORPUS_COUNTS` below is filled by
the run (the README reports the numbers).
"""

import io
import json
import os
import pickle
import random
import shutil
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from multigran.cli import main

SEED = 19


@dataclass
class Case:
    entry: str  # generate, eval, train, convert, switch-method, init, init-tiny, detect, processor, model
    name: str
    argv: list | None = None  # CLI cases
    call: object = None  # Python API cases: a function that must raise
    culprit: tuple = ()  # one of these strings must appear in the error line
    good: bool = False  # a valid input: exit code 0
    output: Path | None = None  # must not exist after a failure
    stdout: str | None = None  # good cases: must appear on stdout


@dataclass
class Outcome:
    case: Case
    problem: str | None  # None = as expected
    kind: str = "error"  # "error" (clean one-line error), "result" (good input ran), "failed"


CORPUS_COUNTS: Counter = Counter()

# --- building blocks ------------------------------------------------------------------------------------------------


def png(path, size=(40, 30), seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def variant(base: Path, root: Path, name: str) -> Path:
    target = root / name
    shutil.copytree(base, target)
    return target


def edit_weights(folder: Path, change):
    state = load_file(folder / "model.safetensors")
    change(state)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


class Evil:
    def __reduce__(self):
        return (os.system, ("echo never-run",))


def broken_model_dirs(base: Path, root: Path, rng: random.Random) -> list[tuple[str, Path, tuple]]:
    """(name, folder, culprit) for model directories broken in every way the corpus knows."""
    out = []
    weights = (base / "model.safetensors").read_bytes()
    state = load_file(base / "model.safetensors")
    keys = sorted(state)

    def add(name, culprit, make):
        folder = variant(base, root, name)
        make(folder)
        out.append((name, folder, culprit))

    # weight files: empty, truncated, garbage, pickles
    add("zero_bytes", ("model.safetensors",), lambda f: (f / "model.safetensors").write_bytes(b""))
    for i in range(6):
        cut = rng.randrange(1, len(weights) - 1)
        add(f"truncated_{cut}", ("model.safetensors",), lambda f, c=cut: (f / "model.safetensors").write_bytes(weights[:c]))
    for i in range(4):
        junk = rng.randbytes(rng.randrange(1, 4096))
        add(f"garbage_{i}", ("model.safetensors",), lambda f, j=junk: (f / "model.safetensors").write_bytes(j))
    add("huge_header", ("model.safetensors",),
        lambda f: (f / "model.safetensors").write_bytes((10**12).to_bytes(8, "little") + b"{}"))

    def pickle_bin(folder, payload):
        (folder / "model.safetensors").unlink()
        (folder / "pytorch_model.bin").write_bytes(payload)

    add("pickle_bin", ("pytorch_model.bin",), lambda f: pickle_bin(f, pickle.dumps({"w": Evil()})))
    buffer = io.BytesIO()
    torch.save({"w": Evil()}, buffer)
    add("torch_pickle_bin", ("pytorch_model.bin",), lambda f: pickle_bin(f, buffer.getvalue()))
    buffer = io.BytesIO()
    torch.save(dict(state), buffer)
    add("truncated_bin", ("pytorch_model.bin",), lambda f: pickle_bin(f, buffer.getvalue()[:5000]))
    add("no_weights", ("no weights",), lambda f: (f / "model.safetensors").unlink())

    # keys: missing, unexpected, mis-shaped
    def drop(prefixes):
        return lambda f: edit_weights(f, lambda s: [s.pop(k) for k in list(s) if k.startswith(prefixes)])

    add("missing_projector", ("visual.projector",), drop(("visual.projector",)))
    add("missing_llm_layer", ("language_model.model.layers.1",), drop(("language_model.model.layers.1.",)))
    add("missing_llm", ("language_model",), drop(("language_model.",)))
    add("missing_vision", ("vision_tower",), drop(("vision_tower.",)))
    for key in rng.sample(keys, 4):
        add(f"missing_{key}", (key,), drop((key,)))
    add("unexpected_key", ("visual.extra_head.weight",),
        lambda f: edit_weights(f, lambda s: s.update({"visual.extra_head.weight": torch.zeros(3)})))
    for key in rng.sample([k for k in keys if state[k].dim() == 2], 3):
        add(f"misshaped_{key}", (key,), lambda f, k=key: edit_weights(f, lambda s: s.update({k: torch.zeros(3, 5)})))

    # config.json
    config = json.loads((base / "config.json").read_text())

    def write_config(value=None, raw=None):
        def make(folder):
            path = folder / "config.json"
            if raw is not None:
                path.write_bytes(raw)
            else:
                path.write_text(json.dumps(value))
        return make

    for model_type in ("llava_next", "llama", None, 7):
        changed = dict(config)
        if model_type is None:
            changed.pop("model_type", None)
        else:
            changed["model_type"] = model_type
        add(f"model_type_{model_type}", ("config.json",), write_config(changed))
    text = (base / "config.json").read_bytes()
    for i in range(3):
        add(f"config_truncated_{i}", ("config.json",), write_config(raw=text[: rng.randrange(1, len(text) - 2)]))
    add("config_empty", ("config.json",), write_config(raw=b""))
    add("config_deep", ("config.json",), write_config(raw=b"[" * 100_000 + b"]" * 100_000))
    add("config_latin1", ("config.json",), write_config(raw=text.replace(b'"anyres"', b'"any\xe9res"')))
    add("config_list", ("config.json",), write_config([config]))
    add("config_method", ("method", "bogus"), write_config({**config, "method": "bogus"}))
    add("config_settings", ("method_settings", "nonsense"), write_config({**config, "method_settings": {"nonsense": 1}}))

    # processor files
    for i, template in enumerate(["{% for m in messages %}{{ m }", "{% if x %}never closed", "{{ 1 + }}",
                                  "{{ raise_exception('no images here') }}", "{% for m in messages %}{{ m.content.nope() }}{% endfor %}"]):
        add(f"template_{i}", ("chat_template.jinja",), lambda f, t=template: (f / "chat_template.jinja").write_text(t))
    tokenizer = (base / "tokenizer.json").read_bytes()
    add("tokenizer_truncated", ("tokenizer.json",), lambda f: (f / "tokenizer.json").write_bytes(tokenizer[:300]))
    add("tokenizer_wrong_shape", ("tokenizer.json", "processor"), lambda f: (f / "tokenizer.json").write_text('{"model": 3}'))
    add("tokenizer_config_bad", ("tokenizer_config.json",), lambda f: (f / "tokenizer_config.json").write_text("{oops"))
    add("processor_config_bad", ("processor_config.json",), lambda f: (f / "processor_config.json").write_text('{"a": [1,'))
    add("processor_config_deep", ("processor_config.json",),
        lambda f: (f / "processor_config.json").write_text('{"a":' * 5000 + "1" + "}" * 5000))
    add("index_missing_shard", ("model.safetensors.index.json", "model-00002"),
        lambda f: (f / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": {keys[0]: "model-00002-of-00002.safetensors"}})))
    return out


# --- the corpus -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_model_dir):
    from multigran.tiny import build_tiny

    rng = random.Random(SEED)
    root = tmp_path_factory.mktemp("fuzz")
    base = Path(tiny_model_dir)
    avg_dir = root / "tiny_avg"
    build_tiny(avg_dir, method="avg", seed=0)
    image = png(root / "img.png")
    cases: list[Case] = []
    fresh = iter(range(10**6))

    def out_path(kind="out"):
        return root / "outputs" / f"{kind}_{next(fresh)}"

    (root / "outputs").mkdir()
    (root / "models").mkdir()
    broken = broken_model_dirs(base, root / "models", rng)

    # generate / eval / switch-method / train on every broken model directory
    records = root / "records.json"
    records.write_text(json.dumps([{"id": "q1", "image": "img.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]}]))
    data = root / "train.json"
    data.write_text(json.dumps([{"id": "t1", "image": "img.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]}]))
    recipe = root / "recipe.yaml"
    recipe.write_text(
        "model: MODEL\noutput_dir: OUT\ndata:\n  path: DATA\n  image_folder: FOLDER\n  template: vicuna_v1\n"
        "trainable:\n  visual.projector: 1.0e-3\ntraining:\n  max_steps: 1\n  per_device_train_batch_size: 1\n"
        "  report_to: none\n  save_strategy: 'no'\n".replace("DATA", str(data)).replace("FOLDER", str(root))
        .replace("MODEL", str(base)).replace("OUT", str(root / "unused")))
    for index, (name, folder, culprit) in enumerate(broken):
        if index % 2 == 0:  # every other one (switch-method below reads every broken directory)
            cases.append(Case("generate", f"model:{name}", ["generate", "--model", str(folder), "--image", str(image),
                                                             "--prompt", "hi", "--max-new-tokens", "2", "--device",
                                                             "cpu"], culprit=culprit))
        dst = out_path("switch")
        cases.append(Case("switch-method", f"model:{name}", ["switch-method", str(folder), str(dst), "--to", "avg"],
                          culprit=culprit, output=dst))
    weight_or_config = [b for b in broken if not b[0].startswith(("template_", "tokenizer", "processor_config"))]
    for name, folder, culprit in broken[::3]:
        cases.append(Case("eval", f"model:{name}", ["eval", "--model", str(folder), "--data", str(records),
                                                     "--image-folder", str(root), "--device", "cpu"], culprit=culprit))
    for name, folder, culprit in weight_or_config[1::3]:  # training reads the weights and config (its template is named)
        out = out_path("train")
        cases.append(Case("train", f"model:{name}", ["train", "--recipe", str(recipe), f"model={folder}",
                                                      f"output_dir={out}"], culprit=culprit, output=out))

    # generate: options
    gen = ["generate", "--model", str(base), "--image", str(image), "--prompt", "hi", "--max-new-tokens", "2"]
    avg_gen = ["generate", "--model", str(avg_dir), "--image", str(image), "--prompt", "hi", "--max-new-tokens", "2"]
    for value in ["0", "-1", "abc", "1.5", "99999", "", "nan", "7", "auto "]:
        cases.append(Case("generate", f"avg --granularity {value!r}", avg_gen + ["--granularity", value],
                          culprit=("granularity",)))
    cases.append(Case("generate", "anyres --granularity 4", gen + ["--granularity", "4"], culprit=("granularity",)))
    for value in ["-1", "nan", "inf", "-inf", "abc"]:
        cases.append(Case("generate", f"--temperature {value}", gen + ["--temperature", value], culprit=("temperature",)))
    for value in ["0", "-5", "abc", "1e9"]:
        cases.append(Case("generate", f"--max-new-tokens {value}", gen[:-2] + ["--max-new-tokens", value],
                          culprit=("max-new-tokens", "max_new_tokens")))
    for value in ["mps", "bogus", "cuda:99", "cpu:0", "", "CUDA", "cuda:-1", "cuda:x"]:
        cases.append(Case("generate", f"--device {value!r}", gen + ["--device", value], culprit=("device",)))
    cases.append(Case("generate", "--dtype int8", gen + ["--dtype", "int8"], culprit=("dtype",)))
    for value in ["0", "-1", "abc"]:
        cases.append(Case("generate", f"--max-visual-tokens {value}", avg_gen + ["--granularity", "auto",
                                                                              "--max-visual-tokens", value],
                          culprit=("max-visual-tokens", "max_visual_tokens")))
    for value in ["nan", "inf", "-inf", "abc"]:
        cases.append(Case("generate", f"--granularity-bias {value}", avg_gen + ["--granularity", "auto",
                                                                             "--granularity-bias", value],
                          culprit=("granularity-bias", "granularity_bias")))
    bad_images = {"missing": root / "nope.png", "folder": root, "text": root / "records.json"}
    data_png = (root / "img.png").read_bytes()
    for i in range(3):
        path = root / f"cut_{i}.png"
        path.write_bytes(data_png[: rng.randrange(8, len(data_png) - 10)])
        bad_images[f"truncated_{i}"] = path
    for name, path in bad_images.items():
        cases.append(Case("generate", f"--image {name}", ["generate", "--model", str(base), "--image", str(path),
                                                          "--prompt", "hi"], culprit=(path.name,)))
    cases.append(Case("generate", "no --prompt", ["generate", "--model", str(base)], culprit=("--prompt",)))
    cases.append(Case("generate", "--model missing", ["generate", "--model", str(root / "nowhere"), "--prompt", "hi"],
                      culprit=("nowhere",)))
    cases.append(Case("generate", "--model is a file", ["generate", "--model", str(image), "--prompt", "hi"],
                      culprit=("img.png",)))
    for argv, expect in ([gen + ["--device", "cpu"], None], [avg_gen + ["--granularity", "auto", "--device", "cpu"], None],
                         [avg_gen + ["--granularity", "16", "--device", "cpu"], None]):
        cases.append(Case("generate", f"good {' '.join(argv[-3:])}", argv, good=True))

    # eval: data files and options
    folder = str(root)
    evl = ["eval", "--model", str(base), "--image-folder", folder, "--device", "cpu"]

    def data_file(name, content: bytes | str):
        path = root / "eval_data" / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path

    good_record = {"id": "q1", "image": "img.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]}
    eval_bad = {
        "ints.json": "[1, 2, 3]", "lists.json": "[[1], [2]]", "nulls.json": "[null]", "dict.json": '{"a": 1}',
        "conv_string.json": json.dumps([{**good_record, "conversations": "hello"}]),
        "conv_dict.json": json.dumps([{**good_record, "conversations": {"from": "human"}}]),
        "turn_no_value.json": json.dumps([{**good_record, "conversations": [{"from": "human"}]}]),
        "number_text.json": json.dumps([{**good_record, "conversations": [{"from": "human", "value": 5}]}]),
        "image_int.json": json.dumps([{**good_record, "image": 3}]),
        "image_list.json": json.dumps([{**good_record, "image": [1, 2]}]),
        "deep.json": "[" * 50_000 + "]" * 50_000, "latin1.json": b'[{"id": "\xe9"}]', "empty.json": "",
        "truncated.json": json.dumps([good_record])[:40],
        "lines.jsonl": json.dumps(good_record) + "\n" + json.dumps(good_record) + "\n[1, 2]\n",
        "line3_bad.jsonl": json.dumps(good_record) + "\n\n{oops\n",
        "deep.jsonl": "[" * 50_000 + "]" * 50_000 + "\n",
    }
    for name, content in eval_bad.items():
        out = out_path("eval")
        cases.append(Case("eval", f"--data {name}", evl + ["--data", str(data_file(name, content)), "--out", str(out)],
                          culprit=(name,), output=out))
    good_data = data_file("good.json", json.dumps([good_record]))
    for option, value in [("--limit", "0"), ("--limit", "-1"), ("--batch-size", "0"), ("--batch-size", "-1"),
                          ("--max-new-tokens", "0"), ("--max-visual-tokens", "0"), ("--granularity", "abc"),
                          ("--granularity", "0"), ("--device", "mps"), ("--device", "bogus"),
                          ("--boxes", str(root / "no_boxes.json"))]:
        cases.append(Case("eval", f"{option} {value}", evl + ["--data", str(good_data), option, value],
                          culprit=(option, option.strip("-").replace("-", "_"), Path(value).name)))
    cases.append(Case("eval", "--data missing", evl + ["--data", str(root / "absent.json")], culprit=("absent.json",)))
    out = out_path("eval")
    cases.append(Case("eval", "good records", evl + ["--data", str(good_data), "--max-new-tokens", "2",
                                                      "--out", str(out)], good=True))

    # train: recipes
    def recipe_case(name, text=None, overrides=(), culprit=(), raw=None):
        path = root / "recipes" / f"{name}.yaml"
        path.parent.mkdir(exist_ok=True)
        if raw is not None:
            path.write_bytes(raw)
        else:
            path.write_text(text if text is not None else recipe.read_text())
        out = out_path("train")
        cases.append(Case("train", name, ["train", "--recipe", str(path), f"output_dir={out}", *overrides],
                          culprit=culprit, output=out))

    for value in ["-1", "0", "abc", "1.5", "true", "nan"]:
        recipe_case(f"max_steps_{value}", overrides=[f"training.max_steps={value}"], culprit=("max_steps",))
    for value in ["-1", "0", "nan", "inf", "abc", "true", "[1]"]:
        recipe_case(f"lr_{value}", overrides=[f"trainable.visual.projector={value}"], culprit=("visual.projector",))
    for key in ["per_device_train_batch_size", "gradient_accumulation_steps"]:
        for value in ["0", "-1", "1.5", "abc"]:
            recipe_case(f"{key}_{value}", overrides=[f"training.{key}={value}"], culprit=(key,))
    for key, value in [("num_train_epochs", "0"), ("num_train_epochs", "-2"), ("num_train_epochs", "nan"),
                       ("learning_rate", "-1"), ("weight_decay", "-0.1"), ("warmup_steps", "-1"),
                       ("save_steps", "0"), ("logging_steps", "-1"), ("dataloader_num_workers", "-1"),
                       ("seed", "abc"), ("adam_beta1", "1.5")]:
        recipe_case(f"{key}_{value}", overrides=[f"training.{key}={value}"], culprit=(key,))
    for key, value in [("data.max_length", "0"), ("data.max_length", "-3"), ("data.max_length", "abc"),
                       ("data.template", "bogus"), ("data.on_bad_record", "maybe"), ("data.seed", "-1"),
                       ("data.image_options", "[1]"), ("data.path", "[]"), ("data.path", "3"),
                       ("data.path", str(root / "nothing.json")), ("data.image_folder", str(root / "no_folder")),
                       ("data.box_file", str(root / "no_boxes.json")), ("model", str(root / "no_model")),
                       ("training.deepspeed", "recipes/deepspeed/zero2.json"),
                       ("training.deepspeed", str(root / "ds.json")), ("training.bogus_argument", "1"),
                       ("unknown_top", "1"), ("lora.r", "0"), ("lora.dropout", "1.5"), ("model_dtype", "int8")]:
        recipe_case(f"{key}_{value}".replace("/", "_"), overrides=[f"{key}={value}"],
                    culprit=(key.split(".")[-1], Path(value).name))
    recipe_case("yaml_syntax", text="model: [unclosed\n", culprit=("yaml_syntax.yaml",))
    recipe_case("yaml_deep", text="a: " + "[" * 3000 + "]" * 3000 + "\n", culprit=("yaml_deep.yaml",))
    recipe_case("yaml_latin1", raw=recipe.read_bytes().replace(b"vicuna_v1", b"vicu\xf1a"), culprit=("yaml_latin1.yaml",))
    recipe_case("yaml_list", text="- 1\n- 2\n", culprit=("yaml_list.yaml",))
    recipe_case("yaml_empty", text="", culprit=("yaml_empty.yaml",))
    recipe_case("bad_override", overrides=["no_equals_sign"], culprit=("no_equals_sign",))
    recipe_case("override_yaml", overrides=["training.max_steps=[1"], culprit=("training.max_steps",))
    cases.append(Case("train", "recipe missing", ["train", "--recipe", str(root / "absent.yaml")], culprit=("absent.yaml",)))
    for name, content in {**eval_bad, "conv_error.json": json.dumps([{**good_record, "id": "t9", "conversations": "x"}])}.items():
        path = root / "train_data" / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        recipe_case(f"data_{name}", overrides=[f"data.path={path}", "data.on_bad_record=error"], culprit=(name,))
    for name in ("lines.jsonl", "line3_bad.jsonl"):
        recipe_case(f"data_line_{name}", overrides=[f"data.path={root / 'train_data' / name}",
                                                    "data.on_bad_record=error"], culprit=("line 3",))
    # a bad box file (mg boxes are read whatever the method: the reader must name the record)
    for name, content in {"boxes_bad.json": "[{\"id\": 1, \"boxes\": [[1, 2, 3]], \"scores\": [1], \"labels\": [\"a\"]}]",
                          "boxes_deep.json": "[" * 30_000 + "]" * 30_000, "boxes_latin1.json": b'[{"id": "\xff"}]',
                          "boxes_noid.json": '[{"boxes": []}]', "boxes_idlist.json": '[{"id": [1], "boxes": []}]',
                          "boxes_labels_int.json": '[{"id": "t1", "boxes": [[0,0,1,1]], "scores": [1], "labels": 5}]'}.items():
        path = root / "boxes" / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        recipe_case(f"data_{name}", overrides=[f"data.box_file={path}"], culprit=(name,))

    # convert
    empty = root / "empty_dir"
    empty.mkdir()
    for source in ("llava-next", "avg-llava", "uhd-v2", "mg-llava"):
        for name, folder, culprit in [("missing", root / "absent_src", ("absent_src",)), ("empty", empty, ("empty_dir",))] + [
                (n, f, c) for n, f, c in broken if n in ("zero_bytes", "garbage_0", "config_truncated_0", "config_deep",
                                                        "model_type_None", "config_latin1")]:
            dst = out_path("convert")
            extra = ["--clip", str(empty), "--convnext", str(empty), "--llm-config", str(empty)] if source == "mg-llava" else []
            cases.append(Case("convert", f"{source}:{name}", ["convert", source, str(folder), str(dst), *extra],
                              culprit=culprit + (folder.name,), output=dst))
    cases.append(Case("convert", "unknown source", ["convert", "llava-9", str(base), str(out_path())],
                      culprit=("llava-9",)))

    # switch-method: options
    for to in ["bogus", "", "AVG"]:
        dst = out_path("switch")
        cases.append(Case("switch-method", f"--to {to!r}", ["switch-method", str(base), str(dst), "--to", to],
                          culprit=("--to",), output=dst))
    for settings, culprit in [("{", "--settings"), ("[1]", "--settings"), ('{"granularity": NaN}', "--settings"),
                              ('{"nonsense": 1}', "nonsense"), ('{"top_k": "abc"}', "top_k"), ("null", "--settings"),
                              ('{"granularity": 0}', "granularity"), ('{"granularity_bias": 1e999}', "--settings"),
                              ("[" * 10_000, "--settings")]:
        dst = out_path("switch")
        cases.append(Case("switch-method", f"--settings {settings[:20]}", ["switch-method", str(base), str(dst), "--to",
                                                                             "avg", "--settings", settings],
                          culprit=(culprit,), output=dst))
    dst = out_path("switch")
    cases.append(Case("switch-method", "good anyres->avg", ["switch-method", str(base), str(dst), "--to", "avg"],
                      good=True))

    # init: parts
    parts = root / "parts"
    parts.mkdir()
    for name, folder, culprit in broken:
        if name in ("config_truncated_1", "config_empty", "config_deep", "config_latin1", "tokenizer_truncated",
                    "config_list"):
            dst = out_path("init")
            cases.append(Case("init", f"--llm {name}", ["init", str(dst), "--vision", str(empty), "--llm", str(folder)],
                              culprit=("--vision", "empty_dir"), output=dst))
            dst = out_path("init")
            cases.append(Case("init", f"--vision {name}", ["init", str(dst), "--vision", str(folder), "--llm", str(base)],
                              culprit=culprit + ("--vision", "--llm"), output=dst))
    for name, args, culprit in [
            ("no --vision", ["--llm", str(base)], ("--vision",)),
            ("--vision missing", ["--vision", str(root / "absent_v"), "--llm", str(base)], ("absent_v",)),
            ("--vision a file", ["--vision", str(image), "--llm", str(base)], ("img.png",)),
            ("--settings bad", ["--vision", str(empty), "--llm", str(base), "--settings", "{x"], ("--settings",)),
            ("--feature-layer abc", ["--vision", str(empty), "--llm", str(base), "--feature-layer", "abc"],
             ("feature-layer",)),
            ("--chat-template missing", ["--vision", str(empty), "--llm", str(base), "--chat-template",
                                         str(root / "absent.jinja")], ("absent.jinja", "empty_dir")),
    ]:
        dst = out_path("init")
        cases.append(Case("init", name, ["init", str(dst), *args], culprit=culprit, output=dst))
    latin = root / "latin1.jinja"
    latin.write_bytes(b"{{ '\xe9' }}")
    dst = out_path("init")
    cases.append(Case("init", "--chat-template latin1", ["init", str(dst), "--vision", str(base), "--llm", str(base),
                                                          "--chat-template", str(latin), "--settings", "{"],
                      culprit=("--settings", "latin1.jinja"), output=dst))

    # init-tiny
    for name, args, culprit in [("--method bogus", ["--method", "bogus"], ("--method", "bogus")),
                                ("--seed abc", ["--seed", "abc"], ("--seed",)),
                                ("--method ''", ["--method", ""], ("--method",))]:
        dst = out_path("tiny")
        cases.append(Case("init-tiny", name, ["init-tiny", str(dst), *args], culprit=culprit, output=dst))
    dst = out_path("tiny")
    cases.append(Case("init-tiny", "good", ["init-tiny", str(dst), "--method", "avg"], good=True))

    # detect (no OWLv2 weights here: every case must fail before the model is needed, or name the model folder)
    images_dir = root / "det_images"
    images_dir.mkdir()
    png(images_dir / "a.png")
    for name, args, culprit in [
            ("--images missing", ["--images", str(root / "absent_images"), "--tags", "cat"], ("absent_images",)),
            ("--model missing", ["--images", str(images_dir), "--tags", "cat"], ("no_owl",)),
            ("--tags-file missing", ["--images", str(images_dir), "--tags-file", str(root / "absent_tags.txt")],
             ("absent_tags.txt",)),
            ("--batch-size 0", ["--images", str(images_dir), "--tags", "cat", "--batch-size", "0"], ("batch-size", "batch_size")),
            ("--threshold nan", ["--images", str(images_dir), "--tags", "cat", "--threshold", "nan"], ("threshold",)),
            ("--threshold 2", ["--images", str(images_dir), "--tags", "cat", "--threshold", "2"], ("threshold",)),
            ("--save-every 0", ["--images", str(images_dir), "--tags", "cat", "--save-every", "0"], ("save-every", "save_every")),
            ("--tags empty", ["--images", str(images_dir), "--tags", " , "], ("tags",)),
            ("--images jsonl bad", ["--images", str(root / "eval_data" / "line3_bad.jsonl"), "--tags", "cat"],
             ("line3_bad.jsonl",)),
            ("--device mps", ["--images", str(images_dir), "--tags", "cat", "--device", "mps"], ("device", "no_owl")),
    ]:
        out = out_path("boxes") 
        cases.append(Case("detect", name, ["detect", *args, "--model", str(root / "no_owl"), "--out", str(out)],
                          culprit=culprit, output=out))

    # Python API: processor
    from multigran import MultiGranForConditionalGeneration, MultiGranProcessor

    processor = MultiGranProcessor.from_pretrained(base)
    avg_processor = MultiGranProcessor.from_pretrained(avg_dir)
    prompt = "USER: <image>\nWhat? ASSISTANT:"
    picture = Image.open(image).convert("RGB")

    def api(entry, name, function, culprit):
        cases.append(Case(entry, name, call=function, culprit=culprit))

    for value in [0, -1, "abc", 1.5, True, 99999, float("nan"), None if False else [36, 36], 10**30, "36.0"]:
        api("processor", f"avg granularity={value!r}", lambda v=value: avg_processor(images=picture, text=prompt,
                                                                                   granularity=v), ("granularity",))
    for text, culprit in [([1, 2, 3], "text"), (123, "text"), ([], "text"), ([None], "text"), (b"bytes", "text"),
                          ({"a": 1}, "text")]:
        api("processor", f"text={text!r}", lambda t=text: processor(images=picture, text=t), (culprit,))
    for images, culprit in [(3, "int"), ([[1, 2]], "image"), ({"x": 1}, "dict"), ("no_such_file.png", "no_such_file"),
                            (np.zeros((2, 2, 2, 2)), "shape"), (np.zeros((0, 4, 3), dtype=np.uint8), "empty"),
                            ([picture, picture], "placeholder")]:
        api("processor", f"images={type(images).__name__}:{culprit}", lambda i=images: processor(images=i, text=prompt),
            (culprit,))
    for name, options in [("unknown option", {"bogus_option": 1}), ("anyres granularity", {"granularity": 36}),
                          ("truncation", {"truncation": True})]:
        api("processor", name, lambda o=options: processor(images=picture, text=prompt, **o),
            tuple(o for o in options) + ("truncation",))
    api("processor", "max_pixels=0", lambda: type(processor.image_processor)(max_pixels=0), ("max_pixels",))
    api("processor", "max_pixels=-5", lambda: type(processor.image_processor)(max_pixels=-5), ("max_pixels",))

    # Python API: model (from_pretrained through the library's loader, forward with bad tensors)
    from multigran.loading import load_model

    for name, folder, culprit in weight_or_config[::3]:
        api("model", f"load_model:{name}", lambda f=folder: load_model(f, "cpu"), culprit)
    model = MultiGranForConditionalGeneration.from_pretrained(base).eval()
    inputs = processor(images=picture, text=prompt)
    vocab = model.config.text_config.vocab_size

    def forward(**change):
        return lambda: model(**{**inputs, **change})

    api("model", "pixel_values wrong shape", forward(pixel_values=torch.zeros(1, 3, 7, 7)), ("pixel_values",))
    api("model", "pixel_values 2-d", forward(pixel_values=torch.zeros(3, 3)), ("pixel_values",))
    api("model", "image_sizes zero", forward(image_sizes=torch.zeros(1, 2, dtype=torch.long)), ("image_sizes",))
    api("model", "input_ids out of vocabulary", forward(input_ids=inputs["input_ids"].clamp(max=0) + vocab + 5),
        ("input_ids", "vocab"))
    api("model", "input_ids negative", forward(input_ids=inputs["input_ids"] * 0 - 3), ("input_ids",))
    avg_model = MultiGranForConditionalGeneration.from_pretrained(avg_dir).eval()
    auto_inputs = avg_processor(images=picture, text=prompt, granularity="auto")
    for option, value in [("granularity_bias", float("nan")), ("granularity_bias", float("inf")),
                          ("granularity_bias", "abc"), ("max_visual_tokens", 0), ("max_visual_tokens", -3),
                          ("max_visual_tokens", 2.5)]:
        api("model", f"avg forward {option}={value!r}",
            lambda o=option, v=value: avg_model(**auto_inputs, **{o: v}), (option,))
    api("model", "model on the meta device", lambda: MultiGranForConditionalGeneration.from_pretrained(
        base, device_map="meta")(**inputs), ("meta",))
    for name, folder, culprit in weight_or_config[1::3]:
        if not name.startswith("missing_"):  # allow_missing forgives missing weights only
            api("model", f"load_model allow_missing:{name}", lambda f=folder: load_model(f, "cpu", allow_missing=True),
                culprit)
    for name, folder, _ in broken:
        if name in ("missing_projector", "missing_llm_layer"):
            cases.append(Case("model", f"good load_model allow_missing:{name}", good=True,
                              call=lambda f=folder: load_model(f, "cpu", allow_missing=True)))
    return cases


# --- running ----------------------------------------------------------------------------------------------------------


def run_case(case: Case, capfd) -> Outcome:
    if case.call is not None and case.good:
        try:
            case.call()
        except Exception as error:  # noqa: BLE001
            return Outcome(case, f"a good input raised {type(error).__name__}: {str(error)[:300]}", "failed")
        return Outcome(case, None, "result")
    if case.call is not None:
        try:
            case.call()
        except (ValueError, TypeError) as error:
            message = " ".join(str(error).split())
            if not any(c.lower() in message.lower() for c in case.culprit):
                return Outcome(case, f"the error does not name {case.culprit}: {type(error).__name__}: {message[:300]}")
            return Outcome(case, None)
        except Exception as error:  # noqa: BLE001 (the point: any other type is a failure)
            return Outcome(case, f"raised {type(error).__name__}: {' '.join(str(error).split())[:300]}", "failed")
        return Outcome(case, "accepted the bad input (no error)", "failed")
    try:
        code = main(case.argv)
    except BaseException as error:  # noqa: BLE001 (main must never raise)
        capfd.readouterr()
        return Outcome(case, f"main() raised {type(error).__name__}: {str(error)[:300]}", "failed")
    captured = capfd.readouterr()
    err = captured.err
    if "Traceback" in err:
        return Outcome(case, f"traceback on stderr: {err[-400:]}", "failed")
    if case.good:
        if code != 0:
            return Outcome(case, f"a good input exited {code}: {err.strip()[-300:]}", "failed")
        return Outcome(case, None, "result")
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("multigran:")]
    if code == 0:
        return Outcome(case, "exit code 0 for a bad input (a silent wrong answer)", "failed")
    if len(errors) != 1 or lines[-1] != errors[0] or not errors[0].startswith("multigran: error: "):
        return Outcome(case, f"exit {code} but not one `multigran: error:` line: {lines[-3:]}", "failed")
    if not any(c.lower() in errors[0].lower() for c in case.culprit):
        return Outcome(case, f"the error does not name {case.culprit}: {errors[0][:400]}", "failed")
    if case.output is not None and case.output.exists():
        return Outcome(case, f"a partial output was left at {case.output}", "failed")
    return Outcome(case, None)


def test_fuzz_corpus(corpus, capfd, monkeypatch):
    monkeypatch.delenv("MULTIGRAN_DEBUG", raising=False)
    seconds = defaultdict(float)
    outcomes = []
    for case in corpus:
        start = time.perf_counter()
        outcomes.append(run_case(case, capfd))
        seconds[case.entry] += time.perf_counter() - start
    CORPUS_COUNTS.clear()
    for outcome in outcomes:
        status = "ok" if outcome.problem is None else "FAILED"
        CORPUS_COUNTS[(outcome.case.entry, "bad" if not outcome.case.good else "good", status)] += 1
    with capfd.disabled():
        print(f"\nfuzz corpus: {len(corpus)} inputs")
        for entry in sorted({c.entry for c in corpus}):
            row = {key[1:]: n for key, n in CORPUS_COUNTS.items() if key[0] == entry}
            print(f"  {entry:14s} {seconds[entry]:5.1f} s  " + ", ".join(f"{kind} {status}: {n}" for (kind, status), n in sorted(row.items())))
    failures = [f"{o.case.entry} [{o.case.name}]: {o.problem}" for o in outcomes if o.problem is not None]
    assert len([c for c in corpus if not c.good]) >= 300
    assert not failures, f"{len(failures)} of {len(corpus)} inputs mishandled:\n" + "\n".join(failures)
