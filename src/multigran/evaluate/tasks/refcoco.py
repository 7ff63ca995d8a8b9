"""RefCOCO / RefCOCO+ / RefCOCOg: the box in the answer against the reference box, Acc@0.5 IoU, in the model's
coordinate convention (--box-format, see metrics/grounding.py)."""

import io
from pathlib import Path

from ..metrics.grounding import BOX_FORMATS, iou, parse_box, reference_box
from ..sources import RecordError, read_jsonl, require_field, text_field
from .base import Sample, Task, mean_percent, where_of

# LLaVA-1.5's grounding instruction (its RefCOCO training conversations); lmms-eval's refcoco_bbox_rec prompt for
# boxes in the image's own [0, 1] frame (lmms_eval/tasks/refcoco/utils_rec.py:48-53).
LLAVA_PROMPT = "Please provide the bounding box coordinate of the region this sentence describes: {}."
LMMS_PROMPT = ("Bounding box coordinates are specified in the format (top-left x, top-left y, bottom-right x, "
               "bottom-right y). All values are floating point numbers bounded between 0 and 1. Please provide the "
               "bounding box coordinate of the region this sentence describes: {}")


class RefCOCO(Task):
    name = "refcoco"
    title = "RefCOCO"
    files = ("lmms-eval's RefCOCO parquet (bbox_rec splits), or a JSONL of {\"question_id\", \"image\", \"sentence\", "
             "\"bbox\": [x, y, w, h] in pixels, \"width\", \"height\"} (the release's refs(unc).p is a pickle and is "
             "never opened)")
    prompt = ("`--box-format square` (default): LLaVA-1.5's `Please provide the bounding box coordinate of the region "
              "this sentence describes: <sentence>.`; `normalized`: lmms-eval's refcoco_bbox_rec prompt")
    metric = "acc@0.5"
    max_new_tokens = 32

    def __init__(self, box_format="square", **options):
        if box_format not in BOX_FORMATS:
            raise ValueError(f"--box-format {box_format!r}: expected one of {', '.join(BOX_FORMATS)}")
        super().__init__(box_format=box_format, **options)
        self.box_format = box_format
        self.template = LLAVA_PROMPT if box_format == "square" else LMMS_PROMPT

    def build(self, qid, sentence, image, bbox, size, at):
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
            raise RecordError(f"{at}: bbox should be [x, y, w, h], got {bbox!r}")
        if size is None and isinstance(image, dict) and image.get("bytes"):
            from PIL import Image

            size = Image.open(io.BytesIO(image["bytes"])).size
        if not size:
            raise RecordError(f"{at}: the image size is needed (give 'width' and 'height')")
        return Sample(str(qid), self.template.format(sentence.strip()), [image],
                      reference_box(bbox, size[0], size[1], self.box_format))

    def from_release(self, path: Path):
        if path.suffix != ".jsonl":
            raise RecordError(f"{path}: task {self.name} reads {self.files}")
        samples = []
        for number, record in read_jsonl(path):
            at = f"{path}: line {number}"
            size = (record["width"], record["height"]) if "width" in record and "height" in record else None
            samples.append(self.build(require_field(record, "question_id", at), text_field(record, "sentence", at),
                                      text_field(record, "image", at), require_field(record, "bbox", at), size, at))
        return samples

    def from_table(self, rows, where):
        samples = []
        for i, row in enumerate(rows):
            at = where_of(where, i)
            sentence = row.get("answer")
            sentence = sentence[0] if isinstance(sentence, list) and sentence else sentence
            if not isinstance(sentence, str):
                raise RecordError(f"{at}: 'answer' (the referring expression) should be a string")
            samples.append(self.build(require_field(row, "question_id", at), sentence, row.get("image"),
                                      require_field(row, "bbox", at), None, at))
        return samples

    def score(self, samples, answers):
        ious, unparsed = [], 0
        for sample in samples:
            box = parse_box(answers.get(sample.question_id, ""))
            unparsed += box is None
            ious.append(iou(box, sample.target) if box else 0.0)
        acc = mean_percent(v >= 0.5 for v in ious)
        return {"score": acc, "metrics": {"acc@0.5": acc, "mean_iou": mean_percent(ious)}, "by_category": {},
                "unparsed": unparsed, "box_format": self.box_format}


class RefCOCOPlus(RefCOCO):
    name = "refcoco+"
    title = "RefCOCO+"


class RefCOCOg(RefCOCO):
    name = "refcocog"
    title = "RefCOCOg"
