"""Features from a Hugging Face vision tower (CLIP, SigLIP), selected the way LLaVA does it."""

import torch


def select_vision_features(vision_tower, pixel_values, feature_layer, select_strategy) -> torch.Tensor:
    """Runs the tower once and returns the chosen hidden layer(s): (crops, 3, H, W) -> (crops, tokens, C * layers).

    `feature_layer` is an int or a list of ints (layers concatenated on channels, as in transformers);
    `select_strategy` "default" drops the first (CLS) token, "full" keeps every token.
    """
    parameter = next(vision_tower.parameters())
    pixel_values = pixel_values.to(device=parameter.device, dtype=parameter.dtype)
    # Asking for the indices keeps only those hidden states alive (transformers' output capturing).
    outputs = vision_tower(pixel_values, output_hidden_states=feature_layer, return_dict=True)
    if isinstance(feature_layer, int):
        features = outputs.hidden_states[feature_layer]
    else:
        features = torch.cat([outputs.hidden_states[layer] for layer in feature_layer], dim=-1)
    if select_strategy == "default":
        features = features[:, 1:]
    elif select_strategy != "full":
        raise ValueError(f"vision_feature_select_strategy must be 'default' or 'full', got {select_strategy!r}")
    return features


def tower_has_cls_token(vision_config) -> bool:
    """CLIP-style towers prepend a CLS token; SigLIP does not."""
    return vision_config.model_type not in ("siglip_vision_model", "siglip2_vision_model")


def tower_grid(vision_config) -> int:
    """Patches per side of one crop: 336 / 14 = 24 for CLIP-L/336."""
    return vision_config.image_size // vision_config.patch_size
