"""Dynamic batching: one model thread prefills each request on its own and decodes all of them together.

A request's prefill (vision tower, visual pipeline, router, LM over the prompt) runs alone, with exactly the inputs
`model.generate` would get for that single request, so the router's choice, the visual-token count and the first
token do not depend on what else is being served. Its KV cache then joins one shared, left-padded cache and every
step feeds one token per row through the LM: each row keeps its own position, sampling settings, seed and stop
condition, and leaves the batch the step it finishes (or its client goes away), freeing its slot for a waiting
request.
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
        self.cache = None  # DynamicCache holding (B, H, T, d) per layer, rows left-padded to a common T
        self.mask = None  # (B, T) long: 1 where a row has a real cached token
        self.next_tokens: list[int] = []  # per row, the token the next step feeds
        self.stopping = False
        self.steps = 0  # decode steps run
        self.peak_rows = 0  # most rows one step has decoded together
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
        return {"running": len(self.rows), "waiting": len(self.waiting), "max_batch_size": self.max_batch_size,
                "max_queue": self.max_queue, "steps": self.steps, "peak_rows": self.peak_rows}

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
                for job in admitted:
                    if not job.cancelled:
                        self.prefill(job)
                self.drop_cancelled()
                if self.rows:
                    self.step()

    def prefill(self, job: Job):
        """Runs the request alone through the model (images, router, prompt) and adds its rows to the batch."""
        try:
            inputs = job.inputs.to(self.device)
            out = self.model(**inputs, **job.visual_options, use_cache=True, logits_to_keep=1)
            prompt_tokens = out.cache.get_seq_length()
            counts = out.image_token_counts or []
            report = out.visual_report or [{} for _ in counts]
            report = [{**entry, "visual_tokens": count} for entry, count in zip(report, counts)]
            job.emit(("prefilled", {"prompt_tokens": prompt_tokens, "visual_tokens": sum(counts),
                                    "visual_report": report}))
            rows = [
                Row(job, i, prompt_tokens, self.generator(job.sampling.seed, i), self.tokenizer, self.eos_ids,
                    self.context_length)
                for i in range(job.n)
            ]
            logits = out.logits[:, -1].expand(job.n, -1)  # (n, V): the choices share the prefill
            first = choose_tokens(logits, rows)
        except Exception as error:  # reported to this request only; the batch goes on
            if not isinstance(error, (ValueError, TypeError)):
                logger.exception("prefill failed")
            job.emit(("error", error))
            return
        live = [(row, token) for row, token in zip(rows, first) if not row.accept(token)]
        if live:
            self.join(out.cache, prompt_tokens, [r for r, _ in live], [t for _, t in live])

    def generator(self, seed, index):
        generator = torch.Generator(device=self.device)
        generator.manual_seed((seed + index) % (1 << 63) if seed is not None else secrets.randbits(63))
        return generator

    def join(self, cache, length: int, rows: list[Row], tokens: list[int]):
        """Adds rows whose prompts fill `cache` ((1, H, length, d) per layer) to the shared batch."""
        n = len(rows)
        if self.cache is None:
            for layer in cache.layers:
                layer.keys, layer.values = layer.keys.expand(n, -1, -1, -1), layer.values.expand(n, -1, -1, -1)
            self.cache = cache
            self.mask = torch.ones(n, length, dtype=torch.long, device=self.device)
        else:
            width = max(self.mask.shape[1], length)
            for old, new in zip(self.cache.layers, cache.layers):
                old.keys = torch.cat([pad_cache_left(old.keys, width),
                                      pad_cache_left(new.keys, width).expand(n, -1, -1, -1)])
                old.values = torch.cat([pad_cache_left(old.values, width),
                                        pad_cache_left(new.values, width).expand(n, -1, -1, -1)])
            fresh = torch.ones(n, length, dtype=torch.long, device=self.device)
            self.mask = torch.cat([F.pad(self.mask, (width - self.mask.shape[1], 0)),
                                   F.pad(fresh, (width - length, 0))])
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
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[index, :, start:], layer.values[index, :, start:]
        self.rows = [self.rows[b] for b in keep]
        self.next_tokens = [self.next_tokens[b] for b in keep]


def check_cache_layout(model):
    """The shared cache pads rows on the left: every layer must be a plain full-attention DynamicLayer."""
    layers = DynamicCache(config=model.config.get_text_config(decoder=True)).layers
    odd = sorted({type(layer).__name__ for layer in layers if type(layer) is not DynamicLayer})
    if odd:
        raise ValueError(f"multigran serve batches full-attention KV caches only; this language model's cache has "
                         f"{odd} layers (sliding-window or linear attention)")

