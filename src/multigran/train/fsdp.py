"""FSDP2 sharding of a multigran model exactly as `accelerate launch --config_file recipes/fsdp/fsdp2.yaml` applies it,
on any device, CPU processes with gloo included.

accelerate engages FSDP only for multi-accelerator runs (on CPU processes it trains plain DDP, which the Trainer
refuses: `trainer.check_fsdp_engaged`). PyTorch's FSDP2 (`torch.distributed.fsdp.fully_shard`) itself runs on CPU with
gloo, so `shard_fsdp2` calls accelerate's own FSDP2 preparation (`fsdp2_prepare_model`: the transformer-layer auto-wrap
policy, the embedding and output-head units, the root unit, rank-0 loading with `cpu_ram_efficient_loading`) on the
model, with the plugin accelerate builds from the launch config. Use it to check FSDP training on CPU, or to drive an
FSDP2 training loop of your own; `accelerate launch` on GPUs does the same thing inside the Trainer.
"""

import os

import torch


class _PreparationContext:
    """The few attributes of an `Accelerator` that `fsdp2_prepare_model` / `fsdp2_apply_ac` read.

    accelerate's `AcceleratorState` keeps the FSDP plugin only for accelerator runs, so a CPU run cannot hand a real
    Accelerator to these functions; this carries the same values.
    """

    class _State:
        def __init__(self, fsdp_plugin):
            self.fsdp_plugin = fsdp_plugin

    def __init__(self, fsdp_plugin, device, mixed_precision: str):
        self.state = self._State(fsdp_plugin)
        self.device = device
        self.is_main_process = torch.distributed.get_rank() == 0
        self.mixed_precision = mixed_precision
        self.torch_device_mesh = None  # the default 1-D mesh over all ranks, as accelerate without parallelism_config


def fsdp2_wrapped_classes(model, fsdp_plugin) -> list[str]:
    """Names of the module classes that get their own FSDP unit under `fsdp_plugin`'s auto-wrap policy.

    The transformer-based policy wraps the plugin's `transformer_cls_names_to_wrap` or, when unset, the model's
    `_no_split_modules` (for a multigran model: its vision tower's and LLM's layer classes, gathered by transformers).
    Raises ValueError naming a class that the config asks for but the model does not contain.
    """
    from accelerate.utils.dataclasses import get_module_class_from_name

    names = fsdp_plugin.transformer_cls_names_to_wrap
    if names is None:
        names = sorted(n for n in (getattr(model, "_no_split_modules", None) or [])
                       if get_module_class_from_name(model, n) is not None)
    missing = [n for n in names if get_module_class_from_name(model, n) is None]
    if missing:
        present = sorted({type(m).__name__ for m in model.modules() if "Layer" in type(m).__name__})
        raise ValueError(
            f"fsdp_transformer_layer_cls_to_wrap names {missing}, not in this model; its layer classes are {present}"
        )
    return list(names)


def shard_fsdp2(model, fsdp_plugin=None, mixed_precision: str | None = None):
    """Shards `model` in place with FSDP2 as accelerate's FSDP2 path would, and returns it (now an `FSDPModule`).

    Args:
        model: the model to shard, its trainable parts already set (`set_trainable`); every rank passes the same
            weights (with `cpu_ram_efficient_loading`, rank 0's are broadcast).
        fsdp_plugin: accelerate's `FullyShardedDataParallelPlugin`; by default built from the environment that
            `accelerate launch` sets from its config file (`FSDP_*` variables).
        mixed_precision: "no", "bf16" or "fp16"; by default the launch config's (`ACCELERATE_MIXED_PRECISION`).

    Build the optimizer after sharding, from the model's (now sharded) parameters. The process group must exist.
    """
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_apply_ac, fsdp2_prepare_model

    if not torch.distributed.is_initialized():
        raise ValueError("shard_fsdp2 needs an initialised process group (torch.distributed.init_process_group)")
    fsdp_plugin = fsdp_plugin if fsdp_plugin is not None else FullyShardedDataParallelPlugin()
    if fsdp_plugin.fsdp_version != 2:
        raise ValueError(f"shard_fsdp2 applies FSDP2; the plugin asks for fsdp_version {fsdp_plugin.fsdp_version}")
    if mixed_precision is None:
        mixed_precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if mixed_precision != "no":
        fsdp_plugin.set_mixed_precision(mixed_precision)  # what AcceleratorState does for an FSDP run
    fsdp2_wrapped_classes(model, fsdp_plugin)  # a clear error for a wrong class name, before any sharding
    device = next(model.parameters()).device
    context = _PreparationContext(fsdp_plugin, device, mixed_precision)
    # The order of Accelerator._prepare_fsdp2: wrap policy, activation checkpointing, then sharding.
    fsdp_plugin.set_auto_wrap_policy(model)
    if fsdp_plugin.activation_checkpointing:
        model = fsdp2_apply_ac(context, model)
    return fsdp2_prepare_model(context, model)


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """The sharded model's full (gathered) state dict, on CPU, on every rank (a collective: call it on all ranks)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {name: tensor.detach().cpu().contiguous() for name, tensor in state.items()}


__all__ = ["shard_fsdp2", "fsdp2_wrapped_classes", "full_state_dict"]
