"""AVG-LLaVA stages 3 and 4 against independent computations: fixed-granularity forwards built by the processor; for
method avg and for the composed models (mg and uhd with the adaptive-granularity layer)."""

import numpy as np
import pytest
import torch
from PIL import Image

from multigran.tiny import build_tiny
from multigran.train.avg import multi_granularity_loss, rglf_training_loss
from multigran.train.rglf import rglf_loss

QUESTIONS = ["USER: <image>\nWhat colour is the dot? ASSISTANT:", "USER: <image>\nHow many shapes? ASSISTANT:"]
ANSWERS = [" red</s>", " two</s>"]


def image(width, height, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


# Models with the adaptive-granularity layer: avg (AnyRes + the layer; a tiled and an untiled image), mg and uhd with
# method_settings.adaptive_granularity (uhd: a sliced and an unsliced image).
METHODS = {"avg": ({"image_size": 64, "patch_size": 8}, [(90, 60), (64, 64)]),
           "mg": ({"method_settings": {"adaptive_granularity": {}}}, [(90, 60), (40, 40)]),
           "uhd": ({"method_settings": {"adaptive_granularity": {}}}, [(70, 40), (32, 32)])}


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(method):
        if method not in cache:
            options, sizes = METHODS[method]
            model, processor = build_tiny(None, method=method, seed=5, **options)
            processor.tokenizer.padding_side = "right"
            cache[method] = model, processor, [image(w, h, i + 1) for i, (w, h) in enumerate(sizes)]
        return cache[method]

    return get


@pytest.fixture
def setup(models):
    return models("avg")


def batch_at(processor, images, granularity):
    """Question + answer, labels only on the answer tokens (built from the question's own length)."""
    inputs = processor(images=images, text=[q + a for q, a in zip(QUESTIONS, ANSWERS)], granularity=granularity)
    labels = inputs["input_ids"].clone()
    for row, (question, picture) in enumerate(zip(QUESTIONS, images)):
        prompt_length = processor(images=picture, text=question, granularity=granularity)["input_ids"].shape[1]
        labels[row, :prompt_length] = -100
    labels[inputs["attention_mask"] == 0] = -100
    inputs["labels"] = labels
    return inputs


@pytest.mark.parametrize("method", list(METHODS))
def test_stage3_loss_is_the_mean_of_fixed_granularity_losses(models, method):
    model, processor, images = models(method)
    model.eval()  # no dropout, so the two computations see the same network
    levels = model.visual.adaptive.level_tokens
    loss, metrics = multi_granularity_loss(model, dict(batch_at(processor, images, "auto")))
    with torch.no_grad():
        fixed = [batch_at(processor, images, g) for g in levels]
        reference = [model(**inputs).loss for inputs in fixed]
    torch.testing.assert_close(loss.detach(), torch.stack(reference).mean(), rtol=1e-5, atol=1e-6)
    assert set(metrics) == {"visual_tokens", "truncated_sequences", *(f"loss_g{g}" for g in levels)}
    assert metrics["truncated_sequences"] == 0
    # The throughput metric counts what the LM read at every level, not the one placeholder per image of "auto".
    assert metrics["visual_tokens"] == sum(int((f["input_ids"] == processor.image_token_id).sum()) for f in fixed)
    loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any("projector" in n for n in grads)  # stage 3 trains the projector ...
    assert not any(n.startswith("visual.router.") for n in grads)  # ... never the router
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("method", list(METHODS))
def test_rglf_step_encodes_once_and_trains_only_the_router(models, method, monkeypatch):
    model, processor, images = models(method)
    model.eval()
    levels = model.visual.adaptive.level_tokens
    batch = dict(batch_at(processor, images, "auto"))
    calls, encode = [], model.visual.encode_grids
    monkeypatch.setattr(model.visual, "encode_grids", lambda *a, **k: calls.append(1) or encode(*a, **k))
    loss, metrics = rglf_training_loss(model, batch)
    monkeypatch.undo()
    assert len(calls) == 1  # one vision pass for the router and every level's LMM forward
    loss.backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad and all(name.startswith("visual.router.") for name in with_grad)
    model.zero_grad(set_to_none=True)

    # Independent: NLL per sample from fixed-granularity inputs, router logits with the training mask.
    with torch.no_grad():
        nll = []
        for g in levels:
            fixed = batch_at(processor, images, g)
            logits = model(**{k: v for k, v in fixed.items() if k != "labels"}).logits[:, :-1]
            targets = fixed["labels"][:, 1:]
            token_nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none",
                                                          ignore_index=-100)
            nll.append(token_nll.sum(1) / (targets != -100).sum(1))
        nll = torch.stack(nll, dim=1)
        grids, _ = encode(model.vision_tower, batch["pixel_values"], batch["image_sizes"],
                          embed_tokens=model.get_input_embeddings(),
                          **{k: batch[k] for k in model.visual.input_names if k in batch})
        router_logits = []
        for row in range(2):
            ids, labels = batch["input_ids"][row], batch["labels"][row]
            keep = ids != processor.image_token_id
            valid = batch["attention_mask"][row].bool()[keep] & (labels[keep] == -100)
            router_logits.append(model.visual.router(grids[row], model.get_input_embeddings()(ids[keep]), valid))
        expected = rglf_loss(torch.stack(router_logits), nll)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)
    assert metrics["rglf_samples"] == 2
    assert metrics["visual_tokens"] == sum(int((batch_at(processor, images, g)["input_ids"] == processor.image_token_id)
                                               .sum()) for g in levels)


def test_token_cost_ranks_near_ties_by_visual_tokens(setup, monkeypatch):
    """With the LMM indifferent (equal NLL at every level), a token cost makes the cheapest level the CE target."""
    import multigran.train.avg as avg_training

    model, processor, images = setup
    model.eval()
    batch = dict(batch_at(processor, images, "auto"))
    levels = len(model.visual.level_tokens)

    def flat_nll(model, batch, grids, context, max_length=None):
        tokens = torch.tensor([[10.0 * (i + 1) for i in range(levels)]] * 2)
        return torch.ones(2, levels), tokens, 0

    monkeypatch.setattr(avg_training, "granularity_nll", flat_nll)
    captured = {}
    real_rglf_loss = avg_training.rglf_loss

    def spy(logits, target, *args, **kwargs):
        captured["target"] = target
        return real_rglf_loss(logits, target, *args, **kwargs)

    monkeypatch.setattr(avg_training, "rglf_loss", spy)
    avg_training.rglf_training_loss(model, batch, token_cost=2.0)
    # target = 1 + 2 * tokens / 1000: strictly increasing with the level, so level 0 ranks first.
    expected = 1 + 2.0 * torch.tensor([[10.0 * (i + 1) for i in range(levels)]] * 2) / 1000
    torch.testing.assert_close(captured["target"], expected)
