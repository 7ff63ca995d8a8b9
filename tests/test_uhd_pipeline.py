"""LLaVA-UHD v2 as a method of the model: settings, separator ids, processor step, pipeline (token organisation against
a per-view reference written here), token accounting on several aspect ratios, real-size parameters, bad input."""

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, normalizers
from transformers import AutoConfig, PreTrainedTokenizerFast

from multigran import MultiGranForConditionalGeneration, MultiGranProcessor
from multigran.configuration import CLIP_L_336, MultiGranConfig
from multigran.pipelines.uhd import (
    UhdPipeline,
    UhdSettings,
    preprocess_uhd_image,
    separator_token_ids,
    uhd_step,
)
from multigran.tiny import build_tiny, build_tiny_tokenizer
from multigran.vision.varres import encode_variable_resolution

PROMPT = "USER: <image>\nWhat is written here? ASSISTANT:"
UHD_INPUTS = ("pixel_values", "image_sizes", "view_sizes", "slice_grids")


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: extra threads only add synchronisation on a busy 2-core machine
    yield
    torch.set_num_threads(threads)


def picture(width, height, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def tiny():
    """Tiny tower: 32 px, patch 4 (S = 32, an 8x8 grid); LLM width 64; separators from the tiny tokenizer."""
    return build_tiny(method="uhd", seed=0)


def image_features(model, inputs):
    """The model's visual tokens (the model passes its embedding module to the pipeline itself)."""
    return model.get_image_features(
        inputs["pixel_values"], inputs["image_sizes"], view_sizes=inputs["view_sizes"],
        slice_grids=inputs["slice_grids"],
    )


def run_model(model, inputs, **kwargs):
    features = image_features(model, inputs)
    text = {k: v for k, v in inputs.items() if k not in UHD_INPUTS}
    return model(**text, image_features=features, **kwargs), features


# ------------------------------------------------------------------------------------------------------- settings


def test_settings_defaults_and_validation():
    settings = UhdSettings()
    assert (settings.max_slices, settings.feature_scale_mask, settings.compat) == (9, 7, True)
    assert settings.scale_resolution is None and settings.pre_resize_long_side is None
    assert settings.separator_ids is None and settings.num_heads is None
    for kwargs, message in [
        ({"max_slices": 0}, "max_slices must be >= 1"),
        ({"feature_scale_mask": 8}, "feature_scale_mask"),
        ({"feature_scale_mask": 0}, "feature_scale_mask"),
        ({"separator_ids": [5]}, "separator_ids"),
        ({"separator_ids": [5, -1]}, "separator_ids"),
        ({"pre_resize_long_side": 0}, "pre_resize_long_side"),
    ]:
        with pytest.raises(ValueError, match=message):
            UhdSettings(**kwargs)
    config = MultiGranConfig(method="uhd", method_settings={"max_slice": 7})
    with pytest.raises(ValueError, match=r"unknown method_settings.*max_slice"):
        UhdPipeline(config)


def llama_like_tokenizer():
    """SentencePiece-style (Llama) tokenizer: word starts carry '▁', bytes fall back to <0xNN>; '▁,' exists, so a bare
    encode(',') gives the word-start piece, while ',' inside text (Llama's 29892) is another token."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<0x0A>": 3, "▁": 4, "0": 5, ",": 6, "▁0": 7, "▁,": 8, "a": 9, "▁a": 10}
    merges = [("▁", "0"), ("▁", ","), ("▁", "a")]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def test_separator_ids_come_from_the_tokenizer():
    byte_level = build_tiny_tokenizer()
    assert separator_token_ids(byte_level) == [byte_level.convert_tokens_to_ids(","),
                                               byte_level.convert_tokens_to_ids("Ċ")]  # GPT-2 style "\n"
    llama = llama_like_tokenizer()
    assert llama.convert_ids_to_tokens(llama.encode(",", add_special_tokens=False)) == ["▁,"]
    assert llama.convert_ids_to_tokens(llama.encode("a,\n", add_special_tokens=False)) == ["▁a", ",", "<0x0A>"]
    assert separator_token_ids(llama) == [6, 3]  # the in-text "," and <0x0A>, as Llama's 29892 and 13


class SplittingTokenizer:
    """Encodes "\\n" as two tokens (e.g. a vocabulary without it): the separator cannot be one embedding."""

    def encode(self, text, add_special_tokens=False):
        return [{"0": 1, ",": 2, "\n": 3}[c] for c in text if c != "\n"] + ([3, 4] if "\n" in text else [])

    def decode(self, ids):
        return "".join({1: "0", 2: ",", 3: "\\", 4: "n"}[i] for i in ids)

    def convert_ids_to_tokens(self, ids):
        return [str(i) for i in ids]


def test_separator_split_into_several_tokens_is_an_error():
    with pytest.raises(ValueError, match=r"separator '\\n' as one token"):
        separator_token_ids(SplittingTokenizer())


def test_tiny_model_stores_the_separator_ids(tiny, tmp_path):
    model, processor = tiny
    ids = separator_token_ids(processor.tokenizer)
    assert model.config.method_settings["separator_ids"] == ids
    assert processor.image_processor.method_settings["separator_ids"] == ids
    build_tiny(tmp_path, method="uhd", seed=0)
    loaded = MultiGranForConditionalGeneration.from_pretrained(tmp_path)
    assert loaded.visual.settings.separator_ids == ids
    assert loaded.visual.separator_ids.tolist() == ids  # the non-saved buffer is refilled on loading
    assert MultiGranProcessor.from_pretrained(tmp_path).image_processor.method_settings["separator_ids"] == ids


# ------------------------------------------------------------------------------------------------- processor step


def test_step_packs_each_view_at_its_own_size(tiny):
    _, processor = tiny
    image_processor = processor.image_processor
    images = [picture(80, 48, 1), picture(20, 20, 2), picture(30, 200, 3)]
    out = uhd_step(image_processor, images)
    mean, std = image_processor.image_mean, image_processor.image_std
    expected = [preprocess_uhd_image(im, 9, mean, std, scale_resolution=32, patch_size=4) for im in images]
    # 80x48 at S = 32: r = 3.75 -> n0 = 4; candidates 3, 4, 5; |log(80/48) - log(2/2)| = 0.51 beats 3x1 (0.59) -> 2x2.
    # 20x20: r < 1, not sliced. 30x200: r = 5.9 -> n0 = 6; candidates 5, 6, 7; log(30/200) = -1.90: 1x7 (error 0.05)
    # beats 1x6 (0.11) -> 1x7.
    assert [e["grid"] for e in expected] == [(2, 2), None, (1, 7)]
    assert out["slice_grids"].tolist() == [[2, 2], [0, 0], [1, 7]]
    assert out["image_sizes"].tolist() == [[48, 80], [20, 20], [200, 30]]
    assert out["image_token_counts"] == [145 * 4 + 144, 144, 145 * 7 + 144]
    views_per_image = [5, 1, 8]
    assert out["pixel_values"].shape[:3] == (3, 8, 3)
    for i, e in enumerate(expected):
        views = [*e["slices"], e["overview"]]
        assert len(views) == views_per_image[i]
        for v in range(out["pixel_values"].shape[1]):
            slot = out["pixel_values"][i, v]
            if v >= len(views):
                assert out["view_sizes"][i, v].tolist() == [0, 0] and not slot.any()
                continue
            h, w = views[v].shape[1:]
            assert out["view_sizes"][i, v].tolist() == [h, w]
            assert torch.equal(slot[:, :h, :w], views[v])
            assert not slot[:, h:].any() and not slot[:, :, w:].any()  # zero padding


def test_step_options_max_slices_and_pre_resize(tiny):
    _, processor = tiny
    image = picture(80, 48, 1)
    assert processor.count_image_tokens(image, max_slices=1) == [144]  # 1 slot: the overview only
    # max 3: n0 = 3, candidates 2, 3 (4 > max); |log(80/48) - log(2)| = 0.18 -> 2x1, the best of 2x1, 1x2, 3x1, 1x3.
    assert processor.count_image_tokens(image, max_slices=3) == [145 * 2 + 144]
    # Pre-resize long side 16: 80x48 -> 16x9, below S^2 -> not sliced.
    out = uhd_step(processor.image_processor, [image], pre_resize_long_side=16)
    assert out["image_token_counts"] == [144] and out["image_sizes"].tolist() == [[48, 80]]
    with pytest.raises(ValueError, match="granularity applies to models with the adaptive-granularity layer; this uhd"):
        processor(images=image, text=PROMPT, granularity=36)  # a uhd model without the layer


# ----------------------------------------------------------------------------------------------------- pipeline


def reference_tokens(model, inputs, image_index):
    """One image's visual tokens, view by view (no batching, no padding), organised by hand."""
    visual = model.visual
    grid = inputs["slice_grids"][image_index].tolist()
    n_views = 1 if grid == [0, 0] else grid[0] * grid[1] + 1
    per_view = []
    for v in range(n_views):
        h, w = inputs["view_sizes"][image_index, v].tolist()
        view = inputs["pixel_values"][image_index, v, :, :h, :w]
        (features,) = encode_variable_resolution(model.vision_tower, [view], -2, "default")  # (h/4, w/4, C)
        source = features.permute(2, 0, 1)[None]
        one_x, two_x, four_x = visual.upsampler(source, view[None])
        per_view.append(visual.mm_projector([[one_x, two_x, four_x]])[0])  # mask 7: all three levels
    table = model.get_input_embeddings().weight
    comma, newline = (table[i] for i in model.config.method_settings["separator_ids"])
    rows = []
    if n_views > 1:
        cols, n_rows = grid
        for r in range(n_rows):
            for c in range(cols):
                rows += [per_view[r * cols + c], (newline if c == cols - 1 else comma)[None]]
    rows.append(per_view[-1])  # the overview closes the sequence
    return torch.cat(rows)


def test_batched_pipeline_matches_per_view_reference(tiny):
    model, processor = tiny
    images = [picture(80, 48, 4), picture(20, 20, 5), picture(90, 40, 6)]
    inputs = processor(images=images, text=[PROMPT] * 3)
    assert inputs["slice_grids"].tolist() == [[2, 2], [0, 0], [3, 1]]  # views of 3 sizes + padding in one ViT pass
    with torch.no_grad():
        features = image_features(model, inputs)
        for i in range(3):
            torch.testing.assert_close(features[i], reference_tokens(model, inputs, i), rtol=1e-4, atol=1e-5)
    # The separators are exactly the LLM's embeddings of "," and "\n": after slices 1 and 3 "," , after 2 and 4 "\n".
    comma, newline = model.config.method_settings["separator_ids"]
    table = model.get_input_embeddings().weight
    for slot, token in ((144, comma), (289, newline), (434, comma), (579, newline)):
        assert torch.equal(features[0][slot], table[token])
    assert model.visual.last_report[0] == {"slice_grid": [2, 2], "views": 5, "visual_tokens": 724}


@pytest.mark.parametrize("size", [(20, 20), (80, 48), (48, 80), (200, 30), (30, 200), (100, 100), (64, 33), (33, 64)])
def test_processor_count_equals_model_count(tiny, size):
    model, processor = tiny
    inputs = processor(images=picture(*size), text=PROMPT)
    placeholders = int((inputs["input_ids"] == processor.image_token_id).sum())
    with torch.no_grad():
        out, features = run_model(model, inputs)
    assert out.image_token_counts == [placeholders] == [features[0].shape[0]]
    assert model.visual.placeholder_counts(inputs["image_sizes"], slice_grids=inputs["slice_grids"]) == [placeholders]
    cols, rows = inputs["slice_grids"][0].tolist()
    assert placeholders == 145 * cols * rows + 144


@pytest.fixture(scope="module")
def tiny_grid4():
    """The tiny model with a 4x4 query grid: 16 tokens per view instead of the release's 144."""
    return build_tiny(method="uhd", seed=0, method_settings={"query_grid": 4})


@pytest.mark.parametrize("size", [(20, 20), (80, 48), (30, 200), (90, 40)])
def test_query_grid_sets_the_tokens_per_view_and_the_accounting_stays_exact(tiny_grid4, size):
    model, processor = tiny_grid4
    assert model.visual.mm_projector.query_1.shape == (16, 64) and model.visual.mm_projector.pos_embed.shape == (16, 64)
    inputs = processor(images=picture(*size, seed=9), text=PROMPT)
    placeholders = int((inputs["input_ids"] == processor.image_token_id).sum())
    with torch.no_grad():
        out, features = run_model(model, inputs)
        reference = reference_tokens(model, inputs, 0)
    cols, rows = inputs["slice_grids"][0].tolist()
    slices = cols * rows
    assert placeholders == 17 * slices + 16 == processor.count_image_tokens(picture(*size, seed=9))[0]
    assert out.image_token_counts == [placeholders] == [features[0].shape[0]]
    assert model.visual.placeholder_counts(inputs["image_sizes"], slice_grids=inputs["slice_grids"]) == [placeholders]
    assert model.visual.last_report[0]["visual_tokens"] == placeholders
    # the separators sit after every 16 tokens of a slice, the overview's 16 close the sequence
    torch.testing.assert_close(features[0], reference, rtol=1e-4, atol=1e-5)
    comma, newline = model.config.method_settings["separator_ids"]
    table = model.get_input_embeddings().weight
    for index in range(slices):
        expected = newline if index % cols == cols - 1 else comma
        assert torch.equal(features[0][17 * index + 16], table[expected])


def test_query_grid_is_saved_and_validated(tmp_path):
    build_tiny(tmp_path, method="uhd", seed=0, method_settings={"query_grid": 3})
    loaded = MultiGranForConditionalGeneration.from_pretrained(tmp_path)
    assert loaded.visual.settings.query_grid == 3 and loaded.visual.mm_projector.num_queries == 9
    assert MultiGranProcessor.from_pretrained(tmp_path).count_image_tokens(picture(80, 48)) == [10 * 4 + 9]
    assert UhdSettings().query_grid == 12  # the release's 12x12
    for value in (0, 2.5, True):
        with pytest.raises((TypeError, ValueError), match="query_grid"):
            UhdSettings(query_grid=value)


def test_training_forward_reaches_every_trainable_part(tiny):
    model, processor = tiny
    inputs = processor(images=picture(80, 48, 7), text=PROMPT + " It says hello")
    labels = inputs["input_ids"].clone()
    model.zero_grad()
    out, _ = run_model(model, inputs, labels=labels)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for name in ("visual.mm_projector.query_1", "visual.mm_projector.proj", "visual.upsampler.fixup_proj.1.weight",
                 "visual.upsampler.up1.range_temp", "vision_tower.encoder.layers.0.self_attn.q_proj.weight"):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    # The separator rows of the LLM embedding receive gradient through the visual tokens.
    embedding_grad = model.get_input_embeddings().weight.grad
    assert all(embedding_grad[i].abs().sum() > 0 for i in model.config.method_settings["separator_ids"])
    model.zero_grad()


def test_bfloat16_follows_the_model_dtype(tiny):
    model, processor = tiny
    inputs = processor(images=picture(80, 48, 8), text=PROMPT)
    with torch.no_grad():
        reference = image_features(model, inputs)[0]
        model.to(torch.bfloat16)
        try:
            low = image_features(model, inputs)[0]
        finally:
            model.to(torch.float32)
    assert low.dtype == torch.bfloat16 and low.shape == reference.shape
    assert (low.float() - reference).abs().mean() < 0.05 * reference.abs().mean()


def test_fresh_jbu_has_the_release_initialisation():
    model, _ = build_tiny(method="uhd", seed=3)
    upsampler = model.visual.upsampler
    for step in (upsampler.up1, upsampler.up2):
        assert step.range_temp.item() == 0.0 and step.sigma_spatial.item() == 1.0
        conv = step.range_proj[0]  # PyTorch's default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = 3
        bound = 1 / np.sqrt(3)
        assert conv.weight.abs().max() <= bound and conv.weight.abs().max() > 0.5 * bound
    fixup = upsampler.fixup_proj[1]  # 32 -> 32 channels: bound 1/sqrt(32), far above the generic std 0.02
    assert fixup.weight.abs().max() <= 1 / np.sqrt(32) and fixup.weight.std() > 0.1


def test_real_size_parameter_count_on_meta():
    config = MultiGranConfig(
        vision_config=AutoConfig.for_model("clip_vision_model", **CLIP_L_336).to_dict(),
        text_config={"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                     "num_attention_heads": 32, "vocab_size": 32000},
        method="uhd",
    )
    with torch.device("meta"):
        pipeline = UhdPipeline(config)
    c, d, key, window = 1024, 4096, 32, 49
    jbu_step = (3 * key + key) + (key * key + key) + ((3 + window) * window + window) + (window * window + window) + 2
    jbu = 2 * jbu_step + c * c + c
    hiwin = (4 * 144 * d  # query_1..4
             + 3 * d + 3 * (c * d + d)  # per-level embeddings and projectors
             + (3 * d * d + 3 * d) + (d * d + d)  # attention in/out projections
             + 4 * 2 * d  # ln_q, ln_kv, ln_proj, ln_post
             + (4 * d * d + d) + d * d)  # cat_proj, proj
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    assert count(pipeline.upsampler) == jbu
    assert count(pipeline.mm_projector) == hiwin
    # Spec: ~175M for the window attention with D = 4096; the release's extra unused tensors (8x level, the base
    # resampler's query and kv_proj: 9.0M) make up the difference.
    assert 160e6 < hiwin < 175e6 and abs(hiwin + 2 * c * d + d + d + 144 * d - 175e6) < 1e6
    assert pipeline.mm_projector.attn.num_heads == 32  # D / 128


# -------------------------------------------------------------------------------------------------------- bad input


def test_tiny_and_huge_images(tiny):
    model, processor = tiny
    # 1x1: documented behaviour: not sliced, upscaled to an S x S overview -> 144 tokens; the model runs.
    inputs = processor(images=picture(1, 1), text=PROMPT)
    assert inputs["view_sizes"][0, 0].tolist() == [32, 32] and inputs["slice_grids"].tolist() == [[0, 0]]
    with torch.no_grad():
        out, _ = run_model(model, inputs)
    assert out.image_token_counts == [144] and torch.isfinite(out.logits).all()
    # 20000x10: the slices would be one patch high; the JBU's 7x7 reflect window needs two: a clear error.
    for size in ((20000, 10), (10, 20000)):
        with pytest.raises(ValueError, match=r"image 0 \(%dx%d\) is too elongated.*at least 2 patches" % size):
            processor(images=picture(*size), text=PROMPT)


def test_elongated_image_without_the_jbu_is_accepted():
    model, processor = build_tiny(method="uhd", method_settings={"feature_scale_mask": 1})
    assert model.visual.upsampler is None
    inputs = processor(images=picture(2000, 10), text=PROMPT)
    with torch.no_grad():
        out, _ = run_model(model, inputs)
    assert out.image_token_counts == [int((inputs["input_ids"] == processor.image_token_id).sum())]


def test_max_slices_must_be_a_positive_int(tiny):
    _, processor = tiny
    with pytest.raises(ValueError, match="max_slices must be >= 1, got 0"):
        processor(images=picture(80, 48), text=PROMPT, max_slices=0)
    with pytest.raises(TypeError, match="max_slices must be an int"):
        processor(images=picture(80, 48), text=PROMPT, max_slices=2.5)


def test_slices_beyond_the_context_are_refused(tiny):
    model, processor = tiny
    limited = MultiGranProcessor(image_processor=processor.image_processor, tokenizer=build_tiny_tokenizer())
    limited.tokenizer.model_max_length = 300
    image = picture(80, 48)  # 2x2 slices: 724 visual tokens
    with pytest.raises(ValueError, match=r"prompt 0 is \d+ tokens long \(724 visual .* context is 300 tokens"):
        limited(images=image, text=PROMPT)
    assert (limited(images=image, text=PROMPT, max_slices=1)["input_ids"] == processor.image_token_id).sum() == 144


def test_pipeline_input_errors(tiny):
    model, processor = tiny
    inputs = processor(images=picture(80, 48), text=PROMPT)
    with pytest.raises(ValueError, match="needs view_sizes and slice_grids"):
        model.get_image_features(inputs["pixel_values"], inputs["image_sizes"])
    with pytest.raises(ValueError, match=r"slice grid \(3, 2\) needs 7 views"):
        model.get_image_features(inputs["pixel_values"], inputs["image_sizes"], view_sizes=inputs["view_sizes"],
                                 slice_grids=torch.tensor([[3, 2]]))
    with pytest.raises(ValueError, match=r"embed_tokens=model.get_input_embeddings\(\)"):  # the pipeline alone
        model.visual(model.vision_tower, inputs["pixel_values"], inputs["image_sizes"], view_sizes=inputs["view_sizes"],
                     slice_grids=inputs["slice_grids"])
    unsliced = processor(images=picture(20, 20), text=PROMPT)  # no separator needed: no embeddings needed
    assert model.get_image_features(unsliced["pixel_values"], unsliced["image_sizes"],
                                    view_sizes=unsliced["view_sizes"], slice_grids=unsliced["slice_grids"])[0].shape \
        == (144, 64)


def test_missing_separator_ids_are_reported_when_needed():
    from multigran.tiny import tiny_config

    _, processor = build_tiny(method="uhd")
    model = MultiGranForConditionalGeneration(tiny_config(method="uhd", method_settings={"separator_ids": None}))
    inputs = processor(images=picture(80, 48), text=PROMPT)
    with pytest.raises(ValueError, match=r"needs method_settings\['separator_ids'\].*separator_token_ids"):
        image_features(model, inputs)


# -------------------------------------------------------------------------------------------- stage 0 (JBU alone)


def test_stage0_recipe_trains_only_the_jbu_and_the_loss_decreases(tmp_path):
    import json

    from multigran.cli import main
    from multigran.convert.uhd_v2 import load_jbu_checkpoint
    from multigran.data.synthetic import generate_dataset
    from multigran.train.uhd_stage0 import is_jbu_recipe, load_jbu_weights

    build_tiny(tmp_path / "model", method="uhd", seed=0)
    generate_dataset(tmp_path / "data", num_train=8, num_val=0, num_test=0, num_pretrain=0)  # 96 px PNGs + JSON
    recipe = "recipes/uhd/stage0_jbu.yaml"
    assert is_jbu_recipe(recipe)
    steps = 30
    assert main(["train", "--recipe", recipe, f"model={tmp_path / 'model'}", f"output_dir={tmp_path / 'out'}",
                 f"data.path={tmp_path / 'data'}", f"training.max_steps={steps}",
                 "training.gradient_accumulation_steps=1", "training.learning_rate=1.0e-2", "training.device=cpu",
                 "training.logging_steps=100"]) == 0
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    losses = [r["loss"] for r in records]
    assert np.mean(losses[-8:]) < np.mean(losses[:8]) - 0.2, losses  # seeded: jitters, projections, dropout, order
    assert all(abs(r["loss"] - r["rec_2x"] - r["rec_4x"]) < 1e-4 for r in records)  # crf_weight 0: term omitted

    before = MultiGranForConditionalGeneration.from_pretrained(tmp_path / "model").state_dict()
    after = MultiGranForConditionalGeneration.from_pretrained(tmp_path / "out" / "model").state_dict()
    assert before.keys() == after.keys()
    for key in before:
        changed = not torch.equal(before[key], after[key])
        assert changed == key.startswith("visual.upsampler."), key  # only the JBU learns (every JBU tensor does)
    # The standalone file holds the same JBU, loadable into a model and by the release converter.
    model, _ = build_tiny(method="uhd", seed=1)
    load_jbu_weights(model, tmp_path / "out" / "jbu.safetensors")
    for key, value in model.visual.upsampler.state_dict().items():
        assert torch.equal(value, after["visual.upsampler." + key])
    assert load_jbu_checkpoint(tmp_path / "out" / "jbu.safetensors").keys() == \
        {k for k in after if k.startswith("visual.upsampler.")}


def test_stage0_recipe_errors(tmp_path):
    from multigran.train.uhd_stage0 import load_jbu_recipe, run_jbu_recipe

    recipe = "recipes/uhd/stage0_jbu.yaml"
    with pytest.raises(ValueError, match=r"\(loss\): unknown key\(s\) \['jitters'\]"):
        load_jbu_recipe(recipe, ["loss.jitters=3"])
    with pytest.raises(ValueError, match="needs `stage: jbu`"):
        load_jbu_recipe("recipes/uhd/stage1_pretrain.yaml")
    with pytest.raises(ValueError, match="per_device_train_batch_size must be an int >= 1"):
        load_jbu_recipe(recipe, ["training.per_device_train_batch_size=0"])
    assert load_jbu_recipe(recipe, ["training.learning_rate=1e-4"]).training.learning_rate == 1e-4  # YAML 1.1 string
    build_tiny(tmp_path / "anyres", method="anyres")
    (tmp_path / "images").mkdir()
    picture(40, 40).save(tmp_path / "images" / "a.png")
    with pytest.raises(ValueError, match="not a LLaVA-UHD v2 model with a JBU upsampler"):
        run_jbu_recipe(recipe, [f"model={tmp_path / 'anyres'}", f"output_dir={tmp_path / 'out'}",
                                f"data.path={tmp_path / 'images'}"])
    build_tiny(tmp_path / "uhd", method="uhd")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no image here")
    with pytest.raises(ValueError, match="holds no image"):
        run_jbu_recipe(recipe, [f"model={tmp_path / 'uhd'}", f"output_dir={tmp_path / 'out'}",
                                f"data.path={tmp_path / 'empty'}", "training.device=cpu"])

