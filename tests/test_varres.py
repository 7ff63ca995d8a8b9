"""Variable-resolution ViT encoding (spec section 2) against Hugging Face's own CLIP/SigLIP vision models."""

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

from multigran.vision.varres import encode_variable_resolution, interpolate_position_table

PATCH = 8  # tiny tower: image 48, patch 8 -> native 6x6 grid (stands in for CLIP-L/336's 24x24)


def _clip(attn_implementation="eager"):
    torch.manual_seed(0)
    config = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        image_size=48, patch_size=PATCH, attn_implementation=attn_implementation,
    )
    return CLIPVisionModel(config).eval()


def _siglip():
    torch.manual_seed(0)
    config = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        image_size=48, patch_size=PATCH, attn_implementation="eager",
    )
    return SiglipVisionModel(config).eval()


def _image(height, width, seed):
    return torch.randn(3, height, width, generator=torch.Generator().manual_seed(seed))


def test_native_grid_matches_hf_hidden_states():
    model = _clip()
    images = [_image(48, 48, 1), _image(48, 48, 2)]
    with torch.no_grad():
        ours = encode_variable_resolution(model, images)
        hf = model(torch.stack(images), output_hidden_states=True).hidden_states[-2][:, 1:]  # drop CLS
    assert [tuple(o.shape) for o in ours] == [(6, 6, 32)] * 2
    for i in range(2):
        torch.testing.assert_close(ours[i].reshape(36, 32), hf[i], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("feature_layer", [0, 1, -1])
def test_other_feature_layers_match_hf(feature_layer):
    model = _clip()
    image = _image(48, 48, 3)
    with torch.no_grad():
        ours = encode_variable_resolution(model, [image], feature_layer=feature_layer)[0]
        hf = model(image[None], output_hidden_states=True).hidden_states[feature_layer][0, 1:]
    torch.testing.assert_close(ours.reshape(36, 32), hf, rtol=1e-5, atol=1e-5)


def test_non_native_grid_matches_hf_interpolated_position_encoding():
    # HF's `interpolate_pos_encoding=True` is bicubic, align_corners=False, CLS position kept: the same recipe.
    model = _clip()
    image = _image(40, 72, 4)  # 5x9 patches
    with torch.no_grad():
        ours = encode_variable_resolution(model, [image])[0]
        hf = model(image[None], output_hidden_states=True, interpolate_pos_encoding=True).hidden_states[-2][0, 1:]
    assert ours.shape == (5, 9, 32)
    torch.testing.assert_close(ours.reshape(45, 32), hf, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_padded_batch_equals_images_alone(attn_implementation):
    model = _clip(attn_implementation)
    images = [_image(48, 48, 5), _image(40, 72, 6), _image(8, 16, 7), _image(96, 56, 8), _image(48, 48, 9)]
    with torch.no_grad():
        batched = encode_variable_resolution(model, images)
        alone = [encode_variable_resolution(model, [image])[0] for image in images]
    for b, a, image in zip(batched, alone, images):
        assert b.shape == (image.shape[1] // PATCH, image.shape[2] // PATCH, 32)
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_padding_does_not_leak_into_gradients():
    # Gradients w.r.t. one image are unchanged by the presence of a longer, padded neighbour.
    model = _clip()
    small = _image(16, 24, 10).requires_grad_(True)
    encode_variable_resolution(model, [small])[0].square().sum().backward()
    grad_alone = small.grad.clone()
    small.grad = None
    out = encode_variable_resolution(model, [small, _image(64, 64, 11)])
    out[0].square().sum().backward()
    torch.testing.assert_close(small.grad, grad_alone, rtol=1e-4, atol=1e-6)


def test_position_table_interpolation_independent():
    model = _clip()
    table = model.embeddings.position_embedding.weight.detach()  # (1 + 36, C)
    for grid in [(6, 6), (3, 10), (11, 4)]:
        ours = interpolate_position_table(table, grid, has_cls=True)
        # independent path: (36, C) -> (C, 6, 6) image, interpolate, back to (h*w, C)
        square = torch.stack([table[1:, c].reshape(6, 6) for c in range(table.shape[1])])[None]
        resized = F.interpolate(square, size=grid, mode="bicubic", align_corners=False)[0]
        raster = [resized[:, y, x] for y in range(grid[0]) for x in range(grid[1])]
        expected = torch.cat([table[:1], torch.stack(raster)])
        torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(interpolate_position_table(table, (6, 6), has_cls=True), table)  # native grid: untouched


def test_siglip_without_cls():
    model = _siglip()
    images = [_image(48, 48, 12), _image(24, 64, 13)]
    with torch.no_grad():
        ours = encode_variable_resolution(model, images, select_strategy="full")
        native = model(images[0][None], output_hidden_states=True).hidden_states[-2][0]
        resized = model(images[1][None], output_hidden_states=True, interpolate_pos_encoding=True).hidden_states[-2][0]
        default = encode_variable_resolution(model, images)  # nothing to drop: same grid
    torch.testing.assert_close(ours[0].reshape(36, 32), native, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[1].reshape(24, 32), resized, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(default[1], ours[1])


def test_bf16_follows_the_tower_dtype():
    model = _clip()
    images = [_image(48, 48, 14), _image(16, 40, 15)]
    with torch.no_grad():
        reference = encode_variable_resolution(model, images)
        low = encode_variable_resolution(model.to(torch.bfloat16), images)
    for r, lo in zip(reference, low):
        assert lo.dtype == torch.bfloat16
        torch.testing.assert_close(lo.float(), r, rtol=0.1, atol=0.1)


def test_bad_input_raises():
    model = _clip()
    with pytest.raises(ValueError, match="multiples of the patch size"):
        encode_variable_resolution(model, [_image(50, 48, 0)])
    with pytest.raises(ValueError, match=r"image 1 must be a \(3, H, W\)"):
        encode_variable_resolution(model, [_image(48, 48, 0), torch.zeros(1, 3, 48, 48)])
    with pytest.raises(ValueError, match="non-empty"):
        encode_variable_resolution(model, [])
    with pytest.raises(ValueError, match="feature_layer"):
        encode_variable_resolution(model, [_image(48, 48, 0)], feature_layer=-5)
    with pytest.raises(ValueError, match="CLS"):
        encode_variable_resolution(model, [_image(48, 48, 0)], select_strategy="full")
    with pytest.raises(ValueError, match="select_strategy"):
        encode_variable_resolution(model, [_image(48, 48, 0)], select_strategy="cls_patch")
    with pytest.raises(TypeError, match="unsupported vision tower"):
        encode_variable_resolution(torch.nn.Linear(2, 2), [_image(48, 48, 0)])


def test_float64_tower_interpolates_its_position_table_in_float64():
    """The table follows the module's dtype (the release resizes in the table's own dtype,
    llava/model/multimodal_encoder/adapt_clip_vision_model.py:63-72): a float64 tower matches HF's float64 recipe to
    float64 rounding, which a float32 resize (~1e-7) would not."""
    model = _clip().double()
    table = model.embeddings.position_embedding.weight
    patch = table[1:].T.reshape(1, -1, 6, 6)
    in64 = F.interpolate(patch, size=(5, 9), mode="bicubic", align_corners=False).reshape(32, 45).T
    in32 = F.interpolate(patch.float(), size=(5, 9), mode="bicubic", align_corners=False).reshape(32, 45).T.double()
    ours = interpolate_position_table(table, (5, 9), has_cls=True)
    assert ours.dtype == torch.float64 and torch.equal(ours[0], table[0])
    torch.testing.assert_close(ours[1:], in64, rtol=1e-14, atol=1e-14)
    assert (in32 - in64).abs().max() > 1e-10  # the check can tell the two apart

    image = _image(40, 72, 4).double()  # 5x9 patches
    with torch.no_grad():
        encoded = encode_variable_resolution(model, [image])[0]
        hf = model(image[None], output_hidden_states=True, interpolate_pos_encoding=True).hidden_states[-2][0, 1:]
    torch.testing.assert_close(encoded.reshape(45, 32), hf, rtol=1e-12, atol=1e-12)
