"""The scheduler alone (no HTTP): batched decoding gives every row the logits and tokens `model.generate` gives its
request alone, for AVG (auto / fixed / budget / bias) and MG-LLaVA (object boxes), mixed sizes and prompt lengths;
rows leave the batch when they finish or are cancelled."""

import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

import multigran.serve.scheduler as scheduler_module
from multigran.serve.scheduler import Job, Sampling, Scheduler
from multigran.tiny import build_tiny


def image(width, height, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8))


def prompt(processor, text, images=1, turns=()):
    messages = [{"role": r, "content": [{"type": "text", "text": t}]} for r, t in turns]
    messages.append({"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": text}]})
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def run_jobs(scheduler, jobs):
    """Submits all jobs at once; returns each job's events once every one has finished."""
    done = {id(job): threading.Event() for job, _ in jobs}
    for job, events in jobs:
        def emit(event, job=job, events=events):
            events.append(event)
            if event[0] == "error" or sum(e[0] == "finished" for e in events) == job.n:
                done[id(job)].set()
        job.emit = emit
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
        tiny_models[method] = build_tiny(None, method=method, seed=0)
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


@pytest.mark.parametrize("method", ["avg", "mg"])
def test_batched_rows_match_generate_logits_and_tokens(method, recorded_logits, tiny_models):
    model, processor = tiny(tiny_models, method)
    steps = [12, 5, 9, 12, 3, 7][:len(CASES[method])]  # rows finish at different steps and leave the batch
    jobs, expected = [], []
    for (text, sizes, processor_options, visual), max_tokens in zip(CASES[method], steps):
        images = [image(w, h, seed=w * h) for w, h in sizes]
        turns = [("system", "A chat."), ("user", "Hi."), ("assistant", "Yes.")] if len(sizes) > 1 else ()
        inputs = processor(images=images, text=prompt(processor, text, len(images), turns), **processor_options)
        with torch.no_grad():
            out = model.generate(**inputs, **visual, max_new_tokens=max_tokens, do_sample=False,
                                 return_dict_in_generate=True, output_logits=True)
        expected.append((out.sequences[0, inputs["input_ids"].shape[1]:].tolist(), out.logits))
        jobs.append((Job(inputs, visual, Sampling(max_tokens=max_tokens, temperature=0)), []))

    scheduler = Scheduler(model, processor.tokenizer, max_batch_size=4, max_queue=16)
    scheduler.start()
    try:
        results = run_jobs(scheduler, jobs)
    finally:
        scheduler.stop()
    assert scheduler.peak_rows == 4  # the batch filled up and rows joined as others left
    for (job, _), events, (tokens, logits) in zip(jobs, results, expected):
        text = "".join(e[2] for e in events if e[0] == "text")
        assert text == processor.tokenizer.decode(tokens, skip_special_tokens=True)
        finished = [e for e in events if e[0] == "finished"]
        assert finished == [("finished", 0, "length" if len(tokens) == job.sampling.max_tokens else "stop",
                             len(tokens))]
        mine = recorded_logits[id(job)]
        assert len(mine) == len(tokens)
        for step, (a, b) in enumerate(zip(mine, logits)):
            torch.testing.assert_close(a, b[0].float(), atol=2e-5, rtol=1e-4, msg=f"step {step}")


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
