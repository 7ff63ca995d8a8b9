"""The HTTP side: FastAPI routes, OpenAI response and server-sent-event formats, errors as OpenAI error objects.

Request handlers parse and prepare (images, chat template, processor) in worker threads, hand a `Job` to the
`Scheduler`'s model thread and turn its events into a response. Nothing a client sends can produce a 500 with a
traceback: bad input is a 400 naming the field, a full queue a 429 with Retry-After.
"""

import asyncio
import copy
import json
import logging
import threading
import time
import uuid
from collections import deque
from contextlib import asynccontextmanager
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from ..processing import IMAGE_STEPS
from .media import MediaPolicy, load_request_image
from .scheduler import Job, QueueFull, Scheduler
from .schema import ModelInfo, RequestError, parse_chat_request

logger = logging.getLogger("multigran.serve")

DISCONNECT_POLL_S = 0.25  # how often a waiting non-streaming request checks that its client is still there


class Events:
    """The model thread's events for one request, handed to the event loop in batches: one loop wake-up per batch
    rather than per token, so a server decoding many rows spends its time decoding, not waking up."""

    def __init__(self, loop):
        self.loop, self.items, self.lock = loop, deque(), threading.Lock()
        self.wake_pending, self.ready = False, asyncio.Event()

    def emit(self, event):  # the model thread
        with self.lock:
            self.items.append(event)
            if self.wake_pending:
                return
            self.wake_pending = True
        self.loop.call_soon_threadsafe(self.wake)

    def wake(self):
        with self.lock:
            self.wake_pending = False
        self.ready.set()

    async def take(self) -> list:
        """Every event that has arrived (waits for at least one)."""
        while True:
            with self.lock:
                if self.items:
                    items = list(self.items)
                    self.items.clear()
                    return items
                self.ready.clear()
            await self.ready.wait()


def model_info(model, processor, name: str, max_batch_size: int, max_images: int, default_max_tokens: int):
    """What the model takes per request, read from the model itself (its processor step and pipeline inputs)."""
    import inspect

    method = model.config.method
    step = inspect.signature(IMAGE_STEPS[method]).parameters
    visual = getattr(model.visual, "input_names", ())
    layer = getattr(model.visual, "adaptive", None)  # the adaptive-granularity layer (avg; mg / uhd with it)
    levels = tuple(layer.level_tokens) if layer is not None else ()
    return ModelInfo(
        name=name, method=method,
        processor_options=frozenset(o for o in ("granularity", "boxes") if o in step and
                                    (o != "granularity" or layer is not None)),
        visual_options=frozenset(o for o in ("max_visual_tokens", "granularity_bias") if o in visual),
        levels=levels, auto=layer is not None and layer.settings.use_router,
        max_batch_size=max_batch_size, max_images=max_images, default_max_tokens=default_max_tokens,
    )


def render_prompt(processor, messages: list[dict]) -> str:
    if processor.chat_template:
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    # No template: each turn's images then its text, one turn per line (the CLI's single-turn convention).
    turns = []
    for message in messages:
        images = sum(part["type"] == "image" for part in message["content"])
        text = "".join(part.get("text", "") for part in message["content"])
        turns.append((processor.image_token + "\n") * images + text)
    return "\n".join(turns)


def processor_error(error: Exception, options: dict) -> RequestError:
    """A processor ValueError -> a 400 naming the field it is about."""
    message = str(error)
    if "context" in message:
        return RequestError(message, "messages", "context_length_exceeded")
    for name in ("boxes", "granularity"):
        if name in options and name in message:
            return RequestError(message, name)
    return RequestError(message, "messages")


def model_error(error: Exception, job_options: dict) -> RequestError:
    """An error of the model thread -> a 400 when it is about the request (ValueError), else a 500."""
    if isinstance(error, (ValueError, TypeError)):
        message = str(error)
        if "context" in message:
            return RequestError(message, "messages", "context_length_exceeded")
        param = next((name for name in job_options if name in message), None)
        return RequestError(message, param)
    return RequestError(f"the model failed on this request ({type(error).__name__}); see the server log", None,
                        "model_error", status=500, type="server_error")


def create_app(model, processor, *, model_name: str = "multigran", max_batch_size: int = 16, max_queue: int = 64,
               media: MediaPolicy | None = None, max_images: int = 8, default_max_tokens: int = 512,
               max_request_bytes: int = 64 << 20) -> FastAPI:
    """The server for one loaded model and its processor (`multigran serve` builds it from a directory)."""
    media = media or MediaPolicy()
    info = model_info(model, processor, model_name, max_batch_size, max_images, default_max_tokens)
    # The model thread decodes with its own tokenizer copy: a fast tokenizer refuses concurrent use.
    scheduler = Scheduler(model, copy.deepcopy(processor.tokenizer), max_batch_size, max_queue)
    processor_lock = threading.Lock()
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        yield
        await run_in_threadpool(scheduler.stop)  # after uvicorn has drained the open requests

    app = FastAPI(title="multigran", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scheduler, app.state.info = scheduler, info

    @app.exception_handler(RequestError)
    async def request_error(request, error: RequestError):
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request, error: HTTPException):
        body = RequestError(str(error.detail), None, str(error.status_code), error.status_code).body()
        return JSONResponse(body, status_code=error.status_code, headers=getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def server_error(request, error: Exception):
        logger.exception("unexpected error")
        error = RequestError(f"internal server error ({type(error).__name__})", None, "internal_error", 500,
                             "server_error")
        return JSONResponse(error.body(), status_code=500)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(resources.files(__package__).joinpath("page.html").read_text(encoding="utf-8"))

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": info.name, **scheduler.stats()}

    @app.get("/v1/models")
    async def models():
        card = {"id": info.name, "object": "model", "created": created, "owned_by": "multigran",
                "multigran": {"method": info.method, "granularities": info.granularities,
                              "options": sorted(info.processor_options | info.visual_options)}}
        return {"object": "list", "data": [card]}

    def refuse_when_full():
        if len(scheduler.waiting) >= scheduler.max_queue or scheduler.stopping:
            raise RequestError(f"the server is busy ({len(scheduler.waiting)} requests waiting): retry shortly",
                               None, "queue_full", 429, "rate_limit_error", headers={"Retry-After": "1"})

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_request_bytes:
            raise RequestError(f"the request body is {int(declared):,} bytes, above this server's limit of "
                               f"{max_request_bytes:,}", None, "request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_request_bytes:
                raise RequestError(f"the request body is above this server's limit of {max_request_bytes:,} bytes",
                                   None, "request_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    def prepare(parsed):
        """Images, chat template and processor (a worker thread): the model inputs of one request."""
        images = [load_request_image(url, param, media) for url, param in parsed.images]
        with processor_lock:
            try:
                prompt = render_prompt(processor, parsed.messages)
                return processor(images=images or None, text=prompt, **parsed.processor_options)
            except (ValueError, TypeError) as error:
                raise processor_error(error, parsed.processor_options) from None

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        refuse_when_full()
        parsed = parse_chat_request(await read_body(request), info)
        inputs = await run_in_threadpool(prepare, parsed)
        events = Events(asyncio.get_running_loop())
        job = Job(inputs, parsed.visual_options, parsed.sampling, parsed.n, emit=events.emit)
        try:
            scheduler.submit(job)
        except QueueFull as error:
            raise RequestError(f"the server is busy: {error}; retry shortly", None, "queue_full", 429,
                               "rate_limit_error", headers={"Retry-After": "1"}) from None
        options = {**parsed.processor_options, **parsed.visual_options}
        try:
            backlog = await next_events(events, request, job)
        except asyncio.CancelledError:
            job.cancel()
            raise
        if backlog is None:  # the client left while waiting
            return JSONResponse({}, status_code=499)
        first, backlog = backlog[0], backlog[1:]
        if first[0] == "error":
            raise model_error(first[1], options)
        for entry in first[1]["visual_report"]:
            if entry.get("router_probabilities") is not None:
                entry["levels"] = list(info.levels)  # what each probability is the probability of
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        if parsed.stream:
            return StreamingResponse(
                stream_events(first[1], backlog, events, job, parsed, completion_id, options),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return await collect(first[1], backlog, events, request, job, parsed, completion_id, options)

    async def next_events(events: Events, request: Request, job: Job):
        """The job's next events, or None (and the job cancelled) once the client has disconnected."""
        taking = asyncio.ensure_future(events.take())
        while True:
            done, _ = await asyncio.wait({taking}, timeout=DISCONNECT_POLL_S)
            if done:
                return taking.result()
            if await request.is_disconnected():
                taking.cancel()
                job.cancel()
                return None

    def usage(prefilled: dict, completion_tokens: int) -> dict:
        return {"prompt_tokens": prefilled["prompt_tokens"], "completion_tokens": completion_tokens,
                "total_tokens": prefilled["prompt_tokens"] + completion_tokens,
                # OpenAI's breakdown of the prompt: the visual tokens are its image tokens
                "prompt_tokens_details": {"image_tokens": prefilled["visual_tokens"],
                                          "text_tokens": prefilled["prompt_tokens"] - prefilled["visual_tokens"]}}

    async def collect(prefilled, backlog, events, request, job, parsed, completion_id, options):
        texts, reasons, tokens = [""] * parsed.n, [None] * parsed.n, [0] * parsed.n
        batch = backlog
        while True:
            for event in batch:
                if event[0] == "error":
                    raise model_error(event[1], options)
                if event[0] == "text":
                    texts[event[1]] += event[2]
                elif event[0] == "finished":
                    reasons[event[1]], tokens[event[1]] = event[2], event[3]
            if all(reason is not None for reason in reasons):
                break
            batch = await next_events(events, request, job)
            if batch is None:
                return JSONResponse({}, status_code=499)
        choices = [{"index": i, "message": {"role": "assistant", "content": texts[i]}, "finish_reason": reasons[i],
                    "logprobs": None} for i in range(parsed.n)]
        return {"id": completion_id, "object": "chat.completion", "created": int(time.time()), "model": info.name,
                "choices": choices, "usage": usage(prefilled, sum(tokens)),
                "visual_report": prefilled["visual_report"]}

    async def stream_events(prefilled, backlog, events, job, parsed, completion_id, options):
        created_at = int(time.time())

        def chunk(choices, **extra):
            body = {"id": completion_id, "object": "chat.completion.chunk", "created": created_at,
                    "model": info.name, "choices": choices, **extra}
            if parsed.include_usage and "usage" not in body:
                body["usage"] = None
            return f"data: {json.dumps(body)}\n\n"

        try:
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                          "logprobs": None} for i in range(parsed.n)], visual_report=prefilled["visual_report"])
            remaining, completion_tokens, batch, failed = parsed.n, 0, backlog, None
            while remaining and failed is None:
                # One chunk per choice for all the text that arrived together (a client reading slower than the
                # model decodes gets fewer, longer chunks), then the choices that finished.
                texts, finished = {}, []
                for event in batch:
                    if event[0] == "error":
                        failed = event[1]
                    elif event[0] == "text":
                        texts[event[1]] = texts.get(event[1], "") + event[2]
                    elif event[0] == "finished":
                        finished.append(event)
                for index, text in texts.items():
                    yield chunk([{"index": index, "delta": {"content": text}, "finish_reason": None,
                                  "logprobs": None}])
                for _, index, reason, tokens in finished:
                    remaining -= 1
                    completion_tokens += tokens
                    yield chunk([{"index": index, "delta": {}, "finish_reason": reason, "logprobs": None}])
                if remaining and failed is None:
                    batch = await events.take()
            if failed is not None:
                yield f"data: {json.dumps(model_error(failed, options).body())}\n\n"
            else:
                if parsed.include_usage:
                    yield chunk([], usage=usage(prefilled, completion_tokens))
            yield "data: [DONE]\n\n"
        finally:
            job.cancel()  # a client that went away frees its rows at the next step (no-op once finished)

    return app
