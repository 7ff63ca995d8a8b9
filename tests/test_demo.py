"""`multigran demo --quick`: the whole main job end to end (data, every stage, evaluation, report), and its resume."""

import json

import pytest

from multigran.cli import main
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
    import multigran.demo as demo

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


def test_unknown_or_unavailable_demo_method_is_a_clear_error(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--quick", "--methods", "anyres,vit"]) == 2
    assert "unknown demo method(s) ['vit']" in capsys.readouterr().err
    assert main(["demo", "--out", str(tmp_path), "--quick", "--methods", "avg,uhd"]) == 2
    assert "the demo has no stages for ['uhd'] yet" in capsys.readouterr().err
