"""Activation checkpointing of the visual pipelines' heavy modules, switched by `gradient_checkpointing_enable()`.

transformers' `gradient_checkpointing_enable()` sets `gradient_checkpointing = True` on every submodule that has the
attribute; a module that declares it (`gradient_checkpointing = False` as a class attribute) and runs its forward
through `checkpointed` then keeps no activations for the backward pass and recomputes them there.
"""

import torch
from torch.utils.checkpoint import checkpoint


def checkpointed(module: torch.nn.Module, function, *args):
    """function(*args), under activation checkpointing when it is switched on for `module` and a graph is built.

    Non-reentrant checkpointing, whatever the model-wide setting: pipeline inputs are nested lists and frozen features
    that need no gradient, through which reentrant checkpointing would not pass gradients to the module's weights.
    Dropout draws the same masks in the recomputation (the RNG state is restored).
    """
    if getattr(module, "gradient_checkpointing", False) and module.training and torch.is_grad_enabled():
        return checkpoint(function, *args, use_reentrant=False)
    return function(*args)


__all__ = ["checkpointed"]
