"""Dynamic batching: one model thread prefills the requests it admits together and decodes all of them together.

The requests admitted in one scheduler iteration that share their call-level visual options (`max_visual_tokens`,
`granularity_bias`: one value per pipeline call) are prefilled together: one pass of the vision tower, visual
pipeline and router over all their images (per-image settings, granularity or boxes, travel with the images as the
processor put them), then the LM over their left-padded prompts, in one pass unless their lengths differ so much that
padding costs more than a second pass (`length_groups`). Every row still gets exactly what `model.generate` computes
for its request alone: the router reads each prompt without the padding (padding positions reach it as zero vectors,
which its text filter treats like the empty slots of a short prompt alone), placeholders are re-expanded to the
chosen counts with the padding kept on the left, and each row's position ids count its own tokens only. A group that
fails (one request's bad options, say) runs again request by request, so an error reaches only the request it is
about.

Each prefilled row's KV cache slice then joins one shared, left-padded cache and every step feeds one token per row
through the LM: each row keeps its own position, sampling settings, seed and stop condition, and leaves the batch the
step it finishes (or its client goes away), freeing its slot for a waiting request.
"""

import logging
import secrets
import threading
from collections import deque
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from ..modeling import reexpand_image_tokens

logger = logging.getLogger("multigran.serve")


class QueueFull(Exception):
    """The waiting queue is at its limit (the server answers 429)."""


@dataclass
class Sampling:
    """One request's decoding settings (OpenAI semantics: temperature 0 = greedy)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None  # choice i samples from a generator seeded with seed + i


class Job:
    """One chat-completion request: its processor inputs, method options and `n` choices.

    `emit(event)` is called from the model thread with, in order: ("prefilled", info) once, then per choice
    ("text", index, delta) any number of times and ("finished", index, finish_reason, completion_tokens) once; or a
    single ("error", exception) when the request cannot be served (then nothing else follows).
    """

    def __init__(self, inputs, visual_options: dict, sampling: Sampling, n: int = 1, emit=None):
        self.inputs = inputs
        self.visual_options = visual_options
        self.sampling = sampling
        self.n = n
        self.emit = emit or (lambda event: None)
        self.cancelled = False  # set by the server when the client disconnects

    def cancel(self):
        self.cancelled = True


class Row:
    """One choice being decoded: its tokens, text sent so far and stop condition."""

    def __init__(self, job: Job, index: int, prompt_tokens: int, generator, tokenizer, eos_ids, context_length):
        self.job, self.index, self.generator, self.tokenizer = job, index, generator, tokenizer
        self.eos_ids = eos_ids
        self.token_ids: list[int] = []
        self.generated = 0  # tokens produced, the end-of-sequence token included
        self.position = prompt_tokens  # where the next fed token goes
        self.limit = job.sampling.max_tokens
        if context_length is not None:
            self.limit = min(self.limit, context_length - prompt_tokens)
        self.stops = tuple(job.sampling.stop)
        self.hold = max((len(s) for s in self.stops), default=1) - 1  # chars a stop string could still complete
        self.text, self.sent = "", 0
        self.prefix_offset = self.read_offset = 0  # incremental detokenization window
        self.finish_reason = None

    def detokenize(self, final: bool = False) -> str:
        """Text added since the last call; nothing while the tokens end inside a multi-byte character (decoded as
        U+FFFD), unless `final` (then U+FFFD, as a decode of the whole answer gives)."""
        decode = self.tokenizer.decode
        prefix = decode(self.token_ids[self.prefix_offset:self.read_offset], skip_special_tokens=True)
        text = decode(self.token_ids[self.prefix_offset:], skip_special_tokens=True)
        if len(text) > len(prefix) and (final or not text.endswith("\ufffd")):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
            return text[len(prefix):]
        return ""

    def accept(self, token: int) -> bool:
        """Takes the next token; emits the text that can no longer be part of a stop string; True once finished."""
        self.generated += 1
        if token in self.eos_ids:
            return self.finish("stop")
        self.token_ids.append(token)
        before = len(self.text)
        self.text += self.detokenize()
        if self.stops and len(self.text) > before:
            start = max(0, before - self.hold)
            hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
            if hits:
                self.text = self.text[:min(hits)]
                return self.finish("stop", flush=False)
        if self.generated >= self.limit:
            return self.finish("length")
        safe = len(self.text) - self.hold
        if safe > self.sent:
            self.job.emit(("text", self.index, self.text[self.sent:safe]))
            self.sent = safe
        return False

    def finish(self, reason: str, flush: bool = True) -> bool:
        if flush:  # the bytes still held back
            self.text += self.detokenize(final=True)
        if len(self.text) > self.sent:
            self.job.emit(("text", self.index, self.text[self.sent:]))
            self.sent = len(self.text)
        self.finish_reason = reason
        self.job.emit(("finished", self.index, reason, self.generated))
        return True


def choose_tokens(logits: torch.Tensor, rows: list[Row]) -> list[int]:
    """(B, V) logits -> one token per row: argmax for greedy rows, else temperature + top-p sampling with the row's
    own generator (so a seeded request draws the same tokens whatever shares the batch)."""
    tokens = logits.argmax(dim=-1).tolist()
    for b, row in enumerate(rows):
        sampling = row.job.sampling
        if sampling.temperature > 0:
            probs = (logits[b].float() / sampling.temperature).softmax(dim=-1)  # (V,)
            if sampling.top_p < 1.0:
                sorted_probs, order = probs.sort(descending=True)
                outside = sorted_probs.cumsum(0) - sorted_probs >= sampling.top_p  # the top token always stays
                sorted_probs = sorted_probs.masked_fill(outside, 0.0)
                tokens[b] = int(order[torch.multinomial(sorted_probs, 1, generator=row.generator)])
            else:
                tokens[b] = int(torch.multinomial(probs, 1, generator=row.generator))
    return tokens


def pad_cache_left(tensor: torch.Tensor, length: int) -> torch.Tensor:
    """(B, H, T, d) -> (B, H, length, d) with zeros before the T cached positions (they are masked out)."""
    return F.pad(tensor, (0, 0, length - tensor.shape[-2], 0))


# Free positions a shared cache layer keeps after its last one: a decode step writes its new position there in place.
CACHE_ROOM = 64


class GrowingLayer(DynamicLayer):
    """A full-attention cache layer whose (B, H, T, d) keys and values are views into buffers with room after T.

    DynamicLayer appends by torch.cat, copying the whole cache every step (at 16 rows of ~250 positions in a 512-wide,
    6-layer LM, ~100 MB per step: as much time as the step's own compute on a CPU core); here a step writes its one
    position, and the buffers are copied only when they are full (every CACHE_ROOM steps) or when rows join or leave.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.store(keys, values)

    def store(self, keys: torch.Tensor, values: torch.Tensor, room: int | None = None):
        """Fresh buffers holding these (B, H, T, d) keys and values, with `room` (CACHE_ROOM) free positions after."""
        length = keys.shape[-2]
        shape = (*keys.shape[:2], length + (CACHE_ROOM if room is None else room), keys.shape[-1])
        self.key_buffer, self.value_buffer = keys.new_empty(shape), values.new_empty(shape)
        self.key_buffer[:, :, :length], self.value_buffer[:, :, :length] = keys, values
        self.device, self.dtype, self.is_initialized = keys.device, keys.dtype, True
        self.keys, self.values = self.key_buffer[:, :, :length], self.value_buffer[:, :, :length]

    def update(self, key_states, value_states, *args, **kwargs):
        length, new = self.keys.shape[-2], key_states.shape[-2]
        if length + new > self.key_buffer.shape[-2]:  # full: fresh buffers with room for these and CACHE_ROOM more
            self.store(self.keys, self.values, room=new + CACHE_ROOM)
        self.key_buffer[:, :, length:length + new] = key_states
        self.value_buffer[:, :, length:length + new] = value_states
        self.keys = self.key_buffer[:, :, :length + new]
        self.values = self.value_buffer[:, :, :length + new]
        return self.keys, self.values


def growing_cache(cache: DynamicCache, keys: list[torch.Tensor], values: list[torch.Tensor]) -> DynamicCache:
    """`cache` with its layers replaced by GrowingLayers holding these (B, H, T, d) keys and values, one per layer."""
    cache.layers = [GrowingLayer(k, v) for k, v in zip(keys, values)]
    return cache


PROMPT_FIELDS = ("input_ids", "attention_mask")  # per prompt; every other processor output is per image

# What one more LM prefill pass costs, counted in prompt tokens: prompts are split into passes of similar lengths
# where the padding a common pass needs would cost more. Padding is real work where prefill is compute-bound (a CPU:
# a batch of prompts of 20 to 370 tokens padded to one length computes about 2.5x the tokens it holds).
PASS_COST_TOKENS = 128


def length_groups(lengths: list[int], pass_cost: int) -> list[list[int]]:
    """Rows (by index) in LM passes of similar prompt lengths, minimising sum over passes of (pass_cost + rows x
    longest prompt), the tokens a left-padded pass computes; each pass lists its rows in their original order."""
    order = sorted(range(len(lengths)), key=lambda b: lengths[b])
    best, cut = [0] + [None] * len(order), [0] * (len(order) + 1)  # best[j]: cost of the j shortest rows
    for j in range(1, len(order) + 1):
        for i in range(j):  # the pass holding sorted rows i..j-1 is padded to the longest, row j-1
            cost = best[i] + pass_cost + (j - i) * lengths[order[j - 1]]
            if best[j] is None or cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], len(order)
    while j:
        groups.append(sorted(order[cut[j]:j]))
        j = cut[j]
    return groups[::-1]


def batch_key(job: Job):
    """Requests with equal keys can share one prefill: the same processor fields (all tensors: images are joined
    along their first axis) and the same call-level visual options (the pipeline takes one value per call)."""
    if not all(torch.is_tensor(value) for value in job.inputs.values()):
        return id(job)  # nothing to join it with: prefilled alone
    return tuple(sorted(job.inputs.keys())), repr(sorted(job.visual_options.items()))


def concat_image_inputs(per_job: list[dict]) -> dict:
    """Per-image processor outputs of several requests -> one batch, images in request order.

    Each field is (images, ...) and is padded with zeros to the largest trailing shape, the processors' own convention
    (AnyRes pads the crop axis, UHD the view axis and view sizes, MG-LLaVA the box axis; the real extent is read from
    image_sizes / view_sizes / box_counts, so the padding is never seen).
    """
    joined = {}
    for name in per_job[0]:
        tensors = [inputs[name] for inputs in per_job]
        if tensors[0].dim() == 0:
            raise ValueError(f"processor field {name!r} is a scalar, not one entry per image")
        shape = [max(sizes) for sizes in zip(*(t.shape[1:] for t in tensors))]
        padded = []
        for tensor in tensors:
            pad = []
            for size, target in zip(reversed(tensor.shape[1:]), reversed(shape)):
                pad += [0, target - size]  # F.pad lists the last axis first
            padded.append(F.pad(tensor, pad) if any(pad) else tensor)
        joined[name] = torch.cat(padded)
    return joined


class Scheduler:
    """The model thread: a FIFO queue of jobs, at most `max_batch_size` rows decoding, at most `max_queue` waiting."""

    def __init__(self, model, tokenizer, max_batch_size: int = 16, max_queue: int = 64):
        if max_batch_size < 1 or max_queue < 0:
            raise ValueError("max_batch_size must be >= 1 and max_queue >= 0")
        check_cache_layout(model)
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        eos = model.generation_config.eos_token_id
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        if tokenizer.eos_token_id is not None:
            eos.append(tokenizer.eos_token_id)
        self.eos_ids = frozenset(eos)
        self.context_length = model.context_length
        self.device = model.device
        self.waiting: deque[Job] = deque()
        self.condition = threading.Condition()
        self.rows: list[Row] = []
        self.cache = None  # DynamicCache of GrowingLayers, (B, H, T, d) per layer, rows left-padded to a common T
        self.mask = None  # (B, T) long: 1 where a row has a real cached token
        self.next_tokens: list[int] = []  # per row, the token the next step feeds
        self.stopping = False
        self.steps = 0  # decode steps run
        self.peak_rows = 0  # most rows one step has decoded together
        self.prefills = 0  # prefills run (one vision pass for a group of admitted requests)
        self.peak_prefill_rows = 0  # most prompts one prefill has held
        self.lm_passes = 0  # LM passes of those prefills (prompts of very different lengths take separate ones)
        self.peak_pass_rows = 0  # most prompts one LM pass has held
        self.thread = threading.Thread(target=self.run, name="multigran-scheduler", daemon=True)

    # -- the server side (any thread) ---------------------------------------------------------------------------

    def start(self):
        self.thread.start()

    def submit(self, job: Job):
        if job.n > self.max_batch_size:
            raise ValueError(f"n={job.n} is above this server's batch size {self.max_batch_size}")
        with self.condition:
            if self.stopping:
                raise QueueFull("the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are already waiting (--max-queue {self.max_queue})")
            self.waiting.append(job)
            self.condition.notify()

    def stop(self, timeout: float | None = None):
        """Finishes every queued and running request, then ends the model thread."""
        with self.condition:
            self.stopping = True
            self.condition.notify()
        if self.thread.is_alive():
            self.thread.join(timeout)

    def stats(self) -> dict:
        # A row that has sent its last event counts as done even before the model thread drops it from the batch.
        running = sum(row.finish_reason is None and not row.job.cancelled for row in self.rows)
        return {"running": running, "waiting": len(self.waiting), "max_batch_size": self.max_batch_size,
                "max_queue": self.max_queue, "steps": self.steps, "peak_rows": self.peak_rows,
                "prefills": self.prefills, "peak_prefill_rows": self.peak_prefill_rows, "lm_passes": self.lm_passes,
                "peak_pass_rows": self.peak_pass_rows}

    # -- the model thread -----------------------------------------------------------------------------------------

    def run(self):
        with torch.inference_mode():
            while True:
                with self.condition:
                    while not self.waiting and not self.rows and not self.stopping:
                        self.condition.wait()
                    if self.stopping and not self.waiting and not self.rows:
                        return
                    admitted = []
                    while self.waiting and len(self.rows) + sum(j.n for j in admitted) + self.waiting[0].n <= \
                            self.max_batch_size:
                        admitted.append(self.waiting.popleft())
                for group in self.prefill_groups([job for job in admitted if not job.cancelled]):
                    self.prefill(group)
                self.drop_cancelled()
                if self.rows:
                    self.step()

    def prefill_groups(self, jobs: list[Job]) -> list[list[Job]]:
        """The admitted jobs in groups that share one prefill pass (see `batch_key`), in arrival order, each at
        most `max_batch_size` prompts."""
        groups = {}
        for job in jobs:
            groups.setdefault(batch_key(job), []).append(job)
        return [group[start:start + self.max_batch_size]
                for group in groups.values() for start in range(0, len(group), self.max_batch_size)]

    def prefill(self, jobs: list[Job]):
        """Runs the jobs' prompts (images, router, text) through the model together and adds their rows to the
        batch; when that fails, each job runs alone so that the error reaches only the job it is about."""
        try:
            logits, parts, infos = self.forward_prompts(jobs)
            rows, first_of = [], []  # one Row per choice; first_of[b]: index of job b's first Row
            for job, info in zip(jobs, infos):
                first_of.append(len(rows))
                rows += [Row(job, i, info["prompt_tokens"], self.generator(job.sampling.seed, i), self.tokenizer,
                             self.eos_ids, self.context_length) for i in range(job.n)]
            prompt_of = [b for b, job in enumerate(jobs) for _ in range(job.n)]
            first = choose_tokens(logits[prompt_of], rows)  # (rows, V): the choices of a job share its prefill
        except Exception as error:
            if len(jobs) > 1:
                for job in jobs:
                    self.prefill([job])
                return
            if not isinstance(error, (ValueError, TypeError)):  # reported to this request only; the batch goes on
                logger.exception("prefill failed")
            jobs[0].emit(("error", error))
            return
        self.prefills += 1
        self.peak_prefill_rows = max(self.peak_prefill_rows, len(jobs))
        self.lm_passes += len(parts)
        self.peak_pass_rows = max([self.peak_pass_rows] + [len(members) for members, _, _ in parts])
        for job, info in zip(jobs, infos):
            job.emit(("prefilled", info))
        done = [row.accept(token) for row, token in zip(rows, first)]
        for members, cache, mask in parts:  # each LM pass's live rows join the batch with their cache rows
            live = [(rows[r], first[r], slot) for slot, b in enumerate(members)
                    for r in range(first_of[b], first_of[b] + jobs[b].n) if not done[r]]
            if live:
                self.join(cache, mask, *map(list, zip(*live)))

    def forward_prompts(self, jobs: list[Job]):
        """The jobs' prompts, left-padded to a common length, and all their images through the model: one pass of
        the vision side, then the LM over the prompts in as few passes as padding allows (`length_groups`).

        Returns the last prompt position's logits (G, V) in job order; per LM pass (its jobs, the cache ((g, H, T, d)
        per layer), the (g, T) mask of real tokens); per job what its client is told: prompt and visual tokens, the
        visual report per image.
        """
        model, device = self.model, self.device
        inputs = [job.inputs.to(device) for job in jobs]
        prompts = []
        for x in inputs:
            if x["input_ids"].shape[0] != 1:
                raise ValueError(f"a request holds one prompt, got input_ids of shape {tuple(x['input_ids'].shape)}")
            mask = x.get("attention_mask")
            prompts.append(x["input_ids"][0] if mask is None else x["input_ids"][0][mask[0].bool()])
        length = max(len(prompt) for prompt in prompts)
        ids = torch.full((len(prompts), length), model.pad_token_id, dtype=prompts[0].dtype, device=device)
        mask = torch.zeros((len(prompts), length), dtype=torch.long, device=device)
        for b, prompt in enumerate(prompts):  # (G, L): padding on the left, so every row's last token is at -1
            ids[b, length - len(prompt):] = prompt
            mask[b, length - len(prompt):] = 1

        images_per_job = [x["pixel_values"].shape[0] if "pixel_values" in x else 0 for x in inputs]
        features, report = [], []
        if sum(images_per_job):
            image_inputs = concat_image_inputs([{k: v for k, v in x.items() if k not in PROMPT_FIELDS}
                                                for x in inputs])
            pixel_values, image_sizes = image_inputs.pop("pixel_values"), image_inputs.pop("image_sizes", None)
            visual_inputs = {k: v for k, v in image_inputs.items() if k in model.visual.input_names}
            # The pipeline reads the prompts for the router: padding reaches it as zero vectors, the empty slots a
            # prompt alone leaves in the text filter, so the router's choice does not depend on the batch.
            text = model.embed_text(ids)  # (G, L, D)
            text = text * mask[..., None].to(text.dtype)
            features = model.get_image_features(
                pixel_values, image_sizes, input_ids=ids, inputs_embeds=text, attention_mask=mask,
                **visual_inputs, **jobs[0].visual_options,
            )
            report = model.visual_report(features)
            counts = [f.shape[0] for f in features]
            if int((ids == model.config.image_token_id).sum()) != sum(counts):
                # The pipeline settled the counts (the AVG router in "auto" mode): resize each image's placeholder
                # run, keeping the padding on the left (the model's forward would re-pad a batch with no padding
                # on the right and drop position ids).
                placeholders = model.visual.placeholder_counts(image_sizes, **visual_inputs)
                ids, mask, _ = reexpand_image_tokens(ids, mask, None, placeholders, counts,
                                                     model.config.image_token_id, model.pad_token_id,
                                                     padding_side="left")
        lengths = mask.sum(dim=1).tolist()
        first_image = [sum(images_per_job[:b]) for b in range(len(jobs))]
        logits, parts = [None] * len(jobs), []
        for members in length_groups(lengths, PASS_COST_TOKENS):
            index = torch.tensor(members, device=device)
            width = max(lengths[b] for b in members)
            part_ids, part_mask = ids[index, -width:], mask[index, -width:]  # (g, width)
            positions = (part_mask.cumsum(-1) - 1).masked_fill(part_mask == 0, 0)  # each row counts its own tokens
            part_features = [f for b in members for f in features[first_image[b]:first_image[b] + images_per_job[b]]]
            out = model(input_ids=part_ids, attention_mask=part_mask, position_ids=positions,
                        image_features=part_features or None, use_cache=True, logits_to_keep=1)
            for slot, b in enumerate(members):
                logits[b] = out.logits[slot, -1]
            parts.append((members, out.cache, part_mask))
        infos = []
        for b, images in enumerate(images_per_job):
            entries = report[first_image[b]:first_image[b] + images]
            infos.append({"prompt_tokens": lengths[b], "visual_report": entries,
                          "visual_tokens": sum(entry["visual_tokens"] for entry in entries)})
        return torch.stack(logits), parts, infos

    def generator(self, seed, index):
        generator = torch.Generator(device=self.device)
        generator.manual_seed((seed + index) % (1 << 63) if seed is not None else secrets.randbits(63))
        return generator

    def join(self, cache, mask: torch.Tensor, rows: list[Row], tokens: list[int], sources: list[int]):
        """Adds rows to the shared batch: row i's prompt is row sources[i] of the prefill's `cache` ((G, H, T, d) per
        layer, left-padded as its (G, T) `mask`)."""
        index = torch.tensor(sources, device=self.device)
        mask = mask[index]
        start = int(mask.any(dim=0).long().argmax())  # columns before it pad only prompts that already finished
        mask = mask[:, start:]
        keys = [layer.keys[index, :, start:] for layer in cache.layers]
        values = [layer.values[index, :, start:] for layer in cache.layers]
        if self.cache is None:
            self.cache, self.mask = growing_cache(cache, keys, values), mask
        else:
            width = max(self.mask.shape[1], mask.shape[1])
            keys = [torch.cat([pad_cache_left(old.keys, width), pad_cache_left(new, width)])
                    for old, new in zip(self.cache.layers, keys)]
            values = [torch.cat([pad_cache_left(old.values, width), pad_cache_left(new, width)])
                      for old, new in zip(self.cache.layers, values)]
            self.cache = growing_cache(self.cache, keys, values)
            self.mask = torch.cat([F.pad(self.mask, (width - self.mask.shape[1], 0)),
                                   F.pad(mask, (width - mask.shape[1], 0))])
        self.rows += rows
        self.next_tokens += tokens

    def step(self):
        """Feeds every row its next token: (B, 1) ids over the (B, T) cache -> one new token per row."""
        rows = self.rows
        try:
            ids = torch.tensor(self.next_tokens, device=self.device)[:, None]  # (B, 1)
            positions = torch.tensor([row.position for row in rows], device=self.device)[:, None]  # (B, 1)
            self.mask = torch.cat([self.mask, self.mask.new_ones(len(rows), 1)], dim=1)  # (B, T + 1)
            out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=positions, cache=self.cache,
                             use_cache=True, logits_to_keep=1)
            tokens = choose_tokens(out.logits[:, -1], rows)
        except Exception as error:  # e.g. out of memory: fail the rows in flight, keep serving
            logger.exception("decode step failed")
            for job in {id(row.job): row.job for row in rows}.values():
                job.emit(("error", error))
            self.rows, self.next_tokens, self.cache, self.mask = [], [], None, None
            return
        self.steps += 1
        self.peak_rows = max(self.peak_rows, len(rows))
        keep = []
        for b, (row, token) in enumerate(zip(rows, tokens)):
            row.position += 1
            if not row.job.cancelled and not row.accept(token):
                keep.append(b)
        self.next_tokens = tokens
        self.select(keep)

    def drop_cancelled(self):
        keep = [b for b, row in enumerate(self.rows) if not row.job.cancelled]
        if len(keep) != len(self.rows):
            self.select(keep)

    def select(self, keep: list[int]):
        """Keeps only the rows `keep` and trims cache columns no remaining row uses."""
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.rows, self.next_tokens, self.cache, self.mask = [], [], None, None
            return
        index = torch.tensor(keep, device=self.device)
        mask = self.mask[index]
        start = int(mask.any(dim=0).long().argmax())  # first column some row still attends
        self.mask = mask[:, start:]
        self.cache = growing_cache(self.cache, [layer.keys[index, :, start:] for layer in self.cache.layers],
                                   [layer.values[index, :, start:] for layer in self.cache.layers])
        self.rows = [self.rows[b] for b in keep]
        self.next_tokens = [self.next_tokens[b] for b in keep]


def check_cache_layout(model):
    """The shared cache pads rows on the left: every layer must be a plain full-attention DynamicLayer."""
    layers = DynamicCache(config=model.config.get_text_config(decoder=True)).layers
    odd = sorted({type(layer).__name__ for layer in layers if type(layer) is not DynamicLayer})
    if odd:
        raise ValueError(f"multigran serve batches full-attention KV caches only; this language model's cache has "
                         f"{odd} layers (sliding-window or linear attention)")

