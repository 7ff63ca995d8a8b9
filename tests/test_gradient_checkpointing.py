"""gradient_checkpointing_enable() reaches the visual pipelines' heavy modules (MG-LLaVA's Conv-Gate fusion, LLaVA-UHD
v2's JBU steps and window attention) besides the towers and LM layers: each then runs again in the backward pass
(its activations were not kept), and every gradient equals the one computed without checkpointing."""

import numpy as np
import pytest
import torch
from PIL import Image

from multigran.pipelines.mg import ConvGateFusion
from multigran.pipelines.uhd_hiwin import HiwinProjector
from multigran.pipelines.uhd_jbu import JBULearnedRange
from multigran.tiny import build_tiny

HEAVY = {"mg": (ConvGateFusion,), "uhd": (JBULearnedRange, HiwinProjector), "anyres": (), "avg": ()}
OPTIONS = {"mg": {"boxes": [[[1, 1, 20, 20], [5, 8, 60, 30]]]}}


def gradients(model, inputs, checkpointing):
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.activation_checkpointing_disable()
    model.zero_grad()
    torch.manual_seed(0)  # dropout (JBU fix-up, attention downsampler) draws the same masks in both runs
    model(**inputs).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method", ["mg", "uhd", "anyres"])
def test_checkpointing_recomputes_the_heavy_modules_with_equal_gradients(method):
    model, processor = build_tiny(None, method=method, seed=0)
    model.train()
    size = (70, 40) if method == "uhd" else (64, 48)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    inputs = processor(images=[image], text=["USER: <image>\nWhat is shown? ASSISTANT: a red square"],
                       **OPTIONS.get(method, {}))
    inputs["labels"] = inputs["input_ids"].clone()
    calls = []  # the heavy modules' submodule calls, named by the heavy module's class (recomputation calls those)
    for module in model.modules():
        if isinstance(module, HEAVY[method]):
            for child in module.modules():
                if child is not module:
                    child.register_forward_hook(lambda m, args, out, owner=type(module).__name__: calls.append(owner))
    plain = gradients(model, inputs, checkpointing=False)
    runs_plain = list(calls)
    calls.clear()
    checkpointed = gradients(model, inputs, checkpointing=True)
    assert all(m.gradient_checkpointing for m in model.modules() if isinstance(m, HEAVY[method]))
    assert sorted(calls) == sorted(runs_plain * 2)  # every heavy module ran again in the backward pass
    assert set(runs_plain) == {c.__name__ for c in HEAVY[method]}
    assert plain.keys() == checkpointed.keys()
    assert any(name.startswith("visual.") for name in plain)  # the pipeline's own weights got gradients
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)
    layers = [m for m in model.language_model.modules() if hasattr(m, "gradient_checkpointing")]
    assert layers and all(m.gradient_checkpointing for m in layers)
