"""device_map="auto" with offloading: the vision side and the LM spread over memory and disk give the same tokens as
the model in memory, for every method (accelerate's offload hooks load a module's weights only while it runs; the
pipelines also read weights of modules they do not call)."""

import numpy as np
import pytest
import torch
from PIL import Image

from multigran import MultiGranForConditionalGeneration
from multigran.tiny import build_tiny

OPTIONS = {"mg": {"boxes": [[[1, 1, 20, 20], [5, 8, 60, 30]]]}}


@pytest.mark.parametrize("method", ["anyres", "avg", "mg", "uhd"])
def test_offloaded_model_gives_the_same_tokens(tmp_path, method):
    model, processor = build_tiny(tmp_path / "model", method=method, seed=0)
    size = (32, 32) if method == "uhd" else (70, 40)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    inputs = processor(images=[image], text=["USER: <image>\nWhat is shown? ASSISTANT:"], **OPTIONS.get(method, {}))
    expected = model.generate(**inputs, max_new_tokens=4, do_sample=False)

    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    offloaded = MultiGranForConditionalGeneration.from_pretrained(
        tmp_path / "model", device_map="auto", max_memory={"cpu": int(weights * 0.3)},
        offload_folder=str(tmp_path / "offload"),
    ).eval()
    placement = offloaded.hf_device_map
    assert "disk" in placement.values() and "cpu" in placement.values(), placement
    assert any(name.startswith("visual") and where == "disk" for name, where in placement.items())
    assert any(name.startswith("language_model") and where == "disk" for name, where in placement.items())
    assert torch.equal(offloaded.generate(**inputs, max_new_tokens=4, do_sample=False), expected)
    # The weights the visual pipeline read went back to the meta device (offloaded again) after encoding.
    assert any(p.device.type == "meta" for p in offloaded.visual.parameters())
