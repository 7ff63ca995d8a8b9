"""AVG-LLaVA's training objectives, as losses of the training loop (`LOSSES[name](model, batch, **options)`).

- stage 3, `multi_granularity_loss`: the usual answer CE at every granularity (every crop at it), averaged.
- stage 4, `rglf_training_loss`: RGLF. The frozen LMM answers each sample once per granularity (no grad), and the
  router learns to rank the granularities as the LMM's answer NLL does. Only the router gets gradient.
Both encode every image ONCE (one vision-tower pass, one projector pass) and pool that to each granularity.

Batches come from the collator with the method's placeholders: one per image for "auto", or a run at a fixed
granularity; each forward below resizes the runs to the granularity it evaluates.
"""

import torch

from ..modeling import reexpand_image_tokens
from ..pipelines.avg import images_to_samples
from .rglf import CE_WEIGHT, MARGIN_SCALE, RANK_WEIGHT, answer_nll, mean_granularity_loss, rglf_loss
from .trainer import unwrap


def _at_granularity(model, batch, crops, granularity):
    """Inputs with every image at one granularity: re-expanded ids/mask/labels and the merged features."""
    model = unwrap(model)
    visual = model.visual
    sizes = batch["image_sizes"].tolist()
    features = [visual.merge(c, s, granularity) for c, s in zip(crops, sizes)]
    old = visual.placeholder_counts(batch["image_sizes"], batch.get("image_granularity"))
    input_ids, attention_mask, labels = reexpand_image_tokens(
        batch["input_ids"], batch.get("attention_mask"), batch["labels"], old, [f.shape[0] for f in features],
        model.config.image_token_id, model.pad_token_id,
    )
    return input_ids, attention_mask, labels, features


def multi_granularity_loss(model, batch, **unused):
    """Stage 3: mean over the granularities of the answer CE. Returns (loss, metrics)."""
    if batch.get("pixel_values") is None:  # a text-only batch: the plain LM loss
        return model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                     labels=batch["labels"]).loss, {}
    core = unwrap(model)  # attributes from the bare model; forwards through the (possibly wrapped) one
    visual = core.visual
    crops = visual.encode_crops(core.vision_tower, batch["pixel_values"], batch["image_sizes"])
    losses, visual_tokens = [], 0
    for granularity in visual.level_tokens:
        input_ids, attention_mask, labels, features = _at_granularity(model, batch, crops, granularity)
        losses.append(model(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                            image_features=features).loss)
        visual_tokens += sum(f.shape[0] for f in features)
    metrics = {f"loss_g{g}": float(loss.detach()) for g, loss in zip(visual.level_tokens, losses)}
    metrics["visual_tokens"] = visual_tokens  # what the LM read: the placeholders count one per image in auto mode
    return mean_granularity_loss(losses), metrics


@torch.no_grad()
def granularity_nll(model, batch, crops) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample and granularity, the frozen LMM's mean answer NLL and the sample's visual tokens: two
    (batch, levels) tensors. One forward per level."""
    columns, tokens = [], []
    core = unwrap(model)
    for granularity in core.visual.level_tokens:
        input_ids, attention_mask, labels, features = _at_granularity(model, batch, crops, granularity)
        logits = model(input_ids=input_ids, attention_mask=attention_mask, image_features=features).logits
        columns.append(answer_nll(logits, labels))
        tokens.append((input_ids == core.config.image_token_id).sum(dim=1))
    return torch.stack(columns, dim=1), torch.stack(tokens, dim=1).float()


def rglf_training_loss(model, batch, ce_weight=CE_WEIGHT, rank_weight=RANK_WEIGHT, margin_scale=MARGIN_SCALE,
                       token_cost=0.0, **unused):
    """Stage 4 (RGLF): router logits from the unpooled features and the instruction (answers masked out), ranked
    against the LMM's per-granularity NLL. A sample's images share its NLL, so its logits are their mean.
    Samples without an image or without answer tokens do not count. Returns (loss, metrics).

    token_cost (beyond the paper; 0 = RGLF as published): nats per 1000 visual tokens added to each level's NLL before
    ranking, so that when the LMM answers equally well at several levels the cheaper one ranks first. Without it the
    ranking among near-tied levels (e.g. every level for a question about the background colour) is noise.
    """
    core = unwrap(model)
    visual = core.visual
    if batch.get("pixel_values") is None:
        zero = sum(p.sum() for p in visual.router.parameters()) * 0.0  # keeps DDP's graph whole
        return zero, {"rglf_samples": 0}
    input_ids, labels = batch["input_ids"], batch["labels"]
    with torch.no_grad():  # everything but the router is frozen: its inputs carry no graph
        crops = visual.encode_crops(core.vision_tower, batch["pixel_values"], batch["image_sizes"])
        nll, tokens = granularity_nll(model, batch, crops)  # (B, levels) each
        target = nll + token_cost * tokens / 1000
        instruction = core.embed_text(input_ids)
    old = visual.placeholder_counts(batch["image_sizes"], batch.get("image_granularity"))
    owners = images_to_samples(input_ids, core.config.image_token_id, old)
    logits = visual.route(crops, owners, input_ids, instruction, batch.get("attention_mask"), labels)
    owner_index = torch.tensor(owners, device=logits.device)
    per_sample = logits.new_zeros(input_ids.shape[0], logits.shape[1]).index_add(0, owner_index, logits)
    images_per_sample = torch.bincount(owner_index, minlength=input_ids.shape[0])
    keep = (images_per_sample > 0) & torch.isfinite(target).all(dim=1)
    if not keep.any():
        return logits.sum() * 0.0, {"rglf_samples": 0}
    per_sample = per_sample[keep] / images_per_sample[keep, None]
    parts = rglf_loss(per_sample, target[keep], ce_weight, rank_weight, margin_scale, return_parts=True)
    best = target[keep].argmin(dim=1)
    metrics = {"rglf_ce": float(parts["ce"].detach()), "rglf_rank": float(parts["rank"].detach()),
               "rglf_samples": int(keep.sum()),
               "router_top1_agreement": float((per_sample.argmax(dim=1) == best).float().mean()),
               "visual_tokens": int(tokens.sum())}  # read by the frozen LMM over its forwards at every level
    return parts["loss"], metrics
