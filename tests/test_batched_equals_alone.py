"""Batched = alone: every row of a batch gets the tokens it gets when run by itself, greedy and beam search, for
every method, with images of different sizes, prompts of equal and unequal lengths, the router (AVG-LLaVA's, and the
adaptive-granularity layer over MG-LLaVA and LLaVA-UHD v2) sending the rows of one batch to different levels (with
and without a granularity bias), and either tokenizer padding side."""

import numpy as np
import pytest
import torch
from PIL import Image

from multigran.tiny import build_tiny

NEW = 5
SHORT, LONG = "What is shown?", "Describe the picture in detail. How many objects are there?"


def picture(size, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def chat(processor, question):
    content = [{"type": "image"}, {"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def generate(model, processor, rows, padding_side="left", beams=1, **method_options):
    """New tokens of each row (rows: (image, question, boxes or None)) from one batched generate."""
    processor.tokenizer.padding_side = padding_side
    options = {"boxes": [boxes for _, _, boxes in rows]} if model.config.method == "mg" else {}
    inputs = processor(images=[image for image, _, _ in rows], text=[chat(processor, q) for _, q, _ in rows],
                       **options)
    output = model.generate(**inputs, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, num_beams=beams,
                            return_dict_in_generate=True, **method_options)
    processor.tokenizer.padding_side = "left"
    return output.sequences[:, inputs["input_ids"].shape[1]:], output.visual_report, inputs


def same_report(batched: dict, alone: dict) -> bool:
    """Equal reports; the router's probabilities up to float rounding (a batch encodes views of equal size together,
    which changes the order of float sums, never a choice)."""
    batched, alone = dict(batched), dict(alone)
    probabilities = batched.pop("router_probabilities", None), alone.pop("router_probabilities", None)
    if (probabilities[0] is None) != (probabilities[1] is None):
        return False
    if probabilities[0] is not None and not np.allclose(*probabilities, rtol=1e-5, atol=1e-6):
        return False
    return batched == alone


def check(model, processor, rows, sides=("left", "right"), **method_options):
    alone = {beams: [generate(model, processor, [row], beams=beams, **method_options) for row in rows]
             for beams in (1, 2)}
    for side in sides:
        tokens, report, inputs = generate(model, processor, rows, padding_side=side, **method_options)
        for index in range(len(rows)):
            assert torch.equal(tokens[index], alone[1][index][0][0]), (side, index)
            assert same_report(report[index], alone[1][index][1][0]), (side, index)
    tokens, _, _ = generate(model, processor, rows, beams=2, **method_options)
    for index in range(len(rows)):
        assert torch.equal(tokens[index], alone[2][index][0][0]), ("beam", index)
    return [report[0] for _, report, _ in alone[1]]


@pytest.fixture(scope="module")
def tiny():
    cache = {}

    def get(method):
        if method not in cache:  # "mg+layer" / "uhd+layer": with the adaptive-granularity layer
            name, _, layer = method.partition("+")
            settings = {"adaptive_granularity": {}} if layer else None
            cache[method] = build_tiny(None, method=name, seed=2, method_settings=settings)
        return cache[method]

    return get


@pytest.mark.parametrize("method", ["anyres", "mg", "uhd"])
def test_rows_of_mixed_sizes_and_lengths(tiny, method):
    model, processor = tiny(method)
    sizes = [(32, 32), (70, 40)] if method == "uhd" else [(64, 64), (96, 30), (40, 100)]
    boxes = [[[2, 2, 20, 20]], [[1, 1, 30, 20], [5, 5, 25, 25]], [[3, 4, 30, 60], [0, 0, 8, 8], [10, 10, 30, 30]]]
    rows = [(picture(size, i), [LONG, SHORT, SHORT][i], boxes[i]) for i, size in enumerate(sizes)]
    check(model, processor, rows)


def test_equal_length_prompts(tiny):
    """The same question about two images of the same size: no row is padded by the processor."""
    model, processor = tiny("anyres")
    rows = [(picture((64, 48), 7), SHORT, None), (picture((64, 48), 8), SHORT, None)]
    processor.tokenizer.padding_side = "right"
    inputs = processor(images=[r[0] for r in rows], text=[chat(processor, SHORT)] * 2)
    assert bool(inputs["attention_mask"].all())
    check(model, processor, rows, sides=("left",))


def routed_levels(model, processor, rows, **options):
    return [report["granularity"] for report in generate(model, processor, rows, **options)[1]]


def test_avg_auto_rows_routed_to_different_levels(tiny):
    model, processor = tiny("avg")
    assert processor.image_processor.method_settings.get("granularity", "auto") == "auto"
    candidates = [(picture(size, seed), SHORT, None) for seed, size in
                  enumerate([(64, 64), (96, 30), (30, 90), (50, 50), (64, 32), (80, 80)])]
    levels = [routed_levels(model, processor, [row])[0] for row in candidates]
    first = candidates[0]
    other = next((c for c, level in zip(candidates, levels) if level != levels[0]), None)
    assert other is not None, f"the router sends every candidate to the same level {levels}"
    # Same question, one placeholder each: equal-length prompts that the router turns into unequal ones.
    rows = [first, other, (candidates[1][0], LONG, None)]
    reports = check(model, processor, rows)
    assert len({report["granularity"] for report in reports[:2]}) == 2


def test_avg_auto_with_granularity_bias(tiny):
    model, processor = tiny("avg")
    rows = [(picture((64, 64), 0), SHORT, None), (picture((96, 30), 1), LONG, None), (picture((30, 90), 2), SHORT, None)]
    plain = routed_levels(model, processor, rows)
    biased = routed_levels(model, processor, rows, granularity_bias=40.0)
    assert biased != plain and all(b <= p for b, p in zip(biased, plain))  # the bias really moved a row coarser
    check(model, processor, rows, sides=("right",), granularity_bias=40.0)


@pytest.mark.parametrize("method", ["mg+layer", "uhd+layer"])
def test_composed_auto_rows_routed_to_different_levels(tiny, method):
    model, processor = tiny(method)
    sizes = [(32, 32), (70, 40), (40, 70), (48, 48), (64, 32)] if method.startswith("uhd") else \
        [(64, 64), (96, 30), (30, 90), (50, 50), (64, 32), (80, 80)]
    candidates = [(picture(size, seed), SHORT, [[2, 2, 20, 20]]) for seed, size in enumerate(sizes)]
    levels = [routed_levels(model, processor, [row])[0] for row in candidates]
    other = next((c for c, level in zip(candidates, levels) if level != levels[0]), None)
    assert other is not None, f"the router sends every candidate to the same level {levels}"
    rows = [candidates[0], other, (candidates[1][0], LONG, [[1, 1, 30, 20], [5, 5, 25, 25]])]
    reports = check(model, processor, rows)
    assert len({report["granularity"] for report in reports[:2]}) == 2
    biased = routed_levels(model, processor, rows, granularity_bias=40.0)
    assert all(b <= r["granularity"] for b, r in zip(biased, reports))
    check(model, processor, rows, sides=("right",), granularity_bias=40.0)


def test_padding_never_reaches_the_router(tiny):
    """A trained pad embedding is not zero: in a batch, short prompts (padded) must still route as alone. The
    released (compat) text filter fills a short instruction's free slots with its masked tokens, so the batch's
    padding has to be left out of the router's text at inference."""
    model, processor = build_tiny(None, method="avg", seed=2)
    pad = model.config.text_config.pad_token_id or 0
    with torch.no_grad():
        model.get_input_embeddings().weight[pad].normal_(0, 1.0)
    rows = [(picture((64, 64), 0), SHORT, None), (picture((96, 30), 1), LONG, None), (picture((30, 90), 2), SHORT, None)]
    reports = check(model, processor, rows)
    assert all(report["mode"] == "auto" for report in reports)
