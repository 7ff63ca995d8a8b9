"""`multigran serve` under load: a random-weight AVG model served by the real command on 127.0.0.1, 1/4/16/64
concurrent streaming clients, each level a bounded number of requests; the same server with --max-batch-size 1;
offline batched `model.generate` on the same requests. Every answer is checked against `model.generate` on its
request alone.

Reports throughput (completion tokens/s, requests/s), p50/p99 latency, p50/p99 time to first token, errors and wrong
answers. Targets (issue): at 16 clients, throughput >= 4x the --max-batch-size 1 server and >= 70% of offline batched
generate; zero errors and zero wrong answers at every level. Results: benchmarks/results/serve_load.json.

Model (`--model`): "lm512" (default) is the tiny AVG vision side (32-pixel CLIP tiles, 5-level router) in front of a
Llama-shaped LM 512 wide with 6 layers (14M parameters), so each decode step does real work per token, as in
real serving. "tiny" is `multigran.tiny.build_tiny` (an LM 64 wide with 2 layers): there a step costs about as much
as the Python around it (one HF forward's module calls, the sampling and detokenizing of each row, the HTTP side),
whatever the batch size, so batching cannot pay much and the ratios measure interpreter overhead, not serving: a
4x gain over --max-batch-size 1 would even exceed what offline batched generate reaches on that model. Both models
keep each level bounded (a few rounds of requests per client), so the script ends in a few minutes on 2 CPU cores.

Answers are 128 tokens long by default. A request's prompt averages about 140 tokens (the visual tokens included) and
its prefill is compute-bound on a CPU, so it costs the same batched or not; with 32-token answers it is most of the
work and caps what batching can gain (about 2.9x over --max-batch-size 1 for "lm512", measured in-process without
HTTP); chat answers are longer, and decoding is where batching pays. The server runs on one torch thread (--threads)
and the clients on the other core: on a shared machine two OpenMP threads that must wait for each other lose most of
their time.

    python benchmarks/serve_load.py [--model lm512|tiny] [--max-tokens 128] [--threads 1] [--levels 1,4,16,64]
        [--device cpu] [--out serve_load.json]
"""

import argparse
import asyncio
import base64
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from common import environment, write_result  # noqa: E402

from multigran import MultiGranConfig, MultiGranForConditionalGeneration  # noqa: E402
from multigran.loading import load_model, load_processor  # noqa: E402
from multigran.tiny import build_tiny  # noqa: E402

MODEL = "tiny-avg"
LEVELS = (1, 4, 16, 64)
QUESTIONS = ["What is shown in this image?", "How many objects are there?", "Left or right?",
             "Describe the picture in detail. The image shows a red square, a blue circle and a green triangle."]
SIZES = [(40, 30), (90, 32), (32, 100), (64, 64), (120, 30), (200, 150), (50, 50), (33, 70)]


# The LM of the "lm512" model: Llama-shaped, 64-wide heads, grouped-query attention (as in current small LLMs).
LM512 = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=6, num_attention_heads=8,
             num_key_value_heads=2)


def build_model(kind: str, out_dir: Path) -> str:
    """Saves the benchmark's random-weight AVG model and its processor to out_dir; returns its description."""
    model, processor = build_tiny(None, method="avg", seed=0)
    if kind == "tiny":
        model.save_pretrained(out_dir)
        processor.save_pretrained(out_dir)
        return "tiny random AVG (multigran.tiny.build_tiny, seed 0): LM 64 wide, 2 layers"
    # The same vision side and tokenizer; only the language model (and with it the router's width) grows.
    config = model.config.to_dict()
    config["text_config"] = {**config["text_config"], **LM512}
    torch.manual_seed(0)
    model = MultiGranForConditionalGeneration(MultiGranConfig(**config)).eval()
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    lm = sum(p.numel() for p in model.language_model.parameters()) / 1e6
    total = sum(p.numel() for p in model.parameters()) / 1e6
    return (f"random AVG, the tiny vision side (multigran.tiny, seed 0) with a Llama LM {LM512['hidden_size']} wide, "
            f"{LM512['num_hidden_layers']} layers ({lm:.1f}M LM parameters, {total:.1f}M in all)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_requests(count: int):
    """Distinct requests: image size, question and granularity ("auto" or a fixed level) vary."""
    out = []
    for i in range(count):
        pixels = np.random.default_rng(i).integers(0, 255, (SIZES[i % 8][1], SIZES[i % 8][0], 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "PNG")
        out.append({"png": buffer.getvalue(), "question": QUESTIONS[i % 4],
                    "granularity": ["auto", 16, "auto", 4, 64][i % 5]})
    return out


def body(request, max_tokens):
    uri = "data:image/png;base64," + base64.b64encode(request["png"]).decode()
    content = [{"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": request["question"]}]
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "temperature": 0,
            "max_tokens": max_tokens, "granularity": request["granularity"], "stream": True}


def processor_inputs(processor, requests):
    prompts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {
        "type": "text", "text": r["question"]}]}], add_generation_prompt=True) for r in requests]
    images = [[Image.open(io.BytesIO(r["png"])).convert("RGB")] for r in requests]
    return prompts, images


def references(model, processor, requests, max_tokens):
    """Greedy answers of model.generate, one request at a time."""
    answers = []
    for request in requests:
        prompts, images = processor_inputs(processor, [request])
        inputs = processor(images=images, text=prompts, granularity=request["granularity"]).to(model.device)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False)
        answers.append(processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    return answers


def offline_batched(model, processor, requests, max_tokens, batch_size):
    """Offline batched model.generate: completion tokens per second over the same requests, `batch_size` prompts
    per call (each image with its own granularity, as the processor takes one per image), the requests sorted by
    prompt length first so that a batch pads its prompts as little as the request mix allows (as an offline job
    would; the time to sort is not counted)."""
    def prompt_length(request):
        prompts, images = processor_inputs(processor, [request])
        return processor(images=images, text=prompts, granularity=request["granularity"])["input_ids"].shape[1]

    requests = sorted(requests, key=prompt_length)
    tokens, start = 0, time.perf_counter()
    eos = model.generation_config.eos_token_id
    for begin in range(0, len(requests), batch_size):
        chunk = requests[begin:begin + batch_size]
        prompts, images = processor_inputs(processor, chunk)
        inputs = processor(images=images, text=prompts, granularity=[r["granularity"] for r in chunk])
        with torch.no_grad():
            out = model.generate(**inputs.to(model.device), max_new_tokens=max_tokens, do_sample=False)
        for row in out[:, inputs["input_ids"].shape[1]:].tolist():  # up to and including the first end token
            tokens += next((i + 1 for i, t in enumerate(row) if t == eos), len(row))
    seconds = time.perf_counter() - start
    return {"requests": len(requests), "batch_size": batch_size, "completion_tokens": tokens,
            "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1),
            "requests_per_s": round(len(requests) / seconds, 2)}


def start_server(model_dir, port, max_batch_size, device, threads):
    command = [sys.executable, "-m", "multigran.cli", "serve", "--model", str(model_dir), "--port", str(port),
               "--served-model-name", MODEL, "--max-batch-size", str(max_batch_size), "--max-queue", "256",
               "--device", device, "--log-level", "warning"]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                              env={**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(threads),
                                   "MKL_NUM_THREADS": str(threads)})
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError("the server exited")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            time.sleep(0.2)
    server.kill()
    raise RuntimeError("the server did not come up")


async def one(client, url, request, max_tokens):
    start = time.perf_counter()
    first, text, usage = None, "", None
    async with client.stream("POST", f"{url}/v1/chat/completions", json={
            **body(request, max_tokens), "stream_options": {"include_usage": True}}) as response:
        if response.status_code != 200:
            await response.aread()
            return {"error": f"HTTP {response.status_code}"}
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices", []):
                if choice["delta"].get("content") is not None and first is None and choice["delta"]["content"]:
                    first = time.perf_counter() - start
                text += choice["delta"].get("content") or ""
    latency = time.perf_counter() - start
    return {"text": text, "latency": latency, "ttft": first if first is not None else latency,
            "tokens": usage["completion_tokens"] if usage else 0}


async def load(url, requests, expected, clients, max_tokens):
    """`clients` concurrent clients, each sending its next request when the last one is answered."""
    queue = list(range(len(requests)))
    results = [None] * len(requests)

    async def client_loop(client):
        while queue:
            index = queue.pop(0)
            try:
                results[index] = await one(client, url, requests[index], max_tokens)
            except httpx.HTTPError as error:
                results[index] = {"error": repr(error)}

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
        seconds = time.perf_counter() - start
    ok = [r for r in results if "error" not in r]
    wrong = sum(r["text"] != expected[i] for i, r in enumerate(results) if "error" not in r)
    latencies = sorted(r["latency"] for r in ok)
    ttfts = sorted(r["ttft"] for r in ok)
    tokens = sum(r["tokens"] for r in ok)

    def pct(values, q):
        return round(values[min(len(values) - 1, int(q * len(values)))], 4) if values else None

    return {"clients": clients, "requests": len(requests), "seconds": round(seconds, 3),
            "completion_tokens": tokens, "tokens_per_s": round(tokens / seconds, 1),
            "requests_per_s": round(len(requests) / seconds, 2),
            "latency_p50_s": round(statistics.median(latencies), 4) if latencies else None,
            "latency_p99_s": pct(latencies, 0.99), "ttft_p50_s": round(statistics.median(ttfts), 4) if ttfts else None,
            "ttft_p99_s": pct(ttfts, 0.99), "errors": len(results) - len(ok), "wrong_answers": wrong}


def requests_for(clients: int) -> int:
    return max(8, 2 * clients)  # bounded: a few rounds per client


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", choices=("lm512", "tiny"), default="lm512")
    parser.add_argument("--out", default="serve_load.json", help="file name under benchmarks/results")
    parser.add_argument("--levels", default=",".join(map(str, LEVELS)),
                        help="concurrent clients per level, comma-separated (16 is needed for the targets)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of the server and of offline generate (the clients take another core)")
    args = parser.parse_args()
    levels = sorted({int(clients) for clients in args.levels.split(",")} | {16})
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="serve_load_"))
    description = build_model(args.model, work / "model")
    model, processor = load_model(work / "model", args.device, "float32"), load_processor(work / "model")
    requests = make_requests(requests_for(max(levels)))
    expected = references(model, processor, requests, args.max_tokens)
    at16 = requests[:requests_for(16)]
    offline = offline_batched(model, processor, at16, args.max_tokens, batch_size=16)
    del model

    results = {"levels": [], "max_batch_size_1": None, "offline_batched_generate_16": offline}
    port = free_port()
    server = start_server(work / "model", port, 64, args.device, args.threads)
    try:
        url = f"http://127.0.0.1:{port}"
        asyncio.run(load(url, requests[:4], expected, 4, args.max_tokens))  # warm-up, not reported
        for clients in levels:
            level = asyncio.run(load(url, requests[:requests_for(clients)], expected, clients, args.max_tokens))
            results["levels"].append(level)
            print(json.dumps(level))
    finally:
        server.terminate()
        server.wait(120)
    port = free_port()
    server = start_server(work / "model", port, 1, args.device, args.threads)
    try:
        url = f"http://127.0.0.1:{port}"
        asyncio.run(load(url, requests[:4], expected, 4, args.max_tokens))
        results["max_batch_size_1"] = asyncio.run(load(url, at16, expected, 16, args.max_tokens))
        print("max-batch-size 1:", json.dumps(results["max_batch_size_1"]))
    finally:
        server.terminate()
        server.wait(120)
    print("offline batched generate:", json.dumps(offline))

    at_16 = next(level for level in results["levels"] if level["clients"] == 16)
    vs_single = at_16["tokens_per_s"] / results["max_batch_size_1"]["tokens_per_s"]
    vs_offline = at_16["tokens_per_s"] / offline["tokens_per_s"]
    all_levels = results["levels"] + [results["max_batch_size_1"]]
    results["targets"] = {
        "16 clients vs --max-batch-size 1 (x)": {"value": round(vs_single, 2), "target": 4.0,
                                                 "met": vs_single >= 4.0},
        "16 clients vs offline batched generate (%)": {"value": round(100 * vs_offline, 1), "target": 70.0,
                                                       "met": vs_offline >= 0.7},
        "errors": {"value": sum(level["errors"] for level in all_levels), "target": 0,
                   "met": all(level["errors"] == 0 for level in all_levels)},
        "wrong answers": {"value": sum(level["wrong_answers"] for level in all_levels), "target": 0,
                          "met": all(level["wrong_answers"] == 0 for level in all_levels)},
    }
    results["settings"] = {"model": description,
                           "max_tokens": args.max_tokens, "temperature": 0, "stream": True,
                           "requests_per_level": {c: requests_for(c) for c in levels},
                           "granularities": "auto / 16 / auto / 4 / 64, cycling", "loopback": "127.0.0.1",
                           "server_threads": args.threads, "offline_batch_size": 16,
                           "note": "2 CPU cores: figures vary by 10-20 % between runs"}
    results["environment"] = environment(torch.device(args.device))
    path = write_result(args.out, results)
    for name, target in results["targets"].items():
        print(f"{'met   ' if target['met'] else 'MISSED'} {name}: {target['value']} (target {target['target']})")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
