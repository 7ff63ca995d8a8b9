"""The adaptive-granularity layer over every method: AVG-LLaVA's scaler + router on AnyRes (method avg), on MG-LLaVA's
fused grid and on LLaVA-UHD v2's per-view grids (method_settings.adaptive_granularity).

Checked against independent computations: the pooled tokens against a block mean of the same model's unpooled
tokens (a model without the layer, same weights), the processor's token accounting against the model's output at
every level and in auto mode. Plus the knob in generate, the commands and the server (level, budget, bias), the shipped
stage-3/4 recipes through `multigran train`, `switch-method` adding the layer to a trained checkpoint, and the demo of
a composed model. The stage-3/4 losses of the composed models: tests/test_avg_training.py.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from multigran import MultiGranForConditionalGeneration, MultiGranProcessor
from multigran.cli import main
from multigran.convert.method import switch_method
from multigran.pipelines.uhd import count_uhd_tokens
from multigran.tiny import build_tiny

QUESTIONS = ["USER: <image>\nWhat colour is the dot? ASSISTANT:", "USER: <image>\nHow many shapes? ASSISTANT:"]
pytestmark = pytest.mark.usefixtures("one_thread")
COMPOSED = {  # name -> (method, method_settings, image sizes: unsliced and sliced for uhd, tiled for avg)
    "avg": ("avg", {}, [(90, 60), (64, 64)]),
    "mg": ("mg", {"adaptive_granularity": {}}, [(90, 60), (40, 40)]),
    "uhd": ("uhd", {"adaptive_granularity": {}}, [(70, 40), (32, 32)]),
}


def image(size, seed):
    width, height = size
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def composed():
    cache = {}

    def get(name):
        if name not in cache:
            method, settings, sizes = COMPOSED[name]
            extra = {"image_size": 64, "patch_size": 8} if method == "avg" else {}
            model, processor = build_tiny(None, method=method, seed=5, method_settings=settings, **extra)
            processor.tokenizer.padding_side = "right"
            cache[name] = model.eval(), processor, [image(size, i) for i, size in enumerate(sizes)]
        return cache[name]

    return get


def without_layer(model):
    """The same weights in a model of the same method without the layer (MG / UHD as released)."""
    config = model.config.__class__.from_dict(model.config.to_dict())
    config.method_settings = {k: v for k, v in config.method_settings.items() if k != "adaptive_granularity"}
    plain = MultiGranForConditionalGeneration(config).eval()
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all(key.startswith("visual.router.") for key in unexpected)
    return plain


def block_mean(views: torch.Tensor, kernel) -> torch.Tensor:
    """(views, n*n, D) -> (views, (n/kr)*(n/kc), D): the mean of every kr x kc block, raster order."""
    count, tokens, dim = views.shape
    side = int(round(tokens ** 0.5))
    rows, cols = kernel
    blocks = views.reshape(count, side // rows, rows, side // cols, cols, dim)
    return blocks.mean(dim=(2, 4)).reshape(count, -1, dim)


def features_of(model, processor, picture, granularity=None, **generate_options):
    options = {} if granularity is None else {"granularity": granularity}
    inputs = processor(images=[picture], text=[QUESTIONS[0]], **options)
    return model.get_image_features(
        inputs["pixel_values"], inputs.get("image_sizes"), input_ids=inputs["input_ids"],
        inputs_embeds=model.embed_text(inputs["input_ids"]), attention_mask=inputs["attention_mask"],
        **{k: inputs[k] for k in model.visual.input_names if k in inputs}, **generate_options,
    )[0], inputs


@pytest.mark.parametrize("name", list(COMPOSED))
def test_processor_counts_are_exact_at_every_level_and_in_auto_mode(composed, name):
    model, processor, images = composed(name)
    layer = model.visual.adaptive
    assert layer is not None and model.visual.router is not None
    with torch.no_grad():
        for picture in images:
            for level in layer.level_tokens:
                features, inputs = features_of(model, processor, picture, level)
                assert processor.count_image_tokens(picture, granularity=level) == [features.shape[0]]
                assert int((inputs["input_ids"] == processor.image_token_id).sum()) == features.shape[0]
            features, inputs = features_of(model, processor, picture, "auto")
            assert int((inputs["input_ids"] == processor.image_token_id).sum()) == 1  # one placeholder in auto mode
            report = model.visual.last_report[0]
            assert report["mode"] == "auto" and report["granularity"] in layer.level_tokens
            assert len(report["router_probabilities"]) == len(layer.level_tokens)
            assert processor.count_image_tokens(picture, granularity=report["granularity"]) == [features.shape[0]]


def test_mg_pools_the_fused_grid_and_keeps_the_object_tokens(composed):
    model, processor, images = composed("mg")
    plain = without_layer(model)
    grid = model.visual.grid
    boxes = [[2, 2, 30, 20], [10, 10, 60, 50]]
    with torch.no_grad():
        inputs = processor(images=[images[0]], text=[QUESTIONS[0]], boxes=[boxes])
        reference = plain.get_image_features(inputs["pixel_values"], inputs["image_sizes"],
                                             **{k: inputs[k] for k in plain.visual.input_names if k in inputs})[0]
        fused, objects = reference[:grid * grid], reference[grid * grid:]
        assert objects.shape[0] == 2
        for tokens, kernel, _ in model.visual.adaptive.levels:
            inputs = processor(images=[images[0]], text=[QUESTIONS[0]], boxes=[boxes], granularity=tokens)
            features = model.get_image_features(inputs["pixel_values"], inputs["image_sizes"],
                                                **{k: inputs[k] for k in model.visual.input_names if k in inputs})[0]
            torch.testing.assert_close(features[:tokens], block_mean(fused[None], kernel)[0])
            torch.testing.assert_close(features[tokens:], objects)  # object tokens stay as they are
        # The finest level is MG-LLaVA itself, exactly.
        torch.testing.assert_close(features, reference, rtol=0, atol=0)


def test_uhd_pools_every_view_and_keeps_the_separators_exact(composed):
    model, processor, images = composed("uhd")
    plain = without_layer(model)
    q = model.visual.settings.tokens_per_view
    embed = model.get_input_embeddings()
    separators = embed(torch.tensor(model.config.method_settings["separator_ids"]))  # (2, D): "," and "\n"
    with torch.no_grad():
        inputs = processor(images=[images[0]], text=[QUESTIONS[0]])
        cols, rows = inputs["slice_grids"][0].tolist()
        assert cols * rows > 1, "the test image must be sliced"
        reference = plain.get_image_features(inputs["pixel_values"], inputs["image_sizes"],
                                             **{k: inputs[k] for k in plain.visual.input_names if k in inputs})[0]
        # Released layout: [slice (q), sep] per slice, then the overview (q).
        slices = [reference[i * (q + 1): i * (q + 1) + q] for i in range(cols * rows)]
        overview = reference[cols * rows * (q + 1):]
        for tokens, kernel, _ in model.visual.adaptive.levels:
            inputs = processor(images=[images[0]], text=[QUESTIONS[0]], granularity=tokens)
            features = model.get_image_features(inputs["pixel_values"], inputs["image_sizes"],
                                                **{k: inputs[k] for k in model.visual.input_names if k in inputs})[0]
            assert features.shape[0] == count_uhd_tokens((cols, rows), tokens) == (tokens + 1) * cols * rows + tokens
            for index, view in enumerate(slices):
                start = index * (tokens + 1)
                torch.testing.assert_close(features[start:start + tokens], block_mean(view[None], kernel)[0])
                separator = separators[1 if index % cols == cols - 1 else 0]  # "\n" ends a row of slices
                torch.testing.assert_close(features[start + tokens], separator, rtol=0, atol=0)
            torch.testing.assert_close(features[-tokens:], block_mean(overview[None], kernel)[0])
        torch.testing.assert_close(features, reference, rtol=0, atol=0)  # the finest level is LLaVA-UHD v2 itself


@pytest.mark.parametrize("name", ["mg", "uhd"])
def test_generate_knob_level_budget_and_bias(composed, name):
    model, processor, images = composed(name)
    levels = model.visual.adaptive.level_tokens
    inputs = processor(images=[images[0]], text=[QUESTIONS[0]])  # the model's default: auto
    counts = [processor.count_image_tokens(images[0], granularity=g)[0] for g in levels]
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=2, do_sample=False, granularity=levels[1])
        assert model.last_visual_report[0]["granularity"] == levels[1]  # a generate-time level overrides
        assert model.last_visual_report[0]["visual_tokens"] == counts[1]
        model.generate(**inputs, max_new_tokens=2, do_sample=False, max_visual_tokens=counts[1])
        assert model.last_visual_report[0]["visual_tokens"] <= counts[1]
        model.generate(**inputs, max_new_tokens=2, do_sample=False, granularity_bias=1e6)
        assert model.last_visual_report[0]["granularity"] == levels[0]  # a huge cost per token: the coarsest
    with pytest.raises(ValueError, match=r"granularity 5 is not one of this model's levels"):
        processor(images=[images[0]], text=[QUESTIONS[0]], granularity=5)


def test_layer_settings_are_validated():
    with pytest.raises(ValueError, match=r"mg method_settings.adaptive_granularity: unknown key\(s\) \['level'\]"):
        build_tiny(None, method="mg", method_settings={"adaptive_granularity": {"level": 4}})
    with pytest.raises(ValueError, match="adaptive_granularity: top_k must be a positive integer"):
        build_tiny(None, method="uhd", method_settings={"adaptive_granularity": {"top_k": 0}})
    with pytest.raises(ValueError, match="granularity='auto' needs a router"):
        build_tiny(None, method="mg", method_settings={"adaptive_granularity": {"use_router": False}})
    model, processor = build_tiny(None, method="mg", method_settings={
        "adaptive_granularity": {"use_router": False, "granularity": 16}})
    assert model.visual.router is None and processor.count_image_tokens(image((40, 40), 0)) == [16 + 1]


def test_switch_method_adds_the_layer_to_a_trained_checkpoint(tmp_path):
    source, _ = build_tiny(tmp_path / "mg", method="mg", seed=3)
    report = switch_method(tmp_path / "mg", tmp_path / "mg-ag", "mg", {"adaptive_granularity": {"levels": [4, 16, 64]}})
    assert report["dropped"] == [] and report["new"] and all(k.startswith("visual.router.") for k in report["new"])
    target = MultiGranForConditionalGeneration.from_pretrained(tmp_path / "mg-ag")
    settings = target.config.method_settings
    assert settings["adaptive_granularity"] == {"levels": [4, 16, 64]}
    assert settings["high_res"] == source.config.method_settings["high_res"]  # the model's own settings are kept
    state = target.state_dict()
    assert all(torch.equal(state[k], v) for k, v in source.state_dict().items())
    processor = MultiGranProcessor.from_pretrained(tmp_path / "mg-ag")
    assert processor.count_image_tokens(image((40, 40), 0), granularity=16) == [16 + 1]


@pytest.mark.parametrize("method", ["mg", "uhd"])
def test_shipped_stage3_and_stage4_recipes_train_through_multigran_train(tmp_path, method):
    """`multigran switch-method` adds the layer, then one step of each shipped recipe through the CLI."""
    build_tiny(tmp_path / "base", method=method, seed=1)
    assert main(["switch-method", str(tmp_path / "base"), str(tmp_path / "init"), "--to", method,
                 "--settings", '{"adaptive_granularity": {}}']) == 0
    (tmp_path / "images").mkdir()
    records = []
    for i in range(4):
        image((40 + 20 * i, 40), i).save(tmp_path / "images" / f"{i}.png")
        records.append({"id": i, "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": ["red", "blue"][i % 2]}]})
    (tmp_path / "data.json").write_text(json.dumps(records))
    extra = []
    if method == "mg":
        (tmp_path / "boxes.json").write_text(json.dumps(
            [{"id": i, "boxes": [[2, 2, 20, 20]], "scores": [0.9], "labels": ["square"]} for i in range(4)]))
        extra = [f"data.box_file={tmp_path / 'boxes.json'}"]
    model_dir = tmp_path / "init"
    for stage in ("stage3_multigranularity", "stage4_rglf"):
        out = tmp_path / stage
        argv = ["train", "--recipe", f"{method}/{stage}.yaml", f"model={model_dir}", f"output_dir={out}",
                f"data.path={tmp_path / 'data.json'}", f"data.image_folder={tmp_path / 'images'}", *extra,
                "data.template=plain", "data.max_length=2048", "training.max_steps=1",
                "training.per_device_train_batch_size=2", "training.gradient_accumulation_steps=1",
                "training.dataloader_num_workers=0", "training.bf16=false", "training.save_strategy=no",
                "training.activation_checkpointing=false", "training.disable_tqdm=true", "training.logging_steps=1",
                "training.warmup_steps=0"]
        assert main(argv) == 0
        assert (out / "config.json").is_file()
        model_dir = out
    before = MultiGranForConditionalGeneration.from_pretrained(tmp_path / "stage3_multigranularity").state_dict()
    after = MultiGranForConditionalGeneration.from_pretrained(tmp_path / "stage4_rglf").state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("visual.router.") for k in changed)  # stage 4 moved the router only


def test_quick_demo_of_a_composed_model(tmp_path):
    """`multigran demo --methods mg+avg`: MG-LLaVA's stages, then its stages 3 and 4 with the layer, evaluated at
    every level and with the router, and the composed model's targets in the report."""
    from multigran import demo

    assert main(["demo", "--out", str(tmp_path), "--quick", "--methods", "mg+avg"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["methods"] == ["anyres", "mg", "mg+avg"]
    assert list(results["stages"])[-2:] == ["mg+avg/stage3", "mg+avg/stage4"]
    levels = demo.COMPOSED_LAYERS["mg+avg"]["levels"]
    evaluation = results["evaluation"]
    assert {f"mg+avg@{g}" for g in levels} | {"mg+avg@auto"} <= set(evaluation)
    for g in levels:  # the fused grid at the level + the scene's object token (one box per image)
        assert evaluation[f"mg+avg@{g}"]["mean_visual_tokens"] == g + demo.HIRES_TASK["num_objects"]
    assert evaluation["mg+avg@144"]["mean_visual_tokens"] == evaluation["mg"]["mean_visual_tokens"]
    assert {"mg+avg_router_tokens_saved_vs_finest", "mg+avg_router_accuracy_minus_finest"} <= set(results["targets"])
    saved = results["targets"]["mg+avg_router_tokens_saved_vs_finest"]["value"]
    auto_tokens = evaluation["mg+avg@auto"]["mean_visual_tokens"]
    assert saved == pytest.approx(100 * (1 - auto_tokens / evaluation["mg+avg@144"]["mean_visual_tokens"]))
    report = (tmp_path / "report.md").read_text()
    assert "## The router's choices per question type, mg+avg" in report and "| mg+avg@auto |" in report
    router = json.loads((tmp_path / "mg-avg-stage4" / "config.json").read_text())["method_settings"]
    for key, value in demo.COMPOSED_LAYERS["mg+avg"].items():
        assert router["adaptive_granularity"][key] == value
    # The released router's filter fills free text slots with masked (answer) tokens: the demo's top_k must leave
    # none free, i.e. every RGLF sample has at least top_k instruction tokens the router may read.
    from multigran.data.llava import LlavaDataset
    from multigran.pipelines.granularity import select_instruction_tokens

    processor = MultiGranProcessor.from_pretrained(tmp_path / "mg-avg-stage4")
    router_data = tmp_path / "data-hires-router"
    samples = LlavaDataset(str(router_data / "router.json"), processor, template="chat_template",
                           image_folder=str(router_data), box_file=str(router_data / "boxes.json"),
                           image_options={"granularity": "auto"})
    items = [samples[index] for index in range(len(samples))]  # (the dataset's index wraps: no plain iteration)
    valid = [int(select_instruction_tokens(item["input_ids"], processor.image_token_id,
                                           labels=item["labels"])[1].sum()) for item in items]
    assert len(items) == demo.SCALES["quick"].router
    assert min(valid) >= router["adaptive_granularity"]["top_k"]


@pytest.fixture(scope="module")
def composed_uhd_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("uhd_layer")
    build_tiny(path, method="uhd", seed=7, method_settings={"adaptive_granularity": {}})
    image((70, 40), 3).save(path / "picture.png")
    return path


def processor_count(model_dir, picture, **options) -> int:
    return MultiGranProcessor.from_pretrained(model_dir).count_image_tokens(Image.open(picture), **options)[0]


def test_the_knob_in_the_generate_and_eval_commands(composed_uhd_dir, tmp_path, capsys):
    picture = composed_uhd_dir / "picture.png"
    assert main(["generate", "--model", str(composed_uhd_dir), "--image", str(picture), "--prompt", "What is it?",
                 "--granularity", "36", "--max-new-tokens", "2", "--report"]) == 0
    report = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    entry = report[0] if isinstance(report, list) else report["visual_report"][0]
    assert entry["granularity"] == 36 and entry["mode"] == "fixed"
    assert entry["visual_tokens"] == count_uhd_tokens(tuple(entry["slice_grid"]), 36)
    data = tmp_path / "pope"
    data.mkdir()
    picture_copy = data / "0.png"
    picture_copy.write_bytes(picture.read_bytes())
    (data / "coco_pope_random.json").write_text(json.dumps(
        {"question_id": 0, "image": "0.png", "text": "Is there a dot?", "label": "yes"}) + "\n")
    out = tmp_path / "out"
    assert main(["eval", "--task", "pope", "--model", str(composed_uhd_dir), "--data", str(data), "--out", str(out),
                 "--granularity", "9,auto", "--max-new-tokens", "2", "--latency-samples", "1", "--no-progress"]) == 0
    settings = {s["name"]: s for s in json.loads((out / "results.json").read_text())["settings"]}
    assert set(settings) == {"granularity=9", "granularity=auto"}
    assert settings["granularity=9"]["efficiency"]["granularity_distribution"] == {"9": 1}
    # The task's own pre-resize (the release's 1024 long side) is applied before the knob's level.
    assert settings["granularity=9"]["processor_options"] == {"pre_resize_long_side": 1024, "granularity": 9}
    expected = processor_count(composed_uhd_dir, picture, granularity=9, pre_resize_long_side=1024)
    assert settings["granularity=9"]["efficiency"]["mean_visual_tokens_per_image"] == expected


def test_the_knob_in_the_server(composed_uhd_dir):
    import base64

    from starlette.testclient import TestClient

    from multigran.loading import load_model, load_processor
    from multigran.serve.app import create_app

    model, processor = load_model(composed_uhd_dir, "cpu", "float32"), load_processor(composed_uhd_dir)
    url = "data:image/png;base64," + base64.b64encode((composed_uhd_dir / "picture.png").read_bytes()).decode()
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is it?"}]
    body = {"model": "m", "messages": [{"role": "user", "content": content}], "max_tokens": 2, "temperature": 0}
    with TestClient(create_app(model, processor, model_name="m")) as client:
        fixed = client.post("/v1/chat/completions", json={**body, "granularity": 18}).json()
        assert fixed["visual_report"][0]["granularity"] == 18
        auto = client.post("/v1/chat/completions", json={**body, "granularity": "auto", "granularity_bias": 1e6})
        assert auto.json()["visual_report"][0]["granularity"] == 9  # the coarsest at a huge cost per token
        bad = client.post("/v1/chat/completions", json={**body, "granularity": 5})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "granularity"
