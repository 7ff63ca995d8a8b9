"""`multigran serve` end to end: a real uvicorn server on 127.0.0.1 with a tiny AVG model, driven by httpx, the
official `openai` client and a headless Chromium; every answer is checked against `model.generate` on the same
single request (a separate model instance, so the server's batches cannot influence it)."""

import base64
import io
import json
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
import uvicorn
from PIL import Image

from multigran.loading import load_model, load_processor
from multigran.serve.app import create_app
from multigran.serve.media import MediaPolicy
from multigran.tiny import build_tiny

MODEL = "tiny-avg"
MAX_TOKENS = 12
MAX_IMAGE_BYTES = 300_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """uvicorn in a thread, on a free loopback port."""

    def __init__(self, app):
        self.app = app
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(60)


def png(width, height, seed) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve_avg")
    build_tiny(path, method="avg", seed=0)
    return path


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("media")
    (path / "local.png").write_bytes(png(40, 40, 99))
    return path


@pytest.fixture(scope="module")
def served_model(model_dir):
    return load_model(model_dir, "cpu", "float32"), load_processor(model_dir)


@pytest.fixture(scope="module")
def server(served_model, media_dir):
    model, processor = served_model
    app = create_app(model, processor, model_name=MODEL, max_batch_size=8, max_queue=256,
                     media=MediaPolicy(allowed_local_path=str(media_dir), max_bytes=MAX_IMAGE_BYTES, timeout=2),
                     max_images=4, default_max_tokens=MAX_TOKENS)
    with Server(app) as running:
        yield running


@pytest.fixture(scope="module")
def reference(model_dir):
    """Answers of `model.generate` on one request at a time (greedy), from its own model instance."""
    model, processor = load_model(model_dir, "cpu", "float32"), load_processor(model_dir)
    cache = {}

    def answer(messages, images, max_tokens=MAX_TOKENS, granularity=None, **visual):
        key = json.dumps([messages, [hash(i) for i in images], max_tokens, granularity, visual], sort_keys=True)
        if key not in cache:
            prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
            options = {} if granularity is None else {"granularity": granularity}
            pil = [Image.open(io.BytesIO(i)).convert("RGB") for i in images]
            inputs = processor(images=pil or None, text=prompt, **options)
            with torch.no_grad():
                out = model.generate(**inputs, **visual, max_new_tokens=max_tokens, do_sample=False,
                                     return_dict_in_generate=True)
            tokens = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
            report = getattr(out, "visual_report", None) or []
            visual_tokens = sum(entry["visual_tokens"] for entry in report)
            placeholders = int((inputs["input_ids"] == model.config.image_token_id).sum())
            cache[key] = {
                "text": processor.tokenizer.decode(tokens, skip_special_tokens=True),
                "prompt_tokens": inputs["input_ids"].shape[1] - placeholders + visual_tokens,
                "visual_tokens": visual_tokens, "report": report,
            }
        return cache[key]

    return answer


# One request both ways: the OpenAI body (images as data URIs) and the reference's transformers messages.
def request(question, images=(), system=None, history=(), granularity=None, **fields):
    content = [{"type": "image_url", "image_url": {"url": data_uri(i)}} for i in images]
    content.append({"type": "text", "text": question})
    messages = ([{"role": "system", "content": system}] if system else []) + list(history)
    body = {"model": MODEL, "messages": messages + [{"role": "user", "content": content}], "temperature": 0,
            **fields}
    if granularity is not None:
        body["granularity"] = granularity
    ref_messages = [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in messages]
    ref_messages.append({"role": "user", "content": [{"type": "image"}] * len(images) +
                         [{"type": "text", "text": question}]})
    ref = {"messages": ref_messages, "images": list(images), "granularity": granularity,
           "max_tokens": fields.get("max_tokens", MAX_TOKENS)}
    ref.update({k: fields[k] for k in ("max_visual_tokens", "granularity_bias") if k in fields})
    return body, ref


def post(url, body, stream=False, timeout=120):
    with httpx.Client(timeout=timeout) as client:
        if not stream:
            return client.post(f"{url}/v1/chat/completions", json=body)
        with client.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True,
                                                                       "stream_options": {"include_usage": True}}) as r:
            lines = [line for line in r.iter_lines() if line]
            return r.status_code, lines


def stream_text(lines):
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    return text, chunks


IMAGES = {size: png(*size, seed=i) for i, size in enumerate([(40, 30), (90, 32), (32, 100), (64, 64), (120, 30),
                                                              (200, 150)])}


def mixed_requests():
    """Mixed image sizes, granularity options and prompt lengths (one multi-turn with two images)."""
    long_question = "The image shows a red square, a blue circle and a green triangle on a white background. " * 3
    history = [{"role": "user", "content": "Answer the question using a single word or phrase."},
               {"role": "assistant", "content": "Yes."}]
    return [
        request("What is shown in this image?", [IMAGES[(40, 30)]], granularity="auto"),
        request("How many objects are there?", [IMAGES[(90, 32)]], granularity=8),
        request(long_question + "Describe it.", [IMAGES[(32, 100)]], granularity="auto", granularity_bias=3.0),
        request("Left or right?", [IMAGES[(64, 64)]], granularity="auto", max_visual_tokens=40),
        request("Top", [IMAGES[(120, 30)]], granularity=64, max_tokens=20),
        request("Compare the two pictures.", [IMAGES[(200, 150)], IMAGES[(40, 30)]], system="A chat.",
                history=history, granularity="auto", max_tokens=7),
        request("No image here: say yes.", max_tokens=5),
        request("Bottom?", [IMAGES[(200, 150)]], max_tokens=16),  # the model's default granularity
    ]


def test_models_health_and_page(server):
    with httpx.Client() as client:
        models = client.get(f"{server.url}/v1/models").json()
        assert models["data"][0]["id"] == MODEL
        assert models["data"][0]["multigran"]["granularities"] == ["auto", 4, 8, 16, 32, 64]
        health = client.get(f"{server.url}/health").json()
        assert health["status"] == "ok" and health["max_batch_size"] == 8
        page = client.get(f"{server.url}/")
        assert page.status_code == 200 and 'id="granularity"' in page.text
        missing = client.get(f"{server.url}/v2/nothing")
        assert missing.status_code == 404 and set(missing.json()["error"]) == {"message", "type", "param", "code"}


def test_openai_client_plain_and_streamed(server, reference):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    image = IMAGES[(90, 32)]
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(image)}},
                                             {"type": "text", "text": "What is shown in this image?"}]}]
    expected = reference([{"role": "user", "content": [{"type": "image"},
                                                        {"type": "text", "text": "What is shown in this image?"}]}],
                         [image], granularity="auto")
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=MAX_TOKENS, temperature=0,
                                           extra_body={"granularity": "auto"})
    assert reply.choices[0].message.content == expected["text"]
    assert reply.choices[0].finish_reason in ("length", "stop")
    assert reply.usage.prompt_tokens == expected["prompt_tokens"]
    assert reply.usage.prompt_tokens_details.image_tokens == expected["visual_tokens"]
    assert reply.usage.completion_tokens <= MAX_TOKENS
    report = reply.model_extra["visual_report"]
    assert [r["granularity"] for r in report] == [r["granularity"] for r in expected["report"]]
    assert report[0]["mode"] == "auto" and report[0]["levels"] == [4, 8, 16, 32, 64]
    assert report[0]["router_probabilities"] == pytest.approx(expected["report"][0]["router_probabilities"],
                                                              abs=1e-5)

    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=MAX_TOKENS, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"granularity": "auto"})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected["text"]
    assert chunks[0].model_extra["visual_report"][0]["visual_tokens"] == expected["visual_tokens"]
    assert chunks[-1].usage.prompt_tokens == expected["prompt_tokens"] and not chunks[-1].choices
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("length", "stop")


def test_mg_llava_boxes_through_the_openai_client(tmp_path):
    """`boxes` (extra body) on an MG-LLaVA model: one object token per box, the answer of `model.generate` with the
    same boxes (its own model instance), and a box list that does not fit the images is a 400 naming `boxes`."""
    from openai import BadRequestError, OpenAI

    build_tiny(tmp_path, method="mg", seed=0)
    model, processor = load_model(tmp_path, "cpu", "float32"), load_processor(tmp_path)
    image, question, boxes = png(64, 48, 5), "Where is the dog?", [[2, 2, 30, 20], [10, 8, 60, 44]]
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
        add_generation_prompt=True)
    inputs = processor(images=[Image.open(io.BytesIO(image)).convert("RGB")], text=prompt, boxes=[boxes])
    with torch.no_grad():
        alone = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
    expected = processor.tokenizer.decode(alone[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

    served, served_processor = load_model(tmp_path, "cpu", "float32"), load_processor(tmp_path)
    with Server(create_app(served, served_processor, model_name="tiny-mg", max_batch_size=4, max_queue=8,
                           default_max_tokens=MAX_TOKENS)) as server:
        client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(image)}},
                                                 {"type": "text", "text": question}]}]
        reply = client.chat.completions.create(model="tiny-mg", messages=messages, max_tokens=MAX_TOKENS,
                                               temperature=0, extra_body={"boxes": [boxes]})
        assert reply.choices[0].message.content == expected
        assert reply.model_extra["visual_report"][0]["object_tokens"] == 2
        with pytest.raises(BadRequestError) as refused:
            client.chat.completions.create(model="tiny-mg", messages=messages, temperature=0,
                                           extra_body={"boxes": [boxes, boxes]})
        assert refused.value.body["param"] == "boxes"


def test_batched_greedy_answers_equal_generate(server, reference):
    requests = mixed_requests() * 2
    expected = [reference(**ref) for _, ref in requests]
    server.app.state.scheduler.peak_rows = 0

    def run(index):
        body, _ = requests[index]
        if index % 3 == 0:
            status, lines = post(server.url, body, stream=True)
            assert status == 200
            text, chunks = stream_text(lines)
            return text, chunks[-1]["usage"], chunks[0]["visual_report"]
        response = post(server.url, body)
        assert response.status_code == 200, response.text
        reply = response.json()
        return reply["choices"][0]["message"]["content"], reply["usage"], reply["visual_report"]

    with ThreadPoolExecutor(len(requests)) as pool:
        results = list(pool.map(run, range(len(requests))))
    for (text, usage, report), want, (body, _) in zip(results, expected, requests):
        assert text == want["text"], body["messages"][-1]["content"][-1]
        assert usage["prompt_tokens"] == want["prompt_tokens"]
        assert usage["prompt_tokens_details"]["image_tokens"] == want["visual_tokens"]
        assert [r.get("granularity") for r in report] == [r.get("granularity") for r in want["report"]]
    assert server.app.state.scheduler.peak_rows > 1  # the requests really shared decoding steps


def test_n_seed_and_stop(server, reference):
    body, ref = request("What is shown in this image?", [IMAGES[(64, 64)]], granularity=16, max_tokens=10)
    sampled = {**body, "temperature": 1.0, "top_p": 0.9, "seed": 1234, "n": 3}
    with ThreadPoolExecutor(4) as pool:  # the same seeded request twice, alongside other traffic
        first, second, _, _ = pool.map(lambda b: post(server.url, b).json(),
                                       [sampled, sampled, mixed_requests()[0][0], mixed_requests()[1][0]])
    texts = [c["message"]["content"] for c in first["choices"]]
    assert [c["index"] for c in first["choices"]] == [0, 1, 2]
    assert texts == [c["message"]["content"] for c in second["choices"]]
    assert len(set(texts)) > 1  # choices draw from different seeds
    other = post(server.url, {**sampled, "seed": 99}).json()
    assert [c["message"]["content"] for c in other["choices"]] != texts
    assert 3 <= first["usage"]["completion_tokens"] <= 30  # three choices of at most 10 tokens
    assert first["usage"]["prompt_tokens"] == post(server.url, body).json()["usage"]["prompt_tokens"]  # counted once

    greedy = reference(**ref)["text"]
    start = next(i for i in range(3, len(greedy) - 1) if "\ufffd" not in greedy[i:i + 2])
    stop = greedy[start:start + 2]
    cut = greedy[:greedy.find(stop)]
    reply = post(server.url, {**body, "stop": [stop, "never-appears"]}).json()
    assert reply["choices"][0]["message"]["content"] == cut
    assert reply["choices"][0]["finish_reason"] == "stop"
    status, lines = post(server.url, {**body, "stop": stop}, stream=True)
    text, chunks = stream_text(lines)
    assert text == cut and [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"


def bad_requests(media_dir, http_base):
    """(body, expected status, expected param) for every kind of bad input."""
    good_image = {"type": "image_url", "image_url": {"url": data_uri(IMAGES[(40, 30)])}}

    def chat(content=None, **fields):
        content = content if content is not None else [good_image, {"type": "text", "text": "hi"}]
        return {"model": MODEL, "messages": [{"role": "user", "content": content}], **fields}

    def image(url):
        return chat([{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "hi"}])

    big = np.random.default_rng(5).integers(0, 255, (400, 400, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(big).save(buffer, "PNG")
    bomb = io.BytesIO()
    Image.new("1", (12000, 12000)).save(bomb, "PNG")  # 144M pixels in a small file: refused before decoding
    p = "messages[0].content[0].image_url.url"
    cases = [
        (b"{not json", 400, None), (b"", 400, None), (b"[1, 2]", 400, None), (b'"text"', 400, None),
        (b"\xff\xfe\x00garbage", 400, None), ({"messages": []}, 400, "model"),
        ({"model": "other-model", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
        ({"model": MODEL}, 400, "messages"), ({"model": MODEL, "messages": "hi"}, 400, "messages"),
        ({"model": MODEL, "messages": [3]}, 400, "messages[0]"),
        ({"model": MODEL, "messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].role"),
        ({"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role"),
        ({"model": MODEL, "messages": [{"content": "x"}]}, 400, "messages[0].role"),
        ({"model": MODEL, "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
        ({"model": MODEL, "messages": [{"role": "user"}]}, 400, "messages[0].content"),
        (chat([{"type": "audio", "audio": "x"}]), 400, "messages[0].content[0].type"),
        (chat([{"type": "input_image"}]), 400, "messages[0].content[0].type"),
        (chat(["just a string part"]), 400, "messages[0].content[0].type"),
        (chat([{"type": "text"}]), 400, "messages[0].content[0].text"),
        (chat([{"type": "text", "text": 7}]), 400, "messages[0].content[0].text"),
        (chat([{"type": "image_url"}]), 400, "messages[0].content[0].image_url"),
        (chat([{"type": "image_url", "image_url": {"url": 5}}]), 400, "messages[0].content[0].image_url"),
        ({"model": MODEL, "messages": [{"role": "assistant", "content": [good_image]}]}, 400,
         "messages[0].content[0]"),
        (chat(max_tokens="ten"), 400, "max_tokens"), (chat(max_tokens=0), 400, "max_tokens"),
        (chat(max_tokens=-3), 400, "max_tokens"), (chat(max_tokens=2.5), 400, "max_tokens"),
        (chat(max_completion_tokens=True), 400, "max_completion_tokens"),
        (chat(temperature=5), 400, "temperature"), (chat(temperature="hot"), 400, "temperature"),
        (chat(temperature=-0.1), 400, "temperature"), (chat(top_p=0), 400, "top_p"),
        (chat(top_p=1.5), 400, "top_p"), (chat(top_p="x"), 400, "top_p"), (chat(n=0), 400, "n"),
        (chat(n=100), 400, "n"), (chat(n="2"), 400, "n"), (chat(n=1.5), 400, "n"),
        (chat(stop=[1]), 400, "stop"), (chat(stop=["a", "b", "c", "d", "e"]), 400, "stop"),
        (chat(stop=""), 400, "stop"), (chat(stop={"a": 1}), 400, "stop"),
        (chat(seed="x"), 400, "seed"), (chat(seed=1.5), 400, "seed"), (chat(stream="yes"), 400, "stream"),
        (chat(stream_options={"include_usage": True}), 400, "stream_options"),
        (chat(stream=True, stream_options={"include_usage": "yes"}), 400, "stream_options.include_usage"),
        (chat(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tools"),
        (chat(logprobs=True), 400, "logprobs"), (chat(response_format={"type": "json_object"}), 400,
                                                 "response_format"),
        (chat(frequency_penalty=0.5), 400, "frequency_penalty"), (chat(logit_bias={"5": 3}), 400, "logit_bias"),
        # granularity and the other method options
        (chat(granularity=7), 400, "granularity"), (chat(granularity="fine"), 400, "granularity"),
        (chat(granularity=-1), 400, "granularity"), (chat(granularity=True), 400, "granularity"),
        (chat(granularity=[4]), 400, "granularity"), (chat(granularity=4.5), 400, "granularity"),
        (chat(max_visual_tokens=0), 400, "max_visual_tokens"), (chat(max_visual_tokens="a"), 400,
                                                                "max_visual_tokens"),
        (chat(max_visual_tokens=1), 400, "max_visual_tokens"),  # below the coarsest level: the model says so
        (chat(granularity_bias="x"), 400, "granularity_bias"),
        (b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "granularity_bias": Infinity}'
         % MODEL.encode(), 400, "granularity_bias"),
        (chat(granularity=8, max_visual_tokens=40), 400, "max_visual_tokens"),
        (chat(boxes=[[0, 0, 5, 5]]), 400, "boxes"),
        # images: corrupt, oversized, wrong kinds, too many, not allowed
        (image("data:image/png;base64,@@@@"), 400, p),
        (image("data:text/plain;base64,aGVsbG8="), 400, p),
        (image("data:image/png;base64," + base64.b64encode(b"no picture at all").decode()), 400, p),
        (image(data_uri(png(64, 64, 1)[:200])), 400, p),
        (image(data_uri(buffer.getvalue())), 400, p),  # above --max-image-bytes
        (image(data_uri(bomb.getvalue())), 400, p),
        (image("/etc/passwd"), 400, p), (image(str(media_dir / ".." / "elsewhere.png")), 400, p),
        (image(str(media_dir / "missing.png")), 400, p), (image("file:///etc/hosts"), 400, p),
        (image(f"{http_base}/page.html"), 400, p), (image(f"{http_base}/missing.png"), 400, p),
        (image("http://127.0.0.1:9/closed-port.png"), 400, p),
        (chat([good_image] * 5 + [{"type": "text", "text": "five images"}]), 400,
         "messages[0].content[4].image_url.url"),
        (chat([{"type": "text", "text": "too long " * 3000}]), 400, "messages"),
    ]
    return cases


class PageHandler:
    """A tiny HTTP server on 127.0.0.1 serving an HTML page where an image should be (and nothing else)."""

    def __enter__(self):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                body = b"<html>hello</html>"
                self.send_response(200 if self.path == "/page.html" else 404)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_bad_requests_interleaved_with_good_ones(server, reference, media_dir):
    good = mixed_requests()[:4]
    expected = [reference(**ref)["text"] for _, ref in good]
    with PageHandler() as http_base:
        bad = bad_requests(media_dir, http_base)
        bad = bad + bad[:max(0, 100 - len(bad))]
        assert len(bad) >= 100
        jobs = []
        for i, case in enumerate(bad):
            jobs.append(("bad", case))
            if i % 4 == 0:
                jobs.append(("good", i // 4 % len(good)))

        def run(job):
            kind, what = job
            if kind == "good":
                response = post(server.url, good[what][0])
                return kind, what, response.status_code, response.json()
            body, _, _ = what
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
            with httpx.Client(timeout=60) as client:
                response = client.post(f"{server.url}/v1/chat/completions", content=content,
                                       headers={"Content-Type": "application/json"})
            return kind, what, response.status_code, response.json()

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(run, jobs))
    goods = 0
    for kind, what, status, body in results:
        if kind == "good":
            goods += 1
            assert status == 200, body
            assert body["choices"][0]["message"]["content"] == expected[what]
            continue
        _, want_status, want_param = what
        assert status == want_status, (what[0] if isinstance(what[0], bytes) else json.dumps(what[0])[:300], body)
        assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["message"]
        assert "Traceback" not in body["error"]["message"]
        assert body["error"]["param"] == want_param, (body, want_param)
    assert goods >= 25
    with httpx.Client() as client:
        assert client.get(f"{server.url}/health").json()["status"] == "ok"
    assert post(server.url, good[0][0]).json()["choices"][0]["message"]["content"] == expected[0]


def test_full_queue_429_and_disconnect_frees_the_slot(served_model):
    model, processor = served_model
    app = create_app(model, processor, model_name=MODEL, max_batch_size=1, max_queue=1, default_max_tokens=8)
    long_body, _ = request("Describe the picture in detail.", [IMAGES[(40, 30)]], granularity=4, max_tokens=3000)
    short_body, _ = request("Yes", max_tokens=4)
    with Server(app) as server, httpx.Client(timeout=120) as client:
        scheduler = app.state.scheduler
        with client.stream("POST", f"{server.url}/v1/chat/completions", json={**long_body, "stream": True}) as long:
            lines = long.iter_lines()
            assert next(lines).startswith("data: ")  # decoding has started: the only batch slot is taken
            with ThreadPoolExecutor(1) as pool:
                queued = pool.submit(lambda: httpx.post(f"{server.url}/v1/chat/completions", json=short_body,
                                                        timeout=120))
                deadline = time.monotonic() + 60
                while scheduler.stats()["waiting"] < 1:
                    assert time.monotonic() < deadline
                    time.sleep(0.01)
                refused = client.post(f"{server.url}/v1/chat/completions", json=short_body)
                assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
                assert refused.json()["error"]["type"] == "rate_limit_error"
                long.close()  # the client goes away mid-stream
                answer = queued.result()
        assert answer.status_code == 200 and answer.json()["choices"][0]["finish_reason"] == "length"
        # Had the abandoned row kept its slot, the queued request would have waited for its 3000 steps.
        assert scheduler.stats()["steps"] < 3000
        assert scheduler.stats()["running"] == 0


CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def answer_text(driver) -> str:
    return driver.execute_script("return document.getElementById('answer').textContent")


def test_web_page_in_headless_chromium(server, reference, tmp_path):
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.fail(f"the browser test needs Debian's Chromium at {CHROMIUM} and {CHROMEDRIVER}: "
                    "apt-get install -y chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    image = IMAGES[(120, 30)]
    (tmp_path / "picture.png").write_bytes(image)
    question = "What is shown in this image?"
    expected = reference([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
                         [image], max_tokens=MAX_TOKENS, granularity="auto")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.get(server.url + "/")
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#granularity option")) == 7)
        driver.find_element(By.ID, "file").send_keys(str(tmp_path / "picture.png"))
        wait.until(lambda d: d.find_element(By.ID, "preview").get_attribute("src").startswith("data:image/png"))
        box = driver.find_element(By.ID, "question")
        box.clear()
        box.send_keys(question)
        Select(driver.find_element(By.ID, "granularity")).select_by_value("auto")
        tokens = driver.find_element(By.ID, "max-tokens")
        tokens.clear()
        tokens.send_keys(str(MAX_TOKENS))
        driver.find_element(By.ID, "ask").click()
        wait.until(lambda d: d.find_element(By.ID, "status").text in ("done", "failed"))
        assert driver.find_element(By.ID, "error").text == ""
        assert answer_text(driver) == expected["text"]
        report = expected["report"][0]
        assert driver.find_element(By.CSS_SELECTOR, ".chosen-granularity").text == str(report["granularity"])
        assert driver.find_element(By.CSS_SELECTOR, ".visual-tokens").text == str(report["visual_tokens"])
        assert len(driver.find_elements(By.CSS_SELECTOR, "table.probabilities tr")) == 1 + 5
        assert f"({expected['visual_tokens']} visual)" in driver.find_element(By.ID, "usage").text

        Select(driver.find_element(By.ID, "granularity")).select_by_value("4")  # a fixed level, then a new answer
        driver.find_element(By.ID, "ask").click()
        wait.until(lambda d: d.find_element(By.ID, "status").text in ("done", "failed"))
        fixed = reference([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
                          [image], max_tokens=MAX_TOKENS, granularity=4)
        assert answer_text(driver) == fixed["text"]
        assert driver.find_element(By.CSS_SELECTOR, ".chosen-granularity").text == "4"
    finally:
        driver.quit()
