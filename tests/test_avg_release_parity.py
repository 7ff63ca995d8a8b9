"""AVG-LLaVA against independent transcriptions of the release (DeepLearnXMU/AVG-LLaVA @ 3685bc8): unpad rounding,
over-long training samples, merge types and granularity lists, the router's text filter.

Every `release_*` function below transcribes the cited release lines; none calls multigran."""

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from multigran import MultiGranForConditionalGeneration
from multigran.configuration import MultiGranConfig
from multigran.pipelines.anyres import AnyResSettings, count_anyres_tokens
from multigran.pipelines.avg import AvgSettings, count_tokens_at_granularity, merge_at_granularity
from multigran.pipelines.granularity import (
    AvgRouter,
    filter_instruction_tokens,
    granularity_levels,
    pool_level,
    select_instruction_tokens,
)
from multigran.processing import MultiGranImageProcessor, MultiGranProcessor
from multigran.tiny import build_tiny_tokenizer, tiny_config, tiny_text_config, tiny_vision_config
from multigran.train.avg import multi_granularity_loss, rglf_training_loss, truncate_sequences
from multigran.train.rglf import rglf_loss

# The release's geometry: CLIP-L/336 (24x24 patches per tile) and its pinpoints in (width, height) order.
GRID, TILE = 24, 336
RELEASE_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # (width, height)
PINPOINTS = [[h, w] for w, h in RELEASE_PINPOINTS]  # multigran: (height, width)
LEVELS = [36, 72, 144, 288, 576]
PROMPT = "USER: <image>\nWhat is in the picture? ASSISTANT:"


def picture(width, height, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


# ---------------------------------------------------------------------------------------------------------------------
# transcriptions of the release


def release_select_best_resolution(original_size, possible_resolutions):
    """llava/mm_utils.py:12-39; sizes are (width, height)."""
    original_width, original_height = original_size
    best_fit, max_effective, min_wasted = None, 0, float("inf")
    for width, height in possible_resolutions:
        scale = min(width / original_width, height / original_height)
        downscaled_width, downscaled_height = int(original_width * scale), int(original_height * scale)
        effective = min(downscaled_width * downscaled_height, original_width * original_height)
        wasted = width * height - effective
        if effective > max_effective or (effective == max_effective and wasted < min_wasted):
            max_effective, min_wasted, best_fit = effective, wasted, (width, height)
    return best_fit


def release_grid_shape(image_size, grid_pinpoints, patch_size):
    """llava/mm_utils.py:99-116: (num_patch_width, num_patch_height) for an image (width, height)."""
    width, height = release_select_best_resolution(image_size, grid_pinpoints)
    return width // patch_size, height // patch_size


def release_unpad_slices(current_height, current_width, original_size):
    """llava/model/llava_arch.py:124-139 (`unpad_image`) on shapes: the (rows, cols) slices it keeps."""
    original_width, original_height = original_size
    if original_width / original_height > current_width / current_height:
        scale_factor = current_width / original_width
        new_height = int(original_height * scale_factor)
        padding = (current_height - new_height) // 2
        return slice(padding, current_height - padding), slice(0, current_width)
    scale_factor = current_height / original_height
    new_width = int(original_width * scale_factor)
    padding = (current_width - new_width) // 2
    return slice(0, current_height), slice(padding, current_width - padding)


def release_unpad_image(tensor, original_size):
    """llava/model/llava_arch.py:113-141 on a (C, H, W) tensor; original_size is (width, height)."""
    rows, cols = release_unpad_slices(tensor.shape[1], tensor.shape[2], original_size)
    return tensor[:, rows, cols]


def release_pool(image_features, granularity):
    """llava/model/llava_arch.py:216-234 (`matryoshka_vis_token_process`): (N, H*W, C) -> (N, tokens, C)."""
    n, hw, c = image_features.shape
    h = w = int(hw ** 0.5)
    grid = image_features.view(n, h, w, c).permute(0, 3, 1, 2)
    if granularity == hw / 2:
        kernel = (1, 2)
    elif granularity == hw / 8:
        kernel = (2, 4)
    else:
        kernel = int(np.sqrt(hw / granularity))
    pooled = F.avg_pool2d(grid, kernel_size=kernel, stride=kernel)
    return pooled.permute(0, 2, 3, 1).reshape(n, -1, c)


def release_tile_hw(tokens):
    """llava/model/llava_arch.py:287-291: the per-tile grid the release infers from a crop's token count."""
    if np.sqrt(tokens) % 1 != 0:
        height = 2 * int(np.sqrt(tokens / 2))
        return height, int(tokens / height)
    return int(np.sqrt(tokens)), int(np.sqrt(tokens))


def release_merge(image_feature, image_size, grid_pinpoints, tile, newline, merge_type):
    """One image's pooled crops (crops, g, D) -> its sequence: llava/model/llava_arch.py:258-259 (flat) and 282-318
    (spatial*, image_aspect_ratio anyres). image_size is (width, height), as the release's `image_sizes`."""
    if merge_type == "flat":
        return image_feature.flatten(0, 1)
    if image_feature.shape[0] > 1:
        base_image_feature, image_feature = image_feature[0], image_feature[1:]
        height, width = release_tile_hw(base_image_feature.shape[0])
        num_patch_width, num_patch_height = release_grid_shape(image_size, grid_pinpoints, tile)
        image_feature = image_feature.view(num_patch_height, num_patch_width, height, width, -1)
        if "unpad" in merge_type:
            image_feature = image_feature.permute(4, 0, 2, 1, 3).contiguous().flatten(1, 2).flatten(2, 3)
            image_feature = release_unpad_image(image_feature, image_size)
            image_feature = torch.cat(
                (image_feature, newline[:, None, None].expand(*image_feature.shape[:-1], 1)), dim=-1)
            image_feature = image_feature.flatten(1, 2).transpose(0, 1)
        else:
            image_feature = image_feature.permute(0, 2, 1, 3, 4).contiguous().flatten(0, 3)
        return torch.cat((base_image_feature, image_feature), dim=0)
    image_feature = image_feature[0]
    if "unpad" in merge_type:
        image_feature = torch.cat((image_feature, newline[None]), dim=0)
    return image_feature


def release_token_count(image_size, granularity, merge_type="spatial_unpad", grid=GRID, tile=TILE,
                        grid_pinpoints=RELEASE_PINPOINTS):
    """Length of `release_merge` for an image (width, height), from shapes only (same lines)."""
    num_patch_width, num_patch_height = release_grid_shape(image_size, grid_pinpoints, tile)
    crops = 1 + num_patch_width * num_patch_height
    if merge_type != "spatial_unpad":
        return crops * granularity
    height, width = release_tile_hw(granularity)
    rows, cols = release_unpad_slices(num_patch_height * height, num_patch_width * width, image_size)
    kept_rows = len(range(num_patch_height * height)[rows])
    kept_cols = len(range(num_patch_width * width)[cols])
    return granularity + kept_rows * (kept_cols + 1)


def release_text_filter(image_features, text_embedding, attn_mask, text_queries_num):
    """multimodal_router/builder.py:291-311 (`TextFilterCosine.forward`); the sort as CUDA does it above 32 elements
    (stable: equal scores keep their positions), written here with Python's stable `sorted`."""
    similarity = F.cosine_similarity(image_features.unsqueeze(1), text_embedding.unsqueeze(0), dim=-1)
    if attn_mask is not None:
        similarity = similarity.masked_fill((attn_mask == False).unsqueeze(0), float("-inf"))  # noqa: E712
    scores = similarity.mean(dim=0).tolist()
    selected = sorted(range(len(scores)), key=lambda j: -scores[j])[:text_queries_num]
    out = torch.zeros((text_queries_num, text_embedding.shape[-1]), dtype=text_embedding.dtype)
    out[: len(selected)] = text_embedding[selected]
    return out


def clip_l_model(method="avg", **settings):
    """A CLIP-L/336-geometry tower (24x24 patches) of tiny width with a tiny LLM, and its processor."""
    tokenizer = build_tiny_tokenizer()
    vision = tiny_vision_config(image_size=TILE, patch_size=14, hidden_size=16)
    vision.num_hidden_layers = 1
    config = MultiGranConfig(
        vision_config=vision, text_config=tiny_text_config(vocab_size=len(tokenizer), hidden_size=32),
        method=method, method_settings=settings, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=PINPOINTS,
    )
    torch.manual_seed(0)
    model = MultiGranForConditionalGeneration(config).eval()
    image_processor = MultiGranImageProcessor(method=method, method_settings=config.method_settings, patch_size=14,
                                              image_grid_pinpoints=PINPOINTS)
    return model, MultiGranProcessor(image_processor=image_processor, tokenizer=tokenizer)


# ---------------------------------------------------------------------------------------------------------------------
# 1. unpad rounding

ISSUE_SIZES = [(352, 880), (328, 410), (205, 656), (1128, 47)]  # (width, height)


def sweep_sizes():
    """Every width 1..2048 at height 880 (and the transpose), plus random sizes up to 2048 px."""
    rng = random.Random(14)
    sizes = [(w, 880) for w in range(1, 2049)]
    sizes += [(h, w) for w, h in sizes]
    return sizes + [(rng.randint(1, 2048), rng.randint(1, 2048)) for _ in range(1000)]


def test_truncate_rounding_counts_equal_the_release_on_the_issue_sizes_and_a_sweep():
    # The issue's example: 352x880 at 36 tokens per crop, 134 tokens in the release, 148 with transformers' rounding.
    assert release_token_count((352, 880), 36) == 134
    assert count_tokens_at_granularity((880, 352), PINPOINTS, TILE, GRID, 0, rounding="truncate") == 134
    assert count_tokens_at_granularity((880, 352), PINPOINTS, TILE, GRID, 0, rounding="hf") == 148
    differing = 0
    for width, height in ISSUE_SIZES + sweep_sizes():
        for index, tokens in enumerate(LEVELS):
            release = release_token_count((width, height), tokens)
            ours = count_tokens_at_granularity((height, width), PINPOINTS, TILE, GRID, index, True, "truncate")
            assert ours == release, ((width, height), tokens)
            differing += ours != count_tokens_at_granularity((height, width), PINPOINTS, TILE, GRID, index, True, "hf")
        # the baseline AnyRes count (576 per crop) follows the same setting
        assert count_anyres_tokens((height, width), PINPOINTS, TILE, GRID, "truncate") == release_token_count(
            (width, height), 576)
    assert differing >= 10  # the sweep reaches the sizes where the two roundings part


@pytest.mark.parametrize("width,height", ISSUE_SIZES)
def test_truncate_rounding_merges_the_release_sequence(width, height):
    """Features, not just counts: the merged sequence equals the release's `unpad_image` path token for token."""
    generator = torch.Generator().manual_seed(width)
    cols, rows = release_grid_shape((width, height), RELEASE_PINPOINTS, TILE)
    crops = torch.randn(1 + rows * cols, GRID * GRID, 2, generator=generator, dtype=torch.float64)
    newline = torch.tensor([7.0, -7.0], dtype=torch.float64)
    for tokens, kernel, level_grid in granularity_levels(GRID):
        expected = release_merge(release_pool(crops, tokens), (width, height), RELEASE_PINPOINTS, TILE, newline,
                                 "spatial_unpad")
        ours = merge_at_granularity(pool_level(crops, kernel), (height, width), PINPOINTS, TILE, level_grid, newline,
                                    compat=True, rounding="truncate")
        torch.testing.assert_close(ours, expected, rtol=0, atol=1e-12)


def test_one_setting_for_processor_and_model():
    # AVG compat defaults to the release's truncation: processor, model and release agree on 352x880 and 1128x47.
    model, processor = clip_l_model(compat=True)
    assert model.visual.avg.unpad_rounding == "truncate"
    for (width, height), level in (((352, 880), 36), ((1128, 47), 576)):
        inputs = processor(images=picture(width, height), text=PROMPT, granularity=level)
        placeholders = int((inputs["input_ids"] == processor.image_token_id).sum())
        with torch.no_grad():
            assert model(**inputs).image_token_counts == [placeholders] == [release_token_count((width, height),
                                                                                                level)]
    # "hf" is the same setting, read by both sides: 148 tokens at 36 for 352x880.
    model, processor = clip_l_model(compat=True, unpad_rounding="hf")
    inputs = processor(images=picture(352, 880), text=PROMPT, granularity=36)
    with torch.no_grad():
        assert model(**inputs).image_token_counts == [int((inputs["input_ids"] == processor.image_token_id).sum())]
        assert model(**inputs).image_token_counts == [148]
    # The AnyRes baseline: "hf" by default (llava-hf parity), "truncate" on request; 205x656 is 1392 vs 1296.
    for rounding, expected in ((None, 1392), ("truncate", 1296)):
        settings = {} if rounding is None else {"unpad_rounding": rounding}
        model, processor = clip_l_model("anyres", **settings)
        inputs = processor(images=picture(205, 656), text=PROMPT)
        with torch.no_grad():
            assert model(**inputs).image_token_counts == [expected]
        assert int((inputs["input_ids"] == processor.image_token_id).sum()) == expected
    assert release_token_count((205, 656), 576) == 1296


def test_rounding_setting_is_validated_and_follows_compat():
    assert AvgSettings().unpad_rounding == "truncate" and AvgSettings(compat=False).unpad_rounding == "hf"
    assert AvgSettings(compat=False, unpad_rounding="truncate").unpad_rounding == "truncate"
    assert AnyResSettings().unpad_rounding == "hf"
    for settings_class in (AvgSettings, AnyResSettings):
        with pytest.raises(ValueError, match=r"method_settings.unpad_rounding must be one of \['hf', 'truncate'\], "
                                             r"got 'round'"):
            settings_class(unpad_rounding="round")
    with pytest.raises(ValueError, match="method_settings.unpad_rounding"):
        clip_l_model(unpad_rounding="floor")


# ---------------------------------------------------------------------------------------------------------------------
# 2. over-long samples in stages 3 and 4

CONTEXT = 250
QUESTIONS = ["USER: <image>\nDescribe the picture. ASSISTANT:", "USER: <image>\nWhat is it? ASSISTANT:"]
ANSWERS = [" " + " ".join(["red dot near a blue square"] * 4) + "</s>", " a dot</s>"]


@pytest.fixture(scope="module")
def short_context():
    """A tiny AVG model (8x8 patch grid: levels 4..64) whose LM context is CONTEXT tokens."""
    tokenizer = build_tiny_tokenizer()
    tokenizer.padding_side = "right"
    config = tiny_config(method="avg", vocab_size=len(tokenizer), image_size=64, patch_size=8)
    config.text_config.max_position_embeddings = CONTEXT
    torch.manual_seed(5)
    model = MultiGranForConditionalGeneration(config).eval()
    image_processor = MultiGranImageProcessor(
        method="avg", method_settings=config.method_settings, patch_size=8, size={"shortest_edge": 64},
        crop_size={"height": 64, "width": 64}, image_grid_pinpoints=config.image_grid_pinpoints)
    processor = MultiGranProcessor(image_processor=image_processor, tokenizer=tokenizer)
    return model, processor, [picture(130, 70, 1), picture(64, 64, 2)]


def labelled(processor, images, granularity):
    inputs = processor(images=images, text=[q + a for q, a in zip(QUESTIONS, ANSWERS)], granularity=granularity)
    labels = inputs["input_ids"].clone()
    for row, (question, image) in enumerate(zip(QUESTIONS, images)):
        labels[row, : processor(images=image, text=question, granularity=granularity)["input_ids"].shape[1]] = -100
    labels[inputs["attention_mask"] == 0] = -100
    inputs["labels"] = labels
    return inputs


def release_cut_forward(model, inputs, max_length):
    """The release's path at one fixed granularity: splice every image's tokens, then cut each sample's sequence to
    max_length tokens (llava/model/llava_arch.py:409-430), pad on the right and run the LM. Returns (logits, labels)."""
    with torch.no_grad():
        features = model.get_image_features(inputs["pixel_values"], inputs["image_sizes"],
                                            image_granularity=inputs["image_granularity"])
    embeds = model.embed_text(inputs["input_ids"])
    image_mask = inputs["input_ids"] == model.config.image_token_id
    embeds = embeds.masked_scatter(image_mask[..., None], torch.cat(features))
    rows = []
    for row in range(embeds.shape[0]):
        valid = inputs["attention_mask"][row].bool()
        rows.append((embeds[row][valid][:max_length], inputs["labels"][row][valid][:max_length]))
    width = max(e.shape[0] for e, _ in rows)
    padded = torch.zeros(len(rows), width, embeds.shape[-1])
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for row, (e, lab) in enumerate(rows):
        padded[row, : e.shape[0]], labels[row, : e.shape[0]], mask[row, : e.shape[0]] = e, lab, 1
    logits = model.language_model(inputs_embeds=padded, attention_mask=mask).logits
    return logits, labels


def test_a_sample_longer_than_the_context_is_cut_as_the_release_does(short_context):
    model, processor, images = short_context
    levels = model.visual.level_tokens
    fixed = {g: labelled(processor, images, g) for g in levels}
    lengths = {g: fixed[g]["attention_mask"].sum(dim=1).tolist() for g in levels}
    assert max(lengths[levels[-1]]) > CONTEXT and max(lengths[levels[0]]) <= CONTEXT  # cut at fine levels only
    with pytest.raises(ValueError, match="context"):
        model(**fixed[levels[-1]])  # what stopped training before

    def release_ce(max_length):
        """The release: at each level the answer CE of the cut sequences (a mean over the batch's answer tokens)."""
        with torch.no_grad():
            return torch.stack([
                F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=-100)
                for logits, labels in (release_cut_forward(model, fixed[g], max_length) for g in levels)
            ])

    loss, metrics = multi_granularity_loss(model, dict(labelled(processor, images, "auto")))  # cut to the context
    torch.testing.assert_close(loss.detach(), release_ce(CONTEXT).mean(), rtol=1e-5, atol=1e-6)
    cut_rows = {m: sum(length > m for g in levels for length in lengths[g]) for m in (CONTEXT, 140)}
    assert metrics["truncated_sequences"] == cut_rows[CONTEXT] > 0
    # An explicit, shorter max_length (the release's tokenizer model_max_length) cuts more. At 140 no answer token is
    # left at the finest level: the release's loss is NaN there; multigran averages the other levels.
    loss, metrics = multi_granularity_loss(model, dict(labelled(processor, images, "auto")), max_length=140)
    release = release_ce(140)
    assert torch.isnan(release[-1]) and torch.isfinite(release[:-1]).all()
    torch.testing.assert_close(loss.detach(), release[:-1].mean(), rtol=1e-5, atol=1e-6)
    assert f"loss_g{levels[-1]}" not in metrics and metrics["truncated_sequences"] == cut_rows[140] > cut_rows[CONTEXT]
    with pytest.raises(ValueError, match="exceeds the language model's context of 250"):
        multi_granularity_loss(model, dict(labelled(processor, images, "auto")), max_length=CONTEXT + 1)


def test_rglf_cuts_each_level_and_drops_samples_whose_answer_is_gone(short_context):
    model, processor, images = short_context
    levels = model.visual.level_tokens
    batch = dict(labelled(processor, images, "auto"))
    cut = 200  # sample 0 keeps its answer at the coarse levels and none at the finest; sample 1 keeps its own
    loss, metrics = rglf_training_loss(model, batch, max_length=cut)
    with torch.no_grad():
        nll = []
        for g in levels:  # the release's per-sample mean answer NLL (llava_llama.py:136-140) on the cut sequences
            logits, labels = release_cut_forward(model, labelled(processor, images, g), cut)
            token_nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=-100,
                                        reduction="none")
            nll.append(token_nll.sum(1) / (labels[:, 1:] != -100).sum(1))
        nll = torch.stack(nll, dim=1)  # (2, levels); NaN where the answer was cut away
        assert torch.isnan(nll[0]).any() and torch.isfinite(nll[0]).any() and torch.isfinite(nll[1]).all()
        crops = model.visual.encode_crops(model.vision_tower, batch["pixel_values"], batch["image_sizes"])
        ids, labels = batch["input_ids"][1], batch["labels"][1]
        keep = ids != processor.image_token_id
        valid = batch["attention_mask"][1].bool()[keep] & (labels[keep] == -100)
        logits = model.visual.router(crops[1], model.get_input_embeddings()(ids[keep]), valid)
        # The release's loss would be NaN (a NaN enters the margin); multigran leaves the sample out.
        expected = rglf_loss(logits[None], nll[1:])
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)
    assert metrics["rglf_samples"] == 1 and metrics["truncated_sequences"] > 0


def test_truncation_keeps_the_first_tokens_of_an_image_cut_in_the_middle():
    image, pad = 9, 0
    #                          text  image x4           text  text
    input_ids = torch.tensor([[1, 2, image, image, image, image, 5, 6],
                              [1, image, image, 7, 8, pad, pad, pad]])
    mask = (input_ids != pad).long()
    labels = torch.where(input_ids == 5, 5, -100)
    features = [torch.arange(4.0)[:, None] + 10, torch.arange(2.0)[:, None] + 20]
    ids, out_mask, out_labels, kept, cut = truncate_sequences(input_ids, mask, labels, features, image, pad, 4)
    assert cut == 2
    assert ids.tolist() == [[1, 2, image, image], [1, image, image, 7]] and out_mask.tolist() == [[1] * 4] * 2
    assert [f[:, 0].tolist() for f in kept] == [[10.0, 11.0], [20.0, 21.0]]  # image 0 keeps its first 2 tokens
    assert (out_labels == -100).all()
    # The release's own cut (llava_arch.py:426-430) on the spliced embeddings gives the same rows.
    for row, (features_in_row, full) in enumerate(((features[0], input_ids[0]), (features[1], input_ids[1][:5]))):
        spliced = full.float()[:, None].clone()
        spliced[full == image] = features_in_row
        ours = ids[row].float()[:, None].clone()
        ours[ids[row] == image] = kept[row]
        torch.testing.assert_close(ours, spliced[:4])
    # an image past the cut keeps nothing
    _, _, _, kept, _ = truncate_sequences(input_ids, mask, labels, features, image, pad, 2)
    assert [f.shape[0] for f in kept] == [0, 1]


def test_router_text_is_cut_to_max_length():
    # llava_arch.py:165-202: the router's text = the prompt without its image tokens, cut to the first max_length.
    image = 4
    ids = torch.tensor([1, 7, image, 8, 9, 10, 11])
    keep, valid = select_instruction_tokens(ids, image, max_length=4)
    assert keep.tolist() == [0, 1, 3, 4] and valid.all()


# ---------------------------------------------------------------------------------------------------------------------
# 3. merge types and granularity lists


@pytest.mark.parametrize("merge_type", ["flat", "spatial", "spatial_unpad"])
def test_every_merge_type_equals_the_release(merge_type):
    newline = torch.tensor([5.0, -5.0], dtype=torch.float64)
    for width, height in [(672, 672), (1000, 500), (352, 880), (300, 1000)]:
        cols, rows = release_grid_shape((width, height), RELEASE_PINPOINTS, TILE)
        crops = torch.randn(1 + rows * cols, GRID * GRID, 2, dtype=torch.float64)
        for index, (tokens, kernel, level_grid) in enumerate(granularity_levels(GRID)):
            expected = release_merge(release_pool(crops, tokens), (width, height), RELEASE_PINPOINTS, TILE, newline,
                                     merge_type)
            ours = merge_at_granularity(pool_level(crops, kernel), (height, width), PINPOINTS, TILE, level_grid,
                                        newline if merge_type == "spatial_unpad" else None, compat=True,
                                        rounding="truncate", merge=merge_type)
            torch.testing.assert_close(ours, expected, rtol=0, atol=1e-12)
            count = count_tokens_at_granularity((height, width), PINPOINTS, TILE, GRID, index, True, "truncate",
                                                merge_type)
            assert count == expected.shape[0] == release_token_count((width, height), tokens, merge_type)


def test_672_counts_per_level_for_each_merge_type_end_to_end():
    expected = {"flat": [180, 360, 720, 1440, 2880], "spatial": [180, 360, 720, 1440, 2880],
                "spatial_unpad": [192, 228, 744, 888, 2928]}
    for merge_type, counts in expected.items():
        assert [release_token_count((672, 672), g, merge_type) for g in LEVELS] == counts
        assert [count_tokens_at_granularity((672, 672), PINPOINTS, TILE, GRID, i, True, "truncate", merge_type)
                for i in range(5)] == counts
    for merge_type in ("flat", "spatial"):  # spatial_unpad end to end: test_avg_pipeline.py
        model, processor = clip_l_model(patch_merge=merge_type, use_router=merge_type != "flat", granularity=576)
        assert model.visual.image_newline is None  # the release has none without unpad (llava_arch.py:40-43)
        inputs = processor(images=picture(672, 672), text=PROMPT, granularity=36)
        with torch.no_grad():
            assert model(**inputs).image_token_counts == [180]
            crops = model.visual.encode_crops(model.vision_tower, inputs["pixel_values"], inputs["image_sizes"])[0]
        for level, count in zip(LEVELS, expected[merge_type]):
            inputs = processor(images=picture(672, 672), text=PROMPT, granularity=level)
            assert int((inputs["input_ids"] == processor.image_token_id).sum()) == count
            assert model.visual.merge(crops, (672, 672), level).shape[0] == count
    with pytest.raises(ValueError, match="patch_merge='flat' needs use_router=False"):
        AvgSettings(patch_merge="flat")
    with pytest.raises(ValueError, match=r"method_settings.patch_merge must be one of"):
        AvgSettings(patch_merge="spatial_unpad_anyres_max")


@pytest.mark.parametrize("levels", [[1, 9, 36, 144, 576], [16, 64, 288, 576]])
def test_other_granularity_lists_pool_as_the_release_and_match_end_to_end(levels):
    # pooling: the release's kernel for every listed level (llava_arch.py:216-234)
    features = torch.randn(3, GRID * GRID, 2, dtype=torch.float64)
    for tokens, kernel, level_grid in granularity_levels(GRID, levels):
        torch.testing.assert_close(pool_level(features, kernel), release_pool(features, tokens), rtol=0, atol=1e-12)
        assert level_grid == release_tile_hw(tokens)
    # end to end: processor counts == model counts == the release's; the router has one logit per level
    model, processor = clip_l_model(levels=levels)
    assert model.visual.level_tokens == levels
    assert model.visual.router.router[2].out_features == len(levels) == model.visual.router.norm.weight.shape[0]
    assert model.visual.router.voter.shape == (sum(levels) + 32, 1)
    image = picture(500, 800)
    inputs = processor(images=image, text=PROMPT)  # auto
    with torch.no_grad():
        report = model(**inputs).visual_report[0]
        crops = model.visual.encode_crops(model.vision_tower, inputs["pixel_values"], inputs["image_sizes"])[0]
        logits = model.visual.router(crops, model.get_input_embeddings()(inputs["input_ids"][0, :4]))
    assert report["mode"] == "auto" and report["granularity"] in levels
    assert len(report["router_probabilities"]) == len(levels) and logits.shape == (len(levels),)
    for level in levels:
        inputs = processor(images=image, text=PROMPT, granularity=level)
        count = int((inputs["input_ids"] == processor.image_token_id).sum())
        assert count == model.visual.merge(crops, (800, 500), level).shape[0] == release_token_count((500, 800), level)
    with torch.no_grad():
        assert model(**inputs).image_token_counts == [count]  # the finest level through the whole model


def test_granularity_lists_the_release_cannot_pool_or_route_are_refused():
    with pytest.raises(ValueError, match=r"level 100 cannot be pooled from a 24x24 patch grid.*\[1, 4, 9, 16, 36, "
                                         r"64, 72, 144, 288, 576\]"):
        granularity_levels(GRID, [36, 100, 576])
    with pytest.raises(ValueError, match="repeat a level"):
        granularity_levels(GRID, [36, 36, 576])
    with pytest.raises(ValueError, match="the list is empty"):
        granularity_levels(GRID, [])
    with pytest.raises(ValueError, match="the last level must be the largest"):
        AvgSettings(levels=[576, 36]).level_geometry(GRID)
    assert [t for t, _, _ in AvgSettings(levels=[576, 36], use_router=False).level_geometry(GRID)] == [576, 36]
    with pytest.raises(ValueError, match="cannot give the levels"):
        AvgRouter(16, level_tokens=[1, 9, 36])(torch.randn(2, 64, 16), torch.randn(3, 16))  # an 8x8 grid


# ---------------------------------------------------------------------------------------------------------------------
# 4. the router's text filter: tie order and what fills a short instruction's slots


def test_tie_order_is_the_release_stable_order_above_32_tokens():
    torch.manual_seed(6)
    visual = torch.randn(16, 8, dtype=torch.float64)
    distinct = torch.randn(12, 8, dtype=torch.float64)
    # 40 tokens with many exact ties (repeated tokens), and masked ones
    text = distinct[torch.tensor([i % 12 for i in range(40)])]
    mask = torch.tensor([i % 5 != 0 for i in range(40)])
    for k in (8, 32):
        expected = release_text_filter(visual, text, mask, k)
        torch.testing.assert_close(filter_instruction_tokens(visual, text, mask, k), expected, rtol=0, atol=0)
    # tied tokens come in position order: token 3 and its repeats 15, 27, 39 at one score
    scores = F.cosine_similarity(visual[:, None], text[None], dim=-1).mean(0)
    assert scores[3] == scores[15] == scores[27] == scores[39]


def test_a_short_instruction_lets_answers_into_the_router_in_compat_only():
    """The issue's case: a 10-token instruction, 32 text slots, a 30-token answer in training."""
    torch.manual_seed(7)
    embed = torch.nn.Embedding(100, 8).double()
    ids = torch.cat([torch.arange(1, 11), torch.tensor([99]), torch.arange(50, 80)])  # instruction, image, answer
    labels = torch.cat([torch.full((11,), -100), torch.arange(50, 80)])
    keep, valid = select_instruction_tokens(ids, image_token_id=99, labels=labels)
    assert valid.tolist() == [True] * 10 + [False] * 30
    text = embed(ids[keep]).detach()
    crops = torch.randn(2, 16, 8, dtype=torch.float64)
    visual = crops[0]  # the filter reads the base crop
    answer_rows = {tuple(row.tolist()) for row in text[10:]}
    compat = filter_instruction_tokens(visual, text, valid, 32)
    assert sum(tuple(row.tolist()) in answer_rows for row in compat) == 22  # the release: 22 of 32 slots
    torch.testing.assert_close(compat, release_text_filter(visual, text, valid, 32), rtol=0, atol=0)
    torch.testing.assert_close(compat[10:], text[10:32], rtol=0, atol=0)  # in position order
    corrected = filter_instruction_tokens(visual, text, valid, 32, fill_with_masked=False)
    torch.testing.assert_close(corrected[:10], compat[:10], rtol=0, atol=0)
    assert not corrected[10:].any()  # zero rows: the router never sees an answer
    # the routers of the two modes fill that way: the text part of what enters the merger
    for compat_mode, expected_text in ((True, compat), (False, corrected)):
        router = AvgRouter(8, level_tokens=[1, 2, 4, 8, 16], top_k=32, compat=compat_mode).double().eval()
        captured = {}
        hook = router.merger.register_forward_pre_hook(lambda module, args: captured.update(x=args[0]))
        with torch.no_grad():
            router(crops, text, valid)
        hook.remove()
        sequence = captured["x"] if compat_mode else captured["x"].transpose(0, 1)  # (crops, 31 + 32, D)
        torch.testing.assert_close(sequence[1, -32:], expected_text, rtol=0, atol=0)
