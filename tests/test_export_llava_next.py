"""`multigran export llava-next`: an anyres model written as a native transformers LLaVA-NeXT checkpoint, loaded by
transformers alone (a fresh interpreter that never imports multigran) and giving the same token ids and logits."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from multigran import MultiGranForConditionalGeneration, MultiGranProcessor
from multigran.cli import main
from multigran.tiny import build_tiny

# Runs in a fresh interpreter: transformers only.
READER = textwrap.dedent("""
    import json, sys
    import numpy as np, torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor
    model = AutoModelForImageTextToText.from_pretrained(sys.argv[1]).eval()
    processor = AutoProcessor.from_pretrained(sys.argv[1])
    processor.tokenizer.padding_side = "left"
    images = [Image.open(path) for path in json.loads(sys.argv[2])]
    texts = json.loads(sys.argv[3])
    inputs = processor(images=images, text=texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**inputs).logits
        tokens = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert "multigran" not in " ".join(sys.modules), "the export must load without multigran"
    torch.save({"class": type(model).__name__, "processor": type(processor).__name__,
                "input_ids": inputs["input_ids"], "logits": logits, "tokens": tokens}, sys.argv[4])
""")


def prompt(processor, question):
    content = [{"type": "image"}, {"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


@pytest.mark.parametrize("tied", [False, True])
def test_export_loads_in_plain_transformers_with_the_same_logits(tmp_path, tied):
    src, dst = tmp_path / "anyres", tmp_path / "llava_next"
    model, processor = build_tiny(None, method="anyres", seed=3)
    model.config.text_config.tie_word_embeddings = tied  # tied: the LM's head is its input embedding
    torch.manual_seed(3)
    MultiGranForConditionalGeneration(model.config).save_pretrained(src)
    processor.save_pretrained(src)
    assert main(["export", "llava-next", str(src), str(dst)]) == 0
    config = json.loads((dst / "config.json").read_text())
    assert config["model_type"] == "llava_next" and config["architectures"] == ["LlavaNextForConditionalGeneration"]

    paths = []
    for index, size in enumerate([(64, 64), (97, 40)]):
        paths.append(str(tmp_path / f"{index}.png"))
        Image.fromarray(np.random.default_rng(index).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(
            paths[-1])
    ours = MultiGranForConditionalGeneration.from_pretrained(src).eval()
    assert ours.language_model.config.tie_word_embeddings == tied
    if tied:
        assert ours.language_model.lm_head.weight.data_ptr() == ours.get_input_embeddings().weight.data_ptr()
    processor = MultiGranProcessor.from_pretrained(src)
    processor.tokenizer.padding_side = "left"
    texts = [prompt(processor, "What is shown?"), prompt(processor, "Describe the picture in detail please.")]
    inputs = processor(images=paths, text=texts)
    with torch.no_grad():
        logits = ours(**inputs).logits
        tokens = ours.generate(**inputs, max_new_tokens=5, do_sample=False)

    out = tmp_path / "theirs.pt"
    result = subprocess.run([sys.executable, "-c", READER, str(dst), json.dumps(paths), json.dumps(texts), str(out)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    theirs = torch.load(out, weights_only=True)
    assert theirs["class"] == "LlavaNextForConditionalGeneration" and theirs["processor"] == "LlavaNextProcessor"
    assert torch.equal(theirs["input_ids"], inputs["input_ids"])  # same visual-token accounting
    torch.testing.assert_close(theirs["logits"], logits, atol=1e-5, rtol=0)
    assert torch.equal(theirs["tokens"], tokens)


def test_only_anyres_models_export(tmp_path, capsys):
    build_tiny(tmp_path / "avg", method="avg", seed=0)
    assert main(["export", "llava-next", str(tmp_path / "avg"), str(tmp_path / "out")]) == 2
    assert "is a 'avg' model: only 'anyres' models are LLaVA-NeXT models" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing left behind
    build_tiny(tmp_path / "truncate", method="anyres", seed=0, method_settings={"unpad_rounding": "truncate"})
    assert main(["export", "llava-next", str(tmp_path / "truncate"), str(tmp_path / "out")]) == 2
    assert "{'unpad_rounding': 'truncate'} differ from what transformers' LLaVA-NeXT computes" in capsys.readouterr().err
    assert main(["export", "llava-next", str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 2
    assert "nowhere does not exist" in capsys.readouterr().err
