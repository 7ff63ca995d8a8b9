"""Training losses, chosen by name in a recipe (`loss: {name: lm, options: {...}}`).

The hook: `LOSSES[name](model, batch, **options) -> (loss, metrics)`.
- `model`: the model as the Trainer runs it (possibly wrapped by DDP / DeepSpeed / FSDP / peft: call it, do not
  reach into it; `multigran.train.trainer.unwrap(model)` gives the MultiGranForConditionalGeneration when needed).
- `batch`: the collated batch (input_ids, attention_mask, labels, pixel_values, image_sizes, method inputs).
- `options`: the recipe's `loss.options`, plus `num_items_in_batch` when the function declares that parameter: the
  number of target tokens in the whole accumulated batch (over gradient-accumulation steps and, by default, all
  ranks). A loss that uses it must return sum / num_items_in_batch (Hugging Face's gradient-accumulation-exact loss);
  a loss that does not declare it returns a per-batch mean and the Trainer divides by the accumulation steps.
- returns the scalar loss to backpropagate and a dict of float/0-d tensor metrics (averaged over the logging window
  and written to the metrics log, e.g. {"ce": ..., "rank": ...}).

Method losses (AVG-LLaVA's stage-3 multi-granularity loss, RGLF, ...) are registered here by name, as the function
or as a "module:function" string that is imported on first use (keeps this module light and free of cycles):
    LOSSES = {"lm": lm_loss, "rglf": "multigran.train.rglf:rglf_training_loss"}
"""

import importlib


def lm_loss(model, batch, num_items_in_batch=None):
    """Next-token cross-entropy on the answer tokens (labels != -100; image positions are always ignored)."""
    extra = {"num_items_in_batch": num_items_in_batch} if num_items_in_batch is not None else {}
    outputs = model(**batch, **extra)
    return outputs.loss, {}


LOSSES = {
    "lm": lm_loss,
    "avg_multi_granularity": "multigran.train.avg:multi_granularity_loss",  # AVG-LLaVA stage 3
    "rglf": "multigran.train.avg:rglf_training_loss",  # AVG-LLaVA stage 4
}


def get_loss(name: str):
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; available losses: {sorted(LOSSES)}")
    loss = LOSSES[name]
    if isinstance(loss, str):
        module, _, function = loss.partition(":")
        loss = getattr(importlib.import_module(module), function)
    return loss


__all__ = ["LOSSES", "lm_loss", "get_loss"]
