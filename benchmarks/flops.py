"""Analytic FLOPs counted from the real modules (built on the `meta` device), not from hand-typed constants.

A transformer over T tokens costs 2*T*(multiply-accumulates of its Linear layers) + 4*T^2*d_attention per layer
(QK^T and AV, full attention as the kernels compute it).
"""

import torch
from torch import nn


def linear_macs(module: nn.Module, exclude=()) -> int:
    """Multiply-accumulates per token of every Linear in `module` (skipping submodules named in `exclude`)."""
    total = 0
    for name, child in module.named_modules():
        if isinstance(child, nn.Linear) and not any(name.startswith(e) for e in exclude):
            total += child.in_features * child.out_features
    return total


def transformer_flops(module: nn.Module, tokens: int, layers: int, attention_dim: int, exclude=()) -> int:
    return 2 * tokens * linear_macs(module, exclude) + 4 * layers * tokens * tokens * attention_dim


def vision_tower_flops(tower: nn.Module, crops: int, tokens_per_crop: int) -> int:
    config = tower.config
    conv = sum(m.weight.numel() for m in tower.modules() if isinstance(m, nn.Conv2d))  # patch embedding MACs/patch
    per_crop = transformer_flops(tower, tokens_per_crop, config.num_hidden_layers, config.hidden_size)
    return crops * (per_crop + 2 * conv * (tokens_per_crop - 1))


def llm_flops(language_model: nn.Module, tokens: int, logits_tokens: int | None = None) -> int:
    """Prefill FLOPs of a causal LM; the LM head counts for `logits_tokens` positions (all by default)."""
    config = language_model.config
    attention_dim = config.num_attention_heads * getattr(config, "head_dim", config.hidden_size // config.num_attention_heads)
    body = transformer_flops(language_model, tokens, config.num_hidden_layers, attention_dim, exclude=("lm_head",))
    head = 2 * (tokens if logits_tokens is None else logits_tokens) * linear_macs(language_model.lm_head)
    return body + head


def on_meta(build):
    with torch.device("meta"):
        return build()
