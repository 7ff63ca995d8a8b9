"""An anyres checkpoint becomes an avg one: shared weights move unchanged, the router is new, the result runs."""

import numpy as np
import torch
from PIL import Image

from multigran import MultiGranForConditionalGeneration, MultiGranProcessor
from multigran.convert.method import switch_method
from multigran.tiny import build_tiny


def test_anyres_to_avg_keeps_shared_weights_and_adds_the_router(tmp_path):
    source, _ = build_tiny(tmp_path / "anyres", method="anyres", image_size=64, patch_size=8, seed=4)
    report = switch_method(tmp_path / "anyres", tmp_path / "avg", "avg", {"compat": False})
    assert report["dropped"] == [] and report["new"] and all(k.startswith("visual.router.") for k in report["new"])
    target = MultiGranForConditionalGeneration.from_pretrained(tmp_path / "avg").eval()
    # AnyRes's merge settings move with the model (its token layout stays what it was trained with).
    assert target.config.method == "avg" and target.config.method_settings == {
        "compat": False, "unpad_rounding": "hf", "patch_merge": "spatial_unpad"}
    target_state = target.state_dict()
    for key, value in source.state_dict().items():
        assert torch.equal(target_state[key], value), key
    processor = MultiGranProcessor.from_pretrained(tmp_path / "avg")
    assert processor.image_processor.method == "avg"
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    prompt = "USER: <image>\nWhat? ASSISTANT:"
    # At the finest level the avg model computes exactly what the anyres model does.
    with torch.no_grad():
        finest = target(**processor(images=picture, text=prompt, granularity=64)).logits
        anyres_processor = MultiGranProcessor.from_pretrained(tmp_path / "anyres")
        reference = source.eval()(**anyres_processor(images=picture, text=prompt)).logits
    torch.testing.assert_close(finest, reference)
