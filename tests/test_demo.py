"""`multigran demo --quick`: the whole main job end to end (data, every stage, evaluation, report), and its resume;
and the property the benchmark rests on, checked on the demo model itself."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from multigran import demo
from multigran.cli import main
from multigran.data import synthetic as syn
from multigran.processing import MultiGranProcessor


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--out", str(out), "--quick"]) == 0
    return out


def test_quick_demo_trains_every_stage_and_reports(quick_demo):
    results = json.loads((quick_demo / "results.json").read_text())
    assert list(results["stages"]) == ["anyres/stage1", "anyres/stage2", "avg/stage3", "avg/stage4"]
    for name, stage in results["stages"].items():
        assert stage["steps"] > 0, name
        assert (quick_demo / name.replace("/stage", "-stage") / "model.safetensors").is_file()
    evaluation = results["evaluation"]
    levels = [9, 18, 36, 72, 144]
    assert set(evaluation) == {"anyres", "avg@auto", *(f"avg@{g}" for g in levels)}
    # Mean visual tokens per setting = the processor's own count for the (identical, 96x96) test images.
    processor = MultiGranProcessor.from_pretrained(quick_demo / "avg-stage4")
    image = quick_demo / "data" / json.loads((quick_demo / "data" / "test.json").read_text())[0]["image"]
    for g in levels:
        assert evaluation[f"avg@{g}"]["mean_visual_tokens"] == processor.count_image_tokens(str(image), granularity=g)[0]
    assert evaluation["anyres"]["mean_visual_tokens"] == evaluation["avg@144"]["mean_visual_tokens"]
    # The router's choices cover every test question, and the targets are computed from these numbers.
    router = evaluation["avg@auto"]
    assert sum(sum(c.values()) for c in router["granularity_by_type"].values()) == results["settings"]["test"]
    share = results["targets"]["router_tokens_share_of_finest"]["value"]
    assert share == pytest.approx(100 * router["mean_visual_tokens"] / evaluation["avg@144"]["mean_visual_tokens"])
    report = (quick_demo / "report.md").read_text()
    assert "| avg@auto |" in report and "## Targets" in report
    for plot in ("accuracy_by_type.png", "accuracy_vs_tokens.png", "router_choices.png"):
        assert (quick_demo / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_interrupted_demo_resumes_without_redoing_finished_work(quick_demo, capsys, monkeypatch):
    (quick_demo / "avg-stage4" / "DONE").unlink()  # as if the run stopped during stage 4
    evaluation = json.loads((quick_demo / "evaluation.json").read_text())
    del evaluation["avg@auto"]
    (quick_demo / "evaluation.json").write_text(json.dumps(evaluation))
    trained = []
    real = demo.train_stage
    monkeypatch.setattr(demo, "train_stage", lambda name, *a: trained.append(name) or real(name, *a))
    assert main(["demo", "--out", str(quick_demo), "--quick"]) == 0
    assert trained == ["avg/stage4_rglf.yaml"]  # only the unfinished stage ran again
    output = capsys.readouterr().out
    assert "anyres/stage2_finetune.yaml: done already" in output
    results = json.loads((quick_demo / "results.json").read_text())
    assert results["stages"]["avg/stage4"]["ran"] and not results["stages"]["anyres/stage2"]["ran"]
    assert "avg@auto" in results["evaluation"]


def test_unknown_demo_method_is_a_clear_error(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--quick", "--methods", "anyres,vit"]) == 2
    assert "unknown demo method(s) ['vit']" in capsys.readouterr().err


def test_quick_demo_of_mg_llava_and_llava_uhd_v2(tmp_path):
    assert main(["demo", "--out", str(tmp_path), "--quick", "--methods", "mg,uhd"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["methods"] == ["anyres", "mg", "uhd"]  # both start from the LLaVA-NeXT stage-2 model
    assert list(results["stages"]) == ["anyres/stage1", "anyres/stage2", "mg/stage1", "mg/stage2-objects", "mg/stage2",
                                       "uhd/stage0", "uhd/stage2", "anyres/stage2-hires"]
    # MG-LLaVA's stage 2 starts from its object phase: the object question alone, one per image, on the 192-px
    # dataset's first training images (the same scenes), every box kept
    objects = json.loads((tmp_path / "data-hires-objects" / "train.json").read_text())
    assert len(objects) == demo.SCALES["quick"].mg_object_samples
    assert {r["question_type"] for r in objects} == {"object"} and all(len(r["conversations"]) == 2 for r in objects)
    hires_train = json.loads((tmp_path / "data-hires" / "train.json").read_text())
    for record, same in zip(objects, hires_train):
        assert ((tmp_path / "data-hires-objects" / record["image"]).read_bytes()
                == (tmp_path / "data-hires" / same["image"]).read_bytes())
    assert all(r["boxes"] for r in json.loads((tmp_path / "data-hires-objects" / "boxes.json").read_text()))
    evaluation = results["evaluation"]
    assert set(evaluation) == {"anyres", "mg", "mg, no boxes", "uhd", demo.ANYRES_HIRES}
    # MG-LLaVA: 144 fused tokens + one object token per ground-truth box, or one all-zero box without boxes.
    assert evaluation["mg"]["mean_visual_tokens"] == 144 + demo.HIRES_TASK["num_objects"]
    assert evaluation["mg, no boxes"]["mean_visual_tokens"] == 144 + 1
    # LLaVA-UHD v2: a 192-px image is 2x2 slices of 96 px plus the overview, 6x6 query tokens each + a separator per
    # slice; its baseline, AnyRes on the same split, sees the image as one 96-px tile: 144 base + 144 tile + 12 rows.
    assert demo.UHD_SETTINGS["query_grid"] == 6
    assert evaluation["uhd"]["mean_visual_tokens"] == 4 * (36 + 1) + 36
    assert evaluation[demo.ANYRES_HIRES]["mean_visual_tokens"] == 144 + 144 + 12
    hires_image = tmp_path / "data-hires" / json.loads((tmp_path / "data-hires" / "test.json").read_text())[0]["image"]
    for model, name in (("uhd-stage2", "uhd"), ("anyres-hires-stage2", demo.ANYRES_HIRES)):
        processor = MultiGranProcessor.from_pretrained(tmp_path / model)
        assert evaluation[name]["mean_visual_tokens"] == processor.count_image_tokens(str(hires_image))[0]
    targets = results["targets"]
    assert targets["uhd_tokens_share_of_anyres_192px"]["value"] == pytest.approx(100 * 184 / 300)
    gain = (evaluation["uhd"]["accuracy_by_type"]["object"]
            - evaluation[demo.ANYRES_HIRES]["accuracy_by_type"]["object"])
    assert targets["uhd_object_gain_over_anyres_192px"]["value"] == pytest.approx(gain)
    assert f"| {demo.ANYRES_HIRES} |" in (tmp_path / "report.md").read_text()
    # the 192-px data have a validation split (for tuning), disjoint from the test split's images
    val, test = (json.loads((tmp_path / "data-hires" / f"{split}.json").read_text()) for split in ("val", "test"))
    assert len(val) == demo.SCALES["quick"].val and not {r["image"] for r in val} & {r["image"] for r in test}
    assert set(evaluation["mg"]["accuracy_by_type"]) == {"coarse", "fine", "object"}
    assert "mg_object_gain_from_object_tokens" in results["targets"]
    assert "| mg, no boxes |" in (tmp_path / "report.md").read_text()
    # a third of the training images have no boxes: the same model also learns to answer without object tokens
    train_boxes = json.loads((tmp_path / "data-hires" / "boxes-train.json").read_text())
    assert sum(not r["boxes"] for r in train_boxes) == len(train_boxes) // 3


def summary(accuracy, object_accuracy, tokens):
    return {"accuracy": accuracy, "accuracy_by_type": {"object": object_accuracy}, "mean_visual_tokens": tokens}


@pytest.mark.parametrize("uhd, anyres, met", [
    (summary(90, 80, 184), summary(80, 33, 300), {"accuracy": True, "gain": True, "tokens": True}),
    (summary(70, 80, 184), summary(80, 33, 300), {"accuracy": False, "gain": True, "tokens": True}),
    (summary(90, 60, 184), summary(80, 33, 300), {"accuracy": True, "gain": False, "tokens": True}),
    (summary(90, 80, 724), summary(80, 33, 300), {"accuracy": True, "gain": True, "tokens": False}),
])
def test_uhd_targets_compare_with_anyres_on_the_same_split(uhd, anyres, met):
    targets = demo.check_targets({"uhd": uhd, demo.ANYRES_HIRES: anyres})
    assert targets["uhd_accuracy"]["met"] is met["accuracy"]
    gain = targets["uhd_object_gain_over_anyres_192px"]
    assert gain["value"] == uhd["accuracy_by_type"]["object"] - 33 and gain["met"] is met["gain"]
    share = targets["uhd_tokens_share_of_anyres_192px"]
    assert share["value"] == pytest.approx(100 * uhd["mean_visual_tokens"] / 300) and share["met"] is met["tokens"]
    assert "uhd_accuracy" not in demo.check_targets({"uhd": uhd})  # no baseline row, no claim


# ------------------------------------------------------------------ the benchmark's property on the demo model


def permute_block(scene):
    """The square left of the framed one swapped with the other row's left square: another fine answer."""
    first, second, third = scene.square_colors  # framed row 0: TL, BL, BR; framed row 1: TL, TR, BL
    colors = (second, first, third) if scene.framed_row == 0 else (third, second, first)
    return dataclasses.replace(scene, square_colors=colors)


def test_the_demo_model_cannot_see_the_fine_answer_at_levels_0_to_2(tmp_path):
    """The demo's tower has no position embedding, so AVG-LLaVA's pooled tokens at levels 0-2 are the same for two
    images whose fine answers differ (exactly, for any weights: checked here with random ones), while levels 3 and 4
    differ. This is why a fine question cannot be answered at the coarse levels, whatever the training."""
    from multigran.demo import demo_tokenizer, init_model
    from multigran.modeling import MultiGranForConditionalGeneration
    from multigran.pipelines.granularity import granularity_levels

    init_model(tmp_path / "model", "avg", demo_tokenizer(), seed=3)
    model = MultiGranForConditionalGeneration.from_pretrained(tmp_path / "model").eval()
    processor = MultiGranProcessor.from_pretrained(tmp_path / "model")
    assert not model.vision_tower.embeddings.position_embedding.weight.any()
    with torch.no_grad():  # random weights everywhere else, including a non-zero class embedding and biases
        for parameter in model.visual.projector.parameters():
            parameter.normal_(0, 0.5)
    levels = [tokens for tokens, _, _ in granularity_levels(12)]
    for i in range(4):
        scene = syn.sample_scene(np.random.default_rng([9, i]), num_objects=0)
        images = [syn.render_scene(scene), syn.render_scene(permute_block(scene))]
        assert not np.array_equal(images[0], images[1])
        inputs = processor.image_processor(images=images)
        with torch.no_grad():
            crops = model.visual.encode_crops(model.vision_tower, inputs["pixel_values"], inputs["image_sizes"])
            for level in levels:
                a, b = (model.visual.merge(c, s, level) for c, s in zip(crops, inputs["image_sizes"].tolist()))
                difference = float((a - b).abs().max() / a.abs().max())  # float rounding only, or a real change
                if level <= 36:
                    assert difference < 1e-5, (i, level, difference)
                else:
                    assert difference > 1e-2, (i, level, difference)


def test_demo_training_keeps_the_tower_without_position_embedding(tmp_path):
    """The stage-2 overrides train the whole tower except its (zero) position embedding."""
    from multigran.demo import TOWER_PARTS, demo_tokenizer, init_model
    from multigran.modeling import MultiGranForConditionalGeneration
    from multigran.train.recipe import load_recipe
    from multigran.train.trainer import parameter_groups

    init_model(tmp_path / "model", "anyres", demo_tokenizer())
    model = MultiGranForConditionalGeneration.from_pretrained(tmp_path / "model")
    recipe = load_recipe("anyres/stage2_finetune.yaml", [
        f"model={tmp_path / 'model'}", *(f"trainable.{part}=1.0e-3" for part in TOWER_PARTS),
        "trainable.vision_tower=null"])
    groups = parameter_groups(model, recipe.trainable)
    frozen = [name for name, _ in model.named_parameters() if name.startswith("vision_tower.") and name not in groups]
    # (post_layernorm only normalises the CLS output, which LLaVA-style models never read)
    assert frozen == ["vision_tower.embeddings.position_embedding.weight", "vision_tower.post_layernorm.weight",
                      "vision_tower.post_layernorm.bias"]
