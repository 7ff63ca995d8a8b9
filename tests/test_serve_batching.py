"""The scheduler alone (no HTTP): batched prefill and decoding give every row the logits and tokens `model.generate`
gives its request alone, for AVG (auto / fixed / budget / bias) and MG-LLaVA (object boxes), mixed sizes and prompt
lengths, whether rows join a running batch one by one or are admitted together and prefilled in one pass; rows leave
the batch when they finish or are cancelled."""

import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

import multigran.serve.scheduler as scheduler_module
from multigran.serve.scheduler import GrowingLayer, Job, Sampling, Scheduler
from multigran.tiny import build_tiny


def image(width, height, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8))


def prompt(processor, text, images=1, turns=()):
    messages = [{"role": r, "content": [{"type": "text", "text": t}]} for r, t in turns]
    messages.append({"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": text}]})
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def run_jobs(scheduler, jobs, start=None):
    """Submits all jobs at once (or, with `start`, calls it: the jobs were submitted already); returns each job's
    events once every one has finished."""
    done = {id(job): threading.Event() for job, _ in jobs}
    for job, events in jobs:
        def emit(event, job=job, events=events):
            events.append(event)
            if event[0] == "error" or sum(e[0] == "finished" for e in events) == job.n:
                done[id(job)].set()
        job.emit = emit
    if start is not None:
        start()
    else:
        for job, _ in jobs:
            scheduler.submit(job)
    for job, _ in jobs:
        assert done[id(job)].wait(120), "a job did not finish"
    return [events for _, events in jobs]


def wait_for_rows(scheduler, count):
    deadline = time.monotonic() + 60
    while scheduler.stats()["running"] != count:
        assert time.monotonic() < deadline, f"the batch never came down to {count} row(s)"
        time.sleep(0.005)


@pytest.fixture(scope="module")
def tiny_models():
    return {}


def tiny(tiny_models, method):
    if method not in tiny_models:
        model, processor = build_tiny(None, method=method, seed=0)
        # The random init zeroes the padding token's embedding; in real checkpoints it is a trained row (pad is often
        # unk or eos). A nonzero one makes a router that read other rows' padding give a different choice.
        with torch.no_grad():
            embeddings = model.get_input_embeddings().weight
            generator = torch.Generator().manual_seed(0)
            embeddings[model.pad_token_id] = torch.randn(embeddings.shape[1], generator=generator)
        tiny_models[method] = model, processor
    return tiny_models[method]


@pytest.fixture
def recorded_logits(monkeypatch):
    """Every (B, V) logits the scheduler chooses from, per row: {id(job): [(V,) per step]}."""
    seen = {}
    original = scheduler_module.choose_tokens

    def recording(logits, rows):
        for b, row in enumerate(rows):
            if row.index == 0:
                seen.setdefault(id(row.job), []).append(logits[b].float().clone())
        return original(logits, rows)

    monkeypatch.setattr(scheduler_module, "choose_tokens", recording)
    return seen


CASES = {
    "avg": [
        ("What is shown in this image?", [(40, 30)], {"granularity": "auto"}, {}),
        ("How many objects are there? Describe the picture in detail.", [(90, 32)], {"granularity": "auto"},
         {"granularity_bias": 4.0}),
        ("Left or right?", [(32, 100)], {"granularity": 16}, {}),
        ("Yes", [(64, 64)], {"granularity": "auto"}, {"max_visual_tokens": 40}),
        ("The image shows a red square, a blue circle and a green triangle on a white background. " * 4, [(50, 50)],
         {"granularity": 4}, {}),
        ("Compare them.", [(120, 30), (30, 30)], {"granularity": "auto"}, {}),
    ],
    "mg": [
        ("What is shown in this image?", [(40, 30)], {"boxes": [[[2, 2, 20, 20], [5, 5, 30, 25]]]}, {}),
        ("Left or right? Answer the question using a single word or phrase.", [(90, 60)], {}, {}),
        ("Where is the dog?", [(64, 64)], {"boxes": [[[0, 0, 60, 60]]]}, {}),
        ("Compare them.", [(32, 80), (50, 40)], {"boxes": [[[1, 1, 10, 10]], [[3, 3, 40, 30], [0, 0, 8, 8]]]}, {}),
    ],
}


def expected_runs(model, processor, cases, steps, choices=None):
    """Per case (text, image sizes, processor options, visual options): its Job and what `model.generate` gives that
    request alone (answer tokens, per-step logits, visual report)."""
    jobs, expected = [], []
    choices = choices or [1] * len(cases)
    for (text, sizes, processor_options, visual), max_tokens, n in zip(cases, steps, choices):
        images = [image(w, h, seed=w * h) for w, h in sizes]
        turns = [("system", "A chat."), ("user", "Hi."), ("assistant", "Yes.")] if len(sizes) > 1 else ()
        inputs = processor(images=images, text=prompt(processor, text, len(images), turns), **processor_options)
        with torch.no_grad():
            out = model.generate(**inputs, **visual, max_new_tokens=max_tokens, do_sample=False,
                                 return_dict_in_generate=True, output_logits=True)
        expected.append((out.sequences[0, inputs["input_ids"].shape[1]:].tolist(), out.logits,
                         model.last_visual_report))
        jobs.append((Job(inputs, visual, Sampling(max_tokens=max_tokens, temperature=0), n=n), []))
    return jobs, expected


def check_rows_match_generate(processor, jobs, results, expected, recorded_logits):
    for (job, _), events, (tokens, logits, report) in zip(jobs, results, expected):
        assert events[0][0] == "prefilled"
        served = events[0][1]["visual_report"]
        assert len(served) == len(report)
        for mine, alone in zip(served, report):  # the choices exactly, the router's probabilities up to rounding
            assert {k: v for k, v in mine.items() if k != "router_probabilities"} == \
                {k: v for k, v in alone.items() if k != "router_probabilities"}
            if alone.get("router_probabilities") is not None:
                torch.testing.assert_close(torch.tensor(mine["router_probabilities"]),
                                           torch.tensor(alone["router_probabilities"]), atol=1e-5, rtol=1e-4)
        for index in range(job.n):
            text = "".join(e[2] for e in events if e[0] == "text" and e[1] == index)
            assert text == processor.tokenizer.decode(tokens, skip_special_tokens=True)
        finished = sorted(e for e in events if e[0] == "finished")
        reason = "length" if len(tokens) == job.sampling.max_tokens else "stop"
        assert finished == [("finished", i, reason, len(tokens)) for i in range(job.n)]
        mine = recorded_logits[id(job)]
        assert len(mine) == len(tokens)
        for step, (a, b) in enumerate(zip(mine, logits)):
            torch.testing.assert_close(a, b[0].float(), atol=2e-5, rtol=1e-4, msg=f"step {step}")


def test_growing_cache_layer_holds_what_concatenation_holds(monkeypatch):
    monkeypatch.setattr(scheduler_module, "CACHE_ROOM", 5)
    generator = torch.Generator().manual_seed(0)
    keys, values = torch.randn(3, 2, 7, 4, generator=generator), torch.randn(3, 2, 7, 4, generator=generator)
    layer = GrowingLayer(keys, values)
    for step in range(23):  # one position a step (a decode step), now and then several (a buffer refill mid-way)
        new_keys, new_values = (torch.randn(3, 2, 1 + step % 7 // 6 * 3, 4, generator=generator) for _ in range(2))
        got_keys, got_values = layer.update(new_keys, new_values)
        keys, values = torch.cat([keys, new_keys], dim=-2), torch.cat([values, new_values], dim=-2)
        assert torch.equal(got_keys, keys) and torch.equal(got_values, values)
        assert layer.get_seq_length() == keys.shape[-2]
    assert layer.key_buffer.shape[-2] - layer.get_seq_length() <= 5


@pytest.mark.parametrize("method", ["avg", "mg"])
def test_batched_rows_match_generate_logits_and_tokens(method, recorded_logits, tiny_models, monkeypatch):
    monkeypatch.setattr(scheduler_module, "CACHE_ROOM", 3)  # the shared cache refills its buffers every 3 steps
    model, processor = tiny(tiny_models, method)
    steps = [12, 5, 9, 12, 3, 7][:len(CASES[method])]  # rows finish at different steps and leave the batch
    jobs, expected = expected_runs(model, processor, CASES[method], steps)
    scheduler = Scheduler(model, processor.tokenizer, max_batch_size=4, max_queue=16)
    scheduler.start()
    try:
        results = run_jobs(scheduler, jobs)
    finally:
        scheduler.stop()
    assert scheduler.peak_rows == 4  # the batch filled up and rows joined as others left
    check_rows_match_generate(processor, jobs, results, expected, recorded_logits)


AUTO = {"granularity": "auto"}
ADMITTED_TOGETHER = {
    # One prefill pass for the rows without call-level options: AVG auto rows the router sends to different levels,
    # fixed levels, an image of each kind in one prompt, prompts shorter than the router's text filter (its empty
    # slots must not see the other rows' padding) and much longer ones; the rows with their own budget or bias are
    # prefilled in passes of their own.
    "avg": [
        ("What is shown in this image?", [(40, 30)], AUTO, {}),
        ("What is shown in this image?", [(120, 30)], AUTO, {}),
        ("Yes", [(32, 100)], AUTO, {}),
        ("Left or right?", [(50, 50)], AUTO, {}),
        ("The image shows a red square, a blue circle and a green triangle on a white background. " * 4, [(64, 64)],
         {"granularity": 16}, {}),
        ("Compare them.", [(90, 32), (30, 30)], {"granularity": ["auto", 8]}, {}),
        ("How many objects are there? Describe the picture in detail.", [(90, 32)], AUTO, {"granularity_bias": 4.0}),
        ("Yes", [(64, 64)], AUTO, {"max_visual_tokens": 40}),
    ],
    # Different numbers of boxes per image (the box axis is padded across requests) and of images per prompt.
    "mg": CASES["mg"],
    # Different slice grids and view sizes (views padded across requests).
    "uhd": [
        ("What is shown in this image?", [(40, 30)], {}, {}),
        ("Left or right? Answer the question using a single word or phrase.", [(120, 40)], {}, {}),
        ("Compare them.", [(32, 80), (70, 70)], {}, {}),
    ],
}


@pytest.mark.parametrize("method", ["avg", "mg", "uhd"])
def test_requests_admitted_together_share_one_prefill(method, recorded_logits, tiny_models):
    model, processor = tiny(tiny_models, method)
    cases = ADMITTED_TOGETHER[method]
    steps = [9, 4, 11, 6, 3, 8, 5, 7][:len(cases)]
    choices = [1, 1, 1, 2, 1, 1, 1, 1][:len(cases)]  # two greedy choices share one prefilled prompt
    jobs, expected = expected_runs(model, processor, cases, steps, choices)
    together = sum(not visual for _, _, _, visual in cases)
    if method == "avg":
        routed = {e["granularity"] for (*_, report), (*_, visual) in zip(expected, cases)
                  if not visual for e in report if e["mode"] == "auto"}
        assert len(routed) >= 3, f"the router should send the rows of one pass to different levels, got {routed}"
    scheduler = Scheduler(model, processor.tokenizer, max_batch_size=16, max_queue=16)
    for job, _ in jobs:  # all waiting before the model thread starts: admitted in its first iteration
        scheduler.submit(job)
    try:
        results = run_jobs(scheduler, jobs, start=scheduler.start)
    finally:
        scheduler.stop()
    assert scheduler.peak_prefill_rows == together  # one vision pass for them
    assert scheduler.prefills == 1 + len(cases) - together  # the rows with options of their own: one pass each
    if method != "uhd":  # UHD's prompts (470 to 1330 tokens) are too far apart to share an LM pass
        assert scheduler.peak_pass_rows >= 2  # an LM pass held prompts of different lengths (left-padded)
    check_rows_match_generate(processor, jobs, results, expected, recorded_logits)


def test_a_failing_request_does_not_fail_the_others_of_its_prefill(tiny_models):
    """The pass fails on one request's images (a budget below its coarsest level): each request then runs alone, the
    bad one gets its error and the good one its exact answer."""
    model, processor = tiny(tiny_models, "avg")
    budget = {"max_visual_tokens": 12}
    cases = [("What is shown in this image?", [(40, 30)], AUTO, budget), ("Yes", [(200, 150)], AUTO, budget)]
    good, bad = (processor(images=[image(w, h, seed=w * h)], text=prompt(processor, text), **options)
                 for text, [(w, h)], options, _ in cases)
    with pytest.raises(ValueError, match="max_visual_tokens=12 is below the coarsest level") as alone:
        model.generate(**bad, **budget, max_new_tokens=3, do_sample=False)
    jobs, expected = expected_runs(model, processor, cases[:1], [6])
    jobs.append((Job(bad, budget, Sampling(max_tokens=3, temperature=0)), []))
    scheduler = Scheduler(model, processor.tokenizer, max_batch_size=4, max_queue=4)
    for job, _ in jobs:
        scheduler.submit(job)
    try:
        results = run_jobs(scheduler, jobs, start=scheduler.start)
    finally:
        scheduler.stop()
    assert [e[0] for e in results[1]] == ["error"] and str(results[1][0][1]) == str(alone.value)
    tokens = expected[0][0]
    assert "".join(e[2] for e in results[0] if e[0] == "text") == processor.tokenizer.decode(
        tokens, skip_special_tokens=True)


def test_cancelled_rows_leave_and_n_choices_share_one_prefill(tiny_models):
    model, processor = tiny(tiny_models, "avg")
    inputs = processor(images=[image(40, 30, 1)], text=prompt(processor, "What is shown?"), granularity=8)
    scheduler = Scheduler(model, processor.tokenizer, max_batch_size=3, max_queue=4)
    long_job = Job(inputs, {}, Sampling(max_tokens=100000, temperature=0))
    started = threading.Event()
    long_job.emit = lambda event: started.set() if event[0] == "text" else None
    scheduler.start()
    try:
        scheduler.submit(long_job)
        assert started.wait(60)
        greedy = []
        results = run_jobs(scheduler, [
            (Job(inputs, {}, Sampling(max_tokens=6, temperature=0), n=2), greedy),
        ])
        wait_for_rows(scheduler, 1)  # the two choices have left; the long row is still there
        long_job.cancel()
        wait_for_rows(scheduler, 0)  # the cancelled row leaves at the next step
        assert scheduler.stats()["steps"] < 100000
        with pytest.raises(ValueError, match="n=4 is above this server's batch size 3"):
            scheduler.submit(Job(inputs, {}, Sampling(max_tokens=1), n=4))
    finally:
        scheduler.stop(60)
    assert not scheduler.thread.is_alive() and scheduler.stats()["running"] == 0
    texts = ["".join(e[2] for e in results[0] if e[0] == "text" and e[1] == i) for i in range(2)]
    assert texts[0] == texts[1] and len(texts[0]) > 0  # greedy choices are equal
    assert [e[0] for e in results[0]][0] == "prefilled"
