"""High-res ConvNeXt encoder: OpenCLIP/timm -> HF conversion, multi-stage features, real-size layout."""

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import ConvNextModel

from multigran.vision.convnext import (
    convert_open_clip_convnext,
    convnext_features,
    convnext_large_d_320_config,
    load_open_clip_convnext,
)

TINY_DIMS = [8, 12, 16, 20]
TINY_DEPTHS = [1, 2, 1, 1]
PREFIX = "visual.trunk."


def tiny_open_clip_state_dict(seed=0):
    """OpenCLIP-style checkpoint: timm ConvNeXt trunk keys + keys the converter must ignore."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.3, offset=0.0):
        return offset + scale * torch.randn(*shape, generator=g)

    sd = {
        PREFIX + "stem.0.weight": rand(TINY_DIMS[0], 3, 4, 4),
        PREFIX + "stem.0.bias": rand(TINY_DIMS[0]),
        PREFIX + "stem.1.weight": rand(TINY_DIMS[0], offset=1.0),
        PREFIX + "stem.1.bias": rand(TINY_DIMS[0]),
    }
    for i, (dim, depth) in enumerate(zip(TINY_DIMS, TINY_DEPTHS)):
        stage = f"{PREFIX}stages.{i}."
        if i > 0:
            sd[stage + "downsample.0.weight"] = rand(TINY_DIMS[i - 1], offset=1.0)
            sd[stage + "downsample.0.bias"] = rand(TINY_DIMS[i - 1])
            sd[stage + "downsample.1.weight"] = rand(dim, TINY_DIMS[i - 1], 2, 2)
            sd[stage + "downsample.1.bias"] = rand(dim)
        for j in range(depth):
            block = f"{stage}blocks.{j}."
            sd[block + "conv_dw.weight"] = rand(dim, 1, 7, 7)
            sd[block + "conv_dw.bias"] = rand(dim)
            sd[block + "norm.weight"] = rand(dim, offset=1.0)
            sd[block + "norm.bias"] = rand(dim)
            sd[block + "mlp.fc1.weight"] = rand(4 * dim, dim)
            sd[block + "mlp.fc1.bias"] = rand(4 * dim)
            sd[block + "mlp.fc2.weight"] = rand(dim, 4 * dim)
            sd[block + "mlp.fc2.bias"] = rand(dim)
            sd[block + "gamma"] = rand(dim, offset=0.5)
    # Parts of the OpenCLIP model that MG-LLaVA drops: trunk head (final norm), MLP projection head, text tower.
    sd[PREFIX + "head.norm.weight"] = torch.ones(TINY_DIMS[-1])
    sd[PREFIX + "head.norm.bias"] = torch.zeros(TINY_DIMS[-1])
    sd["visual.head.mlp.fc1.weight"] = rand(10, TINY_DIMS[-1])
    sd["transformer.resblocks.0.attn.in_proj_weight"] = rand(12, 4)
    sd["token_embedding.weight"] = rand(5, 4)
    sd["logit_scale"] = torch.tensor(4.6)
    return sd


def _layer_norm_channels_first(x, weight, bias, eps=1e-6):
    mean = x.mean(1, keepdim=True)
    var = ((x - mean) ** 2).mean(1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight[:, None, None] + bias[:, None, None]


def reference_trunk(sd, x):
    """Independent ConvNeXt (timm layout) forward from raw tensors; returns the 4 stage maps."""
    x = F.conv2d(x, sd[PREFIX + "stem.0.weight"], sd[PREFIX + "stem.0.bias"], stride=4)
    x = _layer_norm_channels_first(x, sd[PREFIX + "stem.1.weight"], sd[PREFIX + "stem.1.bias"])
    stages = []
    for i, depth in enumerate(TINY_DEPTHS):
        stage = f"{PREFIX}stages.{i}."
        if i > 0:
            x = _layer_norm_channels_first(x, sd[stage + "downsample.0.weight"], sd[stage + "downsample.0.bias"])
            x = F.conv2d(x, sd[stage + "downsample.1.weight"], sd[stage + "downsample.1.bias"], stride=2)
        for j in range(depth):
            b = f"{stage}blocks.{j}."
            y = F.conv2d(x, sd[b + "conv_dw.weight"], sd[b + "conv_dw.bias"], padding=3, groups=x.shape[1])
            y = _layer_norm_channels_first(y, sd[b + "norm.weight"], sd[b + "norm.bias"])
            y = torch.einsum("bchw,oc->bohw", y, sd[b + "mlp.fc1.weight"]) + sd[b + "mlp.fc1.bias"][:, None, None]
            y = 0.5 * y * (1 + torch.erf(y / math.sqrt(2)))  # exact GELU
            y = torch.einsum("bchw,oc->bohw", y, sd[b + "mlp.fc2.weight"]) + sd[b + "mlp.fc2.bias"][:, None, None]
            x = x + sd[b + "gamma"][:, None, None] * y
        stages.append(x)
    return stages


def bilinear_reference(x, out_h, out_w):
    """Per-pixel bilinear resize with half-pixel centres (align_corners=False), x (B, C, h, w)."""
    _, _, h, w = x.shape
    out = x.new_zeros(x.shape[0], x.shape[1], out_h, out_w)

    def source(dst, in_size, out_size):
        s = max((dst + 0.5) * in_size / out_size - 0.5, 0.0)
        i0 = min(int(math.floor(s)), in_size - 1)
        i1 = min(i0 + 1, in_size - 1)
        return i0, i1, s - i0

    for i in range(out_h):
        y0, y1, ly = source(i, h, out_h)
        for j in range(out_w):
            x0, x1, lx = source(j, w, out_w)
            out[:, :, i, j] = (
                (1 - ly) * (1 - lx) * x[:, :, y0, x0]
                + (1 - ly) * lx * x[:, :, y0, x1]
                + ly * (1 - lx) * x[:, :, y1, x0]
                + ly * lx * x[:, :, y1, x1]
            )
    return out


def test_converted_model_matches_reference_stages():
    sd = tiny_open_clip_state_dict()
    model = load_open_clip_convnext(sd)
    assert list(model.config.depths) == TINY_DEPTHS and list(model.config.hidden_sizes) == TINY_DIMS
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    last_feat, multi_stage = convnext_features(model, pixels)
    ref = reference_trunk(sd, pixels)
    assert [tuple(r.shape[-2:]) for r in ref] == [(16, 16), (8, 8), (4, 4), (2, 2)]
    torch.testing.assert_close(last_feat, ref[3], rtol=1e-4, atol=1e-4)
    assert multi_stage.shape == (2, sum(TINY_DIMS), 16, 16)
    start = 0
    for stage_map in ref:
        channels = stage_map.shape[1]
        expected = bilinear_reference(stage_map, 16, 16)  # identity for stage 0
        torch.testing.assert_close(multi_stage[:, start : start + channels], expected, rtol=1e-4, atol=1e-4)
        start += channels


def test_load_from_bin_and_safetensors_files(tmp_path):
    sd = tiny_open_clip_state_dict()
    torch.save(sd, tmp_path / "open_clip_pytorch_model.bin")
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "open_clip_model.safetensors")
    from_bin = load_open_clip_convnext(tmp_path / "open_clip_pytorch_model.bin")
    from_st = load_open_clip_convnext(str(tmp_path / "open_clip_model.safetensors"))
    loaded = from_bin.state_dict()["encoder.stages.1.layers.1.pwconv2.weight"]
    torch.testing.assert_close(loaded, sd[PREFIX + "stages.1.blocks.1.mlp.fc2.weight"])
    for key, value in from_bin.state_dict().items():
        torch.testing.assert_close(value, from_st.state_dict()[key])
    assert not any(p.requires_grad for p in from_bin.parameters())  # frozen, as in every release stage


def test_converter_key_mapping_and_ignored_keys(caplog):
    sd = tiny_open_clip_state_dict()
    with caplog.at_level(logging.INFO, logger="multigran.vision.convnext"):
        converted = convert_open_clip_convnext(sd)
    assert converted["embeddings.layernorm.weight"] is sd[PREFIX + "stem.1.weight"]
    assert converted["encoder.stages.2.downsampling_layer.1.weight"] is sd[PREFIX + "stages.2.downsample.1.weight"]
    assert converted["encoder.stages.1.layers.1.layer_scale_parameter"] is sd[PREFIX + "stages.1.blocks.1.gamma"]
    assert not any("head" in k or "transformer" in k for k in converted)
    assert "ignored 6 keys" in caplog.text
    assert "visual.trunk.head" in caplog.text and "transformer.resblocks" in caplog.text


def test_missing_key_raises_naming_it():
    sd = tiny_open_clip_state_dict()
    del sd[PREFIX + "stages.2.blocks.0.mlp.fc1.bias"]
    with pytest.raises(ValueError, match=r"missing keys \['encoder.stages.2.layers.0.pwconv1.bias'\]"):
        load_open_clip_convnext(sd)


def test_unexpected_trunk_key_raises_naming_it():
    sd = tiny_open_clip_state_dict()
    sd[PREFIX + "stages.0.blocks.0.grn.weight"] = torch.ones(8)
    with pytest.raises(ValueError, match="visual.trunk.stages.0.blocks.0.grn.weight"):
        convert_open_clip_convnext(sd)


def test_config_mismatch_raises_naming_keys():
    sd = tiny_open_clip_state_dict()
    config = convnext_large_d_320_config(hidden_sizes=TINY_DIMS, depths=[1, 1, 1, 1])
    with pytest.raises(ValueError, match=r"unexpected keys \['encoder.stages.1.layers.1"):
        load_open_clip_convnext(sd, config=config)


def test_not_a_convnext_checkpoint_raises():
    with pytest.raises(ValueError, match="stem.0.weight"):
        convert_open_clip_convnext({"visual.conv1.weight": torch.zeros(1)})


def test_real_size_convnext_large_on_meta():
    config = convnext_large_d_320_config()
    with torch.device("meta"):
        model = ConvNextModel(config)
    dims, depths = [192, 384, 768, 1536], [3, 3, 27, 3]
    expected = 3 * 192 * 4 * 4 + 192 + 2 * 192  # patch-4 stem conv + LayerNorm
    for i, (d, n) in enumerate(zip(dims, depths)):
        if i > 0:
            expected += 2 * dims[i - 1] + dims[i - 1] * d * 2 * 2 + d  # LayerNorm + 2x2 stride-2 conv
        # dw 7x7 (+bias), LayerNorm, fc1 d->4d, fc2 4d->d, layer scale
        expected += n * ((49 * d + d) + 2 * d + (d * 4 * d + 4 * d) + (4 * d * d + d) + d)
    expected += 2 * 1536  # HF's final LayerNorm (present in the module, unused by convnext_features)
    assert sum(p.numel() for p in model.parameters()) == expected
    last_feat, multi_stage = convnext_features(model, torch.empty(1, 3, 768, 768, device="meta"))
    assert last_feat.shape == (1, 1536, 24, 24)
    assert multi_stage.shape == (1, 2880, 192, 192)


def test_bfloat16_model_gives_bfloat16_features_close_to_float32():
    sd = tiny_open_clip_state_dict()
    model = load_open_clip_convnext(sd)
    pixels = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    last32, multi32 = convnext_features(model, pixels)
    last16, multi16 = convnext_features(model.to(torch.bfloat16), pixels)  # fp32 input is cast to the model dtype
    assert last16.dtype == multi16.dtype == torch.bfloat16
    torch.testing.assert_close(multi16.float(), multi32, rtol=0.1, atol=0.5)
    assert (last16.float() - last32).abs().mean() < 0.1 * last32.abs().mean()
