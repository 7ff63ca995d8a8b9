"""Batches LlavaDataset samples: pads the text, concatenates the images of the batch.

Text: `input_ids` padded with the pad token, `labels` with -100, `attention_mask` 1 on real tokens; right padding for
training (the LM sees every sample from position 0), left padding available for batched generation.
Images: every other key is an image-step output with images on dim 0 (`pixel_values`, `image_sizes`, a method's extra
inputs); the batch holds the images of all samples in sample order, which is the order of their placeholders in the
batch, as the model's splice expects. Tensors whose trailing shapes differ (e.g. AnyRes images with different crop
counts: (1, crops, 3, H, W)) are zero-padded to the largest shape first (the pipeline reads each image's real extent
from `image_sizes`). Lists are concatenated. Text-only samples add no image.
"""

import torch

from .templates import IGNORE_INDEX


def pad_and_concat(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Concatenates on dim 0 after zero-padding every other dim to the largest size."""
    if len({t.dim() for t in tensors}) != 1:
        raise ValueError(f"cannot batch image tensors of different ranks: {[tuple(t.shape) for t in tensors]}")
    target = [max(t.shape[d] for t in tensors) for d in range(1, tensors[0].dim())]
    padded = []
    for tensor in tensors:
        if list(tensor.shape[1:]) != target:
            out = tensor.new_zeros((tensor.shape[0], *target))
            out[(slice(None), *(slice(0, s) for s in tensor.shape[1:]))] = tensor
            tensor = out
        padded.append(tensor)
    return torch.cat(padded, dim=0)


class MultiGranCollator:
    """Samples {"input_ids", "labels", image-step outputs...} -> a batch for the model's forward.

    Args:
        pad_token_id: the tokenizer's pad id (its eos id when it has no pad token).
        padding_side: "right" (training) or "left" (generation).
        pad_to_multiple_of: round the padded length up (tensor-core friendly lengths on GPU).
    """

    def __init__(self, pad_token_id: int, padding_side: str = "right", pad_to_multiple_of: int | None = None):
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if pad_token_id is None:
            raise ValueError("the tokenizer has no pad token and no eos token to pad with")
        self.pad_token_id = pad_token_id
        self.padding_side = padding_side
        self.pad_to_multiple_of = pad_to_multiple_of

    @classmethod
    def from_tokenizer(cls, tokenizer, **kwargs):
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return cls(pad, **kwargs)

    def __call__(self, samples: list[dict]) -> dict:
        if not samples:
            raise ValueError("cannot collate an empty batch")
        length = max(len(s["input_ids"]) for s in samples)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(samples), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(samples), length), dtype=torch.long)
        for row, sample in enumerate(samples):
            n = len(sample["input_ids"])
            span = slice(0, n) if self.padding_side == "right" else slice(length - n, length)
            input_ids[row, span] = torch.as_tensor(sample["input_ids"])
            attention_mask[row, span] = 1
            if "labels" in sample:
                labels[row, span] = torch.as_tensor(sample["labels"])
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if any("labels" in s for s in samples):
            batch["labels"] = labels

        image_keys = sorted({key for s in samples for key in s} - {"input_ids", "labels", "attention_mask"})
        for key in image_keys:
            values = [s[key] for s in samples if key in s]
            if all(torch.is_tensor(v) for v in values):
                batch[key] = pad_and_concat(values)
            elif all(isinstance(v, (list, tuple)) for v in values):
                batch[key] = [item for value in values for item in value]
            else:
                raise TypeError(f"cannot batch {key!r}: expected tensors (images on dim 0) or lists, got "
                                f"{sorted({type(v).__name__ for v in values})}")
        return batch


__all__ = ["MultiGranCollator", "pad_and_concat"]
