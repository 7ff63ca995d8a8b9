"""Every transformers decoding mode on every method: greedy, seeded sampling, beam search, num_return_sequences,
prompt-lookup decoding, TextIteratorStreamer and a static cache.

Each mode is checked against something computed another way: greedy against argmax over full forwards (no cache,
no generate), beam search against the forward's log-probabilities of the sequences it returns, num_return_sequences
against a batch holding the prompt twice, prompt lookup / streamer / static cache against greedy, and for anyres
greedy, beam search and seeded sampling against transformers' own LlavaNextForConditionalGeneration on the same
converted weights (tokens identical).
"""

import json
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from test_llava_next_parity import make_hf_checkpoint, prompt
from transformers import TextIteratorStreamer

from multigran import MultiGranForConditionalGeneration, MultiGranProcessor
from multigran.convert import from_llava_next
from multigran.tiny import build_tiny

NEW = 6  # new tokens per answer

# case -> (method, processor options)
CASES = {
    "anyres": ("anyres", {}),
    "avg_fixed": ("avg", {"granularity": 16}),
    "avg_auto": ("avg", {"granularity": "auto"}),
    "mg": ("mg", {"boxes": [[[2, 3, 40, 30], [20, 10, 70, 38]]]}),
    "uhd": ("uhd", {}),
}
IMAGE_SIZE = {"uhd": (32, 32)}  # one view: UHD's JBU pyramid is the slowest pipeline on CPU
MODES = ["greedy", "sampling", "beam", "num_return_sequences", "prompt_lookup", "streamer", "static_cache"]


def picture(seed=0, size=(70, 40)):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory, tiny_tokenizer):
    src = tmp_path_factory.mktemp("hf")
    hf_model, hf_processor = make_hf_checkpoint(src, tiny_tokenizer)
    dst = from_llava_next(src, tmp_path_factory.mktemp("converted") / "model")
    return hf_model, hf_processor, MultiGranForConditionalGeneration.from_pretrained(dst).eval(), \
        MultiGranProcessor.from_pretrained(dst)


class Case:
    """A tiny model of one method, its inputs, the images' visual tokens (encoded once) and the greedy reference."""

    def __init__(self, model, processor, options, text, size):
        self.model, self.processor, self.options, self.text, self.size = model, processor, options, text, size
        self.inputs = processor(images=[picture(size=size)], text=[text], **options)
        extra = {k: v for k, v in self.inputs.items() if k not in ("input_ids", "attention_mask", "pixel_values")}
        with torch.no_grad():
            self.features = model.get_image_features(
                self.inputs["pixel_values"], input_ids=self.inputs["input_ids"],
                inputs_embeds=model.embed_text(self.inputs["input_ids"]),
                attention_mask=self.inputs["attention_mask"], **extra)
        self.forward_inputs = {**extra, "image_features": self.features}
        self.greedy = self.reference_greedy()

    def logits(self, answer):
        """Logits of prompt + answer from one full forward (no cache, no generate)."""
        ids = torch.cat([self.inputs["input_ids"], answer[None]], dim=1)
        with torch.no_grad():
            return self.model(input_ids=ids, attention_mask=torch.ones_like(ids), **self.forward_inputs).logits

    def log_probs(self, answer):
        """(len(answer), vocab) log-probabilities of each answer position."""
        return self.logits(answer)[0, -answer.shape[0] - 1:-1].float().log_softmax(-1)

    def reference_greedy(self, steps=NEW):
        """Greedy decoding by argmax over full forwards; end-of-sequence barred, as `min_new_tokens` does."""
        answer = torch.empty(0, dtype=torch.long)
        for _ in range(steps):
            last = self.logits(answer)[0, -1].clone()
            last[self.model.generation_config.eos_token_id] = float("-inf")
            answer = torch.cat([answer, last.argmax()[None]])
        return answer[None]


@pytest.fixture(scope="module")
def cases(hf_pair):
    built = {}

    def get(name):
        if name not in built:
            method, options = CASES[name]
            if method == "anyres":
                model, processor = hf_pair[2], hf_pair[3]
            else:
                model, processor = build_tiny(None, method=method, seed=1)
            text = prompt(processor, question="What is shown in this image? Describe the picture.")
            built[name] = Case(model, processor, options, text, IMAGE_SIZE.get(name, (70, 40)))
        return built[name]

    return get


def new_tokens(output, inputs):
    sequences = output if torch.is_tensor(output) else output.sequences
    assert torch.equal(sequences[:, :inputs["input_ids"].shape[1]],
                       inputs["input_ids"].repeat_interleave(sequences.shape[0] // inputs["input_ids"].shape[0], 0))
    return sequences[:, inputs["input_ids"].shape[1]:]


def run(model, inputs, mode, **extra):
    common = dict(max_new_tokens=NEW, min_new_tokens=NEW, **extra)
    if mode == "greedy":
        return new_tokens(model.generate(**inputs, do_sample=False, **common), inputs)
    if mode == "sampling":
        torch.manual_seed(11)
        return new_tokens(model.generate(**inputs, do_sample=True, **common), inputs)
    if mode == "beam":
        return model.generate(**inputs, num_beams=3, do_sample=False, length_penalty=0.0, output_scores=True,
                              return_dict_in_generate=True, **common)
    if mode == "num_return_sequences":
        torch.manual_seed(5)
        return new_tokens(model.generate(**inputs, do_sample=True, num_return_sequences=2, **common), inputs)
    if mode == "prompt_lookup":
        return new_tokens(model.generate(**inputs, do_sample=False, prompt_lookup_num_tokens=3, **common), inputs)
    if mode == "static_cache":
        return new_tokens(model.generate(**inputs, do_sample=False, cache_implementation="static", **common), inputs)
    raise AssertionError(mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", list(CASES))
def test_decoding_mode(cases, case, mode):
    case = cases(case)
    model, processor, inputs, greedy = case.model, case.processor, case.inputs, case.greedy
    if mode in ("greedy", "prompt_lookup", "static_cache"):
        assert torch.equal(run(model, inputs, mode), greedy)
    elif mode == "sampling":
        top_1 = model.generate(**inputs, do_sample=True, top_k=1, max_new_tokens=NEW, min_new_tokens=NEW)
        assert torch.equal(new_tokens(top_1, inputs), greedy)  # sampling reads the same distribution
    elif mode == "beam":
        output = run(model, inputs, mode)
        answer = new_tokens(output, inputs)[0]
        assert answer.shape[0] == NEW
        score = case.log_probs(answer).gather(1, answer[:, None]).sum()
        torch.testing.assert_close(output.sequences_scores[0], score, atol=1e-4, rtol=0)
        greedy_score = case.log_probs(greedy[0]).gather(1, greedy[0][:, None]).sum()
        assert score >= greedy_score - 1e-4
    elif mode == "num_return_sequences":
        pair = run(model, inputs, mode)
        assert pair.shape == (2, NEW)
        twice = processor(images=[picture(size=case.size)] * 2, text=[case.text, case.text],
                          **{k: v * 2 if k == "boxes" else v for k, v in case.options.items()})
        torch.manual_seed(5)
        batch = new_tokens(model.generate(**twice, do_sample=True, max_new_tokens=NEW, min_new_tokens=NEW), twice)
        assert torch.equal(pair, batch)  # two return sequences = the prompt twice in one batch, same draws
    elif mode == "streamer":
        streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        thread = threading.Thread(target=model.generate, kwargs=dict(
            **inputs, do_sample=False, max_new_tokens=NEW, min_new_tokens=NEW, streamer=streamer))
        thread.start()
        text_out = "".join(streamer)
        thread.join()
        assert text_out == processor.tokenizer.decode(greedy[0], skip_special_tokens=True)


def test_auto_granularity_really_settles_the_count(cases):
    case = cases("avg_auto")
    assert int((case.inputs["input_ids"] == case.model.config.image_token_id).sum()) == 1  # one placeholder
    assert case.features[0].shape[0] > 1
    report = case.model.generate(**case.inputs, max_new_tokens=1, return_dict_in_generate=True).visual_report
    assert report[0]["visual_tokens"] == case.features[0].shape[0] and report[0]["mode"] == "auto"


@pytest.mark.parametrize("mode", ["greedy", "beam", "sampling", "num_return_sequences"])
def test_anyres_tokens_equal_transformers_llava_next(hf_pair, mode):
    hf_model, hf_processor, ours, our_processor = hf_pair
    texts = [prompt(hf_processor), prompt(hf_processor, question="Describe the picture in detail please.")]
    images = [picture(1, (64, 64)), picture(2, (96, 30))]
    for p in (hf_processor, our_processor):
        p.tokenizer.padding_side = "left"
    hf_inputs = hf_processor(images=images, text=texts, return_tensors="pt", padding=True)
    our_inputs = our_processor(images=images, text=texts)
    assert torch.equal(hf_inputs["input_ids"], our_inputs["input_ids"])
    options = {"max_new_tokens": NEW}
    if mode == "beam":
        options.update(num_beams=3, do_sample=False, num_return_sequences=2)
    elif mode in ("sampling", "num_return_sequences"):
        options.update(do_sample=True, num_return_sequences=2 if mode == "num_return_sequences" else 1)
    with torch.no_grad():
        torch.manual_seed(3)
        theirs = hf_model.generate(**hf_inputs, **options)
        torch.manual_seed(3)
        mine = ours.generate(**our_inputs, **options)
    assert torch.equal(mine, theirs)


def test_generate_command_decoding_options_and_several_requests(tmp_path, capsys):
    from multigran.cli import main

    model, processor = build_tiny(tmp_path / "model", method="anyres", seed=1)
    image = tmp_path / "x.png"
    picture().save(image)
    base = ["generate", "--model", str(tmp_path / "model"), "--max-new-tokens", str(NEW), "--device", "cpu"]

    def expected(question, system=None, **options):
        content = [{"type": "image"}, {"type": "text", "text": question}]
        messages = ([{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []) + [
            {"role": "user", "content": content}]
        inputs = processor(images=[str(image)], text=processor.apply_chat_template(messages, add_generation_prompt=True))
        torch.manual_seed(4)
        tokens = model.generate(**inputs, max_new_tokens=NEW, **options)[0, inputs["input_ids"].shape[1]:]
        return processor.decode(tokens, skip_special_tokens=True)

    # beam search + repetition penalty + a system prompt, two prompts in one run: printed after each search
    assert main(base + ["--image", str(image), "--prompt", "What is shown?", "--prompt", "Describe it.",
                        "--num-beams", "3", "--repetition-penalty", "1.3", "--system", "Be brief."]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [expected(q, "Be brief.", num_beams=3, repetition_penalty=1.3, do_sample=False)
                     for q in ("What is shown?", "Describe it.")]
    # seeded sampling with top-p / top-k from a JSONL of requests, with the per-image visual report
    requests = tmp_path / "requests.jsonl"
    requests.write_text(json.dumps({"id": "a", "prompt": "What is shown?", "images": [str(image)]}) + "\n")
    assert main(base + ["--requests", str(requests), "--temperature", "0.8", "--top-p", "0.9", "--top-k", "20",
                        "--seed", "4", "--report"]) == 0
    captured = capsys.readouterr()
    answer = json.loads(captured.out)
    assert answer["id"] == "a" and answer["answer"] == expected("What is shown?", do_sample=True, temperature=0.8,
                                                                top_p=0.9, top_k=20)
    count = int((processor(images=[str(image)], text="<image>")["input_ids"] == processor.image_token_id).sum())
    assert answer["visual_report"] == [{"visual_tokens": count}] and json.loads(captured.err) == [
        {"visual_tokens": count}]
    # each option is checked where it enters, with its range in the message
    for option, value, message in [("--temperature", "-1", ">= 0"), ("--temperature", "inf", "finite"),
                                   ("--top-p", "0", "0 < top-p <= 1"), ("--top-k", "-2", ">= 0"),
                                   ("--num-beams", "0", ">= 1"), ("--device", "tpu", "cpu, cuda, cuda:N or auto")]:
        assert main(base + ["--prompt", "hi", option, value]) == 2
        error = capsys.readouterr().err.strip()
        assert error.startswith("multigran: error:") and option in error and message in error, error
