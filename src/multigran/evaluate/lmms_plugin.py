"""A multigran model inside lmms-eval: `lmms-eval --model multigran --model_args pretrained=DIR,granularity=144`.

Model arguments: `pretrained` (a multigran directory), `granularity` ("auto" or tokens per crop), `max_visual_tokens`
and `granularity_bias` (AVG auto), `device`, `dtype`, `visual_log` (a JSONL file: per request, the visual tokens and
granularity of each image). Prompts are the task's text with its images first, in the model's chat template, as
multigran's own `eval` builds them. Each `generate_until` call logs the mean visual tokens per image and the
granularity distribution; `self.visual_reports` keeps them per request.
"""

import json
import os
import statistics

from ..extras import require

require("lmms_eval", "eval")

import torch  # noqa: E402
from lmms_eval.api.model import lmms  # noqa: E402
from loguru import logger  # noqa: E402
from PIL import Image  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from ..loading import load_model, load_processor  # noqa: E402

try:  # lmms-eval >= 0.7
    from lmms_eval.api.instance import GenerationResult  # noqa: E402
except ImportError:
    GenerationResult = None
from .runner import build_prompt  # noqa: E402


def _flatten(visuals):
    out = []
    for item in visuals if isinstance(visuals, (list, tuple)) else [visuals]:
        out.extend(_flatten(item) if isinstance(item, (list, tuple)) else [item])
    return out


class MultiGranLMMS(lmms):
    is_simple = True

    def __init__(self, pretrained: str, granularity=None, max_visual_tokens=None, granularity_bias=None,
                 device: str = "auto", dtype: str = "auto", batch_size=1, visual_log: str | None = None, **unused):
        super().__init__()
        from ..cli import parse_granularity

        if unused:
            logger.warning(f"multigran: model arguments ignored: {sorted(unused)}")
        if int(batch_size) != 1:
            raise ValueError("multigran's lmms-eval model answers one request at a time: batch_size=1")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # accelerate launch / torchrun: lmms-eval shards by rank
            from accelerate import Accelerator

            self.accelerator = Accelerator()
            self._rank, self._world_size = self.accelerator.process_index, self.accelerator.num_processes
            if device == "auto":
                device = str(self.accelerator.device)
        self.processor = load_processor(pretrained)
        self.model = load_model(pretrained, device, dtype)
        self.method = getattr(self.model.config, "method", None)
        self.processor_options = {} if granularity is None else {"granularity": parse_granularity(str(granularity))}
        self.generate_options = {}
        if max_visual_tokens is not None:
            self.generate_options["max_visual_tokens"] = int(max_visual_tokens)
        if granularity_bias is not None:
            self.generate_options["granularity_bias"] = float(granularity_bias)
        self.visual_log = visual_log
        self.visual_reports: list[dict] = []
        self.processor.tokenizer.padding_side = "left"

    @property
    def device(self):
        return self.model.device

    def _options(self, task: str) -> dict:
        options = dict(self.processor_options)
        if self.method == "uhd" and "pre_resize_long_side" not in options:
            from ..pipelines.uhd import uhd_eval_pre_resize

            options["pre_resize_long_side"] = uhd_eval_pre_resize(task)  # the release's per-benchmark pre-resize
        return options

    def _inputs(self, context: str, visuals, task: str, continuation: str | None = None):
        images = [v.convert("RGB") for v in _flatten(visuals) if isinstance(v, Image.Image)]
        prompt = build_prompt(self.processor, context, len(images))
        text = prompt if continuation is None else prompt + continuation
        inputs = self.processor(images=images or None, text=text, **(self._options(task) if images else {}))
        return inputs.to(self.model.device), prompt, images

    def _visuals(self, doc_to_visual, doc_id, task, split):
        return doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual else []

    def _record(self, doc_id, task, n_images):
        report = list(getattr(self.model, "last_visual_report", None) or [])
        entry = {"task": task, "doc_id": doc_id, "images": n_images,
                 "visual_tokens": [int(r["visual_tokens"]) for r in report],
                 "granularity": [r["granularity"] for r in report if "granularity" in r]}
        self.visual_reports.append(entry)
        if self.visual_log:
            with open(self.visual_log, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(entry) + "\n")

    def generate_until(self, requests) -> list[str]:
        answers = []
        first = len(self.visual_reports)
        for request in tqdm(requests, disable=self.rank != 0, desc="multigran"):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            inputs, _, images = self._inputs(context, self._visuals(doc_to_visual, doc_id, task, split), task)
            temperature = float(gen_kwargs.get("temperature", 0) or 0)
            settings = {"max_new_tokens": int(gen_kwargs.get("max_new_tokens", 128)),
                        "do_sample": bool(gen_kwargs.get("do_sample", False)) and temperature > 0,
                        "num_beams": int(gen_kwargs.get("num_beams", 1) or 1)}
            if settings["do_sample"]:
                settings.update(temperature=temperature, top_p=gen_kwargs.get("top_p") or 1.0)
            with torch.inference_mode():
                output = self.model.generate(**inputs, **self.generate_options, **settings)
            text = self.processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
            for stop in until:
                if stop and stop in text:
                    text = text.split(stop)[0]
            self._record(doc_id, task, len(images))
            answers.append(text.strip())
        self._log_summary(self.visual_reports[first:])
        return answers

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """(loss, is_greedy) per request, in lmms-eval's convention (its llava / llava_hf models; the
        multiple_choice scorer takes the argmin, api/task.py:1624): the continuation's mean negative token
        log-probability after the prompt, and whether greedy decoding would have produced it. The continuation's
        tokens are the last tokens of prompt + continuation (counted from the right, so an image's token count chosen
        by the model does not shift them)."""
        results = []
        for request in tqdm(requests, disable=self.rank != 0, desc="multigran"):
            context, doc_to_target, doc_to_visual, doc_id, task, split = request.args
            continuation = doc_to_target if isinstance(doc_to_target, str) else doc_to_target(
                self.task_dict[task][split][doc_id])
            visuals = self._visuals(doc_to_visual, doc_id, task, split)
            full, prompt, images = self._inputs(context, visuals, task, continuation)
            prompt_length = len(self.processor.tokenizer(prompt.replace(self.processor.image_token, ""))["input_ids"])
            full_length = len(self.processor.tokenizer((prompt + continuation).replace(
                self.processor.image_token, ""))["input_ids"])
            n = max(1, full_length - prompt_length)
            with torch.inference_mode():
                logits = self.model(**full).logits[0].float()        # (L', vocab)
            targets = full["input_ids"][0, -n:]                       # (n,)
            scores = torch.log_softmax(logits[-n - 1:-1], dim=-1)     # (n, vocab): position t predicts token t + 1
            loss = -scores.gather(1, targets[:, None]).mean().item()
            greedy = bool((scores.argmax(dim=-1) == targets).all())
            self._record(doc_id, task, len(images))
            # lmms-eval 0.7.3 passes every model output through unwrap_generation_output (evaluator.py:1231), which
            # turns a bare (float, bool) tuple into its str() (api/instance.py:71) and breaks multiple_choice; a
            # GenerationResult hands its payload through unchanged.
            value = (loss, greedy)
            results.append(GenerationResult(text=value) if GenerationResult is not None else value)
        return results

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("multigran's lmms-eval model answers single-round tasks")

    @staticmethod
    def _log_summary(reports):
        tokens = [t for r in reports for t in r["visual_tokens"]]
        if not tokens:
            return
        distribution: dict[str, int] = {}
        for report in reports:
            for level in report["granularity"]:
                distribution[str(level)] = distribution.get(str(level), 0) + 1
        logger.info(f"multigran: {len(reports)} requests, {statistics.mean(tokens):.1f} visual tokens per image"
                    + (f", granularity {distribution}" if distribution else ""))


__all__ = ["MultiGranLMMS"]
