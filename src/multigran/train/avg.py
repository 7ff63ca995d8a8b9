"""AVG-LLaVA's training objectives, as losses of the training loop (`LOSSES[name](model, batch, **options)`), for any
model that carries the adaptive-granularity layer (method avg, or mg / uhd with `method_settings.adaptive_granularity`).

- stage 3, `multi_granularity_loss`: the usual answer CE at every granularity (every grid at it), averaged.
- stage 4, `rglf_training_loss`: RGLF. The frozen LMM answers each sample once per granularity (no grad), and the
  router learns to rank the granularities as the LMM's answer NLL does. Only the router gets gradient.
Both encode every image ONCE (`visual.encode_grids`: one vision pass, one projector pass) and pool that to each
granularity (`visual.assemble`).

Batches come from the collator with the method's placeholders: one per image for "auto", or a run at a fixed
granularity; each forward below resizes the runs to the granularity it evaluates.

Over-long samples: as the release does (`llava/model/llava_arch.py:426-430`, router text `:199-202`), every
per-granularity sequence is cut to its first `max_length` tokens (text and visual tokens; an image cut in the middle
keeps its first tokens) and training goes on; the `truncated_sequences` metric counts the cut sequences.
"""

import logging

import torch

from ..modeling import reexpand_image_tokens
from ..pipelines.granularity import images_to_samples
from .rglf import CE_WEIGHT, MARGIN_SCALE, RANK_WEIGHT, answer_nll, mean_granularity_loss, rglf_loss
from .trainer import unwrap

logger = logging.getLogger(__name__)
_warned_truncation = False


def resolve_max_length(model, max_length=None) -> int | None:
    """The length every per-granularity sequence is cut to: `max_length` (the release's tokenizer
    `model_max_length`, 4096 in its stage-3/4 scripts) or, when None, the language model's context."""
    context = unwrap(model).context_length
    if max_length is None:
        return context
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"loss option max_length must be a positive integer, got {max_length!r}")
    if context is not None and max_length > context:
        raise ValueError(f"loss option max_length={max_length} exceeds the language model's context of {context} "
                         "tokens (text_config.max_position_embeddings)")
    return max_length


def truncate_sequences(input_ids, attention_mask, labels, features, image_token_id, pad_token_id, max_length):
    """Cuts every row to its first `max_length` attended tokens, as the release does after splicing the images
    (`llava/model/llava_arch.py:426-430`); images lose the tokens that fall past the cut (an image cut in the middle
    keeps its first ones, one past it keeps none). Rows keep their padding side.

    input_ids/attention_mask/labels: (B, T) with each image's run of placeholders already at its final length;
    features: per image (tokens_i, D), in placeholder order. Returns (input_ids, attention_mask, labels, features,
    number of rows cut).
    """
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    lengths = mask.sum(dim=1)
    if max_length is None or int(lengths.max()) <= max_length:
        return input_ids, attention_mask, labels, features, 0
    left_padded = bool((~mask[:, 0]).any())
    kept_lengths = lengths.clamp(max=max_length)
    width = int(kept_lengths.max())
    out_ids = input_ids.new_full((input_ids.shape[0], width), pad_token_id)
    out_mask = torch.zeros_like(out_ids)
    out_labels = torch.full_like(out_ids, -100)
    kept_features, image = [], 0
    for row in range(input_ids.shape[0]):
        positions = mask[row].nonzero().squeeze(1)
        row_images = int((input_ids[row, positions] == image_token_id).sum())  # counted before the cut
        positions = positions[:max_length]
        length = positions.numel()
        span = slice(width - length, width) if left_padded else slice(0, length)
        out_ids[row, span] = input_ids[row, positions]
        out_mask[row, span] = 1
        out_labels[row, span] = labels[row, positions]
        budget = int((input_ids[row, positions] == image_token_id).sum())  # image tokens left in the row
        while row_images > 0:  # this row's images, in order
            take = min(features[image].shape[0], budget)
            kept_features.append(features[image][:take])
            budget -= take
            row_images -= features[image].shape[0]
            image += 1
    if image != len(features):
        raise ValueError(f"input_ids hold placeholders for {image} image(s) but {len(features)} were given")
    return out_ids, out_mask, out_labels, kept_features, int((lengths > max_length).sum())


def _note_truncation(count: int, max_length: int):
    global _warned_truncation
    if count and not _warned_truncation:
        _warned_truncation = True
        logger.warning("%d sequence(s) longer than %d tokens were cut to that length, as the release does; further "
                       "cuts are counted in the truncated_sequences metric", count, max_length)


def distributed(model) -> bool:
    """Whether the passes of a loss must run inside the model's own forward: DDP / FSDP1 / DeepSpeed wrap the model,
    FSDP2 shards it in place (its parameters are gathered only around the forward of a sharded module)."""
    from torch.distributed.fsdp import FSDPModule

    return unwrap(model) is not model or isinstance(model, FSDPModule)


def layer_of(model):
    """The bare model's visual pipeline and its adaptive-granularity layer; a clear error for a model without it."""
    visual = unwrap(model).visual
    if getattr(visual, "adaptive", None) is None:
        raise ValueError(
            f"this loss trains the adaptive-granularity layer, which this {unwrap(model).config.method!r} model does "
            "not have: use method avg, or add the layer to an mg / uhd model (multigran switch-method DIR OUT --to mg "
            "--settings '{\"adaptive_granularity\": {}}')"
        )
    return visual, visual.adaptive


def visual_inputs(visual, batch) -> dict:
    """The batch's method inputs (image_granularity, boxes, slice grids, ...) for the pipeline."""
    return {name: batch[name] for name in visual.input_names if name in batch}


def encode_grids(model, batch):
    """Every image encoded once: (per image its (crops, n*n, D) grids, the pipeline's assembly context)."""
    core = unwrap(model)
    return core.visual.encode_grids(core.vision_tower, batch["pixel_values"], batch.get("image_sizes"),
                                    embed_tokens=core.get_input_embeddings(), **visual_inputs(core.visual, batch))


def _at_granularity(model, batch, grids, context, granularity, max_length=None):
    """Inputs with every image at one granularity: re-expanded ids/mask/labels and the assembled features, each row
    cut to `max_length` tokens; plus the number of rows cut."""
    model = unwrap(model)
    visual = model.visual
    features = visual.assemble(grids, context, [granularity] * len(grids))
    old = visual.placeholder_counts(batch.get("image_sizes"), **visual_inputs(visual, batch))
    input_ids, attention_mask, labels = reexpand_image_tokens(
        batch["input_ids"], batch.get("attention_mask"), batch["labels"], old, [f.shape[0] for f in features],
        model.config.image_token_id, model.pad_token_id,
    )
    input_ids, attention_mask, labels, features, cut = truncate_sequences(
        input_ids, attention_mask, labels, features, model.config.image_token_id, model.pad_token_id, max_length,
    )
    _note_truncation(cut, max_length)
    return input_ids, attention_mask, labels, features, cut


def multi_granularity_loss(model, batch, max_length=None, inside_forward=False, **unused):
    """Stage 3: mean over the granularities of the answer CE. Returns (loss, metrics).

    max_length: each per-granularity sequence is cut to it (None: the LM's context), as the release does. A
    granularity whose batch has no answer token left after the cut is left out of the mean (the release's loss would
    be NaN); when none is left, the loss is a zero that keeps the graph.
    """
    if distributed(model) and not inside_forward:  # DDP / FSDP: every pass inside the model's forward
        return model(compute=lambda core: multi_granularity_loss(core, batch, max_length, inside_forward=True))
    if batch.get("pixel_values") is None:  # a text-only batch: the plain LM loss
        return model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                     labels=batch["labels"]).loss, {}
    _, layer = layer_of(model)  # attributes from the bare model; forwards through the (possibly wrapped) one
    max_length = resolve_max_length(model, max_length)
    grids, context = encode_grids(model, batch)
    losses, visual_tokens, truncated, metrics = [], 0, 0, {}
    for granularity in layer.level_tokens:
        input_ids, attention_mask, labels, features, cut = _at_granularity(model, batch, grids, context, granularity,
                                                                          max_length)
        output = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, image_features=features)
        if bool((labels[:, 1:] != -100).any()):
            losses.append(output.loss)
            metrics[f"loss_g{granularity}"] = float(output.loss.detach())
        elif not losses and granularity == layer.level_tokens[-1]:
            losses.append(output.logits.sum() * 0.0)  # nothing to learn in this batch; the graph stays whole
        visual_tokens += sum(f.shape[0] for f in features)
        truncated += cut
    metrics["visual_tokens"] = visual_tokens  # what the LM read: the placeholders count one per image in auto mode
    metrics["truncated_sequences"] = truncated
    return mean_granularity_loss(losses), metrics


@torch.no_grad()
def granularity_nll(model, batch, grids, context, max_length=None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per sample and granularity, the frozen LMM's mean answer NLL and the sample's visual tokens: two
    (batch, levels) tensors, and the number of sequences cut to `max_length`. One forward per level. A sample whose
    answer was cut away entirely at a level gets NaN there."""
    columns, tokens, truncated = [], [], 0
    core = unwrap(model)
    for granularity in core.visual.adaptive.level_tokens:
        input_ids, attention_mask, labels, features, cut = _at_granularity(model, batch, grids, context, granularity,
                                                                          max_length)
        logits = model(input_ids=input_ids, attention_mask=attention_mask, image_features=features).logits
        columns.append(answer_nll(logits, labels))
        tokens.append((input_ids == core.config.image_token_id).sum(dim=1))
        truncated += cut
    return torch.stack(columns, dim=1), torch.stack(tokens, dim=1).float(), truncated


def rglf_training_loss(model, batch, ce_weight=CE_WEIGHT, rank_weight=RANK_WEIGHT, margin_scale=MARGIN_SCALE,
                       token_cost=0.0, max_length=None, inside_forward=False, **unused):
    """Stage 4 (RGLF): router logits from the unpooled features and the instruction (answers masked out), ranked
    against the LMM's per-granularity NLL. A sample's images share its NLL, so its logits are their mean.
    Samples without an image, or without answer tokens at some level (after the cut to `max_length`, None: the LM's
    context), do not count (the release's loss would be NaN). Returns (loss, metrics).

    token_cost (beyond the paper; 0 = RGLF as published): nats per 1000 visual tokens added to each level's NLL before
    ranking, so that when the LMM answers equally well at several levels the cheaper one ranks first. Without it the
    ranking among near-tied levels (e.g. every level for a question about the background colour) is noise.
    """
    if distributed(model) and not inside_forward:  # DDP / FSDP: every pass inside the model's forward
        return model(compute=lambda core: rglf_training_loss(core, batch, ce_weight, rank_weight, margin_scale,
                                                             token_cost, max_length, inside_forward=True))
    core = unwrap(model)
    visual, layer = layer_of(model)
    if visual.router is None:
        raise ValueError("RGLF trains the granularity router, and this model has none (use_router: false): build it "
                         "with use_router: true")
    if batch.get("pixel_values") is None:
        zero = sum(p.sum() for p in visual.router.parameters()) * 0.0  # keeps DDP's graph whole
        return zero, {"rglf_samples": 0}
    input_ids, labels = batch["input_ids"], batch["labels"]
    max_length = resolve_max_length(model, max_length)
    with torch.no_grad():  # everything but the router is frozen: its inputs carry no graph
        grids, context = encode_grids(model, batch)
        nll, tokens, truncated = granularity_nll(model, batch, grids, context, max_length)  # (B, levels) each
        target = nll + token_cost * tokens / 1000
        instruction = core.embed_text(input_ids)
    old = visual.placeholder_counts(batch.get("image_sizes"), **visual_inputs(visual, batch))
    owners = images_to_samples(input_ids, core.config.image_token_id, old)
    logits = layer.route(visual.router, grids, owners, input_ids, instruction, batch.get("attention_mask"), labels,
                         max_length=max_length)
    owner_index = torch.tensor(owners, device=logits.device)
    per_sample = logits.new_zeros(input_ids.shape[0], logits.shape[1]).index_add(0, owner_index, logits)
    images_per_sample = torch.bincount(owner_index, minlength=input_ids.shape[0])
    keep = (images_per_sample > 0) & torch.isfinite(target).all(dim=1)
    if not keep.any():
        return logits.sum() * 0.0, {"rglf_samples": 0, "truncated_sequences": truncated}
    per_sample = per_sample[keep] / images_per_sample[keep, None]
    parts = rglf_loss(per_sample, target[keep], ce_weight, rank_weight, margin_scale, return_parts=True)
    best = target[keep].argmin(dim=1)
    metrics = {"rglf_ce": float(parts["ce"].detach()), "rglf_rank": float(parts["rank"].detach()),
               "rglf_samples": int(keep.sum()),
               "router_top1_agreement": float((per_sample.argmax(dim=1) == best).float().mean()),
               "visual_tokens": int(tokens.sum()),  # read by the frozen LMM over its forwards at every level
               "truncated_sequences": truncated}
    return parts["loss"], metrics
